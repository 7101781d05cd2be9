"""The statistics pass on the server: exact BatchNorm statistics for any strategy's model.

No torch here. After a round's aggregation the server sends the new global model to the
round's clients and drives a forward-only synchronised pass over it (``L + 1`` exchanges:
one per BatchNorm call, and one that hands out the last pooled statistics and collects
which buffer each call fed; see :mod:`flwr_fedtan.statistics_pass` for the client's side): every
call pooled over all clients, layer by layer. The global ``running_mean``/``running_var``
then become the pooled means and unbiased pooled variances
(:func:`~flwr_fedtan.aggregation.exact_running_statistics`): precise-BN on the union of the
clients' examples, computed by the server from the pools alone, never from a client's
word about its buffers.

- :class:`StatisticsPassDriver`: runs one pass on a Grid (drops, restarts, secure
  statistics); used by :class:`~flwr_fedtan.FedTAN` (``statistics="exact"``).
- :class:`ExactStatistics`: the same for any other Flower strategy (``FedAvg``, ``FedAdam``,
  a DP wrapper...): training stays the wrapped strategy's, unmodified; the clients answer
  the pass through :func:`~flwr_fedtan.add_fedtan`'s handler.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Callable, Iterable, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from . import schema, secure
from .arguments import ArgumentChecks
from .aggregation import (
    DEFAULT_MAX_GROWTH,
    ForwardStats,
    PayloadError,
    check_magnitudes,
    exact_running_statistics,
    forward_count_violations,
    pool_forward_stats,
    value_limit,
)
from .progress import DEFAULT_PROGRESS_INTERVAL, ExchangeProgress, ExchangeTiming, describe_bytes
from .exchange import exchange
from .seeds import pass_seed

__all__ = [
    "STATISTICS_MODES",
    "DEFAULT_STATISTICS_EXAMPLES",
    "ExactStatistics",
    "PassOutcome",
    "StatisticsPassDriver",
    "pass_due",
    "pass_seed",
]

STATISTICS_MODES = ("exact", "running")
"""``"exact"``: the statistics pass; ``"running"``: the running averages the clients
collected during the round, aggregated (FedTAN's behaviour before the pass existed)."""

DEFAULT_STATISTICS_EXAMPLES = 256
"""Examples each client forwards in a pass (all of its data if it has fewer); see the
README's measurement for why."""

_NONE = np.zeros(0)


def pass_due(server_round: int, every: int, num_rounds: Optional[int]) -> bool:
    """Whether the pass runs after ``server_round``: every ``every`` rounds, and always
    after the last round (``num_rounds``)."""
    return server_round % every == 0 or (num_rounds is not None and server_round >= num_rounds)


def check_statistics_options(statistics: str, examples: int, every: int,
                             checks: Optional[ArgumentChecks] = None) -> None:
    """Refuse invalid statistics options with the fix (all of them in one error); with
    ``checks``, add the problems to it instead of raising."""
    own = checks is None
    checks = ArgumentChecks("statistics options") if checks is None else checks
    checks.choice("statistics", statistics, STATISTICS_MODES,
                  fix="'exact' (the statistics pass after aggregation) or 'running' (averaged running statistics)")
    checks.integer("statistics_examples", examples, 1, fix="give the training examples per client of the pass, >= 1")
    checks.integer("statistics_every", every, 1, fix="give a whole number >= 1 (1: a pass after every round)")
    if own:
        checks.raise_if_any()


@dataclass
class PassOutcome:
    """What one statistics pass did and cost."""

    buffers: Optional[dict[str, np.ndarray]] = None  # None: the aggregated statistics stay
    exchanges: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    restarts: int = 0
    clients: int = 0
    examples: int = 0  # pooled examples of the pass that was applied
    dropped: dict[int, str] = field(default_factory=dict)
    progress: ExchangeProgress = field(default_factory=lambda: ExchangeProgress("Statistics pass"))
    last_exchange: Optional[ExchangeTiming] = None

    def metrics(self, prefix: str = "fedtan-stats-") -> dict:
        """The outcome as train metrics (``fedtan-stats-*``)."""
        return {
            **self.progress.metrics(prefix),
            f"{prefix}applied": int(self.buffers is not None),
            f"{prefix}clients": self.clients,
            f"{prefix}examples": self.examples,
            f"{prefix}exchanges": self.exchanges,
            f"{prefix}bytes-sent": self.bytes_sent,
            f"{prefix}bytes-received": self.bytes_received,
            f"{prefix}seconds": self.seconds,
            f"{prefix}restarts": self.restarts,
            f"{prefix}dropped": len(self.dropped),
        }


class _Restart(Exception):
    """Clients failed during the pass: restart it without them."""


class StatisticsPassDriver:
    """Runs statistics passes on a Grid (server side, no torch, no strategy logic).

    Parameters
    ----------
    examples : int
        At most this many training examples per client (all of them if it has fewer).
    exchange_timeout : float
        Seconds to wait for the replies of one exchange; a client that misses it is dropped.
    poll_interval : float
        Seconds between two pulls of replies.
    max_restarts : int
        Restarts of a pass without the clients that failed in it; after that, or with too few
        clients left, the aggregated statistics stay (logged).
    seed : int
        Seeds which examples each client forwards (with the round and attempt).
    secure_stats : bool
        Mask every client payload (:mod:`flwr_fedtan.secure`): a fresh key exchange per pass
        (one more exchange); the server learns only the pooled statistics, which the global
        model's buffers reveal anyway. A pass that fails after releasing pooled statistics is
        not restarted (the survivors' pool would, with the first, give away the dropped
        clients' statistics): the aggregated statistics stay.
    uniform_positions : bool
        As in :class:`~flwr_fedtan.FedTAN`: every client's values per example must agree.
    min_clients : int
        Fewest clients a pass may pool (2 at least with ``secure_stats``).
    max_growth : float
        As in :class:`~flwr_fedtan.FedTAN`: one client's statistics may not exceed this many
        times the other clients' largest (it is named and dropped), and no pooled statistic
        may leave the model dtype's range.
    progress_interval : float or None
        As in :class:`~flwr_fedtan.FedTAN`: at most one per-exchange line every this many
        seconds besides the pass's first and last exchange (``None``: none); one summary line
        per pass in any case.
    """

    def __init__(
        self,
        *,
        examples: int = DEFAULT_STATISTICS_EXAMPLES,
        exchange_timeout: float = 120.0,
        poll_interval: float = 0.02,
        max_restarts: int = 2,
        seed: int = 0,
        secure_stats: bool = False,
        uniform_positions: bool = True,
        min_clients: int = 1,
        max_growth: float = DEFAULT_MAX_GROWTH,
        progress_interval: Optional[float] = DEFAULT_PROGRESS_INTERVAL,
    ) -> None:
        self.examples = int(examples)
        self.progress_interval = progress_interval
        self.max_growth = float(max_growth)
        self.exchange_timeout = exchange_timeout
        self.poll_interval = poll_interval
        self.max_restarts = max_restarts
        self.seed = seed
        self.uniform_positions = uniform_positions
        self.min_clients = max(2, min_clients) if secure_stats else max(1, min_clients)
        self._secure = secure.ServerSession() if secure_stats else None

    def run(self, grid: Grid, nodes: Iterable[int], arrays: ArrayRecord, server_round: int) -> PassOutcome:
        """Run the pass of ``server_round`` over ``arrays`` (the aggregated global model) on
        ``nodes``; the outcome's ``buffers`` are the new running statistics, or ``None``
        when the pass failed (the reason is logged)."""
        outcome = PassOutcome(progress=ExchangeProgress(f"Statistics pass of round {server_round}",
                                                        self.progress_interval))
        started = time.perf_counter()
        reference = {k: v.numpy() for k, v in arrays.items()}
        participants = sorted(set(int(n) for n in nodes))
        try:
            for attempt in range(self.max_restarts + 1):
                participants = [n for n in participants if n not in outcome.dropped]
                if len(participants) < self.min_clients:
                    break
                outcome.restarts += attempt > 0
                released: list[ForwardStats] = []
                try:
                    buffer_calls, examples = self._attempt(
                        grid, outcome, participants, arrays, server_round, attempt, released
                    )
                except _Restart:
                    if self._secure is not None and released:
                        log(WARNING, "Statistics pass of round %d: not restarted after releasing pooled "
                            "statistics (secure statistics: a survivors' pool would reveal the dropped "
                            "clients' statistics)", server_round)
                        break
                    continue
                except Exception as error:  # pylint: disable=broad-except -- the pass never ends the run
                    log(WARNING, "Statistics pass of round %d stopped by %s: %s", server_round,
                        type(error).__name__, error)
                    break
                try:
                    buffers = exact_running_statistics(released, buffer_calls, reference)
                    # No more than a client may move them in a round (statistics masked, or within
                    # max_growth of the other clients', can still be absurd): the same bound.
                    check_magnitudes("statistics pass", buffers, {k: reference[k] for k in buffers}, self.max_growth)
                except (ValueError, PayloadError) as error:
                    log(WARNING, "Statistics pass of round %d: %s", server_round, error)
                    break
                outcome.buffers = buffers
                outcome.clients = len(examples)
                outcome.examples = sum(examples.values())
                return outcome
            reasons = "; ".join(f"node {n}: {why}" for n, why in outcome.dropped.items()) or "too few clients"
            log(WARNING, "Statistics pass of round %d failed (%s): the global model keeps its aggregated "
                "BatchNorm statistics", server_round, reasons)
            return outcome
        finally:
            outcome.seconds = time.perf_counter() - started
            log(INFO, "Statistics pass of round %d: %s, %d exchanges in %.1f s; %s; %s sent, %s received; "
                "%d restarts; %d dropped", server_round, "applied" if outcome.buffers is not None else "not applied",
                outcome.exchanges, outcome.seconds, outcome.progress.describe(),
                describe_bytes(outcome.bytes_sent), describe_bytes(outcome.bytes_received), outcome.restarts,
                len(outcome.dropped))

    # ------------------------------------------------------------------ one attempt
    def _attempt(
        self,
        grid: Grid,
        outcome: PassOutcome,
        participants: list[int],
        arrays: ArrayRecord,
        server_round: int,
        attempt: int,
        released: list[ForwardStats],
    ) -> tuple[dict, dict[int, int]]:
        """One attempt; the pooled statistics go into ``released`` as they are sent out.
        Returns the agreed buffer mapping and each client's examples."""
        seed = self.seed  # the run's: each client derives the pass's seed (flwr_fedtan.seeds.pass_seed)
        roster = None
        if self._secure is not None:
            participants = self._key_exchange(grid, outcome, participants, server_round)
            if len(participants) < self.min_clients:
                raise _Restart()
            roster = self._secure.roster(participants)
        begin = schema.encode_stats_begin(
            arrays, server_round, seed, self.examples, attempt,
            roster, None if self._secure is None else self._secure.shifts,
        )
        statuses = self._exchange(grid, outcome, {n: begin for n in participants}, server_round)
        self._note_progress(outcome, statuses, 1, attempt)
        limit = value_limit({k: v.numpy() for k, v in arrays.items()})
        examples: dict[int, int] = {}
        while True:
            phases = {s.phase for s in statuses.values()}
            if phases == {schema.PHASE_STATS_DONE}:
                examples = examples or {n: s.num_examples for n, s in statuses.items()}
                return self._agreed_buffers(outcome, statuses, examples), examples
            index = len(released)
            for node, status in statuses.items():
                if status.phase != schema.PHASE_FORWARD or status.point is None or status.point.index != index:
                    where = status.phase if status.point is None else f"{status.phase} point {status.point.index}"
                    self._drop(outcome, node, f"replied {where} to the statistics pass's BatchNorm call {index}")
            channels = Counter(s.point.channels for s in statuses.values() if s.point is not None)
            expected = channels.most_common(1)[0][0] if channels else None
            for node, status in statuses.items():
                if status.point is not None and status.point.channels != expected:
                    self._drop(outcome, node, f"{status.point.channels} channels at BatchNorm call {index}, "
                               f"the others {expected}")
            if outcome.dropped.keys() & statuses.keys():
                raise _Restart()
            payloads = {n: s.payload for n, s in statuses.items()}
            for node, payload in payloads.items():
                if (roster is not None) != isinstance(payload, secure.MaskedPayload):
                    self._drop(outcome, node, f"sent {'clear' if roster is not None else 'masked'} statistics "
                                              f"in a {'secure' if roster is not None else 'clear'} statistics pass")
            if outcome.dropped.keys() & statuses.keys():
                raise _Restart()
            claims = payloads if roster is None else {
                n: ForwardStats(count=p.count, num_examples=p.num_examples, mean=_NONE, var=_NONE)  # type: ignore
                for n, p in payloads.items()
            }
            violations = forward_count_violations(claims, examples, self.uniform_positions)
            for node, why in violations.items():
                self._drop(outcome, node, f"statistics pass: {why}")
            if violations:
                raise _Restart()
            try:
                if roster is not None:
                    where = f"statistics pass of round {server_round}, BatchNorm call {index}"
                    aggregate = self._secure.decode(payloads, roster, index, where)  # type: ignore
                else:
                    aggregate = pool_forward_stats(payloads, expected, limit, self.max_growth)  # type: ignore[arg-type]
                values = (np.asarray(aggregate.mean), np.asarray(aggregate.var))
                if not all(np.isfinite(v).all() and (np.abs(v) <= limit).all() for v in values):
                    raise secure.SecureStatsError(f"BatchNorm call {index}: pooled statistics out of the model's range")
            except PayloadError as error:
                self._drop(outcome, error.client, f"statistics pass, BatchNorm call {index}: {error}")
                raise _Restart() from None
            except secure.SecureStatsError as error:
                log(WARNING, "Statistics pass of round %d, BatchNorm call %d: %s", server_round, index, error)
                raise _Restart() from None
            for node, claim in claims.items():
                examples.setdefault(node, int(claim.num_examples))  # type: ignore[union-attr]
            released.append(aggregate)  # type: ignore[arg-type]
            content = schema.encode_stats_aggregate(server_round, index, aggregate, seed)  # type: ignore[arg-type]
            statuses = self._exchange(grid, outcome, {n: content for n in statuses}, server_round)
            self._note_progress(outcome, statuses, len(released) + 1, attempt)

    @staticmethod
    def _note_progress(outcome: PassOutcome, statuses: dict[int, schema.Status], index: int, attempt: int) -> None:
        """The progress line of the attempt's exchange ``index`` (from 1): ``L + 1`` in all,
        known only when the clients report done."""
        timing = outcome.last_exchange
        if timing is None or not statuses:
            return
        (phase, point), _ = Counter((s.phase, s.point) for s in statuses.values()).most_common(1)[0]
        final = phase == schema.PHASE_STATS_DONE
        if final:
            number, what = f"{index}/{index}", "BatchNorm buffers"
        else:
            number, what = f"{index}", phase if point is None else f"forward, BatchNorm call {point.call}"
        if attempt:
            what += f", attempt {attempt + 1}"
        outcome.progress.record(timing, f"{number} ({what})", force=index == 1 or final)

    def _agreed_buffers(self, outcome: PassOutcome, statuses: dict[int, schema.Status], examples: dict) -> dict:
        """The buffer mapping most clients report (it is the model's, the same for all);
        a client reporting another, or examples other than it forwarded, is dropped."""
        def canonical(calls: dict) -> tuple:
            return tuple(sorted((k, kind, tuple(c)) for k, (kind, c) in calls.items()))

        tally = Counter(canonical(s.buffer_calls or {}) for s in statuses.values())
        agreed, _ = tally.most_common(1)[0]
        for node, status in statuses.items():
            if canonical(status.buffer_calls or {}) != agreed:
                self._drop(outcome, node, "reported another BatchNorm buffer mapping than the other clients")
            elif status.num_examples != examples.get(node):
                self._drop(outcome, node, f"reported {status.num_examples} examples but forwarded "
                           f"{examples.get(node)}")
        if outcome.dropped.keys() & statuses.keys():
            raise _Restart()
        return {key: (kind, list(calls)) for key, kind, calls in agreed}

    def _key_exchange(self, grid: Grid, outcome: PassOutcome, participants: list[int], server_round: int) -> list[int]:
        session = self._secure
        assert session is not None
        session.new_round(server_round)
        statuses = self._exchange(grid, outcome, {n: schema.encode_stats_keys(server_round) for n in participants},
                                  server_round, restart=False)
        for node, status in statuses.items():
            try:
                if status.phase != schema.PHASE_KEYS:
                    raise PayloadError(node, f"replied {status.phase!r} to the key exchange")
                session.accept_public_key(node, status.public_key)
            except PayloadError as error:
                self._drop(outcome, node, str(error))
        return [n for n in participants if n in session.public_keys]

    # ------------------------------------------------------------------ plumbing
    def _drop(self, outcome: PassOutcome, node: int, reason: str) -> None:
        if node in outcome.dropped:
            return
        outcome.dropped[node] = reason
        log(WARNING, "Statistics pass: dropping node %s: %s", node, reason)

    def _exchange(
        self, grid: Grid, outcome: PassOutcome, contents: dict[int, RecordDict], server_round: int,
        restart: bool = True,
    ) -> dict[int, schema.Status]:
        """One message to each node, valid replies back in node order; failing nodes are
        dropped (and the attempt restarted unless ``restart`` is false)."""
        outcome.exchanges += 1
        result = exchange(grid, contents, server_round=server_round, timeout=self.exchange_timeout,
                          poll_interval=self.poll_interval)
        outcome.bytes_sent += result.bytes_sent
        outcome.bytes_received += result.bytes_received
        outcome.last_exchange = result.timing
        for node, reason in result.failures.items():
            self._drop(outcome, node, reason)
        if restart and len(result.statuses) != len(contents):
            raise _Restart()
        return result.statuses


class ExactStatistics(Strategy):
    """Any Flower strategy, with the statistics pass after its aggregation.

    Training, sampling and aggregation stay the wrapped strategy's, unmodified; after each
    round's ``aggregate_train`` (every ``statistics_every`` rounds and always in the last
    round) the round's clients run the pass over the new global model, and its
    ``running_mean``/``running_var`` are replaced by the exact statistics of their pooled
    examples, before evaluation (Flower's ``evaluate_fn`` and federated evaluation both see
    them). The clients must serve FedTAN's messages: register :func:`~flwr_fedtan.add_fedtan`
    on the ``ClientApp`` (its ``@app.train()`` stays the wrapped strategy's). For FedTAN
    itself use ``FedTAN(statistics="exact")``.

    Parameters
    ----------
    strategy : Strategy
        E.g. ``FedAvg(...)``, ``FedAdam(...)``, a DP wrapper.
    statistics_examples : int (default: 256)
        Examples each client forwards (all of its data if it has fewer).
    statistics_every : int (default: 1)
        Run the pass every this many rounds (and always after the last).
    exchange_timeout, poll_interval, max_restarts, seed, secure_stats, uniform_positions
        As in :class:`StatisticsPassDriver`.

    Per-round costs are added to the round's train metrics (``fedtan-stats-*``).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        statistics_examples: int = DEFAULT_STATISTICS_EXAMPLES,
        statistics_every: int = 1,
        exchange_timeout: float = 120.0,
        poll_interval: float = 0.02,
        max_restarts: int = 2,
        seed: int = 0,
        secure_stats: bool = False,
        uniform_positions: bool = True,
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a flwr.serverapp.strategy.Strategy, got {type(strategy).__name__}")
        if type(strategy).__name__ == "FedTAN":
            raise ValueError("FedTAN runs the statistics pass itself: use FedTAN(statistics='exact')")
        check_statistics_options("exact", statistics_examples, statistics_every)
        self.strategy = strategy
        self.statistics_every = int(statistics_every)
        self.driver = StatisticsPassDriver(
            examples=statistics_examples, exchange_timeout=exchange_timeout, poll_interval=poll_interval,
            max_restarts=max_restarts, seed=seed, secure_stats=secure_stats, uniform_positions=uniform_positions,
        )
        self.outcomes: dict[int, PassOutcome] = {}
        self._grid: Optional[Grid] = None
        self._num_rounds: Optional[int] = None

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: Optional[ConfigRecord] = None, evaluate_config: Optional[ConfigRecord] = None,
              evaluate_fn: Optional[Callable[[int, ArrayRecord], Optional[MetricRecord]]] = None) -> Result:
        """Flower's round loop (``Strategy.start``); remembers ``num_rounds`` for the last pass."""
        self._num_rounds = num_rounds
        return super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn)

    def summary(self) -> None:
        """Log the pass's settings, then the wrapped strategy's."""
        log(INFO, "\t├──> Exact BatchNorm statistics (every %d rounds, %d examples per client) around %s",
            self.statistics_every, self.driver.examples, type(self.strategy).__name__)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's (the Grid is kept for the pass)."""
        self._grid = grid
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """The wrapped strategy's aggregation, then the pass over its result."""
        replies = list(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None or self._grid is None or not pass_due(server_round, self.statistics_every,
                                                                 self._num_rounds):
            return arrays, metrics
        nodes = [r.metadata.src_node_id for r in replies if not r.has_error()]
        outcome = self.driver.run(self._grid, nodes, arrays, server_round)
        self.outcomes[server_round] = outcome
        metrics = MetricRecord() if metrics is None else metrics
        metrics.update(outcome.metrics())
        return apply_buffers(arrays, outcome.buffers), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        """The wrapped strategy's."""
        return self.strategy.aggregate_evaluate(server_round, replies)


def apply_buffers(arrays: ArrayRecord, buffers: Optional[dict[str, np.ndarray]]) -> ArrayRecord:
    """``arrays`` with the pass's buffers in place (unchanged if ``buffers`` is ``None``)."""
    if not buffers:
        return arrays
    return ArrayRecord({k: (Array(np.ascontiguousarray(buffers[k])) if k in buffers else v) for k, v in arrays.items()})

