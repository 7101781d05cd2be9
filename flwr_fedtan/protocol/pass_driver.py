"""The statistics pass on the server: its driver, options and outcome. No torch, no strategy.

After a round's aggregation the server sends the new global model to the round's clients
and drives a forward-only synchronised pass over it (``L + 1`` exchanges: one per BatchNorm
call, and one that hands out the last pooled statistics and collects which buffer each call
fed; see :mod:`flwr_fedtan.statistics_pass` for the client's side): every call pooled over
all clients, layer by layer. The global ``running_mean``/``running_var`` then become the
pooled means and unbiased pooled variances
(:func:`~flwr_fedtan.aggregation.exact_running_statistics`): precise-BN on the union of the
clients' examples, computed by the server from the pools alone, never from a client's word
about its buffers.

A module of its own beside :mod:`.driver` (the round's exchanges) rather than inside it:
the two drivers share only the exchanges under them (:mod:`.exchange`), and together they
would be twice the length a reader can hold.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Iterable, Optional, cast

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from .. import secure
from . import wire
from ..aggregation import (
    DEFAULT_MAX_GROWTH,
    ForwardStats,
    check_magnitudes,
    exact_running_statistics,
    forward_count_violations,
    pool_forward_stats,
    value_limit,
)
from ..errors import PayloadError, SecureStatsError
from ..progress import DEFAULT_PROGRESS_INTERVAL, ExchangeProgress, describe_bytes
from ..seeds import pass_seed
from .exchange import (
    ExchangeLedger,
    Exchanges,
    Restart,
    accept_keys,
    count_claims,
    payload_kind_mismatches,
    within_limit,
)

__all__ = ["DEFAULT_STATISTICS_EXAMPLES", "PassOptions", "PassOutcome", "StatisticsPassDriver", "pass_seed"]

DEFAULT_STATISTICS_EXAMPLES = 256
"""Examples each client forwards in a pass (all of its data if it has fewer); why, measured:
docs/protocol.md, "Exact BatchNorm statistics: the statistics pass" ("Why these defaults")."""



@dataclass
class PassOptions:
    """The options of the statistics pass, with their defaults. The driver reads them at
    each pass, so a change between passes reaches the next one.

    Attributes
    ----------
    examples : int (default: 256)
        At most this many training examples per client (all of them if it has fewer).
    exchange_timeout : float (default: 120.0)
        Seconds to wait for the replies of one exchange; a client that misses it is dropped.
    poll_interval : float (default: 0.02)
        Seconds between two pulls of replies.
    max_restarts : int (default: 2)
        Restarts of a pass without the clients that failed in it; after that, or with too few
        clients left, the aggregated statistics stay (logged).
    seed : int (default: 0)
        Seeds which examples each client forwards (with the round and attempt).
    secure_stats : bool (default: False)
        Mask every client payload (:mod:`flwr_fedtan.secure`): a fresh key exchange per pass
        (one more exchange); the server learns only the pooled statistics, which the global
        model's buffers reveal anyway. A pass that fails after releasing pooled statistics is
        not restarted (the survivors' pool would, with the first, give away the dropped
        clients' statistics): the aggregated statistics stay.
    uniform_positions : bool (default: True)
        As in :class:`~flwr_fedtan.FedTAN`: every client's values per example must agree.
    min_clients : int (default: 1)
        Fewest clients a pass may pool (2 at least with ``secure_stats``).
    max_growth : float (default: 1e6)
        As in :class:`~flwr_fedtan.FedTAN`: one client's statistics may not exceed this many
        times the other clients' largest (it is named and dropped), and no pooled statistic
        may leave the model dtype's range.
    progress_interval : float or None (default: 30.0)
        As in :class:`~flwr_fedtan.FedTAN`: at most one per-exchange line every this many
        seconds besides the pass's first and last exchange (``None``: none); one summary line
        per pass in any case.
    """

    examples: int = DEFAULT_STATISTICS_EXAMPLES
    exchange_timeout: float = 120.0
    poll_interval: float = 0.02
    max_restarts: int = 2
    seed: int = 0
    secure_stats: bool = False
    uniform_positions: bool = True
    min_clients: int = 1
    max_growth: float = DEFAULT_MAX_GROWTH
    progress_interval: Optional[float] = DEFAULT_PROGRESS_INTERVAL


@dataclass
class PassOutcome(ExchangeLedger):
    """What one statistics pass did and cost."""

    title: str = "Statistics pass"
    progress: ExchangeProgress = field(default_factory=lambda: ExchangeProgress("Statistics pass"))
    buffers: Optional[dict[str, np.ndarray]] = None  # None: the aggregated statistics stay
    seconds: float = 0.0
    clients: int = 0
    examples: int = 0  # pooled examples of the pass that was applied

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


class StatisticsPassDriver:
    """Runs statistics passes on a Grid (server side, no torch, no strategy logic).

    ``options`` (:class:`PassOptions`), with any of its fields changed by keyword.
    """

    def __init__(self, options: Optional[PassOptions] = None, **changes: Any) -> None:
        options = options or PassOptions()
        self.options = dataclasses.replace(options, **changes) if changes else options
        self._session: Optional[secure.ServerSession] = None

    @property
    def examples(self) -> int:
        """At most this many examples per client."""
        return int(self.options.examples)

    @property
    def max_growth(self) -> float:
        """How far one client's statistics may reach beyond the others' (``PassOptions``)."""
        return float(self.options.max_growth)

    @property
    def min_clients(self) -> int:
        """Fewest clients a pass may pool (2 at least with secure statistics)."""
        return max(2 if self.options.secure_stats else 1, self.options.min_clients)

    @property
    def _secure(self) -> Optional[secure.ServerSession]:
        """The key agreement of the passes with secure statistics, ``None`` without."""
        if not self.options.secure_stats:
            return None
        if self._session is None:
            self._session = secure.ServerSession()
        return self._session

    def run(self, grid: Grid, nodes: Iterable[int], arrays: ArrayRecord, server_round: int) -> PassOutcome:
        """Run the pass of ``server_round`` over ``arrays`` (the aggregated global model) on
        ``nodes``; the outcome's ``buffers`` are the new running statistics, or ``None``
        when the pass failed (the reason is logged)."""
        outcome = PassOutcome(progress=ExchangeProgress(f"Statistics pass of round {server_round}",
                                                        self.options.progress_interval))
        exchanges = Exchanges(grid, outcome, server_round=server_round, timeout=self.options.exchange_timeout,
                              poll_interval=self.options.poll_interval)
        started = time.perf_counter()
        reference = {k: v.numpy() for k, v in arrays.items()}
        limit = value_limit(reference)
        participants = sorted(set(int(n) for n in nodes))
        try:
            for attempt in range(self.options.max_restarts + 1):
                participants = [n for n in participants if n not in outcome.dropped]
                if len(participants) < self.min_clients:
                    break
                outcome.restarts += attempt > 0
                released: list[ForwardStats] = []
                try:
                    buffer_calls, examples = self._attempt(exchanges, participants, arrays, limit, attempt, released)
                except Restart:
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
        exchanges: Exchanges,
        participants: list[int],
        arrays: ArrayRecord,
        limit: float,
        attempt: int,
        released: list[ForwardStats],
    ) -> tuple[dict, dict[int, int]]:
        """One attempt; the pooled statistics go into ``released`` as they are sent out.
        Returns the agreed buffer mapping and each client's examples. ``limit`` bounds every
        pooled value (:func:`~flwr_fedtan.aggregation.value_limit` of ``arrays``)."""
        server_round, outcome = exchanges.server_round, exchanges.ledger
        seed = self.options.seed  # the run's: each client derives the pass's seed (seeds.pass_seed)
        roster = None
        if self._secure is not None:
            participants = self._key_exchange(exchanges, participants)
            if len(participants) < self.min_clients:
                raise Restart()
            roster = self._secure.roster(participants)
        begin = wire.encode_stats_begin(
            arrays, server_round, seed, self.examples, attempt,
            roster, None if self._secure is None else self._secure.shifts,
        )
        statuses = exchanges.send({n: begin for n in participants}).statuses
        self._note_progress(outcome, statuses, 1, attempt)
        examples: dict[int, int] = {}
        while True:
            done = {n: s for n, s in statuses.items() if isinstance(s, wire.StatsDoneStatus)}
            if len(done) == len(statuses):
                examples = examples or {n: s.num_examples for n, s in done.items()}
                return self._agreed_buffers(outcome, done, examples), examples
            index = len(released)
            payloads, channels = self._forward_point(outcome, statuses, index)
            for node, why in payload_kind_mismatches(payloads, roster is not None, "statistics pass").items():
                outcome.drop(node, why)
            outcome.restart_if_dropped(statuses)
            claims = count_claims(payloads, roster is not None)
            violations = forward_count_violations(claims, examples, self.options.uniform_positions)
            for node, why in violations.items():
                outcome.drop(node, f"statistics pass: {why}")
            if violations:
                raise Restart()
            aggregate = self._pool(outcome, payloads, roster, channels, limit, server_round, index)
            for node, claim in claims.items():
                examples.setdefault(node, int(claim.num_examples))
            released.append(aggregate)
            content = wire.encode_stats_aggregate(server_round, index, aggregate, seed)
            statuses = exchanges.send({n: content for n in statuses}).statuses
            self._note_progress(outcome, statuses, len(released) + 1, attempt)

    @staticmethod
    def _forward_point(outcome: ExchangeLedger, statuses: dict[int, wire.Status], index: int
                       ) -> tuple[dict, Optional[int]]:
        """The payloads of BatchNorm call ``index`` and its channels; a client elsewhere, or
        with channels unlike the others', is dropped (restart)."""
        for node, status in statuses.items():
            point = wire.point_of(status)
            if status.phase != wire.PHASE_FORWARD or point is None or point.index != index:
                where = status.phase if point is None else f"{status.phase} point {point.index}"
                outcome.drop(node, f"replied {where} to the statistics pass's BatchNorm call {index}")
        points = {n: p for n, p in ((n, wire.point_of(s)) for n, s in statuses.items()) if p is not None}
        channels = Counter(p.channels for p in points.values())
        expected = channels.most_common(1)[0][0] if channels else None
        for node, point in points.items():
            if point.channels != expected:
                outcome.drop(node, f"{point.channels} channels at BatchNorm call {index}, the others {expected}")
        outcome.restart_if_dropped(statuses)
        return {n: s.payload for n, s in statuses.items() if isinstance(s, wire.SyncStatus)}, expected

    def _pool(self, outcome: ExchangeLedger, payloads: dict, roster: Optional[secure.Roster], channels: Optional[int],
              limit: float, server_round: int, index: int) -> ForwardStats:
        """The pooled statistics of BatchNorm call ``index``; a client whose payload is at fault
        is dropped, and a failure that names no client restarts the attempt."""
        try:
            if roster is not None and self._secure is not None:
                where = f"statistics pass of round {server_round}, BatchNorm call {index}"
                aggregate = self._secure.decode(payloads, roster, index, where)
            else:
                aggregate = pool_forward_stats(payloads, channels, limit, self.max_growth)
            if not isinstance(aggregate, ForwardStats) or not within_limit(aggregate, limit):
                raise SecureStatsError(f"BatchNorm call {index}: pooled statistics out of the model's range")
            return aggregate
        except PayloadError as error:
            node = cast(int, error.client)  # the payloads are keyed by node id
            outcome.drop(node, f"statistics pass, BatchNorm call {index}: {error}")
            raise Restart() from None
        except SecureStatsError as error:
            log(WARNING, "Statistics pass of round %d, BatchNorm call %d: %s", server_round, index, error)
            raise Restart() from None

    @staticmethod
    def _note_progress(outcome: ExchangeLedger, statuses: dict[int, wire.Status], index: int, attempt: int) -> None:
        """The progress line of the attempt's exchange ``index`` (from 1): ``L + 1`` in all,
        known only when the clients report done."""
        timing = outcome.last_exchange
        if timing is None or not statuses:
            return
        (phase, point), _ = Counter((s.phase, wire.point_of(s)) for s in statuses.values()).most_common(1)[0]
        final = phase == wire.PHASE_STATS_DONE
        if final:
            number, what = f"{index}/{index}", "BatchNorm buffers"
        else:
            number, what = f"{index}", phase if point is None else f"forward, BatchNorm call {point.call}"
        if attempt:
            what += f", attempt {attempt + 1}"
        outcome.progress.record(timing, f"{number} ({what})", force=index == 1 or final)

    @staticmethod
    def _agreed_buffers(outcome: ExchangeLedger, statuses: dict[int, wire.StatsDoneStatus], examples: dict) -> dict:
        """The buffer mapping most clients report (it is the model's, the same for all);
        a client reporting another, or examples other than it forwarded, is dropped."""
        def canonical(calls: dict) -> tuple:
            return tuple(sorted((k, kind, tuple(c)) for k, (kind, c) in calls.items()))

        tally = Counter(canonical(s.buffer_calls) for s in statuses.values())
        agreed, _ = tally.most_common(1)[0]
        for node, status in statuses.items():
            if canonical(status.buffer_calls) != agreed:
                outcome.drop(node, "reported another BatchNorm buffer mapping than the other clients")
            elif status.num_examples != examples.get(node):
                outcome.drop(node, f"reported {status.num_examples} examples but forwarded {examples.get(node)}")
        outcome.restart_if_dropped(statuses)
        return {key: (kind, list(calls)) for key, kind, calls in agreed}

    def _key_exchange(self, exchanges: Exchanges, participants: list[int]) -> list[int]:
        session = self._secure
        assert session is not None
        session.new_round(exchanges.server_round)
        content = wire.encode_stats_keys(exchanges.server_round)
        statuses = exchanges.send({n: content for n in participants}, restart=False).statuses
        accept_keys(exchanges.ledger, session, statuses)
        return [n for n in participants if n in session.public_keys]
