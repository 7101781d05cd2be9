"""FedTAN strategy + client over an in-process Grid: equivalence, replay, faults.

The Grid here calls the real ClientApp in-process (tests/_grid.py); the Ray simulation and
the deployment tests run the same code through Flower's own runtimes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Array, RecordDict
from flwr.serverapp.strategy import FedAvg

from flwr_fedtan import FedTAN, FedTANClient, fedtan_client_app
from flwr_fedtan.protocol import wire
from flwr_fedtan.client import clear_live_rounds, client_seed_key
from flwr_fedtan.reference import fedtan_round_in_process
from flwr_fedtan.training import derive_seed

from _grid import LocalGrid
from _runtime_app import NUM_BN_CALLS, SmallNet, client_data, initial_arrays, max_diff, to_numpy  # noqa: F401 (shared with test_secure_flower)

BATCH_SIZES = [5, 8, 11]


def make_client(context, local_steps=1, lr=0.1) -> FedTANClient:
    pid = int(context.node_config["partition-id"])
    torch.manual_seed(999)  # the client's own init is overwritten by the global model
    return FedTANClient(
        SmallNet().double(), client_data(pid), batch_size=BATCH_SIZES[pid], lr=lr, local_steps=local_steps
    )


@pytest.fixture(autouse=True)
def _fresh_live_rounds():
    clear_live_rounds()
    yield
    clear_live_rounds()


def reference_rounds(
    grid: LocalGrid, strategy: FedTAN, arrays: dict, rounds: int, local_steps: int, nodes=None, attempt=0
):
    """FedTAN rounds computed in-process: pooled_backward + SGD + BN-aware averaging."""
    nodes = nodes or grid.node_ids
    for server_round in range(1, rounds + 1):
        clients = [make_client(grid.contexts[n], local_steps) for n in nodes]
        keys = [client_seed_key(grid.contexts[n]) for n in nodes]
        round_seed = derive_seed(strategy.seed, server_round, attempt)
        arrays = fedtan_round_in_process(clients, keys, arrays, round_seed, lr=0.1, local_steps=local_steps)
    return arrays


def run_fedtan(grid, rounds=2, **kwargs):
    strategy = FedTAN(statistics="running", min_available_nodes=len(grid.node_ids), fraction_evaluate=0.0, **kwargs)
    result = strategy.start(grid, initial_arrays(), num_rounds=rounds)
    return strategy, result


@pytest.mark.parametrize(
    "separate_processes,store",
    [(False, "disk"), (True, "disk"), (True, "context")],
    ids=["live", "replay-disk", "replay-context"],
)
def test_two_rounds_equal_in_process_reference(separate_processes, store, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTAN_STATE_DIR", str(tmp_path))
    app = fedtan_client_app(lambda ctx: make_client(ctx, local_steps=2), replay_store=store)
    grid = LocalGrid(app, 3, {}, separate_processes=separate_processes)
    strategy, result = run_fedtan(grid, rounds=2)
    expected = reference_rounds(grid, strategy, to_numpy(initial_arrays()), rounds=2, local_steps=2)
    assert max_diff(to_numpy(result.arrays), expected) <= 1e-10
    metrics = result.train_metrics_clientapp[2]
    assert metrics["fedtan-exchanges"] == 2 * NUM_BN_CALLS + 1
    assert metrics["fedtan-clients"] == 3
    assert metrics["fedtan-bytes-sent"] > 0 and metrics["fedtan-bytes-received"] > 0
    # Live: every aggregate resumes the step in memory. Replay: every aggregate rebuilds it.
    assert metrics["replays"] == (2 * NUM_BN_CALLS if separate_processes else 0)
    # Where the starting weights were kept; nothing is left behind after the rounds.
    for context in grid.contexts.values():
        assert not any(name.startswith("fedtan.weights") for name in context.state.keys())
    assert not list(tmp_path.rglob("*.npz"))


def test_messages_handled_on_other_threads_replay_and_agree():
    """A process that handles each message on a new thread (a threaded actor) cannot resume
    a step paused on another thread's stack: the client replays it instead."""
    import threading

    class ThreadPerMessage(LocalGrid):
        def push_messages(self, messages):
            out = []
            for msg in messages:
                thread = threading.Thread(target=lambda m=msg: out.extend(LocalGrid.push_messages(self, [m])))
                thread.start()
                thread.join()
            return out

    app = fedtan_client_app(lambda ctx: make_client(ctx, local_steps=2))
    grid = ThreadPerMessage(app, 3, {})
    strategy, result = run_fedtan(grid, rounds=1)
    expected = reference_rounds(grid, strategy, to_numpy(initial_arrays()), rounds=1, local_steps=2)
    assert max_diff(to_numpy(result.arrays), expected) <= 1e-10
    metrics = result.train_metrics_clientapp[1]
    assert metrics["fedtan-clients"] == 3 and metrics["fedtan-dropped"] == 0
    assert metrics["replays"] == 2 * NUM_BN_CALLS


def test_replay_without_the_node_local_weights_drops_the_node_with_a_clear_reason(tmp_path, monkeypatch):
    """A message reaching a process that can see neither the live round nor the node-local
    copy of the starting weights (another machine): the node is dropped with a reason that
    says what to change, and the round completes with the others."""
    monkeypatch.setenv("FEDTAN_STATE_DIR", str(tmp_path))
    app = fedtan_client_app(make_client, replay_store="disk")

    class LosesFiles(LocalGrid):
        def push_messages(self, messages):
            messages = list(messages)
            for msg in messages:
                if msg.metadata.dst_node_id == 1007 and wire.CONTROL in msg.content.config_records:
                    if msg.content.config_records[wire.CONTROL]["phase"] != wire.PHASE_BEGIN:
                        for path in tmp_path.rglob("node-1007.npz"):
                            path.unlink()
            return super().push_messages(messages)

    grid = LosesFiles(app, 3, {}, separate_processes=True)
    strategy = FedTAN(statistics="running", min_available_nodes=3, min_train_nodes=2, fraction_evaluate=0.0)
    result = strategy.start(grid, initial_arrays(), num_rounds=1)
    reason = strategy.dropped[1][1007]
    assert "node-local store" in reason and "replay_store='context'" in reason
    assert result.train_metrics_clientapp[1]["fedtan-clients"] == 2
    expected = reference_rounds(grid, strategy, to_numpy(initial_arrays()), 1, 1, nodes=[1000, 1014], attempt=1)
    assert max_diff(to_numpy(result.arrays), expected) <= 1e-10


def centralised_sgd_step(grid, strategy, lr: float = 0.1) -> dict:
    """The global model after one plain SGD step on the pooled batch of round 1's clients
    (pure PyTorch, from the same init as :func:`initial_arrays`)."""
    round_seed = derive_seed(strategy.seed, 1, 0)
    xs, ys = [], []
    for node in grid.node_ids:
        client = make_client(grid.contexts[node])
        x, y = client.sample_batch(derive_seed(derive_seed(round_seed, client_seed_key(grid.contexts[node])), 0))
        xs.append(x)
        ys.append(y)
    torch.manual_seed(0)
    central = SmallNet().double()  # same init as initial_arrays()
    central.train()
    F.cross_entropy(central(torch.cat(xs)), torch.cat(ys)).backward()
    with torch.no_grad():
        for p in central.parameters():
            p -= lr * p.grad
    return {k: v.detach().numpy() for k, v in central.state_dict().items()}


def test_one_round_equals_centralised_sgd_step():
    """E=1, plain SGD: the FedTAN round is one SGD step on the pooled batch (pure PyTorch)."""
    app = fedtan_client_app(lambda ctx: make_client(ctx, local_steps=1))
    grid = LocalGrid(app, 3, {})
    strategy, result = run_fedtan(grid, rounds=1)

    expected = centralised_sgd_step(grid, strategy)
    assert max_diff(to_numpy(result.arrays), expected) <= 1e-10


def test_replayed_and_live_runs_agree_with_multiple_sync_steps():
    make = lambda ctx: make_client(ctx, local_steps=3)  # noqa: E731
    outcomes = []
    for separate in (False, True):
        clear_live_rounds()
        grid = LocalGrid(fedtan_client_app(make), 3, {}, separate_processes=separate)
        _, result = run_fedtan(grid, rounds=1, sync_steps=2)
        outcomes.append(result)
        assert result.train_metrics_clientapp[1]["fedtan-exchanges"] == 2 * 2 * NUM_BN_CALLS + 1
    assert max_diff(to_numpy(outcomes[0].arrays), to_numpy(outcomes[1].arrays)) <= 1e-12


# ---------------------------------------------------------------------- fault injection
class FaultyGrid(LocalGrid):
    """Node ``bad`` misbehaves from the given exchange on."""

    def __init__(self, *args, bad, fault, from_exchange=1, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad, self.fault, self.from_exchange = bad, fault, from_exchange
        self.seen = 0

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        for msg, mid in zip(messages, ids):
            if msg.metadata.dst_node_id != self.bad or msg.metadata.message_type != wire.MESSAGE_TYPE:
                continue
            self.seen += 1
            if self.seen <= self.from_exchange:
                continue
            reply = self._replies.get(mid)
            if self.fault == "silent":
                self._replies.pop(mid, None)
            elif reply is not None and not reply.has_error() and wire.STATS in reply.content.array_records:
                stats = reply.content.array_records[wire.STATS]
                name = next(iter(stats.keys()))
                values = stats[name].numpy().copy()
                if self.fault == "nan":
                    values[0] = np.nan
                    stats[name] = Array(values)
                elif self.fault == "shape":
                    stats[name] = Array(np.concatenate([values, values]))
            elif reply is not None and not reply.has_error() and self.fault == "nan-model":
                arrays = reply.content.array_records[wire.ARRAYS]
                key = next(iter(arrays.keys()))
                bad = arrays[key].numpy().copy()
                bad.flat[0] = np.nan
                arrays[key] = Array(bad)
        return ids


def raising_client_fn(bad_partition):
    calls = {"n": 0}

    def client_fn(ctx):
        if int(ctx.node_config["partition-id"]) == bad_partition:
            calls["n"] += 1
            if calls["n"] > 1:  # fail after the begin message
                raise RuntimeError("simulated client crash")
        return make_client(ctx)

    return client_fn


@pytest.mark.parametrize("fault", ["raises", "nan", "shape", "silent", "nan-model"])
def test_faulty_client_is_dropped_and_round_completes(fault):
    client_fn = raising_client_fn(bad_partition=1) if fault == "raises" else make_client
    app = fedtan_client_app(client_fn)
    # "raises": every message rebuilds the client (as in deployment), so client_fn fails.
    kwargs = dict(separate_processes=(fault == "raises"))
    last = 2 * NUM_BN_CALLS if fault == "nan-model" else 1
    grid = FaultyGrid(app, 3, {}, bad=1007, fault=fault, from_exchange=last, **kwargs)
    strategy = FedTAN(statistics="running", min_available_nodes=3, min_train_nodes=2, fraction_evaluate=0.0,
                      exchange_timeout=0.5)
    result = strategy.start(grid, initial_arrays(), num_rounds=1)
    final = to_numpy(result.arrays)
    assert all(np.all(np.isfinite(v)) for v in final.values())
    assert 1007 in strategy.dropped[1], strategy.dropped
    reason = strategy.dropped[1][1007]
    expected_words = {"raises": "simulated client crash", "nan": "NaN", "shape": "shape",
                      "silent": "no reply", "nan-model": "NaN"}[fault]
    assert expected_words in reason
    metrics = result.train_metrics_clientapp[1]
    survivors = [1000, 1014]
    if fault == "nan-model":
        # The synchronised step completed with all three; only the bad model is left out.
        assert metrics["fedtan-clients"] == 2 and metrics["fedtan-restarts"] == 0
    else:
        assert metrics["fedtan-clients"] == 2 and metrics["fedtan-restarts"] == 1
        # The restart is a fresh synchronised step of the survivors (attempt 1's seed).
        expected = reference_rounds(grid, strategy, to_numpy(initial_arrays()), 1, 1, nodes=survivors, attempt=1)
        assert max_diff(final, expected) <= 1e-10


def test_round_skipped_when_too_few_clients_survive():
    app = fedtan_client_app(make_client)
    grid = FaultyGrid(app, 2, {}, bad=1007, fault="silent", from_exchange=0)
    strategy = FedTAN(statistics="running", min_available_nodes=2, min_train_nodes=2, fraction_evaluate=0.0,
                      exchange_timeout=0.3)
    result = strategy.start(grid, initial_arrays(), num_rounds=1)
    assert max_diff(to_numpy(result.arrays), to_numpy(initial_arrays())) == 0
    assert result.train_metrics_clientapp[1]["fedtan-skipped"] == 1


def test_schema_rejects_malformed_replies_naming_the_node():
    content = wire.encode_request(1, 0, wire.SyncPoint(0, "forward", 0, 3),
                                    wire.ForwardStats(4.0, 2, np.zeros(3), -np.ones(3)))
    status = wire.decode_reply(content, 42, "num-examples")
    with pytest.raises(Exception, match="client 42: var has negative"):
        from flwr_fedtan.aggregation import pool_forward_stats
        pool_forward_stats({42: status.payload})
    del content.config_records[wire.STATUS]["count"]
    with pytest.raises(Exception, match="client 42: .*count"):
        wire.decode_reply(content, 42, "num-examples")
    with pytest.raises(Exception, match="client 7: reply has no ConfigRecord"):
        wire.decode_reply(RecordDict(), 7, "num-examples")


def test_plain_fedavg_uses_the_same_client_app():
    """Flower's unmodified FedAvg drives the client's ordinary ``train``/``evaluate``."""
    app = fedtan_client_app(make_client)
    grid = LocalGrid(app, 3, {})
    result = FedAvg(min_available_nodes=3).start(grid, initial_arrays(), num_rounds=1)
    final = to_numpy(result.arrays)
    assert max_diff(final, to_numpy(initial_arrays())) > 0
    assert all(np.all(np.isfinite(v)) for v in final.values())
    assert "eval-accuracy" in result.evaluate_metrics_clientapp[1]


def test_options_set_after_construction_reach_the_round_and_the_statistics_pass(monkeypatch):
    """``strategy.exchange_timeout = ...`` (and ``poll_interval``) set after construction is
    what every exchange of the round and of the statistics pass waits with."""
    import flwr_fedtan.protocol.exchange as exchange_module

    waits = []
    real_exchange = exchange_module.exchange

    def recording_exchange(grid, contents, **kwargs):
        control = next(iter(contents.values())).config_records[wire.CONTROL]
        waits.append((control["phase"], kwargs["timeout"], kwargs["poll_interval"]))
        return real_exchange(grid, contents, **kwargs)

    monkeypatch.setattr(exchange_module, "exchange", recording_exchange)
    grid = LocalGrid(fedtan_client_app(make_client), 3, {})
    strategy = FedTAN(min_available_nodes=3, fraction_evaluate=0.0, exchange_timeout=120.0, poll_interval=0.02)
    strategy.exchange_timeout, strategy.poll_interval = 7.5, 0.001
    strategy.start(grid, initial_arrays(), num_rounds=1)
    phases = {phase for phase, _, _ in waits}
    assert {"begin", "aggregate", "stats-begin", "stats-aggregate"} <= phases, phases
    assert {(timeout, poll) for _, timeout, poll in waits} == {(7.5, 0.001)}


def test_an_option_set_after_construction_is_checked_as_the_constructor_checks_it():
    strategy = FedTAN()
    with pytest.raises(ValueError, match="exchange_timeout.*give the seconds to wait for a reply"):
        strategy.exchange_timeout = -1
    with pytest.raises(ValueError, match="quarantine_after"):
        strategy.quarantine_after = 0
    assert strategy.exchange_timeout == 120.0 and strategy.quarantine_after == 2
    strategy.max_quarantine_rounds = 3
    assert strategy.quarantine.max_rounds == 3
