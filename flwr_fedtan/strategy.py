"""The FedTAN server strategy for Flower's message API: wraps any Flower strategy.

No torch here: a ServerApp running FedTAN needs NumPy and Flower only. :class:`FedTAN` is
the Flower adapter (validate, transform, delegate); the round's exchanges are driven by
:class:`~flwr_fedtan.protocol.driver.RoundDriver`, the returned models are checked and
merged in :mod:`flwr_fedtan.round_models`, repeat offenders sit out
(:mod:`flwr_fedtan.quarantine`) and checkpoints are written by :mod:`flwr_fedtan.checkpoint`.
"""

from __future__ import annotations

import os
from logging import INFO, WARNING
from pathlib import Path
from typing import Callable, Iterable, Optional

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from . import checkpoint
from .aggregation import DEFAULT_MAX_GROWTH, is_batchnorm_buffer
from .exact_statistics import pass_due, run_pass
from .grids import ExchangeGrid, ForwardingGrid
from .progress import DEFAULT_PROGRESS_INTERVAL
from .protocol import wire
from .protocol.driver import RoundDriver, RoundOptions
from .protocol.round_ledger import TrainRound, new_round_ledger, round_summary, skipped_round
from .protocol.pass_driver import DEFAULT_STATISTICS_EXAMPLES, StatisticsPassDriver
from .quarantine import Quarantine
from .round_models import aggregate_round, begin_contents, brief, canonical_replies
from .secure.composition import check_secure_models_composes
from .seeds import derive_seed
from .strategy_options import check_options, forwarded, log_summary
from .wrapped import FEDAVG_OPTIONS, find_attribute, sampling_seed, wrapped_strategy

__all__ = ["FedTAN", "ForwardingGrid", "derive_seed"]

CHECKPOINT_FORMAT = checkpoint.FORMAT


class FedTAN(Strategy):
    """FedTAN around any Flower strategy: its first local step(s) use the pooled batch's
    BatchNorm statistics, and BatchNorm buffers always take the pooled aggregate.

    Each round: the wrapped strategy's ``configure_train`` chooses the nodes and the config;
    ``2L`` exchanges (one per BatchNorm call forward and backward) drive each of the
    ``sync_steps`` synchronised steps, and the clients return their models with the last
    (``2L * sync_steps + 1`` exchanges a round). The wrapped strategy's ``aggregate_train``
    aggregates the *parameters* (FedAvg, FedAdam, FedAvgM, a DP wrapper...); FedTAN sets the
    BatchNorm *buffers* to the pooled aggregate, which the wrapped strategy never sees (its
    state, e.g. FedAdam's moments, covers parameters only). Evaluation is the wrapped
    strategy's, unchanged.

    Failing clients (dropped with the reason in ``dropped[round][node]``, the step restarts
    without them), nodes that fail round after round (they sit out) and the clients'
    weights: docs/protocol.md ("How a round runs"); seeding, checkpoints and
    ``start(..., resume_from=...)``: docs/strategies.md. The options from ``sync_steps`` on
    are attributes too, checked as here, taking effect from the next round.

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
        Seconds between two pulls of replies (Flower's ``send_and_receive`` sleeps 3 s in deployment).
    seed : int (default: 0)
        Seeds node sampling and the clients' batch sampling.
    client_weight : str (default: "synchronised")
        ``"synchronised"``: a client's averaging weight is the number of examples it
        synchronised with (a model reported with another ``num-examples`` is dropped);
        ``"reported"``: the ``num-examples`` it reports.
    uniform_positions : bool (default: True)
        Require every client to have the same values per example at each BatchNorm call
        (same input size). Set ``False`` for models fed inputs of varying size.
    is_buffer : Callable[[str], bool], optional
        Which array keys are BatchNorm buffers (default: the ``state_dict`` suffixes of
        ``torch.nn.BatchNorm*``, ``running_mean``, ``running_var`` and
        ``num_batches_tracked``): the server needs no model and no torch.
    quarantine_after : int or None (default: 2)
        Consecutive failed rounds before a node sits out; ``None`` never benches a node.
    max_quarantine_rounds : int (default: 8)
        Longest time out, in rounds.
    checkpoint_dir : str or PathLike, optional
        Where to write ``round-NNNNN.fedtan-ckpt`` after every round (none by default).
    keep_checkpoints : int (default: 2)
        Checkpoints kept in ``checkpoint_dir`` (older ones are deleted); 0 keeps all.
    max_growth : float (default: 1e6)
        A client's returned model may reach ``max_growth`` times the largest magnitude of
        each array of the global model it was sent (at least 1; squared for running
        variances); a client beyond it is left out of the average and charged.
    secure_stats : bool (default: False)
        Secure aggregation of the BatchNorm statistics (:mod:`flwr_fedtan.secure`, one more
        exchange a round, the statistics pass masked alike): an honest-but-curious server
        learns only the sums over clients (and each client's batch size); a malicious
        server is out of scope (docs/security.md, "What FedTAN trusts"). The returned models
        stay in the clear unless ``secure_models``.
    secure_models : bool (default: False)
        Secure aggregation of the returned models, with or without ``secure_stats``: the
        server learns only their weighted average and total weight ``W``, which the wrapped
        strategy gets as one reply per client of weight ``W / K`` (docs/security.md); one
        that needs individual updates (server-side DP, robust aggregation) is refused here.
    statistics : {"exact", "running"} (default: "exact")
        The BatchNorm statistics of the global model. ``"exact"``: after aggregation the
        round's clients run a statistics pass over the new global model
        (:mod:`flwr_fedtan.exact_statistics`, ``L + 1`` more exchanges): precise-BN on the
        union of their examples. ``"running"``: the pooled aggregate of the running averages
        the clients collected during the round. If the pass fails (too few clients left),
        the round keeps the aggregated statistics, logged.
    statistics_examples : int (default: 256)
        Examples each client forwards in the pass (all of its data if it has fewer).
    statistics_every : int (default: 1)
        Run the pass every this many rounds, and always after the last round.
    progress_interval : float or None (default: 30.0)
        At most one INFO line per exchange every this many seconds, besides the first and
        last exchange of a round (0: every exchange; ``None``: none), and one summary line
        per round and per statistics pass; the figures are in the round's train metrics
        either way (docs/protocol.md, "Progress of a long round").

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
        secure_models: bool = False,
        statistics: str = "exact",
        statistics_examples: int = DEFAULT_STATISTICS_EXAMPLES,
        statistics_every: int = 1,
        max_growth: float = DEFAULT_MAX_GROWTH,
        progress_interval: Optional[float] = DEFAULT_PROGRESS_INTERVAL,
    ) -> None:
        strategy = wrapped_strategy(strategy, dict(zip(FEDAVG_OPTIONS, (
            fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes,
            weighted_by_key, arrayrecord_key, configrecord_key, train_metrics_aggr_fn, evaluate_metrics_aggr_fn,
        ))))
        check_options(dict(
            sync_steps=sync_steps, exchange_timeout=exchange_timeout, max_restarts=max_restarts,
            poll_interval=poll_interval, seed=seed, client_weight=client_weight, quarantine_after=quarantine_after,
            max_quarantine_rounds=max_quarantine_rounds, keep_checkpoints=keep_checkpoints, secure_stats=secure_stats,
            secure_models=secure_models,
            max_growth=max_growth, progress_interval=progress_interval, statistics=statistics,
            statistics_examples=statistics_examples, statistics_every=statistics_every,
        ))
        if secure_models:
            check_secure_models_composes(strategy)
        self.strategy = strategy
        self.is_buffer = is_buffer or is_batchnorm_buffer
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.keep_checkpoints = keep_checkpoints
        self.statistics = statistics
        self.statistics_every = int(statistics_every)
        # One object for the options the drivers read: setting one of FedTAN's attributes
        # below after construction reaches the next round and the next statistics pass.
        self.options = RoundOptions(
            sync_steps=sync_steps, exchange_timeout=exchange_timeout, poll_interval=poll_interval,
            max_restarts=max_restarts, seed=seed, uniform_positions=uniform_positions, max_growth=max_growth,
            secure_stats=secure_stats, examples=statistics_examples, progress_interval=progress_interval,
            secure_models=secure_models, client_weight=client_weight,
        )
        self.driver = RoundDriver(self.options)
        self._statistics_pass = StatisticsPassDriver(self.options)
        self.quarantine = Quarantine(quarantine_after, max_quarantine_rounds)
        self._grid: Optional[Grid] = None
        self._num_rounds: Optional[int] = None
        # Why nodes were dropped, by round: {server_round: {node_id: reason}}.
        self.dropped: dict[int, dict[int, str]] = {}
        self._round: Optional[TrainRound] = None
        self._resumed_through = 0

    sync_steps = forwarded("options", "sync_steps")
    exchange_timeout = forwarded("options", "exchange_timeout")
    max_restarts = forwarded("options", "max_restarts")
    poll_interval = forwarded("options", "poll_interval")
    seed = forwarded("options", "seed")
    uniform_positions = forwarded("options", "uniform_positions")
    max_growth = forwarded("options", "max_growth")
    secure_stats = forwarded("options", "secure_stats")
    secure_models = forwarded("options", "secure_models", check=lambda fedtan, on: (
        check_secure_models_composes(fedtan.strategy) if on else None))
    client_weight = forwarded("options", "client_weight")
    progress_interval = forwarded("options", "progress_interval")
    statistics_examples = forwarded("options", "statistics_examples", "examples")
    quarantine_after = forwarded("quarantine", "quarantine_after", "after")
    max_quarantine_rounds = forwarded("quarantine", "max_quarantine_rounds", "max_rounds")

    @property
    def weighted_by_key(self) -> str:
        """The wrapped strategy's weighting key (``num-examples`` by default)."""
        return str(find_attribute(self.strategy, "weighted_by_key", "num-examples"))

    @property
    def arrayrecord_key(self) -> str:
        """The key under which the wrapped strategy expects the clients' arrays."""
        return str(find_attribute(self.strategy, "arrayrecord_key", "arrays"))

    @property
    def min_train_nodes(self) -> int:
        """Fewest clients a synchronised step may run with (the wrapped strategy's, >= 1)."""
        return max(1, int(find_attribute(self.strategy, "min_train_nodes", 1) or 1))

    failures = forwarded("quarantine", "failures")  # each repeat offender's FailureRecord, by node

    def round_seed(self, server_round: int, attempt: int) -> int:
        """The seed of the clients' batches in ``(round, attempt)``, before each mixes in its own
        key (each derives it from the run seed: :func:`flwr_fedtan.seeds.round_seed`)."""
        return self.driver.round_seed(server_round, attempt)

    def summary(self) -> None:
        """Log the strategy's settings, then the wrapped strategy's."""
        log_summary(self)

    # ------------------------------------------------------------------ Flower's loop
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Optional[Callable[[int, ArrayRecord], Optional[MetricRecord]]] = None,
        *,
        resume_from: Optional[str | os.PathLike] = None,
    ) -> Result:
        """Run ``num_rounds`` rounds with Flower's own round loop (``Strategy.start``).

        ``timeout`` bounds each evaluation exchange; training exchanges use ``exchange_timeout``.
        Each round's costs are in its train metrics (``Result.train_metrics_clientapp``).

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
            evaluate_fn = checkpoint.evaluate_after(done, evaluate_fn)
        # FedTAN runs inside Flower's round loop: the Grid it hands the loop turns each
        # round's train messages (from configure_train) into FedTAN's exchanges.
        result = super().start(ExchangeGrid(grid, self.run_round), initial_arrays, num_rounds, timeout,
                               train_config, evaluate_config, evaluate_fn)
        if not len(result.arrays):  # every round skipped: the global model is still the initial one
            result.arrays = initial_arrays
        return result

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's ``configure_train`` on the parameters, turned into the
        round's first FedTAN exchange (its arrays plus the global BatchNorm buffers)."""
        if server_round <= self._resumed_through:
            log(INFO, "FedTAN: round %d was completed before the checkpoint", server_round)
            return []
        self._grid = inner = getattr(grid, "inner", grid)
        params = ArrayRecord({k: v for k, v in arrays.items() if not self.is_buffer(k)})
        with sampling_seed(derive_seed(self.seed, server_round)):
            messages = [m for m in self.strategy.configure_train(server_round, params, config, inner)
                        if not self.quarantine.benched(m.metadata.dst_node_id, server_round)]
        contents = begin_contents(self.strategy, messages, arrays, self.is_buffer, lambda model, node_config: (
            wire.encode_begin(model, node_config, server_round, self.sync_steps, self.seed)))
        ledger = new_round_ledger(server_round, self.progress_interval)
        self.dropped[server_round] = ledger.dropped
        self._round = TrainRound(server_round, {k: v.numpy() for k, v in arrays.items()}, contents, ledger)
        return [
            Message(content=content, dst_node_id=node, message_type=wire.MESSAGE_TYPE)
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
        ledger = round_.ledger
        contributions, metrics, merged = aggregate_round(
            self.strategy, server_round, round_, replies, weight_key=self.weighted_by_key,
            arrayrecord_key=self.arrayrecord_key, is_buffer=self.is_buffer, max_growth=self.max_growth,
            client_weight=self.client_weight,
        )
        if merged is None:
            self.quarantine.update(server_round, round_.contents, ledger.dropped, completed=bool(contributions))
            # The failure records changed; the model did not.
            self._checkpoint(server_round, ArrayRecord({k: Array(v) for k, v in round_.reference.items()}))
            return None, skipped_round(round_)
        metrics = MetricRecord() if metrics is None else metrics
        if self.statistics == "exact" and self._grid is not None and pass_due(
            server_round, self.statistics_every, self._num_rounds
        ):
            merged = run_pass(self._statistics_pass, self._grid, sorted(contributions), merged, server_round,
                              metrics, ledger.dropped)
        self.quarantine.update(server_round, round_.contents, ledger.dropped, completed=True)
        metrics.update(round_summary(round_, len(contributions)))
        self._checkpoint(server_round, merged)
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
            return self.strategy.aggregate_evaluate(server_round, canonical_replies(replies))
        except Exception as error:  # pylint: disable=broad-except
            log(WARNING, "Round %d: %s.aggregate_evaluate failed (%s: %s), evaluation metrics left out",
                server_round, type(self.strategy).__name__, type(error).__name__, brief(str(error)))
            return None

    # ------------------------------------------------------------------ the exchanges
    def run_round(self, grid: Grid, messages: list[Message]) -> list[Message]:
        """Drive the synchronised step(s) from the round's first messages; return the
        clients' final replies (empty if the round is skipped)."""
        round_ = self._round
        if round_ is None or not messages:
            return []
        participants = sorted(m.metadata.dst_node_id for m in messages)
        return self.driver.run(grid, round_, participants, self.min_train_nodes, self.weighted_by_key)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, server_round: int, arrays: ArrayRecord) -> None:
        if self.checkpoint_dir is not None:
            self.save_checkpoint(self.checkpoint_dir, server_round, arrays)

    def save_checkpoint(self, path: str | os.PathLike, server_round: int, arrays: ArrayRecord) -> Path:
        """Write the state after ``server_round`` (atomically) in the folder ``path``
        (``round-NNNNN.fedtan-ckpt``); return the file. It holds the global arrays, the
        wrapped strategy's plain-data state (e.g. FedAdam's ``m_t``, ``v_t``), FedTAN's
        failure records and seed; no pickle, private files (:mod:`flwr_fedtan.checkpoint`)."""
        return checkpoint.save_run(Path(path), server_round, arrays, self.strategy, self.seed, self.failures,
                                   self.keep_checkpoints)

    def load_checkpoint(self, path: str | os.PathLike) -> tuple[int, ArrayRecord]:
        """Restore the state of a checkpoint (a file, or a folder: the one of the highest
        round number); return its round and global arrays."""
        server_round, arrays, self.failures = checkpoint.load_run(Path(path), self.strategy, self.seed)
        return server_round, arrays
