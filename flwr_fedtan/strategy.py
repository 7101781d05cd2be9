"""The FedTAN server strategy for Flower's message API: wraps any Flower strategy.

No torch here: a ServerApp running FedTAN needs NumPy and Flower only.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result, Strategy
from flwr.supercore import log

from . import checkpoint, schema, secure
from .arguments import ArgumentChecks
from .aggregation import (
    DEFAULT_MAX_GROWTH,
    ForwardStats,
    PayloadError,
    aggregate_arrays,
    check_arrays,
    check_layout,
    check_magnitudes,
    check_payload,
    forward_count_violations,
    is_batchnorm_buffer,
    nonfinite_culprit,
    pool_forward_stats,
    sum_backward_sums,
    value_limit,
)
from .exchange import exchange, unexpected
from .exact_statistics import (
    DEFAULT_STATISTICS_EXAMPLES,
    StatisticsPassDriver,
    apply_buffers,
    check_statistics_options,
    pass_due,
)
from .progress import DEFAULT_PROGRESS_INTERVAL, ExchangeProgress, ExchangeTiming, describe_bytes
from .seeds import derive_seed, round_seed

__all__ = ["FedTAN", "ForwardingGrid", "derive_seed"]

EvaluateFn = Callable[[int, ArrayRecord], Optional[MetricRecord]]

CLIENT_WEIGHTS = ("synchronised", "reported")
_NONE = np.zeros(0)  # mean/var of a masked forward payload's stand-in: only its counts are checked
CHECKPOINT_FORMAT = checkpoint.FORMAT
_REASON_CHARS = 400  # a drop reason quotes the client's own text: keep the log readable


def _brief(text: str) -> str:
    return text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS] + "..."


@contextlib.contextmanager
def _sampling_seed(seed: int) -> Iterator[None]:
    """Run a wrapped strategy's ``configure_train`` with the module ``random`` seeded.

    Flower's strategies sample nodes with ``random.sample`` on the global generator
    (``strategy_utils.sample_nodes``); seeding it here makes any wrapped strategy's choice a
    function of (FedTAN's seed, round), and restoring the state afterwards leaves the
    caller's random stream exactly as it was.
    """
    saved = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved)


@dataclass
class _RoundLedger:
    """What one round cost: counted on the server."""

    exchanges: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    sync_seconds: float = 0.0
    final_exchange_seconds: float = 0.0
    restarts: int = 0
    started: float = field(default_factory=time.perf_counter)
    dropped: dict[int, str] = field(default_factory=dict)
    progress: ExchangeProgress = field(default_factory=lambda: ExchangeProgress("FedTAN"))
    last_exchange: Optional[ExchangeTiming] = None
    batchnorm_calls: Optional[int] = None  # L, known from the first backward sync point


@dataclass
class _Round:
    """A round in flight: from ``configure_train`` to ``aggregate_train``."""

    server_round: int
    reference: dict[str, np.ndarray]
    contents: dict[int, RecordDict]
    ledger: _RoundLedger
    synchronised: dict[int, int] = field(default_factory=dict)
    saw_forward: bool = False
    statuses: dict[int, schema.Status] = field(default_factory=dict)


@dataclass
class _FailureRecord:
    """A node's run of consecutive failed rounds and when it may train again."""

    consecutive: int = 0
    benched_through: int = 0
    reason: str = ""


class _Restart(Exception):
    """Some clients failed during the synchronised step: restart it without them."""


_FEDAVG_OPTIONS = (
    "fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
    "min_available_nodes", "weighted_by_key", "arrayrecord_key", "configrecord_key",
    "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn",
)


def _find_attribute(strategy: Strategy, name: str, default: Any) -> Any:
    """``name`` of a strategy, or of the strategy it wraps (Flower's DP wrappers)."""
    seen = 0
    while strategy is not None and seen < 16:
        if name in vars(strategy):
            return getattr(strategy, name)
        strategy = getattr(strategy, "strategy", None)
        seen += 1
    return default


class FedTAN(Strategy):
    """FedTAN around any Flower strategy: its first local step(s) use the pooled batch's
    BatchNorm statistics, and BatchNorm buffers always take the pooled aggregate.

    Each round: the wrapped strategy's ``configure_train`` chooses the nodes and the config
    and its arrays go out with FedTAN's first exchange; ``2L`` exchanges (one per BatchNorm
    call forward, one per call backward) drive each of the ``sync_steps`` synchronised
    steps; the clients finish their local steps and return their models with the last
    exchange (``2L * sync_steps + 1`` exchanges a round). The wrapped strategy's
    ``aggregate_train`` then aggregates the clients' models for the *parameters* (FedAvg,
    a server optimiser such as FedAdam or FedAvgM, a DP wrapper...), and FedTAN sets the
    BatchNorm *buffers* to the pooled aggregate: ``running_mean``/``running_var`` as the
    moments of the pooled data, ``num_batches_tracked`` as an integer. The wrapped strategy
    never sees the buffers, so no optimiser can drive a variance negative, and its state
    (e.g. FedAdam's moments) covers parameters only. Evaluation goes through the wrapped
    strategy unchanged.

    Buffers are recognised by name (``is_buffer``; default: the ``state_dict`` suffixes of
    ``torch.nn.BatchNorm*``, ``running_mean``, ``running_var`` and
    ``num_batches_tracked``), so the server needs no model and no torch.

    **Drops.** A client that replies with an error, a malformed payload (NaN or Inf
    statistics, wrong shapes, counts inconsistent across its payloads), or not at all
    within ``exchange_timeout`` is dropped, with one log line naming the node and the
    reason, and the synchronised step restarts without it (at most ``max_restarts`` times a
    round); if too few remain the round is skipped and the global model kept. A final model
    that fails the checks (keys, shapes, dtypes, NaN, negative running variance, a weight
    that does not match what the client synchronised with, values beyond ``max_growth`` times
    the global model's) is left out of the average, also logged; so is a client whose model
    makes the aggregated model non-finite. Any unexpected error while handling one client's
    reply drops that client; it never ends the run. The reasons are kept in ``dropped[round][node]``.

    **Repeat offenders.** A node dropped in ``quarantine_after`` consecutive rounds sits out
    the next round; each further consecutive failure doubles its time out (1, 2, 4, ...
    rounds, at most ``max_quarantine_rounds``), and one round completed without a drop
    clears its record. A round in which no client got through charges nobody (the cause is
    then unlikely to be one node). So a node that fails the same way every round (e.g. data holding NaN)
    costs a restart in a shrinking fraction of the rounds instead of in every round, and
    still gets retried. Nodes sitting out are removed from the wrapped strategy's sample and
    logged.

    **Averaging weight.** With ``client_weight="synchronised"`` (default) a client's weight
    is the number of examples it synchronised with (the ``num-examples`` of its forward
    payloads, summed over the round's synchronised steps). Every forward payload of one
    step must carry the same ``num-examples``; its per-channel count must be a whole
    multiple of it (the layer's positions per example); with ``uniform_positions`` that
    multiple must equal the other clients' at the same call (same input size). The
    ``num-examples`` the client reports with its model must equal the synchronised count.
    A mismatch drops the client. ``client_weight="reported"`` weighs by the reported value
    instead (for clients that legitimately weigh by something else, e.g. all their local
    samples); the forward checks still apply.

    **Reproducible, resumable runs.** Node sampling (the wrapped strategy's, through
    ``random``) is seeded by ``(seed, round)`` and the clients' batches by ``(seed, round,
    attempt)``; the caller's ``random`` state is left untouched. With ``checkpoint_dir`` a
    checkpoint is written after each round's aggregation (global arrays, the wrapped
    strategy's state, e.g. FedAdam's ``m_t``/``v_t``, and FedTAN's failure records);
    ``start(..., resume_from=path)`` continues from it, with the same models for the later
    rounds as an uninterrupted run (noise drawn from NumPy's global generator, as in
    Flower's DP wrappers, is not reproduced unless the caller seeds it).

    Parameters
    ----------
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes,
    min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key,
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn
        Options of the default wrapped strategy, :class:`flwr.serverapp.strategy.FedAvg`
        (defaults as there). Not allowed together with ``strategy``: set them on it.
    strategy : Strategy, optional
        The wrapped strategy (default: ``FedAvg`` built from the options above), e.g.
        ``FedAdam(...)``, ``FedAvgM(...)`` or
        ``DifferentialPrivacyServerSideFixedClipping(FedAvg(...), ...)``.
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
    client_weight : str (default: "synchronised")
        ``"synchronised"`` or ``"reported"``, see above.
    uniform_positions : bool (default: True)
        Require every client to have the same values per example at each BatchNorm call
        (same input size). Set ``False`` for models fed inputs of varying size.
    is_buffer : Callable[[str], bool], optional
        Which array keys are BatchNorm buffers (default: by ``nn.BatchNorm`` naming).
    quarantine_after : int or None (default: 2)
        Consecutive failed rounds before a node sits out; ``None`` never benches a node.
    max_quarantine_rounds : int (default: 8)
        Longest time out, in rounds.
    checkpoint_dir : str or PathLike, optional
        Where to write ``round-NNNNN.fedtan-ckpt`` after every round (none by default).
    keep_checkpoints : int (default: 2)
        Checkpoints kept in ``checkpoint_dir`` (older ones are deleted); 0 keeps all.
    max_growth : float (default: 1e6)
        How far a client's returned model may reach: every value within ``max_growth``
        times the largest magnitude of the same array in the global model it was sent (at
        least 1; squared for running variances). A client beyond it is left out of the
        average and charged (a finite but huge value would poison the average for good).
    secure_stats : bool (default: False)
        Secure aggregation of the BatchNorm statistics (:mod:`flwr_fedtan.secure`): one
        extra exchange a round agrees pairwise keys, every client payload is masked, and
        an honest-but-curious server (one that follows the protocol) learns only the sums
        over clients (and each client's batch size, its averaging weight); a malicious
        server is out of scope (README, "What FedTAN trusts"). The models returned at the
        end of a round stay in the clear.
        The statistics pass is masked the same way (its own key exchange).
    statistics : {"exact", "running"} (default: "exact")
        The BatchNorm statistics of the global model. ``"exact"``: after aggregation (and
        before evaluation) the round's clients run a statistics pass over the new global
        model (:mod:`flwr_fedtan.exact_statistics`, ``L + 1`` more exchanges): its
        ``running_mean``/``running_var`` become the pooled mean and unbiased variance of
        the clients' examples at every BatchNorm call, exactly what precise-BN on their
        union gives. ``"running"``: the pooled aggregate of the running averages the
        clients collected during the round (models drifting apart over the local steps
        collect statistics that are not the averaged model's). If the pass fails (too
        few clients left), the round keeps the aggregated statistics, logged.
    statistics_examples : int (default: 256)
        Examples each client forwards in the pass (all of its data if it has fewer).
    statistics_every : int (default: 1)
        Run the pass every this many rounds, and always after the last round.
    progress_interval : float or None (default: 30.0)
        The ServerApp log gets one INFO line per exchange (the round, the exchange's index
        out of ``2L * sync_steps + 1``, its phase and BatchNorm call, its seconds and the
        node that replied last), at most one every ``progress_interval`` seconds besides
        the first and last exchange of a round (0: every exchange; ``None``: none), and one
        summary line per round and per statistics pass. The figures are in the round's
        train metrics either way (README, "Metrics").

    Examples
    --------
    >>> from flwr.serverapp.strategy import FedAdam
    >>> strategy = FedTAN(strategy=FedAdam(eta=1e-2, fraction_evaluate=0.0), seed=1)
    >>> result = strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=20)
    """

    # pylint: disable=too-many-arguments,too-many-instance-attributes
    def __init__(
        self,
        fraction_train: Optional[float] = None,
        fraction_evaluate: Optional[float] = None,
        min_train_nodes: Optional[int] = None,
        min_evaluate_nodes: Optional[int] = None,
        min_available_nodes: Optional[int] = None,
        weighted_by_key: Optional[str] = None,
        arrayrecord_key: Optional[str] = None,
        configrecord_key: Optional[str] = None,
        train_metrics_aggr_fn=None,
        evaluate_metrics_aggr_fn=None,
        *,
        strategy: Optional[Strategy] = None,
        sync_steps: int = 1,
        exchange_timeout: float = 120.0,
        max_restarts: int = 2,
        poll_interval: float = 0.02,
        seed: int = 0,
        client_weight: str = "synchronised",
        uniform_positions: bool = True,
        is_buffer: Optional[Callable[[str], bool]] = None,
        quarantine_after: Optional[int] = 2,
        max_quarantine_rounds: int = 8,
        checkpoint_dir: Optional[str | os.PathLike] = None,
        keep_checkpoints: int = 2,
        secure_stats: bool = False,
        statistics: str = "exact",
        statistics_examples: int = DEFAULT_STATISTICS_EXAMPLES,
        statistics_every: int = 1,
        max_growth: float = DEFAULT_MAX_GROWTH,
        progress_interval: Optional[float] = DEFAULT_PROGRESS_INTERVAL,
    ) -> None:
        options = {name: value for name, value in zip(_FEDAVG_OPTIONS, (
            fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes,
            weighted_by_key, arrayrecord_key, configrecord_key, train_metrics_aggr_fn, evaluate_metrics_aggr_fn,
        )) if value is not None}
        if strategy is None:
            strategy = FedAvg(**options)
        elif options:
            raise ValueError(
                f"FedTAN got both strategy= and FedAvg options {sorted(options)}: set them on the wrapped "
                f"strategy instead, e.g. FedTAN(strategy={type(strategy).__name__}({', '.join(sorted(options))}=...))"
            )
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a flwr.serverapp.strategy.Strategy, got {type(strategy).__name__}")
        checks = ArgumentChecks("FedTAN")
        checks.integer("sync_steps", sync_steps, 1)
        checks.number("exchange_timeout", exchange_timeout, above=0, fix="give the seconds to wait for a reply, > 0")
        checks.integer("max_restarts", max_restarts, 0)
        checks.number("poll_interval", poll_interval, above=0)
        checks.integer("seed", seed)
        checks.choice("client_weight", client_weight, CLIENT_WEIGHTS)
        if quarantine_after is not None:
            checks.integer("quarantine_after", quarantine_after, 1, fix="give a whole number >= 1, or None")
        checks.integer("max_quarantine_rounds", max_quarantine_rounds, 1)
        checks.integer("keep_checkpoints", keep_checkpoints, 0, fix="give a whole number >= 0 (0 keeps all)")
        checks.boolean("secure_stats", secure_stats)
        checks.number("max_growth", max_growth, above=1)
        if progress_interval is not None:
            checks.number("progress_interval", progress_interval, at_least=0,
                          fix="give the seconds between two progress lines, >= 0, or None for no such line")
        check_statistics_options(statistics, statistics_examples, statistics_every, checks)
        checks.raise_if_any()
        self.strategy = strategy
        self.sync_steps = sync_steps
        self.exchange_timeout = exchange_timeout
        self.max_restarts = max_restarts
        self.poll_interval = poll_interval
        self.seed = seed
        self.client_weight = client_weight
        self.uniform_positions = uniform_positions
        self.is_buffer = is_buffer or is_batchnorm_buffer
        self.quarantine_after = quarantine_after
        self.max_quarantine_rounds = max_quarantine_rounds
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.keep_checkpoints = keep_checkpoints
        self.secure_stats = bool(secure_stats)
        self.max_growth = float(max_growth)
        self.progress_interval = None if progress_interval is None else float(progress_interval)
        self._secure = secure.ServerSession() if self.secure_stats else None
        self.statistics = statistics
        self.statistics_every = int(statistics_every)
        self._statistics_pass = StatisticsPassDriver(
            examples=statistics_examples, exchange_timeout=exchange_timeout, poll_interval=poll_interval,
            max_restarts=max_restarts, seed=seed, secure_stats=self.secure_stats,
            uniform_positions=uniform_positions, max_growth=max_growth, progress_interval=self.progress_interval,
        )
        self._grid: Optional[Grid] = None
        self._num_rounds: Optional[int] = None
        # Why nodes were dropped, by round: {server_round: {node_id: reason}}.
        self.dropped: dict[int, dict[int, str]] = {}
        self.failures: dict[int, _FailureRecord] = {}
        self._round: Optional[_Round] = None
        self._resumed_through = 0

    # ------------------------------------------------------------------ settings
    @property
    def weighted_by_key(self) -> str:
        """The wrapped strategy's weighting key (``num-examples`` by default)."""
        return str(_find_attribute(self.strategy, "weighted_by_key", "num-examples"))

    @property
    def arrayrecord_key(self) -> str:
        """The key under which the wrapped strategy expects the clients' arrays."""
        return str(_find_attribute(self.strategy, "arrayrecord_key", "arrays"))

    @property
    def min_train_nodes(self) -> int:
        """Fewest clients a synchronised step may run with (the wrapped strategy's, >= 1)."""
        return max(1, int(_find_attribute(self.strategy, "min_train_nodes", 1) or 1))

    def round_seed(self, server_round: int, attempt: int) -> int:
        """The seed of the clients' batches in ``(round, attempt)`` (each client derives it
        from the run seed the strategy sends, :func:`flwr_fedtan.seeds.round_seed`)."""
        return round_seed(self.seed, server_round, attempt)

    def summary(self) -> None:
        """Log the strategy's settings, then the wrapped strategy's."""
        log(INFO, "\t├──> FedTAN around %s:", type(self.strategy).__name__)
        log(INFO, "\t│\t├── Synchronised steps per round: %d", self.sync_steps)
        log(INFO, "\t│\t├── Secure statistics: %s", "on" if self.secure_stats else "off")
        log(INFO, "\t│\t├── Exchange timeout: %.1fs, poll interval %.3fs", self.exchange_timeout, self.poll_interval)
        log(INFO, "\t│\t├── Max restarts per round: %d; sit out after %s failed rounds (at most %d rounds)",
            self.max_restarts, self.quarantine_after, self.max_quarantine_rounds)
        log(INFO, "\t│\t├── BatchNorm statistics: %s", "exact (pass every %d rounds, %d examples per client)" % (
            self.statistics_every, self._statistics_pass.examples) if self.statistics == "exact" else "running")
        log(INFO, "\t│\t└── Client weight: %s; seed %d", self.client_weight, self.seed)
        self.strategy.summary()

    # ------------------------------------------------------------------ Flower's loop
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
        *,
        resume_from: Optional[str | os.PathLike] = None,
    ) -> Result:
        """Run ``num_rounds`` rounds with Flower's own round loop (``Strategy.start``).

        ``timeout`` bounds each evaluation exchange; training exchanges use
        ``exchange_timeout``. Per-round costs (exchanges, bytes, seconds, clients,
        restarts, drops) are recorded with the clients' train metrics in
        ``Result.train_metrics_clientapp``.

        Parameters
        ----------
        resume_from : str or PathLike, optional
            A checkpoint written with ``checkpoint_dir`` (or that folder: its latest). The
            run continues after the checkpoint's round ``r`` with its arrays and state;
            rounds ``1..r`` are passed over (no exchange), ``evaluate_fn`` is called for
            round ``r`` (the checkpoint's model) and the later rounds, and
            ``initial_arrays`` is ignored.
        """
        self._resumed_through = 0
        self._num_rounds = num_rounds
        if resume_from is not None:
            done, initial_arrays = self.load_checkpoint(resume_from)
            if done >= num_rounds:
                log(WARNING, "FedTAN: checkpoint is at round %d of %d: nothing left to run", done, num_rounds)
            self._resumed_through = done
            evaluate_fn = self._evaluate_after(done, evaluate_fn)
        # FedTAN runs inside Flower's round loop: the Grid it hands the loop turns each
        # round's train messages (from configure_train) into FedTAN's exchanges.
        result = super().start(
            _ExchangeGrid(grid, self), initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn
        )
        if not len(result.arrays):  # every round skipped: the global model is still the initial one
            result.arrays = initial_arrays
        return result

    @staticmethod
    def _evaluate_after(done: int, evaluate_fn: EvaluateFn | None) -> EvaluateFn | None:
        if evaluate_fn is None:
            return None

        def evaluate(server_round: int, arrays: ArrayRecord) -> Optional[MetricRecord]:
            return None if server_round < done else evaluate_fn(server_round, arrays)

        return evaluate

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's ``configure_train`` on the parameters, turned into the
        round's first FedTAN exchange (its arrays plus the global BatchNorm buffers)."""
        if server_round <= self._resumed_through:
            log(INFO, "FedTAN: round %d was completed before the checkpoint", server_round)
            return []
        inner = getattr(grid, "inner", grid)
        self._grid = inner
        params = ArrayRecord({k: v for k, v in arrays.items() if not self.is_buffer(k)})
        buffers = {k: v for k, v in arrays.items() if self.is_buffer(k)}
        with _sampling_seed(derive_seed(self.seed, server_round)):
            messages = list(self.strategy.configure_train(server_round, params, config, inner))
        contents: dict[int, RecordDict] = {}
        for message in messages:
            node = message.metadata.dst_node_id
            if self._benched(node, server_round):
                continue
            array_records = list(message.content.array_records.values())
            config_records = list(message.content.config_records.values())
            if len(array_records) != 1 or len(config_records) > 1:
                raise ValueError(
                    f"{type(self.strategy).__name__}.configure_train sent node {node} "
                    f"{len(array_records)} ArrayRecords and {len(config_records)} ConfigRecords; FedTAN "
                    "needs one ArrayRecord (the model) and at most one ConfigRecord"
                )
            sent = array_records[0]
            missing = [k for k in arrays.keys() if k not in sent and k not in buffers]
            if missing:
                raise ValueError(f"{type(self.strategy).__name__}.configure_train left out arrays {missing[:5]}")
            full = ArrayRecord({k: (buffers[k] if k in buffers else sent[k]) for k in arrays.keys()})
            node_config = config_records[0] if config_records else ConfigRecord()
            contents[node] = schema.encode_begin(full, node_config, server_round, self.sync_steps, self.seed)
        ledger = _RoundLedger(progress=ExchangeProgress(f"FedTAN round {server_round}", self.progress_interval))
        self.dropped[server_round] = ledger.dropped
        self._round = _Round(server_round, {k: v.numpy() for k, v in arrays.items()}, contents, ledger)
        return [
            Message(content=content, dst_node_id=node, message_type=schema.MESSAGE_TYPE)
            for node, content in sorted(contents.items())
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Check the final models, let the wrapped strategy aggregate the parameters, and
        set the BatchNorm buffers to the pooled aggregate."""
        replies = list(replies)
        round_ = self._round
        if server_round <= self._resumed_through or round_ is None or round_.server_round != server_round:
            return None, None
        self._round = None
        ledger, key = round_.ledger, self.weighted_by_key
        by_node = {reply.metadata.src_node_id: reply for reply in replies}
        contributions, wrapped_replies = {}, {}
        for node, status in round_.statuses.items():
            try:
                check_layout(node, {k: v.shape for k, v in status.arrays.items()}, round_.reference)  # type: ignore[union-attr]
                arrays = {k: v.numpy() for k, v in status.arrays.items()}  # type: ignore[union-attr]
                check_arrays(node, arrays, status.metrics[key], round_.reference)  # type: ignore[index]
                check_magnitudes(node, arrays, round_.reference, self.max_growth)
                weight = self._weight(node, status.metrics[key], round_)  # type: ignore[index]
                metrics = MetricRecord(dict(status.metrics))  # type: ignore[arg-type]
                metrics[key] = int(weight) if float(weight).is_integer() else float(weight)
                params = ArrayRecord({k: v for k, v in status.arrays.items() if not self.is_buffer(k)})  # type: ignore[union-attr]
                content = RecordDict({self.arrayrecord_key: params, "metrics": metrics})
                wrapped_replies[node] = Message(content=content, metadata=by_node[node].metadata)
            except PayloadError as error:
                self._drop(round_, node, f"model left out of the average: {error}")
                continue
            except Exception as error:  # pylint: disable=broad-except
                self._drop(round_, node, f"model left out of the average: {unexpected(error)}")
                continue
            contributions[node] = (arrays, weight)
        _keep_shared_metrics(server_round, wrapped_replies, key)
        aggregated, metrics, merged = self._aggregate_finite(server_round, round_, contributions, wrapped_replies)
        if merged is None:
            self._update_failures(round_, completed=bool(contributions))
            if self.checkpoint_dir is not None:  # the failure records changed; the model did not
                unchanged = ArrayRecord({k: Array(v) for k, v in round_.reference.items()})
                self.save_checkpoint(self.checkpoint_dir, server_round, unchanged)
            return None, self._skipped(round_)
        metrics = MetricRecord() if metrics is None else metrics
        if self.statistics == "exact" and self._grid is not None and pass_due(
            server_round, self.statistics_every, self._num_rounds
        ):
            outcome = self._statistics_pass.run(self._grid, sorted(contributions), merged, server_round)
            merged = apply_buffers(merged, outcome.buffers)
            metrics.update(outcome.metrics())
            for node, why in outcome.dropped.items():
                ledger.dropped.setdefault(node, f"statistics pass: {why}")
        self._update_failures(round_, completed=True)
        metrics.update(self._round_summary(round_, len(contributions)))
        if self.checkpoint_dir is not None:
            self.save_checkpoint(self.checkpoint_dir, server_round, merged)
        return merged, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's, with the whole model (BatchNorm buffers included)."""
        if server_round < self._resumed_through:
            return []
        return self.strategy.configure_evaluate(server_round, arrays, config, getattr(grid, "inner", grid))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        """The wrapped strategy's; if it fails on the replies (one client's metrics unlike
        the others', say), the round's evaluation metrics are left out, the run goes on."""
        try:
            return self.strategy.aggregate_evaluate(server_round, replies)
        except Exception as error:  # pylint: disable=broad-except
            log(WARNING, "Round %d: %s.aggregate_evaluate failed (%s: %s), evaluation metrics left out",
                server_round, type(self.strategy).__name__, type(error).__name__, _brief(str(error)))
            return None

    # ------------------------------------------------------------------ the exchanges
    def run_round(self, grid: Grid, messages: list[Message]) -> list[Message]:
        """Drive the synchronised step(s) from the round's first messages; return the
        clients' final replies (empty if the round is skipped)."""
        round_ = self._round
        if round_ is None or not messages:
            return []
        participants = sorted(m.metadata.dst_node_id for m in messages)
        if self._secure is not None:
            participants = self._key_exchange(grid, round_, participants)
        # Secure statistics need two clients: one client's statistics cannot hide in a sum.
        least = max(2, self.min_train_nodes) if self._secure is not None else self.min_train_nodes
        for attempt in range(self.max_restarts + 1):
            if len(participants) < least:
                break
            try:
                seed = self.round_seed(round_.server_round, attempt)
                replies = self._synchronised_round(grid, round_, participants, seed, attempt)
            except _Restart:
                failed = [n for n in participants if n in round_.ledger.dropped]
                participants = [n for n in participants if n not in round_.ledger.dropped]
                if len(participants) < least or attempt == self.max_restarts:
                    break
                round_.ledger.restarts += 1
                log(WARNING, "Round %d: restarting the synchronised step with %d clients (without %s)",
                    round_.server_round, len(participants),
                    "; ".join(f"node {n}: {round_.ledger.dropped[n]}" for n in failed))
                if self._secure is not None:  # fresh keys: clients that finished have dropped theirs
                    participants = self._key_exchange(grid, round_, participants)
                continue
            return replies
        return []

    def _drop(self, round_: _Round, node: int, reason: str) -> None:
        if node in round_.ledger.dropped:
            return
        reason = _brief(reason)
        round_.ledger.dropped[node] = reason
        log(WARNING, "FedTAN round %d: dropping node %s: %s", round_.server_round, node, reason)

    def _synchronised_round(
        self, grid: Grid, round_: _Round, participants: list[int], seed: int, attempt: int = 0
    ) -> list[Message]:
        begin = {n: self._with_attempt(round_.contents[n], attempt) for n in participants}
        roster = None
        if self._secure is not None:
            roster = self._secure.roster(participants)
            begin = {n: schema.with_roster(c, attempt, roster, self._secure.shifts) for n, c in begin.items()}
        ledger = round_.ledger
        limit = value_limit(round_.reference)
        t0 = time.perf_counter()
        statuses, replies = self._exchange(grid, round_, begin)
        self._note_progress(round_, statuses, 1, attempt)
        received, step_examples, current_step = 0, {}, None
        synchronised = {n: 0 for n in participants}
        round_.saw_forward = False
        while True:
            phases = {s.phase for s in statuses.values()}
            if phases == {schema.PHASE_DONE}:
                round_.statuses, round_.synchronised = statuses, synchronised
                return [replies[n] for n in sorted(statuses)]
            if schema.PHASE_DONE in phases:
                self._drop_minority(round_, statuses)
            key_of = {n: (s.step, s.point) for n, s in statuses.items()}
            majority, _ = Counter(key_of.values()).most_common(1)[0]
            for node, key in key_of.items():
                if key != majority:
                    self._drop(round_, node, f"at sync point {key}, the others at {majority}")
            if ledger.dropped.keys() & statuses.keys():
                raise _Restart()
            point = next(iter(statuses.values())).point
            step = next(iter(statuses.values())).step
            payloads = {n: s.payload for n, s in statuses.items()}
            for node, payload in payloads.items():
                if (roster is not None) != isinstance(payload, secure.MaskedPayload):
                    self._drop(round_, node, f"sent {'clear' if roster is not None else 'masked'} statistics "
                                             f"in a {'secure' if roster is not None else 'clear'} round")
            if ledger.dropped.keys() & statuses.keys():
                raise _Restart()
            try:
                if point.phase == schema.PHASE_FORWARD:
                    if step != current_step:
                        current_step, step_examples = step, {}
                    claims = payloads if roster is None else {  # the clear counts of masked payloads
                        n: ForwardStats(count=p.count, num_examples=p.num_examples, mean=_NONE, var=_NONE)
                        for n, p in payloads.items()
                    }
                    violations = forward_count_violations(claims, step_examples, self.uniform_positions)
                    for node, why in violations.items():
                        self._drop(round_, node, why)
                    if violations:
                        raise _Restart()
                    for node, payload in payloads.items():
                        if node not in step_examples:
                            step_examples[node] = payload.num_examples  # type: ignore[union-attr]
                            synchronised[node] += payload.num_examples  # type: ignore[union-attr]
                    round_.saw_forward = True
                if roster is not None:
                    where = secure.describe_point(round_.server_round, step, point.phase, point.index, point.call)
                    aggregate = self._secure.decode(payloads, roster, point.index, where)  # type: ignore[union-attr]
                elif point.phase == schema.PHASE_FORWARD:
                    aggregate = pool_forward_stats(payloads, point.channels, limit, self.max_growth)
                else:
                    aggregate = sum_backward_sums(payloads, point.channels, limit, self.max_growth)
                if not _within(aggregate, limit):  # clear pooling names the client; masked sums cannot
                    raise secure.FixedPointOverflowError(
                        f"round {round_.server_round}: the pooled {point.phase} statistics of BatchNorm call "
                        f"{point.call} exceed the model's floating-point range {limit:.3g}"
                    )
            except PayloadError as error:
                self._drop(round_, error.client, f"payload rejected at {point.phase} call {point.call}: {error}")
                raise _Restart() from None
            except secure.SecureStatsError as error:  # names no client: retry with fresh masks
                log(WARNING, "Round %d: secure statistics failed, restarting: %s", round_.server_round, error)
                if isinstance(error, secure.CanaryMismatchError):
                    self._blame(grid, round_, roster, payloads, received)  # type: ignore[arg-type]
                raise _Restart() from None
            except Exception as error:  # unexpected: find whose payload caused it, never end the run
                node, why = _first_bad_payload(payloads, point, roster is not None)
                if node is None:
                    log(WARNING, "Round %d: %s at %s call %d, no client to blame, restarting: %s",
                        round_.server_round, type(error).__name__, point.phase, point.call, error)
                else:
                    self._drop(round_, node, f"payload rejected at {point.phase} call {point.call}: {why}")
                raise _Restart() from None
            content = schema.encode_aggregate(
                round_.server_round, step, received, point, aggregate, self.sync_steps, seed
            )
            received += 1
            t_exchange = time.perf_counter()
            statuses, replies = self._exchange(grid, round_, {n: content for n in statuses})
            ledger.final_exchange_seconds = time.perf_counter() - t_exchange
            ledger.sync_seconds = t_exchange - t0
            self._note_progress(round_, statuses, received + 1, attempt)

    def _note_progress(self, round_: _Round, statuses: dict[int, schema.Status], index: int, attempt: int) -> None:
        """The progress line of the attempt's exchange ``index`` (from 1), described by the
        sync point most replies reached. Its seconds count towards the round's median and
        max unless it is the final exchange (``fedtan-final-exchange-seconds``)."""
        ledger = round_.ledger
        timing = ledger.last_exchange
        if timing is None or not statuses:
            return
        (phase, step, point), _ = Counter((s.phase, s.step, s.point) for s in statuses.values()).most_common(1)[0]
        if ledger.batchnorm_calls is None:
            if point is not None and point.phase == schema.PHASE_BACKWARD and step == 0:
                ledger.batchnorm_calls = point.index  # forward points are 0..L-1 of every step
            elif phase == schema.PHASE_DONE:
                ledger.batchnorm_calls = 0
        total = None if ledger.batchnorm_calls is None else 2 * ledger.batchnorm_calls * self.sync_steps + 1
        number = f"{index}" if total is None else f"{index}/{total}"
        if point is None:
            what = "local steps and final models" if phase == schema.PHASE_DONE else phase
        else:
            what = f"step {step + 1}, {point.phase}, BatchNorm call {point.call}"
        if attempt:
            what += f", attempt {attempt + 1}"
        final = phase == schema.PHASE_DONE
        ledger.progress.record(timing, f"{number} ({what})", force=index == 1 or final, counted=not final)

    @staticmethod
    def _with_attempt(content: RecordDict, attempt: int) -> RecordDict:
        control = ConfigRecord(dict(content.config_records[schema.CONTROL]))
        control["attempt"] = attempt
        out = RecordDict(dict(content.items()))
        out[schema.CONTROL] = control
        return out

    def _key_exchange(self, grid: Grid, round_: _Round, participants: list[int]) -> list[int]:
        """Secure statistics: collect the round's public keys; nodes that fail are dropped
        before any statistic is sent. Returns the nodes with a key."""
        session = self._secure
        assert session is not None
        session.new_round(round_.server_round)
        content = schema.encode_keys(round_.server_round, self.sync_steps)
        for _ in range(self.max_restarts + 1):
            participants = [n for n in participants if n not in round_.ledger.dropped]
            try:
                statuses, _ = self._exchange(grid, round_, {n: content for n in participants})
            except _Restart:
                continue
            for node, status in statuses.items():
                try:
                    if status.phase != schema.PHASE_KEYS:
                        raise PayloadError(node, f"replied {status.phase!r} to the key exchange")
                    session.accept_public_key(node, status.public_key)
                except PayloadError as error:
                    self._drop(round_, node, str(error))
                except Exception as error:
                    self._drop(round_, node, unexpected(error))
            return [n for n in participants if n in session.public_keys]
        return []

    def _blame(self, grid: Grid, round_: _Round, roster: Any, payloads: dict, exchange: int) -> None:
        """The canaries of ``exchange`` did not cancel: every client reveals its pair masks of
        that canary (and nothing else), and the client whose canary or masks do not add up
        is dropped (:func:`flwr_fedtan.secure.blame_canary`)."""
        length = int(next(iter(payloads.values())).masked.shape[1])
        content = schema.encode_blame(round_.server_round, self.sync_steps, exchange, length)
        try:
            statuses, _ = self._exchange(grid, round_, {n: content for n in payloads})
        except _Restart:  # whoever did not answer is dropped already
            return
        revealed = {n: s.canary_masks for n, s in statuses.items() if s.phase == schema.PHASE_BLAME}
        try:
            blamed = secure.blame_canary(payloads, roster, revealed)
        except Exception as error:  # pylint: disable=broad-except
            log(WARNING, "Round %d: could not tell whose canary failed (%s: %s)", round_.server_round,
                type(error).__name__, error)
            return
        for node, why in blamed.items():
            self._drop(round_, node, f"masks did not cancel at exchange {exchange}: {why}")

    def _drop_minority(self, round_: _Round, statuses: dict[int, schema.Status]) -> None:
        done = [n for n, s in statuses.items() if s.phase == schema.PHASE_DONE]
        busy = [n for n in statuses if n not in done]
        for node in done if len(done) <= len(busy) else busy:
            self._drop(round_, node, "finished its synchronised steps early" if node in done
                       else "still synchronising while the others finished")
        raise _Restart()

    def _exchange(
        self, grid: Grid, round_: _Round, contents: dict[int, RecordDict]
    ) -> tuple[dict[int, schema.Status], dict[int, Message]]:
        """Send one message to each node and collect valid replies; drop failing nodes."""
        ledger = round_.ledger
        ledger.exchanges += 1
        result = exchange(grid, contents, server_round=round_.server_round, timeout=self.exchange_timeout,
                          poll_interval=self.poll_interval, weighted_by_key=self.weighted_by_key)
        ledger.bytes_sent += result.bytes_sent
        ledger.bytes_received += result.bytes_received
        ledger.last_exchange = result.timing
        for node, reason in result.failures.items():
            self._drop(round_, node, reason)
        if len(result.statuses) != len(contents):
            raise _Restart()
        return result.statuses, result.replies

    # ------------------------------------------------------------------ aggregation
    def _weight(self, node: int, reported: Any, round_: _Round) -> float:
        if self.client_weight == "reported" or not round_.saw_forward:
            return float(reported)
        synchronised = round_.synchronised.get(node, 0)
        if float(reported) != float(synchronised):
            raise PayloadError(
                node,
                f"reports '{self.weighted_by_key}' = {reported} but synchronised with {synchronised} examples "
                "(its forward payloads); if your clients weigh by something else, use "
                "FedTAN(client_weight='reported')",
            )
        return float(synchronised)

    def _aggregate_finite(
        self,
        server_round: int,
        round_: _Round,
        contributions: dict[int, tuple[dict[str, np.ndarray], float]],
        wrapped_replies: dict[int, Message],
    ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord], Optional[ArrayRecord]]:
        """The wrapped strategy's aggregate merged with the pooled buffers, checked finite
        before it becomes the global model. A non-finite result names the client with the
        largest values in the offending array: it is dropped (``contributions`` loses it)
        and the aggregation redone without it, the wrapped strategy's state (e.g. FedAdam's
        moments) restored first. ``(None, None, None)`` if nothing usable is left."""
        name = type(self.strategy).__name__
        while contributions:
            saved = _snapshot(self.strategy)
            try:
                replies = [wrapped_replies[n] for n in contributions]
                aggregated, metrics = self.strategy.aggregate_train(server_round, replies)
                if aggregated is None:
                    log(WARNING, "Round %d: %s returned no arrays, global model kept", server_round, name)
                    return None, None, None
                merged = self._merge(aggregated, contributions, round_.reference)
            except Exception as error:  # pylint: disable=broad-except
                _restore_snapshot(self.strategy, saved)
                log(WARNING, "Round %d: %s.aggregate_train failed (%s: %s), global model kept", server_round,
                    name, type(error).__name__, _brief(str(error)))
                return None, None, None
            bad = nonfinite_culprit({k: v.numpy() for k, v in merged.items()}, contributions)
            if bad is None:
                return aggregated, metrics, merged
            _restore_snapshot(self.strategy, saved)
            array, node = bad
            if node is None:
                log(WARNING, "Round %d: %s aggregated %s to NaN or Inf, global model kept", server_round, name, array)
                return None, None, None
            self._drop(round_, node, f"model left out of the average: with it the aggregated {array} holds "
                                     "NaN or Inf (its values there are the largest)")
            del contributions[node]
        return None, None, None

    def _merge(
        self,
        aggregated: ArrayRecord,
        contributions: dict[int, tuple[dict[str, np.ndarray], float]],
        reference: dict[str, np.ndarray],
    ) -> ArrayRecord:
        buffer_keys = [k for k in reference if self.is_buffer(k)]
        buffers: dict[str, np.ndarray] = {}
        if buffer_keys:
            subset = {n: ({k: a[k] for k in buffer_keys}, w) for n, (a, w) in contributions.items()}
            buffers = aggregate_arrays(subset, {k: reference[k] for k in buffer_keys})
        merged = ArrayRecord()
        for key, ref in reference.items():
            if key in buffers:
                merged[key] = Array(buffers[key])
                continue
            if key not in aggregated:
                raise ValueError(f"{type(self.strategy).__name__}.aggregate_train returned no array {key!r}")
            value = np.asarray(aggregated[key].numpy())
            if value.shape != ref.shape:
                raise ValueError(f"{type(self.strategy).__name__}.aggregate_train returned {key!r} with shape "
                                 f"{value.shape}, expected {ref.shape}")
            if ref.dtype.kind in "iub" and value.dtype.kind == "f":
                value = np.rint(value)
            # Server optimisers compute in float64; the global model keeps its dtypes.
            merged[key] = Array(np.ascontiguousarray(value, dtype=ref.dtype))
        return merged

    def _skipped(self, round_: _Round) -> MetricRecord:
        reason = "; ".join(f"node {n}: {why}" for n, why in round_.ledger.dropped.items()) or "too few clients"
        log(WARNING, "Round %d skipped, global model kept (%s)", round_.server_round, reason)
        metrics = MetricRecord({"fedtan-skipped": 1})
        metrics.update(self._round_summary(round_, 0))
        return metrics

    def _round_summary(self, round_: _Round, clients: int) -> dict:
        """Log the round's summary line; return its ``fedtan-*`` metrics."""
        ledger = round_.ledger
        replays = sum(int(s.metrics.get("replays", 0)) for s in round_.statuses.values() if s.metrics is not None)
        metrics = self._ledger_metrics(ledger, clients)
        metrics.update(ledger.progress.metrics("fedtan-"))
        metrics["fedtan-replays"] = replays
        log(INFO, "FedTAN round %d done in %.1f s: %d exchanges; synchronised step: %s; final exchange %.2f s; "
            "%s sent, %s received; %d replays; %d restarts; %d dropped", round_.server_round,
            metrics["fedtan-round-seconds"], ledger.exchanges, ledger.progress.describe(),
            ledger.final_exchange_seconds, describe_bytes(ledger.bytes_sent), describe_bytes(ledger.bytes_received),
            replays, ledger.restarts, len(ledger.dropped))
        return metrics

    @staticmethod
    def _ledger_metrics(ledger: _RoundLedger, clients: int) -> dict:
        return {
            "fedtan-clients": clients,
            "fedtan-exchanges": ledger.exchanges,
            "fedtan-bytes-sent": ledger.bytes_sent,
            "fedtan-bytes-received": ledger.bytes_received,
            "fedtan-sync-wall-seconds": ledger.sync_seconds,
            "fedtan-final-exchange-seconds": ledger.final_exchange_seconds,
            "fedtan-round-seconds": time.perf_counter() - ledger.started,
            "fedtan-restarts": ledger.restarts,
            "fedtan-dropped": len(ledger.dropped),
        }

    # ------------------------------------------------------------------ repeat offenders
    def _benched(self, node: int, server_round: int) -> bool:
        record = self.failures.get(node)
        if record is None or record.benched_through < server_round:
            return False
        log(INFO, "FedTAN round %d: node %s sits out (failed %d rounds in a row, last: %s); back in round %d",
            server_round, node, record.consecutive, record.reason, record.benched_through + 1)
        return True

    def _update_failures(self, round_: _Round, completed: bool) -> None:
        if not completed:  # nobody got through: not evidence against any one node
            return
        for node in round_.contents:
            reason = round_.ledger.dropped.get(node)
            if reason is None:
                self.failures.pop(node, None)
                continue
            record = self.failures.setdefault(node, _FailureRecord())
            record.consecutive += 1
            record.reason = reason
            if self.quarantine_after is not None and record.consecutive >= self.quarantine_after:
                rounds = min(2 ** (record.consecutive - self.quarantine_after), self.max_quarantine_rounds)
                record.benched_through = round_.server_round + rounds
                log(WARNING, "FedTAN: node %s failed %d rounds in a row: it sits out rounds %d-%d",
                    node, record.consecutive, round_.server_round + 1, record.benched_through)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | os.PathLike, server_round: int, arrays: ArrayRecord) -> Path:
        """Write the state after ``server_round`` (atomically); return the file.

        ``path`` is a folder (the file is ``round-NNNNN.fedtan-ckpt`` in it), created or
        verified private (``0700``, this user's, not a link); the file is ``0600``. It holds
        the global arrays, the wrapped strategy's state (every attribute that is plain
        data: e.g. FedAdam's ``current_arrays``, ``m_t``, ``v_t``; FedAvgM's momentum),
        FedTAN's failure records and seed, as a NumPy archive with a JSON document: no
        pickle, so loading a checkpoint runs no code.
        """
        header = {
            "round": int(server_round),
            "seed": self.seed,
            "strategy-class": type(self.strategy).__name__,
            "failures": [[int(n), vars(r).copy()] for n, r in self.failures.items()],
        }
        state = {"arrays": ArrayRecord({k: v for k, v in arrays.items()}), "strategy": _capture_state(self.strategy)}
        target = checkpoint.write(Path(path), server_round, header, state)
        if self.keep_checkpoints > 0:
            for _, old in checkpoint.list_checkpoints(target.parent)[: -self.keep_checkpoints]:
                old.unlink(missing_ok=True)
        return target

    def load_checkpoint(self, path: str | os.PathLike) -> tuple[int, ArrayRecord]:
        """Restore the state of a checkpoint (a file, or a folder: the one of the highest
        round number); return its round and global arrays."""
        file = Path(path)
        if file.is_dir() and not file.is_symlink():
            found = checkpoint.list_checkpoints(file)
            if not found:
                raise FileNotFoundError(f"no FedTAN checkpoint (round-*{checkpoint.SUFFIX}) in {file}")
            file = found[-1][1]
        payload, state = checkpoint.read(file)
        if payload.get("strategy-class") != type(self.strategy).__name__:
            raise ValueError(
                f"{file} was written by FedTAN around {payload.get('strategy-class')}, this one wraps "
                f"{type(self.strategy).__name__}: build the same strategy to resume"
            )
        if payload.get("seed") != self.seed:
            log(WARNING, "FedTAN: checkpoint seed %s differs from this strategy's %s: the resumed rounds "
                "will not match the original run", payload.get("seed"), self.seed)
        _restore_state(self.strategy, state["strategy"])
        self.failures = {int(n): _FailureRecord(**r) for n, r in payload["failures"]}
        log(INFO, "FedTAN: resuming after round %d from %s", payload["round"], file)
        return int(payload["round"]), state["arrays"]


def _capture_state(obj: Any) -> dict:
    """A strategy's plain-data attributes (nested wrapped strategies included), encodable
    in a checkpoint (:mod:`flwr_fedtan.checkpoint`)."""
    state = {}
    for name, value in vars(obj).items():
        if isinstance(value, Strategy):
            state[name] = ("strategy", _capture_state(value))
        elif callable(value):
            continue
        else:
            try:
                checkpoint.encode_state(value, {})
            except checkpoint.Unsupported:  # e.g. a lock or a client handle: not state to resume
                continue
            state[name] = ("value", value)
    return state


def _restore_state(obj: Any, state: dict) -> None:
    for name, (kind, value) in state.items():
        if kind == "strategy":
            _restore_state(getattr(obj, name), value)
        else:
            setattr(obj, name, value)


def _snapshot(obj: Any) -> dict:
    """A deep copy of a strategy's data attributes (wrapped strategies included); the key
    ``None`` holds the names of all its attributes, to remove those added later."""
    saved: dict = {None: ("names", set(vars(obj)))}
    for name, value in vars(obj).items():
        if isinstance(value, Strategy):
            saved[name] = ("strategy", _snapshot(value))
        elif not callable(value):
            try:
                saved[name] = ("value", copy.deepcopy(value))
            except Exception:  # pylint: disable=broad-except  # a lock, a client handle: not state
                continue
    return saved


def _restore_snapshot(obj: Any, saved: dict) -> None:
    for name in set(vars(obj)) - saved[None][1]:
        delattr(obj, name)
    for name, (kind, value) in saved.items():
        if kind == "names":
            continue
        if kind == "strategy":
            _restore_snapshot(getattr(obj, name), value)
        else:
            setattr(obj, name, value)


def _metric_shape(value: Any) -> Optional[tuple]:
    """``("scalar",)`` or ``("list", n)`` for a finite number or list of numbers, else None."""
    def finite_number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)

    if finite_number(value):
        return ("scalar",)
    if isinstance(value, list) and all(finite_number(v) for v in value):
        return ("list", len(value))
    return None


def _keep_shared_metrics(server_round: int, replies: dict[int, Message], weight_key: str) -> None:
    """Leave in every client's metrics only the keys all clients report with finite values of
    the same shape: Flower's strategies refuse (raise on) replies whose metrics differ, so
    one client's extra, missing or non-finite metric would otherwise end the run."""
    if not replies:
        return
    records = {n: m.content.metric_records["metrics"] for n, m in replies.items()}
    shapes = [{k: _metric_shape(v) for k, v in r.items()} for r in records.values()]
    shared = {k for k, shape in shapes[0].items()
              if shape is not None and all(other.get(k) == shape for other in shapes[1:])}
    shared.add(weight_key)
    for node, record in records.items():
        left_out = sorted(k for k in record.keys() if k not in shared)
        if left_out:
            log(WARNING, "FedTAN round %d: node %s's metrics %s left out (not reported alike by every client)",
                server_round, node, _brief(str(left_out)))
            for k in left_out:
                del record[k]


def _within(aggregate: Any, limit: float) -> bool:
    """Whether every value of an aggregate is finite and within ``limit`` in magnitude."""
    values = ([aggregate.mean, aggregate.var] if isinstance(aggregate, ForwardStats)
              else [aggregate.sum_grad, aggregate.sum_grad_xhat])
    return all(np.isfinite(v).all() and (np.abs(v) <= limit).all() for v in values)


def _first_bad_payload(payloads: dict, point: Any, masked: bool) -> tuple[Optional[int], str]:
    """The first client whose payload, checked on its own, is malformed, and why."""
    for node, payload in payloads.items():
        try:
            if not masked:
                check_payload(node, payload, point.phase, point.channels)
            elif point.phase == schema.PHASE_FORWARD and not (
                isinstance(payload.count, float) and isinstance(payload.num_examples, int)
            ):
                raise PayloadError(node, "masked forward payload without its clear counts")
        except Exception as error:  # pylint: disable=broad-except
            return node, str(error) if isinstance(error, PayloadError) else unexpected(error)
    return None, ""


class ForwardingGrid(Grid):
    """A Grid that forwards every call to another Grid (``inner``).

    A base for Grid wrappers (counting traffic, intercepting a round's messages): a
    subclass overrides only the calls it changes.
    """

    def __init__(self, grid: Grid) -> None:
        self.inner = grid

    @property
    def run(self):
        """The inner Grid's run."""
        return self.inner.run

    def set_run(self, run_id: int) -> None:
        """Forwarded."""
        self.inner.set_run(run_id)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        """Forwarded."""
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Forwarded."""
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Forwarded."""
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Forwarded."""
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        """Forwarded."""
        return self.inner.send_and_receive(messages, timeout=timeout)


class _ExchangeGrid(ForwardingGrid):
    """The Grid FedTAN hands to Flower's round loop.

    Flower's loop sends a round's train messages with one ``send_and_receive``; for FedTAN's
    messages this runs the round's exchanges on the real Grid (:meth:`FedTAN.run_round`)
    and returns the clients' final replies. Everything else is forwarded.
    """

    def __init__(self, grid: Grid, fedtan: FedTAN) -> None:
        super().__init__(grid)
        self.fedtan = fedtan

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        """A FedTAN round for FedTAN's messages; forwarded otherwise."""
        messages = list(messages)
        if messages and all(m.metadata.message_type == schema.MESSAGE_TYPE for m in messages):
            return self.fedtan.run_round(self.inner, messages)
        if not messages:
            return []
        return self.inner.send_and_receive(messages, timeout=timeout)
