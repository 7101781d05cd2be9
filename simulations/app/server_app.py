"""The app's ServerApp: FedTAN or a baseline, with test accuracy and traffic per round.

The run-config key ``strategy`` picks the method (see :data:`simulations.app.baselines.METHODS`):
``fedtan``, ``fedavg`` (Flower's FedAvg, unmodified), ``fedbn``, ``silobn``, ``fixbn``,
``fedgn`` and ``centralised``; ``server-optimizer`` (``none``, ``fedavgm``, ``fedadam``,
``fedyogi``, ``fedadagrad``) adds a server optimiser
(:func:`server_optimizer`). :func:`make_strategy` maps it to a Strategy,
:func:`run_experiment` runs it on any Grid and returns a JSON-ready summary, which
:func:`main` writes to ``results-file`` (with the final model next to it, ``.pt``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, Result, Strategy

from flwr_fedtan import FedTAN, convert_batchnorm
from flwr_fedtan.client import evaluate_model
from flwr_fedtan.exact_statistics import DEFAULT_STATISTICS_EXAMPLES, ExactStatistics
from flwr_fedtan.progress import DEFAULT_PROGRESS_INTERVAL
from flwr_fedtan.protocol.wire import record_bytes
from flwr_fedtan.strategy import ForwardingGrid

from .baselines import (
    FedBN,
    FixBN,
    SiloBN,
    equal_weight_metrics,
    fixbn_switch_round,
    method_spec,
    model_norm,
)
from .run_config import check_run_config
from .secaggplus import LEGACY_MODES, run_legacy
from .task import model_from_config, test_dataset

app = ServerApp()
log = logging.getLogger(__name__)



def make_evaluate_fn(config, norm: Optional[str] = None):
    """Centralised evaluation of the global model on the test set.

    ``norm`` defaults to the model norm of the run config's method.
    """
    model = model_from_config(config, norm=norm or (model_norm(config) if "strategy" in config else "bn"))
    device = torch.device(str(config.get("device", "cpu")))
    model.to(device)
    data = test_dataset(config)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy, _ = evaluate_model(model, data, torch.nn.functional.cross_entropy, device)
        return MetricRecord({"test-loss": loss, "test-accuracy": accuracy})

    return evaluate


SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
"""Values of the run-config key ``server-optimizer``."""

SERVER_OPTIMIZER_DEFAULTS: dict[str, Any] = {
    "server-optimizer": "none",
    "server-learning-rate": 1.0,  # FedAvgM: server_learning_rate
    "server-momentum": 0.9,  # FedAvgM: server_momentum
    "server-eta": 0.01,  # FedAdam, FedYogi, FedAdagrad: eta (server step size)
    "server-beta1": 0.9,  # FedAdam, FedYogi: beta_1
    "server-beta2": 0.99,  # FedAdam, FedYogi: beta_2
    "server-tau": 0.001,  # FedAdam, FedYogi, FedAdagrad: tau (adaptivity)
}
"""The server optimiser's run-config keys and the values used when a key is absent."""


def server_optimizer(config: Mapping[str, Any], **fedavg_kwargs: Any) -> FedAvg:
    """Flower's strategy for the run config's ``server-optimizer``, unmodified.

    ``none``: :class:`FedAvg`; ``fedavgm``: :class:`FedAvgM` (``server-learning-rate``,
    ``server-momentum``); ``fedadam``, ``fedyogi``: :class:`FedAdam`, :class:`FedYogi`
    (``server-eta``, ``server-beta1``, ``server-beta2``, ``server-tau``); ``fedadagrad``:
    :class:`FedAdagrad` (``server-eta``, ``server-tau``). Absent keys take
    :data:`SERVER_OPTIMIZER_DEFAULTS`. ``fedavg_kwargs`` go to the strategy (sampling).

    Raises
    ------
    ValueError
        For an unknown ``server-optimizer``.
    """
    def get(key: str) -> Any:
        return config.get(key, SERVER_OPTIMIZER_DEFAULTS[key])

    name = str(get("server-optimizer")).lower()
    if name not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server-optimizer {name!r}; choose from {SERVER_OPTIMIZERS}")
    if name == "none":
        return FedAvg(**fedavg_kwargs)
    if name == "fedavgm":
        return FedAvgM(**fedavg_kwargs, server_learning_rate=float(get("server-learning-rate")),
                       server_momentum=float(get("server-momentum")))
    adaptive = dict(eta=float(get("server-eta")), tau=float(get("server-tau")))
    if "lr" in config:
        adaptive["eta_l"] = float(config["lr"])  # the clients' step size (Flower only logs it)
    if name == "fedadagrad":
        return FedAdagrad(**fedavg_kwargs, **adaptive)
    betas = dict(beta_1=float(get("server-beta1")), beta_2=float(get("server-beta2")))
    return (FedAdam if name == "fedadam" else FedYogi)(**fedavg_kwargs, **adaptive, **betas)


def make_strategy(config) -> Strategy:
    """The strategy named by the run config's ``strategy`` (and ``server-optimizer``).

    With :data:`simulations.app.baselines.METHODS` (which also fixes each method's model norm,
    see :func:`simulations.app.baselines.model_norm`) the one place that maps a method name to
    what the server runs. ``server-optimizer`` (see :func:`server_optimizer`) applies to
    ``fedtan`` (wrapped: parameters through the optimiser, BatchNorm buffers pooled),
    ``fedavg``, ``fedgn`` and ``centralised`` (Flower's optimiser, unmodified).

    Raises
    ------
    ValueError
        ``server-optimizer`` with FedBN, SiloBN or FixBN (their servers keep entries out of
        the aggregation, which Flower's optimisers do not support).
    """
    name = str(config["strategy"])
    spec = method_spec(name)
    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2)
    optimizer = str(config.get("server-optimizer", "none")).lower()
    statistics = dict(statistics_examples=int(config.get("statistics-examples", DEFAULT_STATISTICS_EXAMPLES)),
                      statistics_every=int(config.get("statistics-every", 1)))
    exchanges = dict(exchange_timeout=float(config.get("exchange-timeout", 120.0)), seed=int(config.get("seed", 0)),
                     secure_stats=bool(config.get("secure-stats", False)))
    if name == "fedtan":
        return FedTAN(strategy=server_optimizer(config, **common), sync_steps=int(config.get("sync-steps", 1)),
                      statistics=str(config.get("statistics", "exact")),
                      progress_interval=float(config.get("progress-interval", DEFAULT_PROGRESS_INTERVAL)),
                      secure_models=bool(config.get("secure-models", False)), **statistics, **exchanges)
    if name == "fedavg-exact":
        return ExactStatistics(server_optimizer(config, **common), **statistics, **exchanges)
    if name in ("fedavg", "fedgn"):
        return server_optimizer(config, **common)
    if name == "centralised":
        return server_optimizer(config, fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1,
                                min_available_nodes=1)
    if optimizer != "none":
        raise ValueError(
            f"server-optimizer={optimizer!r} is not available with strategy={name!r}: its server keeps "
            "BatchNorm entries out of the aggregation; use server-optimizer='none' or fedtan/fedavg/fedgn"
        )
    model = model_from_config(config, norm=spec.norm)
    if name == "fixbn":
        return FixBN(model, fixbn_switch_round(config), **common)
    federated_evaluation = dict(common, fraction_evaluate=1.0, min_evaluate_nodes=2,
                                evaluate_metrics_aggr_fn=equal_weight_metrics)
    if name == "fedbn":
        return FedBN(model, **federated_evaluation)
    if name == "silobn":
        return SiloBN(model, **federated_evaluation)
    raise ValueError(f"strategy {name!r} has no server strategy")  # pragma: no cover


# ---------------------------------------------------------------------- traffic
class CountingGrid(ForwardingGrid):
    """A Grid that forwards everything to another and counts the traffic.

    An *exchange* is one batch of messages pushed (``push_messages`` or
    ``send_and_receive``); messages are ``train`` or ``evaluate`` by their type's category.
    ``bytes-down`` counts server -> clients, ``bytes-up`` the replies pulled (error
    replies count 0 bytes).
    """

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.counts: dict[str, float] = {}
        self._category_of: dict[str, str] = {}

    @staticmethod
    def _category(message: Message) -> str:
        return message.metadata.message_type.split(".")[0]

    def _add(self, key: str, value: float) -> None:
        self.counts[key] = self.counts.get(key, 0) + value

    def _count_out(self, messages: list[Message]) -> Optional[str]:
        if not messages:
            return None
        category = self._category(messages[0])
        self._add(f"{category}-exchanges", 1)
        self._add(f"{category}-messages", len(messages))
        self._add(f"{category}-bytes-down", sum(record_bytes(m.content) for m in messages))
        return category

    def _count_in(self, replies: Iterable[Message], category: Optional[str] = None) -> list[Message]:
        replies = list(replies)
        for reply in replies:
            kind = category or self._category_of.pop(reply.metadata.reply_to_message_id, None) or self._category(reply)
            self._add(f"{kind}-replies", 1)
            if not reply.has_error():
                self._add(f"{kind}-bytes-up", record_bytes(reply.content))
        return replies

    # Grid API: what changes is counted, the rest is forwarded ------------------------------
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Forwarded; counted."""
        messages = list(messages)
        category = self._count_out(messages)
        ids = list(self.inner.push_messages(messages))
        for message_id in ids:
            if message_id and category:
                self._category_of[message_id] = category
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Forwarded; counted."""
        return self._count_in(self.inner.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        """Forwarded; counted."""
        messages = list(messages)
        category = self._count_out(messages)
        return self._count_in(self.inner.send_and_receive(messages, timeout=timeout), category)


class RoundRecorder:
    """The ``evaluate_fn`` given to a strategy: test metrics and traffic per round.

    Strategies call it before round 1 (round 0) and after each round's training and
    federated evaluation, so the traffic counted since the previous call is the round's.

    Parameters
    ----------
    grid : CountingGrid
        The Grid the strategy runs on.
    evaluate_fn : Callable[[int, ArrayRecord], MetricRecord], optional
        Centralised evaluation of the global model, in every round (or only in round 0
        with ``initial_only``).
    initial_only : bool
        Evaluate the global model in round 0 only (methods evaluated on the clients).
    """

    def __init__(self, grid: CountingGrid, evaluate_fn: Optional[Callable[[int, ArrayRecord], MetricRecord]],
                 initial_only: bool = False) -> None:
        self.grid = grid
        self.evaluate_fn = evaluate_fn
        self.initial_only = initial_only
        self.communication: dict[int, dict[str, float]] = {}
        self.seconds: dict[int, float] = {}
        self._last_counts: dict[str, float] = {}
        self._last_time = time.time()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> Optional[MetricRecord]:
        now = time.time()
        counts = dict(self.grid.counts)
        if server_round > 0:
            self.communication[server_round] = {
                k: v - self._last_counts.get(k, 0) for k, v in counts.items()
            }
            self.seconds[server_round] = now - self._last_time
        self._last_counts, self._last_time = counts, now
        if self.evaluate_fn is None or (self.initial_only and server_round > 0):
            return None
        return self.evaluate_fn(server_round, arrays)


def result_summary(result: Result, config, seconds: float, *, communication: Optional[dict] = None,
                   round_seconds: Optional[dict] = None) -> dict:
    """A JSON-ready digest of a run.

    Keys: ``config``; ``seconds`` (wall time of the strategy); ``method``; ``norm``;
    ``evaluation`` (``"server"`` or ``"federated"``); ``train`` and ``test``
    ({round: metrics}; ``test`` holds ``test-accuracy`` and ``test-loss`` of every round,
    from the server's evaluation or, for methods evaluated on the clients, from round 1
    on the clients' equal-weight average); ``test-server`` and ``test-clients`` (both
    sources as recorded); ``communication`` ({round: traffic counts, see
    :class:`CountingGrid`}); ``round-seconds``.
    """
    server = {r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()}
    clients = {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()}
    spec = method_spec(config) if "strategy" in config else None
    test = dict(server)
    if spec is not None and spec.evaluation == "federated":
        test.update(clients)
    return {
        "config": dict(config),
        "seconds": seconds,
        "method": None if spec is None else spec.name,
        "norm": None if spec is None else spec.norm,
        "evaluation": "server" if spec is None else spec.evaluation,
        "train": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
        "test": dict(sorted(test.items())),
        "test-server": server,
        "test-clients": clients,
        "communication": communication or {},
        "round-seconds": round_seconds or {},
    }


def run_experiment(grid: Grid, config: Mapping[str, Any], strategy: Optional[Strategy] = None
                   ) -> tuple[Result, dict]:
    """Run the run config's method on ``grid``; return Flower's Result and the summary.

    Parameters
    ----------
    grid : Grid
        Flower's Grid (or any Grid, e.g. an in-process one in tests).
    config : Mapping
        The run config (``strategy``, ``num-server-rounds``, ``lr``, ``local-steps``, ...).
    strategy : Strategy, optional
        Replaces :func:`make_strategy`'s choice (the model, evaluation and summary still
        follow ``config["strategy"]``).

    Returns
    -------
    Result, dict
        The strategy's result and :func:`result_summary`.
    """
    spec = method_spec(config)
    torch.manual_seed(int(config.get("seed", 0)))
    model = convert_batchnorm(model_from_config(config, norm=spec.norm))
    initial = ArrayRecord(model.state_dict())
    strategy = strategy if strategy is not None else make_strategy(config)
    counting = CountingGrid(grid)
    recorder = RoundRecorder(counting, make_evaluate_fn(config, spec.norm),
                             initial_only=spec.evaluation == "federated")
    started = time.time()
    result = strategy.start(
        grid=counting,
        initial_arrays=initial,
        num_rounds=int(config["num-server-rounds"]),
        train_config=ConfigRecord({"lr": float(config["lr"]), "local-steps": int(config["local-steps"]),
                                  "seed": int(config.get("seed", 0))}),
        evaluate_fn=recorder,
    )
    summary = result_summary(result, config, time.time() - started,
                             communication=recorder.communication, round_seconds=recorder.seconds)
    return result, summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured method; write the summary to ``results-file`` if given.

    The whole run config is checked first (:func:`simulations.app.run_config.check_run_config`):
    a misconfigured run stops here, with every problem and its fix, before any round.
    """
    config = context.run_config
    check_run_config(config)
    mode = str(config.get("mode", "train"))
    if mode == "bench":
        from ..bench_flower import run_exchange_benchmark

        initial = ArrayRecord(convert_batchnorm(model_from_config(config)).state_dict())
        result, summary = None, {"config": dict(config), "bench": run_exchange_benchmark(grid, config, initial)}
    elif mode == "bench-scale":
        from ..bench_scale import run_scale_benchmark

        initial = ArrayRecord(convert_batchnorm(model_from_config(config)).state_dict())
        result, summary = None, {"config": dict(config), "bench": run_scale_benchmark(grid, config, initial)}
    elif mode.startswith("bench-deployment"):
        from ..bench_deployment import run_deployment_benchmark

        initial = ArrayRecord(convert_batchnorm(model_from_config(config)).state_dict())
        result, summary = None, {"config": dict(config), "bench": run_deployment_benchmark(grid, config, initial)}
    elif mode == "bench-secure":
        from ..bench_secure import run_secure_benchmark

        initial = ArrayRecord(convert_batchnorm(model_from_config(config)).state_dict())
        result, summary = None, {"config": dict(config), "bench": run_secure_benchmark(grid, context, initial)}
    elif mode in LEGACY_MODES:
        torch.manual_seed(int(config.get("seed", 0)))  # the same initial model as run_experiment's
        initial = ArrayRecord(convert_batchnorm(model_from_config(config)).state_dict())
        legacy, summary = run_legacy(grid, context, initial)
        result = Result(arrays=legacy.arrays) if legacy.arrays is not None else None
    elif mode == "train":
        result, summary = run_experiment(grid, config)
    else:
        raise ValueError(f"unknown mode {mode!r}; choose 'train', a 'bench*' or a 'legacy-*' mode")
    out = str(config.get("results-file", "") or "")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(summary, indent=2, default=float))
        # The final global model, loadable into model_from_config(config, norm=model_norm(config)).
        if result is not None:
            torch.save(result.arrays.to_torch_state_dict(), Path(out).with_suffix(".pt"))
