"""How many examples per client the statistics pass needs: test accuracy of final models
with their BatchNorm statistics from the pass at several ``statistics_examples``.

For every final model given (``.pt`` with its run's ``.json`` beside it, as
:mod:`simulations.experiments.compare` writes them), the pass runs in one process
(:func:`flwr_fedtan.reference.pooled_statistics`: the same pass and aggregation code as a
Flower run) over ``n`` training examples drawn from each client's partition, for every
``n`` asked, and the model is evaluated on the test set. ``stored`` is the model with the
running statistics its run aggregated. Seconds are the pass's compute in this process
(all clients, one after the other). Example::

    python -m simulations.experiments.statistics_probe results/probe/runs/pathological/*.pt --examples 32,128,512,all
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from flwr_fedtan.client import evaluate_model
from flwr_fedtan.reference import pooled_statistics

from ..app.task import client_dataset, model_from_config, test_dataset


def probe(model_path: Path, examples: Sequence[Optional[int]], draw_seed: int = 0) -> list[dict]:
    """Rows ``{n, accuracy, seconds}`` for one final model; ``n`` ``None`` is all data."""
    config = json.loads(model_path.with_suffix(".json").read_text())["config"]
    model = model_from_config(config, norm="bn")
    model.load_state_dict(torch.load(model_path, map_location="cpu"), strict=True)
    test = test_dataset(config)
    clients = int(config["num-partitions"])
    data = [client_dataset(config, p, clients).tensors[0] for p in range(clients)]
    rows = [{"n": "stored", "accuracy": evaluate_model(model, test, nn.functional.cross_entropy,
                                                         torch.device("cpu"))[1], "seconds": 0.0}]
    for n in examples:
        generator = torch.Generator().manual_seed(draw_seed)
        inputs = [x if n is None or n >= len(x) else x[torch.randperm(len(x), generator=generator)[:n]] for x in data]
        models = [copy.deepcopy(model) for _ in inputs]
        started = time.perf_counter()
        with torch.no_grad():
            pooled_statistics(models, inputs)
        seconds = time.perf_counter() - started
        accuracy = evaluate_model(models[0], test, nn.functional.cross_entropy, torch.device("cpu"))[1]
        rows.append({"n": "all" if n is None else n, "accuracy": accuracy, "seconds": seconds,
                     "pooled": sum(len(x) for x in inputs)})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.experiments.statistics_probe",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="final models (.pt) with their run summaries (.json) beside them")
    parser.add_argument("--examples", default="16,32,64,128,256,512,1024,all",
                        help="comma-separated examples per client ('all': every example)")
    parser.add_argument("--draw-seed", type=int, default=0)
    args = parser.parse_args(argv)
    examples = [None if e == "all" else int(e) for e in args.examples.split(",")]
    print("| model | examples per client | pooled | test accuracy | pass compute (s) |")
    print("|---|---:|---:|---:|---:|")
    for path in map(Path, args.models):
        for row in probe(path, examples, args.draw_seed):
            print(f"| {path.stem} | {row['n']} | {row.get('pooled', '-')} | {row['accuracy']:.4f} | "
                  f"{row['seconds']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
