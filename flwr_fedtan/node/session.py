"""A node's side of FedTAN's exchanges: :func:`handle`, one short handler per phase.

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
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord
from flwr.app.typing import MetricRecordValues

from .. import secure, settings
from ..protocol import wire as schema
from ..client import FedTANClient, _client_from, client_seed_key
from ..runtime import live_rounds
from ..seeds import derive_seed, pass_seed, round_seed
from ..statistics_pass import StatisticsPass
from ..training import ClientRound
from . import state
from .state import NodeState, PassProgress, RoundProgress, SecureKey
from ..errors import KeyAgreementError, SecureStatsError, ServerMessageError

__all__ = ["handle"]

Progress = Union[RoundProgress, PassProgress]


@dataclass
class _Turn:
    """One message being handled."""

    msg: Message
    context: Context
    client_fn: Callable[[Context], Any]
    options: Any  # flwr_fedtan.clientapp.Options
    control: schema.Control
    node: NodeState

    def client(self) -> FedTANClient:
        return _client_from(self.client_fn, self.context)

    def reply(self, content) -> Message:
        return Message(content, reply_to=self.msg)


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


def handle(msg: Message, context: Context, client_fn: Callable[[Context], Any], options: Any) -> Message:
    """Serve one ``train.fedtan`` message of a node. The node's state is stored only when
    the message is served (an error leaves it as it was)."""
    control = schema.decode_control(msg.content)
    turn = _Turn(msg, context, client_fn, options, control, state.load(context))
    reply = _HANDLERS[control.phase](turn)
    state.store(context, turn.node)
    return reply


# ---------------------------------------------------------------------- keys and blame
def _keys(turn: _Turn) -> Message:
    pair = secure.generate_key_pair()
    turn.node.round_key = SecureKey(round=turn.control.round, private_key=pair.private)
    return turn.reply(schema.encode_public_key(turn.control.round, pair.public))


def _stats_keys(turn: _Turn) -> Message:
    pair = secure.generate_key_pair()
    turn.node.pass_key = SecureKey(round=turn.control.round, private_key=pair.private)
    return turn.reply(schema.encode_public_key(turn.control.round, pair.public))


def _blame(turn: _Turn) -> Message:
    """Secure statistics, after the canaries failed: this node's canary masks of the asked
    exchange, if it is one this node sent in the current attempt, at its true length."""
    control, key, progress = turn.control, turn.node.round_key, turn.node.round
    if (key is None or key.round != control.round or key.roster is None
            or progress is None or progress.round != control.round):
        raise ServerMessageError(f"blame request for round {control.round}, which this node is not in")
    lengths = progress.masked_lengths
    if not 0 <= control.exchange < len(lengths) or lengths[control.exchange] != control.length:
        raise ServerMessageError(
            f"blame request for exchange {control.exchange} with length {control.length}, but this node sent "
            f"payloads of lengths {lengths} this attempt: it reveals only the canary of a payload it sent"
        )
    masks = secure.canary_masks(key.private_key, turn.context.node_id, key.roster, control.round, key.attempt,
                                control.exchange, control.length)
    return turn.reply(schema.encode_canary_masks(control.round, masks))


# ---------------------------------------------------------------------- begin
def _begin(turn: _Turn) -> Message:
    control, context, node = turn.control, turn.context, turn.node
    live_rounds().forget(_cache_key(turn, RoundProgress))
    _begin_secure(turn, node.round_key)
    client = turn.client()
    client.load_arrays(turn.msg.content.array_records[schema.ARRAYS])
    config = dict(turn.msg.content.config_records.get(schema.CONFIG, ConfigRecord()))
    seed = derive_seed(_attempt_seed(turn, node.round, round_seed), client_seed_key(context))
    batch = _batch_digest(client, seed)
    pooled = _pooled_batches(node.round, control.round)
    if control.roster is not None and batch in pooled:
        raise SecureStatsError(
            f"node {context.node_id}: round {control.round} restarted (attempt {control.attempt}) on the same "
            "samples this node already pooled in an earlier attempt (its batch is all of its data): the "
            "difference of the two pooled sums would be the dropped clients' statistics; it sits this round out"
        )
    node.round = RoundProgress(
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
    node.round.sync_seconds += time.perf_counter() - started
    return _after_step(turn, node.round, _Live(client, round_, control.round), request)


def _stats_begin(turn: _Turn) -> Message:
    control, context, node = turn.control, turn.context, turn.node
    live_rounds().forget(_cache_key(turn, PassProgress))
    _begin_secure(turn, node.pass_key)
    client = turn.client()
    client.load_arrays(turn.msg.content.array_records[schema.ARRAYS])
    seed = derive_seed(_attempt_seed(turn, node.stats_pass, pass_seed), client_seed_key(context))
    node.stats_pass = PassProgress(round=control.round, seed=seed, examples=control.examples,
                                   attempt=control.attempt)
    _save_weights(turn, client)
    live = _Live(client, client.statistics_pass(seed, control.examples), control.round)
    try:
        request = live.work.start()
    except BaseException:
        live.close()
        raise
    return _after_step(turn, node.stats_pass, live, request)


def _attempt_seed(turn: _Turn, previous: Optional[Progress], derive: Callable[[int, int, int], int]) -> int:
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


def _save_weights(turn: _Turn, client: FedTANClient) -> None:
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


def _begin_secure(turn: _Turn, key: Optional[SecureKey]) -> None:
    """Keep (or clear) the attempt's roster and shifts.

    Refuses what a malicious server could use to unmask this node's statistics: a begin
    in the clear after the round's key exchange (or at all, with ``require_secure_stats``),
    and a begin whose attempt is not above the last one begun with the same key (the same
    pair keys and exchange numbers would mask other data with the same masks)."""
    control = turn.control
    if key is not None:
        key.roster = key.shifts = None
    keyed = key is not None and key.round == control.round
    if control.roster is None:
        if turn.options.require_secure_stats:
            raise ServerMessageError(
                f"begin of round {control.round} without a roster: this node requires secure statistics "
                "(require_secure_stats=True) and never sends its statistics in the clear"
            )
        if keyed:
            raise ServerMessageError(
                f"begin of round {control.round} without a roster after this round's key exchange: the "
                "statistics would go out in the clear"
            )
        return
    if key is None or not keyed:
        raise KeyAgreementError(
            f"node {turn.context.node_id}: begin of round {control.round} with secure statistics, but this "
            "node holds no private key for that round (it missed the key exchange)"
        )
    if control.attempt <= key.begun:
        raise ServerMessageError(
            f"begin of round {control.round}, attempt {control.attempt}: this node already began attempt "
            f"{key.begun} with this key; a repeated or earlier attempt would reuse its masks"
        )
    key.attempt = key.begun = control.attempt
    key.roster, key.shifts = control.roster, dict(control.shifts or {})


# ---------------------------------------------------------------------- aggregates
def _aggregate(turn: _Turn) -> Message:
    progress = turn.node.round
    _check_progress(turn, progress, f"an aggregate for round {turn.control.round}", "aggregate for point",
                    "aggregates were")
    started = time.perf_counter()
    live, request = _resume(turn, progress)  # type: ignore[arg-type]
    progress.sync_seconds += time.perf_counter() - started  # type: ignore[union-attr]
    return _after_step(turn, progress, live, request)  # type: ignore[arg-type]


def _stats_aggregate(turn: _Turn) -> Message:
    progress = turn.node.stats_pass
    _check_progress(turn, progress, f"statistics for the pass of round {turn.control.round}", "pooled statistics",
                    "were", of="the pass of round ")
    live, request = _resume(turn, progress)  # type: ignore[arg-type]
    return _after_step(turn, progress, live, request)  # type: ignore[arg-type]


def _check_progress(turn: _Turn, progress: Optional[Progress], what: str, point: str, received: str,
                    of: str = "round ") -> None:
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


def _resume(turn: _Turn, progress: Progress) -> tuple[_Live, Any]:
    """Resume the live round or pass with the message's aggregate, rebuilding it first if
    this process does not hold it; the aggregate joins the replay log."""
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
        request = live.work.resume(turn.control.aggregate)  # type: ignore[arg-type]
    except BaseException:
        cache.forget(key)
        live.close()
        raise
    progress.log.append(progress.received, turn.control.aggregate)  # type: ignore[union-attr,arg-type]
    progress.received += 1
    return live, request


def _rebuild(turn: _Turn, progress: Progress) -> _Live:
    """Rebuild the round or pass in this process from the node's state (deterministic
    replay of its starting weights, seed and aggregates so far)."""
    client = turn.client()
    client.load_arrays(turn.node.load_weights())
    where = f"node {turn.context.node_id}'s replay log of round {progress.round}"
    aggregates = progress.log.read(progress.received, where)  # type: ignore[union-attr]
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
        work, request = StatisticsPass.replay(client.model, inputs, aggregates, seed=progress.seed)  # type: ignore[arg-type]
        unfinished = "replayed statistics pass completed before the pending statistics: state is inconsistent"
    if request is None:
        work.close()
        raise RuntimeError(unfinished)
    progress.replays += 1
    return _Live(client, work, progress.round)


# ---------------------------------------------------------------------- replies
def _after_step(turn: _Turn, progress: Progress, live: _Live, request: Any) -> Message:
    """The reply to a step: the next payload (masked if secure), or ``done``."""
    cache, key = live_rounds(), _cache_key(turn, type(progress))
    if request is None:
        cache.forget(key)
        return _done(turn, live) if isinstance(progress, RoundProgress) else _stats_done(turn, live)
    cache.remember(key, live, capacity=settings.max_live_rounds(turn.options.max_live_rounds))
    point, payload = request
    round_no = turn.control.round
    step = live.work.step_index if isinstance(live.work, ClientRound) else 0
    secure_key = turn.node.round_key if isinstance(progress, RoundProgress) else turn.node.pass_key
    if secure_key is not None and secure_key.roster is not None:
        payload = _masked(turn, secure_key, progress, step, point, payload)
    return turn.reply(schema.encode_request(round_no, step, point, payload))


def _done(turn: _Turn, live: _Live) -> Message:
    node = turn.node
    metrics: dict[str, MetricRecordValues] = dict(live.work.finish())  # type: ignore[union-attr]
    metrics["sync-seconds"] = float(node.round.sync_seconds)  # type: ignore[union-attr]
    metrics["replays"] = float(node.round.replays)  # type: ignore[union-attr]
    node.round.log = None  # type: ignore[union-attr]
    node.discard_weights()
    node.round_key = None
    return turn.reply(schema.encode_done(turn.control.round, live.client.arrays(), MetricRecord(metrics)))


def _stats_done(turn: _Turn, live: _Live) -> Message:
    node = turn.node
    stats_pass: StatisticsPass = live.work  # type: ignore[assignment]
    node.stats_pass.log = None  # type: ignore[union-attr]
    node.pass_key = None
    node.discard_weights()
    return turn.reply(schema.encode_stats_done(turn.control.round, stats_pass.buffer_calls or {},
                                               stats_pass.num_examples))


def _masked(turn: _Turn, key: SecureKey, progress: Progress, step: int, point, payload) -> secure.MaskedPayload:
    """Secure statistics: the payload masked for this exchange (the number of aggregates
    received so far in the attempt)."""
    round_no = turn.control.round
    if key.round != round_no:
        raise KeyAgreementError(
            f"node {turn.context.node_id}: no private key for round {round_no} (it missed the key exchange)"
        )
    exchange = progress.received
    masked = secure.client_encode(
        payload,
        node_id=turn.context.node_id,
        private_key=key.private_key,
        roster=key.roster,  # type: ignore[arg-type]
        round=round_no,
        attempt=key.attempt,
        exchange=exchange,
        shift=secure.shift_for(key.shifts or {}, point.index, point.channels)
        if point.phase == schema.PHASE_FORWARD else None,
        where=secure.describe_point(round_no, step, point.phase, point.index, point.call),
    )
    # The length of each exchange's payload: a blame request may reveal only that canary's masks.
    progress.masked_lengths = progress.masked_lengths[:exchange] + [int(masked.masked.shape[1])]
    return masked


def _cache_key(turn: _Turn, kind: type) -> tuple:
    base = (turn.context.run_id, turn.context.node_id)
    return base if kind is RoundProgress else (*base, "stats")


_HANDLERS: dict[str, Callable[[_Turn], Message]] = {
    schema.PHASE_KEYS: _keys,
    schema.PHASE_BLAME: _blame,
    schema.PHASE_BEGIN: _begin,
    schema.PHASE_AGGREGATE: _aggregate,
    schema.PHASE_STATS_KEYS: _stats_keys,
    schema.PHASE_STATS_BEGIN: _stats_begin,
    schema.PHASE_STATS_AGGREGATE: _stats_aggregate,
}
