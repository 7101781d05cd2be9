"""A node's side of FedTAN's exchanges: :func:`handle`, one short handler per phase (those
of secure statistics in :mod:`.secure_stats`).

Flower keeps no Python object alive between two messages of a node: in simulation a
message may be handled by any Ray actor, in deployment every message starts a fresh
process. A round (or statistics pass) in flight is therefore kept two ways:

- in process memory (:func:`flwr_fedtan.runtime.live_rounds`, keyed by run and node): the
  live :class:`~flwr_fedtan.training.ClientRound` or
  :class:`~flwr_fedtan.statistics_pass.StatisticsPass`, paused at a sync point; a message
  that finds it resumes it at once;
- in the node's state (:mod:`.state`), which Flower carries with the node: the seed, the
  aggregates received so far and a reference to the starting weights (:mod:`.weights`). A
  message that lands in a process without the live round rebuilds it by replay
  (:func:`_rebuild`).
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any, Callable, Optional, TypeVar, Union, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord
from flwr.app.typing import MetricRecordValues

from .. import settings
from ..protocol import wire
from ..aggregation import ForwardStats
from ..client import FedTANClient, client_seed_key
from ..runtime import live_rounds
from ..seeds import derive_seed, pass_seed, round_seed
from ..statistics_pass import StatisticsPass
from ..training import ClientRound
from . import secure_stats, state
from .state import PassProgress, ReplayLog, RoundProgress, SecureKey
from .turn import Turn
from ..errors import SecureStatsError, ServerMessageError

__all__ = ["handle"]

Progress = Union[RoundProgress, PassProgress]
P = TypeVar("P", RoundProgress, PassProgress)


class _Live:
    """A round or pass paused in this process's memory."""

    def __init__(self, client: FedTANClient, work: Union[ClientRound, StatisticsPass], server_round: int) -> None:
        self.client = client
        self.work = work
        self.server_round = server_round
        # A paused step can only be resumed on the thread that started it; a message
        # handled on another thread (a threaded Ray actor, say) replays instead.
        self.thread = threading.current_thread()  # the object: thread idents are reused

    def close(self) -> None:
        self.work.close()

    def footprint_key(self) -> tuple:
        """What fixes the size of the paused work (:mod:`flwr_fedtan.runtime.live` measures
        one entry per run and key): its kind, round, sync point and batch size."""
        work = self.work
        if isinstance(work, ClientRound):
            step = getattr(work, "_step", None)
            return ("round", self.server_round, work.step_index, len(work.received),
                    None if step is None else step.num_examples)
        return ("pass", self.server_round, len(work.received), work.num_examples)


def handle(msg: Message, context: Context, client_fn: Callable[[Context], Any], options: Any) -> Message:
    """Serve one ``train.fedtan`` message of a node. The node's state is stored only when
    the message is served (an error leaves it as it was)."""
    control = wire.decode_control(msg.content)
    turn = Turn(msg, context, client_fn, options, control, state.load(context))
    reply = _HANDLERS[control.phase](turn)
    state.store(context, turn.node)
    return reply


# ---------------------------------------------------------------------- begin
def _begin(turn: Turn) -> Message:
    control, context, node = turn.control, turn.context, turn.node
    secure_stats.end_final(node)  # the starting weights it kept are replaced below
    client, seed = _start(turn, RoundProgress, node.round_key, round_seed)
    config = dict(turn.msg.content.config_records.get(wire.CONFIG, ConfigRecord()))
    batch = _batch_digest(client, seed)
    pooled = _pooled_batches(node.round, control.round)
    if control.roster is not None and control.mask_stats and batch in pooled:
        raise SecureStatsError(
            f"node {context.node_id}: round {control.round} restarted (attempt {control.attempt}) on the same "
            "samples this node already pooled in an earlier attempt (its batch is all of its data): the "
            "difference of the two pooled sums would be the dropped clients' statistics; it sits this round out"
        )
    progress = node.round = RoundProgress(
        round=control.round, seed=seed, sync_steps=control.sync_steps, attempt=control.attempt, batch=batch,
        pooled=pooled,
        local_steps=int(cast(int, config.get("local-steps", client.local_steps))),
        lr=float(cast(float, config["lr"])) if "lr" in config else None,
    )
    _save_weights(turn, client)
    round_ = client.new_round(seed, control.sync_steps, config)
    started = time.perf_counter()
    try:
        request = round_.start()
    except BaseException:
        round_.close()
        raise
    progress.sync_seconds += time.perf_counter() - started
    return _after_step(turn, progress, _Live(client, round_, control.round), request)


def _stats_begin(turn: Turn) -> Message:
    control, node = turn.control, turn.node
    secure_stats.end_final(node)  # a statistics pass follows the round's release
    client, seed = _start(turn, PassProgress, node.pass_key, pass_seed)
    progress = node.stats_pass = PassProgress(round=control.round, seed=seed, examples=control.examples,
                                              attempt=control.attempt)
    _save_weights(turn, client)
    live = _Live(client, client.statistics_pass(seed, control.examples), control.round)
    try:
        request = live.work.start()
    except BaseException:
        live.close()
        raise
    return _after_step(turn, progress, live, request)


def _start(turn: Turn, kind: type, key: Optional[SecureKey],
           derive: Callable[[int, int, int], int]) -> tuple[FedTANClient, int]:
    """What a begin of a round (``kind`` :class:`RoundProgress`) or a statistics pass
    (:class:`PassProgress`) starts with: the live one is forgotten, the attempt's roster
    kept or refused, the client built with the message's weights; returns it and the
    node's seed of the attempt."""
    live_rounds().forget(_cache_key(turn, kind))
    secure_stats.begin_secure(turn, key)
    client = turn.client()
    client.load_arrays(turn.msg.content.array_records[wire.ARRAYS])
    previous = turn.node.round if kind is RoundProgress else turn.node.stats_pass
    seed = derive_seed(_attempt_seed(turn, previous, derive), client_seed_key(turn.context))
    return client, seed


def _attempt_seed(turn: Turn, previous: Optional[Progress], derive: Callable[[int, int, int], int]) -> int:
    """The seed of this begin's attempt, derived here from the run seed, the round and the
    attempt. The run seed is pinned by the run's first begin, and rounds and attempts only
    go forward: a server cannot make this node draw a batch (or examples) it already drew
    for another attempt, nor switch seeds mid-run."""
    control, node = turn.control, turn.node
    if node.run_seed is None:
        node.run_seed = control.seed
    elif control.seed != node.run_seed:
        raise ServerMessageError(
            f"{control.phase} of round {control.round} with run seed {control.seed}, but this node's run began "
            f"with run seed {node.run_seed}: the run seed cannot change mid-run"
        )
    if previous is not None and control.round < previous.round:
        raise ServerMessageError(
            f"{control.phase} of round {control.round}, but this node already began round {previous.round}: "
            "a stale round"
        )
    if previous is not None and control.round == previous.round and control.attempt <= previous.attempt:
        raise ServerMessageError(
            f"{control.phase} of round {control.round}, attempt {control.attempt}, but this node already began "
            f"attempt {previous.attempt} of that round: a stale attempt"
        )
    return derive(node.run_seed, control.round, control.attempt)


def _save_weights(turn: Turn, client: FedTANClient) -> None:
    options, context = turn.options, turn.context
    turn.node.save_weights(client.arrays(), settings.replay_store(options.replay_store), context.run_id,
                           context.node_id, directory=options.state_dir)


def _batch_digest(client: FedTANClient, seed: int) -> str:
    """Which samples the round's first synchronised step uses (a digest of their indices)."""
    indices = sorted(client.batch_indices(derive_seed(seed, 0)))
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()


def _pooled_batches(previous: Optional[RoundProgress], round_no: int) -> list[str]:
    """Digests of the batches this node pooled in earlier attempts of the round, i.e. whose
    aggregates it received. With secure statistics a restart on one of them is refused:
    the survivors' sums over the same model and data, subtracted from the earlier ones,
    would be the dropped clients' statistics."""
    if previous is None or previous.round != round_no:
        return []
    pooled = list(previous.pooled)
    if previous.received > 0 and previous.batch and previous.batch not in pooled:
        pooled.append(previous.batch)
    return pooled


# ---------------------------------------------------------------------- aggregates
def _aggregate(turn: Turn) -> Message:
    progress = _current(turn, turn.node.round, f"an aggregate for round {turn.control.round}",
                        "aggregate for point", "aggregates were")
    started = time.perf_counter()
    live, request = _resume(turn, progress)
    progress.sync_seconds += time.perf_counter() - started
    return _after_step(turn, progress, live, request)


def _stats_aggregate(turn: Turn) -> Message:
    progress = _current(turn, turn.node.stats_pass, f"statistics for the pass of round {turn.control.round}",
                        "pooled statistics", "were", of="the pass of round ")
    live, request = _resume(turn, progress)
    return _after_step(turn, progress, live, request)


def _current(turn: Turn, progress: Optional[P], what: str, point: str, received: str, of: str = "round ") -> P:
    """The round or pass in flight that the message's aggregate belongs to."""
    control, node_id = turn.control, turn.context.node_id
    if progress is None or progress.round != control.round:
        raise RuntimeError(
            f"node {node_id} got {what} but holds no state for it "
            f"(state round: {None if progress is None else progress.round})"
        )
    if control.point != progress.received:
        raise RuntimeError(
            f"node {node_id}: {point} {control.point} of {of}{control.round}, but {progress.received} "
            f"{received} received so far"
        )
    _log(turn, progress)  # a finished round or pass takes no more aggregates
    return progress


def _log(turn: Turn, progress: Progress) -> ReplayLog:
    """The aggregates received so far; the log is dropped when the round or pass is done."""
    if progress.log is None:
        raise ServerMessageError(
            f"node {turn.context.node_id}: {turn.control.phase} of round {progress.round}, which this node "
            "has already finished"
        )
    return progress.log


def _resume(turn: Turn, progress: Progress) -> tuple[_Live, Any]:
    """Resume the live round or pass with the message's aggregate, rebuilding it first if
    this process does not hold it; the aggregate joins the replay log."""
    aggregate = turn.control.aggregate
    if aggregate is None:  # decode_control gives every aggregate phase one
        raise ServerMessageError(f"{turn.control.phase} message of round {turn.control.round} without an aggregate")
    cache, key = live_rounds(), _cache_key(turn, type(progress))
    live = cache.get(key)
    if (
        not isinstance(live, _Live)
        or live.server_round != progress.round
        or len(live.work.received) != progress.received
        or live.thread is not threading.current_thread()
    ):
        cache.forget(key)
        live = _rebuild(turn, progress)
    try:
        request = live.work.resume(aggregate)
    except BaseException:
        cache.forget(key)
        live.close()
        raise
    _log(turn, progress).append(progress.received, aggregate)
    progress.received += 1
    return live, request


def _rebuild(turn: Turn, progress: Progress) -> _Live:
    """Rebuild the round or pass in this process from the node's state (deterministic
    replay of its starting weights, seed and aggregates so far)."""
    client = turn.client()
    client.load_arrays(turn.node.load_weights())
    where = f"node {turn.context.node_id}'s replay log of round {progress.round}"
    aggregates = _log(turn, progress).read(progress.received, where)
    work: Union[ClientRound, StatisticsPass]
    if isinstance(progress, RoundProgress):
        config: dict[str, Any] = {"local-steps": progress.local_steps}
        if progress.lr is not None:
            config["lr"] = progress.lr
        work = client.new_round(progress.seed, progress.sync_steps, config)
        try:
            request = work.replay(aggregates)
        except BaseException:
            work.close()
            raise
        unfinished = "replayed round completed before the pending aggregate: state is inconsistent"
    else:
        inputs, _ = client.sample_batch(progress.seed, progress.examples)
        statistics = cast("list[ForwardStats]", aggregates)  # the pass checks each as it replays it
        work, request = StatisticsPass.replay(client.model, inputs, statistics, seed=progress.seed)
        unfinished = "replayed statistics pass completed before the pending statistics: state is inconsistent"
    if request is None:
        work.close()
        raise RuntimeError(unfinished)
    progress.replays += 1
    return _Live(client, work, progress.round)


# ---------------------------------------------------------------------- replies
def _after_step(turn: Turn, progress: Progress, live: _Live, request: Any) -> Message:
    """The reply to a step: the next payload (masked if secure), or ``done``."""
    cache, key = live_rounds(), _cache_key(turn, type(progress))
    if request is None:
        cache.forget(key)
        return _done(turn, progress, live) if isinstance(progress, RoundProgress) else _stats_done(turn, progress, live)
    cache.remember(key, live, capacity=settings.max_live_rounds(turn.options.max_live_rounds),
                   budget=turn.options.live_memory)
    point, payload = request
    step = live.work.step_index if isinstance(live.work, ClientRound) else 0
    secure_key = turn.node.round_key if isinstance(progress, RoundProgress) else turn.node.pass_key
    payload = secure_stats.masked(turn, secure_key, progress, step, point, payload)
    return turn.reply(wire.encode_request(turn.control.round, step, point, payload))


def _done(turn: Turn, progress: RoundProgress, live: _Live) -> Message:
    node, round_ = turn.node, live.work
    assert isinstance(round_, ClientRound)  # a round's progress pairs with a ClientRound
    metrics: dict[str, MetricRecordValues] = dict(round_.finish())
    metrics["sync-seconds"] = float(progress.sync_seconds)
    metrics["replays"] = float(progress.replays)
    metrics["live-bytes"] = float(live_rounds().peak_bytes)  # the home's paused rounds at their peak
    arrays = secure_stats.masked_model(turn, node.round_key, live.client.arrays(), node.load_weights, metrics)
    progress.log = None
    if node.final is None:  # with secure models the model, key and weights are kept until the round ends
        node.discard_weights()
        node.round_key = None
    return turn.reply(wire.encode_done(turn.control.round, arrays, MetricRecord(metrics)))


def _stats_done(turn: Turn, progress: PassProgress, live: _Live) -> Message:
    node, stats_pass = turn.node, live.work
    assert isinstance(stats_pass, StatisticsPass)  # a pass's progress pairs with a StatisticsPass
    progress.log = None
    node.pass_key = None
    node.discard_weights()
    return turn.reply(wire.encode_stats_done(turn.control.round, stats_pass.buffer_calls or {},
                                               stats_pass.num_examples))


def _cache_key(turn: Turn, kind: type) -> tuple:
    base = (turn.context.run_id, turn.context.node_id)
    return base if kind is RoundProgress else (*base, "stats")


_HANDLERS: dict[str, Callable[[Turn], Message]] = {
    wire.PHASE_KEYS: secure_stats.keys,
    wire.PHASE_BLAME: secure_stats.blame,
    wire.PHASE_BEGIN: _begin,
    wire.PHASE_REMASK: secure_stats.remask,
    wire.PHASE_AGGREGATE: _aggregate,
    wire.PHASE_STATS_KEYS: secure_stats.keys,
    wire.PHASE_STATS_BEGIN: _stats_begin,
    wire.PHASE_STATS_AGGREGATE: _stats_aggregate,
}
