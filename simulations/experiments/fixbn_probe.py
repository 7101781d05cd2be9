"""What happens to FixBN's clients in the first round with frozen BatchNorm statistics.

FixBN (:class:`simulations.app.baselines.FixBN`) trains like FedAvg up to its switch round,
then every client trains with its BatchNorm layers normalising by the frozen global
running statistics. This probe replays that first frozen round on every client, from the
global model at the switch, step by step, with the very batches the app draws, and prints
per step: the loss, the largest absolute logit, the gradient norm, and per BatchNorm layer
the largest ratio of the batch's own variance to the frozen one. Side by side:

- ``frozen``: what FixBN does (BatchNorm in evaluation mode, frozen statistics);
- ``exact``: the same, with the statistics replaced by the exact ones of the global model
  on the pooled training data (layer by layer, as precise-BN computes them): rules the
  averaging of the statistics in or out as the cause;
- ``train``: BatchNorm with batch statistics, as FedAvg would go on.

The global model at the switch is the final model of a FixBN run whose switch never comes
(``fixbn-switch`` 1.0) with as many rounds as the switch round: the same batches, the same
model. Example (the README's FixBN setting, switch after round 15)::

    python -m simulations.experiments.compare --methods fixbn --partitions pathological --seeds 0 \\
        --rounds 15 --fixbn-switch 1.0 --lr 0.05 --out results/fixbn-probe
    python -m simulations.experiments.fixbn_probe results/fixbn-probe/runs/pathological/fixbn-seed0.pt \\
        --switch-round 15 --lr 0.05,0.02,0.01
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from flwr_fedtan.training import derive_seed

from ..app.baselines import make_method_client, round_seed
from ..app.task import pooled_dataset
from .recalibrate import set_exact_statistics

MODES = ("frozen", "exact", "train")


def _batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, _BatchNorm)]


def replay_round(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], switch_round: int,
                 mode: str, lr: float, num_partitions: int, exact_inputs: Optional[torch.Tensor] = None
                 ) -> list[dict]:
    """Round ``switch_round + 1`` of every client from the global model ``state``.

    Parameters
    ----------
    config : Mapping
        The run config of the FixBN run (data, model, partitions, ``local-steps``, ``seed``).
    state : Mapping
        The global model's ``state_dict`` at the end of ``switch_round``.
    switch_round : int
        The last FedAvg round.
    mode : str
        One of :data:`MODES`.
    lr : float
        Learning rate of the replayed round.
    num_partitions : int
        Clients (partition ids ``0..num_partitions-1``).
    exact_inputs : torch.Tensor, optional
        Training inputs for ``mode="exact"`` (default: every 6th pooled training sample).

    Returns
    -------
    list of dict
        Per client: ``partition``, ``classes`` and ``steps`` (per step ``loss``,
        ``max_abs_logit``, ``grad_norm``, ``var_ratio``: per BatchNorm layer the largest
        batch variance / running variance over channels).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    if mode == "exact" and exact_inputs is None:
        exact_inputs = pooled_dataset(config, num_partitions).tensors[0][::6]
    clients = []
    for partition in range(num_partitions):
        client = make_method_client(config, {"partition-id": partition, "num-partitions": num_partitions})
        model = client.model
        model.load_state_dict(dict(state), strict=True)
        if mode == "exact":
            set_exact_statistics(model, exact_inputs.to(client.device))
        layers = _batchnorm_layers(model)
        model.train()
        if mode != "train":
            for _, layer in layers:
                layer.eval()
        seen: dict[str, torch.Tensor] = {}
        hooks = [layer.register_forward_pre_hook(lambda module, args, name=name: seen.__setitem__(name, args[0]))
                 for name, layer in layers]
        optimizer = client.make_optimizer([p for p in model.parameters() if p.requires_grad], lr)
        seed = round_seed(int(config.get("seed", 0)), switch_round + 1, partition)
        steps = []
        try:
            for step in range(int(config["local-steps"])):
                inputs, targets = client.sample_batch(derive_seed(seed, step))
                optimizer.zero_grad(set_to_none=True)
                logits = model(inputs)
                loss = client.loss_fn(logits, targets)
                ratios = []
                for name, layer in layers:
                    values = seen[name].detach()
                    batch_var = values.var([0] + list(range(2, values.dim())), unbiased=False)
                    ratios.append(float((batch_var / layer.running_var).max()))
                loss.backward()
                grad = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
                optimizer.step()
                steps.append({"loss": float(loss.detach()), "max_abs_logit": float(logits.detach().abs().max()),
                              "grad_norm": float(grad), "var_ratio": ratios})
        finally:
            for hook in hooks:
                hook.remove()
        classes = sorted(set(int(c) for c in client.train_data.tensors[1].tolist()))
        clients.append({"partition": partition, "classes": classes, "steps": steps})
    return clients


def statistics_summary(state: Mapping[str, torch.Tensor]) -> list[str]:
    """One line per BatchNorm layer: min / median / max of its running variance."""
    lines = []
    for key, value in state.items():
        if key.endswith("running_var"):
            v = value.double()
            lines.append(f"{key[:-len('.running_var')]}: running_var min {v.min():.3g} "
                         f"median {v.median():.3g} max {v.max():.3g}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the replay of every mode and learning rate (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m simulations.experiments.fixbn_probe",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the .pt of a FixBN run with fixbn-switch 1.0 (its .json next to it)")
    parser.add_argument("--switch-round", type=int, default=None, help="default: the run's num-server-rounds")
    parser.add_argument("--lr", default=None, help="comma-separated learning rates (default: the run's)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    args = parser.parse_args(argv)
    model_path = Path(args.model)
    config = json.loads(model_path.with_suffix(".json").read_text())["config"]
    state = torch.load(model_path, map_location="cpu")
    switch_round = args.switch_round if args.switch_round is not None else int(config["num-server-rounds"])
    rates = [float(x) for x in args.lr.split(",")] if args.lr else [float(config["lr"])]
    num_partitions = int(config["num-partitions"])
    print(f"global model after round {switch_round}; frozen statistics:")
    print("\n".join("  " + line for line in statistics_summary(state)))
    for lr in rates:
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            print(f"\nround {switch_round + 1}, {mode}, lr {lr}")
            for client in replay_round(config, state, switch_round, mode, lr, num_partitions):
                print(f"  client {client['partition']} (classes {client['classes']})")
                for index, step in enumerate(client["steps"]):
                    ratio = "/".join(f"{r:.2g}" for r in step["var_ratio"])
                    print(f"    step {index}: loss {step['loss']:.3g}  max |logit| {step['max_abs_logit']:.3g}  "
                          f"grad norm {step['grad_norm']:.3g}  max batch/frozen var per BN layer {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
