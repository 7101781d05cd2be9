"""FedTAN(secure_stats=True) through the real strategy and ClientApp over an in-process Grid.

References: the in-process FedTAN rounds (pooled_backward + SGD + BN-aware averaging) and
centralised SGD; the server must see masked payloads only.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array

from flwr_fedtan import FedTAN, fedtan_client_app
from flwr_fedtan.protocol import wire
from flwr_fedtan.client import clear_live_rounds

from _grid import LocalGrid, RecordingGrid
from test_flower_protocol import (
    NUM_BN_CALLS,
    FaultyGrid,
    centralised_sgd_step,
    initial_arrays,
    make_client,
    max_diff,
    reference_rounds,
    run_fedtan,
    to_numpy,
)


@pytest.fixture(autouse=True)
def _fresh_live_rounds():
    clear_live_rounds()
    yield
    clear_live_rounds()


@pytest.mark.parametrize("separate_processes", [False, True], ids=["live", "replay"])
def test_secure_rounds_equal_the_clear_reference_and_the_server_sees_only_masks(separate_processes):
    app = fedtan_client_app(lambda ctx: make_client(ctx, local_steps=2))
    grid = RecordingGrid(app, 3, {}, separate_processes=separate_processes)
    strategy, result = run_fedtan(grid, rounds=2, secure_stats=True)
    expected = reference_rounds(grid, strategy, to_numpy(initial_arrays()), rounds=2, local_steps=2)
    assert max_diff(to_numpy(result.arrays), expected) <= 1e-10
    for round_no in (1, 2):
        metrics = result.train_metrics_clientapp[round_no]
        assert metrics["fedtan-exchanges"] == 2 * NUM_BN_CALLS + 2  # + the key exchange
        assert metrics["fedtan-clients"] == 3 and metrics["fedtan-restarts"] == 0
    assert set(strategy.driver.secure.shifts) == set(range(NUM_BN_CALLS))  # forward points 0, 1, 2

    payloads = 0
    for reply in grid.seen:
        status = reply.content.config_records[wire.STATUS]
        if status["phase"] in (wire.PHASE_FORWARD, wire.PHASE_BACKWARD):
            payloads += 1
            assert status["masked"] is True
            # In the clear: only the batch size (the model's averaging weight, public anyway) and
            # the values per BatchNorm channel (count); the statistics themselves are masked.
            if status["phase"] == "forward":
                assert set(status.keys()) == {"phase", "round", "step", "point", "call", "channels", "masked",
                                              "count", "num-examples"}
            stats = reply.content.array_records[wire.STATS]
            expected_keys = {"masked", "roster-digest"} | ({"shift"} if status["phase"] == "forward" else set())
            assert set(stats.keys()) == expected_keys
            assert stats["masked"].numpy().dtype == np.uint64
    assert payloads == 3 * 2 * 2 * NUM_BN_CALLS


def test_secure_round_with_e1_equals_centralised_sgd():
    app = fedtan_client_app(lambda ctx: make_client(ctx, local_steps=1))
    grid = LocalGrid(app, 3, {})
    strategy, result = run_fedtan(grid, rounds=1, secure_stats=True)
    expected = centralised_sgd_step(grid, strategy)
    assert max_diff(to_numpy(result.arrays), expected) <= 1e-10


@pytest.mark.parametrize("fault", ["silent", "raises-after-keys"])
def test_dropout_mid_step_restarts_the_survivors_with_fresh_masks(fault):
    calls = {"n": 0}

    def client_fn(ctx):
        if fault == "raises-after-keys" and int(ctx.node_config["partition-id"]) == 1:
            calls["n"] += 1
            if calls["n"] > 2:  # keys, begin, then the crash mid-step
                raise RuntimeError("simulated client crash")
        return make_client(ctx)

    app = fedtan_client_app(client_fn)
    # the bad node answers the key exchange and two sync points, then fails
    grid = FaultyGrid(app, 3, {}, bad=1007, fault="silent" if fault == "silent" else "none", from_exchange=3,
                      separate_processes=(fault != "silent"))
    strategy = FedTAN(statistics="running", min_available_nodes=3, min_train_nodes=2, fraction_evaluate=0.0,
                      exchange_timeout=0.5,
                      secure_stats=True)
    result = strategy.start(grid, initial_arrays(), num_rounds=1)
    assert 1007 in strategy.dropped[1]
    metrics = result.train_metrics_clientapp[1]
    assert metrics["fedtan-clients"] == 2 and metrics["fedtan-restarts"] == 1
    expected = reference_rounds(grid, strategy, to_numpy(initial_arrays()), 1, 1, nodes=[1000, 1014], attempt=1)
    assert max_diff(to_numpy(result.arrays), expected) <= 1e-10


class WrongKeyGrid(LocalGrid):
    """Node 1007's public key is replaced on its way to the server (a wrong key)."""

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        for msg, mid in zip(messages, ids):
            reply = self._replies.get(mid)
            if (msg.metadata.dst_node_id == 1007 and reply is not None and not reply.has_error()
                    and wire.SECURE in reply.content.array_records):
                record = reply.content.array_records[wire.SECURE]
                record["public-key"] = Array(np.frombuffer(bytes(range(1, 33)), dtype=np.uint8).copy())
        return ids


def test_a_wrong_key_drops_that_client_with_a_clear_reason_and_the_others_finish():
    app = fedtan_client_app(lambda ctx: make_client(ctx, local_steps=1))
    grid = WrongKeyGrid(app, 3, {})
    strategy = FedTAN(statistics="running", min_available_nodes=3, min_train_nodes=2, fraction_evaluate=0.0,
                      secure_stats=True)
    result = strategy.start(grid, initial_arrays(), num_rounds=1)
    assert "its private key does not match its public key in the roster" in strategy.dropped[1][1007]
    assert result.train_metrics_clientapp[1]["fedtan-clients"] == 2
    expected = reference_rounds(grid, strategy, to_numpy(initial_arrays()), 1, 1, nodes=[1000, 1014], attempt=1)
    assert max_diff(to_numpy(result.arrays), expected) <= 1e-10


def test_begin_without_the_key_exchange_is_refused_by_the_client():
    app = fedtan_client_app(lambda ctx: make_client(ctx, local_steps=1))
    grid = LocalGrid(app, 2, {})
    from flwr_fedtan.secure import Roster, generate_key_pair

    roster = Roster.from_keys({n: generate_key_pair().public for n in grid.node_ids})
    begin = wire.encode_begin(initial_arrays(), wire.ConfigRecord(), 1, 1, 0, 0, roster, {})
    from flwr.app import Message

    message = Message(begin, dst_node_id=1000, message_type=wire.MESSAGE_TYPE)
    (reply,) = grid.send_and_receive([message])
    assert reply.has_error()
    assert "holds no private key for that round (it missed the key exchange)" in reply.error.reason


# ---------------------------------------------------------------------- Flower's simulation
@pytest.mark.slow
def test_flwr_run_simulation_two_rounds_with_secure_stats(tmp_path, capsys):
    """``flwr run`` (Ray simulation, 3 nodes) with run-config ``secure-stats = true``: the same
    model as the in-process clear FedTAN run, one extra exchange a round."""
    from simulations.flower_processes import FlowerProcesses
    from test_e2e_flower import (
        CNN_EXCHANGES,
        REPO,
        TOLERANCE,
        app_config,
        assert_completed,
        cli_config,
        max_abs_diff,
        read_results,
        reference_model,
        report,
    )

    flower = FlowerProcesses(tmp_path / "flower")
    try:
        results_file = tmp_path / "secure.json"
        overrides = dict(dataset="synthetic", model="cnn", num_server_rounds=2, local_steps=2, batch_size=16)
        superlink = flower.start_superlink(simulation=True)
        flower.add_connection("e2e-secure", superlink)
        outcome = flower.run_app(
            REPO, connection="e2e-secure",
            federation_config={"num-supernodes": 3, "client-resources-num-cpus": 2, "init-args-num-cpus": 2},
            run_config=cli_config(**overrides, secure_stats=True, results_file=str(results_file)), timeout=180,
        )
        assert_completed(outcome, flower)
        summary, state_dict = read_results(results_file)
    finally:
        flower.stop()
        assert not flower.remaining()
    for round_no in ("1", "2"):
        train = summary["train"][round_no]
        assert train["fedtan-exchanges"] == CNN_EXCHANGES + 1, train  # + the key exchange
        assert train["fedtan-clients"] == 3 and train["fedtan-restarts"] == 0, train
    diff = max_abs_diff(reference_model(app_config(**overrides), 3, 2), state_dict)
    assert diff <= TOLERANCE, f"secure run differs from the clear in-process FedTAN by {diff:g}"
    train = summary["train"]["2"]
    report(capsys, f"simulation with secure-stats: round {train['fedtan-round-seconds']:.2f}s, "
                   f"{train['fedtan-bytes-sent'] + train['fedtan-bytes-received']} bytes, max |diff| {diff:.2e}")


class StaleReplyGrid(LocalGrid):
    """Node 1007's payload of exchange 1 is replaced once by its payload of exchange 0 (a
    stale reply: same shape, masks of another exchange), so the masks no longer cancel."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.payloads_of_bad = []

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        for msg, mid in zip(messages, ids):
            reply = self._replies.get(mid)
            if msg.metadata.dst_node_id != 1007 or reply is None or reply.has_error():
                continue
            stats = reply.content.array_records.get(wire.STATS)
            if stats is None:
                continue
            self.payloads_of_bad.append(stats["masked"].numpy().copy())
            if len(self.payloads_of_bad) == 2:
                stats["masked"] = Array(self.payloads_of_bad[0])
        return ids


def test_masks_that_do_not_cancel_name_the_stale_client_and_restart_with_fresh_masks():
    """The canaries fail; every client reveals its pair masks of that canary only; the
    client whose canary is not the sum of its revealed masks (the stale payload's sender)
    is named and dropped, and the others restart with fresh keys."""
    app = fedtan_client_app(lambda ctx: make_client(ctx, local_steps=1))
    grid = StaleReplyGrid(app, 3, {})
    strategy = FedTAN(statistics="running", min_available_nodes=3, min_train_nodes=2, fraction_evaluate=0.0,
                      secure_stats=True)
    result = strategy.start(grid, initial_arrays(), num_rounds=1)
    metrics = result.train_metrics_clientapp[1]
    assert metrics["fedtan-restarts"] == 1 and metrics["fedtan-clients"] == 2
    assert list(strategy.dropped[1]) == [1007]
    assert "masks did not cancel at exchange 1: its canary is not the sum" in strategy.dropped[1][1007]
    expected = reference_rounds(grid, strategy, to_numpy(initial_arrays()), 1, 1, nodes=[1000, 1014], attempt=1)
    assert max_diff(to_numpy(result.arrays), expected) <= 1e-10


def test_a_lone_survivor_skips_the_round_instead_of_sending_its_statistics():
    app = fedtan_client_app(lambda ctx: make_client(ctx, local_steps=1))
    grid = FaultyGrid(app, 2, {}, bad=1007, fault="silent", from_exchange=1)
    strategy = FedTAN(statistics="running", min_available_nodes=2, min_train_nodes=1, fraction_evaluate=0.0,
                      exchange_timeout=0.5,
                      secure_stats=True)
    result = strategy.start(grid, initial_arrays(), num_rounds=1)
    assert result.train_metrics_clientapp[1]["fedtan-skipped"] == 1
    assert max_diff(to_numpy(result.arrays), to_numpy(initial_arrays())) == 0.0
