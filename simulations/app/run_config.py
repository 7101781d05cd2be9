"""The app's run config checked whole before the first round: one message, every problem
and its fix.

:func:`run_config_problems` lists what is wrong with a run config (the keys of
``[tool.flwr.app.config]`` in ``pyproject.toml``, as ``flwr run --run-config`` overrides
them): types, ranges, names, and combinations such as ``sync-steps`` > ``local-steps``;
:func:`check_run_config` raises :class:`~flwr_fedtan.errors.InvalidArgumentsError`
listing them. The ServerApp calls it before it builds anything, so a misconfigured run
stops at once, on the server, instead of failing later in every client.
"""

from __future__ import annotations

from typing import Any, Mapping

from flwr_fedtan.arguments import ArgumentChecks
from flwr_fedtan.errors import ArgumentProblem
from flwr_fedtan.devices import device_problem
from flwr_fedtan.exact_statistics import STATISTICS_MODES

from .baselines import METHODS
from .datasets import DATASET_SPECS, parse_sources
from .models import MODEL_NAMES, TIMM_PREFIX
from .partitions import PARTITION_SCHEMES

__all__ = ["check_run_config", "run_config_problems"]

MODES = ("train", "bench", "bench-deployment", "bench-scale", "bench-secure", "legacy-fedavg", "legacy-secaggplus")
"""Values of ``mode`` (``bench-deployment`` may carry a suffix, ``bench-deployment-<x>``)."""

SECURE_METHODS = ("fedtan", "fedavg-exact")
"""Methods whose BatchNorm statistics ``secure-stats`` protects."""

SERVER_OPTIMIZER_METHODS = ("fedtan", "fedavg", "fedavg-exact", "fedgn", "centralised")
"""Methods a ``server-optimizer`` other than ``none`` applies to (the others keep BatchNorm
entries out of the aggregation, which Flower's optimisers do not support)."""

# (key, minimum) of the whole-number keys; a key absent from the run config is not checked.
_INTEGERS = (("num-server-rounds", 1), ("local-steps", 1), ("batch-size", 1), ("classes-per-client", 1),
             ("num-partitions", 1), ("seed", None), ("sync-steps", 1), ("statistics-examples", 1),
             ("statistics-every", 1), ("bench-rounds", 1), ("torch-threads", 0))
_FIXES = {
    "num-server-rounds": "give the number of rounds, >= 1",
    "local-steps": "give the optimiser steps per round, >= 1 (and >= sync-steps)",
    "batch-size": "give the samples per client and step, >= 1",
    "sync-steps": "give the synchronised steps per round, >= 1 (and <= local-steps)",
    "statistics-examples": "give the training examples per client of the statistics pass, >= 1",
    "statistics-every": "give a whole number >= 1 (1: a statistics pass after every round)",
    "torch-threads": "give torch's intra-op threads per client, >= 1 (0: leave torch's own setting)",
}


def run_config_problems(config: Mapping[str, Any]) -> list[ArgumentProblem]:
    """Every problem of the run config, each with its fix (empty: it can run)."""
    checks = ArgumentChecks("run config")
    for key, minimum in _INTEGERS:
        if key in config:
            checks.integer(key, config[key], minimum, fix=_FIXES.get(key))
    _check_numbers(checks, config)
    _check_names(checks, config)
    for key in ("secure-stats", "secure-models"):
        if key in config:
            checks.boolean(key, config[key])
    if "device" in config:
        problem = device_problem(str(config["device"]))
        if problem is not None:
            # The server evaluates on this device too; in simulation the clients share its machine.
            checks.add("device", config["device"], *problem)
    _check_combinations(checks, config)
    return checks.problems


def check_run_config(config: Mapping[str, Any]) -> None:
    """Raise :class:`~flwr_fedtan.errors.InvalidArgumentsError` listing every problem
    :func:`run_config_problems` finds."""
    checks = ArgumentChecks("run config (flwr run --run-config / [tool.flwr.app.config])")
    checks.problems.extend(run_config_problems(config))
    checks.raise_if_any()


def _check_numbers(checks: ArgumentChecks, config: Mapping[str, Any]) -> None:
    ranges: dict[str, dict[str, Any]] = {
        "lr": dict(above=0, fix="give the clients' learning rate, > 0 (e.g. 0.05)"),
        "dirichlet-alpha": dict(above=0, fix="give the Dirichlet concentration, > 0 (small: more skew)"),
        "exchange-timeout": dict(above=0, fix="give the seconds the server waits for a reply, > 0"),
        "progress-interval": dict(at_least=0, fix="give the seconds between two per-exchange progress lines of "
                                  "the ServerApp log, >= 0 (0: a line for every exchange)"),
        "fixbn-switch": dict(at_least=0, at_most=1, fix="give the fraction of rounds before FixBN freezes, in [0, 1]"),
        "server-learning-rate": dict(above=0),
        "server-momentum": dict(at_least=0, below=1),
        "server-eta": dict(above=0),
        "server-beta1": dict(at_least=0, below=1),
        "server-beta2": dict(at_least=0, below=1),
        "server-tau": dict(above=0),
    }
    for key, bounds in ranges.items():
        if key in config:
            checks.number(key, config[key], **bounds)


def _check_names(checks: ArgumentChecks, config: Mapping[str, Any]) -> None:
    if "strategy" in config:
        checks.choice("strategy", config["strategy"], tuple(METHODS))
    if "model" in config:
        model = config["model"]
        if not (isinstance(model, str) and (model in MODEL_NAMES or model.startswith(TIMM_PREFIX))):
            checks.add("model", model, f"must be one of {', '.join(map(repr, MODEL_NAMES))}",
                       f"choose one of them, or {TIMM_PREFIX}<name> for a timm model")
    if "dataset" in config:
        checks.choice("dataset", config["dataset"], tuple(DATASET_SPECS))
    if "partitioning" in config:
        checks.choice("partitioning", config["partitioning"], PARTITION_SCHEMES)
    if "server-optimizer" in config:
        from .server_app import SERVER_OPTIMIZERS  # the ServerApp imports this module

        value = config["server-optimizer"]
        checks.choice("server-optimizer", value.lower() if isinstance(value, str) else value, SERVER_OPTIMIZERS)
    if "statistics" in config:
        checks.choice("statistics", config["statistics"], STATISTICS_MODES,
                      fix="'exact' (the statistics pass after aggregation) or 'running'")
    if "mode" in config:
        mode = config["mode"]
        if not (isinstance(mode, str) and (mode in MODES or mode.startswith("bench-deployment"))):
            checks.add("mode", mode, f"must be one of {', '.join(map(repr, MODES))}", "choose one of them")
    if config.get("data-sources"):
        try:
            parse_sources(str(config["data-sources"]), "data-sources")
        except ValueError as error:
            checks.add("data-sources", config["data-sources"], str(error), "leave it empty for every source")


def _check_combinations(checks: ArgumentChecks, config: Mapping[str, Any]) -> None:
    def valid_integer(key: str) -> bool:
        value = config.get(key)
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    strategy = config.get("strategy", "fedtan")
    if strategy == "fedtan" and valid_integer("sync-steps") and valid_integer("local-steps") \
            and config["sync-steps"] > config["local-steps"]:
        checks.add("sync-steps", config["sync-steps"], f"exceeds local-steps={config['local-steps']}",
                   "set sync-steps <= local-steps (the synchronised steps are the first of the round's steps)")
    if config.get("secure-stats") is True and strategy in METHODS and strategy not in SECURE_METHODS:
        checks.add("secure-stats", True, f"strategy={strategy!r} has no statistics to protect",
                   f"use strategy {' or '.join(map(repr, SECURE_METHODS))}, or secure-stats=false")
    if config.get("secure-models") is True and strategy in METHODS and strategy != "fedtan":
        checks.add("secure-models", True, f"strategy={strategy!r} returns the models in the clear",
                   "use strategy 'fedtan', or secure-models=false")
    optimizer = config.get("server-optimizer", "none")
    if strategy in METHODS and strategy not in SERVER_OPTIMIZER_METHODS:
        if isinstance(optimizer, str) and optimizer.lower() != "none":
            checks.add("server-optimizer", optimizer,
                       f"not available with strategy={strategy!r}: its server keeps BatchNorm entries out of "
                       "the aggregation", "use server-optimizer='none', or strategy fedtan, fedavg or fedgn")
    if str(config.get("model", "")) == "mlp" and config.get("dataset") in DATASET_SPECS:
        spec = DATASET_SPECS[config["dataset"]]
        if (spec.height, spec.width) != (28, 28):
            checks.add("model", "mlp", f"the MLP takes 28x28 images; dataset {config['dataset']!r} has "
                       f"{spec.height}x{spec.width}", "use a convolutional model (cnn, resnet20, vgg) for it")
