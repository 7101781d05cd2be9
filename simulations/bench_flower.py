"""Benchmark: a FedTAN round against a FedAvg round and an empty exchange, one federation.

Run::

    python -m simulations.bench_flower [--supernodes 5] [--rounds 3] [--model cnn]

It runs the app once with ``mode = "bench"`` (Flower simulation, Ray backend); the
ServerApp then measures, on the same nodes and in this order: empty exchanges (a
``query.ping`` message to every node and the replies back), Flower FedAvg rounds and
FedTAN rounds, all with the same model, data and ``local-steps``. It prints exchanges
and bytes per round and the ratio

    FedTAN_round / (FedAvg_round + 2L * empty_exchange)

(target <= 1.2): what FedTAN costs beyond FedAvg plus the bare latency of its 2L extra
exchanges (these rounds run with ``statistics="running"``: the round alone). Then the same
FedTAN rounds with ``secure_stats=True`` (masked statistics, one extra key exchange a
round): seconds and bytes per round against clear FedTAN. Last, FedTAN with its default
``statistics="exact"``: the statistics pass's seconds, exchanges and bytes per round against
the round alone (target for ResNet-20: pass <= 0.5 x round).

The FedTAN variants share the run's nodes, which refuse a round they have already passed:
they all have the same seed, and each starts from the initial model at the round after the
last one run (see :class:`FedTANRounds`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from flwr_fedtan import FedTAN
from flwr_fedtan.exact_statistics import DEFAULT_STATISTICS_EXAMPLES
from flwr_fedtan.protocol.wire import record_bytes

PING = "query.ping"


def empty_exchange(grid: Grid, nodes: list[int], poll_interval: float) -> float:
    """Seconds for one exchange of empty ``query.ping`` messages, pulled every ``poll_interval``."""
    started = time.perf_counter()
    messages = [Message(RecordDict(), dst_node_id=n, message_type=PING) for n in nodes]
    pending = set(grid.push_messages(messages))
    while pending:
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
        if pending:
            time.sleep(poll_interval)
    return time.perf_counter() - started


class FedTANRounds:
    """Runs FedTAN variants one after another in one Flower run, numbering their rounds on.

    A node refuses a begin for a round it has already passed, or with another run seed (a
    server must not make it redraw a batch): so every variant here has the same ``seed``,
    and each ``run`` starts from ``initial`` through a checkpoint written at the last round
    run so far, so its rounds are the next ones.
    """

    def __init__(self, grid: Grid, initial: ArrayRecord, train_config: ConfigRecord, folder: Path) -> None:
        self.grid, self.initial, self.train_config, self.folder = grid, initial, train_config, folder
        self.done = 0

    def run(self, strategy: FedTAN, num_rounds: int, evaluate_fn: Optional[Callable] = None
            ) -> tuple[Result, list[int], float]:
        """``num_rounds`` rounds of ``strategy`` from ``initial``: its result, the round numbers
        it ran, and its wall seconds per round. ``evaluate_fn`` goes to ``strategy.start``."""
        first = self.done + 1
        resume_from = None
        if self.done:
            resume_from = self.folder / f"after-round-{self.done}"
            strategy.save_checkpoint(resume_from, self.done, self.initial)
        started = time.perf_counter()
        result = strategy.start(grid=self.grid, initial_arrays=self.initial, num_rounds=self.done + num_rounds,
                                train_config=self.train_config, evaluate_fn=evaluate_fn, resume_from=resume_from)
        seconds = (time.perf_counter() - started) / num_rounds
        self.done += num_rounds
        return result, list(range(first, self.done + 1)), seconds


def run_exchange_benchmark(grid: Grid, config: Mapping[str, Any], initial: ArrayRecord) -> dict:
    """Server side of the benchmark; returns the measurements as a dict."""
    with tempfile.TemporaryDirectory(prefix="fedtan-bench-") as folder:
        return _measure(grid, config, initial, Path(folder))


def flower_floor(grid: Grid, nodes: list[int], initial: ArrayRecord, train_config: ConfigRecord,
                 poll_interval: float, rounds: int, empties: int) -> tuple[list[float], float]:
    """What Flower itself costs on these nodes, after a warm-up of each: the seconds of
    ``empties`` empty exchanges, and of a Flower FedAvg round (mean over ``rounds``)."""
    empty_exchange(grid, nodes, poll_interval)  # warm-up: actors start, imports
    empty = [empty_exchange(grid, nodes, poll_interval) for _ in range(empties)]
    fedavg = FedAvg(fraction_evaluate=0.0, min_available_nodes=len(nodes), min_train_nodes=len(nodes))
    fedavg.start(grid=grid, initial_arrays=initial, num_rounds=1, train_config=train_config)  # warm-up
    started = time.perf_counter()
    fedavg.start(grid=grid, initial_arrays=initial, num_rounds=rounds, train_config=train_config)
    return empty, (time.perf_counter() - started) / rounds


def _measure(grid: Grid, config: Mapping[str, Any], initial: ArrayRecord, folder: Path) -> dict:
    nodes = sorted(grid.get_node_ids())
    rounds = int(config.get("bench-rounds", 3))
    seed = int(config.get("seed", 0))
    train_config = ConfigRecord({"lr": float(config["lr"]), "local-steps": int(config["local-steps"])})
    fedtan = FedTAN(fraction_evaluate=0.0, min_available_nodes=len(nodes), min_train_nodes=len(nodes),
                    statistics="running", seed=seed)
    empty, fedavg_round = flower_floor(grid, nodes, initial, train_config, fedtan.poll_interval, rounds, empties=10)

    fedtan_rounds = FedTANRounds(grid, initial, train_config, folder)
    fedtan_rounds.run(fedtan, 1)  # warm-up
    result, timed, fedtan_round = fedtan_rounds.run(fedtan, rounds)

    secure = FedTAN(fraction_evaluate=0.0, min_available_nodes=len(nodes), min_train_nodes=len(nodes),
                    secure_stats=True, statistics="running", seed=seed)
    fedtan_rounds.run(secure, 1)  # warm-up
    secure_result, secure_timed, secure_round = fedtan_rounds.run(secure, rounds)
    secure_last = secure_result.train_metrics_clientapp[secure_timed[-1]]

    exact = FedTAN(fraction_evaluate=0.0, min_available_nodes=len(nodes), min_train_nodes=len(nodes),
                   statistics="exact", seed=seed,
                   statistics_examples=int(config.get("statistics-examples", DEFAULT_STATISTICS_EXAMPLES)))
    exact_result, exact_timed, exact_round = fedtan_rounds.run(exact, rounds)
    passes = [exact_result.train_metrics_clientapp[r] for r in exact_timed]

    last = result.train_metrics_clientapp[timed[-1]]
    exchanges = int(last["fedtan-exchanges"])
    calls = (exchanges - 1) // 2
    empty_seconds = statistics.median(empty)
    model_bytes = record_bytes(RecordDict({"arrays": initial}))
    return {
        "nodes": len(nodes),
        "bn-calls": calls,
        "empty-exchange-seconds": empty_seconds,
        "fedavg-round-seconds": fedavg_round,
        "fedtan-round-seconds": fedtan_round,
        "fedtan-exchanges-per-round": exchanges,
        "fedavg-exchanges-per-round": 1,
        "fedtan-bytes-per-round": int(last["fedtan-bytes-sent"]) + int(last["fedtan-bytes-received"]),
        "fedavg-bytes-per-round": 2 * len(nodes) * model_bytes,
        "fedtan-sync-wall-seconds": float(last["fedtan-sync-wall-seconds"]),
        "fedtan-final-exchange-seconds": float(last["fedtan-final-exchange-seconds"]),
        "client-sync-seconds": float(last.get("sync-seconds", float("nan"))),
        "client-local-seconds": float(last.get("local-seconds", float("nan"))),
        "client-replays": [float(result.train_metrics_clientapp[r].get("replays", float("nan")))
                           for r in timed],
        "ratio": fedtan_round / (fedavg_round + 2 * calls * empty_seconds),
        "secure-round-seconds": secure_round,
        "secure-exchanges-per-round": int(secure_last["fedtan-exchanges"]),
        "secure-bytes-per-round": int(secure_last["fedtan-bytes-sent"]) + int(secure_last["fedtan-bytes-received"]),
        "secure-client-sync-seconds": float(secure_last.get("sync-seconds", float("nan"))),
        "exact-round-seconds": exact_round,
        "pass-seconds": statistics.mean(float(m["fedtan-stats-seconds"]) for m in passes),
        "pass-exchanges": int(passes[-1]["fedtan-stats-exchanges"]),
        "pass-bytes": statistics.mean(
            int(m["fedtan-stats-bytes-sent"]) + int(m["fedtan-stats-bytes-received"]) for m in passes),
        "pass-examples": int(passes[-1]["fedtan-stats-examples"]),
        "pass-applied": [int(m["fedtan-stats-applied"]) for m in passes],
    }


def format_report(bench: Mapping[str, Any]) -> str:
    """The benchmark's table, as printed."""
    rows = [
        ("nodes", f"{bench['nodes']}"),
        ("BatchNorm calls L", f"{bench['bn-calls']}"),
        ("empty exchange (median of 10)", f"{bench['empty-exchange-seconds'] * 1e3:.1f} ms"),
        ("FedAvg round", f"{bench['fedavg-round-seconds'] * 1e3:.1f} ms, 1 exchange, "
                         f"{bench['fedavg-bytes-per-round'] / 1e6:.2f} MB"),
        ("FedTAN round", f"{bench['fedtan-round-seconds'] * 1e3:.1f} ms, "
                         f"{bench['fedtan-exchanges-per-round']} exchanges, "
                         f"{bench['fedtan-bytes-per-round'] / 1e6:.2f} MB"),
        ("  first 2L exchanges (server wall)", f"{bench['fedtan-sync-wall-seconds'] * 1e3:.1f} ms"),
        ("  last exchange (local steps, models)", f"{bench['fedtan-final-exchange-seconds'] * 1e3:.1f} ms"),
        ("  client: synchronised step compute", f"{bench['client-sync-seconds'] * 1e3:.1f} ms (mean per client)"),
        ("  client: local steps compute", f"{bench['client-local-seconds'] * 1e3:.1f} ms (mean per client)"),
        ("  replays per client per round", ", ".join(f"{r:.2f}" for r in bench["client-replays"])
                                           + f"  (of {2 * bench['bn-calls']} aggregate messages)"),
        ("FedTAN / (FedAvg + 2L x empty)", f"{bench['ratio']:.2f}  (target <= 1.2)"),
        ("FedTAN round, secure statistics", f"{bench['secure-round-seconds'] * 1e3:.1f} ms, "
                                            f"{bench['secure-exchanges-per-round']} exchanges, "
                                            f"{bench['secure-bytes-per-round'] / 1e6:.2f} MB"),
        ("  client: synchronised step compute", f"{bench['secure-client-sync-seconds'] * 1e3:.1f} ms "
                                                "(mean per client)"),
        ("  secure / clear FedTAN", f"{bench['secure-round-seconds'] / bench['fedtan-round-seconds']:.2f} x time, "
                                    f"{bench['secure-bytes-per-round'] / bench['fedtan-bytes-per-round']:.2f} x bytes"),
        ("FedTAN round with the statistics pass", f"{bench['exact-round-seconds'] * 1e3:.1f} ms"),
        ("  statistics pass", f"{bench['pass-seconds'] * 1e3:.1f} ms, {bench['pass-exchanges']} exchanges, "
                              f"{bench['pass-bytes'] / 1e6:.2f} MB, {bench['pass-examples']} examples pooled, "
                              f"applied {bench['pass-applied']}"),
        ("  pass / FedTAN round", f"{bench['pass-seconds'] / bench['fedtan-round-seconds']:.2f} x time, "
                                  f"{bench['pass-bytes'] / bench['fedtan-bytes-per-round']:.2f} x bytes  "
                                  "(target <= 0.5 x time for ResNet-20)"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--supernodes", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--local-steps", type=int, default=1)
    parser.add_argument("--num-cpus-per-client", type=float, default=2.0)
    parser.add_argument("--statistics-examples", type=int, default=DEFAULT_STATISTICS_EXAMPLES)
    args = parser.parse_args()

    from .flower_processes import run_app

    summary = run_app(
        {
            "mode": "bench",
            "bench-rounds": args.rounds,
            "model": args.model,
            "dataset": args.dataset,
            "batch-size": args.batch_size,
            "local-steps": args.local_steps,
            "statistics-examples": args.statistics_examples,
            "partitioning": "iid",
        },
        num_supernodes=args.supernodes,
        num_cpus_per_client=args.num_cpus_per_client,
    )
    print(format_report(summary["bench"]))


if __name__ == "__main__":
    main()
