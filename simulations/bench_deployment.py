"""Benchmark: FedTAN's exchanges in a loopback deployment against Flower's own floor.

Run::

    python -m simulations.bench_deployment [--model resnet20] [--supernodes 3] [--pings 8]

It starts a SuperLink and ``--supernodes`` SuperNodes on loopback (private FLWR_HOME and
ports; everything they spawn, node workers included, is stopped by PID at the end) and
runs the app once with ``mode = "bench-deployment"``. The ServerApp measures, in one run,
with the same push/pull loop as FedTAN's strategy (pull every ``poll_interval``):

(a) empty exchanges: a ``query.ping`` message to every node, answered at once by the
    light ClientApp process (``simulations/app/node_app.py``, which imports Flower only);
(b) the exchanges of ``bench-rounds`` real FedTAN rounds (2L + 1 each).

It prints where the time goes, and as its last line
``FedTAN exchange / empty exchange = X.XX`` (medians; target <= 1.5 for ResNet-20 with 3
SuperNodes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from flwr_fedtan.exact_statistics import DEFAULT_STATISTICS_EXAMPLES

from .bench_flower import PING, empty_exchange

BACKOFF_SECONDS = 0.5  # a pull slower than this waited (Flower's object-pull back-off is 1 s +- 20%, or load)


class TimingGrid(Grid):
    """Forwards to a Grid; times each exchange (push until the last reply is pulled) and
    each ``pull_messages`` call."""

    def __init__(self, grid: Grid) -> None:
        self.inner = grid
        self.exchanges: list[dict[str, Any]] = []
        self.pull_seconds: list[float] = []
        self._open: dict[str, dict[str, Any]] = {}

    # Grid API, forwarded
    @property
    def run(self):  # pragma: no cover - not used here
        return self.inner.run

    def set_run(self, run_id: int) -> None:  # pragma: no cover
        self.inner.set_run(run_id)

    def create_message(self, *args, **kwargs):  # pragma: no cover
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        started = time.perf_counter()
        ids = list(self.inner.push_messages(messages))
        kind = messages[0].metadata.message_type if messages else ""
        record = {"type": kind, "started": started, "pending": set(ids), "seconds": None}
        self.exchanges.append(record)
        for mid in ids:
            self._open[mid] = record
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        started = time.perf_counter()
        replies = list(self.inner.pull_messages(message_ids))
        now = time.perf_counter()
        self.pull_seconds.append(now - started)
        for reply in replies:
            record = self._open.pop(reply.metadata.reply_to_message_id, None)
            if record is not None:
                record["pending"].discard(reply.metadata.reply_to_message_id)
                if not record["pending"]:
                    record["seconds"] = now - record["started"]
        return replies

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - not used here
        return self.inner.send_and_receive(messages, timeout=timeout)

    def seconds(self, kind: str) -> list[float]:
        return [e["seconds"] for e in self.exchanges if e["type"] == kind and e["seconds"] is not None]


@contextlib.contextmanager
def counted_pull_backoffs(counter: dict, initial: Optional[float] = None, cap: float = 1.0):
    """Within the block, count the retries of ``HttpGrid.pull_messages`` (a reply whose
    objects were not uploaded yet: each one waits Flower's back-off, 1 s at first) in
    ``counter["retries"]``; with ``initial``, wait that long instead (a measured proposal,
    not used by FedTAN itself: both replace a name inside Flower's module)."""
    from flwr.superlink.grid import http_grid
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    original = http_grid.pull_objects

    def pull_objects(object_ids, pull_object_fn, **kwargs):
        def counted(object_id):
            try:
                return pull_object_fn(object_id)
            except ObjectUnavailableError:
                counter["retries"] = counter.get("retries", 0) + 1
                raise

        if initial is not None:
            kwargs.update(initial_backoff=initial, backoff_cap=cap)
        return original(object_ids, counted, **kwargs)

    http_grid.pull_objects = pull_objects
    try:
        yield counter
    finally:
        http_grid.pull_objects = original


def run_deployment_benchmark(grid: Grid, config: Mapping[str, Any], initial: ArrayRecord) -> dict:
    """Server side of the benchmark (``mode = "bench-deployment"``, or
    ``"bench-deployment-short-backoff"``: Flower's pull back-off at 0.05 s), counting the
    pulls that waited for it (:func:`counted_pull_backoffs`)."""
    short = str(config.get("mode", "")).endswith("-short-backoff")
    counter: dict = {}
    with counted_pull_backoffs(counter, initial=0.05 if short else None):
        bench = _run_deployment_benchmark(grid, config, initial, counter)
    bench["pull-backoff-initial-seconds"] = 0.05 if short else 1.0
    return bench


def _run_deployment_benchmark(grid: Grid, config: Mapping[str, Any], initial: ArrayRecord, counter: dict) -> dict:
    from flwr_fedtan import FedTAN
    from flwr_fedtan.protocol.wire import MESSAGE_TYPE

    timing = TimingGrid(grid)
    nodes = sorted(grid.get_node_ids())
    rounds = int(config.get("bench-rounds", 1))
    pings = int(config.get("num-server-rounds", 8))
    # The round alone (statistics="running"); the statistics pass is timed from its own metrics.
    exact_pass = str(config.get("statistics", "running")) == "exact"
    fedtan = FedTAN(fraction_evaluate=0.0, min_available_nodes=len(nodes), min_train_nodes=len(nodes),
                    statistics="exact" if exact_pass else "running",
                    statistics_examples=int(config.get("statistics-examples", DEFAULT_STATISTICS_EXAMPLES)))
    empty_exchange(timing, nodes, fedtan.poll_interval)  # warm-up: first process starts, caches
    for _ in range(pings):
        empty_exchange(timing, nodes, fedtan.poll_interval)
    empty = timing.seconds(PING)[1:]
    pulls_before = len(timing.pull_seconds)
    retries_before = counter.get("retries", 0)

    train_config = ConfigRecord({"lr": float(config["lr"]), "local-steps": int(config["local-steps"])})
    result = fedtan.start(grid=timing, initial_arrays=initial, num_rounds=rounds, train_config=train_config)
    fedtan_exchanges = timing.seconds(MESSAGE_TYPE)
    pulls = timing.pull_seconds[pulls_before:]
    metrics = [result.train_metrics_clientapp[r] for r in range(1, rounds + 1)]
    exchanges_per_round = int(metrics[-1]["fedtan-exchanges"])
    return {
        "nodes": len(nodes),
        "bn-calls": (exchanges_per_round - 1) // 2,
        "poll-interval": fedtan.poll_interval,
        "empty-exchange-seconds": empty,
        "fedtan-exchange-seconds": fedtan_exchanges,
        "fedtan-round-seconds": [float(m["fedtan-round-seconds"]) for m in metrics],
        "fedtan-exchanges-per-round": exchanges_per_round,
        "fedtan-clients": [int(m["fedtan-clients"]) for m in metrics],
        "client-sync-seconds": [float(m.get("sync-seconds", float("nan"))) for m in metrics],
        "client-local-seconds": [float(m.get("local-seconds", float("nan"))) for m in metrics],
        "client-replays": [float(m.get("replays", float("nan"))) for m in metrics],
        "fedtan-pulls": len(pulls),
        "fedtan-pull-backoffs": sum(1 for s in pulls if s > BACKOFF_SECONDS),
        "fedtan-pull-seconds-max": max(pulls) if pulls else 0.0,
        "fedtan-pull-backoff-seconds": sum(s for s in pulls if s > BACKOFF_SECONDS),
        "pass-seconds": [float(m.get("fedtan-stats-seconds", float("nan"))) for m in metrics],
        "pass-exchanges": int(metrics[-1].get("fedtan-stats-exchanges", 0)),
        "pass-bytes": [int(m.get("fedtan-stats-bytes-sent", 0)) + int(m.get("fedtan-stats-bytes-received", 0))
                       for m in metrics],
        "fedtan-object-retries": counter.get("retries", 0) - retries_before,
        "empty-object-retries": retries_before,
        "empty-pull-backoffs": sum(1 for s in timing.pull_seconds[:pulls_before] if s > BACKOFF_SECONDS),
    }


def _import_seconds(statement: str) -> float:
    """Wall seconds of a fresh Python process that runs ``statement`` (median of 3)."""
    times = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=True, cwd=Path(__file__).resolve().parents[1],
                       stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def format_report(bench: Mapping[str, Any], imports: Optional[Mapping[str, float]] = None) -> str:
    """The benchmark's table; its last line is the ratio."""
    empty = statistics.median(bench["empty-exchange-seconds"])
    exchanges = bench["fedtan-exchange-seconds"]
    fedtan = statistics.median(exchanges)
    per_round = bench["fedtan-exchanges-per-round"]
    sync = statistics.mean(bench["client-sync-seconds"]) / per_round
    rows = [
        ("SuperNodes", f"{bench['nodes']}"),
        ("BatchNorm calls L", f"{bench['bn-calls']} ({per_round} exchanges per round)"),
        ("server poll interval", f"{bench['poll-interval'] * 1e3:.0f} ms"),
        ("empty exchange", f"median {empty:.2f} s, min {min(bench['empty-exchange-seconds']):.2f} s, "
                           f"max {max(bench['empty-exchange-seconds']):.2f} s "
                           f"(n={len(bench['empty-exchange-seconds'])})"),
        ("FedTAN exchange", f"median {fedtan:.2f} s, mean {statistics.mean(exchanges):.2f} s, "
                            f"min {min(exchanges):.2f} s, max {max(exchanges):.2f} s (n={len(exchanges)})"),
        ("FedTAN round", ", ".join(f"{s:.1f} s" for s in bench["fedtan-round-seconds"])
                         + f" ({bench['fedtan-clients'][-1]} clients)"),
        ("  client handler compute per exchange", f"{sync * 1e3:.0f} ms (synchronised step, mean per client, "
                                                  "in the node worker)"),
        ("  client local steps (last exchange)", f"{statistics.mean(bench['client-local-seconds']) * 1e3:.0f} ms"),
        ("  replays per client per round", ", ".join(f"{r:.2f}" for r in bench["client-replays"])),
        ("  pulls that waited for a reply's upload", f"{bench.get('fedtan-object-retries', '?')} (FedTAN), "
                                                     f"{bench.get('empty-object-retries', '?')} (empty); back-off "
                                                     f"{bench.get('pull-backoff-initial-seconds', 1.0):g} s"),
        ("  pulls slower than 0.5 s", f"{bench['fedtan-pull-backoffs']} of {bench['fedtan-pulls']} "
                                                  f"(FedTAN), {bench['empty-pull-backoffs']} (empty); "
                                                  f"{bench['fedtan-pull-backoff-seconds']:.1f} s in all; "
                                                  f"slowest pull {bench['fedtan-pull-seconds-max']:.2f} s"),
        ("  the rest of an exchange", f"{max(fedtan - sync, 0):.2f} s: Flower (SuperNode polling, SuperExec, "
                                      "flwr-clientapp process) and the worker hop"),
    ]
    if bench.get("pass-exchanges"):
        round_seconds = statistics.mean(bench["fedtan-round-seconds"])
        pass_seconds = statistics.mean(bench["pass-seconds"])
        rows.append(("statistics pass", f"{pass_seconds:.1f} s, {bench['pass-exchanges']} exchanges, "
                                        f"{statistics.mean(bench['pass-bytes']) / 1e6:.2f} MB; "
                                        f"{pass_seconds / (round_seconds - pass_seconds):.2f} x the round alone"))
    for name, seconds in (imports or {}).items():
        rows.append((f"  fresh process: {name}", f"{seconds:.2f} s"))
    rows.append(("FedTAN exchange / empty exchange", f"{fedtan / empty:.2f}"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name.ljust(width)}  {value}" for name, value in rows[:-1]]
    lines.append(f"FedTAN exchange / empty exchange = {fedtan / empty:.2f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--supernodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="FedTAN rounds measured")
    parser.add_argument("--pings", type=int, default=8, help="empty exchanges measured (after one warm-up)")
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--statistics", choices=("running", "exact"), default="running",
                        help="'exact': FedTAN's statistics pass after each round, timed on its own")
    parser.add_argument("--short-pull-backoff", action="store_true",
                        help="measure with Flower's object-pull back-off at 0.05 s instead of 1 s (a proposal)")
    args = parser.parse_args(argv)

    from .flower_processes import PROJECT_ROOT, FlowerProcesses

    root = Path(tempfile.mkdtemp(prefix="fedtan-bench-deploy-"))
    flower = FlowerProcesses(root)
    try:
        superlink = flower.start_superlink(simulation=False)
        flower.add_connection("bench-deployment", superlink)
        for partition in range(args.supernodes):
            flower.start_supernode(superlink, {"partition-id": partition, "num-partitions": args.supernodes},
                                   name=f"supernode-{partition}")
        flower.wait_for_nodes(args.supernodes)
        results = root / "bench.json"
        outcome = flower.run_app(
            PROJECT_ROOT, connection="bench-deployment", timeout=args.timeout,
            run_config={"mode": "bench-deployment" + ("-short-backoff" if args.short_pull_backoff else ""),
                        "model": args.model, "dataset": args.dataset,
                        "partitioning": "iid", "batch-size": args.batch_size, "local-steps": 1,
                        "bench-rounds": args.rounds, "num-server-rounds": args.pings,
                        "statistics": args.statistics,
                        "results-file": str(results)},
        )
        if outcome.status != "finished:completed" or not results.exists():
            raise SystemExit(f"run {outcome.run_id} ended {outcome.status} ({outcome.details}):\n"
                             f"{outcome.output[-4000:]}")
        bench = json.loads(results.read_text())["bench"]
    finally:
        killed = flower.stop()
        left = flower.remaining()
        if killed or left:
            print(f"teardown: SIGKILL needed for {killed}; still alive: {sorted(left)}", file=sys.stderr)
    shutil.rmtree(root, ignore_errors=True)  # kept (with the logs) only when the run failed
    imports = {
        "python + flwr + the light ClientApp module": _import_seconds("import simulations.app.node_app"),
        "python + import torch": _import_seconds("import torch"),
    }
    print(format_report(bench, imports))


if __name__ == "__main__":
    main()
