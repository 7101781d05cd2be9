"""The in-process home of live rounds (flwr_fedtan/runtime/live.py), home selection
(runtime/dispatch.py) and the deployment benchmark's report; fast, no Flower processes."""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

from flwr_fedtan.runtime import dispatch, identity
from flwr_fedtan.runtime.live import LiveRounds
from flwr_fedtan.runtime.ray_home import home_index


class Entry:
    def __init__(self, name: str, closed: list) -> None:
        self.name, self.closed = name, closed

    def close(self) -> None:
        self.closed.append(self.name)


def test_live_rounds_evict_least_recently_used_and_close_what_they_drop():
    closed: list[str] = []
    cache = LiveRounds(max_rounds=2)
    a, b, c = Entry("a", closed), Entry("b", closed), Entry("c", closed)
    cache.remember((1, 10), a)
    cache.remember((1, 11), b)
    assert cache.get((1, 10)) is a  # now b is the least recently used
    cache.remember((2, 12), c)
    assert closed == ["b"] and (1, 11) not in cache and len(cache) == 2
    cache.remember((1, 10), a)  # the same entry again: not closed
    assert closed == ["b"]
    cache.remember((1, 10), Entry("a2", closed))  # a replacement closes the old one
    assert closed == ["b", "a"]
    assert cache.forget_run(1) == 1 and closed == ["b", "a", "a2"]
    assert cache.get((1, 10)) is None and cache.hits == 1 and cache.misses == 1
    cache.clear()
    assert closed == ["b", "a", "a2", "c"] and len(cache) == 0


def test_live_rounds_capacity_zero_keeps_nothing_and_reads_the_override(monkeypatch):
    closed: list[str] = []
    monkeypatch.setenv("FEDTAN_MAX_LIVE_ROUNDS", "0")
    cache = LiveRounds()
    cache.remember((1, 1), Entry("x", closed))
    assert closed == ["x"] and len(cache) == 0
    monkeypatch.setenv("FEDTAN_MAX_LIVE_ROUNDS", "lots")
    with pytest.raises(ValueError, match="FEDTAN_MAX_LIVE_ROUNDS must be an integer"):
        LiveRounds().remember((1, 1), Entry("y", closed))


def test_home_choice_is_validated_and_runs_here_outside_ray_and_deployment(monkeypatch):
    with pytest.raises(ValueError, match="live_home must be one of"):
        dispatch.resolve_home("elsewhere")
    monkeypatch.setenv("FEDTAN_LIVE_HOME", "nowhere")
    with pytest.raises(ValueError, match="FEDTAN_LIVE_HOME"):
        dispatch.resolve_home(None)
    monkeypatch.delenv("FEDTAN_LIVE_HOME")
    assert dispatch.home_kind() == "process"  # pytest is neither a Ray actor nor flwr-clientapp
    monkeypatch.setattr(identity.sys, "argv", ["/venv/bin/flwr-clientapp", "--insecure"])
    assert dispatch.home_kind() == "worker"
    assert dispatch.home_kind("process") == "process"

    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    seen = []
    reply = dispatch.run_at_home(lambda msg, ctx, extra: seen.append((ctx.node_id, extra)) or "reply",
                                 "a message", context, "x", home="process")
    assert reply == "reply" and seen == [(5, "x")]


def test_nodes_spread_over_homes_by_partition_id_else_node_id():
    def context(node_id, partition=None):
        config = {} if partition is None else {"partition-id": partition}
        return Context(run_id=1, node_id=node_id, node_config=config, state=RecordDict(), run_config={})

    assert [home_index(context(99, p), 2) for p in range(5)] == [0, 1, 0, 1, 0]
    assert home_index(context(7), 3) == 1


def test_deployment_benchmark_report_ends_with_the_ratio():
    from simulations.bench_deployment import format_report

    bench = {"nodes": 3, "bn-calls": 2, "poll-interval": 0.02, "empty-exchange-seconds": [4.0, 5.0, 4.5],
             "fedtan-exchange-seconds": [5.0, 5.4, 9.0, 5.2, 5.6], "fedtan-round-seconds": [30.2],
             "fedtan-exchanges-per-round": 5, "fedtan-clients": [3], "client-sync-seconds": [1.0],
             "client-local-seconds": [0.1], "client-replays": [0.0], "fedtan-pulls": 100,
             "fedtan-pull-backoffs": 1, "fedtan-pull-backoff-seconds": 1.1, "fedtan-pull-seconds-max": 1.1,
             "empty-pull-backoffs": 0}
    out = format_report(bench, {"python + import torch": 2.0})
    assert out.splitlines()[-1] == "FedTAN exchange / empty exchange = 1.20"  # 5.4 / 4.5
    assert "1 of 100 (FedTAN)" in out and "fresh process: python + import torch" in out


def test_worker_idle_timeout_zero_means_never_as_the_cli_documents(monkeypatch, tmp_path):
    """``FEDTAN_WORKER_IDLE_TIMEOUT=0`` reaches the worker it starts as ``--idle-timeout 0``
    (the worker's loop never exits on idleness then); negative values are refused."""
    from flwr_fedtan import settings
    from flwr_fedtan.runtime import worker

    started = []
    monkeypatch.setattr(worker.subprocess, "Popen", lambda command, **kwargs: started.append(command))
    monkeypatch.setenv("FEDTAN_WORKER_IDLE_TIMEOUT", "0")
    assert settings.worker_idle_timeout(600) == 0.0
    worker._start_worker(tmp_path / "node.sock")
    command = started[0]
    assert float(command[command.index("--idle-timeout") + 1]) == 0.0
    monkeypatch.setenv("FEDTAN_WORKER_IDLE_TIMEOUT", "-1")
    with pytest.raises(ValueError, match="FEDTAN_WORKER_IDLE_TIMEOUT must be a number of seconds >= 0"):
        settings.worker_idle_timeout(600)
