"""The app's ServerApp: FedTAN (or Flower's FedAvg) with centralised test accuracy per round."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result

from flwr_fedtan import FedTAN, convert_batchnorm
from flwr_fedtan.client import evaluate_model

from .task import model_from_config, test_dataset

app = ServerApp()
log = logging.getLogger(__name__)

STRATEGIES = ("fedtan", "fedavg")


def make_evaluate_fn(config):
    """Centralised evaluation of the global model on the test set."""
    model = model_from_config(config)
    device = torch.device(str(config.get("device", "cpu")))
    model.to(device)
    data = test_dataset(config)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy, _ = evaluate_model(model, data, torch.nn.functional.cross_entropy, device)
        return MetricRecord({"test-loss": loss, "test-accuracy": accuracy})

    return evaluate


def make_strategy(config):
    """The strategy named by the run config's ``strategy``."""
    name = str(config["strategy"])
    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2)
    if name == "fedtan":
        return FedTAN(**common, sync_steps=int(config.get("sync-steps", 1)),
                      exchange_timeout=float(config.get("exchange-timeout", 120.0)),
                      seed=int(config.get("seed", 0)))
    if name == "fedavg":
        return FedAvg(**common)
    raise ValueError(f"unknown strategy {name!r}; choose from {STRATEGIES}")


def result_summary(result: Result, config, seconds: float) -> dict:
    """A JSON-ready digest of a run."""
    return {
        "config": dict(config),
        "seconds": seconds,
        "train": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
        "test": {r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()},
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured strategy and report test accuracy per round."""
    config = context.run_config
    torch.manual_seed(int(config.get("seed", 0)))
    model = convert_batchnorm(model_from_config(config))
    initial = ArrayRecord(model.state_dict())
    strategy = make_strategy(config)
    started = time.time()
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=int(config["num-server-rounds"]),
        train_config=ConfigRecord({"lr": float(config["lr"]), "local-steps": int(config["local-steps"])}),
        evaluate_fn=make_evaluate_fn(config),
    )
    summary = result_summary(result, config, time.time() - started)
    out = str(config.get("results-file", "") or "")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(summary, indent=2, default=float))
        # The final global model, loadable into model_from_config(config).
        torch.save(result.arrays.to_torch_state_dict(), Path(out).with_suffix(".pt"))
