"""Side-by-side experiments: methods x partitions x seeds, each a ``flwr run .``.

Example::

    python -m simulations.experiments.compare \\
        --methods fedtan,fedavg,fedbn,silobn,fixbn,fedgn,centralised \\
        --partitions pathological,dirichlet-0.1,dirichlet-0.5,iid --seeds 0,1 \\
        --rounds 30 --local-steps 5 --model cnn --dataset fashion-mnist \\
        --clients 5 --batch-size 32 --out results/NAME

A method may name a server optimiser (run-config ``server-optimizer``) after a ``+``:
``--methods fedtan,fedtan+fedadam,fedavg+fedadam,fedtan+fedavgm``; its hyper-parameters
are run-config keys (``--set server-eta=0.01``, see :func:`simulations.app.server_app.server_optimizer`).

Every run goes through the same code path as ``flwr run .`` (Flower simulation):
:func:`simulations.flower_processes.run_app` submits the app with ``--run-config``
overrides (``strategy``, ``partitioning``, ..., ``results-file``) to a private simulation
SuperLink and returns the JSON summary the server app wrote (see
:func:`simulations.app.server_app.result_summary`). Federated methods run on ``--clients``
SuperNodes; ``centralised`` on one SuperNode holding the union of the ``--clients``
partitions, drawing ``clients x batch-size`` samples per step.

Several configurations in one call: ``--variant NAME:KEY=VALUE,KEY=VALUE`` (repeatable)
runs the whole grid once per variant with those run-config overrides on top of the
common settings (e.g. ``--methods fedtan --variant sync1:sync-steps=1 --variant
sync5:sync-steps=5``); tables, curves and plots label each line ``method [NAME]``.

Resuming: a grid re-run skips every run whose summary is complete (test accuracy up to
the last round) and was made with the same run config; a missing, unreadable, partial or
mismatched one is moved aside (``*.json.old``) and run again. ``--dry-run`` prints the plan
(each run and whether it is complete) and runs nothing. Long grids in the background::

    nohup python -m simulations.experiments.compare ... --out results/NAME > results/NAME.log 2>&1 &

and the same command again, after an interruption, finishes the grid. One grid process
per output folder at a time (``--out`` is locked while it runs).

Outputs in ``--out``:

- ``runs/<partition>/<method>-seed<s>.json`` (``runs/<variant>/<partition>/...`` with
  variants; + ``.pt``, the final model): each run's summary, with the run's wall time
  (``wall-seconds``, Ray start-up included) and the final model's digest
  (``final-model-sha256``, see :func:`model_digest`) added. ``--force`` re-runs complete
  runs and says whether each reproduced its previous digest (``reproduced-previous``);
- ``results.csv`` and ``results.md``: one row per method x variant x partition, over
  seeds: final and best test accuracy (mean +/- sample std), rounds for the seed-averaged
  accuracy to reach ``--target`` ("-" if never), the strategy's wall time, and the
  training traffic per round (exchanges, bytes); the grid's total wall time (sum over
  its runs); rewritten after every run, like ``curves.csv``;
- ``curves.csv``: seed-mean and std of the test accuracy per method, variant, partition,
  round;
- ``accuracy-<partition>.png``: test accuracy against round, one line per method and
  variant (seed mean, band of +/- one sample std).

"Test accuracy" is the server's accuracy of the global model on the test set, except for
FedBN and SiloBN: there, from round 1 on, the equal-weight average over clients of their
personalised models' accuracy on the same test set (see :mod:`simulations.app.baselines`).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from ..app.baselines import DEFAULT_FIXBN_SWITCH, METHODS, method_spec

__all__ = [
    "RunSpec",
    "RunRecord",
    "Variant",
    "parse_variant",
    "result_state",
    "partition_overrides",
    "split_method",
    "app_config_defaults",
    "plan_runs",
    "run_all",
    "accuracy_curve",
    "seconds_curve",
    "summarise",
    "grid_wall_seconds",
    "describe_plan",
    "GridLock",
    "write_tables",
    "write_curves",
    "plot_accuracy",
    "main",
]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_METHODS = ("fedtan", "fedavg", "fedbn", "silobn", "fixbn", "fedgn", "centralised")
DEFAULT_PARTITIONS = ("pathological", "dirichlet-0.1", "dirichlet-0.5", "iid")
METRIC = "test-accuracy"

Runner = Callable[..., dict]


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid.

    Attributes
    ----------
    method, partition : str
        Method (run-config ``strategy``) and partition setting (e.g. ``dirichlet-0.1``).
    seed : int
        Run-config ``seed`` (model initialisation, partitions, batches).
    run_config : dict
        The ``--run-config`` overrides, ``results-file`` included.
    num_supernodes : int
        Federation size.
    variant : str
        Name of the configuration variant (``""``: none).
    """

    method: str
    partition: str
    seed: int
    run_config: dict
    num_supernodes: int
    variant: str = ""

    @property
    def results_file(self) -> Path:
        """Where the server app writes the run's summary."""
        return Path(self.run_config["results-file"])

    @property
    def label(self) -> str:
        """``method`` or ``method [variant]``: the line's name in tables and plots."""
        return f"{self.method} [{self.variant}]" if self.variant else self.method


@dataclass
class RunRecord:
    """A run's outcome: ``status`` is ``"ran"``, ``"reused"`` or ``"failed"``."""

    spec: RunSpec
    summary: Optional[dict]
    elapsed: float
    status: str
    error: str = ""
    curve: dict[int, float] = field(default_factory=dict)


# ---------------------------------------------------------------------- planning
GRID_KEYS = ("strategy", "seed", "results-file", "partitioning")
"""Run-config keys set by the grid itself, which a variant may not override."""

_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+,-]*$")


@dataclass(frozen=True)
class Variant:
    """A named set of run-config overrides; the grid runs once per variant.

    Attributes
    ----------
    name : str
        Label in tables and plots, and folder of its runs (``runs/<name>/``).
    overrides : dict
        Run-config overrides applied on top of the grid's common settings. A
        ``num-partitions`` override also sets the federation size (``--clients``).
    """

    name: str
    overrides: dict


def parse_variant(text: str) -> Variant:
    """A :class:`Variant` from ``NAME:KEY=VALUE,KEY=VALUE`` or ``KEY=VALUE,...``.

    Without ``NAME:`` the name is the overrides as written (e.g. ``sync-steps=5``). A
    value may hold commas as long as no ``KEY=`` follows them.

    Raises
    ------
    ValueError
        Empty overrides, an item without ``=``, or a name unfit for a folder.
    """
    name, sep, body = text.partition(":")
    if not sep or "=" in name:
        name, body = "", text
    items = [item.strip() for item in re.split(r",(?=\s*[A-Za-z0-9_.-]+\s*=)", body) if item.strip()]
    if not items:
        raise ValueError(f"variant {text!r} has no KEY=VALUE override; write NAME:KEY=VALUE[,KEY=VALUE...]")
    overrides = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"variant {text!r}: {item!r} is not KEY=VALUE")
        overrides[key.strip()] = _parse_value(value.strip())
    name = name.strip() or ",".join(f"{k}={v}" for k, v in overrides.items())
    if not _VARIANT_NAME.match(name) or len(name) > 80:
        raise ValueError(f"variant name {name!r}: use letters, digits and . _ = + , - (it names a folder); "
                         "give one explicitly as NAME:KEY=VALUE")
    return Variant(name, overrides)


def _check_variants(variants: Sequence[Variant]) -> None:
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"variant names must be unique, got {duplicates} more than once")
    for variant in variants:
        reserved = sorted(set(variant.overrides) & set(GRID_KEYS))
        if reserved:
            raise ValueError(f"variant {variant.name!r} sets {reserved}: the grid sets these "
                             "(use --methods, --seeds, --partitions, --out)")

def partition_overrides(name: str) -> dict:
    """Run-config overrides of a partition setting.

    ``iid``; ``pathological`` (the app's ``classes-per-client``) or ``pathological-C``
    (``C`` classes per client); ``dirichlet`` (the app's ``dirichlet-alpha``) or
    ``dirichlet-A`` (concentration ``A``, e.g. ``dirichlet-0.1``).

    Raises
    ------
    ValueError
        For any other name.
    """
    scheme, _, value = name.partition("-")
    try:
        if scheme == "iid" and not value:
            return {"partitioning": "iid"}
        if scheme == "pathological":
            return {"partitioning": "pathological", **({"classes-per-client": int(value)} if value else {})}
        if scheme == "dirichlet":
            alpha = float(value) if value else None
            if alpha is not None and not alpha > 0:
                raise ValueError
            return {"partitioning": "dirichlet", **({"dirichlet-alpha": alpha} if value else {})}
    except ValueError:
        pass
    raise ValueError(
        f"unknown partition setting {name!r}: use iid, pathological[-C] or dirichlet[-ALPHA]"
    )


def split_method(label: str) -> tuple[str, Optional[str]]:
    """``"fedtan+fedadam"`` -> ``("fedtan", "fedadam")``; ``"fedavg"`` -> ``("fedavg", None)``.

    A method label is a ``strategy`` value, optionally followed by ``+`` and a
    ``server-optimizer`` value (``fedavgm``, ``fedadam``, ``fedyogi``, ``fedadagrad``).

    Raises
    ------
    ValueError
        Unknown method or optimiser, or an optimiser the method cannot use.
    """
    from ..app.server_app import SERVER_OPTIMIZERS

    base, plus, optimizer = label.partition("+")
    spec = method_spec(base)
    if not plus:
        return base, None
    if optimizer not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimiser {optimizer!r} in {label!r}; choose from {SERVER_OPTIMIZERS}")
    if spec.baseline_client and base not in ("fedgn", "centralised") and optimizer != "none":
        raise ValueError(f"{label!r}: {base} cannot take a server optimiser (its server keeps BatchNorm "
                         "entries out of the aggregation)")
    return base, optimizer


def app_config_defaults(pyproject: Path = PROJECT_ROOT / "pyproject.toml") -> dict:
    """The app's run config as declared in ``[tool.flwr.app.config]``."""
    with open(pyproject, "rb") as stream:
        return dict(tomllib.load(stream)["tool"]["flwr"]["app"]["config"])


def _checked_overrides(overrides: Mapping[str, Any], declared: Mapping[str, Any]) -> dict:
    """Refuse keys ``flwr run`` would reject (not declared in pyproject.toml)."""
    undeclared = sorted(set(overrides) - set(declared))
    if undeclared:
        raise ValueError(
            f"run-config keys {undeclared} are not declared in pyproject.toml "
            "[tool.flwr.app.config]; flwr run rejects them"
        )
    return dict(overrides)


def plan_runs(
    methods: Sequence[str],
    partitions: Sequence[str],
    seeds: Sequence[int],
    settings: Mapping[str, Any],
    num_clients: int,
    out_dir: Path,
    declared: Optional[Mapping[str, Any]] = None,
    variants: Optional[Sequence[Variant]] = None,
) -> list[RunSpec]:
    """The runs of the grid, seed by seed (a complete table after each seed).

    Parameters
    ----------
    methods, partitions, seeds
        The grid.
    settings : Mapping
        Run-config overrides common to every run (``num-server-rounds``, ``lr``, ...).
    num_clients : int
        ``K``: SuperNodes of the federated runs, and the partitions whose union the
        centralised run trains on (run-config ``num-partitions``).
    out_dir : Path
        Root of the outputs; results files go to ``out_dir/runs``.
    declared : Mapping, optional
        The app's declared run config (default: read from pyproject.toml).
    variants : Sequence[Variant], optional
        Run the grid once per variant (its overrides on top of ``settings``); results
        go to ``out_dir/runs/<variant>``. Default: one unnamed configuration.

    Raises
    ------
    ValueError
        Unknown method or partition setting, an undeclared run-config key, or a variant
        that repeats a name or sets a key the grid sets (:data:`GRID_KEYS`).
    """
    declared = app_config_defaults() if declared is None else declared
    for method in methods:
        split_method(method)
    variants = list(variants) if variants else [Variant("", {})]
    _check_variants(variants)
    runs = []
    for seed in seeds:
        for partition in partitions:
            overrides = partition_overrides(partition)
            for variant in variants:
                folder = Path(out_dir) / "runs" / variant.name if variant.name else Path(out_dir) / "runs"
                clients = int(variant.overrides.get("num-partitions", num_clients))
                for method in methods:
                    base, optimizer = split_method(method)
                    spec = method_spec(base)
                    results = (folder / partition / f"{method}-seed{seed}.json").resolve()
                    config = {**settings, **variant.overrides, **overrides, "strategy": base, "seed": int(seed),
                              "num-partitions": clients, "results-file": str(results)}
                    if optimizer is not None:
                        config["server-optimizer"] = optimizer
                    runs.append(RunSpec(method, partition, int(seed), _checked_overrides(config, declared),
                                        1 if spec.single_client else clients, variant.name))
    return runs


# ---------------------------------------------------------------------- running
IGNORED_CONFIG_KEYS = ("results-file", "progress-interval")
"""Run-config keys not compared when deciding whether a summary can be reused: they do not
change the results (the results file is read from where it is, so a moved output folder
stays reusable; ``progress-interval`` only paces the log)."""


LEGACY_VALUES: dict[str, tuple[str, Any]] = {"statistics": ("fedtan", "running")}
"""Run-config keys whose introduction changed a method's behaviour: ``{key: (method,
value)}``, the value a run of that method recorded before the key existed had in effect.
Such a summary is reused only when that value is the one wanted (a FedTAN run from before
the statistics pass is not a run with it)."""


def _same_value(value: Any, other: Any) -> bool:
    if isinstance(value, bool) or isinstance(other, bool):
        return value is other or value == other and type(value) is type(other)
    if isinstance(value, (int, float)) and isinstance(other, (int, float)):
        return math.isclose(float(value), float(other), rel_tol=1e-12, abs_tol=0.0)
    return value == other


def _config_mismatch(summary: Mapping[str, Any], run_config: Mapping[str, Any],
                     declared: Optional[Mapping[str, Any]] = None, recorded_before: bool = True) -> list[str]:
    """The run-config keys whose recorded value differs from the wanted one.

    A key the summary does not record at all matches if the wanted value is the app's
    declared default (``declared``): the run predates the option, whose default keeps
    the behaviour it had then, except for :data:`LEGACY_VALUES`. ``recorded_before``
    false: the summary was just written by this code (no legacy meanings).
    """
    recorded = summary.get("config") or {}
    declared = declared if declared is not None else {}
    legacy_values = LEGACY_VALUES if recorded_before else {}
    # What a key the summary does not record meant for it: its legacy value, else the default.
    absent = dict(declared)
    absent.update({key: legacy for key, (method, legacy) in legacy_values.items()
                   if recorded.get("strategy") == method})
    wanted = dict(run_config)
    wanted.update({key: declared[key] for key in legacy_values if key not in run_config and key in declared})
    mismatch = []
    for key, value in wanted.items():
        if key in IGNORED_CONFIG_KEYS:
            continue
        if key in recorded:
            if not _same_value(value, recorded[key]):
                mismatch.append(key)
        elif not (key in absent and _same_value(value, absent[key])):
            mismatch.append(key)
    return mismatch


def _same_config(summary: Mapping[str, Any], run_config: Mapping[str, Any]) -> bool:
    return not _config_mismatch(summary, run_config)


def result_state(spec: RunSpec, declared: Optional[Mapping[str, Any]] = None) -> tuple[str, Optional[dict], str]:
    """Whether the run's results file can be reused: ``(state, summary, reason)``.

    ``state`` is ``"complete"`` (same run config, test accuracy recorded up to the last
    round: reused), ``"missing"``, ``"unreadable"`` (not JSON, e.g. cut short while being
    written), ``"mismatched"`` (another run config; ``reason`` names the keys) or
    ``"incomplete"`` (no test accuracy for the last round). ``summary`` is the parsed file
    if ``"complete"``, else ``None``. ``declared``: the app's declared run config
    (default: pyproject.toml's), for keys the summary does not record.
    """
    path = spec.results_file
    if not path.exists():
        return "missing", None, ""
    try:
        summary = json.loads(path.read_text())
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        return "unreadable", None, f"{type(error).__name__}: {error}"
    mismatch = _config_mismatch(summary, spec.run_config, _declared_defaults() if declared is None else declared)
    if mismatch:
        recorded = summary.get("config") or {}
        wanted = {**(_declared_defaults() if declared is None else declared), **spec.run_config}
        details = ", ".join(f"{k}: {recorded.get(k, '(absent)')!r} != {wanted.get(k)!r}" for k in mismatch[:4])
        return "mismatched", None, details
    return _completeness(summary, spec.run_config)


def _completeness(summary: dict, run_config: Mapping[str, Any]) -> tuple[str, Optional[dict], str]:
    curve = accuracy_curve(summary)
    rounds = run_config.get("num-server-rounds", (summary.get("config") or {}).get("num-server-rounds"))
    if not curve:
        return "incomplete", None, "no test accuracy recorded"
    if rounds is not None and max(curve) < int(rounds):
        return "incomplete", None, f"test accuracy up to round {max(curve)} of {int(rounds)}"
    return "complete", summary, ""


def _declared_defaults() -> dict:
    try:
        return app_config_defaults()
    except (OSError, KeyError, ValueError):  # no app pyproject.toml next to this module
        return {}


def _load_reusable(spec: RunSpec) -> Optional[dict]:
    return result_state(spec)[1]


def _move_aside(path: Path) -> Optional[Path]:
    """Rename a results file (and its model) to ``*.old`` before the run is redone."""
    if not path.exists():
        return None
    old = path.with_name(path.name + ".old")
    os.replace(path, old)
    model = path.with_suffix(".pt")
    if model.exists():
        os.replace(model, model.with_name(model.name + ".old"))
    return old


def model_digest(path: Path) -> str:
    """SHA-256 of a saved state dict's names, dtypes, shapes and bytes, in the dict's order.

    Two models have the same digest exactly when every tensor is bit-identical (the
    ``.pt`` file's own bytes are not compared: its archive metadata may differ).
    """
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    digest = hashlib.sha256()
    for name, tensor in state.items():
        tensor = tensor.detach().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _previous_digest(moved: Optional[Path]) -> Optional[str]:
    if moved is None:
        return None
    try:
        return json.loads(moved.read_text()).get("final-model-sha256")
    except (OSError, ValueError, AttributeError):
        return None


def _write_atomically(path: Path, summary: Mapping[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(summary, indent=2, default=float))
    os.replace(temporary, path)


def _default_runner() -> Runner:
    try:
        from ..flower_processes import run_app  # type: ignore[import-not-found]
    except ImportError as error:
        raise SystemExit(
            "simulations/flower_processes.py (run_app) is needed to launch flwr runs: " + str(error)
        ) from error
    return run_app


def run_all(
    runs: Sequence[RunSpec],
    runner: Optional[Runner] = None,
    *,
    force: bool = False,
    num_cpus_per_client: float = 2.0,
    timeout: float = 3600.0,
    env: Optional[dict] = None,
    echo: Callable[[str], None] = print,
    after_each: Optional[Callable[[list[RunRecord]], None]] = None,
) -> list[RunRecord]:
    """Run (or reuse) every run; print one progress line per run.

    Parameters
    ----------
    runs : Sequence[RunSpec]
        From :func:`plan_runs`.
    runner : Callable, optional
        ``runner(run_config, num_supernodes, num_cpus_per_client=..., env=..., timeout=...)
        -> summary``; defaults to :func:`simulations.flower_processes.run_app`.
    force : bool
        Re-run even complete runs (see :func:`result_state`); otherwise those are reused
        and every other run is redone, its old results file moved to ``*.json.old``.
    num_cpus_per_client, timeout, env
        Passed to the runner.
    echo : Callable[[str], None]
        Where progress lines go.
    after_each : Callable[[list[RunRecord]], None], optional
        Called with the records so far after every run (e.g. to rewrite the tables).

    Returns
    -------
    list[RunRecord]
        One per run, failures included (a failing run does not stop the others). A run
        whose summary is not complete for its run config (see :func:`result_state`)
        counts as failed. The summary of every successful run is (re)written to its
        results file, atomically, with ``wall-seconds`` (the run's wall time).
    """
    records: list[RunRecord] = []
    width = len(str(len(runs)))
    declared = _declared_defaults()
    for index, spec in enumerate(runs, start=1):
        started = time.time()
        state, summary, reason = result_state(spec, declared)
        rerun_of_complete = state == "complete"
        if force or state != "complete":
            summary = None
        status, error = ("reused", "") if summary is not None else ("ran", "")
        if summary is None:
            runner = runner or _default_runner()
            try:
                spec.results_file.parent.mkdir(parents=True, exist_ok=True)
                moved = _move_aside(spec.results_file)
                if moved is not None and state != "complete":
                    echo(f"  {spec.results_file.name}: {state}{' (' + reason + ')' if reason else ''}; "
                         f"moved to {moved.name}, running again")
                summary = runner(dict(spec.run_config), spec.num_supernodes,
                                 num_cpus_per_client=num_cpus_per_client, env=env, timeout=timeout)
                if not isinstance(summary, dict):
                    raise TypeError(f"the runner returned {type(summary).__name__}, not a summary dict")
                summary.setdefault("wall-seconds", time.time() - started)
                state, _, reason = _completeness(summary, spec.run_config)
                mismatch = (_config_mismatch(summary, spec.run_config, declared, recorded_before=False)
                            if "config" in summary else [])
                if state != "complete" or mismatch:
                    raise RuntimeError(f"the run's summary is {state if state != 'complete' else 'for another config'}"
                                       f" ({reason or ', '.join(mismatch)})")
                model = spec.results_file.with_suffix(".pt")
                if model.exists():
                    summary["final-model-sha256"] = model_digest(model)
                    previous = _previous_digest(moved) if rerun_of_complete else None
                    if previous is not None:
                        summary["reproduced-previous"] = previous == summary["final-model-sha256"]
                        verdict = "is identical to" if summary["reproduced-previous"] else "differs from"
                        echo(f"  {spec.results_file.name}: the final model {verdict} the previous run's"
                             f" (sha256 {previous[:12]})")
                _write_atomically(spec.results_file, summary)
            except Exception as exc:  # a failed run is reported, the grid goes on
                status, error, summary = "failed", f"{type(exc).__name__}: {exc}", None
        elapsed = time.time() - started
        curve = accuracy_curve(summary) if summary else {}
        record = RunRecord(spec, summary, elapsed, status, error, curve)
        records.append(record)
        head = f"[{index:>{width}}/{len(runs)}] {spec.label:<15} {spec.partition:<14} seed {spec.seed:<3}"
        if status == "failed":
            echo(f"{head} {elapsed:8.1f}s  FAILED: {error}")
        else:
            final, best = _final(curve), _best(curve)
            note = "  (reused)" if status == "reused" else ""
            echo(f"{head} {elapsed:8.1f}s  final acc {final:.4f}  best {best:.4f}{note}")
        if after_each is not None:
            after_each(records)
    return records


# ---------------------------------------------------------------------- analysis
def accuracy_curve(summary: Optional[Mapping[str, Any]], metric: str = METRIC) -> dict[int, float]:
    """``{round: test accuracy}`` of a run summary (JSON round keys turned into ints)."""
    if not summary:
        return {}
    curve = {}
    for round_key, metrics in (summary.get("test") or {}).items():
        if isinstance(metrics, Mapping) and metric in metrics:
            curve[int(round_key)] = float(metrics[metric])
    return dict(sorted(curve.items()))


def seconds_curve(summary: Optional[Mapping[str, Any]]) -> dict[int, float]:
    """``{round: wall seconds}`` of a run summary (its ``round-seconds``; empty for
    summaries that predate it)."""
    if not summary:
        return {}
    seconds = summary.get("round-seconds") or {}
    return dict(sorted((int(r), float(v)) for r, v in seconds.items() if isinstance(v, (int, float))))


def _final(curve: Mapping[int, float]) -> float:
    return curve[max(curve)] if curve else float("nan")


def _best(curve: Mapping[int, float]) -> float:
    trained = [v for r, v in curve.items() if r >= 1] or list(curve.values())
    return max(trained) if trained else float("nan")


LAST_ROUNDS = 5
"""Rounds averaged for the ``last`` column: one round's accuracy swings by a few points."""


def _last_rounds_mean(curve: Mapping[int, float], n: int = LAST_ROUNDS) -> float:
    trained = sorted(r for r in curve if r >= 1)[-n:]
    return float(np.mean([curve[r] for r in trained])) if trained else float("nan")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan")
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return float(np.mean(values)), std


def _mean_curve(curves: Sequence[Mapping[int, float]]) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Rounds present in every curve; mean and sample std over curves."""
    if not curves:
        return [], np.zeros(0), np.zeros(0)
    rounds = sorted(set.intersection(*(set(c) for c in curves)))
    values = np.array([[c[r] for r in rounds] for c in curves], dtype=float)
    std = values.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(rounds))
    return rounds, values.mean(axis=0), std


def _per_round(summary: Mapping[str, Any], key: str) -> list[float]:
    """The per-round values of a traffic count (0 where a round lacks it)."""
    communication = summary.get("communication") or {}
    return [float(m.get(key, 0.0)) for m in communication.values() if isinstance(m, Mapping)]


def _grouped(records: Iterable[RunRecord]) -> dict[tuple[str, str, str], list[RunRecord]]:
    """Successful runs by (method, variant, partition), in the order of their first run."""
    groups: dict[tuple[str, str, str], list[RunRecord]] = {}
    for record in records:
        if record.summary is not None and record.curve:
            key = (record.spec.method, record.spec.variant, record.spec.partition)
            groups.setdefault(key, []).append(record)
    return groups


def grid_wall_seconds(records: Iterable[RunRecord]) -> float:
    """The grid's wall time: the sum of its successful runs' ``wall-seconds`` (as recorded
    when they ran, so reused runs count what they took then; the strategy's ``seconds``
    for a summary written by a plain ``flwr run``)."""
    return float(sum(float(r.summary.get("wall-seconds", r.summary.get("seconds", r.elapsed)))
                     for r in records if r.summary is not None))


def summarise(records: Sequence[RunRecord], target: float) -> list[dict]:
    """One row per method x variant x partition with successful runs, in the order first run.

    Columns: ``method``, ``variant`` (``""``: none), ``partition``, ``seeds``, ``final_mean``/``final_std`` (accuracy
    after the last round), ``best_mean``/``best_std`` (best accuracy over rounds >= 1),
    ``last_mean``/``last_std`` (each seed's mean accuracy over its last :data:`LAST_ROUNDS`
    rounds),
    ``rounds_to_target`` (first round where the seed-averaged accuracy reaches
    ``target``; ``None`` if never), ``wall_seconds_mean``/``_std`` (the strategy's wall
    time), ``train_exchanges_per_round``, ``train_bytes_down_per_round``,
    ``train_bytes_up_per_round``, ``eval_bytes_per_round`` (means over rounds and seeds;
    NaN when a summary records no traffic). Standard deviations are over seeds (ddof=1;
    0 for one seed).
    """
    rows = []
    for (method, variant, partition), group in _grouped(records).items():
        curves = [r.curve for r in group]
        rounds, mean_curve, _ = _mean_curve(curves)
        reached = [r for r, acc in zip(rounds, mean_curve) if r >= 1 and acc >= target]
        final_mean, final_std = _mean_std([_final(c) for c in curves])
        best_mean, best_std = _mean_std([_best(c) for c in curves])
        last_mean, last_std = _mean_std([_last_rounds_mean(c) for c in curves])
        wall_mean, wall_std = _mean_std([float(r.summary.get("seconds", float("nan"))) for r in group])

        def traffic(key: str) -> float:
            values = [v for r in group for v in _per_round(r.summary, key)]
            return float(np.mean(values)) if values else float("nan")

        rows.append({
            "method": method,
            "variant": variant,
            "partition": partition,
            "seeds": len(group),
            "final_mean": final_mean,
            "final_std": final_std,
            "best_mean": best_mean,
            "best_std": best_std,
            "last_mean": last_mean,
            "last_std": last_std,
            "rounds_to_target": reached[0] if reached else None,
            "target": target,
            "wall_seconds_mean": wall_mean,
            "wall_seconds_std": wall_std,
            "train_exchanges_per_round": traffic("train-exchanges"),
            "train_bytes_down_per_round": traffic("train-bytes-down"),
            "train_bytes_up_per_round": traffic("train-bytes-up"),
            "eval_bytes_per_round": traffic("evaluate-bytes-down") + traffic("evaluate-bytes-up"),
        })
    return rows


CSV_COLUMNS = [
    "method", "variant", "partition", "seeds", "final_mean", "final_std", "best_mean", "best_std",
    "last_mean", "last_std", "rounds_to_target", "target", "wall_seconds_mean", "wall_seconds_std",
    "train_exchanges_per_round", "train_bytes_down_per_round", "train_bytes_up_per_round",
    "eval_bytes_per_round",
]


def _pm(mean: float, std: float, digits: int = 4) -> str:
    if mean != mean:
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _megabytes(value: float) -> str:
    return "-" if value != value else f"{value / 1e6:.3f}"


def write_tables(rows: Sequence[Mapping[str, Any]], out_dir: Path, title: str = "",
                 target: Optional[float] = None, wall_seconds: Optional[float] = None) -> tuple[Path, Path]:
    """Write ``results.csv`` and ``results.md`` into ``out_dir``; return their paths.

    ``target`` (for the header) defaults to the rows' own. The markdown table has a
    ``variant`` column when a row has one; ``wall_seconds`` (the grid's, see
    :func:`grid_wall_seconds`) goes under it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "results.csv", out_dir / "results.md"
    with open(csv_path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    if target is None:
        target = rows[0]["target"] if rows else float("nan")
    lines = []
    if title:
        lines += [f"# {title}", ""]
    with_variant = any(row.get("variant") for row in rows)
    lines += [
        f"| method |{' variant |' if with_variant else ''} partition | seeds | final test acc | best test acc "
        f"| last {LAST_ROUNDS} rounds | rounds to {target:g} | wall s | exchanges/round | MB/round (down + up) |",
        f"|---|{'---|' if with_variant else ''}---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        reach = "-" if row["rounds_to_target"] is None else str(row["rounds_to_target"])
        exchanges = row["train_exchanges_per_round"]
        traffic = row["train_bytes_down_per_round"] + row["train_bytes_up_per_round"]
        variant = f" {row.get('variant') or '-'} |" if with_variant else ""
        lines.append(
            f"| {row['method']} |{variant} {row['partition']} | {row['seeds']} "
            f"| {_pm(row['final_mean'], row['final_std'])} | {_pm(row['best_mean'], row['best_std'])} "
            f"| {_pm(row['last_mean'], row['last_std'])} "
            f"| {reach} | {_pm(row['wall_seconds_mean'], row['wall_seconds_std'], 1)} "
            f"| {'-' if exchanges != exchanges else f'{exchanges:g}'} | {_megabytes(traffic)} |"
        )
    lines += [
        "",
        "Mean ± sample std over seeds. Final: after the last round; best: best round; "
        f"last {LAST_ROUNDS} rounds: each seed's mean accuracy over its last {LAST_ROUNDS} rounds. "
        f"Rounds to {target:g}: first round where the seed-averaged test accuracy reaches it "
        "('-': never). Wall s: the strategy's wall time. Exchanges and MB: training "
        "traffic per round (federated evaluation of FedBN/SiloBN not included). FedBN and "
        "SiloBN: test accuracy of the clients' personalised models (global shared entries "
        "+ the client's own BatchNorm entries) on the global test set, averaged over "
        "clients with equal weights.",
    ]
    if wall_seconds is not None:
        lines += ["", f"Grid wall time (sum over its runs, Ray start-up and evaluation included): "
                      f"{wall_seconds:.0f} s ({wall_seconds / 3600:.2f} h)."]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def write_curves(records: Sequence[RunRecord], out_dir: Path) -> Path:
    """Write ``curves.csv``: method, variant, partition, round, seeds, mean and sample std
    of the test accuracy over seeds (rounds every seed has)."""
    path = Path(out_dir) / "curves.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["method", "variant", "partition", "round", "seeds", "accuracy_mean", "accuracy_std"])
        for (method, variant, partition), group in _grouped(records).items():
            rounds, mean, std = _mean_curve([r.curve for r in group])
            for r, m, s in zip(rounds, mean, std):
                writer.writerow([method, variant, partition, r, len(group), f"{m:.6f}", f"{s:.6f}"])
    return path


def plot_accuracy(records: Sequence[RunRecord], out_dir: Path, target: Optional[float] = None,
                  subtitle: str = "") -> list[Path]:
    """One PNG per partition setting, two panels: test accuracy against round, one line
    per method (and variant), and beside it the wall seconds of each round (the summaries'
    ``round-seconds``: training, the statistics pass and evaluation).

    Accuracy lines are seed means with a band of +/- one sample std; a dashed line marks
    ``target``. Time lines are seed means over the rounds every seed recorded (none for
    summaries without ``round-seconds``). Returns the paths written
    (``accuracy-<partition>.png``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups = _grouped(records)
    partitions = list(dict.fromkeys(p for _, _, p in groups))
    paths = []
    for partition in partitions:
        figure, (axes, time_axes) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
        timed = False
        for (method, variant, part), group in groups.items():
            if part != partition:
                continue
            rounds, mean, std = _mean_curve([r.curve for r in group])
            line, = axes.plot(rounds, mean, marker="o" if len(rounds) <= 12 else None, markersize=3,
                              label=f"{group[0].spec.label} ({len(group)} seed{'s' if len(group) > 1 else ''})")
            if len(group) > 1:
                axes.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.15)
            seconds = [seconds_curve(r.summary) for r in group]
            if all(seconds):
                rounds, mean, _ = _mean_curve(seconds)
                time_axes.plot(rounds, mean, color=line.get_color(), marker="o" if len(rounds) <= 12 else None,
                               markersize=3)
                timed = timed or bool(rounds)
        if not timed:
            time_axes.text(0.5, 0.5, "no round-seconds recorded", ha="center", va="center",
                           transform=time_axes.transAxes, color="grey")
        time_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        time_axes.set_xlabel("round")
        time_axes.set_ylabel("seconds per round (seed mean)")
        time_axes.set_ylim(bottom=0)
        time_axes.grid(alpha=0.3)
        if target is not None:
            axes.axhline(target, color="grey", linestyle="--", linewidth=0.8)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("round")
        axes.set_ylabel("test accuracy")
        figure.suptitle(f"{partition}{' - ' + subtitle if subtitle else ''}")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = Path(out_dir) / f"accuracy-{partition}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------- command line
def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text.strip("'\"")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m simulations.experiments.compare",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)}; add +OPTIMISER for a server "
                             "optimiser, e.g. fedtan+fedadam (fedavgm, fedadam, fedyogi, fedadagrad)")
    parser.add_argument("--partitions", default=",".join(DEFAULT_PARTITIONS),
                        help="comma-separated: iid, pathological[-C], dirichlet[-ALPHA]")
    parser.add_argument("--seeds", default="0", help="comma-separated integers")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--clients", type=int, default=5, help="K: SuperNodes of the federated runs")
    parser.add_argument("--batch-size", type=int, default=32, help="per client and step")
    parser.add_argument("--lr", type=float, default=None, help="default: the app's")
    parser.add_argument("--fixbn-switch", type=float, default=DEFAULT_FIXBN_SWITCH,
                        help="fraction of rounds before FixBN freezes the statistics")
    parser.add_argument("--target", type=float, default=0.7, help="accuracy for 'rounds to target'")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other run-config override (repeatable), e.g. data-dir=/data")
    parser.add_argument("--cpus-per-client", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--force", action="store_true", help="re-run runs whose summary exists")
    parser.add_argument("--variant", action="append", default=[], metavar="[NAME:]KEY=VALUE[,KEY=VALUE...]",
                        help="run the grid once more with these run-config overrides (repeatable), "
                             "e.g. --variant sync1:sync-steps=1 --variant sync5:sync-steps=5")
    parser.add_argument("--dry-run", "--only-plan", dest="dry_run", action="store_true",
                        help="print the runs and which are complete (reused), run nothing")
    parser.add_argument("--out", required=True, help="output folder")
    return parser.parse_args(argv)


def describe_plan(runs: Sequence[RunSpec], force: bool = False) -> list[str]:
    """One line per run: its state (see :func:`result_state`) and results file; then a
    count of the runs to do."""
    lines, todo = [], 0
    width = len(str(len(runs)))
    declared = _declared_defaults()
    for index, spec in enumerate(runs, start=1):
        state, _, reason = result_state(spec, declared)
        action = "reuse" if state == "complete" and not force else "run"
        todo += action == "run"
        note = f" ({reason})" if reason else ""
        lines.append(f"[{index:>{width}}/{len(runs)}] {action:<5} {spec.label:<11} {spec.partition:<14} "
                     f"seed {spec.seed:<3} {state}{note}: {spec.results_file}")
    lines.append(f"{todo} of {len(runs)} runs to do, {len(runs) - todo} complete")
    return lines


class GridLock:
    """An exclusive lock on an output folder (``.compare.lock``), held while a grid runs.

    Released when the process ends, however it ends (``fcntl.flock``), and the file
    removed on a normal exit; where ``fcntl`` is missing (Windows) no lock is taken.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / ".compare.lock"
        self._stream: Optional[Any] = None

    def __enter__(self) -> "GridLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stream = open(self.path, "a+")
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            stream.seek(0)
            holder = stream.read().strip() or "another process"
            stream.close()
            raise SystemExit(f"{self.path.parent} is in use by a running grid ({holder}); wait for it "
                             "to finish or stop it, or choose another --out") from None
        stream.seek(0)
        stream.truncate()
        stream.write(f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        stream.flush()
        self._stream = stream
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stream is not None:
            self.path.unlink(missing_ok=True)
            self._stream.close()
            self._stream = None


def main(argv: Optional[Sequence[str]] = None, runner: Optional[Runner] = None) -> int:
    """Run the grid and write the tables and plots; return 1 if any run failed."""
    args = parse_args(argv)
    out_dir = Path(args.out)
    methods, partitions = _split(args.methods), _split(args.partitions)
    seeds = [int(s) for s in _split(args.seeds)]
    settings: dict[str, Any] = {
        "num-server-rounds": args.rounds, "local-steps": args.local_steps, "model": args.model,
        "dataset": args.dataset, "batch-size": args.batch_size, "fixbn-switch": float(args.fixbn_switch),
    }
    if args.lr is not None:
        settings["lr"] = float(args.lr)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        settings[key.strip()] = _parse_value(value.strip())
    try:
        variants = [parse_variant(text) for text in args.variant]
        runs = plan_runs(methods, partitions, seeds, settings, args.clients, out_dir, variants=variants)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    subtitle = (f"{args.dataset}, {args.model}, K={args.clients}, B={args.batch_size}, "
                f"E={args.local_steps}, {args.rounds} rounds")
    shape = (f"{len(methods)} methods x {len(partitions)} partitions x {len(seeds)} seeds"
             + (f" x {len(variants)} variants" if variants else ""))
    if args.dry_run:
        print(f"{len(runs)} runs ({shape}) -> {out_dir}")
        print("\n".join(describe_plan(runs, force=args.force)))
        return 0
    with GridLock(out_dir):
        (out_dir / "grid.json").write_text(json.dumps({"argv": list(argv or sys.argv[1:]), **vars(args)}, indent=2))
        print(f"{len(runs)} runs ({shape}) -> {out_dir}", flush=True)

        def tables(records: list[RunRecord]) -> None:
            write_tables(summarise(records, args.target), out_dir, title=subtitle, target=args.target,
                         wall_seconds=grid_wall_seconds(records))
            write_curves(records, out_dir)

        records = run_all(runs, runner, force=args.force, num_cpus_per_client=args.cpus_per_client,
                          timeout=args.timeout, echo=lambda line: print(line, flush=True), after_each=tables)
        rows = summarise(records, args.target)
        csv_path, md_path = write_tables(rows, out_dir, title=subtitle, target=args.target,
                                         wall_seconds=grid_wall_seconds(records))
        write_curves(records, out_dir)
        plots = plot_accuracy(records, out_dir, target=args.target, subtitle=subtitle)
    print(md_path.read_text())
    print(f"wrote {csv_path}, {md_path}, {len(plots)} plot(s) in {out_dir}")
    failed = [r for r in records if r.status == "failed"]
    if failed:
        print(f"{len(failed)} run(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
