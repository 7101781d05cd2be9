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

from .aggregation import BackwardSums, ForwardStats, PayloadError, SyncPoint
from .errors import ServerMessageError  # re-exported: client.py and tests import it from here
from .secure import KeyAgreementError, MaskedPayload, Roster, SecureStatsError, shifts_from_arrays, shifts_to_arrays

__all__ = [
    "ACTION",
    "ServerMessageError",
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
    examples: int = 0  # statistics pass: examples each client forwards (stats-begin)
    exchange: int = -1  # blame: the exchange whose canary masks are asked for
    length: int = 0  # blame: the length of the masked payloads of that exchange


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
    buffer_calls: Optional[dict] = None  # stats-done: {key: ("mean" | "var", [calls])}
    num_examples: int = 0  # stats-done: examples the client forwarded
    canary_masks: Optional[dict] = None  # blame reply: {peer: (2,) uint64}


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
        expected = {"masked", "roster-digest"} | ({"shift"} if phase == PHASE_FORWARD else set())
        if set(stats.keys()) != expected:  # before decoding anything a client sent
            raise PayloadError(sender, f"masked payload holds {sorted(stats.keys())}, expected {sorted(expected)}")
        try:
            arrays = {name: stats[name].numpy() for name in expected}
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
        content[SECURE] = ArrayRecord({k: Array(v) for k, v in roster.to_arrays().items()})
        content[SHIFTS] = ArrayRecord({k: Array(v) for k, v in shifts_to_arrays(shifts or {}).items()})
    return content


def with_roster(content: RecordDict, attempt: int, roster: Roster, shifts: Optional[dict]) -> RecordDict:
    """A ``begin`` message with secure statistics: the attempt, its roster and the shifts added."""
    control = ConfigRecord(dict(content.config_records[CONTROL]))
    control["attempt"] = attempt
    out = RecordDict(dict(content.items()))
    out[CONTROL] = control
    out[SECURE] = ArrayRecord({k: Array(v) for k, v in roster.to_arrays().items()})
    out[SHIFTS] = ArrayRecord({k: Array(v) for k, v in shifts_to_arrays(shifts or {}).items()})
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
    stats, scalars = _stats_record(aggregate)
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
        content[SECURE] = ArrayRecord({k: Array(v) for k, v in roster.to_arrays().items()})
        content[SHIFTS] = ArrayRecord({k: Array(v) for k, v in shifts_to_arrays(shifts or {}).items()})
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


def _aggregate_from(control: ConfigRecord, stats: Optional[ArrayRecord], where: str) -> Payload:
    """The aggregate of an ``aggregate`` message, checked for what the wire guarantees:
    the arrays of its phase, float64, one value per channel, finite, equal in length, and
    for the forward phase a pooled count and example number that can be divided by.
    Whether it fits the step's pending sync point (phase, channels, examples) is checked
    by the step itself (:meth:`flwr_fedtan.step.SyncStep.resume`)."""
    sync_phase = control.get("sync-phase")
    if sync_phase not in (PHASE_FORWARD, PHASE_BACKWARD):
        raise ServerMessageError(
            f"{where}: 'sync-phase' must be '{PHASE_FORWARD}' or '{PHASE_BACKWARD}', got {sync_phase!r}"
        )
    where = f"{where} ({sync_phase})"
    names = _FORWARD_ARRAYS if sync_phase == PHASE_FORWARD else _BACKWARD_ARRAYS
    if stats is None:
        raise ServerMessageError(f"{where}: no ArrayRecord '{STATS}'")
    if set(stats.keys()) != set(names):
        raise ServerMessageError(
            f"{where}: '{STATS}' holds {sorted(stats.keys())}, a {sync_phase} aggregate holds {list(names)}"
        )
    values = {}
    for name in names:
        try:
            value = stats[name].numpy()
        except Exception as error:  # a corrupt Array
            raise ServerMessageError(f"{where}: '{name}' cannot be decoded: {error}") from None
        if value.dtype != np.float64:
            raise ServerMessageError(
                f"{where}: '{name}' has dtype {value.dtype}, FedTAN sends aggregates as float64 "
                "(is the server running another flwr-fedtan version?)"
            )
        if value.ndim != 1 or value.size == 0:
            raise ServerMessageError(
                f"{where}: '{name}' has shape {value.shape}, expected one value per channel (C,)"
            )
        if not np.isfinite(value).all():
            raise ServerMessageError(f"{where}: '{name}' contains NaN or Inf")
        values[name] = value
    first, second = (values[name] for name in names)
    if first.shape != second.shape:
        raise ServerMessageError(
            f"{where}: '{names[0]}' has {first.size} channels but '{names[1]}' has {second.size}"
        )
    if sync_phase == PHASE_BACKWARD:
        return BackwardSums(sum_grad=values["sum-grad"], sum_grad_xhat=values["sum-grad-xhat"])
    if (values["var"] < 0).any():
        raise ServerMessageError(f"{where}: pooled 'var' has negative entries (min {values['var'].min():.3g})")
    count, examples = control.get("count"), control.get("num-examples")
    if (not isinstance(count, (int, float)) or isinstance(count, bool)
            or not np.isfinite(count) or not count >= 1):
        raise ServerMessageError(f"{where}: pooled 'count' must be a finite number >= 1, got {count!r}")
    if not isinstance(examples, int) or isinstance(examples, bool) or examples < 1:
        raise ServerMessageError(f"{where}: pooled 'num-examples' must be an int >= 1, got {examples!r}")
    return ForwardStats(count=float(count), num_examples=examples, mean=values["mean"], var=values["var"])


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
            try:
                roster = Roster.from_arrays({k: v.numpy() for k, v in content.array_records[SECURE].items()})
                shifts = shifts_from_arrays(
                    {k: v.numpy() for k, v in content.array_records.get(SHIFTS, ArrayRecord()).items()}
                )
            except (KeyAgreementError, SecureStatsError) as error:
                raise ServerMessageError(f"begin message: {error}") from None
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
        return Status(phase=phase, round=round_, step=step, public_key=key.tobytes())
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
        return Status(phase=phase, round=round_, step=step, canary_masks=revealed)
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
    if phase == PHASE_STATS_DONE:
        examples = _get_int(sender, status, "num-examples")
        if examples < 1:
            raise PayloadError(sender, f"'num-examples' must be >= 1, got {examples}")
        buffer_calls = _buffer_calls_from(sender, content.config_records.get(STATS_BUFFERS))
        return Status(phase=phase, round=round_, step=step, buffer_calls=buffer_calls, num_examples=examples)
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
