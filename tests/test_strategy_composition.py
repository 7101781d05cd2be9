"""FedTAN around Flower's strategies: server optimisers, DP wrappers, per-round config,
checkpoints, bound weights, drops and repeat offenders (in-process Grid, real ClientApp).

Every expected value is computed here from the clients' replies or in PyTorch, not by the
code under test.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
)
from torch import nn
from torch.utils.data import TensorDataset

from flwr_fedtan import FedTAN, FedTANClient, convert_batchnorm, fedtan_client_app
from flwr_fedtan.protocol import wire
from flwr_fedtan.client import clear_live_rounds, client_seed_key
from flwr_fedtan.reference import fedtan_round_in_process
from flwr_fedtan.strategy import derive_seed as server_derive_seed
from flwr_fedtan.training import derive_seed

from _grid import LocalGrid

NUM_CLASSES = 4
CLASSES_OF = {0: (0, 1), 1: (1, 2), 2: (2, 3), 3: (3, 0)}  # two classes per client: non-IID


class Net(nn.Module):
    """Conv-BN-ReLU, BN1d head: 2 BatchNorm calls, float32."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6, 8)
        self.bn2 = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv(x)))
        h = F.relu(self.bn2(self.fc1(h.mean(dim=(2, 3)))))
        return self.fc2(h)


def class_images(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Images whose class shows in their mean brightness and one bright corner."""
    x = torch.randn(len(labels), 1, 6, 6, generator=g) * 0.5
    x += labels.view(-1, 1, 1, 1).float() * 0.6
    for c in range(NUM_CLASSES):
        x[labels == c, :, c // 2 * 3:(c // 2 + 1) * 3, c % 2 * 3:(c % 2 + 1) * 3] += 1.5
    return x


def client_data(partition: int, nan_pixels: bool = False) -> TensorDataset:
    g = torch.Generator().manual_seed(500 + partition)
    classes = torch.tensor(CLASSES_OF[partition])
    y = classes[torch.randint(0, 2, (64,), generator=g)]
    x = class_images(y, g)
    if nan_pixels:
        x[:, :, 0, 0] = float("nan")
    return TensorDataset(x, y)


def held_out_set() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4242)
    y = torch.arange(400) % NUM_CLASSES
    return class_images(y, g), y


BATCH_SIZES = [6, 9, 12, 7]


def make_client(context, lr=0.1, local_steps=2, nan_partition=None) -> FedTANClient:
    pid = int(context.node_config["partition-id"])
    torch.manual_seed(7)
    return FedTANClient(Net(), client_data(pid, nan_pixels=pid == nan_partition), batch_size=BATCH_SIZES[pid],
                        lr=lr, local_steps=local_steps)


def initial_arrays() -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(convert_batchnorm(Net()).state_dict())


def to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in a)


def accuracy(arrays: dict[str, np.ndarray]) -> float:
    model = Net()
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()})
    model.eval()
    x, y = held_out_set()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def is_buffer(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in BUFFERS


class RecordingGrid(LocalGrid):
    """Keeps every final FedTAN reply (model and metrics) and lets a test alter replies."""

    def __init__(self, *args, alter=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.finals: dict[int, dict[int, tuple[dict, dict]]] = {}
        self.alter = alter
        self.train_configs: dict[int, dict] = {}

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        for msg, mid in zip(messages, ids):
            if msg.metadata.message_type != wire.MESSAGE_TYPE:
                continue
            node = msg.metadata.dst_node_id
            control = msg.content.config_records[wire.CONTROL]
            if control["phase"] == wire.PHASE_BEGIN:
                self.train_configs[node] = dict(msg.content.config_records[wire.CONFIG])
            reply = self._replies.get(mid)
            if reply is None or reply.has_error():
                continue
            if self.alter is not None:
                self.alter(node, control, reply)
            status = reply.content.config_records[wire.STATUS]
            if status["phase"] == wire.PHASE_DONE:
                arrays = to_numpy(reply.content.array_records[wire.ARRAYS])
                metrics = dict(reply.content.metric_records[wire.METRICS])
                self.finals.setdefault(int(control["round"]), {})[node] = (arrays, metrics)
        return ids


@pytest.fixture(autouse=True)
def _fresh_live_rounds():
    clear_live_rounds()
    yield
    clear_live_rounds()


def pooled_buffers(finals: dict[int, tuple[dict, dict]], nodes) -> dict[str, np.ndarray]:
    """Running statistics as the moments of the pooled data, by hand."""
    weights = np.array([finals[n][1]["num-examples"] for n in nodes], dtype=np.float64)
    weights /= weights.sum()
    out = {}
    for key in finals[nodes[0]][0]:
        if key.endswith("running_mean"):
            var_key = key[: -len("mean")] + "var"
            means = np.array([finals[n][0][key] for n in nodes], dtype=np.float64)
            vars_ = np.array([finals[n][0][var_key] for n in nodes], dtype=np.float64)
            mean = weights @ means
            out[key] = mean
            out[var_key] = weights @ (vars_ + (means - mean) ** 2)
        elif key.endswith("num_batches_tracked"):
            out[key] = np.rint(weights @ np.array([finals[n][0][key] for n in nodes], dtype=np.float64))
    return out


def weighted_params(finals, nodes) -> dict[str, np.ndarray]:
    weights = np.array([finals[n][1]["num-examples"] for n in nodes], dtype=np.float64)
    weights /= weights.sum()
    keys = [k for k in finals[nodes[0]][0] if not is_buffer(k)]
    return {k: sum(w * finals[n][0][k].astype(np.float64) for w, n in zip(weights, nodes)) for k in keys}


# ---------------------------------------------------------------------- server optimisers
@pytest.mark.slow
def test_fedadam_20_rounds_non_iid_stays_finite_and_learns_flower_fedadam_beside_it():
    """FedTAN+FedAdam, 20 rounds, 2 classes per client: finite, running_var >= 0, above
    chance. Flower's FedAdam alone on the same app moves the BatchNorm buffers with Adam."""
    rounds = 20
    grid = LocalGrid(fedtan_client_app(make_client), 4, {})
    wrapped = FedTAN(statistics="running", strategy=FedAdam(eta=0.03, fraction_evaluate=0.0, min_available_nodes=4),
                     seed=3)
    result = wrapped.start(grid, initial_arrays(), num_rounds=rounds, train_config=ConfigRecord({"lr": 0.1}))
    final = to_numpy(result.arrays)
    assert all(np.isfinite(v).all() for v in final.values())
    for key, value in final.items():
        if key.endswith("running_var"):
            assert (value >= 0).all(), key
        if key.endswith("num_batches_tracked"):
            assert value.dtype == np.int64 and int(value) == rounds * 2  # E=2 steps a round
        if not is_buffer(key):
            assert value.dtype == np.float32, key  # the global model keeps its dtypes
    fedtan_adam = accuracy(final)
    assert fedtan_adam > 0.5, fedtan_adam  # chance: 0.25

    clear_live_rounds()
    grid = LocalGrid(fedtan_client_app(make_client), 4, {})
    plain = FedAdam(eta=0.03, fraction_evaluate=0.0, min_available_nodes=4)
    with np.errstate(all="ignore"):
        outcome = plain.start(grid, initial_arrays(), num_rounds=rounds, train_config=ConfigRecord({"lr": 0.1}))
    plain_final = to_numpy(outcome.arrays)
    # What Flower's FedAdam does to the buffers: Adam steps on them like on weights, so the
    # step counter becomes a float far from the true count, and the running variances are
    # no longer moments of any data (docs/strategies.md's table records them).
    counter = plain_final["bn1.num_batches_tracked"]
    assert counter.dtype.kind == "f" and abs(float(counter) - rounds * 2) > 1
    loadable = {k: v.astype(np.int64 if k.endswith("num_batches_tracked") else np.float32)
                for k, v in plain_final.items()}
    min_var = min(float(v.min()) for k, v in plain_final.items() if k.endswith("running_var"))
    print(f"\nFedTAN+FedAdam accuracy {fedtan_adam:.3f}; Flower FedAdam: counter {float(counter):.2f} "
          f"(true {rounds * 2}), min running_var {min_var:.4g}, accuracy {accuracy(loadable):.3f}")


def test_fedavgm_update_is_a_momentum_step_on_the_pooled_update():
    lr_server, momentum = 0.7, 0.9
    grid = RecordingGrid(fedtan_client_app(make_client), 3, {})
    strategy = FedTAN(statistics="running", strategy=FedAvgM(server_learning_rate=lr_server, server_momentum=momentum,
                                       fraction_evaluate=0.0, min_available_nodes=3))
    result = strategy.start(grid, initial_arrays(), num_rounds=3)

    global_ = {k: v.astype(np.float64) for k, v in to_numpy(initial_arrays()).items()}
    velocity = None
    for server_round in (1, 2, 3):
        finals = grid.finals[server_round]
        nodes = sorted(finals)
        average = weighted_params(finals, nodes)
        pseudo_gradient = {k: global_[k] - average[k] for k in average}
        velocity = pseudo_gradient if velocity is None else {
            k: momentum * velocity[k] + pseudo_gradient[k] for k in average}
        params = {k: global_[k] - lr_server * velocity[k] for k in average}
        global_ = {**params, **pooled_buffers(finals, nodes)}
    final = to_numpy(result.arrays)
    assert max_diff({k: v for k, v in final.items() if not is_buffer(k)},
                    {k: v for k, v in global_.items() if not is_buffer(k)}) <= 1e-5
    assert max_diff({k: v for k, v in final.items() if is_buffer(k)},
                    {k: v for k, v in global_.items() if is_buffer(k)}) <= 1e-5


@pytest.mark.parametrize("optimiser", [FedYogi, FedAdagrad])
def test_other_fedopt_strategies_keep_buffers_pooled(optimiser):
    grid = RecordingGrid(fedtan_client_app(make_client), 3, {})
    strategy = FedTAN(statistics="running", strategy=optimiser(eta=0.01, fraction_evaluate=0.0, min_available_nodes=3))
    result = strategy.start(grid, initial_arrays(), num_rounds=2)
    final = to_numpy(result.arrays)
    expected = pooled_buffers(grid.finals[2], sorted(grid.finals[2]))
    assert max_diff({k: final[k] for k in expected}, expected) <= 1e-6
    assert all(np.isfinite(v).all() for v in final.values())
    assert final["bn1.num_batches_tracked"].dtype == np.int64
    # The optimiser never saw a buffer: its state covers the parameters only.
    assert set(strategy.strategy.m_t) == {k for k in final if not is_buffer(k)}


# ---------------------------------------------------------------------- per-round config
class ScheduledLR(FedAvg):
    """A user's FedAvg whose configure_train halves the learning rate every round."""

    def configure_train(self, server_round, arrays, config, grid):
        config["lr"] = 0.2 * 0.5 ** server_round
        return super().configure_train(server_round, arrays, config, grid)


def test_configure_train_schedule_reaches_the_clients():
    def double_client(context):  # float64: the in-process reference agrees to 1e-10
        pid = int(context.node_config["partition-id"])
        x, y = client_data(pid).tensors
        torch.manual_seed(7)
        return FedTANClient(Net().double(), TensorDataset(x.double(), y), batch_size=BATCH_SIZES[pid], lr=0.1,
                            local_steps=1)

    grid = RecordingGrid(fedtan_client_app(double_client), 3, {})
    torch.manual_seed(0)
    start = ArrayRecord(convert_batchnorm(Net().double()).state_dict())
    strategy = FedTAN(statistics="running", strategy=ScheduledLR(fraction_evaluate=0.0, min_available_nodes=3))
    result = strategy.start(grid, start, num_rounds=2)
    assert {cfg["lr"] for cfg in grid.train_configs.values()} == {0.2 * 0.25}  # round 2's

    arrays = to_numpy(start)
    for server_round in (1, 2):
        clients = [double_client(grid.contexts[n]) for n in grid.node_ids]
        keys = [client_seed_key(grid.contexts[n]) for n in grid.node_ids]
        arrays = fedtan_round_in_process(clients, keys, arrays, derive_seed(strategy.seed, server_round, 0),
                                         lr=0.2 * 0.5 ** server_round, local_steps=1)
    assert max_diff(to_numpy(result.arrays), arrays) <= 1e-10


# ---------------------------------------------------------------------- DP wrapper
def test_server_side_dp_clips_the_parameter_update_and_adds_noise():
    clip, noise_multiplier, nodes = 0.05, 0.5, 3
    grid = RecordingGrid(fedtan_client_app(make_client), nodes, {})
    dp = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(fraction_evaluate=0.0, min_available_nodes=nodes), noise_multiplier=noise_multiplier,
        clipping_norm=clip, num_sampled_clients=nodes)
    strategy = FedTAN(statistics="running", strategy=dp)
    np.random.seed(11)  # Flower's DP noise comes from NumPy's global generator
    result = strategy.start(grid, initial_arrays(), num_rounds=1)

    start = {k: v.astype(np.float64) for k, v in to_numpy(initial_arrays()).items() if not is_buffer(k)}
    finals = grid.finals[1]
    order = sorted(finals)
    weights = np.array([finals[n][1]["num-examples"] for n in order], dtype=np.float64)
    weights /= weights.sum()
    clipped_average = {k: np.zeros_like(v) for k, v in start.items()}
    for w, n in zip(weights, order):
        update = {k: finals[n][0][k].astype(np.float64) - start[k] for k in start}
        norm = np.sqrt(sum(float((u ** 2).sum()) for u in update.values()))
        assert norm > clip  # so clipping is exercised
        for k in start:
            clipped_average[k] += w * update[k] * min(1.0, clip / norm)
    noiseless_norm = np.sqrt(sum(float((u ** 2).sum()) for u in clipped_average.values()))
    assert noiseless_norm <= clip + 1e-9

    final = to_numpy(result.arrays)
    noise = np.concatenate([(final[k].astype(np.float64) - start[k] - clipped_average[k]).ravel() for k in start])
    stdv = noise_multiplier * clip / nodes
    assert noise.size > 150 and abs(noise.std() / stdv - 1) < 0.25 and abs(noise.mean()) < 4 * stdv / noise.size ** 0.5
    # Buffers take the pooled aggregate, untouched by clipping or noise.
    expected = pooled_buffers(finals, order)
    assert max_diff({k: final[k] for k in expected}, expected) <= 1e-6


# ---------------------------------------------------------------------- resume
def test_resumed_run_equals_uninterrupted(tmp_path):
    def strategy(**kwargs):
        return FedTAN(statistics="running", strategy=FedAdam(eta=0.02, fraction_train=0.75, min_train_nodes=2,
                                                             fraction_evaluate=0.0, min_available_nodes=4),
                      seed=5, **kwargs)

    grid = LocalGrid(fedtan_client_app(make_client), 4, {})
    full = strategy(checkpoint_dir=tmp_path, keep_checkpoints=0)
    uninterrupted = full.start(grid, initial_arrays(), num_rounds=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"round-0000{r}.fedtan-ckpt" for r in (1, 2, 3, 4)]

    clear_live_rounds()
    fresh_grid = LocalGrid(fedtan_client_app(make_client), 4, {})  # a restarted run: new node state too
    evaluated = []
    checkpoint = tmp_path / "round-00002.fedtan-ckpt"
    resumed = strategy().start(fresh_grid, ArrayRecord(), num_rounds=4, resume_from=checkpoint,
                               evaluate_fn=lambda r, a: evaluated.append(r) or MetricRecord({"x": 1.0}))
    assert max_diff(to_numpy(resumed.arrays), to_numpy(uninterrupted.arrays)) == 0
    assert evaluated == [2, 3, 4]
    assert sorted(resumed.train_metrics_clientapp) == [3, 4]
    # Sampling (3 of 4 nodes) followed (seed, round), so the resumed rounds met the same nodes.
    assert (resumed.train_metrics_clientapp[4]["fedtan-clients"]
            == uninterrupted.train_metrics_clientapp[4]["fedtan-clients"] == 3)


def test_resume_refuses_another_strategy(tmp_path):
    grid = LocalGrid(fedtan_client_app(make_client), 2, {})
    FedTAN(statistics="running", fraction_evaluate=0.0, checkpoint_dir=tmp_path).start(grid, initial_arrays(),
           num_rounds=1)
    with pytest.raises(ValueError, match="FedAvg.*FedAdam|build the same strategy"):
        FedTAN(statistics="running", strategy=FedAdam(fraction_evaluate=0.0)).start(grid, initial_arrays(),
               num_rounds=2,
                                                              resume_from=tmp_path)


def test_sampling_is_seeded_and_leaves_the_global_random_stream_alone():
    import random

    picks = []
    for _ in range(2):
        clear_live_rounds()
        grid = RecordingGrid(fedtan_client_app(make_client), 4, {})
        random.seed(123)
        before = random.random()
        random.seed(123)
        FedTAN(statistics="running", fraction_train=0.5, fraction_evaluate=0.0, seed=9).start(grid, initial_arrays(),
               num_rounds=2)
        assert random.random() == before  # the caller's stream is untouched
        picks.append({r: sorted(f) for r, f in grid.finals.items()})
    assert picks[0] == picks[1]


# ---------------------------------------------------------------------- bound weights
def test_client_inflating_num_examples_is_dropped_and_model_is_the_honest_average(caplog):
    def inflate(node, control, reply):
        metrics = reply.content.metric_records.get(wire.METRICS)
        if node == 1007 and metrics is not None:
            metrics["num-examples"] = 1e9

    grid = RecordingGrid(fedtan_client_app(make_client), 3, {}, alter=inflate)
    strategy = FedTAN(statistics="running", fraction_evaluate=0.0, min_available_nodes=3)
    with caplog.at_level(logging.WARNING):
        result = strategy.start(grid, initial_arrays(), num_rounds=1)
    reason = strategy.dropped[1][1007]
    assert "1000000000" in reason and "synchronised with 9 examples" in reason
    assert any("dropping node 1007" in r.getMessage() for r in caplog.records)
    honest = [1000, 1014]
    finals = grid.finals[1]
    expected = {**weighted_params(finals, honest), **pooled_buffers(finals, honest)}
    assert max_diff(to_numpy(result.arrays), expected) <= 1e-6
    assert result.train_metrics_clientapp[1]["fedtan-clients"] == 2


def test_reported_weight_option_trusts_the_client():
    def inflate(node, control, reply):
        metrics = reply.content.metric_records.get(wire.METRICS)
        if node == 1007 and metrics is not None:
            metrics["num-examples"] = 90

    grid = RecordingGrid(fedtan_client_app(make_client), 3, {}, alter=inflate)
    strategy = FedTAN(statistics="running", fraction_evaluate=0.0, min_available_nodes=3, client_weight="reported")
    result = strategy.start(grid, initial_arrays(), num_rounds=1)
    assert not strategy.dropped[1]
    finals = grid.finals[1]
    nodes = sorted(finals)
    expected = {**weighted_params(finals, nodes), **pooled_buffers(finals, nodes)}
    assert max_diff(to_numpy(result.arrays), expected) <= 1e-6


@pytest.mark.parametrize("lie", ["count", "num-examples"])
def test_forward_counts_inconsistent_across_layers_drop_the_client(lie):
    def alter(node, control, reply):
        status = reply.content.config_records.get(wire.STATUS)
        # The second BatchNorm call's forward payload (the reply to the first aggregate).
        if node == 1007 and status is not None and status["phase"] == "forward" and status["point"] == 1:
            if lie == "count":
                status["count"] = float(status["count"]) * 2
            else:
                status["num-examples"] = int(status["num-examples"]) * 2
                status["count"] = float(status["count"]) * 2

    grid = RecordingGrid(fedtan_client_app(make_client), 3, {}, alter=alter)
    strategy = FedTAN(statistics="running", fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=2)
    result = strategy.start(grid, initial_arrays(), num_rounds=1)
    reason = strategy.dropped[1][1007]
    assert ("values per example" in reason) if lie == "count" else ("at the step's first call" in reason)
    metrics = result.train_metrics_clientapp[1]
    assert metrics["fedtan-restarts"] == 1 and metrics["fedtan-clients"] == 2
    assert sorted(grid.finals[1]) == [1000, 1014]


# ---------------------------------------------------------------------- drops and repeat offenders
def test_nan_data_is_logged_with_node_and_reason_and_the_node_sits_out_after_repeated_failures(caplog):
    grid = LocalGrid(fedtan_client_app(lambda ctx: make_client(ctx, nan_partition=1)), 3, {})
    strategy = FedTAN(statistics="running", fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=2,
                      quarantine_after=2,
                      max_quarantine_rounds=2)
    with caplog.at_level(logging.INFO):
        result = strategy.start(grid, initial_arrays(), num_rounds=7)
    lines = [r.getMessage() for r in caplog.records]
    assert any("dropping node 1007" in line and "NaN" in line for line in lines), lines
    assert any("restarting the synchronised step with 2 clients (without node 1007:" in line for line in lines)
    restarts = [result.train_metrics_clientapp[r]["fedtan-restarts"] for r in range(1, 8)]
    # Fails in rounds 1 and 2; sits out 3; fails in 4 (3rd in a row): sits out 5-6; fails in 7.
    assert restarts == [1, 1, 0, 1, 0, 0, 1]
    assert sorted(strategy.dropped) == list(range(1, 8))
    assert [1007 in strategy.dropped[r] for r in range(1, 8)] == [True, True, False, True, False, False, True]
    assert any("node 1007 sits out" in line for line in lines)
    assert all(np.isfinite(v).all() for v in to_numpy(result.arrays).values())


def test_quarantine_can_be_disabled():
    grid = LocalGrid(fedtan_client_app(lambda ctx: make_client(ctx, nan_partition=1)), 3, {})
    strategy = FedTAN(statistics="running", fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=2,
                      quarantine_after=None)
    result = strategy.start(grid, initial_arrays(), num_rounds=3)
    assert [result.train_metrics_clientapp[r]["fedtan-restarts"] for r in (1, 2, 3)] == [1, 1, 1]


# ---------------------------------------------------------------------- API
def test_fedavg_options_and_strategy_are_exclusive():
    with pytest.raises(ValueError, match="set them on the wrapped strategy"):
        FedTAN(fraction_train=0.5, strategy=FedAdam())
    assert FedTAN(statistics="running", fraction_train=0.5).strategy.fraction_train == 0.5
    with pytest.raises(ValueError, match="client_weight"):
        FedTAN(client_weight="claimed")


def test_server_seed_derivation_matches_the_clients():
    for parts in [(0,), (0, 1, 0), (123456789012, 7, 3), (2**40 + 5, 99)]:
        assert server_derive_seed(*parts) == derive_seed(*parts)


def test_server_modules_import_no_torch():
    """strategy.py and the aggregation and secure packages import neither torch nor the torch
    modules of the package."""
    import ast
    from pathlib import Path

    import flwr_fedtan.aggregation as aggregation

    package = Path(aggregation.__file__).parent.parent
    for path in [package / "strategy.py", *sorted((package / "aggregation").glob("*.py")),
                 *sorted((package / "secure").glob("*.py"))]:
        name = path.relative_to(package).as_posix()
        tree = ast.parse(path.read_text())
        modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in modules if m.split(".")[0] == "torch" or m in ("training", "step", "client",
                                                                              "batchnorm", "reference")], name


def test_error_replies_and_malformed_done_replies_do_not_reach_the_wrapped_strategy():
    seen = []

    class Spy(FedAvg):
        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            seen.extend(sorted(r.metadata.src_node_id for r in replies))
            for reply in replies:  # shaped as Flower's strategies expect
                assert list(reply.content.array_records) == ["arrays"]
                assert not any(is_buffer(k) for k in reply.content.array_records["arrays"].keys())
            return super().aggregate_train(server_round, replies)

    def nan_model(node, control, reply):
        arrays = reply.content.array_records.get(wire.ARRAYS)
        if node == 1014 and arrays is not None:
            bad = arrays["fc2.bias"].numpy().copy()
            bad[0] = np.nan
            arrays["fc2.bias"] = Array(bad)

    grid = RecordingGrid(fedtan_client_app(make_client), 3, {}, alter=nan_model)
    strategy = FedTAN(statistics="running", strategy=Spy(fraction_evaluate=0.0, min_available_nodes=3))
    strategy.start(grid, initial_arrays(), num_rounds=1)
    assert seen == [1000, 1007]
    assert "NaN" in strategy.dropped[1][1014]
