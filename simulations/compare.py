"""Side-by-side experiments: methods x partitions x seeds, each a ``flwr run .``.

Example::

    python -m simulations.compare \\
        --methods fedtan,fedavg,fedbn,silobn,fixbn,fedgn,centralised \\
        --partitions pathological,dirichlet-0.1,dirichlet-0.5,iid --seeds 0,1 \\
        --rounds 30 --local-steps 5 --model cnn --dataset fashion-mnist \\
        --clients 5 --batch-size 32 --out results/NAME

A method may name a server optimiser (run-config ``server-optimizer``) after a ``+``:
``--methods fedtan,fedtan+fedadam,fedavg+fedadam,fedtan+fedavgm``; its hyper-parameters
are run-config keys (``--set server-eta=0.01``, see :func:`simulations.server_app.server_optimizer`).

Every run goes through the same code path as ``flwr run .`` (Flower simulation):
:func:`simulations.flower_processes.run_app` submits the app with ``--run-config``
overrides (``strategy``, ``partitioning``, ..., ``results-file``) to a private simulation
SuperLink and returns the JSON summary the server app wrote (see
:func:`simulations.server_app.result_summary`). Federated methods run on ``--clients``
SuperNodes; ``centralised`` on one SuperNode holding the union of the ``--clients``
partitions, drawing ``clients x batch-size`` samples per step.

Outputs in ``--out``:

- ``runs/<partition>/<method>-seed<s>.json`` (+ ``.pt``, the final model): each run's
  summary. An existing summary with the same run config is reused (``--force`` re-runs);
- ``results.csv`` and ``results.md``: one row per method x partition, over seeds: final
  and best test accuracy (mean +/- sample std), rounds for the seed-averaged accuracy to
  reach ``--target`` ("-" if never), the strategy's wall time, and the training traffic
  per round (exchanges, bytes); rewritten after every run;
- ``curves.csv``: seed-mean and std of the test accuracy per method, partition, round;
- ``accuracy-<partition>.png``: test accuracy against round, one line per method (seed
  mean, band of +/- one std).

"Test accuracy" is the server's accuracy of the global model on the test set, except for
FedBN and SiloBN: there, from round 1 on, the equal-weight average over clients of their
personalised models' accuracy on the same test set (see :mod:`simulations.baselines`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
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

from .baselines import DEFAULT_FIXBN_SWITCH, METHODS, method_spec

__all__ = [
    "RunSpec",
    "RunRecord",
    "partition_overrides",
    "split_method",
    "app_config_defaults",
    "plan_runs",
    "run_all",
    "accuracy_curve",
    "summarise",
    "write_tables",
    "write_curves",
    "plot_accuracy",
    "main",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
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
    """

    method: str
    partition: str
    seed: int
    run_config: dict
    num_supernodes: int

    @property
    def results_file(self) -> Path:
        """Where the server app writes the run's summary."""
        return Path(self.run_config["results-file"])


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
    from .server_app import SERVER_OPTIMIZERS

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

    Raises
    ------
    ValueError
        Unknown method or partition setting, or an undeclared run-config key.
    """
    declared = app_config_defaults() if declared is None else declared
    for method in methods:
        split_method(method)
    runs = []
    for seed in seeds:
        for partition in partitions:
            overrides = partition_overrides(partition)
            for method in methods:
                base, optimizer = split_method(method)
                spec = method_spec(base)
                results = (Path(out_dir) / "runs" / partition / f"{method}-seed{seed}.json").resolve()
                config = {**settings, **overrides, "strategy": base, "seed": int(seed),
                          "num-partitions": int(num_clients), "results-file": str(results)}
                if optimizer is not None:
                    config["server-optimizer"] = optimizer
                runs.append(RunSpec(method, partition, int(seed), _checked_overrides(config, declared),
                                    1 if spec.single_client else int(num_clients)))
    return runs


# ---------------------------------------------------------------------- running
def _same_config(summary: Mapping[str, Any], run_config: Mapping[str, Any]) -> bool:
    recorded = summary.get("config", {})
    for key, value in run_config.items():
        if key not in recorded:
            return False
        other = recorded[key]
        if isinstance(value, float) or isinstance(other, float):
            try:
                if not math.isclose(float(value), float(other), rel_tol=1e-12, abs_tol=0.0):
                    return False
            except (TypeError, ValueError):
                return False
        elif value != other:
            return False
    return True


def _load_reusable(spec: RunSpec) -> Optional[dict]:
    try:
        summary = json.loads(spec.results_file.read_text())
    except (OSError, ValueError):
        return None
    return summary if _same_config(summary, spec.run_config) and accuracy_curve(summary) else None


def _default_runner() -> Runner:
    try:
        from .flower_processes import run_app  # type: ignore[import-not-found]
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
        Re-run even when a summary with the same run config exists.
    num_cpus_per_client, timeout, env
        Passed to the runner.
    echo : Callable[[str], None]
        Where progress lines go.
    after_each : Callable[[list[RunRecord]], None], optional
        Called with the records so far after every run (e.g. to rewrite the tables).

    Returns
    -------
    list[RunRecord]
        One per run, failures included (a failing run does not stop the others).
    """
    records: list[RunRecord] = []
    width = len(str(len(runs)))
    for index, spec in enumerate(runs, start=1):
        started = time.time()
        summary = None if force else _load_reusable(spec)
        status, error = ("reused", "") if summary is not None else ("ran", "")
        if summary is None:
            runner = runner or _default_runner()
            try:
                spec.results_file.parent.mkdir(parents=True, exist_ok=True)
                summary = runner(dict(spec.run_config), spec.num_supernodes,
                                 num_cpus_per_client=num_cpus_per_client, env=env, timeout=timeout)
            except Exception as exc:  # a failed run is reported, the grid goes on
                status, error = "failed", f"{type(exc).__name__}: {exc}"
        elapsed = time.time() - started
        curve = accuracy_curve(summary) if summary else {}
        if status != "failed" and not curve:
            status, error = "failed", "summary holds no test accuracy"
        record = RunRecord(spec, summary if status != "failed" else None, elapsed, status, error, curve)
        records.append(record)
        head = f"[{index:>{width}}/{len(runs)}] {spec.method:<15} {spec.partition:<14} seed {spec.seed:<3}"
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


def _final(curve: Mapping[int, float]) -> float:
    return curve[max(curve)] if curve else float("nan")


def _best(curve: Mapping[int, float]) -> float:
    trained = [v for r, v in curve.items() if r >= 1] or list(curve.values())
    return max(trained) if trained else float("nan")


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


def _grouped(records: Iterable[RunRecord]) -> dict[tuple[str, str], list[RunRecord]]:
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for record in records:
        if record.summary is not None and record.curve:
            groups.setdefault((record.spec.method, record.spec.partition), []).append(record)
    return groups


def summarise(records: Sequence[RunRecord], target: float) -> list[dict]:
    """One row per method x partition with successful runs, in the order first run.

    Columns: ``method``, ``partition``, ``seeds``, ``final_mean``/``final_std`` (accuracy
    after the last round), ``best_mean``/``best_std`` (best accuracy over rounds >= 1),
    ``rounds_to_target`` (first round where the seed-averaged accuracy reaches
    ``target``; ``None`` if never), ``wall_seconds_mean``/``_std`` (the strategy's wall
    time), ``train_exchanges_per_round``, ``train_bytes_down_per_round``,
    ``train_bytes_up_per_round``, ``eval_bytes_per_round`` (means over rounds and seeds;
    NaN when a summary records no traffic). Standard deviations are over seeds (ddof=1;
    0 for one seed).
    """
    rows = []
    for (method, partition), group in _grouped(records).items():
        curves = [r.curve for r in group]
        rounds, mean_curve, _ = _mean_curve(curves)
        reached = [r for r, acc in zip(rounds, mean_curve) if r >= 1 and acc >= target]
        final_mean, final_std = _mean_std([_final(c) for c in curves])
        best_mean, best_std = _mean_std([_best(c) for c in curves])
        wall_mean, wall_std = _mean_std([float(r.summary.get("seconds", float("nan"))) for r in group])

        def traffic(key: str) -> float:
            values = [v for r in group for v in _per_round(r.summary, key)]
            return float(np.mean(values)) if values else float("nan")

        rows.append({
            "method": method,
            "partition": partition,
            "seeds": len(group),
            "final_mean": final_mean,
            "final_std": final_std,
            "best_mean": best_mean,
            "best_std": best_std,
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
    "method", "partition", "seeds", "final_mean", "final_std", "best_mean", "best_std",
    "rounds_to_target", "target", "wall_seconds_mean", "wall_seconds_std",
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
                 target: Optional[float] = None) -> tuple[Path, Path]:
    """Write ``results.csv`` and ``results.md`` into ``out_dir``; return their paths.

    ``target`` (for the header) defaults to the rows' own.
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
    lines += [
        f"| method | partition | seeds | final test acc | best test acc | rounds to {target:g} "
        "| wall s | exchanges/round | MB/round (down + up) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        reach = "-" if row["rounds_to_target"] is None else str(row["rounds_to_target"])
        exchanges = row["train_exchanges_per_round"]
        traffic = row["train_bytes_down_per_round"] + row["train_bytes_up_per_round"]
        lines.append(
            f"| {row['method']} | {row['partition']} | {row['seeds']} "
            f"| {_pm(row['final_mean'], row['final_std'])} | {_pm(row['best_mean'], row['best_std'])} "
            f"| {reach} | {_pm(row['wall_seconds_mean'], row['wall_seconds_std'], 1)} "
            f"| {'-' if exchanges != exchanges else f'{exchanges:g}'} | {_megabytes(traffic)} |"
        )
    lines += [
        "",
        "Mean ± sample std over seeds. Final: after the last round; best: best round. "
        f"Rounds to {target:g}: first round where the seed-averaged test accuracy reaches it "
        "('-': never). Wall s: the strategy's wall time. Exchanges and MB: training "
        "traffic per round (federated evaluation of FedBN/SiloBN not included). FedBN and "
        "SiloBN: test accuracy of the clients' personalised models (global shared entries "
        "+ the client's own BatchNorm entries) on the global test set, averaged over "
        "clients with equal weights.",
    ]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def write_curves(records: Sequence[RunRecord], out_dir: Path) -> Path:
    """Write ``curves.csv``: method, partition, round, seeds, mean and std of the accuracy."""
    path = Path(out_dir) / "curves.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["method", "partition", "round", "seeds", "accuracy_mean", "accuracy_std"])
        for (method, partition), group in _grouped(records).items():
            rounds, mean, std = _mean_curve([r.curve for r in group])
            for r, m, s in zip(rounds, mean, std):
                writer.writerow([method, partition, r, len(group), f"{m:.6f}", f"{s:.6f}"])
    return path


def plot_accuracy(records: Sequence[RunRecord], out_dir: Path, target: Optional[float] = None,
                  subtitle: str = "") -> list[Path]:
    """One PNG per partition setting: test accuracy against round, one line per method.

    Lines are seed means with a band of +/- one sample std; a dashed line marks
    ``target``. Returns the paths written (``accuracy-<partition>.png``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups = _grouped(records)
    partitions = list(dict.fromkeys(p for _, p in groups))
    paths = []
    for partition in partitions:
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for (method, part), group in groups.items():
            if part != partition:
                continue
            rounds, mean, std = _mean_curve([r.curve for r in group])
            line, = axes.plot(rounds, mean, marker="o" if len(rounds) <= 12 else None, markersize=3,
                              label=f"{method} ({len(group)} seed{'s' if len(group) > 1 else ''})")
            if len(group) > 1:
                axes.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        if target is not None:
            axes.axhline(target, color="grey", linestyle="--", linewidth=0.8)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("round")
        axes.set_ylabel("test accuracy")
        axes.set_title(f"{partition}{' - ' + subtitle if subtitle else ''}")
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
    parser = argparse.ArgumentParser(prog="python -m simulations.compare", description=__doc__.split("\n\n")[0],
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
    parser.add_argument("--out", required=True, help="output folder")
    return parser.parse_args(argv)


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
        runs = plan_runs(methods, partitions, seeds, settings, args.clients, out_dir)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    subtitle = (f"{args.dataset}, {args.model}, K={args.clients}, B={args.batch_size}, "
                f"E={args.local_steps}, {args.rounds} rounds")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "grid.json").write_text(json.dumps({"argv": list(argv or sys.argv[1:]), **vars(args)}, indent=2))
    print(f"{len(runs)} runs ({len(methods)} methods x {len(partitions)} partitions x {len(seeds)} seeds) "
          f"-> {out_dir}", flush=True)

    def tables(records: list[RunRecord]) -> None:
        write_tables(summarise(records, args.target), out_dir, title=subtitle, target=args.target)

    records = run_all(runs, runner, force=args.force, num_cpus_per_client=args.cpus_per_client,
                      timeout=args.timeout, echo=lambda line: print(line, flush=True), after_each=tables)
    rows = summarise(records, args.target)
    csv_path, md_path = write_tables(rows, out_dir, title=subtitle, target=args.target)
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
