"""Benchmark: FedTAN with many simulated nodes on one machine (2 ClientAppActors).

Run (the whole grid takes hours; nice it on a shared machine)::

    nice -n 19 python -m simulations.bench_scale                        # CNN 5..200, ResNet-20 5..200
    nice -n 19 python -m simulations.bench_scale --point cnn:5 --point cnn:20 --rounds 1

Each point ``MODEL:NODES[:BATCH]`` runs the app once with ``mode = "bench-scale"`` (Flower
simulation, Ray backend, two ClientAppActors: ``client-resources-num-cpus`` is half the
machine's CPUs) on synthetic data. The ServerApp measures, on the same nodes: empty
exchanges, Flower FedAvg rounds and FedTAN rounds (``statistics="running"``, the round
alone), each after a warm-up round (FedTAN's in the same run: a node refuses a new run's
round 1 as stale). Printed per point: the FedTAN round's wall time, the
ratio ``FedTAN / (FedAvg + 2L x empty exchange)`` of :mod:`.bench_flower`, the replays per
client per round, the homes' paused-round bytes at their peak (``live-bytes``) and the
peak memory of the whole run: the sum over its processes (SuperLink, simulation, Ray
workers and homes), sampled every half second, of the proportional set size (PSS, shared
pages split between the processes sharing them) and of the resident set size (RSS, shared
pages counted in each).

Every process runs under a private ``FLWR_HOME`` and ports and is stopped by PID at the
end (:mod:`.flower_processes`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from flwr_fedtan import FedTAN

from .bench_flower import flower_floor

DEFAULT_POINTS = tuple(f"cnn:{n}" for n in (5, 20, 50, 100, 200)) + tuple(
    f"resnet20:{n}" for n in (5, 20, 50, 100)) + ("resnet20:200:16",)


def run_scale_benchmark(grid: Grid, config: Mapping[str, Any], initial: ArrayRecord) -> dict:
    """Server side of one point; returns its measurements."""
    nodes = sorted(grid.get_node_ids())
    rounds = int(config.get("bench-rounds", 2))
    train_config = ConfigRecord({"lr": float(config["lr"]), "local-steps": int(config["local-steps"])})
    fedtan = FedTAN(fraction_evaluate=0.0, min_available_nodes=len(nodes), min_train_nodes=len(nodes),
                    statistics="running")
    empty, fedavg_round = flower_floor(grid, nodes, initial, train_config, fedtan.poll_interval, rounds, empties=5)

    # One run of 1 + rounds rounds, the first a warm-up (homes start): a node refuses a second
    # run's round 1 as stale. The warm-up's time outside its exchanges stays in (conservative).
    started = time.perf_counter()
    result = fedtan.start(grid=grid, initial_arrays=initial, num_rounds=1 + rounds, train_config=train_config)
    warm_up = float(result.train_metrics_clientapp[1]["fedtan-round-seconds"])
    fedtan_round = (time.perf_counter() - started - warm_up) / rounds

    per_round = [result.train_metrics_clientapp[r] for r in range(2, rounds + 2)]
    exchanges = int(per_round[-1]["fedtan-exchanges"])
    calls = (exchanges - 1) // 2
    empty_seconds = statistics.median(empty)
    return {
        "nodes": len(nodes),
        "bn-calls": calls,
        "empty-exchange-seconds": empty_seconds,
        "fedavg-round-seconds": fedavg_round,
        "fedtan-round-seconds": fedtan_round,
        "ratio": fedtan_round / (fedavg_round + 2 * calls * empty_seconds),
        "client-replays": [float(m.get("replays", float("nan"))) for m in per_round],
        "live-bytes": [float(m.get("live-bytes", float("nan"))) for m in per_round],
    }


# ---------------------------------------------------------------------- memory of the run
def _memory_kb(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of a process in kB; zeros if it is gone."""
    pss = rss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return pss, rss


class PeakMemory:
    """Samples the summed PSS and RSS of a harness's processes every ``interval`` s."""

    def __init__(self, token: str, interval: float = 0.5) -> None:
        self.token, self.interval = token, interval
        self.peak_pss = self.peak_rss = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        from .flower_processes import related_processes

        while not self._stop.wait(self.interval):
            pids = related_processes([], self.token)
            sizes = [_memory_kb(pid) for pid in pids]
            pss, rss = sum(s[0] for s in sizes), sum(s[1] for s in sizes)
            if pss > self.peak_pss:
                self.peak_pss, self.peak_processes = pss, len(pids)
            self.peak_rss = max(self.peak_rss, rss)


# ---------------------------------------------------------------------- one point, the report
def parse_point(text: str, batch_size: int) -> tuple[str, int, int]:
    """``"MODEL:NODES[:BATCH]"`` as (model, nodes, batch size)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise argparse.ArgumentTypeError(f"a point is MODEL:NODES[:BATCH], e.g. cnn:50 or resnet20:200:16; "
                                         f"got {text!r}")
    try:
        return parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else batch_size
    except ValueError:
        raise argparse.ArgumentTypeError(f"NODES and BATCH must be integers in {text!r}") from None


def run_point(model: str, nodes: int, batch_size: int, rounds: int, cpus_per_client: float,
              env: Optional[Mapping[str, str]] = None, timeout: float = 6 * 3600.0) -> dict:
    """One point, in its own Flower simulation; the server's measurements and the memory."""
    from . import flower_processes

    session = flower_processes._simulation_session(env)
    with PeakMemory(session.token) as memory:
        started = time.perf_counter()
        summary = flower_processes.run_app(
            {"mode": "bench-scale", "bench-rounds": rounds, "model": model, "dataset": "synthetic",
             "batch-size": batch_size, "local-steps": 1, "partitioning": "iid", "num-partitions": nodes},
            num_supernodes=nodes, num_cpus_per_client=cpus_per_client, env=env, timeout=timeout)
        wall = time.perf_counter() - started
    return {**summary["bench"], "model": model, "batch-size": batch_size, "run-seconds": wall,
            "peak-pss-bytes": memory.peak_pss * 1024, "peak-rss-bytes": memory.peak_rss * 1024,
            "peak-processes": memory.peak_processes}


HEADER = ("model", "nodes", "batch", "round s", "ratio", "replays/client/round", "live-bytes MB",
          "peak PSS GB", "peak RSS GB", "procs")


def format_row(point: Mapping[str, Any]) -> tuple[str, ...]:
    return (point["model"], str(point["nodes"]), str(point["batch-size"]), f"{point['fedtan-round-seconds']:.2f}",
            f"{point['ratio']:.2f}", ", ".join(f"{r:.2f}" for r in point["client-replays"]),
            f"{max(point['live-bytes']) / 1e6:.1f}", f"{point['peak-pss-bytes'] / 1e9:.2f}",
            f"{point['peak-rss-bytes'] / 1e9:.2f}", str(point["peak-processes"]))


def format_table(points: list[Mapping[str, Any]]) -> str:
    rows = [HEADER] + [format_row(p) for p in points]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--point", action="append", default=None,
                        help="MODEL:NODES[:BATCH], repeatable (default: " + " ".join(DEFAULT_POINTS) + ")")
    parser.add_argument("--rounds", type=int, default=2, help="timed FedAvg and FedTAN rounds per point")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-cpus-per-client", type=float, default=max(1, (os.cpu_count() or 2) // 2),
                        help="Ray CPUs per ClientApp (default: half the CPUs, so 2 ClientAppActors)")
    parser.add_argument("--homes", type=int, default=0,
                        help="Ray home actors (FEDTAN_RAY_HOMES; default: one per ClientAppActor)")
    parser.add_argument("--json", default="", help="also write every point's measurements to this file")
    args = parser.parse_args()
    points = [parse_point(p, args.batch_size) for p in (args.point or DEFAULT_POINTS)]

    from . import flower_processes

    results: list[dict] = []
    try:
        for model, nodes, batch in points:
            env = {"FEDTAN_RAY_HOMES": str(args.homes)} if args.homes > 0 else None
            results.append(run_point(model, nodes, batch, args.rounds, args.num_cpus_per_client, env=env))
            print(format_table(results[-1:]), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        if flower_processes._session is not None:
            killed = flower_processes._session.stop()
            if killed:
                print(f"needed SIGKILL: {killed}")
    print()
    print(format_table(results))


if __name__ == "__main__":
    main()
