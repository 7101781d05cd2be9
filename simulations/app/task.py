"""Glue between the run config and the app's pieces: data partitions, models, clients."""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import TensorDataset

from flwr_fedtan import FedTANClient

from .datasets import DATASET_SPECS, load_dataset
from .models import build_model
from .partitions import dataset_partitions


def dataset_info(name: str) -> tuple[int, int]:
    """(input channels, classes) of a dataset name."""
    try:
        spec = DATASET_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASET_SPECS)}") from None
    return spec.channels, spec.num_classes


def model_from_config(config: Mapping[str, Any], norm: str = "bn") -> torch.nn.Module:
    """The model named in the run config (``model``, ``dataset``)."""
    channels, classes = dataset_info(str(config["dataset"]))
    return build_model(str(config["model"]), num_classes=classes, in_channels=channels, norm=norm)


def data_location(config: Mapping[str, Any]) -> dict[str, Any]:
    """``data_dir`` and ``sources`` for :func:`simulations.app.datasets.load_dataset` from the
    run config's ``data-dir`` and ``data-sources`` (empty: the defaults)."""
    return {"data_dir": str(config.get("data-dir", "") or "") or None,
            "sources": str(config.get("data-sources", "") or "") or None}


def classes_per_client(config: Mapping[str, Any], num_partitions: int) -> int:
    """``classes-per-client`` for pathological partitions, raised if needed so that the
    clients together hold every class (e.g. 5 with Flower's default of 2 SuperNodes)."""
    _, classes = dataset_info(str(config["dataset"]))
    wanted = int(config.get("classes-per-client", 2))
    return max(wanted, math.ceil(classes / max(1, num_partitions)))


def _partitioned_train_set(
    config: Mapping[str, Any], num_partitions: int
) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """The training images and labels, and the clients' index arrays, per the run config."""
    dataset, location = str(config["dataset"]), data_location(config)
    images, labels = load_dataset(dataset, split="train", **location)
    parts = dataset_partitions(dataset, int(num_partitions), str(config["partitioning"]), split="train",
                               seed=int(config.get("seed", 0)),
                               classes_per_partition=classes_per_client(config, int(num_partitions)),
                               alpha=float(config.get("dirichlet-alpha", 0.5)), **location)
    return images, labels, parts


def client_dataset(config: Mapping[str, Any], partition_id: int, num_partitions: int) -> TensorDataset:
    """The training partition of one client, as described by the run config."""
    images, labels, parts = _partitioned_train_set(config, num_partitions)
    index = torch.as_tensor(parts[int(partition_id)], dtype=torch.long)
    return TensorDataset(images[index], labels[index])


def pooled_dataset(config: Mapping[str, Any], num_partitions: int) -> TensorDataset:
    """The union of the training partitions of ``num_partitions`` clients, in index order.

    What centralised training sees: exactly the examples the federated clients hold
    together (the whole training set, unless a partitioner leaves some out).
    """
    images, labels, parts = _partitioned_train_set(config, num_partitions)
    index = torch.as_tensor(np.sort(np.concatenate(parts)), dtype=torch.long)
    return TensorDataset(images[index], labels[index])


def test_dataset(config: Mapping[str, Any]) -> TensorDataset:
    """The centralised test set."""
    images, labels = load_dataset(str(config["dataset"]), split="test", **data_location(config))
    return TensorDataset(images, labels)


def make_client(config: Mapping[str, Any], node_config: Mapping[str, Any], norm: str = "bn") -> FedTANClient:
    """A :class:`FedTANClient` for one node of the app."""
    partition_id = int(node_config.get("partition-id", 0))
    num_partitions = int(node_config.get("num-partitions", config.get("num-partitions", 1)))
    return FedTANClient(
        model_from_config(config, norm=norm),
        client_dataset(config, partition_id, num_partitions),
        batch_size=int(config["batch-size"]),
        lr=float(config["lr"]),
        local_steps=int(config["local-steps"]),
        device=str(config.get("device", "cpu")),
    )


def in_process_fedtan(config: Mapping[str, Any], num_partitions: int, num_rounds: int) -> dict:
    """The app's FedTAN run computed in one process, without Flower (the reference).

    Same initial model, data partitions, batch seeds and plain-SGD steps as
    ``flwr run .`` with ``strategy = "fedtan"``, and with ``statistics = "exact"`` the
    statistics pass after every ``statistics-every`` rounds and the last (the same examples
    drawn, :func:`flwr_fedtan.reference.pooled_statistics`); returns the final global arrays.
    """
    from flwr_fedtan import convert_batchnorm
    from flwr_fedtan.exact_statistics import DEFAULT_STATISTICS_EXAMPLES, pass_due, pass_seed
    from flwr_fedtan.reference import fedtan_round_in_process, pooled_statistics
    from flwr_fedtan.training import derive_seed

    seed = int(config.get("seed", 0))
    torch.manual_seed(seed)
    model = convert_batchnorm(model_from_config(config))
    arrays = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    node_configs = [{"partition-id": p, "num-partitions": num_partitions} for p in range(num_partitions)]
    for server_round in range(1, num_rounds + 1):
        clients = [make_client(config, node_config) for node_config in node_configs]
        arrays = fedtan_round_in_process(
            clients, list(range(num_partitions)), arrays, derive_seed(seed, server_round, 0),
            lr=float(config["lr"]), local_steps=int(config["local-steps"]),
        )
        every = int(config.get("statistics-every", 1))
        if str(config.get("statistics", "exact")) == "exact" and pass_due(server_round, every, num_rounds):
            examples = int(config.get("statistics-examples", DEFAULT_STATISTICS_EXAMPLES))
            inputs = []
            for partition, client in enumerate(clients):
                client.model.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()})
                inputs.append(client.sample_batch(derive_seed(pass_seed(seed, server_round), partition), examples)[0])
            arrays.update(pooled_statistics([c.model for c in clients], inputs, load=False))
    return {k: np.asarray(v) for k, v in arrays.items()}
