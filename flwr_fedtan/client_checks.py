"""What :class:`~flwr_fedtan.FedTANClient` refuses at construction, before any round:
its settings (all problems in one :class:`~flwr_fedtan.errors.InvalidArgumentsError`)
and its training data (empty, NaN or infinite values, the wrong shape for the model).

The shape check costs no forward pass: the model runs on the ``meta`` device (shapes
only, no arithmetic, the real weights untouched). Only when that fails is one real
forward of two samples run, in evaluation mode without gradients, to tell a model that
does not fit its data from one that merely cannot run on ``meta``.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .arguments import ArgumentChecks
from .devices import device_problem
from .errors import ClientDataError

__all__ = ["check_client_arguments", "check_training_data"]


def check_client_arguments(
    *,
    loss_fn: Any,
    batch_size: Any,
    lr: Any,
    momentum: Any,
    weight_decay: Any,
    local_steps: Any,
    device: Any,
    eval_batch_size: Any,
    optimizer_fn: Any,
    unpack_batch: Any,
) -> None:
    """Raise :class:`~flwr_fedtan.errors.InvalidArgumentsError` listing every invalid
    argument of :class:`~flwr_fedtan.FedTANClient` (see its documentation)."""
    checks = ArgumentChecks("FedTANClient")
    for name, function in (("loss_fn", loss_fn), ("optimizer_fn", optimizer_fn), ("unpack_batch", unpack_batch)):
        if function is not None and not callable(function):
            checks.add(name, function, "must be a function", f"pass a callable (or None for the default) as {name}")
    if batch_size is not None:
        checks.integer("batch_size", batch_size, 1, fix="give the samples per step, a whole number >= 1")
    if optimizer_fn is None:  # lr, momentum and weight_decay build the SGD optimiser
        checks.number("lr", lr, above=0, fix="give SGD's learning rate, > 0 (e.g. 0.01)")
        checks.number("momentum", momentum, at_least=0, below=1, fix="give SGD's momentum in [0, 1) (0: none)")
        checks.number("weight_decay", weight_decay, at_least=0, fix="give a weight decay >= 0 (0: none)")
    checks.integer("local_steps", local_steps, 1, fix="give the optimiser steps per round, a whole number >= 1")
    checks.integer("eval_batch_size", eval_batch_size, 1, fix="give the batch size of evaluate, >= 1")
    problem = device_problem(device)
    if problem is not None:
        checks.add("device", str(device), *problem)
    checks.raise_if_any()


def check_training_data(
    model: nn.Module,
    dataset: Any,
    sample_pairs: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[..., Any],
    batch_size: int,
) -> None:
    """Refuse training data that holds NaN/inf or does not fit ``model`` and ``loss_fn``.

    ``sample_pairs(indices)`` returns the collated ``(inputs, targets)`` of those samples on
    the model's device. A ``TensorDataset`` is scanned whole for non-finite values, any
    other dataset on its first ``batch_size`` samples.

    Raises
    ------
    ClientDataError
        Naming the sample or the shapes, and the fix.
    """
    size = len(dataset)
    if isinstance(dataset, TensorDataset):
        for position, tensor in enumerate(dataset.tensors):
            bad = _first_non_finite(tensor)
            if bad is not None:
                what = "inputs" if position == 0 else "targets" if position == 1 else f"tensor {position}"
                raise ClientDataError(
                    f"FedTANClient: train_data holds NaN or infinite {what} (first in sample {bad}). Fix: clean "
                    "or drop those samples (e.g. keep only rows where torch.isfinite(x).all()) before training"
                )
    else:
        inputs, targets = sample_pairs(list(range(min(batch_size, size))))
        for what, tensor in (("inputs", inputs), ("targets", targets)):
            bad = _first_non_finite(tensor)
            if bad is not None:
                raise ClientDataError(
                    f"FedTANClient: train_data holds NaN or infinite {what} (first in sample {bad}). Fix: clean "
                    "or drop those samples before training"
                )
    inputs, targets = sample_pairs(list(range(min(2, size))))
    failure = _fit_failure(model, inputs, targets, loss_fn)
    if failure is not None:
        raise ClientDataError(
            f"FedTANClient: the model cannot train on this client's data: inputs of shape "
            f"{tuple(inputs.shape[1:])} per sample ({inputs.dtype}), targets {tuple(targets.shape[1:])} "
            f"({targets.dtype}) fail with {failure}. Fix: give the model data of the shape it was built "
            "for (or build the model for this data: input channels, image size, number of classes)"
        )


def _first_non_finite(tensor: torch.Tensor) -> Optional[int]:
    if not isinstance(tensor, torch.Tensor) or not (tensor.is_floating_point() or tensor.is_complex()):
        return None
    if tensor.dim() == 0:
        return None if bool(torch.isfinite(tensor)) else 0
    bad = ~torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


def _fit_failure(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                 loss_fn: Callable[..., Any]) -> Optional[str]:
    """``None`` when model and loss run on these samples, else the error, as text."""
    if _runs_on_meta(model, inputs, targets, loss_fn):
        return None
    modes = [module.training for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            loss_fn(model(inputs), targets)
    except Exception as error:  # noqa: BLE001 - any failure here is the data not fitting
        return f"{type(error).__name__}: {error}"
    finally:
        for module, training in zip(model.modules(), modes):
            module.training = training
    return None


def _runs_on_meta(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: Callable[..., Any]) -> bool:
    """Whether model and loss run on meta copies of the samples (shapes only; the real
    parameters and buffers are swapped out for meta ones during the call)."""
    try:
        state = {name: torch.empty_like(value, device="meta") for name, value in itertools.chain(
            model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))}
        with torch.no_grad():
            outputs = torch.func.functional_call(model, state, (inputs.to("meta"),))
            loss_fn(outputs, targets.to("meta"))
    except Exception:  # noqa: BLE001 - decided by the real forward
        return False
    return True
