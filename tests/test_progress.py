"""A long round shows what it is doing: per-exchange progress lines (rate-limited), a summary
line per round and per statistics pass, the same figures in the round's metrics, and the
time-per-round panel of ``simulations.experiments.compare``'s plots.

Exchanges run on the in-process Grid with a fake clock that only the Grid advances: each
exchange takes exactly the seconds the test gives it, so every figure is known in advance.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from flwr.app import Message

from flwr_fedtan import FedTAN, FedTANClient, fedtan_client_app, progress
from flwr_fedtan.errors import InvalidArgumentsError
from flwr_fedtan.client import clear_live_rounds
from flwr_fedtan.progress import ExchangeProgress, ExchangeTiming

from _grid import LocalGrid
from _runtime_app import NUM_BN_CALLS, SmallNet, client_data, initial_arrays

BATCH_SIZES = [5, 8, 11]
NODES = [1000, 1007, 1014]  # LocalGrid's node ids for 3 nodes
ROUND_EXCHANGES = 2 * NUM_BN_CALLS + 1  # sync_steps=1
PASS_EXCHANGES = NUM_BN_CALLS + 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TimedGrid(LocalGrid):
    """Exchange ``k`` (counted from 1 over the whole run) takes ``seconds(k)`` on the fake
    clock; the reply of ``late(k)`` (a node, or None) is held back from the first pull, so
    that node's reply comes last."""

    def __init__(self, clock: FakeClock, seconds, late=lambda k: None, **kwargs) -> None:
        app = fedtan_client_app(make_client)
        super().__init__(app, 3, {}, **kwargs)
        self.clock, self.seconds, self.late = clock, seconds, late
        self.exchanges = 0
        self._held: set[str] = set()

    def push_messages(self, messages):
        messages = list(messages)
        self.exchanges += 1
        ids = list(super().push_messages(messages))
        self.clock.now += self.seconds(self.exchanges)
        late = self.late(self.exchanges)
        self._held = {i for i, m in zip(ids, messages) if m.metadata.dst_node_id == late}
        return ids

    def pull_messages(self, message_ids):
        message_ids = list(message_ids)
        held, self._held = self._held, set()
        return super().pull_messages([i for i in message_ids if i not in held])


def make_client(context) -> FedTANClient:
    pid = int(context.node_config["partition-id"])
    torch.manual_seed(999)
    return FedTANClient(SmallNet().double(), client_data(pid), batch_size=BATCH_SIZES[pid], lr=0.1, local_steps=2)


@pytest.fixture(autouse=True)
def _fresh_live_rounds():
    clear_live_rounds()
    yield
    clear_live_rounds()


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(progress, "clock", fake)
    return fake


def run(grid, rounds=1, **kwargs):
    kwargs.setdefault("statistics", "running")
    strategy = FedTAN(min_available_nodes=3, fraction_evaluate=0.0, poll_interval=0.001, **kwargs)
    return strategy, strategy.start(grid, initial_arrays(), num_rounds=rounds)


def lines(caplog, prefix: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "flwr" and r.getMessage().startswith(prefix)]


def exchange_lines(caplog, prefix: str) -> list[str]:
    return [line for line in lines(caplog, prefix) if ": exchange " in line]


def test_every_exchange_logged_with_index_phase_call_seconds_and_slowest_node(clock, caplog):
    # Exchange k of a round takes k seconds; node 1014 replies last in exchanges 1-4, 1000 after.
    grid = TimedGrid(clock, seconds=lambda k: (k - 1) % ROUND_EXCHANGES + 1,
                     late=lambda k: NODES[2] if (k - 1) % ROUND_EXCHANGES < 4 else NODES[0])
    with caplog.at_level(logging.INFO, logger="flwr"):
        _, result = run(grid, rounds=2, progress_interval=0)
    for server_round in (1, 2):
        logged = exchange_lines(caplog, f"FedTAN round {server_round}:")
        assert logged == [  # L = 3 is known from the first backward sync point on
            f"FedTAN round {server_round}: exchange 1 (step 1, forward, BatchNorm call 0): 1.00 s, slowest node 1014",
            f"FedTAN round {server_round}: exchange 2 (step 1, forward, BatchNorm call 1): 2.00 s, slowest node 1014",
            f"FedTAN round {server_round}: exchange 3 (step 1, forward, BatchNorm call 2): 3.00 s, slowest node 1014",
            f"FedTAN round {server_round}: exchange 4/7 (step 1, backward, BatchNorm call 2): 4.00 s, "
            "slowest node 1014",
            f"FedTAN round {server_round}: exchange 5/7 (step 1, backward, BatchNorm call 1): 5.00 s, "
            "slowest node 1000",
            f"FedTAN round {server_round}: exchange 6/7 (step 1, backward, BatchNorm call 0): 6.00 s, "
            "slowest node 1000",
            f"FedTAN round {server_round}: exchange 7/7 (local steps and final models): 7.00 s, slowest node 1000",
        ]
        metrics = result.train_metrics_clientapp[server_round]
        # The synchronised step's exchanges 1-6 (the final one has its own metric).
        assert metrics["fedtan-exchange-seconds-median"] == pytest.approx(3.5)
        assert metrics["fedtan-exchange-seconds-max"] == pytest.approx(6.0)
        assert metrics["fedtan-slowest-node"] == NODES[2] and metrics["fedtan-slowest-node-exchanges"] == 4
        assert metrics["fedtan-replays"] == 0 and metrics["fedtan-exchanges"] == ROUND_EXCHANGES
        summary, = lines(caplog, f"FedTAN round {server_round} done in ")
        assert ": 7 exchanges; " in summary
        assert "3.50 s median, 6.00 s max per exchange (over 6), slowest node 1014 in 4" in summary
        assert f"{metrics['fedtan-bytes-sent'] / 1e3:.2f} kB sent" in summary
        assert summary.endswith("0 replays; 0 restarts; 0 dropped")


def test_progress_lines_are_rate_limited_and_replays_counted(clock, caplog):
    # Every exchange takes 4 s, one line at most every 10 s: exchange 1 (forced, t=4),
    # exchange 4 (t=16, 12 s after the last line), exchange 7 (the last, forced).
    grid = TimedGrid(clock, seconds=lambda k: 4.0, separate_processes=True)
    with caplog.at_level(logging.INFO, logger="flwr"):
        _, result = run(grid, rounds=1, progress_interval=10)
    logged = exchange_lines(caplog, "FedTAN round 1:")
    assert [re.search(r"exchange (\S+)", line).group(1) for line in logged] == ["1", "4/7", "7/7"]
    metrics = result.train_metrics_clientapp[1]
    # Every message after the first lands in a fresh process: 6 replays per client.
    assert metrics["fedtan-replays"] == 3 * 2 * NUM_BN_CALLS
    assert metrics["fedtan-exchange-seconds-median"] == metrics["fedtan-exchange-seconds-max"] == 4.0
    summary, = lines(caplog, "FedTAN round 1 done in ")
    assert "18 replays" in summary


def test_no_per_exchange_line_with_interval_none_but_the_summary_and_metrics_stay(clock, caplog):
    grid = TimedGrid(clock, seconds=lambda k: 2.0)
    with caplog.at_level(logging.INFO, logger="flwr"):
        _, result = run(grid, rounds=1, progress_interval=None)
    assert exchange_lines(caplog, "FedTAN round 1:") == []
    assert len(lines(caplog, "FedTAN round 1 done in ")) == 1
    assert result.train_metrics_clientapp[1]["fedtan-exchange-seconds-median"] == 2.0


def test_a_restart_is_logged_as_the_next_attempt_and_only_its_exchanges_are_timed(clock, caplog):
    """Node 1007 never answers its first message: dropped after the timeout, the step restarts
    with two clients; the 7 exchanges of attempt 2 say so."""
    first = set()

    def silent_once(node, message: Message):
        if node == NODES[1] and node not in first:
            first.add(node)
            return False
        return None

    grid = TimedGrid(clock, seconds=lambda k: 1.0 if k == 1 else 2.0, intercept=silent_once)
    with caplog.at_level(logging.INFO, logger="flwr"):
        _, result = run(grid, rounds=1, progress_interval=0, exchange_timeout=0.05)
    logged = exchange_lines(caplog, "FedTAN round 1:")
    assert len(logged) == ROUND_EXCHANGES and all(", attempt 2)" in line for line in logged)
    assert logged[0].startswith("FedTAN round 1: exchange 1 (step 1, forward, BatchNorm call 0, attempt 2): 2.00 s")
    metrics = result.train_metrics_clientapp[1]
    assert metrics["fedtan-exchanges"] == 1 + ROUND_EXCHANGES and metrics["fedtan-restarts"] == 1
    assert metrics["fedtan-exchange-seconds-median"] == metrics["fedtan-exchange-seconds-max"] == 2.0
    summary, = lines(caplog, "FedTAN round 1 done in ")
    assert summary.endswith("1 restarts; 1 dropped")


def test_the_statistics_pass_logs_its_exchanges_and_a_summary(clock, caplog):
    # The round's 7 exchanges take 1 s each, the pass's 4 exchanges 1, 2, 3, 10 s.
    pass_seconds = [1.0, 2.0, 3.0, 10.0]
    grid = TimedGrid(clock, seconds=lambda k: 1.0 if k <= ROUND_EXCHANGES else pass_seconds[k - ROUND_EXCHANGES - 1],
                     late=lambda k: NODES[1])
    with caplog.at_level(logging.INFO, logger="flwr"):
        _, result = run(grid, rounds=1, progress_interval=0, statistics="exact")
    assert grid.exchanges == ROUND_EXCHANGES + PASS_EXCHANGES
    assert exchange_lines(caplog, "Statistics pass of round 1:") == [
        "Statistics pass of round 1: exchange 1 (forward, BatchNorm call 0): 1.00 s, slowest node 1007",
        "Statistics pass of round 1: exchange 2 (forward, BatchNorm call 1): 2.00 s, slowest node 1007",
        "Statistics pass of round 1: exchange 3 (forward, BatchNorm call 2): 3.00 s, slowest node 1007",
        "Statistics pass of round 1: exchange 4/4 (BatchNorm buffers): 10.00 s, slowest node 1007",
    ]
    summary, = [line for line in lines(caplog, "Statistics pass of round 1:") if " exchanges in " in line]
    assert "applied, 4 exchanges in " in summary
    assert "2.50 s median, 10.00 s max per exchange (over 4), slowest node 1007 in 4" in summary
    metrics = result.train_metrics_clientapp[1]
    assert metrics["fedtan-stats-exchange-seconds-median"] == pytest.approx(2.5)
    assert metrics["fedtan-stats-exchange-seconds-max"] == pytest.approx(10.0)
    assert metrics["fedtan-stats-slowest-node"] == NODES[1] and metrics["fedtan-stats-slowest-node-exchanges"] == 4
    assert metrics["fedtan-exchange-seconds-median"] == 1.0  # the round's own figures stay apart


def test_exchange_progress_figures_and_rate_limit_on_their_own(clock, caplog):
    tracker = ExchangeProgress("Test", interval=5.0)
    with caplog.at_level(logging.INFO, logger="flwr"):
        for seconds, node, now in [(1.0, 3, 1.0), (2.0, 4, 3.0), (9.0, 4, 6.0), (1.5, 3, 6.5)]:
            clock.now = now
            tracker.record(ExchangeTiming(seconds, node), f"at {now}")
        tracker.record(ExchangeTiming(4.0, None), "last", force=True, counted=False)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("Test:")] == [
        "Test: exchange at 1.0: 1.00 s, slowest node 3",
        "Test: exchange at 6.0: 9.00 s, slowest node 4",
        "Test: exchange last: 4.00 s, slowest node none",
    ]
    assert tracker.metrics("x-") == {"x-exchange-seconds-median": 1.75, "x-exchange-seconds-max": 9.0,
                                     "x-slowest-node": 3, "x-slowest-node-exchanges": 2}  # a tie: the lower id
    assert ExchangeProgress("Empty").metrics("x-")["x-slowest-node"] == progress.NO_NODE


@pytest.mark.parametrize("interval", [-1, "often", float("nan")])
def test_a_bad_progress_interval_is_refused_before_the_first_round(interval):
    with pytest.raises(InvalidArgumentsError, match="progress_interval"):
        FedTAN(progress_interval=interval)


# ---------------------------------------------------------------------- the plot
def test_compare_plots_seconds_per_round_beside_accuracy(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from simulations.experiments import compare

    saved = []
    original = Figure.savefig

    def spy(self, path, *args, **kwargs):
        saved.append((path, self))
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    records = []
    for seed, seconds in [(0, [10.0, 12.0, 14.0]), (1, [20.0, 22.0, 30.0])]:
        summary = {"test": {str(r): {"test-accuracy": 0.1 + 0.2 * r} for r in range(4)},
                   "round-seconds": {str(r + 1): s for r, s in enumerate(seconds)}}
        spec = compare.RunSpec("fedtan", "iid", seed, {"results-file": str(tmp_path / f"{seed}.json")}, 3)
        records.append(compare.RunRecord(spec, summary, 1.0, "ran", curve=compare.accuracy_curve(summary)))
    old = {"test": {str(r): {"test-accuracy": 0.1} for r in range(4)}}  # a summary from before round-seconds
    spec = compare.RunSpec("fedavg", "iid", 0, {"results-file": str(tmp_path / "old.json")}, 3)
    records.append(compare.RunRecord(spec, old, 1.0, "ran", curve=compare.accuracy_curve(old)))

    path, = compare.plot_accuracy(records, tmp_path)
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (saved_path, figure), = saved
    assert saved_path == path
    accuracy_axes, time_axes = figure.axes
    assert accuracy_axes.get_ylabel() == "test accuracy" and len(accuracy_axes.lines) == 2
    line, = time_axes.lines  # fedtan's seed mean; the old fedavg summary has no seconds to draw
    assert list(line.get_xdata()) == [1, 2, 3]
    assert list(line.get_ydata()) == pytest.approx([15.0, 17.0, 22.0])
    assert line.get_color() == accuracy_axes.lines[0].get_color()
