"""Exact BatchNorm statistics for any Flower strategy's model: the statistics pass.

No torch here. After a round's aggregation the round's clients run a forward-only
synchronised pass over the new global model (:mod:`flwr_fedtan.protocol.pass_driver`, ``L + 1``
exchanges), and the global ``running_mean``/``running_var`` become the pooled means and
unbiased pooled variances of their examples: precise-BN on the union of the clients'
examples, computed by the server from the pools alone.

- :class:`~flwr_fedtan.protocol.pass_driver.StatisticsPassDriver`: runs one pass on a Grid
  (drops, restarts, secure statistics); used by :class:`~flwr_fedtan.FedTAN`
  (``statistics="exact"``) and by :class:`ExactStatistics`.
- :class:`ExactStatistics`: the same for any other Flower strategy (``FedAvg``, ``FedAdam``,
  a DP wrapper...): training stays the wrapped strategy's, unmodified; the clients answer
  the pass through :func:`~flwr_fedtan.add_fedtan`'s handler.
"""

from __future__ import annotations

import dataclasses
from logging import INFO
from typing import Any, Callable, Iterable, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from .arguments import ArgumentChecks
from .protocol.pass_driver import (
    DEFAULT_STATISTICS_EXAMPLES,
    PassOptions,
    PassOutcome,
    StatisticsPassDriver,
    pass_seed,
)

__all__ = [
    "STATISTICS_CHECKS",
    "STATISTICS_MODES",
    "DEFAULT_STATISTICS_EXAMPLES",
    "ExactStatistics",
    "PassOptions",
    "PassOutcome",
    "StatisticsPassDriver",
    "apply_buffers",
    "check_statistics_options",
    "pass_due",
    "run_pass",
    "pass_seed",
]

STATISTICS_MODES = ("exact", "running")
"""``"exact"``: the statistics pass; ``"running"``: the running averages the clients
collected during the round, aggregated (FedTAN's behaviour before the pass existed)."""

_PASS_OPTIONS = tuple(f.name for f in dataclasses.fields(PassOptions) if f.name != "examples")


def pass_due(server_round: int, every: int, num_rounds: Optional[int]) -> bool:
    """Whether the pass runs after ``server_round``: every ``every`` rounds, and always
    after the last round (``num_rounds``)."""
    return server_round % every == 0 or (num_rounds is not None and server_round >= num_rounds)


STATISTICS_CHECKS: dict[str, Callable[[ArgumentChecks, Any], object]] = {
    "statistics": lambda checks, value: checks.choice(
        "statistics", value, STATISTICS_MODES,
        fix="'exact' (the statistics pass after aggregation) or 'running' (averaged running statistics)"),
    "statistics_examples": lambda checks, value: checks.integer(
        "statistics_examples", value, 1, fix="give the training examples per client of the pass, >= 1"),
    "statistics_every": lambda checks, value: checks.integer(
        "statistics_every", value, 1, fix="give a whole number >= 1 (1: a pass after every round)"),
}
"""How each statistics option is checked (:class:`~flwr_fedtan.arguments.ArgumentChecks`)."""


def check_statistics_options(statistics: str, examples: int, every: int,
                             checks: Optional[ArgumentChecks] = None) -> None:
    """Refuse invalid statistics options with the fix (all of them in one error); with
    ``checks``, add the problems to it instead of raising."""
    own = checks is None
    checks = ArgumentChecks("statistics options") if checks is None else checks
    for name, value in zip(STATISTICS_CHECKS, (statistics, examples, every)):
        STATISTICS_CHECKS[name](checks, value)
    if own:
        checks.raise_if_any()


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
    **pass_options
        The pass's other options, defaults and meaning as in
        :class:`~flwr_fedtan.protocol.pass_driver.PassOptions`: ``exchange_timeout``,
        ``poll_interval``, ``max_restarts``, ``seed``, ``secure_stats``,
        ``uniform_positions``, ``min_clients``, ``max_growth``, ``progress_interval``.

    Per-round costs are added to the round's train metrics (``fedtan-stats-*``).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        statistics_examples: int = DEFAULT_STATISTICS_EXAMPLES,
        statistics_every: int = 1,
        **pass_options: Any,
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a flwr.serverapp.strategy.Strategy, got {type(strategy).__name__}")
        if type(strategy).__name__ == "FedTAN":
            raise ValueError("FedTAN runs the statistics pass itself: use FedTAN(statistics='exact')")
        unknown = sorted(set(pass_options) - set(_PASS_OPTIONS))
        if unknown:
            raise TypeError(f"ExactStatistics got unknown options {unknown}: the pass's options are "
                            f"statistics_examples, statistics_every, {', '.join(_PASS_OPTIONS)}")
        check_statistics_options("exact", statistics_examples, statistics_every)
        self.strategy = strategy
        self.statistics_every = int(statistics_every)
        self.driver = StatisticsPassDriver(PassOptions(examples=statistics_examples, **pass_options))
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


def run_pass(driver: StatisticsPassDriver, grid: Grid, nodes: list[int], arrays: ArrayRecord, server_round: int,
             metrics: MetricRecord, dropped: dict[int, str]) -> ArrayRecord:
    """A FedTAN round's statistics pass over its aggregated ``arrays``: returns them with the
    pass's buffers (unchanged if it failed); its metrics go into ``metrics`` and the nodes it
    dropped into the round's ``dropped`` (``"statistics pass: <why>"``, after the round's own)."""
    outcome = driver.run(grid, nodes, arrays, server_round)
    metrics.update(outcome.metrics())
    for node, why in outcome.dropped.items():
        dropped.setdefault(node, f"statistics pass: {why}")
    return apply_buffers(arrays, outcome.buffers)
