"""timm models (``timm.create_model(..., pretrained=False)``, no network) through FedTAN:
exact against centralised PyTorch on the pooled batch, and through Flower rounds.

timm's EfficientNets, MobileNetV3 and RegNets normalise with ``BatchNormAct2d`` (a
``BatchNorm2d`` subclass applying its activation after normalising); ResNet-D variants use
plain ``BatchNorm2d`` (resnet10t serves for the checkpointing switch). Small inputs
(3x32x32) and float64 keep this quick.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord
from torch.utils.data import TensorDataset

from flwr_fedtan import FedTAN, FedTANClient, convert_batchnorm, fedtan_client_app, validate
from flwr_fedtan.client import clear_live_rounds, client_seed_key
from flwr_fedtan.seeds import derive_seed
from tests._models import single_thread  # noqa: F401 (an autouse fixture)
from tests.test_any_model import assert_exact, non_iid_batches

from _grid import LocalGrid

CLASSES = 5
MODELS = ["efficientnet_b0", "mobilenetv3_small_100", "regnetx_002"]


def create(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=CLASSES, drop_rate=0.0, drop_path_rate=0.0)
    return model.double().train()


@pytest.mark.parametrize("name", MODELS)
def test_timm_model_is_exact(name):
    model = create(name)
    batches = non_iid_batches(shape=(3, 32, 32))
    batches = [(x, y % CLASSES) for x, y in batches]
    assert_exact(model, batches, tol=1e-9)
    # Converting keeps BatchNormAct2d (and its activation) as it is: still exact.
    assert_exact(model, batches, prepare=convert_batchnorm, tol=1e-9)


def test_timm_gradient_checkpointing_is_reported_with_its_fix():
    model = create("resnet10t")
    assert validate(model) == []
    model.set_grad_checkpointing(True)
    issues = validate(model)
    assert issues and issues[0].module == "<model>" and "set_grad_checkpointing(False)" in issues[0].fix


# ------------------------------------------------------------------------------ Flower
BATCH_SIZES = [3, 6, 4]


def client_data(partition: int) -> TensorDataset:
    g = torch.Generator().manual_seed(10 + partition)
    x = torch.randn(12, 3, 32, 32, generator=g, dtype=torch.float64) * (1 + 0.5 * partition) + partition
    y = (torch.randint(0, 2, (12,), generator=g) + 2 * partition) % CLASSES  # non-IID labels
    return TensorDataset(x, y)


@pytest.fixture(autouse=True)
def _fresh_live_rounds():
    clear_live_rounds()
    yield
    clear_live_rounds()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenetv3_small_100", "regnetx_002"])
def test_timm_model_flower_round_equals_centralised_sgd_step(name):
    """One FedTAN round (E = 1, plain SGD) of FedTANClients over Flower messages (the real
    ClientApp and strategy, in-process Grid) equals one SGD step of the unmodified timm
    model on the pooled batch. (Replay is covered with a small model elsewhere: a timm
    model replayed at each of its ~100 exchanges costs minutes.)"""

    def client_fn(context):
        pid = int(context.node_config["partition-id"])
        return FedTANClient(create(name), client_data(pid), batch_size=BATCH_SIZES[pid], lr=0.1, local_steps=1)

    grid = LocalGrid(fedtan_client_app(client_fn), 3, {})
    strategy = FedTAN(min_available_nodes=3, fraction_evaluate=0.0)
    initial = create(name)
    result = strategy.start(grid, ArrayRecord(initial.state_dict()), num_rounds=1)

    round_seed = derive_seed(strategy.seed, 1, 0)
    xs, ys = [], []
    for node in grid.node_ids:
        client = client_fn(grid.contexts[node])
        x, y = client.sample_batch(derive_seed(derive_seed(round_seed, client_seed_key(grid.contexts[node])), 0))
        xs.append(x)
        ys.append(y)
    central = copy.deepcopy(initial)
    F.cross_entropy(central(torch.cat(xs)), torch.cat(ys)).backward()
    with torch.no_grad():
        for p in central.parameters():
            p -= 0.1 * p.grad
    expected = central.state_dict()
    got = {k: v.numpy() for k, v in result.arrays.items()}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value.numpy(), rtol=1e-9, atol=1e-10, err_msg=key)
