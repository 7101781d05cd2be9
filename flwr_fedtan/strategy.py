"""The FedTAN server strategy for Flower's message API."""

from __future__ import annotations

import io
import time
from collections import Counter
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Callable, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info, sample_nodes
from flwr.supercore import log

from . import schema, secure
from .aggregation import PayloadError, aggregate_arrays, check_arrays, pool_forward_stats, sum_backward_sums
from .seeds import derive_seed

__all__ = ["FedTAN"]

EvaluateFn = Callable[[int, ArrayRecord], Optional[MetricRecord]]


@dataclass
class _RoundLedger:
    """What one round cost: counted on the server."""

    exchanges: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    sync_seconds: float = 0.0
    final_exchange_seconds: float = 0.0
    restarts: int = 0
    dropped: dict[int, str] = field(default_factory=dict)


class _Restart(Exception):
    """Some clients failed during the synchronised step: restart it without them."""


class FedTAN(FedAvg):
    """FedTAN: FedAvg whose first local step(s) use the pooled batch's BatchNorm statistics.

    Each round: the global model goes to the sampled nodes with the first exchange; ``2L``
    exchanges (one per BatchNorm call forward, one per call backward; ``L`` calls) drive
    each of the ``sync_steps`` synchronised steps; the remaining local steps follow on the
    clients and the models come back with the last exchange, averaged by examples with
    BatchNorm running statistics combined as pooled moments: ``2L * sync_steps + 1``
    exchanges a round. The server needs no knowledge of the model.

    A client that replies with an error, a malformed payload, or not at all within
    ``exchange_timeout`` is dropped and the synchronised step restarts with the others
    (at most ``max_restarts`` times a round); if too few remain the round is skipped and
    the global model kept.

    Parameters
    ----------
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes,
    min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key,
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn
        As in :class:`flwr.serverapp.strategy.FedAvg`.
    sync_steps : int (default: 1)
        Synchronised steps at the start of each round (the clients' ``local-steps`` ``E``
        counts them; the paper's setting is 1).
    exchange_timeout : float (default: 120.0)
        Seconds to wait for the replies of one exchange.
    max_restarts : int (default: 2)
        Restarts of a round's synchronised step after clients failed.
    poll_interval : float (default: 0.02)
        Seconds between two pulls of replies (Flower's own ``send_and_receive`` sleeps
        3 s between pulls in deployment, which FedTAN would pay ``2L`` times a round).
    seed : int (default: 0)
        Seeds node sampling and the clients' batch sampling.
    secure_stats : bool (default: False)
        Secure aggregation of the BatchNorm statistics (:mod:`flwr_fedtan.secure`): one
        extra exchange a round agrees pairwise keys, every client payload is masked, and
        the server learns only the sums over clients. The models returned at the end of a
        round stay in the clear.
    """

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn=None,
        evaluate_metrics_aggr_fn=None,
        *,
        sync_steps: int = 1,
        exchange_timeout: float = 120.0,
        max_restarts: int = 2,
        poll_interval: float = 0.02,
        seed: int = 0,
        secure_stats: bool = False,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        if sync_steps < 1:
            raise ValueError(f"sync_steps must be >= 1, got {sync_steps}")
        if exchange_timeout <= 0:
            raise ValueError(f"exchange_timeout must be positive, got {exchange_timeout}")
        self.sync_steps = sync_steps
        self.exchange_timeout = exchange_timeout
        self.max_restarts = max_restarts
        self.poll_interval = poll_interval
        self.seed = seed
        self.secure_stats = bool(secure_stats)
        self._secure = secure.ServerSession() if self.secure_stats else None
        # Why nodes were dropped, by round: {server_round: {node_id: reason}}.
        self.dropped: dict[int, dict[int, str]] = {}

    def summary(self) -> None:
        """Log the strategy's settings."""
        super().summary()
        log(INFO, "\t└──> FedTAN:")
        log(INFO, "\t\t├── Synchronised steps per round: %d", self.sync_steps)
        log(INFO, "\t\t├── Secure statistics: %s", "on" if self.secure_stats else "off")
        log(INFO, "\t\t├── Exchange timeout: %.1fs, poll interval %.3fs", self.exchange_timeout, self.poll_interval)
        log(INFO, "\t\t└── Max restarts per round: %d", self.max_restarts)

    # ------------------------------------------------------------------ main loop
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Run ``num_rounds`` FedTAN rounds; same signature and result as Flower's strategies.

        ``timeout`` bounds each evaluation exchange; training exchanges use
        ``exchange_timeout``. Per-round costs (exchanges, bytes, seconds, clients) are
        recorded with the clients' train metrics in ``Result.train_metrics_clientapp``.
        """
        log(INFO, "Starting %s strategy:", self.__class__.__name__)
        log_strategy_start_info(num_rounds, initial_arrays, train_config, evaluate_config)
        self.summary()
        log(INFO, "")
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        result.arrays = initial_arrays
        t_start = time.time()
        if evaluate_fn:
            res = evaluate_fn(0, initial_arrays)
            log(INFO, "Initial global evaluation results: %s", res)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res

        arrays = initial_arrays
        for current_round in range(1, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", current_round, num_rounds)
            new_arrays, metrics = self.train_round(grid, current_round, arrays, train_config)
            if new_arrays is not None:
                arrays = new_arrays
                result.arrays = arrays
            log(INFO, "\t└──> Train metrics: %s", metrics)
            result.train_metrics_clientapp[current_round] = metrics

            evaluate_replies = grid.send_and_receive(
                messages=self.configure_evaluate(current_round, arrays, evaluate_config, grid),
                timeout=timeout,
            )
            agg_evaluate = self.aggregate_evaluate(current_round, evaluate_replies)
            if agg_evaluate is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", agg_evaluate)
                result.evaluate_metrics_clientapp[current_round] = agg_evaluate
            if evaluate_fn:
                log(INFO, "Global evaluation")
                res = evaluate_fn(current_round, arrays)
                log(INFO, "\t└──> MetricRecord: %s", res)
                if res is not None:
                    result.evaluate_metrics_serverapp[current_round] = res

        log(INFO, "")
        log(INFO, "Strategy execution finished in %.2fs", time.time() - t_start)
        log(INFO, "")
        log(INFO, "Final results:")
        for line in io.StringIO(str(result)):
            log(INFO, "\t%s", line.strip("\n"))
        return result

    # ------------------------------------------------------------------ one round
    def sample_train_nodes(self, grid: Grid) -> list[int]:
        """Sample the round's nodes like FedAvg's ``configure_train``."""
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        sample_size = max(num_nodes, self.min_train_nodes)
        node_ids, all_nodes = sample_nodes(grid, self.min_available_nodes, sample_size)
        log(INFO, "configure_train: Sampled %s nodes (out of %s)", len(node_ids), len(all_nodes))
        return sorted(node_ids)

    def train_round(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> tuple[Optional[ArrayRecord], MetricRecord]:
        """One FedTAN round; returns the new global arrays (``None`` if skipped) and metrics."""
        ledger = _RoundLedger()
        self.dropped[server_round] = ledger.dropped
        if self.fraction_train == 0.0:
            return None, MetricRecord({"fedtan-clients": 0})
        config = ConfigRecord(dict(config))
        config["server-round"] = server_round
        participants = self.sample_train_nodes(grid)
        reference = {k: v.numpy() for k, v in arrays.items()}
        started = time.perf_counter()
        if self._secure is not None:
            participants = self._key_exchange(grid, server_round, participants, ledger)
        for attempt in range(self.max_restarts + 1):
            # Secure statistics need two clients: one client's statistics cannot hide in a sum.
            if len(participants) < max(2 if self._secure is not None else 1, self.min_train_nodes):
                break
            seed = derive_seed(self.seed, server_round, attempt)
            try:
                outcome = self._synchronised_round(
                    grid, server_round, arrays, config, participants, seed, ledger, attempt
                )
            except _Restart:
                ledger.restarts += 1
                participants = [n for n in participants if n not in ledger.dropped]
                log(
                    WARNING,
                    "Round %d: restarting the synchronised step with %d clients",
                    server_round,
                    len(participants),
                )
                continue
            new_arrays, metrics = self._aggregate_models(outcome, reference, ledger)
            if new_arrays is not None:
                averaged = sum(1 for n in outcome if n not in ledger.dropped)
                metrics.update(self._ledger_metrics(ledger, averaged, time.perf_counter() - started))
                return new_arrays, metrics
            break
        reason = "; ".join(f"node {n}: {why}" for n, why in ledger.dropped.items()) or "too few clients"
        log(WARNING, "Round %d skipped, global model kept (%s)", server_round, reason)
        metrics = MetricRecord({"fedtan-skipped": 1})
        metrics.update(self._ledger_metrics(ledger, 0, time.perf_counter() - started))
        return None, metrics

    def _synchronised_round(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        participants: list[int],
        seed: int,
        ledger: _RoundLedger,
        attempt: int = 0,
    ) -> dict[int, schema.Status]:
        roster = None if self._secure is None else self._secure.roster(participants)
        begin = schema.encode_begin(
            arrays, config, server_round, self.sync_steps, seed, attempt, roster,
            None if self._secure is None else self._secure.shifts,
        )
        t0 = time.perf_counter()
        statuses = self._exchange(grid, {n: begin for n in participants}, ledger)
        received = 0
        while True:
            phases = {s.phase for s in statuses.values()}
            if phases == {schema.PHASE_DONE}:
                return statuses
            if schema.PHASE_DONE in phases:
                self._drop_minority(statuses, ledger, "finished its synchronised steps early")
            key_of = {n: (s.step, s.point) for n, s in statuses.items()}
            majority, _ = Counter(key_of.values()).most_common(1)[0]
            for node, key in key_of.items():
                if key != majority:
                    ledger.dropped[node] = f"at sync point {key}, the others at {majority}"
            if ledger.dropped.keys() & statuses.keys():
                raise _Restart()
            point = next(iter(statuses.values())).point
            payloads = {n: s.payload for n, s in statuses.items()}
            step = next(iter(statuses.values())).step
            try:
                if roster is not None:
                    where = secure.describe_point(server_round, step, point.phase, point.index, point.call)
                    aggregate = self._secure.decode(payloads, roster, point.index, where)  # type: ignore[union-attr]
                elif point.phase == schema.PHASE_FORWARD:
                    aggregate = pool_forward_stats(payloads, channels=point.channels)
                else:
                    aggregate = sum_backward_sums(payloads, channels=point.channels)
            except PayloadError as error:
                ledger.dropped[error.client] = str(error)
                raise _Restart() from None
            except secure.SecureStatsError as error:  # names no client: retry with fresh masks
                log(WARNING, "Round %d: secure statistics failed, restarting: %s", server_round, error)
                raise _Restart() from None
            content = schema.encode_aggregate(
                server_round, step, received, point, aggregate, self.sync_steps, seed
            )
            received += 1
            t_exchange = time.perf_counter()
            statuses = self._exchange(grid, {n: content for n in statuses}, ledger)
            ledger.final_exchange_seconds = time.perf_counter() - t_exchange
            ledger.sync_seconds = t_exchange - t0

    def _key_exchange(
        self, grid: Grid, server_round: int, participants: list[int], ledger: _RoundLedger
    ) -> list[int]:
        """Secure statistics: collect the round's public keys; nodes that fail are dropped
        before any statistic is sent. Returns the nodes with a key."""
        session = self._secure
        assert session is not None
        session.new_round(server_round)
        content = schema.encode_keys(server_round, self.sync_steps)
        for _ in range(self.max_restarts + 1):
            participants = [n for n in participants if n not in ledger.dropped]
            try:
                statuses = self._exchange(grid, {n: content for n in participants}, ledger)
            except _Restart:
                continue
            for node, status in statuses.items():
                try:
                    if status.phase != schema.PHASE_KEYS:
                        raise PayloadError(node, f"replied {status.phase!r} to the key exchange")
                    session.accept_public_key(node, status.public_key)
                except PayloadError as error:
                    ledger.dropped[node] = str(error)
            return [n for n in participants if n in session.public_keys]
        return []

    def _drop_minority(self, statuses: dict[int, schema.Status], ledger: _RoundLedger, why: str) -> None:
        done = [n for n, s in statuses.items() if s.phase == schema.PHASE_DONE]
        busy = [n for n in statuses if n not in done]
        for node in done if len(done) <= len(busy) else busy:
            ledger.dropped[node] = why if node in done else "still synchronising while the others finished"
        raise _Restart()

    def _exchange(
        self, grid: Grid, contents: dict[int, RecordDict], ledger: _RoundLedger
    ) -> dict[int, schema.Status]:
        """Send one message to each node and collect valid replies; drop failing nodes."""
        messages = []
        for node, content in contents.items():
            messages.append(Message(content=content, dst_node_id=node, message_type=schema.MESSAGE_TYPE))
            ledger.bytes_sent += schema.record_bytes(content)
        ledger.exchanges += 1
        message_ids = {mid: msg.metadata.dst_node_id for mid, msg in zip(grid.push_messages(messages), messages)}
        replies: dict[int, Message] = {}
        deadline = time.monotonic() + self.exchange_timeout
        pending = set(message_ids)
        while pending:
            for reply in grid.pull_messages(list(pending)):
                reply_to = reply.metadata.reply_to_message_id
                if reply_to in pending:
                    pending.discard(reply_to)
                    replies[message_ids[reply_to]] = reply
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(self.poll_interval)
        for mid in pending:
            ledger.dropped[message_ids[mid]] = f"no reply within {self.exchange_timeout:g}s"
        statuses: dict[int, schema.Status] = {}
        for node, reply in replies.items():
            if reply.has_error():
                ledger.dropped[node] = f"error reply: {reply.error.reason}"
                continue
            ledger.bytes_received += schema.record_bytes(reply.content)
            try:
                statuses[node] = schema.decode_reply(reply.content, node, self.weighted_by_key)
            except PayloadError as error:
                ledger.dropped[node] = str(error)
        for node, why in ledger.dropped.items():
            if node in contents:
                log(WARNING, "FedTAN: dropping node %s: %s", node, why)
        if len(statuses) != len(contents):
            raise _Restart()
        return statuses

    def _aggregate_models(
        self, statuses: dict[int, schema.Status], reference: dict[str, np.ndarray], ledger: _RoundLedger
    ) -> tuple[Optional[ArrayRecord], MetricRecord]:
        contributions = {}
        for node, status in statuses.items():
            arrays = {k: v.numpy() for k, v in status.arrays.items()}  # type: ignore[union-attr]
            weight = status.metrics[self.weighted_by_key]  # type: ignore[index]
            try:
                check_arrays(node, arrays, weight, reference)
            except PayloadError as error:
                ledger.dropped[node] = str(error)
                log(WARNING, "FedTAN: model of node %s left out of the average: %s", node, error)
                continue
            contributions[node] = (arrays, weight)
        if not contributions:
            return None, MetricRecord()
        averaged = aggregate_arrays(contributions, reference)
        good = [n for n in statuses if n in contributions]
        metrics = self.train_metrics_aggr_fn(
            [RecordDict({"metrics": statuses[n].metrics}) for n in good], self.weighted_by_key
        )
        return ArrayRecord({k: Array(v) for k, v in averaged.items()}), metrics

    @staticmethod
    def _ledger_metrics(ledger: _RoundLedger, clients: int, seconds: float) -> dict:
        return {
            "fedtan-clients": clients,
            "fedtan-exchanges": ledger.exchanges,
            "fedtan-bytes-sent": ledger.bytes_sent,
            "fedtan-bytes-received": ledger.bytes_received,
            "fedtan-sync-wall-seconds": ledger.sync_seconds,
            "fedtan-final-exchange-seconds": ledger.final_exchange_seconds,
            "fedtan-round-seconds": seconds,
            "fedtan-restarts": ledger.restarts,
            "fedtan-dropped": len(ledger.dropped),
        }
