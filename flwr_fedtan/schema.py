"""FedTAN's wire schema: message type, record names, phases and their validation.

Both sides import this module; nothing else knows how FedTAN data sits in a Flower
``RecordDict``.

A round is a sequence of exchanges, all with message type ``"train.fedtan"``:

==========  =========================================  ======================================
exchange    server -> client                           client -> server
==========  =========================================  ======================================
0           ``arrays`` (global model), ``config``,     first payload (``fedtan.status``
            ``fedtan.control`` (phase ``begin``)       + ``fedtan.stats``)
1 .. 2LS-1  ``fedtan.control`` (phase ``aggregate``)   next payload
            + ``fedtan.stats`` (the aggregate)
2LS         last aggregate                             ``arrays`` (trained model),
                                                       ``metrics``, ``fedtan.status`` (done)
==========  =========================================  ======================================

``L`` is the number of synchronised BatchNorm calls of the model and ``S`` the number of
synchronised steps per round: ``2LS + 1`` exchanges a round.

The statistics pass after a round's aggregation (:mod:`flwr_fedtan.statistics_pass`) is
``L + 1`` more exchanges of the same message type (one per BatchNorm call, and one that
hands out the last pooled statistics and collects the buffer mapping):

==========  =========================================  ======================================
exchange    server -> client                           client -> server
==========  =========================================  ======================================
(keys)      secure statistics only: ``stats-keys``     a fresh public key
0           ``arrays`` (the aggregated global model),  forward payload of BatchNorm call 0
            ``fedtan.control`` (``stats-begin``:
            seed, examples; roster if secure)
1 .. L-1    ``stats-aggregate`` + pooled statistics    next forward payload
L           last pooled statistics                     ``fedtan.status`` (``stats-done``) +
                                                       ``fedtan.stats-buffers``: which calls
                                                       fed which running buffer
==========  =========================================  ======================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Optional, Union

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from .aggregation import ForwardStats, SyncPoint
from .errors import PayloadError
from .protocol.codec import (
    Payload, ServerMessageError, payload_record, roster_record, secure_from_records, shifts_record,
)
from .protocol.codec import client_payload as _payload_from
from .protocol.codec import get_int as _get_int
from .protocol.codec import pooled_aggregate as _aggregate_from
from .secure import MaskedPayload, Roster

__all__ = [
    "ACTION",
    "MESSAGE_TYPE",
    "Control",
    "Status",
    "KeysStatus",
    "BlameStatus",
    "SyncStatus",
    "DoneStatus",
    "StatsDoneStatus",
    "point_of",
    "encode_begin",
    "with_attempt",
    "encode_aggregate",
    "decode_control",
    "encode_request",
    "encode_done",
    "decode_reply",
    "record_bytes",
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
PHASE_AGGREGATE = "aggregate"
PHASE_FORWARD = "forward"
PHASE_BACKWARD = "backward"
PHASE_DONE = "done"
PHASE_STATS_KEYS = "stats-keys"  # statistics pass, secure: a fresh key exchange
PHASE_STATS_BEGIN = "stats-begin"
PHASE_STATS_AGGREGATE = "stats-aggregate"
PHASE_STATS_DONE = "stats-done"
STATS_PHASES = (PHASE_STATS_KEYS, PHASE_STATS_BEGIN, PHASE_STATS_AGGREGATE)

@dataclass(frozen=True)
class Control:
    """What the server tells a client in a ``train.fedtan`` message.

    ``round`` is the server round; ``step`` the synchronised step within it; ``point`` the
    sync point the aggregate belongs to (``-1`` on ``begin``); ``sync_steps`` the
    synchronised steps per round; ``seed`` the round's seed for batch sampling.
    """

    phase: str
    round: int
    step: int
    point: int
    sync_steps: int
    seed: int
    aggregate: Optional[Payload] = None
    attempt: int = 0
    roster: Optional[Roster] = None  # secure statistics: the attempt's roster (begin)
    shifts: Optional[dict] = None  # secure statistics: public shifts by sync-point index (begin)
    examples: int = 0  # statistics pass: examples each client forwards (stats-begin)
    exchange: int = -1  # blame: the exchange whose canary masks are asked for
    length: int = 0  # blame: the length of the masked payloads of that exchange


@dataclass(frozen=True)
class Status:
    """A client's reply, decoded (:func:`decode_reply`): one subclass per reply phase, each
    with the fields of its phase only."""

    phase: str
    round: int
    step: int


@dataclass(frozen=True)
class KeysStatus(Status):
    """The reply to a key exchange (``keys``): the client's public key for the round."""

    public_key: bytes


@dataclass(frozen=True)
class BlameStatus(Status):
    """The reply to a blame request: the canary's pair mask with every peer."""

    canary_masks: dict  # {peer: (2,) uint64}


@dataclass(frozen=True)
class SyncStatus(Status):
    """A reply at a sync point (``forward`` or ``backward``): the point and its payload."""

    point: SyncPoint
    payload: Union[Payload, MaskedPayload]


@dataclass(frozen=True)
class DoneStatus(Status):
    """A client's last reply of a round (``done``): its trained model and metrics."""

    arrays: ArrayRecord
    metrics: MetricRecord


@dataclass(frozen=True)
class StatsDoneStatus(Status):
    """A client's last reply of a statistics pass (``stats-done``)."""

    buffer_calls: dict  # {key: ("mean" | "var", [calls])}
    num_examples: int  # examples the client forwarded


def point_of(status: Status) -> Optional[SyncPoint]:
    """The sync point a reply is at, ``None`` for a reply that is not at one."""
    return status.point if isinstance(status, SyncStatus) else None


# ---------------------------------------------------------------------- server -> client
def encode_keys(round: int, sync_steps: int) -> RecordDict:
    """Secure statistics: ask the round's clients for a fresh public key."""
    control = ConfigRecord(
        {"phase": PHASE_KEYS, "round": round, "step": 0, "point": -1, "sync-steps": sync_steps, "seed": 0}
    )
    return RecordDict({CONTROL: control})


def encode_blame(round: int, sync_steps: int, exchange: int, length: int) -> RecordDict:
    """Secure statistics: the canaries of ``exchange`` did not cancel; ask each client for the
    canary's pair masks (:func:`flwr_fedtan.secure.canary_masks`)."""
    control = ConfigRecord(
        {"phase": PHASE_BLAME, "round": round, "step": 0, "point": -1, "sync-steps": sync_steps, "seed": 0,
         "exchange": exchange, "length": length}
    )
    return RecordDict({CONTROL: control})


def encode_begin(
    arrays: ArrayRecord,
    config: ConfigRecord,
    round: int,
    sync_steps: int,
    seed: int,
    attempt: int = 0,
    roster: Optional[Roster] = None,
    shifts: Optional[dict] = None,
) -> RecordDict:
    """The first message of an attempt: the global model, the user's config, the control,
    and with secure statistics the roster of public keys and the public shifts."""
    control = ConfigRecord(
        {"phase": PHASE_BEGIN, "round": round, "step": 0, "point": -1,
         "sync-steps": sync_steps, "seed": seed, "attempt": attempt}
    )
    content = RecordDict({ARRAYS: arrays, CONFIG: config, CONTROL: control})
    if roster is not None:
        content[SECURE] = roster_record(roster)
        content[SHIFTS] = shifts_record(shifts)
    return content


def with_attempt(content: RecordDict, attempt: int) -> RecordDict:
    """A ``begin`` message for attempt ``attempt`` of its round (the client derives the
    attempt's batch seed from the run seed, the round and the attempt)."""
    control = ConfigRecord(dict(content.config_records[CONTROL]))
    control["attempt"] = attempt
    out = RecordDict(dict(content.items()))
    out[CONTROL] = control
    return out


def with_roster(content: RecordDict, attempt: int, roster: Roster, shifts: Optional[dict]) -> RecordDict:
    """A ``begin`` message with secure statistics: the attempt, its roster and the shifts added."""
    control = ConfigRecord(dict(content.config_records[CONTROL]))
    control["attempt"] = attempt
    out = RecordDict(dict(content.items()))
    out[CONTROL] = control
    out[SECURE] = roster_record(roster)
    out[SHIFTS] = shifts_record(shifts)
    return out


def encode_aggregate(
    round: int,
    step: int,
    index: int,
    point: SyncPoint,
    aggregate: Payload,
    sync_steps: int,
    seed: int,
) -> RecordDict:
    """A message carrying the aggregate of one sync point.

    ``index`` counts the aggregates of the round over all its synchronised steps, so
    that a client can tell how many it should have received before this one.
    """
    stats, scalars = payload_record(aggregate)
    control = ConfigRecord(
        {"phase": PHASE_AGGREGATE, "round": round, "step": step, "point": index,
         "sync-steps": sync_steps, "seed": seed, "sync-phase": point.phase, **scalars}
    )
    return RecordDict({CONTROL: control, STATS: stats})


def encode_stats_keys(round: int) -> RecordDict:
    """Statistics pass with secure statistics: ask for a fresh public key."""
    control = ConfigRecord(
        {"phase": PHASE_STATS_KEYS, "round": round, "step": 0, "point": -1, "sync-steps": 1, "seed": 0}
    )
    return RecordDict({CONTROL: control})


def encode_stats_begin(
    arrays: ArrayRecord,
    round: int,
    seed: int,
    examples: int,
    attempt: int = 0,
    roster: Optional[Roster] = None,
    shifts: Optional[dict] = None,
) -> RecordDict:
    """The first message of a statistics pass: the global model, the seed that picks each
    client's examples, how many (at most) it forwards, and if secure the roster."""
    control = ConfigRecord(
        {"phase": PHASE_STATS_BEGIN, "round": round, "step": 0, "point": -1, "sync-steps": 1,
         "seed": seed, "attempt": attempt, "examples": examples}
    )
    content = RecordDict({ARRAYS: arrays, CONTROL: control})
    if roster is not None:
        content[SECURE] = roster_record(roster)
        content[SHIFTS] = shifts_record(shifts)
    return content


def encode_stats_aggregate(round: int, index: int, aggregate: ForwardStats, seed: int) -> RecordDict:
    """The pooled statistics of BatchNorm call ``index`` of a statistics pass."""
    content = encode_aggregate(round, 0, index, SyncPoint(index, PHASE_FORWARD, index, len(aggregate.mean)),
                               aggregate, 1, seed)
    content.config_records[CONTROL]["phase"] = PHASE_STATS_AGGREGATE
    return content


def _server_int(control: ConfigRecord, key: str) -> int:
    value = control.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ServerMessageError(f"'{CONTROL}' field '{key}' must be an int, got {value!r}")
    return value


def decode_control(content: RecordDict) -> Control:
    """Decode and validate a ``train.fedtan`` message on the client.

    Raises
    ------
    ServerMessageError
        If the message is malformed: no control record, an unknown phase, non-int fields,
        a ``begin`` without the model, or an aggregate that is not what the wire format
        promises (see :func:`_aggregate_from`); the message names the field.
    """
    control = content.config_records.get(CONTROL)
    if control is None:
        raise ServerMessageError(f"no ConfigRecord '{CONTROL}'")
    phase = control.get("phase")
    known = (PHASE_KEYS, PHASE_BEGIN, PHASE_AGGREGATE, PHASE_BLAME, *STATS_PHASES)
    if phase not in known:
        raise ServerMessageError(
            f"unknown phase {phase!r} (expected one of {', '.join(repr(p) for p in known)})"
        )
    fields = {k: _server_int(control, k) for k in ("round", "step", "point", "sync-steps", "seed")}
    if fields["sync-steps"] < 1:
        raise ServerMessageError(f"'sync-steps' must be >= 1, got {fields['sync-steps']}")
    roster, shifts, attempt, examples, exchange, length = None, None, 0, 0, -1, 0
    if phase in (PHASE_KEYS, PHASE_STATS_KEYS):
        aggregate = None
    elif phase == PHASE_BLAME:
        aggregate = None
        exchange, length = _server_int(control, "exchange"), _server_int(control, "length")
    elif phase in (PHASE_BEGIN, PHASE_STATS_BEGIN):
        if ARRAYS not in content.array_records:
            raise ServerMessageError(f"{phase} message has no ArrayRecord '{ARRAYS}'")
        if phase == PHASE_STATS_BEGIN:
            examples = _server_int(control, "examples")
            if examples < 1:
                raise ServerMessageError(f"'examples' must be >= 1, got {examples}")
        aggregate = None
        attempt = _server_int(control, "attempt") if "attempt" in control else 0
        if attempt < 0:
            raise ServerMessageError(f"'attempt' must be >= 0, got {attempt}")
        if SECURE in content.array_records:
            roster, shifts = secure_from_records(
                content.array_records[SECURE], content.array_records.get(SHIFTS), "begin message"
            )
    else:
        if fields["point"] < 0:
            raise ServerMessageError(f"aggregate index 'point' must be >= 0, got {fields['point']}")
        where = f"aggregate {fields['point']} of round {fields['round']}"
        aggregate = _aggregate_from(control, content.array_records.get(STATS), where)
        if phase == PHASE_STATS_AGGREGATE and not isinstance(aggregate, ForwardStats):
            raise ServerMessageError(f"{where}: a statistics pass carries forward statistics only")
    return Control(
        phase=phase, round=fields["round"], step=fields["step"], point=fields["point"],
        sync_steps=fields["sync-steps"], seed=fields["seed"], aggregate=aggregate,
        attempt=attempt, roster=roster, shifts=shifts, examples=examples, exchange=exchange, length=length,
    )


# ---------------------------------------------------------------------- client -> server
def encode_public_key(round: int, public_key: bytes) -> RecordDict:
    """A client's reply to the key exchange: its public key for the round."""
    status = ConfigRecord({"phase": PHASE_KEYS, "round": round, "step": -1, "point": -1})
    key = ArrayRecord({"public-key": Array(np.frombuffer(public_key, dtype=np.uint8).copy())})
    return RecordDict({STATUS: status, SECURE: key})


def encode_canary_masks(round: int, masks: dict) -> RecordDict:
    """A client's reply to a blame request: its canary mask with every peer."""
    peers = sorted(masks)
    status = ConfigRecord({"phase": PHASE_BLAME, "round": round, "step": -1, "point": -1})
    record = ArrayRecord({
        "peers": Array(np.array(peers, dtype=np.uint64)),
        "masks": Array(np.stack([np.asarray(masks[p], dtype=np.uint64) for p in peers], axis=1)
                       if peers else np.zeros((2, 0), dtype=np.uint64)),
    })
    return RecordDict({STATUS: status, SECURE: record})


def encode_request(
    round: int, step: int, point: SyncPoint, payload: Union[Payload, MaskedPayload]
) -> RecordDict:
    """A client's reply at a sync point."""
    stats, scalars = payload_record(payload)
    status = ConfigRecord(
        {"phase": point.phase, "round": round, "step": step, "point": point.index,
         "call": point.call, "channels": point.channels, **scalars}
    )
    return RecordDict({STATUS: status, STATS: stats})


def encode_done(round: int, arrays: ArrayRecord, metrics: MetricRecord) -> RecordDict:
    """A client's last reply of a round: its trained model and metrics."""
    status = ConfigRecord({"phase": PHASE_DONE, "round": round, "step": -1, "point": -1})
    return RecordDict({STATUS: status, ARRAYS: arrays, METRICS: metrics})


def encode_stats_done(round: int, buffer_calls: dict, num_examples: int) -> RecordDict:
    """A client's last reply of a statistics pass: which BatchNorm calls fed which running
    buffer (``{key: ("mean" | "var", [calls])}``) and how many examples it forwarded."""
    status = ConfigRecord(
        {"phase": PHASE_STATS_DONE, "round": round, "step": -1, "point": -1, "num-examples": int(num_examples)}
    )
    buffers = ConfigRecord({f"{kind}:{key}": [int(c) for c in calls] for key, (kind, calls) in buffer_calls.items()})
    return RecordDict({STATUS: status, STATS_BUFFERS: buffers})


def _buffer_calls_from(sender: Hashable, record: Optional[ConfigRecord]) -> dict:
    if record is None:
        raise PayloadError(sender, f"stats-done reply has no ConfigRecord '{STATS_BUFFERS}'")
    calls: dict = {}
    for name, value in record.items():
        kind, _, key = name.partition(":")
        if kind not in ("mean", "var") or not key:
            raise PayloadError(sender, f"'{STATS_BUFFERS}' entry {name!r:.80} is not 'mean:<key>' or 'var:<key>'")
        if (not isinstance(value, list) or not value
                or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in value)):
            raise PayloadError(
                sender, f"'{STATS_BUFFERS}' entry {name!r:.80} must list call indices, got {value!r:.80}"
            )
        if key in calls:
            raise PayloadError(sender, f"'{STATS_BUFFERS}' names buffer {key!r:.80} twice")
        calls[key] = (kind, list(value))
    return calls


def decode_reply(content: RecordDict, sender: Hashable, weighted_by_key: str) -> Status:
    """Decode and validate a client's reply; :class:`PayloadError` names ``sender``."""
    status = content.config_records.get(STATUS)
    if status is None:
        raise PayloadError(sender, f"reply has no ConfigRecord '{STATUS}'")
    phase = status.get("phase")
    round_ = _get_int(sender, status, "round")
    step = _get_int(sender, status, "step")
    if phase == PHASE_KEYS:
        record = content.array_records.get(SECURE)
        if record is None or "public-key" not in record:
            raise PayloadError(sender, f"keys reply has no ArrayRecord '{SECURE}' with 'public-key'")
        key = record["public-key"].numpy()
        if key.dtype != np.uint8 or key.shape != (32,):
            raise PayloadError(sender, f"public-key is {key.dtype} {key.shape}, expected uint8 (32,)")
        return KeysStatus(phase=phase, round=round_, step=step, public_key=key.tobytes())
    if phase == PHASE_BLAME:
        record = content.array_records.get(SECURE)
        if record is None or set(record.keys()) != {"peers", "masks"}:
            raise PayloadError(sender, f"blame reply needs ArrayRecord '{SECURE}' with 'peers' and 'masks'")
        peers, masks = record["peers"].numpy(), record["masks"].numpy()
        if (peers.dtype != np.uint64 or peers.ndim != 1 or masks.dtype != np.uint64
                or masks.shape != (2, peers.shape[0])):
            raise PayloadError(sender, f"blame reply: peers {peers.dtype} {peers.shape}, masks {masks.dtype} "
                                       f"{masks.shape}; expected uint64 (P,) and (2, P)")
        revealed = {int(peer): masks[:, i].copy() for i, peer in enumerate(peers)}
        return BlameStatus(phase=phase, round=round_, step=step, canary_masks=revealed)
    if phase == PHASE_DONE:
        arrays = content.array_records.get(ARRAYS)
        metrics = content.metric_records.get(METRICS)
        if arrays is None:
            raise PayloadError(sender, f"done reply has no ArrayRecord '{ARRAYS}'")
        if metrics is None or weighted_by_key not in metrics:
            raise PayloadError(sender, f"done reply has no MetricRecord '{METRICS}' with '{weighted_by_key}'")
        weight = metrics[weighted_by_key]
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
            raise PayloadError(sender, f"'{weighted_by_key}' must be a positive number, got {weight!r}")
        return DoneStatus(phase=phase, round=round_, step=step, arrays=arrays, metrics=metrics)
    if phase == PHASE_STATS_DONE:
        examples = _get_int(sender, status, "num-examples")
        if examples < 1:
            raise PayloadError(sender, f"'num-examples' must be >= 1, got {examples}")
        buffer_calls = _buffer_calls_from(sender, content.config_records.get(STATS_BUFFERS))
        return StatsDoneStatus(phase=phase, round=round_, step=step, buffer_calls=buffer_calls,
                               num_examples=examples)
    if phase not in (PHASE_FORWARD, PHASE_BACKWARD):
        raise PayloadError(sender, f"unknown reply phase {phase!r}")
    point = SyncPoint(
        index=_get_int(sender, status, "point"),
        phase=phase,
        call=_get_int(sender, status, "call"),
        channels=_get_int(sender, status, "channels"),
    )
    payload = _payload_from(sender, phase, content.array_records.get(STATS), status)
    return SyncStatus(phase=phase, round=round_, step=step, point=point, payload=payload)


def record_bytes(content: RecordDict) -> int:
    """Bytes of the arrays and configs of a message (Flower's own ``count_bytes``)."""
    total = 0
    for record in content.values():
        count = getattr(record, "count_bytes", None)
        if count is not None:
            total += int(count())
    return total
