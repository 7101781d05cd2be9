"""simulations/experiments/fixbn_probe.py: the replay of FixBN's first frozen round, on synthetic data."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from flwr_fedtan.training import derive_seed
from simulations.app import baselines
from simulations.experiments import compare, fixbn_probe
from simulations.app.task import model_from_config

NUM_CLIENTS = 2


def probe_config() -> dict:
    config = compare.app_config_defaults()
    config.update({"dataset": "synthetic", "model": "cnn", "batch-size": 8, "local-steps": 2,
                   "num-server-rounds": 3, "num-partitions": NUM_CLIENTS, "lr": 0.05, "strategy": "fixbn",
                   "partitioning": "iid", "seed": 0})
    return config


def trained_state(config) -> dict:
    """A global model whose running statistics moved away from (0, 1)."""
    torch.manual_seed(0)
    model = model_from_config(config)
    model.train()
    with torch.no_grad():
        model(torch.randn(64, 1, 28, 28) * 2 + 0.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_frozen_replay_starts_from_the_global_model_in_evaluation_mode():
    config = probe_config()
    state = trained_state(config)
    switch_round = 2
    frozen = fixbn_probe.replay_round(config, state, switch_round, "frozen", 0.05, NUM_CLIENTS)
    train = fixbn_probe.replay_round(config, state, switch_round, "train", 0.05, NUM_CLIENTS)
    assert [c["partition"] for c in frozen] == list(range(NUM_CLIENTS))
    assert all(len(c["steps"]) == config["local-steps"] for c in frozen + train)

    # Step 0, computed independently: the client's first batch of round 3 through the
    # global model, BatchNorm in evaluation mode (frozen) or training mode (train).
    client = baselines.make_method_client(config, {"partition-id": 1, "num-partitions": NUM_CLIENTS})
    inputs, targets = client.sample_batch(derive_seed(baselines.round_seed(0, switch_round + 1, 1), 0))
    for mode, result in (("frozen", frozen), ("train", train)):
        model = model_from_config(config)
        model.load_state_dict(state)
        model.train(mode == "train")
        with torch.no_grad():
            expected = F.cross_entropy(model(inputs), targets)
        assert result[1]["steps"][0]["loss"] == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="unknown mode"):
        fixbn_probe.replay_round(config, state, switch_round, "eval", 0.05, NUM_CLIENTS)
