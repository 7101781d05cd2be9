"""Baselines of the app (simulations/app/baselines.py) and the comparison driver (compare.py).

The strategies run with the app's real ClientApp (simulations.app.client_app.app) over the
in-process Grid of tests/_grid.py, on tiny synthetic data with the small CNN.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message

from flwr_fedtan import FedTAN
from flwr_fedtan.client import clear_live_rounds
from simulations.app import baselines
from simulations.experiments import compare
from simulations.app.baselines import FREEZE_BN_STATS, LOCAL_STATE_KEY, batchnorm_keys
from simulations.app.client_app import app
from simulations.app.server_app import make_strategy, run_experiment
from simulations.app.task import client_dataset, model_from_config, pooled_dataset

from _grid import LocalGrid

NUM_CLIENTS = 3
LOCAL_STEPS = 2
CNN_BN_CALLS = 3


def app_config(**overrides) -> dict:
    """The app's declared run config with small, fast settings."""
    config = compare.app_config_defaults()
    config.update({"dataset": "synthetic", "model": "cnn", "batch-size": 8, "local-steps": LOCAL_STEPS,
                   "num-server-rounds": 1, "num-partitions": NUM_CLIENTS, "lr": 0.05})
    config.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return config


class RecordingGrid(LocalGrid):
    """LocalGrid that keeps every (node, message to it, its reply)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[tuple[int, Message, Message]] = []

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        for message, message_id in zip(messages, ids):
            self.log.append((message.metadata.dst_node_id, message, self._replies.get(message_id)))
        return ids

    def train_log(self):
        return [(n, m, r) for n, m, r in self.log if m.metadata.message_type == "train"]


def numpy_arrays(record) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def initial_arrays(config) -> dict[str, np.ndarray]:
    torch.manual_seed(int(config["seed"]))
    norm = baselines.model_norm(config)
    return {k: v.numpy().copy() for k, v in model_from_config(config, norm=norm).state_dict().items()}


def bn_keys(config) -> tuple[list[str], list[str]]:
    return batchnorm_keys(model_from_config(config))


@pytest.fixture(autouse=True)
def _fresh_live_rounds():
    clear_live_rounds()
    yield
    clear_live_rounds()


# ---------------------------------------------------------------------- every method
@pytest.mark.parametrize("method", list(baselines.METHODS))
def test_every_method_runs_one_round_end_to_end(method):
    config = app_config(strategy=method)
    spec = baselines.method_spec(method)
    nodes = 1 if spec.single_client else NUM_CLIENTS
    grid = RecordingGrid(app, nodes, config)
    result, summary = run_experiment(grid, config)

    final = numpy_arrays(result.arrays)
    assert final.keys() == initial_arrays(config).keys()
    assert all(np.all(np.isfinite(v)) for v in final.values())
    assert set(summary["test"]) == {0, 1}
    assert 0.0 <= summary["test"][1]["test-accuracy"] <= 1.0
    assert summary["method"] == method and summary["evaluation"] == spec.evaluation
    json.dumps(summary, default=float)  # what the server app writes

    traffic = summary["communication"][1]
    exchanges = 2 * CNN_BN_CALLS + 1 if method == "fedtan" else 1
    if method in ("fedtan", "fedavg-exact"):  # the statistics pass: one exchange per BatchNorm call, + done
        exchanges += CNN_BN_CALLS + 1
        assert summary["train"][1]["fedtan-stats-applied"] == 1
        assert summary["train"][1]["fedtan-stats-exchanges"] == CNN_BN_CALLS + 1
    assert traffic["train-exchanges"] == exchanges
    assert traffic["train-messages"] == traffic["train-replies"] == nodes * exchanges
    assert traffic.get("evaluate-exchanges", 0) == (1 if spec.evaluation == "federated" else 0)
    if method == "fedtan":  # the Grid's count agrees with FedTAN's own ledger
        train = summary["train"][1]
        assert traffic["train-bytes-down"] == train["fedtan-bytes-sent"] + train["fedtan-stats-bytes-sent"]
        assert traffic["train-bytes-up"] == train["fedtan-bytes-received"] + train["fedtan-stats-bytes-received"]

    model = model_from_config(config, norm=spec.norm)
    has_gn = any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert has_gn == (method == "fedgn")
    assert bool(batchnorm_keys(model)[0]) == (method != "fedgn")


def test_make_strategy_rejects_unknown_methods():
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy(app_config(strategy="fedprox"))


# ---------------------------------------------------------------------- FedBN
def test_fedbn_batchnorm_never_leaves_the_clients_and_persists_in_context_state():
    rounds = 2
    config = app_config(strategy="fedbn", num_server_rounds=rounds)
    params, stats = bn_keys(config)
    bn = set(params + stats)
    grid = RecordingGrid(app, NUM_CLIENTS, config)
    result, summary = run_experiment(grid, config)

    # Never in a message, either way (training and evaluation).
    assert grid.log
    for _, message, reply in grid.log:
        for record in list(message.content.array_records.values()) + list(reply.content.array_records.values()):
            assert not bn & set(record.keys())
    # Never averaged: the server's BatchNorm entries are still the initial ones.
    initial, final = initial_arrays(config), numpy_arrays(result.arrays)
    for key in bn:
        np.testing.assert_array_equal(final[key], initial[key])
    assert any(not np.array_equal(final[k], initial[k]) for k in final if k not in bn)

    # Each client keeps its own BN entries in context.state, carried over between rounds:
    # num_batches_tracked counts the steps of both rounds.
    means = []
    for context in grid.contexts.values():
        local = numpy_arrays(context.state.array_records[LOCAL_STATE_KEY])
        assert set(local) == bn
        for key in stats:
            if key.endswith("num_batches_tracked"):
                assert int(local[key]) == rounds * LOCAL_STEPS
        means.append(np.concatenate([local[k] for k in stats if k.endswith("running_mean")]))
    assert not np.allclose(means[0], means[1])  # non-IID clients: different statistics

    # Test accuracy: personalised models, equal-weight mean of the clients' accuracies.
    evaluations = [r for _, m, r in grid.log if m.metadata.message_type == "evaluate"]
    last = [r.content.metric_records["metrics"]["test-accuracy"] for r in evaluations[-NUM_CLIENTS:]]
    assert summary["test"][rounds]["test-accuracy"] == pytest.approx(np.mean(last), abs=1e-12)
    assert summary["test"][rounds]["test-accuracy-min"] == pytest.approx(min(last))
    assert "test-accuracy" in summary["test"][0]  # round 0: the initial model, on the server


def test_fedbn_client_restores_its_own_batchnorm_after_loading_global_arrays():
    """Round 2 starts from the client's round-1 BN entries, not the server's."""
    config = app_config(strategy="fedbn", num_server_rounds=2)
    params, stats = bn_keys(config)
    grid = RecordingGrid(app, NUM_CLIENTS, config)
    snapshots = {}

    def intercept(node, message):
        if message.metadata.message_type == "train":
            state = grid.contexts[node].state.array_records.get(LOCAL_STATE_KEY)
            snapshots.setdefault(node, []).append(None if state is None else numpy_arrays(state))
        return None

    grid.intercept = intercept
    run_experiment(grid, config)
    for node, (before_round_1, before_round_2) in snapshots.items():
        assert before_round_1 is None
        assert set(before_round_2) == set(params + stats)
        after = numpy_arrays(grid.contexts[node].state.array_records[LOCAL_STATE_KEY])
        running_var = next(k for k in stats if k.endswith("running_var"))
        assert not np.array_equal(after[running_var], before_round_2[running_var])


# ---------------------------------------------------------------------- SiloBN
def test_silobn_averages_gamma_beta_and_keeps_statistics_local():
    rounds = 2
    config = app_config(strategy="silobn", num_server_rounds=rounds)
    params, stats = bn_keys(config)
    grid = RecordingGrid(app, NUM_CLIENTS, config)
    result, _ = run_experiment(grid, config)

    for _, message, reply in grid.log:
        for record in list(message.content.array_records.values()) + list(reply.content.array_records.values()):
            assert not set(stats) & set(record.keys())
    train = grid.train_log()
    assert all(set(params) <= set(r.content.array_records["arrays"].keys()) for _, _, r in train)

    initial, final = initial_arrays(config), numpy_arrays(result.arrays)
    for key in stats:
        np.testing.assert_array_equal(final[key], initial[key])
    # gamma/beta: FedAvg of the last round's replies (equal numbers of examples).
    last = [numpy_arrays(r.content.array_records["arrays"]) for _, _, r in train[-NUM_CLIENTS:]]
    for key in params:
        np.testing.assert_allclose(final[key], np.mean([a[key] for a in last], axis=0), rtol=0, atol=1e-6)
        assert not np.array_equal(final[key], initial[key])
    for context in grid.contexts.values():
        local = numpy_arrays(context.state.array_records[LOCAL_STATE_KEY])
        assert set(local) == set(stats)
        nbt = next(k for k in stats if k.endswith("num_batches_tracked"))
        assert int(local[nbt]) == rounds * LOCAL_STEPS


# ---------------------------------------------------------------------- FixBN
def test_fixbn_freezes_global_statistics_after_the_switch_round():
    rounds = 4
    config = app_config(strategy="fixbn", num_server_rounds=rounds, fixbn_switch=0.5)
    assert baselines.fixbn_switch_round(config) == 2
    params, stats = bn_keys(config)
    grid = RecordingGrid(app, NUM_CLIENTS, config)
    result, _ = run_experiment(grid, config)

    # The global model at the start of each round, as sent to the clients.
    sent = {}
    for _, message, reply in grid.train_log():
        server_round = message.content.config_records["config"]["server-round"]
        sent[server_round] = numpy_arrays(message.content.array_records["arrays"])
        frozen = message.content.config_records["config"][FREEZE_BN_STATS]
        assert frozen == (server_round > 2)
        returned = set(reply.content.array_records["arrays"].keys())
        assert bool(set(stats) & returned) == (not frozen)
    globals_after = {r - 1: a for r, a in sent.items() if r > 1}
    globals_after[rounds] = numpy_arrays(result.arrays)
    initial = initial_arrays(config)
    for key in stats:
        if not key.endswith("num_batches_tracked"):
            assert not np.array_equal(globals_after[1][key], initial[key])  # FedAvg phase moves them
        for server_round in (3, 4):
            np.testing.assert_array_equal(globals_after[server_round][key], globals_after[2][key])
    # Everything else keeps training.
    assert any(not np.array_equal(globals_after[4][k], globals_after[2][k]) for k in params)


def test_train_locally_with_frozen_statistics_uses_and_keeps_them():
    config = app_config(strategy="fixbn")
    client = baselines.make_method_client(config, {"partition-id": 0, "num-partitions": NUM_CLIENTS})
    _, stats = batchnorm_keys(client.model)
    before = {k: v.clone() for k, v in client.model.state_dict().items()}
    baselines.train_locally(client, seed=1, local_steps=2, lr=0.1, freeze_bn_stats=True)
    after = client.model.state_dict()
    for key in stats:
        assert torch.equal(after[key], before[key])
    assert any(not torch.equal(after[k], before[k]) for k in after if k not in stats)


# ---------------------------------------------------------------------- centralised
def test_centralised_equals_fedtan_with_one_client_on_iid_data():
    """One client, E=1: FedTAN is plain SGD on that client's batch, i.e. centralised SGD."""
    rounds, clients, batch = 2, 4, 8
    central = app_config(strategy="centralised", partitioning="iid", num_partitions=clients,
                         batch_size=batch, local_steps=1, num_server_rounds=rounds)
    fedtan = dict(central, strategy="fedtan", **{"batch-size": clients * batch, "num-partitions": 1})
    # The pooled data of 4 IID clients is the single FedTAN client's partition.
    pooled, single = pooled_dataset(central, clients), client_dataset(fedtan, 0, 1)
    assert torch.equal(pooled.tensors[0], single.tensors[0])
    assert torch.equal(pooled.tensors[1], single.tensors[1])

    central_result, central_summary = run_experiment(LocalGrid(app, 1, central), central)
    single_fedtan = FedTAN(statistics="running", min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0,
                           seed=int(fedtan["seed"]))
    fedtan_result, fedtan_summary = run_experiment(LocalGrid(app, 1, fedtan), fedtan, strategy=single_fedtan)

    a, b = numpy_arrays(central_result.arrays), numpy_arrays(fedtan_result.arrays)
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in a) <= 1e-6
    initial = initial_arrays(central)
    assert max(float(np.abs(a[k].astype(np.float64) - initial[k]).max()) for k in a) > 1e-3
    for server_round in range(rounds + 1):
        assert central_summary["test"][server_round]["test-accuracy"] == pytest.approx(
            fedtan_summary["test"][server_round]["test-accuracy"], abs=1e-6)
    assert central_summary["train"][1]["train-loss"] == pytest.approx(
        fedtan_summary["train"][1]["train-loss"], abs=1e-6)


# ---------------------------------------------------------------------- compare.py
def fake_summary(method: str, accuracies: list[float], seconds: float = 10.0, exchanges: int = 1,
                 bytes_per_round: float = 2e6) -> dict:
    rounds = range(len(accuracies))
    return {
        "config": {"strategy": method},
        "seconds": seconds,
        "test": {str(r): {"test-accuracy": acc, "test-loss": 1.0 - acc} for r, acc in zip(rounds, accuracies)},
        "communication": {str(r): {"train-exchanges": exchanges, "train-bytes-down": bytes_per_round / 2,
                                   "train-bytes-up": bytes_per_round / 2} for r in rounds if r > 0},
    }


def fake_records(methods, partitions, seeds) -> list:
    records = []
    for partition in partitions:
        for m, method in enumerate(methods):
            for seed in seeds:
                top = 0.5 + 0.1 * m + 0.01 * seed
                accuracies = [0.1] + [top * (r / 5) for r in range(1, 6)]
                spec = compare.RunSpec(method, partition, seed, {"results-file": "/nonexistent.json"}, 3)
                summary = fake_summary(method, accuracies, exchanges=7 if method == "fedtan" else 1)
                records.append(compare.RunRecord(spec, summary, 1.0, "ran", curve=compare.accuracy_curve(summary)))
    return records


def test_compare_writes_tables_and_plots_from_summaries(tmp_path):
    methods, partitions, seeds = ["fedtan", "fedavg", "fedbn"], ["pathological", "dirichlet-0.1"], [0, 1]
    records = fake_records(methods, partitions, seeds)
    rows = compare.summarise(records, target=0.55)
    csv_path, md_path = compare.write_tables(rows, tmp_path, title="fake")
    plots = compare.plot_accuracy(records, tmp_path, target=0.55)
    curves = compare.write_curves(records, tmp_path)

    assert len(plots) == len(partitions)
    for path in plots:
        assert path.exists() and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = [line for line in md_path.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) == 1 + len(methods) * len(partitions)  # header + one row per method x partition
    with open(csv_path) as stream:
        csv_rows = list(csv.DictReader(stream))
    assert len(csv_rows) == len(methods) * len(partitions)
    by_key = {(r["method"], r["partition"]): r for r in csv_rows}
    fedtan = by_key[("fedtan", "pathological")]
    assert float(fedtan["final_mean"]) == pytest.approx(0.505)  # seeds 0 and 1: 0.50, 0.51
    assert float(fedtan["final_std"]) == pytest.approx(np.std([0.50, 0.51], ddof=1))
    assert float(fedtan["train_exchanges_per_round"]) == 7
    assert fedtan["rounds_to_target"] == ""  # 0.505 < 0.55: never, "-" in the markdown
    assert by_key[("fedbn", "pathological")]["rounds_to_target"] == "4"  # 0.705 * 4/5 = 0.564
    fedtan_line = next(line for line in table if line.startswith("| fedtan | pathological"))
    assert "| - |" in fedtan_line and "0.5050 ± 0.0071" in fedtan_line
    assert len(curves.read_text().splitlines()) == 1 + len(methods) * len(partitions) * 6


def test_compare_plans_runs_and_reports_progress(tmp_path):
    declared = compare.app_config_defaults()
    calls, lines = [], []

    def runner(run_config, num_supernodes, **kwargs):
        calls.append((run_config, num_supernodes, kwargs))
        if run_config["strategy"] == "fedbn":
            raise RuntimeError("boom")
        summary = fake_summary(run_config["strategy"], [0.1, 0.4, 0.6])
        summary["config"] = dict(run_config)
        Path(run_config["results-file"]).write_text(json.dumps(summary))
        return summary

    settings = {"num-server-rounds": 2, "local-steps": 1, "fixbn-switch": 0.5}
    runs = compare.plan_runs(["fedavg", "centralised", "fedbn"], ["dirichlet-0.1", "iid"], [0], settings,
                             num_clients=5, out_dir=tmp_path, declared=declared)
    assert len(runs) == 6
    centralised = next(r for r in runs if r.method == "centralised")
    assert centralised.num_supernodes == 1 and centralised.run_config["num-partitions"] == 5
    dirichlet = next(r for r in runs if r.partition == "dirichlet-0.1")
    assert dirichlet.run_config["partitioning"] == "dirichlet" and dirichlet.run_config["dirichlet-alpha"] == 0.1
    assert dirichlet.run_config["fixbn-switch"] == 0.5
    assert all(Path(r.run_config["results-file"]).is_absolute() for r in runs)

    records = compare.run_all(runs, runner, echo=lines.append)
    assert len(lines) == 6 and sum("FAILED" in line for line in lines) == 2
    assert "final acc 0.6000" in lines[0]
    assert [r.status for r in records].count("ran") == 4
    # A second pass reuses the summaries written, and retries the failures.
    lines.clear()
    compare.run_all(runs, runner, echo=lines.append)
    assert sum("(reused)" in line for line in lines) == 4 and len(calls) == 6 + 2

    with pytest.raises(ValueError, match="not declared"):
        compare.plan_runs(["fixbn"], ["iid"], [0], {"no-such-key": 0.3}, 5, tmp_path, declared=declared)
    with pytest.raises(ValueError, match="unknown partition"):
        compare.partition_overrides("dirichlet-x")
    assert compare.partition_overrides("pathological-3") == {"partitioning": "pathological",
                                                              "classes-per-client": 3}


def test_compare_main_with_a_fake_runner(tmp_path, capsys):
    def runner(run_config, num_supernodes, **kwargs):
        summary = fake_summary(run_config["strategy"], [0.1, 0.5, 0.8])
        summary["config"] = dict(run_config)
        return summary

    code = compare.main(["--methods", "fedtan,centralised", "--partitions", "iid", "--seeds", "0,1",
                         "--rounds", "2", "--local-steps", "1", "--dataset", "synthetic",
                         "--out", str(tmp_path)], runner=runner)
    assert code == 0
    out = capsys.readouterr().out
    assert "[1/4] fedtan" in out and "final acc 0.8000" in out
    assert (tmp_path / "results.md").exists() and (tmp_path / "accuracy-iid.png").stat().st_size > 0
    assert not math.isnan(float(next(csv.DictReader(open(tmp_path / "results.csv")))["best_mean"]))


# ---------------------------------------------------------------------- server optimisers
@pytest.mark.parametrize("method,optimizer", [("fedtan", "fedadam")])
def test_server_optimizer_from_the_run_config_runs_a_round(method, optimizer):
    config = app_config(strategy=method, server_optimizer=optimizer, server_eta=0.02, server_momentum=0.5)
    strategy = make_strategy(config)
    inner = strategy.strategy if method == "fedtan" else strategy
    assert type(inner).__name__ == {"fedadam": "FedAdam", "fedavgm": "FedAvgM"}[optimizer]
    if optimizer == "fedadam":
        assert (inner.eta, inner.beta_1, inner.beta_2, inner.tau, inner.eta_l) == (0.02, 0.9, 0.99, 1e-3, 0.05)
    else:
        assert (inner.server_momentum, inner.server_learning_rate) == (0.5, 1.0)
    grid = RecordingGrid(app, NUM_CLIENTS, config)
    result, summary = run_experiment(grid, config, strategy=strategy)
    final = numpy_arrays(result.arrays)
    assert final.keys() == initial_arrays(config).keys()
    assert all(np.all(np.isfinite(v)) for v in final.values())
    assert 0.0 <= summary["test"][1]["test-accuracy"] <= 1.0
    if method == "fedtan":
        for key, value in final.items():
            if key.endswith("running_var"):
                assert (value >= 0).all()
            if key.endswith("num_batches_tracked"):
                assert value.dtype == np.int64 and int(value) == LOCAL_STEPS


def test_server_optimizer_choices_and_refusals():
    from simulations.app.server_app import server_optimizer

    assert type(server_optimizer({})).__name__ == "FedAvg"
    plain = make_strategy(app_config(strategy="fedavg", server_optimizer="fedavgm", server_momentum=0.5))
    assert type(plain).__name__ == "FedAvgM" and plain.server_momentum == 0.5  # Flower's, unmodified
    for name, cls in [("fedyogi", "FedYogi"), ("fedadagrad", "FedAdagrad"), ("fedavgm", "FedAvgM")]:
        assert type(server_optimizer({"server-optimizer": name})).__name__ == cls
    with pytest.raises(ValueError, match="unknown server-optimizer"):
        server_optimizer({"server-optimizer": "sgd"})
    with pytest.raises(ValueError, match="not available with strategy='fedbn'"):
        make_strategy(app_config(strategy="fedbn", server_optimizer="fedadam"))
    assert compare.split_method("fedtan+fedadam") == ("fedtan", "fedadam")
    assert compare.split_method("fedavg") == ("fedavg", None)
    with pytest.raises(ValueError, match="cannot take a server optimiser"):
        compare.split_method("silobn+fedadam")
    with pytest.raises(ValueError, match="unknown server optimiser"):
        compare.split_method("fedtan+adam")
    declared = {**compare.app_config_defaults(), "server-optimizer": "none"}
    runs = compare.plan_runs(["fedtan+fedadam", "fedavg+fedadam"], ["pathological"], [0], {}, 5, Path("/tmp/x"),
                             declared=declared)
    assert [(r.method, r.run_config["strategy"], r.run_config["server-optimizer"]) for r in runs] == [
        ("fedtan+fedadam", "fedtan", "fedadam"), ("fedavg+fedadam", "fedavg", "fedadam")]
    assert runs[0].results_file.name == "fedtan+fedadam-seed0.json"
