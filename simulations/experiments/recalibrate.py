"""Test accuracy of a grid's final models with their BatchNorm statistics recomputed.

A federated model is evaluated with the running statistics its strategy aggregated. With
local steps those are not the statistics of the global model on the training data: each
client's running averages follow its own model and, in steps with local BatchNorm, its
own classes. This tool separates the two causes of a low test accuracy. For every final
model of a :mod:`simulations.experiments.compare` grid (``runs/[<variant>/]<partition>/<method>-seed<k>.pt``,
the run config in the ``.json`` beside it), it evaluates the model on the test set twice:

- ``stored``: with its own running statistics, as the grid's tables report it;
- ``exact``: with every BatchNorm layer's statistics replaced by the exact mean and
  (biased) variance of its input over the pooled training data, layer by layer, with the
  earlier layers already normalising by theirs (precise-BN). The weights are untouched.

Models without BatchNorm (``fedgn``) and methods whose reported accuracy is not the
global model's (``fedbn``, ``silobn``: personalised) are left out. The tables go to
``recalibrated.csv`` and ``recalibrated.md`` in the grid folder. Example::

    python -m simulations.experiments.recalibrate docs/results/resnet20-3seeds
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from flwr_fedtan.client import evaluate_model

from .compare import _mean_std, _pm
from ..app.task import model_from_config, pooled_dataset, test_dataset

DEFAULT_STRIDE = 6
"""Every ``DEFAULT_STRIDE``-th pooled training example enters the exact statistics
(10,000 of Fashion-MNIST's 60,000)."""


@torch.no_grad()
def set_exact_statistics(model: nn.Module, inputs: torch.Tensor) -> None:
    """Set every BatchNorm layer's running mean and (biased) variance to those of its input
    over ``inputs``, each layer's input computed with the earlier layers normalising by
    their exact statistics; leave ``model`` in evaluation mode.

    One forward pass of all of ``inputs`` as a single batch, BatchNorm layers alone in
    training mode: there each layer normalises with its batch's own moments, which are
    the exact ones. Memory grows with ``len(inputs)`` (a ResNet-20 pass over 10,000
    28x28 images peaks near 2 GB). A BatchNorm module called more than once per forward
    gets the mean of its calls' moments."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    counts: dict[nn.Module, int] = {}
    hooks = [layer.register_forward_pre_hook(
        lambda module, args: counts.__setitem__(module, args[0].numel() // args[0].shape[1])) for layer in layers]
    momenta = [layer.momentum for layer in layers]
    model.eval()
    try:
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None  # a cumulative average: after one batch, that batch's moments
            layer.train()
        model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.eval()
    for layer in layers:
        count = counts[layer]
        layer.running_var.mul_((count - 1) / count)  # PyTorch stores the unbiased variance


def recalibrated_accuracy(model_path: Path, stride: int = DEFAULT_STRIDE) -> Optional[dict[str, Any]]:
    """``stored`` and ``exact`` test accuracy of one run's final model, or ``None`` when
    the run is left out (see the module docstring). A model whose weights are not finite
    (a diverged run) gets NaN for both."""
    summary = json.loads(model_path.with_suffix(".json").read_text())
    config = summary["config"]
    if summary.get("norm", "bn") != "bn" or summary.get("evaluation", "server") != "server":
        return None
    model = model_from_config(config, norm="bn")
    model.load_state_dict(torch.load(model_path, map_location="cpu"), strict=True)
    label = model_path.stem.rsplit("-seed", 1)[0]
    if model_path.parent.parent.name != "runs":  # runs/<variant>/<partition>/: a --variant's run
        label = f"{label} [{model_path.parent.parent.name}]"
    row: dict[str, Any] = {"label": label, "partition": model_path.parent.name, "seed": int(config.get("seed", 0))}
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        return {**row, "stored": float("nan"), "exact": float("nan")}
    device = torch.device(str(config.get("device", "cpu")))
    if device.type == "cuda" and not torch.cuda.is_available():
        device = torch.device("cpu")
    model.to(device)
    test = test_dataset(config)
    loss_fn = nn.functional.cross_entropy
    row["stored"] = evaluate_model(model, test, loss_fn, device)[1]
    inputs = pooled_dataset(config, int(config["num-partitions"])).tensors[0][::stride]
    set_exact_statistics(model, inputs.to(device))
    row["exact"] = evaluate_model(model, test, loss_fn, device)[1]
    return row


def write_tables(rows: Sequence[dict[str, Any]], folder: Path, stride: int) -> str:
    """Write ``recalibrated.csv`` (one row per run) and ``recalibrated.md`` (mean ± sample
    std over seeds per method and partition) to ``folder``; return the Markdown."""
    with open(folder / "recalibrated.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["label", "partition", "seed", "stored", "exact"])
        writer.writeheader()
        writer.writerows(rows)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["label"], row["partition"]), []).append(row)
    lines = ["| method | partition | seeds | final test acc, stored statistics | final test acc, exact statistics |",
             "|---|---|---:|---:|---:|"]
    for (label, partition), group in groups.items():
        lines.append(f"| {label} | {partition} | {len(group)} | {_pm(*_mean_std([r['stored'] for r in group]))} | "
                     f"{_pm(*_mean_std([r['exact'] for r in group]))} |")
    text = ("\n".join(lines) + "\n\nFinal models of the grid. Stored: the model's own running statistics (what "
            "the grid's tables report). Exact: every BatchNorm layer's statistics recomputed on every "
            f"{stride}th pooled training example, layer by layer (precise-BN); weights unchanged. "
            "Mean ± sample std over seeds.\n")
    (folder / "recalibrated.md").write_text(text)
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Evaluate every final model of a grid folder (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m simulations.experiments.recalibrate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("folder",
                        help="a simulations.experiments.compare output folder (its runs/ hold the .pt models)")
    parser.add_argument("--stride", type=int, default=DEFAULT_STRIDE,
                        help=f"use every STRIDE-th pooled training example (default {DEFAULT_STRIDE})")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    models = sorted((folder / "runs").glob("*/*.pt")) + sorted((folder / "runs").glob("*/*/*.pt"))
    if not models:
        parser.error(f"no final models (runs/[<variant>/]<partition>/*.pt) under {folder}: they are written by "
                     "simulations.experiments.compare and not committed; re-run the grid to get them")
    rows = []
    for path in models:
        row = recalibrated_accuracy(path, args.stride)
        if row is not None:
            rows.append(row)
            print(f"{path.relative_to(folder)}: stored {row['stored']:.4f}  exact {row['exact']:.4f}", flush=True)
    print(write_tables(rows, folder, args.stride))
    return 0


if __name__ == "__main__":
    sys.exit(main())
