"""The statistics pass through Flower messages (real strategy and ClientApp, in-process Grid):
the global model's running statistics equal central precise-BN, in float64, on the union
of the clients' examples, for FedTAN and for Flower's own strategies.

Every client forwards all of its data (``statistics_examples`` larger than any client's),
so the reference needs no knowledge of which examples were drawn: precise-BN on the
concatenation of all clients' data with the global model's parameters.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.app.error import Error
from flwr.serverapp.strategy import FedAdam, FedAvg
from torch.utils.data import TensorDataset

from flwr_fedtan import FedTAN, FedTANClient, fedtan_client_app
from flwr_fedtan.protocol import wire
from flwr_fedtan.client import clear_live_rounds
from flwr_fedtan.exact_statistics import ExactStatistics
from tests._models import build, single_thread  # noqa: F401 (an autouse fixture)
from tests.test_statistics_pass import central_precise_bn

from _grid import LocalGrid

SIZES = [10, 4, 7]  # unequal clients
ALL = 1000  # statistics_examples above every client's size: each forwards all of its data


def client_data(partition: int) -> TensorDataset:
    g = torch.Generator().manual_seed(20 + partition)
    x = torch.randn(SIZES[partition], 3, 8, 8, generator=g, dtype=torch.float64) * (1 + partition) + partition
    y = (torch.randint(0, 2, (SIZES[partition],), generator=g) + 2 * partition) % 10
    return TensorDataset(x, y)


def client_fn(context):
    pid = int(context.node_config["partition-id"])
    return FedTANClient(build("resnet20"), client_data(pid), batch_size=3, lr=0.05, local_steps=2)


@pytest.fixture(autouse=True)
def _fresh_live_rounds():
    clear_live_rounds()
    yield
    clear_live_rounds()


def run(strategy, rounds=2, grid=None, app=None):
    grid = grid or LocalGrid(app or fedtan_client_app(client_fn), len(SIZES), {})
    result = strategy.start(grid, ArrayRecord(build("resnet20").state_dict()), num_rounds=rounds)
    return result, grid


def assert_precise_bn(arrays: ArrayRecord, partitions=range(len(SIZES)), tol=1e-10):
    model = build("resnet20")
    model.load_state_dict(arrays.to_torch_state_dict())
    expected = central_precise_bn(model, [client_data(p).tensors[0] for p in partitions])
    got = {k: v.numpy() for k, v in arrays.items()}
    for key, value in expected.items():
        scale = np.abs(value.numpy()).max()
        if key.endswith("running_mean"):
            scale = max(scale, float(expected[key[: -len("mean")] + "var"].sqrt().max()))
        err = np.abs(got[key] - value.numpy()).max() / scale
        assert err < tol, f"{key}: relative error {err:.2e}"


def test_fedtan_global_model_gets_exact_statistics_and_the_same_weights():
    exact, _ = run(FedTAN(min_available_nodes=3, fraction_evaluate=0.0, statistics_examples=ALL, seed=4))
    running, _ = run(FedTAN(min_available_nodes=3, fraction_evaluate=0.0, statistics="running", seed=4))
    assert_precise_bn(exact.arrays)
    # The pass changes only running_mean / running_var: training never reads them.
    for key, value in running.arrays.items():
        same = np.array_equal(value.numpy(), exact.arrays[key].numpy())
        assert same != key.endswith(("running_mean", "running_var")), key
    metrics = exact.train_metrics_clientapp[2]
    assert metrics["fedtan-stats-applied"] == 1 and metrics["fedtan-stats-clients"] == 3
    assert metrics["fedtan-stats-examples"] == sum(SIZES)
    assert metrics["fedtan-stats-exchanges"] == 19 + 1  # ResNet-20: one per BatchNorm call, + done


def test_fedtan_pass_replays_when_every_message_lands_in_a_fresh_process():
    grid = LocalGrid(fedtan_client_app(client_fn), len(SIZES), {}, separate_processes=True)
    result, _ = run(FedTAN(min_available_nodes=3, fraction_evaluate=0.0, statistics_examples=ALL), rounds=1,
                    grid=grid)
    assert_precise_bn(result.arrays)


def test_flowers_fedavg_with_the_pass_through_add_fedtan():
    strategy = ExactStatistics(FedAvg(min_available_nodes=3, fraction_evaluate=0.0), statistics_examples=ALL)
    result, grid = run(strategy)
    assert_precise_bn(result.arrays)
    assert strategy.outcomes[2].clients == 3 and strategy.outcomes[2].buffers
    # The same FedAvg without the pass: the same parameters (up to the order of FedAvg's
    # sums: it samples nodes unseeded), other statistics.
    plain, _ = run(FedAvg(min_available_nodes=3, fraction_evaluate=0.0))
    for key, value in plain.arrays.items():
        a, b = value.numpy().astype(np.float64), result.arrays[key].numpy().astype(np.float64)
        close = np.allclose(a, b, rtol=1e-9, atol=1e-12)
        assert close != key.endswith(("running_mean", "running_var")), key


def test_the_pass_composes_with_fedadam_and_keeps_buffers_away_from_it():
    strategy = FedTAN(strategy=FedAdam(eta=1e-2, min_available_nodes=3, fraction_evaluate=0.0),
                      statistics_examples=ALL)
    result, _ = run(strategy)
    assert_precise_bn(result.arrays)


def test_secure_pass_equals_the_clear_pass():
    secure, _ = run(FedTAN(min_available_nodes=3, fraction_evaluate=0.0, statistics_examples=ALL, secure_stats=True),
                    rounds=1)
    assert_precise_bn(secure.arrays, tol=1e-9)
    assert secure.train_metrics_clientapp[1]["fedtan-stats-exchanges"] == 1 + 19 + 1  # keys, calls, done


def test_statistics_every_runs_the_pass_on_schedule_and_in_the_last_round():
    strategy = FedTAN(min_available_nodes=3, fraction_evaluate=0.0, statistics_examples=ALL, statistics_every=2)
    result, _ = run(strategy, rounds=3)
    applied = {r: m.get("fedtan-stats-applied", 0) for r, m in result.train_metrics_clientapp.items()}
    assert applied == {1: 0, 2: 1, 3: 1}
    assert_precise_bn(result.arrays)


def test_evaluate_fn_sees_the_exact_statistics():
    seen = {}

    def evaluate_fn(server_round, arrays):
        seen[server_round] = arrays
        return None

    strategy = FedTAN(min_available_nodes=3, fraction_evaluate=0.0, statistics_examples=ALL)
    grid = LocalGrid(fedtan_client_app(client_fn), len(SIZES), {})
    strategy.start(grid, ArrayRecord(build("resnet20").state_dict()), num_rounds=1, evaluate_fn=evaluate_fn)
    assert_precise_bn(seen[1])


def _grid_with_hostile_node(mode: str) -> tuple[LocalGrid, int]:
    """A grid whose second node misbehaves in the statistics pass only: ``error`` (its
    ClientApp fails), ``nan`` (a NaN in its forward payloads), ``count`` (its examples
    change after the first call), ``mapping`` (it reports another buffer mapping than the
    model's)."""
    app = fedtan_client_app(client_fn)
    holder: dict = {}

    def intercept(node: int, msg: Message):
        control = msg.content.config_records.get(wire.CONTROL)
        if node != holder["bad"] or not str(control.get("phase", "")).startswith("stats"):
            return None
        if mode == "error":
            return Message(Error(code=0, reason="ClientApp crashed in the statistics pass"), reply_to=msg)
        reply = app(msg, holder["grid"].contexts[node])
        if mode == "nan" and wire.STATS in reply.content.array_records:
            stats = reply.content.array_records[wire.STATS]
            mean = stats["mean"].numpy().copy()
            mean[0] = np.nan
            stats["mean"] = Array(mean)
        status = reply.content.config_records.get(wire.STATUS)
        if mode == "count" and status is not None and status.get("point", 0) >= 1:  # another n_k than at call 0
            status["num-examples"] = int(status["num-examples"]) + 1
        if mode == "mapping" and wire.STATS_BUFFERS in reply.content.config_records:
            record = reply.content.config_records[wire.STATS_BUFFERS]
            record[next(iter(record.keys()))] = [1]  # the first buffer is fed by call 0
        return reply

    grid = LocalGrid(app, len(SIZES), {}, intercept=intercept)
    holder.update(grid=grid, bad=grid.node_ids[1])
    return grid, holder["bad"]


@pytest.mark.parametrize("mode", ["error", "nan", "count", "mapping"])
def test_a_client_failing_in_the_pass_is_dropped_and_the_pass_restarts_without_it(mode, caplog):
    grid, bad = _grid_with_hostile_node(mode)
    strategy = FedTAN(min_available_nodes=3, fraction_evaluate=0.0, statistics_examples=ALL, quarantine_after=None)
    with caplog.at_level(logging.WARNING):
        result, _ = run(strategy, rounds=1, grid=grid)
    survivors = [p for p, node in enumerate(grid.node_ids) if node != bad]
    assert_precise_bn(result.arrays, partitions=survivors)
    assert strategy.dropped[1][bad].startswith("statistics pass: ")
    assert f"dropping node {bad}" in caplog.text
    metrics = result.train_metrics_clientapp[1]
    assert metrics["fedtan-stats-restarts"] == 1 and metrics["fedtan-stats-clients"] == 2
    # The round's own training was not affected: 3 clients averaged.
    assert metrics["fedtan-clients"] == 3


def test_too_few_clients_keep_the_aggregated_statistics(caplog):
    grid, bad = _grid_with_hostile_node("error")
    strategy = FedTAN(min_available_nodes=3, fraction_evaluate=0.0, statistics_examples=ALL, max_restarts=0)
    running, _ = run(FedTAN(min_available_nodes=3, fraction_evaluate=0.0, statistics="running"), rounds=1)
    with caplog.at_level(logging.WARNING):
        result, _ = run(strategy, rounds=1, grid=grid)
    assert "keeps its aggregated BatchNorm statistics" in caplog.text
    assert result.train_metrics_clientapp[1]["fedtan-stats-applied"] == 0
    for key, value in running.arrays.items():
        np.testing.assert_array_equal(result.arrays[key].numpy(), value.numpy(), err_msg=key)


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path):
    def strategy(**kw):
        return FedTAN(min_available_nodes=3, fraction_evaluate=0.0, statistics_examples=ALL, seed=2, **kw)

    whole, _ = run(strategy(), rounds=3)
    run(strategy(checkpoint_dir=tmp_path), rounds=2)
    resumed = strategy()
    grid = LocalGrid(fedtan_client_app(client_fn), len(SIZES), {})
    result = resumed.start(grid, ArrayRecord(build("resnet20").state_dict()), num_rounds=3, resume_from=tmp_path)
    for key, value in whole.arrays.items():
        np.testing.assert_array_equal(result.arrays[key].numpy(), value.numpy(), err_msg=key)


def test_statistics_options_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="statistics=.precise.: must be one of"):
        FedTAN(statistics="precise")
    with pytest.raises(ValueError, match="statistics_examples"):
        FedTAN(statistics_examples=0)
    with pytest.raises(ValueError, match="statistics_every"):
        ExactStatistics(FedAvg(), statistics_every=0)
    with pytest.raises(ValueError, match="FedTAN.statistics="):
        ExactStatistics(FedTAN())


def test_exact_statistics_hands_progress_interval_and_max_growth_to_the_pass(caplog):
    """ExactStatistics takes the pass's options as one set: ``progress_interval=0`` logs a
    line for every exchange of the pass (``None``: none), and a ``max_growth`` too small for
    the pooled statistics keeps the aggregated ones, as FedTAN's pass does."""
    def exchange_lines():
        return [r for r in caplog.records if "Statistics pass of round 1: exchange" in r.getMessage()]

    with caplog.at_level(logging.INFO):
        every = ExactStatistics(FedAvg(min_available_nodes=3, fraction_evaluate=0.0), statistics_examples=ALL,
                                progress_interval=0)
        run(every, rounds=1)
    assert every.outcomes[1].buffers is not None
    assert len(exchange_lines()) == every.outcomes[1].exchanges == 19 + 1  # a line per BatchNorm call, and done
    caplog.clear()
    with caplog.at_level(logging.INFO):
        silent = ExactStatistics(FedAvg(min_available_nodes=3, fraction_evaluate=0.0), statistics_examples=ALL,
                                 progress_interval=None)
        run(silent, rounds=1)
    assert silent.outcomes[1].buffers is not None and not exchange_lines()
    with caplog.at_level(logging.WARNING):
        bounded = ExactStatistics(FedAvg(min_available_nodes=3, fraction_evaluate=0.0), statistics_examples=ALL,
                                  max_growth=1.0 + 1e-9)
        run(bounded, rounds=1)
    assert bounded.outcomes[1].buffers is None
    assert "beyond its limit" in caplog.text and "1 times the global" in caplog.text
    with pytest.raises(TypeError, match="unknown options \\['max_grow'\\]"):
        ExactStatistics(FedAvg(), max_grow=10.0)


def test_a_model_is_left_unchanged_by_a_client_pass():
    """The client's pass touches neither parameters nor buffers of its model."""
    client = client_fn(type("C", (), {"node_config": {"partition-id": 0}})())
    before = copy.deepcopy(client.model.state_dict())
    stats_pass = client.statistics_pass(seed=1, examples=ALL)
    from flwr_fedtan.reference import aggregate_requests

    request = stats_pass.start()
    while request is not None:
        _, aggregate = aggregate_requests({0: request})
        request = stats_pass.resume(aggregate)
    for key, value in client.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert stats_pass.num_examples == SIZES[0]


def test_an_unexpected_error_in_the_pass_keeps_the_aggregated_statistics_and_the_run(monkeypatch, caplog):
    """Whatever goes wrong inside the pass (here the pooling itself raises), the round keeps
    its aggregated statistics and the run goes on: the pass never ends a run."""
    import flwr_fedtan.protocol.pass_driver as module

    def broken(*args, **kwargs):
        raise ArithmeticError("pooling broke")

    monkeypatch.setattr(module, "pool_forward_stats", broken)
    running, _ = run(FedTAN(min_available_nodes=3, fraction_evaluate=0.0, statistics="running"), rounds=2)
    with caplog.at_level(logging.WARNING):
        result, _ = run(FedTAN(min_available_nodes=3, fraction_evaluate=0.0), rounds=2)
    assert "stopped by ArithmeticError: pooling broke" in caplog.text
    assert all(result.train_metrics_clientapp[r]["fedtan-stats-applied"] == 0 for r in (1, 2))
    for key, value in running.arrays.items():
        np.testing.assert_array_equal(result.arrays[key].numpy(), value.numpy(), err_msg=key)


def test_a_key_reply_raising_in_the_secure_pass_drops_that_node_with_the_reason(monkeypatch, caplog):
    """A key reply whose handling raises an error no check foresaw, in the statistics pass's
    key exchange, drops that node (named, with the error) and the pass goes on without it,
    as in the round's own key exchange."""
    from flwr_fedtan import secure

    holder: dict = {"in_pass": False}

    def intercept(node: int, msg: Message):
        control = msg.content.config_records.get(wire.CONTROL)
        holder["in_pass"] |= control.get("phase") == wire.PHASE_STATS_KEYS
        return None

    real_accept = secure.ServerSession.accept_public_key

    def accept(session, node, key):
        if holder["in_pass"] and node == holder["bad"]:
            raise RuntimeError("key store broke")
        return real_accept(session, node, key)

    monkeypatch.setattr(secure.ServerSession, "accept_public_key", accept)
    grid = LocalGrid(fedtan_client_app(client_fn), len(SIZES), {}, intercept=intercept)
    holder["bad"] = bad = grid.node_ids[1]
    strategy = FedTAN(min_available_nodes=3, fraction_evaluate=0.0, statistics_examples=ALL, secure_stats=True,
                      quarantine_after=None)
    with caplog.at_level(logging.WARNING):
        result, _ = run(strategy, rounds=1, grid=grid)
    assert strategy.dropped[1] == {
        bad: "statistics pass: its reply could not be handled (RuntimeError: key store broke)"}
    assert f"dropping node {bad}" in caplog.text
    metrics = result.train_metrics_clientapp[1]
    assert metrics["fedtan-stats-applied"] == 1 and metrics["fedtan-stats-clients"] == 2
    assert metrics["fedtan-clients"] == 3  # the round's own key exchange was not affected
    survivors = [p for p, node in enumerate(grid.node_ids) if node != bad]
    assert_precise_bn(result.arrays, partitions=survivors, tol=1e-9)
