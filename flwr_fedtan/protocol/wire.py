"""FedTAN's wire format: message type, record names, the server's messages and the clients'
replies (one status type per phase), with their validation.

Both sides import this module; nothing else knows how FedTAN data sits in a Flower
``RecordDict``. The names live in :mod:`.names` and the clients' replies in :mod:`.status`;
this module re-exports both, so ``wire.X`` is every name of the wire format.

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
(keys)      secure models, after a drop in the final   a fresh public key
            exchange: ``keys`` among the survivors
(remask)    ``fedtan.control`` (``remask``: attempt)   ``done``: the same model, masked under
            + ``fedtan.secure`` (the new roster)       the fresh keys
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
from typing import Optional

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from ..aggregation import ForwardStats, SyncPoint
from ..secure import Roster
from .codec import Payload, ServerMessageError, payload_record, roster_record, secure_from_records, shifts_record
from .codec import pooled_aggregate as _aggregate_from
from .names import (
    ACTION, MESSAGE_TYPE, ARRAYS, CONFIG, METRICS, CONTROL, STATUS, STATS, SECURE, SHIFTS, STATS_BUFFERS,
    PHASE_KEYS, PHASE_BLAME, PHASE_BEGIN, PHASE_REMASK, PHASE_AGGREGATE, PHASE_FORWARD, PHASE_BACKWARD, PHASE_DONE,
    PHASE_STATS_KEYS, PHASE_STATS_BEGIN, PHASE_STATS_AGGREGATE, PHASE_STATS_DONE, STATS_PHASES,
)
from .status import (
    Status, KeysStatus, BlameStatus, SyncStatus, DoneStatus, StatsDoneStatus, point_of, encode_public_key,
    encode_canary_masks, encode_request, encode_done, encode_stats_done, decode_reply,
)

__all__ = [  # the wire format: this module's names, the names of .names and the replies of .status
    "Control", "encode_keys", "encode_blame", "encode_begin", "encode_remask", "with_attempt", "with_roster",
    "encode_aggregate", "encode_stats_keys", "encode_stats_begin", "encode_stats_aggregate", "decode_control",
    "record_bytes", "ACTION",
    "MESSAGE_TYPE", "ARRAYS", "CONFIG", "METRICS", "CONTROL", "STATUS", "STATS", "SECURE", "SHIFTS",
    "STATS_BUFFERS", "PHASE_KEYS", "PHASE_BLAME", "PHASE_BEGIN", "PHASE_REMASK", "PHASE_AGGREGATE", "PHASE_FORWARD",
    "PHASE_BACKWARD", "PHASE_DONE", "PHASE_STATS_KEYS", "PHASE_STATS_BEGIN", "PHASE_STATS_AGGREGATE",
    "PHASE_STATS_DONE", "STATS_PHASES", "Status", "KeysStatus", "BlameStatus", "SyncStatus", "DoneStatus",
    "StatsDoneStatus", "point_of", "encode_public_key", "encode_canary_masks", "encode_request", "encode_done",
    "encode_stats_done", "decode_reply",
]


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
    roster: Optional[Roster] = None  # secure statistics or models: the attempt's roster (begin, remask)
    shifts: Optional[dict] = None  # secure statistics: public shifts by sync-point index (begin)
    examples: int = 0  # statistics pass: examples each client forwards (stats-begin)
    exchange: int = -1  # blame: the exchange whose canary masks are asked for
    model: bool = False  # blame: the canary asked for is the masked final model's (not an exchange's)
    length: int = 0  # blame: the length of the masked payloads of that exchange
    mask_stats: bool = True  # begin with a roster: whether the statistics are masked (secure_stats)
    model_weight_key: Optional[str] = None  # begin, secure models: the metric that weighs the masked model


# ---------------------------------------------------------------------- server -> client
def encode_keys(round: int, sync_steps: int) -> RecordDict:
    """Secure statistics: ask the round's clients for a fresh public key."""
    control = ConfigRecord(
        {"phase": PHASE_KEYS, "round": round, "step": 0, "point": -1, "sync-steps": sync_steps, "seed": 0}
    )
    return RecordDict({CONTROL: control})


def encode_blame(round: int, sync_steps: int, exchange: int, length: int, model: bool = False) -> RecordDict:
    """Secure statistics: the canaries of ``exchange`` did not cancel; ask each client for the
    canary's pair masks (:func:`flwr_fedtan.secure.canary_masks`). With ``model`` (secure
    models) the canary is the masked final model's, ``exchange`` is ignored."""
    control = ConfigRecord(
        {"phase": PHASE_BLAME, "round": round, "step": 0, "point": -1, "sync-steps": sync_steps, "seed": 0,
         "exchange": -1 if model else exchange, "length": length, "model": bool(model)}
    )
    return RecordDict({CONTROL: control})


def encode_remask(round: int, sync_steps: int, attempt: int, roster: Roster) -> RecordDict:
    """Secure models, after a drop between masking and unmasking: ask the survivors (who
    just sent fresh public keys) for the round's final model they kept, masked under
    ``roster`` for ``attempt`` (the round's attempt count goes on: never an earlier one)."""
    control = ConfigRecord(
        {"phase": PHASE_REMASK, "round": round, "step": 0, "point": -1, "sync-steps": sync_steps, "seed": 0,
         "attempt": attempt}
    )
    return RecordDict({CONTROL: control, SECURE: roster_record(roster)})


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


def with_roster(content: RecordDict, attempt: int, roster: Roster, shifts: Optional[dict], mask_stats: bool = True,
                model_weight_key: Optional[str] = None) -> RecordDict:
    """A ``begin`` message with the attempt's roster and shifts added: secure statistics
    (``mask_stats``) and/or secure models (``model_weight_key``: the metric the client
    weighs its masked model by)."""
    control = ConfigRecord(dict(content.config_records[CONTROL]))
    control["attempt"] = attempt
    control["secure-stats"] = bool(mask_stats)
    if model_weight_key is not None:
        control["secure-models"] = str(model_weight_key)
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
    known = (PHASE_KEYS, PHASE_BEGIN, PHASE_AGGREGATE, PHASE_BLAME, PHASE_REMASK, *STATS_PHASES)
    if phase not in known:
        raise ServerMessageError(
            f"unknown phase {phase!r} (expected one of {', '.join(repr(p) for p in known)})"
        )
    fields = {k: _server_int(control, k) for k in ("round", "step", "point", "sync-steps", "seed")}
    if fields["sync-steps"] < 1:
        raise ServerMessageError(f"'sync-steps' must be >= 1, got {fields['sync-steps']}")
    roster, shifts, attempt, examples, exchange, length = None, None, 0, 0, -1, 0
    mask_stats: bool = True
    model_weight_key: Optional[str] = None
    model = False
    if phase in (PHASE_KEYS, PHASE_STATS_KEYS):
        aggregate = None
    elif phase == PHASE_BLAME:
        aggregate = None
        exchange, length = _server_int(control, "exchange"), _server_int(control, "length")
        model_flag = control.get("model", False)
        if not isinstance(model_flag, bool):
            raise ServerMessageError(f"'{CONTROL}' field 'model' must be a bool, got {model_flag!r}")
        model = model_flag
    elif phase == PHASE_REMASK:
        aggregate = None
        attempt = _server_int(control, "attempt")
        if attempt < 1:
            raise ServerMessageError(f"remask 'attempt' must be >= 1 (it follows the round's first), got {attempt}")
        if SECURE not in content.array_records:
            raise ServerMessageError(f"remask message has no ArrayRecord '{SECURE}' (the new roster)")
        roster, _ = secure_from_records(content.array_records[SECURE], None, "remask message")
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
            stats_flag, weight_key = control.get("secure-stats", True), control.get("secure-models")
            if not isinstance(stats_flag, bool) or not (weight_key is None or isinstance(weight_key, str)):
                raise ServerMessageError(
                    f"'secure-stats' must be a bool and 'secure-models' a metric name, got {stats_flag!r} and "
                    f"{weight_key!r}"
                )
            mask_stats, model_weight_key = stats_flag, weight_key
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
        mask_stats=mask_stats, model_weight_key=model_weight_key, model=model,
    )


def record_bytes(content: RecordDict) -> int:
    """Bytes of the arrays and configs of a message (Flower's own ``count_bytes``)."""
    total = 0
    for record in content.values():
        count = getattr(record, "count_bytes", None)
        if count is not None:
            total += int(count())
    return total
