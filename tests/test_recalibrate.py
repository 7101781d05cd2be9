"""simulations/experiments/recalibrate.py: exact BatchNorm statistics of a final model, on synthetic data."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from simulations.app import task
from simulations.experiments import compare, recalibrate
from simulations.app.task import model_from_config, pooled_dataset


def synthetic_config(strategy: str = "fedtan", seed: int = 0) -> dict:
    config = compare.app_config_defaults()
    config.update({"dataset": "synthetic", "model": "cnn", "batch-size": 8, "local-steps": 2,
                   "num-server-rounds": 2, "num-partitions": 2, "lr": 0.05, "strategy": strategy,
                   "partitioning": "pathological", "seed": seed})
    return config


def skewed_model(config: dict, seed: int) -> nn.Module:
    """A model whose running statistics are far from its inputs' (trained on shifted data)."""
    torch.manual_seed(seed)
    model = model_from_config(config)
    model.train()
    with torch.no_grad():
        model(torch.randn(64, 1, 28, 28) * 3 + 2)
    return model


def test_first_layer_statistics_are_its_inputs_moments():
    model = model_from_config(synthetic_config())
    inputs = torch.randn(300, 1, 28, 28)
    recalibrate.set_exact_statistics(model, inputs)
    first_conv, first_bn = model.features[0], model.features[1]
    with torch.no_grad():
        out = F.conv2d(inputs, first_conv.weight, first_conv.bias, padding=1).double()
    torch.testing.assert_close(first_bn.running_mean, out.mean((0, 2, 3)).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first_bn.running_var, out.var((0, 2, 3), unbiased=False).float(),
                               rtol=1e-5, atol=1e-6)


def test_every_layer_sees_its_own_statistics_in_the_final_evaluation_pass():
    # Layer by layer: a deeper layer's statistics must be those of its input once every
    # earlier layer normalises with its new statistics, which a single pass of
    # hooks over the old model would miss.
    model = skewed_model(synthetic_config(), seed=1)
    inputs = torch.randn(200, 1, 28, 28)
    recalibrate.set_exact_statistics(model, inputs)
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(layers) >= 2
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda module, args, i=i: seen.__setitem__(i, args[0].double()))
             for i, layer in enumerate(layers)]
    model.eval()
    with torch.no_grad():
        model(inputs)
    for hook in hooks:
        hook.remove()
    for index, layer in enumerate(layers):
        dims = [0] + list(range(2, seen[index].dim()))
        torch.testing.assert_close(layer.running_mean.double(), seen[index].mean(dims), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.running_var.double(), seen[index].var(dims, unbiased=False),
                                   rtol=1e-4, atol=1e-5)


def write_run(folder, config: dict, model: nn.Module, label: str, norm: str = "bn",
              evaluation: str = "server", variant: str = ""):
    runs = folder / "runs" / variant / config["partitioning"]
    runs.mkdir(parents=True, exist_ok=True)
    stem = runs / f"{label}-seed{config['seed']}"
    stem.with_suffix(".json").write_text(json.dumps({"config": config, "norm": norm, "evaluation": evaluation}))
    torch.save(model.state_dict(), stem.with_suffix(".pt"))
    return stem.with_suffix(".pt")


@torch.no_grad()
def layer_by_layer_statistics(model: nn.Module, inputs: torch.Tensor) -> None:
    """Precise-BN the slow way: one evaluation-mode pass per layer, in network order, each
    setting that layer's statistics to the float64 moments of its input."""
    model.eval()
    for layer in [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]:
        seen = []
        hook = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].double()))
        model(inputs)
        hook.remove()
        dims = [0] + list(range(2, seen[0].dim()))
        layer.running_mean.copy_(seen[0].mean(dims))
        layer.running_var.copy_(seen[0].var(dims, unbiased=False))


def accuracy(model: nn.Module, config: dict) -> float:
    inputs, targets = task.test_dataset(config).tensors
    model.eval()
    with torch.no_grad():
        return float((model(inputs).argmax(1) == targets).double().mean())


def test_grid_folder_gets_stored_and_exact_accuracies_per_run_and_seed_means(tmp_path):
    rows = {}
    for seed in (0, 1):
        config = synthetic_config(seed=seed)
        model = skewed_model(config, seed)
        path = write_run(tmp_path, config, model, "fedtan")
        stored = accuracy(model, config)
        reference = model_from_config(config)
        reference.load_state_dict(model.state_dict())
        layer_by_layer_statistics(reference, pooled_dataset(config, 2).tensors[0][::3])
        exact = accuracy(reference, config)
        rows[seed] = (stored, exact, path, model)
    gn_config = synthetic_config("fedgn")
    write_run(tmp_path, gn_config, model_from_config(gn_config, norm="gn"), "fedgn", norm="gn")
    write_run(tmp_path, synthetic_config("fedbn"), skewed_model(synthetic_config("fedbn"), 3), "fedbn",
              evaluation="federated")

    write_run(tmp_path, synthetic_config(seed=0), rows[0][3], "fedtan", variant="sync5")

    assert recalibrate.main([str(tmp_path), "--stride", "3"]) == 0

    lines = (tmp_path / "recalibrated.csv").read_text().splitlines()
    assert lines[0] == "label,partition,seed,stored,exact"
    assert len(lines) == 4  # fedgn (no BatchNorm) and fedbn (personalised) left out
    assert lines[3] == f"fedtan [sync5],pathological,0,{lines[1].split(',', 3)[3]}"
    for seed, (stored, exact, _, _) in rows.items():
        label, partition, seed_text, stored_text, exact_text = lines[1 + seed].split(",")
        assert (label, partition, int(seed_text)) == ("fedtan", "pathological", seed)
        assert float(stored_text) == pytest.approx(stored, abs=1e-9)
        # float32 against float64 statistics: at most one test example may flip.
        assert float(exact_text) == pytest.approx(exact, abs=1.01 / len(task.test_dataset(config)))
    assert max(abs(stored - exact) for stored, exact, _, _ in rows.values()) > 0.05  # the columns differ
    table = (tmp_path / "recalibrated.md").read_text()
    exacts = [float(line.split(",")[4]) for line in lines[1:3]]
    stores = [float(line.split(",")[3]) for line in lines[1:3]]
    cell = lambda a, b: f"{(a + b) / 2:.4f} ± {abs(a - b) / math.sqrt(2):.4f}"  # noqa: E731
    assert f"| fedtan | pathological | 2 | {cell(*stores)} | {cell(*exacts)} |" in table


def test_folder_without_models_is_refused_with_the_reason(tmp_path, capsys):
    with pytest.raises(SystemExit):
        recalibrate.main([str(tmp_path)])
    assert "not committed" in capsys.readouterr().err
