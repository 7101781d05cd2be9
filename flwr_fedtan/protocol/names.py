"""The names of FedTAN's wire format: message type, record names, phases.

No torch here. Read by both sides through :mod:`flwr_fedtan.protocol.wire`, which describes
the exchanges that carry them.
"""

from __future__ import annotations

__all__ = [
    "ACTION",
    "MESSAGE_TYPE",
    "ARRAYS",
    "CONFIG",
    "METRICS",
    "CONTROL",
    "STATUS",
    "STATS",
    "SECURE",
    "SHIFTS",
    "STATS_BUFFERS",
    "PHASE_KEYS",
    "PHASE_BLAME",
    "PHASE_BEGIN",
    "PHASE_REMASK",
    "PHASE_AGGREGATE",
    "PHASE_FORWARD",
    "PHASE_BACKWARD",
    "PHASE_DONE",
    "PHASE_STATS_KEYS",
    "PHASE_STATS_BEGIN",
    "PHASE_STATS_AGGREGATE",
    "PHASE_STATS_DONE",
    "STATS_PHASES",
]

ACTION = "fedtan"
MESSAGE_TYPE = f"train.{ACTION}"

ARRAYS = "arrays"  # model: global (begin) or trained (done)
CONFIG = "config"  # the user's train config (begin)
METRICS = "metrics"  # train metrics, with the weighting key (done)
CONTROL = "fedtan.control"  # ConfigRecord, server -> client
STATUS = "fedtan.status"  # ConfigRecord, client -> server
STATS = "fedtan.stats"  # ArrayRecord: a client's payload or the server's aggregate
SECURE = "fedtan.secure"  # ArrayRecord: the roster (begin) or a client's public key (keys reply)
SHIFTS = "fedtan.shifts"  # ArrayRecord: public shifts of the forward sync points (begin, secure)
STATS_BUFFERS = "fedtan.stats-buffers"  # ConfigRecord: "mean:<key>"/"var:<key>" -> BatchNorm calls

PHASE_KEYS = "keys"  # secure statistics: the round's key exchange, before begin
PHASE_BLAME = "blame"  # secure statistics: after canaries failed, each client reveals their pair masks
PHASE_BEGIN = "begin"
PHASE_REMASK = "remask"  # secure models, after a drop in the final exchange: the kept model under fresh keys
PHASE_AGGREGATE = "aggregate"
PHASE_FORWARD = "forward"
PHASE_BACKWARD = "backward"
PHASE_DONE = "done"
PHASE_STATS_KEYS = "stats-keys"  # statistics pass, secure: a fresh key exchange
PHASE_STATS_BEGIN = "stats-begin"
PHASE_STATS_AGGREGATE = "stats-aggregate"
PHASE_STATS_DONE = "stats-done"
STATS_PHASES = (PHASE_STATS_KEYS, PHASE_STATS_BEGIN, PHASE_STATS_AGGREGATE)
