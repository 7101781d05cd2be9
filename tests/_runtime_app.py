"""A small FedTAN ClientApp defined at module level, so that another process (the node
worker, a Ray home actor) can import its ``client_fn`` by name; and its in-process
reference. Used by tests/test_runtime_*.py."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord
from torch import nn
from torch.utils.data import TensorDataset

from flwr_fedtan import FedTANClient, convert_batchnorm, fedtan_client_app
from flwr_fedtan.client import client_seed_key
from flwr_fedtan.reference import fedtan_round_in_process, pooled_statistics
from flwr_fedtan.runtime import node_client_app
from flwr_fedtan.training import derive_seed

BATCH_SIZES = [5, 8, 11, 6]
NUM_BN_CALLS = 3
LR = 0.1


class SmallNet(nn.Module):
    """Conv-BN-ReLU x2 with a residual add, BN1d head: 3 BatchNorm calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6, 8)
        self.bn3 = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)) + h)
        h = F.relu(self.bn3(self.fc1(h.mean(dim=(2, 3)))))
        return self.fc2(h)


def client_data(partition: int) -> TensorDataset:
    g = torch.Generator().manual_seed(100 + partition)
    x = torch.randn(40, 1, 6, 6, generator=g, dtype=torch.float64) * (1 + partition) + 2 * partition
    y = torch.randint(0, 4, (40,), generator=g) % (2 + partition)  # non-IID labels
    return TensorDataset(x, y)


def make_client(context) -> FedTANClient:
    pid = int(context.node_config["partition-id"])
    torch.manual_seed(999)  # the client's own init is overwritten by the global model
    return FedTANClient(SmallNet().double(), client_data(pid), batch_size=BATCH_SIZES[pid % len(BATCH_SIZES)], lr=LR,
                        local_steps=int(context.run_config.get("local-steps", 2)))


app = fedtan_client_app(make_client)
"""The real ClientApp (imports torch)."""

worker_app = node_client_app("_runtime_app:app", live_home="worker")
"""The light ClientApp forced to forward every message to the node worker."""


def initial_arrays() -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(convert_batchnorm(SmallNet().double()).state_dict())


def to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in a)


def reference_rounds(contexts, strategy_seed: int, rounds: int, local_steps: int = 2, attempts=None,
                     statistics: bool = False) -> dict:
    """FedTAN rounds computed in one process: pooled_backward + SGD + BN-aware averaging;
    with ``statistics``, then the statistics pass over every client's whole data (what
    FedTAN's default ``statistics_examples`` covers for these 40-example clients)."""
    arrays = to_numpy(initial_arrays())
    for server_round in range(1, rounds + 1):
        attempt = (attempts or {}).get(server_round, 0)
        clients = [make_client(c) for c in contexts]
        for client in clients:
            client.local_steps = local_steps
        keys = [client_seed_key(c) for c in contexts]
        arrays = fedtan_round_in_process(clients, keys, arrays, derive_seed(strategy_seed, server_round, attempt),
                                         lr=LR, local_steps=local_steps)
        if statistics:
            models = []
            for _ in contexts:
                model = convert_batchnorm(SmallNet().double())
                model.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()})
                models.append(model)
            inputs = [client_data(int(c.node_config["partition-id"])).tensors[0] for c in contexts]
            arrays.update(pooled_statistics(models, inputs, load=False))
    return arrays
