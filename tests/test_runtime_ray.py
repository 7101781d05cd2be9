"""Ray homes (flwr_fedtan/runtime/ray_home.py) on a local Ray with two "ClientAppActors".

Flower's Ray backend hands each message to whichever ClientAppActor is idle. Here two
actors reserving one CPU each, on a Ray told it has two CPUs (Flower's pool would be two
actors), take the messages of three nodes in turn, so every node's messages alternate
between the two processes. FedTAN's handler sends them to the node's home actor, where
the round stays live. Results are checked against the in-process reference.

Run with ``pytest -m slow tests/test_runtime_ray.py``.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import tempfile

import pytest

ray = pytest.importorskip("ray")

from flwr_fedtan import FedTAN  # noqa: E402

from _grid import LocalGrid  # noqa: E402
import _runtime_app as rt  # noqa: E402

pytestmark = pytest.mark.slow


@ray.remote(num_cpus=1)
class ClientAppActor:
    """Stands in for Flower's ClientAppActor: runs the ClientApp on a message and context."""

    def run(self, msg, context):
        import _runtime_app

        reply = _runtime_app.app(msg, context)
        return reply, context

    def pid(self) -> int:
        return os.getpid()


@pytest.fixture(scope="module")
def two_actors():
    temp = tempfile.mkdtemp(prefix="rtray-")  # short: Ray puts sockets under it
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
                                       "FEDTAN_STATE_DIR": os.environ["FEDTAN_STATE_DIR"]}})
    try:
        actors = [ClientAppActor.remote() for _ in range(2)]
        assert len({ray.get(a.pid.remote()) for a in actors}) == 2
        yield actors
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


class AlternatingActors:
    """The ClientApp as LocalGrid sees it: message i goes to actor i mod 2."""

    def __init__(self, actors) -> None:
        self.turn = itertools.cycle(actors)

    def __call__(self, msg, context):
        reply, updated = ray.get(next(self.turn).run.remote(msg, context))
        context.state = updated.state
        return reply


def _run(grid, rounds):
    strategy = FedTAN(min_available_nodes=len(grid.node_ids), fraction_evaluate=0.0)
    return strategy, strategy.start(grid, rt.initial_arrays(), num_rounds=rounds)


def _home(index: int):
    return ray.get_actor(f"fedtan-home-1-{index}-of-2")


def test_homes_keep_every_round_live_across_two_actors(two_actors):
    grid = LocalGrid(AlternatingActors(two_actors), 3, {"local-steps": 2})
    strategy, result = _run(grid, rounds=2)
    expected = rt.reference_rounds(list(grid.contexts.values()), strategy.seed, rounds=2, statistics=True)
    assert rt.max_diff(rt.to_numpy(result.arrays), expected) <= 1e-10
    for round_no in (1, 2):
        metrics = result.train_metrics_clientapp[round_no]
        assert metrics["fedtan-clients"] == 3 and metrics["fedtan-exchanges"] == 2 * rt.NUM_BN_CALLS + 1
        assert metrics["replays"] == 0, metrics
    # Two homes (one per ClientAppActor), placed by partition id: 0 and 2 in home 0, 1 in home 1.
    stats = [ray.get(_home(i).stats.remote()) for i in (0, 1)]
    by_partition = {int(c.node_config["partition-id"]): n for n, c in grid.contexts.items()}
    assert stats[0]["nodes"] == sorted([by_partition[0], by_partition[2]])
    assert stats[1]["nodes"] == [by_partition[1]]
    actor_pids = {ray.get(a.pid.remote()) for a in two_actors}
    assert {s["pid"] for s in stats}.isdisjoint(actor_pids)


def test_home_killed_mid_round_replays_to_the_same_result(two_actors):
    """Kill home 0 after three exchanges of round 1: its nodes' next messages recreate it,
    and it rebuilds their rounds from context.state."""
    killed, survivor = [], []
    per_node = {}

    class KillsAHome(LocalGrid):
        def push_messages(self, messages):
            messages = list(messages)
            if self.messages_handled == 3 * (2 * rt.NUM_BN_CALLS + 1) - 3:  # last exchange of round 1
                per_node.update({int(c.node_config["partition-id"]): int(c.state["fedtan.replay"]["replays"])
                                 for c in self.contexts.values()})
            if self.messages_handled == 3 * 3 and not killed:
                survivor.append(ray.get(_home(1).stats.remote())["pid"])
                home = _home(0)
                killed.append(ray.get(home.stats.remote())["pid"])
                ray.kill(home, no_restart=True)
            return super().push_messages(messages)

    grid = KillsAHome(AlternatingActors(two_actors), 3, {"local-steps": 2})
    strategy, result = _run(grid, rounds=2)
    assert killed
    expected = rt.reference_rounds(list(grid.contexts.values()), strategy.seed, rounds=2, statistics=True)
    assert rt.max_diff(rt.to_numpy(result.arrays), expected) <= 1e-10
    first, second = result.train_metrics_clientapp[1], result.train_metrics_clientapp[2]
    assert first["fedtan-clients"] == 3 and first["fedtan-dropped"] == 0 and first["fedtan-restarts"] == 0
    assert per_node == {0: 1, 1: 0, 2: 1}  # the nodes of the killed home replayed once each
    assert first["replays"] == pytest.approx((5 + 11) / (5 + 8 + 11))  # weighted by batch size
    assert second["replays"] == 0
    assert ray.get(_home(0).stats.remote())["pid"] != killed[0]
    assert ray.get(_home(1).stats.remote())["pid"] == survivor[0]  # the other home lived on


def test_a_large_enough_budget_keeps_36_nodes_live_on_two_actors(two_actors):
    """18 nodes per home, more than the 16 rounds the old count cap kept: the default memory
    budget keeps every round live, so no message replays."""
    grid = LocalGrid(AlternatingActors(two_actors), 36, {"local-steps": 2})
    strategy, result = _run(grid, rounds=1)
    expected = rt.reference_rounds(list(grid.contexts.values()), strategy.seed, rounds=1, statistics=True)
    assert rt.max_diff(rt.to_numpy(result.arrays), expected) <= 1e-10
    metrics = result.train_metrics_clientapp[1]
    assert metrics["fedtan-clients"] == 36 and metrics["fedtan-dropped"] == 0
    assert metrics["replays"] == 0, metrics
    assert metrics["live-bytes"] > 0
    stats = [ray.get(_home(i).stats.remote()) for i in (0, 1)]
    by_partition = {int(c.node_config["partition-id"]): n for n, c in grid.contexts.items()}
    assert {by_partition[p] for p in range(0, 36, 2)} <= set(stats[0]["nodes"])  # spread evenly, 18 each
    assert {by_partition[p] for p in range(1, 36, 2)} <= set(stats[1]["nodes"])
    assert [s["evictions"] for s in stats] == [0, 0]
    assert all(s["live-budget-bytes"] > s["live-peak-bytes"] > 0 for s in stats)
