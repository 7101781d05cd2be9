"""The server's round driver: a FedTAN round's exchanges on a Flower Grid, no strategy logic.

No torch here. :class:`RoundDriver` runs the round :class:`~flwr_fedtan.FedTAN` configured:
the secure key exchange, then attempts of the synchronised step(s) (``2L * sync_steps + 1``
exchanges each), pooling every sync point's payloads, dropping the clients that fail and
restarting without them, blaming the client whose masks do not cancel, and logging the
progress. With secure models a failure in the final exchange restarts that exchange alone:
the survivors keep their trained models and mask them again under fresh keys (``remask``),
as far as the release rule (:class:`~flwr_fedtan.secure.releases.ReleaseLedger`) allows.
What the round cost and whom it dropped is kept in its
:class:`~flwr_fedtan.protocol.round_ledger.RoundLedger`. The
statistics pass after aggregation has its own driver
(:class:`~flwr_fedtan.protocol.pass_driver.StatisticsPassDriver`) over the same exchanges.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any, Callable, Mapping, Optional, Union, cast

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore import log

from .. import secure
from . import wire
from ..aggregation import (
    BackwardSums,
    ForwardStats,
    SyncPoint,
    check_payload,
    forward_count_violations,
    pool_forward_stats,
    sum_backward_sums,
    value_limit,
)
from ..errors import CanaryMismatchError, FixedPointOverflowError, PayloadError, SecureStatsError
from ..secure import Roster, ServerSession
from ..seeds import round_seed
from .exchange import (
    Exchanges,
    Restart,
    accept_keys,
    count_claims,
    payload_kind_mismatches,
    unexpected,
    within_limit,
)
from ..secure.releases import ReleaseLedger
from .model_release import FinalRestart, release_final, remask, unless_final_exchange
from .pass_driver import PassOptions
from .round_ledger import RoundLedger, TrainRound

__all__ = ["RoundDriver", "RoundOptions"]


@dataclass
class _Attempt:
    """One attempt of a round's synchronised step(s): what it has seen so far."""

    seed: int
    number: int
    roster: Optional[Roster]
    limit: float
    synchronised: dict[int, int]
    received: int = 0  # aggregates sent so far
    step: Optional[int] = None  # the synchronised step of step_examples
    step_examples: dict[int, int] = field(default_factory=dict)


@dataclass
class RoundOptions(PassOptions):
    """The options of FedTAN's rounds and of its statistics passes, in one object that
    :class:`~flwr_fedtan.FedTAN` holds and both drivers read at each round and pass: a
    change between rounds (``strategy.exchange_timeout = 30``) reaches both.

    The fields are :class:`~flwr_fedtan.FedTAN`'s arguments of the same names
    (``examples`` is its ``statistics_examples``); ``min_clients`` is the statistics
    pass's (a round's is the wrapped strategy's ``min_train_nodes``).
    """

    sync_steps: int = 1
    secure_models: bool = False
    client_weight: str = "synchronised"

    def __setattr__(self, name: str, value: Any) -> None:
        convert = _KEPT_AS.get(name)
        super().__setattr__(name, value if convert is None else convert(value))


_KEPT_AS: dict[str, Callable[[Any], Any]] = {
    "max_growth": float,
    "secure_stats": bool,
    "secure_models": bool,
    "progress_interval": lambda value: None if value is None else float(value),
}
"""The options kept converted, as the drivers read them."""


class RoundDriver:
    """Drives FedTAN rounds on a Grid (server side, no torch, no strategy logic).

    ``options`` (:class:`RoundOptions`) are read at each round; with ``secure_stats`` every
    payload is masked, with ``secure_models`` the final models (a key exchange before the
    first attempt and after each restart, for either).
    """

    def __init__(self, options: RoundOptions) -> None:
        self.options = options
        self._session: Optional[ServerSession] = None
        self.releases = ReleaseLedger()  # secure models: the masked-model sums of the run's rounds

    @property
    def secure(self) -> Optional[ServerSession]:
        """The rounds' key agreement with secure statistics or models, ``None`` without."""
        if not (self.options.secure_stats or self.options.secure_models):
            return None
        if self._session is None:
            self._session = ServerSession()
        return self._session

    def round_seed(self, server_round: int, attempt: int) -> int:
        """The seed of the clients' batches in ``(round, attempt)`` (each derives it itself)."""
        return round_seed(self.options.seed, server_round, attempt)

    def run(self, grid: Grid, round_: TrainRound, participants: list[int], min_clients: int,
            weighted_by_key: str) -> list[Message]:
        """Drive the synchronised step(s) of ``round_`` on ``participants``; return the
        clients' final replies (empty if fewer than ``min_clients`` got through)."""
        options = self.options
        exchanges = Exchanges(grid, round_.ledger, server_round=round_.server_round, timeout=options.exchange_timeout,
                              poll_interval=options.poll_interval, weighted_by_key=weighted_by_key)
        ledger = round_.ledger
        self.releases.forget_before(round_.server_round)
        if self.secure is not None:
            participants = self._key_exchange(exchanges, participants)
        # Secure statistics need two clients: one client's statistics cannot hide in a sum.
        least = max(2, min_clients) if self.secure is not None else min_clients
        kept: Optional[dict[int, int]] = None  # secure models: survivors hold their final models (synchronised)
        for attempt in range(self.options.max_restarts + 1):
            if len(participants) < least:
                break
            try:
                if kept is not None:
                    assert self.secure is not None  # secure models run a key exchange before every attempt
                    return remask(self.releases, self.secure, exchanges, round_, participants, attempt, kept,
                                  weighted_by_key=weighted_by_key, sync_steps=self.options.sync_steps,
                                  check_weights=self.options.client_weight == "synchronised", blame=self._blame_models)
                seed = self.round_seed(round_.server_round, attempt)
                return self._attempt(exchanges, round_, participants, seed, attempt, weighted_by_key)
            except FinalRestart as restart:
                kept = restart.synchronised
            except Restart:
                pass
            failed = [n for n in participants if n in ledger.dropped]
            participants = [n for n in participants if n not in ledger.dropped]
            if len(participants) < least or attempt == self.options.max_restarts:
                break
            ledger.restarts += 1
            log(WARNING, "Round %d: restarting %s with %d clients (without %s)", round_.server_round,
                "the synchronised step" if kept is None else "the final exchange alone (the kept models, re-masked)",
                len(participants), "; ".join(f"node {n}: {ledger.dropped[n]}" for n in failed) or "none dropped")
            if self.secure is not None:  # fresh keys: no mask is ever used twice
                participants = self._key_exchange(exchanges, participants)
        return []

    # ------------------------------------------------------------------ one attempt
    def _attempt(self, exchanges: Exchanges, round_: TrainRound, participants: list[int], seed: int,
                 number: int, weighted_by_key: str) -> list[Message]:
        begin = {n: wire.with_attempt(round_.contents[n], number) for n in participants}
        roster = None
        options = self.options
        if self.secure is not None:
            roster = self.secure.roster(participants)
            weight_key = weighted_by_key if options.secure_models else None
            begin = {n: wire.with_roster(c, number, roster, self.secure.shifts, options.secure_stats, weight_key)
                     for n, c in begin.items()}
        stats_roster = roster if options.secure_stats else None
        state = _Attempt(seed, number, stats_roster, value_limit(round_.reference), {n: 0 for n in participants})
        ledger = round_.ledger
        started = time.perf_counter()
        final_alone = options.secure_models and roster is not None  # a drop at the final exchange: re-mask
        round_.saw_forward = False
        result = exchanges.send(begin, restart=not final_alone)
        self._note_progress(ledger, result.statuses, 1, number)
        unless_final_exchange(begin, result.statuses, state.synchronised)
        while True:
            statuses = result.statuses
            if all(isinstance(s, wire.DoneStatus) for s in statuses.values()):
                round_.synchronised = state.synchronised
                if options.secure_models and roster is not None:
                    return release_final(self.releases, exchanges, round_, result, roster,
                                         weighted_by_key=weighted_by_key,
                                         check_weights=options.client_weight == "synchronised",
                                         blame=self._blame_models)
                round_.statuses = {n: s for n, s in statuses.items() if isinstance(s, wire.DoneStatus)}
                return [result.replies[n] for n in sorted(statuses)]
            point, step, payloads = self._at_one_point(ledger, statuses, stats_roster is not None)
            aggregate = self._pool(exchanges, round_, state, point, step, payloads)
            content = wire.encode_aggregate(round_.server_round, step, state.received, point, aggregate,
                                              self.options.sync_steps, seed)
            state.received += 1
            sent = time.perf_counter()
            result = exchanges.send({n: content for n in statuses}, restart=not final_alone)
            ledger.final_exchange_seconds = time.perf_counter() - sent
            ledger.sync_seconds = sent - started
            self._note_progress(ledger, result.statuses, state.received + 1, number)
            unless_final_exchange(statuses, result.statuses, state.synchronised)

    def _at_one_point(self, ledger: RoundLedger, statuses: dict[int, wire.Status], masked: bool
                      ) -> tuple[SyncPoint, int, dict]:
        """The sync point and step every client reached, and their payloads; the clients
        elsewhere (the minority), or with the wrong kind of payload, are dropped (restart)."""
        if any(isinstance(s, wire.DoneStatus) for s in statuses.values()):
            self._drop_minority(ledger, statuses)
        key_of = {n: (s.step, wire.point_of(s)) for n, s in statuses.items()}
        majority, _ = Counter(key_of.values()).most_common(1)[0]
        for node, key in key_of.items():
            if key != majority:
                ledger.drop(node, f"at sync point {key}, the others at {majority}")
        for node, status in statuses.items():
            if not isinstance(status, wire.SyncStatus):
                ledger.drop(node, f"replied {status.phase!r} during the synchronised step")
        ledger.restart_if_dropped(statuses)
        sync = {n: s for n, s in statuses.items() if isinstance(s, wire.SyncStatus)}
        payloads = {n: s.payload for n, s in sync.items()}
        for node, why in payload_kind_mismatches(payloads, masked, "round").items():
            ledger.drop(node, why)
        ledger.restart_if_dropped(statuses)
        first = next(iter(sync.values()))
        return first.point, first.step, payloads

    def _pool(self, exchanges: Exchanges, round_: TrainRound, state: _Attempt, point: SyncPoint, step: int,
              payloads: dict) -> Union[ForwardStats, BackwardSums]:
        """The aggregate of one sync point; a client whose payload is at fault is dropped,
        and a failure that names no client restarts the attempt."""
        ledger, masked = round_.ledger, state.roster is not None
        try:
            if point.phase == wire.PHASE_FORWARD:
                self._count_forward(ledger, state, step, count_claims(payloads, masked))
                round_.saw_forward = True
            aggregate: Union[ForwardStats, BackwardSums]
            if state.roster is not None and self.secure is not None:
                where = secure.describe_point(round_.server_round, step, point.phase, point.index, point.call)
                aggregate = self.secure.decode(payloads, state.roster, point.index, where)
            elif point.phase == wire.PHASE_FORWARD:
                aggregate = pool_forward_stats(payloads, point.channels, state.limit, self.options.max_growth)
            else:
                aggregate = sum_backward_sums(payloads, point.channels, state.limit, self.options.max_growth)
            if not within_limit(aggregate, state.limit):  # clear pooling names the client; masked sums cannot
                raise FixedPointOverflowError(
                    f"round {round_.server_round}: the pooled {point.phase} statistics of BatchNorm call "
                    f"{point.call} exceed the model's floating-point range {state.limit:.3g}"
                )
            return aggregate
        except Restart:
            raise
        except PayloadError as error:
            ledger.drop(cast(int, error.client), f"payload rejected at {point.phase} call {point.call}: {error}")
            raise Restart() from None
        except SecureStatsError as error:  # names no client: retry with fresh masks
            log(WARNING, "Round %d: secure statistics failed, restarting: %s", round_.server_round, error)
            if isinstance(error, CanaryMismatchError) and state.roster is not None:
                self._blame(exchanges, state.roster, payloads, state.received)
            raise Restart() from None
        except Exception as error:  # unexpected: find whose payload caused it, never end the run
            node, why = _first_bad_payload(payloads, point, masked)
            if node is None:
                log(WARNING, "Round %d: %s at %s call %d, no client to blame, restarting: %s",
                    round_.server_round, type(error).__name__, point.phase, point.call, error)
            else:
                ledger.drop(node, f"payload rejected at {point.phase} call {point.call}: {why}")
            raise Restart() from None

    def _count_forward(self, ledger: RoundLedger, state: _Attempt, step: int, claims: dict[int, ForwardStats]
                       ) -> None:
        """Check a forward point's counts against the step's (a mismatch drops the client);
        count each client's examples once per synchronised step."""
        if step != state.step:
            state.step, state.step_examples = step, {}
        violations = forward_count_violations(claims, state.step_examples, self.options.uniform_positions)
        for node, why in violations.items():
            ledger.drop(node, why)
        if violations:
            raise Restart()
        for node, claim in claims.items():
            if node not in state.step_examples:
                state.step_examples[node] = claim.num_examples
                state.synchronised[node] += claim.num_examples

    def _note_progress(self, ledger: RoundLedger, statuses: dict[int, wire.Status], index: int,
                       attempt: int) -> None:
        """The progress line of the attempt's exchange ``index`` (from 1), described by the
        sync point most replies reached. Its seconds count towards the round's median and
        max unless it is the final exchange (``fedtan-final-exchange-seconds``)."""
        timing = ledger.last_exchange
        if timing is None or not statuses:
            return
        (phase, step, point), _ = Counter(
            (s.phase, s.step, wire.point_of(s)) for s in statuses.values()
        ).most_common(1)[0]
        if ledger.batchnorm_calls is None:
            if point is not None and point.phase == wire.PHASE_BACKWARD and step == 0:
                ledger.batchnorm_calls = point.index  # forward points are 0..L-1 of every step
            elif phase == wire.PHASE_DONE:
                ledger.batchnorm_calls = 0
        total = None if ledger.batchnorm_calls is None else 2 * ledger.batchnorm_calls * self.options.sync_steps + 1
        number = f"{index}" if total is None else f"{index}/{total}"
        if point is None:
            what = "local steps and final models" if phase == wire.PHASE_DONE else phase
        else:
            what = f"step {step + 1}, {point.phase}, BatchNorm call {point.call}"
        if attempt:
            what += f", attempt {attempt + 1}"
        final = phase == wire.PHASE_DONE
        ledger.progress.record(timing, f"{number} ({what})", force=index == 1 or final, counted=not final)

    # ------------------------------------------------------------------ secure statistics
    def _key_exchange(self, exchanges: Exchanges, participants: list[int]) -> list[int]:
        """Collect the round's public keys; nodes that fail are dropped before any statistic
        is sent. Returns the nodes with a key."""
        session, ledger = self.secure, exchanges.ledger
        assert session is not None
        session.new_round(exchanges.server_round)
        content = wire.encode_keys(exchanges.server_round, self.options.sync_steps)
        for _ in range(self.options.max_restarts + 1):
            participants = [n for n in participants if n not in ledger.dropped]
            try:
                statuses = exchanges.send({n: content for n in participants}).statuses
            except Restart:
                continue
            accept_keys(ledger, session, statuses)
            return [n for n in participants if n in session.public_keys]
        return []

    def _blame(self, exchanges: Exchanges, roster: Roster, payloads: Mapping[int, Any], exchange: Optional[int]
               ) -> dict[int, str]:
        """The canaries of ``exchange`` (``None``: of the masked final models) did not cancel:
        every client reveals its pair masks of that canary (and nothing else), and the client
        whose canary or masks do not add up is dropped (:func:`flwr_fedtan.secure.blame_canary`)
        and returned with the reason."""
        length = int(next(iter(payloads.values())).masked.shape[1])
        content = wire.encode_blame(exchanges.server_round, self.options.sync_steps,
                                    -1 if exchange is None else exchange, length, model=exchange is None)
        result = exchanges.send({n: content for n in payloads}, restart=False)
        if len(result.statuses) != len(payloads):  # whoever did not answer is dropped already
            return {}
        revealed = {n: s.canary_masks for n, s in result.statuses.items() if isinstance(s, wire.BlameStatus)}
        try:
            blamed = secure.blame_canary(payloads, roster, revealed)  # reads each payload's .masked canary
        except Exception as error:  # pylint: disable=broad-except
            log(WARNING, "Round %d: could not tell whose canary failed (%s: %s)", exchanges.server_round,
                type(error).__name__, error)
            return {}
        if exchange is not None:
            for node, why in blamed.items():
                exchanges.ledger.drop(node, f"masks did not cancel at exchange {exchange}: {why}")
        return blamed

    def _blame_models(self, exchanges: Exchanges, roster: Roster, payloads: Mapping[int, Any]) -> dict[int, str]:
        """The masked models' canary did not cancel: whose canary or masks do not add up."""
        return self._blame(exchanges, roster, payloads, None)

    @staticmethod
    def _drop_minority(ledger: RoundLedger, statuses: dict[int, wire.Status]) -> None:
        done = [n for n, s in statuses.items() if isinstance(s, wire.DoneStatus)]
        busy = [n for n in statuses if n not in done]
        for node in done if len(done) <= len(busy) else busy:
            ledger.drop(node, "finished its synchronised steps early" if node in done
                        else "still synchronising while the others finished")
        raise Restart()


def _first_bad_payload(payloads: dict, point: SyncPoint, masked: bool) -> tuple[Optional[int], str]:
    """The first client whose payload, checked on its own, is malformed, and why."""
    for node, payload in payloads.items():
        try:
            if not masked:
                check_payload(node, payload, point.phase, point.channels)
            elif point.phase == wire.PHASE_FORWARD and not (
                isinstance(payload.count, float) and isinstance(payload.num_examples, int)
            ):
                raise PayloadError(node, "masked forward payload without its clear counts")
        except Exception as error:  # pylint: disable=broad-except
            return node, str(error) if isinstance(error, PayloadError) else unexpected(error)
    return None, ""


