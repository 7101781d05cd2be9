"""The memory budget of live rounds (flwr_fedtan/runtime/live.py, runtime/footprint.py) and
its setting; fast: in-process rounds on a LocalGrid."""

from __future__ import annotations

import logging
import types

import greenlet
import pytest
import torch

from flwr_fedtan import FedTAN, fedtan_client_app, settings
from flwr_fedtan.runtime import footprint
from flwr_fedtan.runtime.live import LiveRounds, live_rounds

from _grid import LocalGrid
import _runtime_app as rt


class Sized:
    def __init__(self, name: str, size: int, closed: list) -> None:
        self.name, self.size, self.closed = name, size, closed

    def close(self) -> None:
        self.closed.append(self.name)


def test_budget_evicts_least_recently_used_rounds_until_they_fit_and_says_so_once(caplog):
    closed: list[str] = []
    cache = LiveRounds(budget=100, measure=lambda entry: entry.size)
    a, b, c = Sized("a", 40, closed), Sized("b", 50, closed), Sized("c", 30, closed)
    cache.remember((1, 1), a)
    cache.remember((1, 2), b)
    assert cache.nbytes == 90 and closed == []
    with caplog.at_level(logging.WARNING, logger="flwr_fedtan.runtime.live"):
        cache.remember((1, 3), c)  # 120 > 100: a (least recently used) goes
        assert closed == ["a"] and cache.nbytes == 80 and cache.peak_bytes == 120
        b.size = 75  # b grew while running: measured again when it pauses again
        cache.remember((1, 2), b)  # 105 > 100: c goes (b was just used)
        assert closed == ["a", "c"] and cache.nbytes == 75 and len(cache) == 1
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "3 paused rounds hold 120 B, over this home's budget of 100 B (the newest 30 B)" in warnings[0]
    assert cache.evictions == 2
    cache.remember((1, 4), Sized("big", 101, closed))  # alone over the budget: not kept
    assert closed[-2:] == ["b", "big"] and len(cache) == 0 and cache.nbytes == 0
    cache.remember((1, 5), Sized("d", 10, closed), capacity=0)  # the count cap still applies
    assert closed[-1] == "d"
    cache.remember((1, 6), Sized("e", 10, closed))
    assert cache.peak_bytes == 10  # a new peak once the cache was empty
    cache.forget((1, 6))
    assert cache.nbytes == 0 and cache.peak_bytes == 10


class Keyed(Sized):
    def __init__(self, name: str, size: int, closed: list, key: tuple) -> None:
        super().__init__(name, size, closed)
        self.key = key

    def footprint_key(self) -> tuple:
        return self.key


def test_entries_with_a_footprint_key_are_measured_once_per_run_and_key():
    measured: list[str] = []

    def measure(entry):
        measured.append(entry.name)
        return entry.size

    closed: list[str] = []
    cache = LiveRounds(budget=10**6, measure=measure)
    cache.remember((1, 1), Keyed("a", 40, closed, ("round", 3, 0, 0, 32)))
    cache.remember((1, 2), Keyed("b", 99, closed, ("round", 3, 0, 0, 32)))  # same point, same batch: a's figure
    cache.remember((1, 3), Keyed("c", 30, closed, ("round", 3, 0, 0, 16)))  # another batch size: measured
    cache.remember((2, 1), Keyed("d", 20, closed, ("round", 3, 0, 0, 32)))  # another run: measured
    cache.remember((1, 4), Sized("e", 5, closed))  # no key: measured, every time
    cache.remember((1, 4), Sized("e", 6, closed))
    assert measured == ["a", "c", "d", "e", "e"]
    assert cache.nbytes == 40 + 40 + 30 + 20 + 6


def test_fraction_budget_is_of_the_memory_available_shared_by_the_homes(monkeypatch):
    monkeypatch.setattr("flwr_fedtan.runtime.live.memory_available", lambda: 8000)
    monkeypatch.delenv(settings.LIVE_MEMORY_ENV, raising=False)
    cache = LiveRounds()
    cache.sharers = 2
    assert cache.budget_bytes() == 2000  # the default: half, shared by two homes
    assert cache.budget_bytes("25%") == 1000 and cache.budget_bytes(1234) == 1234
    monkeypatch.setenv(settings.LIVE_MEMORY_ENV, "1kB")
    assert cache.budget_bytes(0.5) == 1000
    monkeypatch.setenv(settings.LIVE_MEMORY_ENV, "lots")
    with pytest.raises(ValueError, match="FEDTAN_LIVE_MEMORY must be bytes"):
        cache.budget_bytes()


def test_homes_on_one_ray_node_share_its_memory():
    from flwr_fedtan.runtime.ray_home import _sharers

    assert _sharers(["a", "a", "b", "b"], 0, 4) == 2 and _sharers(["a", "a", "b"], 2, 3) == 1
    assert _sharers(["a", "b"], 0, 6) == 3  # FEDTAN_RAY_HOMES=6 on two Ray nodes
    assert _sharers([], 0, 3) == 3


@pytest.mark.parametrize("given, expected", [(5, 5), (0.25, 0.25), ("2GB", 2 * 10**9), ("512MiB", 512 * 2**20),
                                             ("1500000", 1500000), ("25%", 0.25), ("0.25", 0.25)])
def test_live_memory_accepts_bytes_and_fractions(given, expected):
    assert settings.check_live_memory(given) == expected


@pytest.mark.parametrize("given", [-1, 1.5, "lots", "1.5", True, "150%", "2 parsecs"])
def test_live_memory_refuses_what_is_neither_and_names_it(given):
    with pytest.raises(ValueError, match="live_memory must be bytes"):
        settings.check_live_memory(given)
    with pytest.raises(ValueError, match="live_memory must be bytes"):
        fedtan_client_app(rt.make_client, live_memory=given)


def test_footprint_counts_parameters_optimiser_state_and_what_a_paused_step_holds():
    torch.manual_seed(0)
    linear = torch.nn.Linear(10, 10).double()  # 110 parameters: 880 bytes
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1, momentum=0.9)
    linear(torch.ones(2, 10, dtype=torch.float64)).sum().backward()
    optimizer.step()  # gradients (880 bytes) and momentum buffers (880 bytes)

    def forward():
        inputs = torch.randn(4, 10, dtype=torch.float64)  # 320 bytes, saved for the weight's gradient
        view = inputs[1:]  # a view: no storage of its own
        hidden = torch.relu(linear(inputs))  # 320 bytes, saved by the ReLU
        greenlet.getcurrent().parent.switch("paused")
        return hidden, view

    paused = greenlet.greenlet(forward)
    assert paused.switch() == "paused"
    round_ = types.SimpleNamespace(model=linear, optimizer=optimizer, forward=paused)
    assert footprint.live_bytes(round_) == 0  # not a package object: its attributes are not the round's
    assert footprint.live_bytes([linear, optimizer, paused]) == 880 * 3 + 320 + 320
    assert footprint.live_bytes(paused) == 880 * 2 + 320 + 320  # its frame holds the model (a free variable)
    paused.throw(greenlet.GreenletExit)


def _run(app, nodes=3, rounds=2):
    live_rounds().clear()
    grid = LocalGrid(app, nodes, {"local-steps": 2})
    strategy = FedTAN(min_available_nodes=nodes, fraction_evaluate=0.0)
    result = strategy.start(grid, rt.initial_arrays(), num_rounds=rounds)
    return grid, strategy, result


def test_eviction_under_a_tiny_budget_replays_to_the_model_of_the_run_without_eviction(caplog, monkeypatch):
    monkeypatch.delenv(settings.LIVE_MEMORY_ENV, raising=False)
    monkeypatch.delenv(settings.MAX_LIVE_ROUNDS_ENV, raising=False)
    _, _, kept = _run(fedtan_client_app(rt.make_client))
    with caplog.at_level(logging.WARNING, logger="flwr_fedtan.runtime.live"):
        grid, strategy, evicted = _run(fedtan_client_app(rt.make_client, live_memory=40_000))
    assert any("over this home's budget of 40.0 kB" in r.getMessage() for r in caplog.records)
    expected = rt.reference_rounds(list(grid.contexts.values()), strategy.seed, rounds=2, statistics=True)
    assert rt.max_diff(rt.to_numpy(kept.arrays), expected) <= 1e-10
    assert rt.max_diff(rt.to_numpy(evicted.arrays), rt.to_numpy(kept.arrays)) == 0.0
    for round_no in (1, 2):
        assert kept.train_metrics_clientapp[round_no]["replays"] == 0
        assert 0 < evicted.train_metrics_clientapp[round_no]["replays"] < 2 * rt.NUM_BN_CALLS
        assert 0 < evicted.train_metrics_clientapp[round_no]["live-bytes"] <= 80_000  # budget + one round
        assert kept.train_metrics_clientapp[round_no]["live-bytes"] > 80_000
