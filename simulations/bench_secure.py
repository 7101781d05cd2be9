"""Benchmark: FedTAN's secure rounds against its clear ones and against Flower's SecAgg+.

Run::

    python -m simulations.bench_secure [--model cnn|resnet20] [--supernodes 5] [--rounds 3] [--json F]

One ``flwr run`` of the app with ``mode = "bench-secure"`` (Flower simulation, Ray
backend): the ServerApp runs on the same nodes, taking turns, one round of each
configuration a pass, a warm-up pass and then ``--rounds`` timed passes:

- FedTAN clear, with secure statistics, with secure models, with both (``statistics =
  "running"``: the round alone, as in :mod:`simulations.bench_flower`);
- Flower's legacy FedAvg (``DefaultWorkflow``) in the clear, and under SecAgg+
  (``SecAggPlusWorkflow``, :mod:`simulations.app.secaggplus`); each of their turns runs two
  rounds from the initial model and measures the second (SecAgg+'s average comes back in
  float64, so its later rounds send twice the model bytes its first does).

All use the same model, synthetic data, batch size and ``local-steps``. Per configuration
it prints the median over the timed rounds of the round's wall seconds and of its bytes
(every message the server sent and received, counted the same way for all: Flower's
``count_bytes`` of each message's records, by
:class:`simulations.app.secaggplus.ExchangeRecorder` around the Grid),
and for FedTAN the final exchange (the last aggregate out, the models back): its seconds
(the round ledger's ``fedtan-final-exchange-seconds``) and bytes. Then the ratios: FedTAN
secure (statistics and models) / FedTAN clear round (target <= 1.5); secure / clear final
exchange; FedTAN secure / FedAvg + SecAgg+ per round (target < 1); SecAgg+ / legacy clear.

A round's seconds run from the end of one round's aggregation to the end of the next's
(the strategies' ``evaluate_fn``, called after each round). Every round starts from the same
initial model; the FedTAN configurations number their rounds on
(:class:`simulations.bench_flower.FedTANRounds`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid

from flwr_fedtan import FedTAN
from flwr_fedtan.protocol.wire import record_bytes

from .app.secaggplus import ExchangeRecorder, run_legacy_fedavg

FEDTAN_CONFIGURATIONS: dict[str, dict[str, bool]] = {
    "fedtan-clear": {},
    "fedtan-secure-stats": {"secure_stats": True},
    "fedtan-secure-models": {"secure_models": True},
    "fedtan-secure": {"secure_stats": True, "secure_models": True},
}
"""FedTAN's configurations: name -> FedTAN's secure flags."""

LEGACY_CONFIGURATIONS: dict[str, bool] = {"fedavg-legacy": False, "fedavg-secaggplus": True}
"""Flower's legacy FedAvg: name -> under SecAgg+."""

CONFIGURATIONS = (*LEGACY_CONFIGURATIONS, *FEDTAN_CONFIGURATIONS)
"""Every configuration, in the order each pass runs them."""

ROUND_TIME_TARGET = 1.5
"""FedTAN secure (statistics and models) / FedTAN clear round time, at most."""


class _RoundMarks:
    """The ``evaluate_fn`` of a FedTAN run: per round, its wall seconds and the batches the
    recorder saw during it; the model after the last round."""

    def __init__(self, recorder: ExchangeRecorder) -> None:
        self.recorder = recorder
        self.seconds: dict[int, float] = {}
        self.batches: dict[int, list[dict[str, Any]]] = {}
        self.arrays: Optional[ArrayRecord] = None
        self._time: Optional[float] = None
        self._seen = 0

    def __call__(self, server_round: int, arrays: ArrayRecord) -> None:
        now, seen = time.perf_counter(), len(self.recorder.batches)
        if self._time is not None:
            self.seconds[server_round] = now - self._time
            self.batches[server_round] = self.recorder.batches[self._seen:seen]
            self.arrays = arrays
        self._time, self._seen = now, seen
        return None


def model_check(arrays: Optional[ArrayRecord], initial: ArrayRecord) -> dict[str, Any]:
    """What the run's final model is: its entries, whether all are finite, and how far its
    floating-point entries moved from ``initial`` (0: no training reached it)."""
    if arrays is None or not len(arrays):
        return {"entries": 0, "finite": False, "change": 0.0}
    change, finite = 0.0, True
    for key in initial.keys():
        if key not in arrays:
            return {"entries": len(arrays), "finite": False, "change": 0.0, "missing": key}
        value = np.asarray(arrays[key].numpy(), dtype=np.float64)
        finite = finite and bool(np.isfinite(value).all())
        if np.issubdtype(initial[key].numpy().dtype, np.floating):
            change = max(change, float(np.abs(value - initial[key].numpy()).max(initial=0.0)))
    return {"entries": len(arrays), "finite": finite, "change": change}


def _median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def run_secure_benchmark(grid: Grid, context: Context, initial: ArrayRecord) -> dict:
    """Server side of the benchmark; returns the measurements as a dict (see the module).

    The configurations take turns: each pass runs one round of each, in
    :data:`CONFIGURATIONS`' order; the first pass is the warm-up, the medians are over the
    ``bench-rounds`` passes after it, so a drift of the shared machine's speed touches every
    configuration alike.
    """
    from .bench_flower import FedTANRounds

    config = context.run_config
    rounds = int(config.get("bench-rounds", 3))
    seed = int(config.get("seed", 0))
    recorder = ExchangeRecorder(grid)
    nodes = sorted(recorder.get_node_ids())
    train_config = ConfigRecord({"lr": float(config["lr"]), "local-steps": int(config["local-steps"])})
    strategies = {name: FedTAN(fraction_evaluate=0.0, min_available_nodes=len(nodes), min_train_nodes=len(nodes),
                               statistics="running", seed=seed, **flags)
                  for name, flags in FEDTAN_CONFIGURATIONS.items()}
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGURATIONS}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedtan-bench-secure-") as folder:
        fedtan_rounds = FedTANRounds(recorder, initial, train_config, Path(folder))
        for _ in range(1 + rounds):
            for name in CONFIGURATIONS:
                if name in LEGACY_CONFIGURATIONS:
                    sample = _legacy_round(recorder, context, initial, LEGACY_CONFIGURATIONS[name])
                else:
                    sample = _fedtan_round(fedtan_rounds, strategies[name], recorder)
                samples[name].append(sample)
    measured: dict[str, Any] = {"nodes": len(nodes), "timed-rounds": rounds,
                                "model-bytes": record_bytes(_records(initial)),
                                "benchmark-seconds": time.perf_counter() - started, "configurations": {}}
    for name, taken in samples.items():
        timed = taken[1:]  # the first pass is the warm-up
        summary = {key: _median(sample[key] for sample in timed)
                   for key in timed[0] if key not in ("arrays", "restarts")}
        summary["rounds-seconds"] = [sample["round-seconds"] for sample in timed]
        summary["model"] = model_check(taken[-1]["arrays"], initial)
        if "restarts" in timed[0]:
            summary["restarts"] = sum(sample["restarts"] for sample in timed)
        measured["configurations"][name] = summary
    measured["ratios"] = ratios(measured["configurations"])
    return measured


def _legacy_round(recorder: ExchangeRecorder, context: Context, initial: ArrayRecord, secure: bool
                  ) -> dict[str, Any]:
    """The second round of a two-round run of Flower's legacy FedAvg (under SecAgg+ if
    ``secure``) from ``initial``: the steady state, for SecAgg+ returns the average in
    float64, so from round 2 on the global model it sends is twice a float32 one's bytes."""
    run = run_legacy_fedavg(recorder, context, context.run_config, initial, 2, secure=secure)
    return {"round-seconds": run.round_seconds[2], "round-bytes": run.round_bytes[2], "arrays": run.arrays}


def _fedtan_round(fedtan_rounds: Any, strategy: FedTAN, recorder: ExchangeRecorder) -> dict[str, Any]:
    """One FedTAN round of ``strategy`` from the initial model (the next round number)."""
    marks = _RoundMarks(recorder)
    result, (server_round,), _ = fedtan_rounds.run(strategy, 1, evaluate_fn=marks)
    ledger = result.train_metrics_clientapp[server_round]
    batches = marks.batches[server_round]
    final = _final_exchange(batches)
    return {
        "round-seconds": marks.seconds[server_round],
        "round-bytes": sum(b["sent"] + b["received"] for b in batches),
        "exchanges": len(batches),
        "ledger-bytes": int(ledger["fedtan-bytes-sent"]) + int(ledger["fedtan-bytes-received"]),
        "final-exchange-seconds": float(ledger["fedtan-final-exchange-seconds"]),
        "final-exchange-bytes": final["sent"] + final["received"],
        "restarts": int(ledger.get("fedtan-restarts", 0)),
        "arrays": marks.arrays,
    }


def _records(arrays: ArrayRecord) -> RecordDict:
    return RecordDict({"arrays": arrays})


def _final_exchange(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """The round's final exchange: its last batch of FedTAN messages (the last aggregate out,
    the models back)."""
    fedtan = [b for b in batches if b["type"].startswith("train")]
    if not fedtan:
        raise RuntimeError(f"no FedTAN exchange recorded in a round: {batches}")
    return fedtan[-1]


def ratios(configurations: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The benchmark's ratios (see the module's docstring)."""
    def ratio(a: str, b: str, key: str) -> float:
        denominator = float(configurations[b][key])
        return float(configurations[a][key]) / denominator if denominator else math.nan

    return {
        "secure-over-clear-round-seconds": ratio("fedtan-secure", "fedtan-clear", "round-seconds"),
        "secure-over-clear-round-bytes": ratio("fedtan-secure", "fedtan-clear", "round-bytes"),
        "secure-stats-over-clear-round-seconds": ratio("fedtan-secure-stats", "fedtan-clear", "round-seconds"),
        "secure-models-over-clear-round-seconds": ratio("fedtan-secure-models", "fedtan-clear", "round-seconds"),
        "secure-over-clear-final-seconds": ratio("fedtan-secure", "fedtan-clear", "final-exchange-seconds"),
        "secure-over-clear-final-bytes": ratio("fedtan-secure", "fedtan-clear", "final-exchange-bytes"),
        "secure-models-over-clear-final-seconds": ratio("fedtan-secure-models", "fedtan-clear",
                                                        "final-exchange-seconds"),
        "secure-models-over-clear-final-bytes": ratio("fedtan-secure-models", "fedtan-clear",
                                                      "final-exchange-bytes"),
        "fedtan-secure-over-secaggplus-round-seconds": ratio("fedtan-secure", "fedavg-secaggplus", "round-seconds"),
        "fedtan-secure-over-secaggplus-round-bytes": ratio("fedtan-secure", "fedavg-secaggplus", "round-bytes"),
        "secaggplus-over-legacy-round-seconds": ratio("fedavg-secaggplus", "fedavg-legacy", "round-seconds"),
        "secaggplus-over-legacy-round-bytes": ratio("fedavg-secaggplus", "fedavg-legacy", "round-bytes"),
    }


def format_report(bench: Mapping[str, Any]) -> str:
    """The benchmark's table, as printed."""
    lines = [f"nodes {bench['nodes']}, median of {bench['timed-rounds']} timed rounds (one a pass, after a "
             "warm-up pass); "
             f"model {bench['model-bytes'] / 1e6:.3f} MB"]
    width = max(map(len, bench["configurations"]))
    for name, c in bench["configurations"].items():
        line = (f"{name.ljust(width)}  round {c['round-seconds'] * 1e3:8.1f} ms  "
                f"{c['round-bytes'] / 1e6:7.3f} MB")
        if "final-exchange-seconds" in c:
            line += (f"  final exchange {c['final-exchange-seconds'] * 1e3:7.1f} ms "
                     f"{c['final-exchange-bytes'] / 1e6:6.3f} MB  ({c['exchanges']:.0f} exchanges, "
                     f"ledger {c['ledger-bytes'] / 1e6:.3f} MB, restarts {c['restarts']})")
        model = c["model"]
        line += f"  model: {model['entries']} entries, finite {model['finite']}, moved {model['change']:.3g}"
        lines.append(line)
    r = bench["ratios"]
    time_ok = r["secure-over-clear-round-seconds"] <= ROUND_TIME_TARGET
    cheaper = max(r["fedtan-secure-over-secaggplus-round-seconds"], r["fedtan-secure-over-secaggplus-round-bytes"]) < 1
    lines += [
        f"FedTAN secure (stats+models) / clear round: {r['secure-over-clear-round-seconds']:.2f} x time "
        f"(target <= {ROUND_TIME_TARGET}: {'met' if time_ok else 'NOT met'}), "
        f"{r['secure-over-clear-round-bytes']:.2f} x bytes",
        f"  secure stats only: {r['secure-stats-over-clear-round-seconds']:.2f} x time; "
        f"secure models only: {r['secure-models-over-clear-round-seconds']:.2f} x time",
        f"Final exchange, secure (stats+models) / clear: {r['secure-over-clear-final-seconds']:.2f} x time, "
        f"{r['secure-over-clear-final-bytes']:.2f} x bytes; secure models only / clear: "
        f"{r['secure-models-over-clear-final-seconds']:.2f} x time, "
        f"{r['secure-models-over-clear-final-bytes']:.2f} x bytes",
        f"FedTAN secure / FedAvg + SecAgg+ round: {r['fedtan-secure-over-secaggplus-round-seconds']:.2f} x time, "
        f"{r['fedtan-secure-over-secaggplus-round-bytes']:.2f} x bytes (target < 1: {'met' if cheaper else 'NOT met'})",
        f"SecAgg+ / legacy FedAvg clear round: {r['secaggplus-over-legacy-round-seconds']:.2f} x time, "
        f"{r['secaggplus-over-legacy-round-bytes']:.2f} x bytes",
    ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn", choices=("cnn", "resnet20"))
    parser.add_argument("--supernodes", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per configuration, after a warm-up")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--local-steps", type=int, default=1)
    parser.add_argument("--num-cpus-per-client", type=float, default=2.0)
    parser.add_argument("--json", type=Path, default=None, help="write the measurements here as JSON")
    args = parser.parse_args(argv)
    if args.supernodes < 2:
        parser.error("--supernodes must be at least 2 (secure aggregation needs two clients)")

    from .flower_processes import run_app

    summary = run_app(
        {"mode": "bench-secure", "bench-rounds": args.rounds, "model": args.model, "dataset": "synthetic",
         "batch-size": args.batch_size, "local-steps": args.local_steps, "partitioning": "iid"},
        num_supernodes=args.supernodes,
        num_cpus_per_client=args.num_cpus_per_client,
    )
    bench = summary["bench"]
    bench["model-name"], bench["wall-seconds"] = args.model, summary.get("wall-seconds")
    print(format_report(bench))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(bench, indent=2))
    return bench


if __name__ == "__main__":
    main()
