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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Optional, Union

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from .aggregation import BackwardSums, ForwardStats, PayloadError, SyncPoint
from .secure import KeyAgreementError, MaskedPayload, Roster, SecureStatsError, shifts_from_arrays, shifts_to_arrays

__all__ = [
    "ACTION",
    "MESSAGE_TYPE",
    "Control",
    "Status",
    "encode_begin",
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

PHASE_KEYS = "keys"  # secure statistics: the round's key exchange, before begin
PHASE_BEGIN = "begin"
PHASE_AGGREGATE = "aggregate"
PHASE_FORWARD = "forward"
PHASE_BACKWARD = "backward"
PHASE_DONE = "done"

_FORWARD_ARRAYS = ("mean", "var")
_BACKWARD_ARRAYS = ("sum-grad", "sum-grad-xhat")

Payload = Union[ForwardStats, BackwardSums]


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


@dataclass(frozen=True)
class Status:
    """A client's reply: either a sync point with its payload, or ``done``."""

    phase: str
    round: int
    step: int
    point: Optional[SyncPoint] = None
    payload: Optional[Payload] = None
    arrays: Optional[ArrayRecord] = None
    metrics: Optional[MetricRecord] = None
    public_key: Optional[bytes] = None  # keys reply


def _stats_record(payload: Union[Payload, MaskedPayload]) -> tuple[ArrayRecord, dict]:
    if isinstance(payload, MaskedPayload):  # sums masked; a forward payload's counts also clear
        scalars: dict = {"masked": True}
        if payload.count is not None:
            scalars.update({"count": float(payload.count), "num-examples": int(payload.num_examples)})
        return ArrayRecord({k: Array(v) for k, v in payload.to_arrays().items()}), scalars
    if isinstance(payload, ForwardStats):
        arrays = {"mean": payload.mean, "var": payload.var}
        scalars = {"count": float(payload.count), "num-examples": int(payload.num_examples)}
    else:
        arrays = {"sum-grad": payload.sum_grad, "sum-grad-xhat": payload.sum_grad_xhat}
        scalars = {}
    record = ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float64)) for k, v in arrays.items()})
    return record, scalars


def _payload_from(
    sender: Hashable, phase: str, stats: Optional[ArrayRecord], scalars: ConfigRecord
) -> Union[Payload, MaskedPayload]:
    names = _FORWARD_ARRAYS if phase == PHASE_FORWARD else _BACKWARD_ARRAYS
    if stats is None:
        raise PayloadError(sender, f"missing ArrayRecord '{STATS}'")
    if scalars.get("masked") is True:
        try:
            arrays = {name: stats[name].numpy() for name in stats.keys()}
        except Exception as error:  # a corrupt Array
            raise PayloadError(sender, f"'{STATS}' cannot be decoded: {error}") from None
        return MaskedPayload.from_arrays(
            sender, phase, _get_int(sender, scalars, "channels"), arrays,
            count=scalars.get("count") if phase == PHASE_FORWARD else None,
            num_examples=scalars.get("num-examples") if phase == PHASE_FORWARD else None,
        )
    if set(stats.keys()) != set(names):
        raise PayloadError(sender, f"'{STATS}' holds {sorted(stats.keys())}, expected {list(names)}")
    try:
        values = {name: stats[name].numpy() for name in names}
    except Exception as error:  # a corrupt Array
        raise PayloadError(sender, f"'{STATS}' cannot be decoded: {error}") from None
    if phase == PHASE_FORWARD:
        count, examples = scalars.get("count"), scalars.get("num-examples")
        if not isinstance(count, (int, float)) or isinstance(count, bool):
            raise PayloadError(sender, f"forward payload needs a numeric 'count', got {count!r}")
        if not isinstance(examples, int) or isinstance(examples, bool):
            raise PayloadError(sender, f"forward payload needs an int 'num-examples', got {examples!r}")
        return ForwardStats(count=float(count), num_examples=examples, mean=values["mean"], var=values["var"])
    return BackwardSums(sum_grad=values["sum-grad"], sum_grad_xhat=values["sum-grad-xhat"])


def _get_int(sender: Hashable, record: ConfigRecord, key: str) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise PayloadError(sender, f"'{key}' must be an int, got {value!r}")
    return value


# ---------------------------------------------------------------------- server -> client
def encode_keys(round: int, sync_steps: int) -> RecordDict:
    """Secure statistics: ask the round's clients for a fresh public key."""
    control = ConfigRecord(
        {"phase": PHASE_KEYS, "round": round, "step": 0, "point": -1, "sync-steps": sync_steps, "seed": 0}
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
        content[SECURE] = ArrayRecord({k: Array(v) for k, v in roster.to_arrays().items()})
        content[SHIFTS] = ArrayRecord({k: Array(v) for k, v in shifts_to_arrays(shifts or {}).items()})
    return content


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
    stats, scalars = _stats_record(aggregate)
    control = ConfigRecord(
        {"phase": PHASE_AGGREGATE, "round": round, "step": step, "point": index,
         "sync-steps": sync_steps, "seed": seed, "sync-phase": point.phase, **scalars}
    )
    return RecordDict({CONTROL: control, STATS: stats})


def decode_control(content: RecordDict) -> Control:
    """Decode and validate a ``train.fedtan`` message on the client."""
    sender = "server"
    control = content.config_records.get(CONTROL)
    if control is None:
        raise PayloadError(sender, f"message has no ConfigRecord '{CONTROL}'")
    phase = control.get("phase")
    fields = {k: _get_int(sender, control, k) for k in ("round", "step", "point", "sync-steps", "seed")}
    roster, shifts, attempt = None, None, 0
    if phase == PHASE_KEYS:
        aggregate = None
    elif phase == PHASE_BEGIN:
        if ARRAYS not in content.array_records:
            raise PayloadError(sender, f"begin message has no ArrayRecord '{ARRAYS}'")
        aggregate = None
        attempt = _get_int(sender, control, "attempt")
        if SECURE in content.array_records:
            try:
                roster = Roster.from_arrays({k: v.numpy() for k, v in content.array_records[SECURE].items()})
                shifts = shifts_from_arrays(
                    {k: v.numpy() for k, v in content.array_records.get(SHIFTS, ArrayRecord()).items()}
                )
            except (KeyAgreementError, SecureStatsError) as error:
                raise PayloadError(sender, f"begin message: {error}") from None
    elif phase == PHASE_AGGREGATE:
        sync_phase = control.get("sync-phase")
        if sync_phase not in (PHASE_FORWARD, PHASE_BACKWARD):
            raise PayloadError(sender, f"unknown sync-phase {sync_phase!r}")
        aggregate = _payload_from(sender, sync_phase, content.array_records.get(STATS), control)
    else:
        raise PayloadError(sender, f"unknown phase {phase!r}")
    return Control(
        phase=phase, round=fields["round"], step=fields["step"], point=fields["point"],
        sync_steps=fields["sync-steps"], seed=fields["seed"], aggregate=aggregate,
        attempt=attempt, roster=roster, shifts=shifts,
    )


# ---------------------------------------------------------------------- client -> server
def encode_public_key(round: int, public_key: bytes) -> RecordDict:
    """A client's reply to the key exchange: its public key for the round."""
    status = ConfigRecord({"phase": PHASE_KEYS, "round": round, "step": -1, "point": -1})
    key = ArrayRecord({"public-key": Array(np.frombuffer(public_key, dtype=np.uint8).copy())})
    return RecordDict({STATUS: status, SECURE: key})


def encode_request(
    round: int, step: int, point: SyncPoint, payload: Union[Payload, MaskedPayload]
) -> RecordDict:
    """A client's reply at a sync point."""
    stats, scalars = _stats_record(payload)
    status = ConfigRecord(
        {"phase": point.phase, "round": round, "step": step, "point": point.index,
         "call": point.call, "channels": point.channels, **scalars}
    )
    return RecordDict({STATUS: status, STATS: stats})


def encode_done(round: int, arrays: ArrayRecord, metrics: MetricRecord) -> RecordDict:
    """A client's last reply of a round: its trained model and metrics."""
    status = ConfigRecord({"phase": PHASE_DONE, "round": round, "step": -1, "point": -1})
    return RecordDict({STATUS: status, ARRAYS: arrays, METRICS: metrics})


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
        return Status(phase=phase, round=round_, step=step, public_key=key.tobytes())
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
        return Status(phase=phase, round=round_, step=step, arrays=arrays, metrics=metrics)
    if phase not in (PHASE_FORWARD, PHASE_BACKWARD):
        raise PayloadError(sender, f"unknown reply phase {phase!r}")
    point = SyncPoint(
        index=_get_int(sender, status, "point"),
        phase=phase,
        call=_get_int(sender, status, "call"),
        channels=_get_int(sender, status, "channels"),
    )
    payload = _payload_from(sender, phase, content.array_records.get(STATS), status)
    return Status(phase=phase, round=round_, step=step, point=point, payload=payload)


def record_bytes(content: RecordDict) -> int:
    """Bytes of the arrays and configs of a message (Flower's own ``count_bytes``)."""
    total = 0
    for record in content.values():
        count = getattr(record, "count_bytes", None)
        if count is not None:
            total += int(count())
    return total
