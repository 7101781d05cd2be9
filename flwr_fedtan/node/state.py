"""Everything a node keeps between two of its messages, and the only code that reads or
writes Flower's ``context.state``.

Flower keeps no Python object alive between two messages of a node (see
:mod:`flwr_fedtan.node.session`), but carries the node's ``context.state``, a
``RecordDict``. :func:`load` turns it into a :class:`NodeState` and :func:`store` writes
a :class:`NodeState` back; the records' names and layout are known here only. A message
handler loads at its start and stores only when it succeeds, in this process as in a
home in another process (whose state comes back only with a reply), so a refused message
leaves the node's state as it was.

NumPy and Flower records only: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union, cast

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from ..aggregation import BackwardSums, ForwardStats
from ..protocol import codec
from ..secure import Roster
from .weights import WeightsRef, discard_weights, load_weights, save_weights

__all__ = ["FinalModel", "NodeState", "PassProgress", "ReplayLog", "RoundProgress", "SecureKey", "load", "records",
           "replace", "store"]

Aggregate = Union[ForwardStats, BackwardSums]

# Record names in context.state (ConfigRecord unless noted)
_RUN = "fedtan.run"  # the run seed the node's first begin carried
_ROUND = "fedtan.replay"  # the round in flight (kept after it ends: restarts of it read "pooled")
_ROUND_LOG = "fedtan.log"  # ArrayRecord: the round's aggregates so far
_ROUND_LOG_SCALARS = "fedtan.log-scalars"  # their scalars
_ROUND_KEY = "fedtan.secure-key"  # the round's private key, attempt
_ROUND_ROSTER = "fedtan.secure-roster"  # ArrayRecord: the attempt's roster
_ROUND_SHIFTS = "fedtan.secure-shifts"  # ArrayRecord: public shifts
_PASS = "fedtan.stats-pass"  # the statistics pass in flight
_PASS_LOG = "fedtan.stats-log"  # ArrayRecord: its pooled statistics so far
_PASS_LOG_SCALARS = "fedtan.stats-log-scalars"
_PASS_KEY = "fedtan.stats-secure-key"
_PASS_ROSTER = "fedtan.stats-secure-roster"
_PASS_SHIFTS = "fedtan.stats-secure-shifts"
_FINAL = "fedtan.final"  # secure models: the round's final model kept for a re-mask (round, attempt, weight)
_FINAL_ARRAYS = "fedtan.final-arrays"  # ArrayRecord: that model
_FINAL_METRICS = "fedtan.final-metrics"  # MetricRecord: its train metrics
_WEIGHTS_REF = "fedtan.weights-ref"  # store, path, sha256 ("disk" store)
_WEIGHTS = "fedtan.weights"  # ArrayRecord: the starting weights ("context" store)


@dataclass
class ReplayLog:
    """The aggregates a node received so far in a round or pass, encoded by
    :mod:`flwr_fedtan.protocol.codec` as on the wire."""

    arrays: ArrayRecord = field(default_factory=ArrayRecord)
    scalars: ConfigRecord = field(default_factory=ConfigRecord)

    def append(self, index: int, aggregate: Aggregate) -> None:
        codec.log_append(self.arrays, self.scalars, index, aggregate)

    def read(self, length: int, where: str) -> list[Aggregate]:
        """The first ``length`` aggregates; :class:`~flwr_fedtan.errors.ServerMessageError`
        if one is missing or corrupt."""
        return codec.log_read(self.arrays, self.scalars, length, where)


@dataclass
class SecureKey:
    """Secure statistics: the node's private key of a round (or pass) and, once an attempt
    began with secure statistics, that attempt's roster and public shifts."""

    round: int
    private_key: bytes
    attempt: int = 0
    begun: int = -1  # the last attempt begun with this key (masks must never be reused)
    roster: Optional[Roster] = None
    shifts: Optional[dict] = None
    mask_stats: bool = True  # the attempt masks its statistics (secure_stats)
    model_weight_key: Optional[str] = None  # the attempt masks its final model, weighed by this metric
    model_masked: bool = False  # this key masked a final model (a re-mask needs a fresh key)


@dataclass
class FinalModel:
    """Secure models: a node's trained final model of a round, kept after its masked model
    went out until the round ends (its next round or statistics pass begins), so that the
    server can restart only the final exchange: the same model, masked under fresh keys."""

    round: int
    attempt: int  # the attempt (or re-mask) whose keys last masked it
    weight: float  # the weight it is masked with (the metric the begin named)
    masked_length: int  # ring elements of its masked vector (a blame request must name it)
    arrays: ArrayRecord = field(default_factory=ArrayRecord)
    metrics: MetricRecord = field(default_factory=MetricRecord)


@dataclass
class RoundProgress:
    """A synchronised round in flight: what rebuilds it (seed, settings, aggregates so far)
    and what it reports (timings, replays)."""

    round: int
    seed: int  # the node's batch seed of the round
    sync_steps: int
    local_steps: int
    attempt: int = 0
    lr: Optional[float] = None  # the round's train config's, if it set one
    batch: str = ""  # digest of the first synchronised batch's samples
    pooled: list[str] = field(default_factory=list)  # digests pooled in earlier attempts
    received: int = 0
    replays: int = 0
    sync_seconds: float = 0.0
    masked_lengths: list[int] = field(default_factory=list)  # secure: each exchange's payload length
    log: Optional[ReplayLog] = field(default_factory=ReplayLog)  # None once the round is done


@dataclass
class PassProgress:
    """A statistics pass in flight."""

    round: int
    seed: int
    examples: int
    attempt: int = 0
    received: int = 0
    replays: int = 0
    masked_lengths: list[int] = field(default_factory=list)
    log: Optional[ReplayLog] = field(default_factory=ReplayLog)


@dataclass
class NodeState:
    """Everything a node keeps between messages."""

    run_seed: Optional[int] = None  # pinned by the run's first begin
    round: Optional[RoundProgress] = None
    round_key: Optional[SecureKey] = None
    stats_pass: Optional[PassProgress] = None
    pass_key: Optional[SecureKey] = None
    weights: Optional[WeightsRef] = None  # the starting weights of the round or pass in flight
    final: Optional[FinalModel] = None  # secure models: the finished round's model, until the round ends

    def save_weights(self, arrays: ArrayRecord, store: str, run_id: int, node_id: int,
                     directory=None, max_age_hours: Optional[float] = None) -> None:
        """Keep ``arrays`` as the starting weights (see :mod:`flwr_fedtan.node.weights`),
        discarding the previous ones."""
        discard_weights(self.weights)
        self.weights = None
        self.weights = save_weights(arrays, store, run_id, node_id, directory=directory,
                                    max_age_hours=max_age_hours)

    def load_weights(self) -> ArrayRecord:
        return load_weights(self.weights)

    def discard_weights(self) -> None:
        discard_weights(self.weights)
        self.weights = None


# ---------------------------------------------------------------------- context.state
def records(context: Context) -> RecordDict:
    """The node's state as Flower carries it (to send it to the node's home)."""
    return context.state


def replace(context: Context, state: RecordDict) -> None:
    """Adopt the state a home sent back with its reply."""
    context.state = state


def load(context: Context) -> NodeState:
    """The node's state, read from ``context.state``."""
    state = context.state
    run = state.config_records.get(_RUN)
    return NodeState(
        run_seed=None if run is None else _int(run["seed"]),
        round=_round_from(state),
        round_key=_key_from(state, _ROUND_KEY, _ROUND_ROSTER, _ROUND_SHIFTS),
        stats_pass=_pass_from(state),
        pass_key=_key_from(state, _PASS_KEY, _PASS_ROSTER, _PASS_SHIFTS),
        weights=_weights_from(state),
        final=_final_from(state),
    )


def store(context: Context, node: NodeState) -> None:
    """Write ``node`` to ``context.state`` (records of what is ``None`` are removed)."""
    state = context.state
    _put(state, _RUN, None if node.run_seed is None else ConfigRecord({"seed": node.run_seed}))
    _put(state, _ROUND, None if node.round is None else _round_record(node.round))
    _put_log(state, node.round.log if node.round is not None else None, _ROUND_LOG, _ROUND_LOG_SCALARS)
    _put_key(state, node.round_key, _ROUND_KEY, _ROUND_ROSTER, _ROUND_SHIFTS)
    _put(state, _PASS, None if node.stats_pass is None else _pass_record(node.stats_pass))
    _put_log(state, node.stats_pass.log if node.stats_pass is not None else None, _PASS_LOG, _PASS_LOG_SCALARS)
    _put_key(state, node.pass_key, _PASS_KEY, _PASS_ROSTER, _PASS_SHIFTS)
    final = node.final
    _put(state, _FINAL, None if final is None else ConfigRecord(
        {"round": final.round, "attempt": final.attempt, "weight": float(final.weight),
         "masked-length": final.masked_length}))
    _put(state, _FINAL_ARRAYS, None if final is None else final.arrays)
    _put(state, _FINAL_METRICS, None if final is None else final.metrics)
    ref = node.weights
    _put(state, _WEIGHTS, ref.arrays if ref is not None else None)
    _put(state, _WEIGHTS_REF, None if ref is None or ref.path is None else ConfigRecord(
        {"store": ref.store, "path": ref.path, "sha256": cast(str, ref.sha256)}))  # a disk file has its digest


def _weights_from(state: RecordDict) -> Optional[WeightsRef]:
    if _WEIGHTS in state.array_records:
        return WeightsRef("context", arrays=state.array_records[_WEIGHTS])
    ref = state.config_records.get(_WEIGHTS_REF)
    if ref is None:
        return None
    return WeightsRef(str(ref["store"]), path=str(ref["path"]), sha256=str(ref["sha256"]))


def _final_from(state: RecordDict) -> Optional[FinalModel]:
    record = state.config_records.get(_FINAL)
    if record is None:
        return None
    return FinalModel(round=_int(record["round"]), attempt=_int(record["attempt"]), weight=_float(record["weight"]),
                      masked_length=_int(record["masked-length"]),
                      arrays=state.array_records.get(_FINAL_ARRAYS, ArrayRecord()),
                      metrics=state.metric_records.get(_FINAL_METRICS, MetricRecord()))


def _put(state: RecordDict, name: str, record) -> None:
    if record is not None:
        state[name] = record
    elif name in state:
        del state[name]


def _log_from(state: RecordDict, arrays: str, scalars: str) -> Optional[ReplayLog]:
    if arrays not in state.array_records:
        return None
    return ReplayLog(state.array_records[arrays], state.config_records.get(scalars, ConfigRecord()))


def _put_log(state: RecordDict, log: Optional[ReplayLog], arrays: str, scalars: str) -> None:
    _put(state, arrays, None if log is None else log.arrays)
    _put(state, scalars, None if log is None else log.scalars)


def _int(value: object) -> int:
    """A whole number read back from a record this module wrote."""
    return int(cast(int, value))


def _float(value: object) -> float:
    """A number read back from a record this module wrote."""
    return float(cast(float, value))


def _list(value: object) -> list:
    """A list read back from a record this module wrote."""
    return cast(list, value)


def _round_from(state: RecordDict) -> Optional[RoundProgress]:
    record = state.config_records.get(_ROUND)
    if record is None:
        return None
    return RoundProgress(
        round=_int(record["round"]), seed=_int(record["seed"]), sync_steps=_int(record["sync-steps"]),
        attempt=_int(record.get("attempt", 0)), local_steps=_int(record["local-steps"]),
        lr=_float(record["lr"]) if "lr" in record else None,
        batch=str(record.get("batch", "")), pooled=[str(b) for b in _list(record.get("pooled", []))],
        received=_int(record["received"]), replays=_int(record["replays"]),
        sync_seconds=_float(record["sync-seconds"]),
        masked_lengths=[int(n) for n in _list(record.get("masked-lengths", []))],
        log=_log_from(state, _ROUND_LOG, _ROUND_LOG_SCALARS),
    )


def _round_record(progress: RoundProgress) -> ConfigRecord:
    return ConfigRecord({
        "round": progress.round, "seed": progress.seed, "sync-steps": progress.sync_steps, "batch": progress.batch,
        "attempt": progress.attempt,
        "pooled": list(progress.pooled), "received": progress.received, "replays": progress.replays,
        "sync-seconds": float(progress.sync_seconds), "local-steps": progress.local_steps,
        **({"lr": float(progress.lr)} if progress.lr is not None else {}),
        **({"masked-lengths": list(progress.masked_lengths)} if progress.masked_lengths else {}),
    })


def _pass_from(state: RecordDict) -> Optional[PassProgress]:
    record = state.config_records.get(_PASS)
    if record is None:
        return None
    return PassProgress(
        round=_int(record["round"]), seed=_int(record["seed"]), examples=_int(record["examples"]),
        attempt=_int(record.get("attempt", 0)), received=_int(record["received"]), replays=_int(record["replays"]),
        masked_lengths=[int(n) for n in _list(record.get("masked-lengths", []))],
        log=_log_from(state, _PASS_LOG, _PASS_LOG_SCALARS),
    )


def _pass_record(progress: PassProgress) -> ConfigRecord:
    return ConfigRecord({
        "round": progress.round, "seed": progress.seed, "examples": progress.examples, "attempt": progress.attempt,
        "received": progress.received, "replays": progress.replays,
        **({"masked-lengths": list(progress.masked_lengths)} if progress.masked_lengths else {}),
    })


def _key_from(state: RecordDict, key: str, roster: str, shifts: str) -> Optional[SecureKey]:
    record = state.config_records.get(key)
    if record is None:
        return None
    secure = SecureKey(round=_int(record["round"]), private_key=bytes(cast(bytes, record["private-key"])),
                       attempt=_int(record["attempt"]), begun=_int(record.get("begun", -1)),
                       mask_stats=bool(record.get("mask-stats", True)),
                       model_masked=bool(record.get("model-masked", False)))
    if "model-weight-key" in record:
        secure.model_weight_key = str(record["model-weight-key"])
    if roster in state.array_records:
        secure.roster, secure.shifts = codec.secure_from_records(
            state.array_records[roster], state.array_records.get(shifts), "the node's stored roster"
        )
    return secure


def _put_key(state: RecordDict, secure: Optional[SecureKey], key: str, roster: str, shifts: str) -> None:
    record = None if secure is None else ConfigRecord(
        {"round": secure.round, "attempt": secure.attempt, "begun": secure.begun, "private-key": secure.private_key,
         "mask-stats": secure.mask_stats, "model-masked": secure.model_masked}
    )
    if record is not None and secure is not None and secure.model_weight_key is not None:
        record["model-weight-key"] = secure.model_weight_key
    _put(state, key, record)
    if secure is not None and secure.roster is not None:  # the attempt is secure
        _put(state, roster, codec.roster_record(secure.roster))
        _put(state, shifts, codec.shifts_record(secure.shifts))
    else:
        _put(state, roster, None)
        _put(state, shifts, None)
