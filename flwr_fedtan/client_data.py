"""What a :class:`~flwr_fedtan.FedTANClient` does with data: the dataset, batch size and
collate function of what it is given (a ``Dataset`` or ``DataLoader``), the
``(inputs, targets)`` of a collated batch, and evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from .errors import ClientDataError
from .losses import loss_reduction, reduce_loss

__all__ = ["LossFn", "UnpackBatch", "as_dataset", "collate_fn_of", "evaluate_model", "training_data", "unpack"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
UnpackBatch = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]


def unpack(batch: Any, unpack_batch: Optional[UnpackBatch]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(inputs, targets)`` of a collated batch: ``unpack_batch(batch)``, or the batch
    itself if it is a pair of tensors."""
    if unpack_batch is not None:
        inputs, targets = unpack_batch(batch)
    elif isinstance(batch, Mapping):
        raise TypeError(
            f"FedTANClient: the training data yields dictionaries (keys {sorted(batch)}), not "
            "(inputs, targets) pairs: pass unpack_batch=lambda batch: (batch[<inputs key>], "
            "batch[<targets key>])"
        )
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
    else:
        raise TypeError(
            f"FedTANClient: a batch must be an (inputs, targets) pair, got {type(batch).__name__}"
            f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}: pass "
            "unpack_batch=<function returning (inputs, targets) from a batch>"
        )
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(
            f"FedTANClient: inputs and targets must be tensors, got {type(inputs).__name__} and "
            f"{type(targets).__name__}"
        )
    return inputs, targets


def evaluate_model(
    model: nn.Module,
    data: Dataset,
    loss_fn: LossFn,
    device: torch.device,
    batch_size: int = 512,
    *,
    collate_fn: Optional[Callable[[list], Any]] = None,
    unpack_batch: Optional[UnpackBatch] = None,
) -> tuple[float, float, int]:
    """Mean loss per sample, accuracy and sample count of ``model`` in eval mode on ``data``
    (batches collated with ``collate_fn`` and split by ``unpack_batch``; defaults: pairs)."""
    model.eval()
    reduction = loss_reduction(loss_fn)
    total_loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for batch in DataLoader(data, batch_size=batch_size, collate_fn=collate_fn):
            inputs, targets = unpack_batch(batch) if unpack_batch is not None else batch
            inputs, targets = inputs.to(device), targets.to(device)
            outputs = model(inputs)
            batch_loss = float(reduce_loss(loss_fn(outputs, targets), len(targets), reduction))
            total_loss += batch_loss * len(targets) if reduction == "mean" else batch_loss
            correct += int((outputs.argmax(dim=1) == targets).sum())
            count += len(targets)
    return total_loss / max(count, 1), correct / max(count, 1), count


def as_dataset(data: Union[Dataset, DataLoader], name: str) -> Dataset:
    if isinstance(data, DataLoader):
        return as_dataset(data.dataset, f"the dataset of {name}'s DataLoader")
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        raise TypeError(
            f"FedTANClient: {name} is a {type(data).__name__} of tensors; wrap them in "
            "torch.utils.data.TensorDataset(inputs, targets)"
        )
    if isinstance(data, IterableDataset) or not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise TypeError(
            f"FedTANClient: {name} must be a map-style Dataset (with __getitem__ and __len__) or a "
            f"DataLoader over one, got {type(data).__name__}: FedTAN draws each step's batch by index "
            "from a seed, so that a step can be rebuilt in another process"
        )
    return data


def training_data(
    data: Union[Dataset, DataLoader], batch_size: Optional[int]
) -> tuple[Dataset, int, Callable[[list], Any]]:
    """The dataset, batch size and collate function of ``train_data`` (see FedTANClient)."""
    dataset = as_dataset(data, "train_data")
    collate_fn = collate_fn_of(data)
    loader_batch = data.batch_size if isinstance(data, DataLoader) else None
    if batch_size is None and loader_batch is None:
        what = "a DataLoader without a batch_size" if isinstance(data, DataLoader) else (
            f"a {type(data).__name__}, which carries no batch size")
        raise ValueError(
            f"FedTANClient: train_data is {what}: pass batch_size=<samples per step>, or a "
            "DataLoader(dataset, batch_size=...)"
        )
    if batch_size is not None and loader_batch is not None and int(batch_size) != int(loader_batch):
        raise ValueError(
            f"FedTANClient: batch_size={batch_size} but the DataLoader has batch_size={loader_batch}: "
            "pass one of them"
        )
    size = batch_size if batch_size is not None else loader_batch
    if isinstance(size, bool) or int(size) != size or int(size) <= 0:  # type: ignore[arg-type]
        raise ValueError(f"FedTANClient: batch_size must be a positive integer, got {size!r}")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ClientDataError(
            "FedTANClient: train_data is empty. Fix: give this client at least one training example "
            "(or leave it out of the federation)"
        )
    return dataset, int(size), collate_fn


def collate_fn_of(data: Union[Dataset, DataLoader]) -> Callable[[list], Any]:
    """A batching DataLoader's ``collate_fn``, else torch's ``default_collate``."""
    if isinstance(data, DataLoader) and data.batch_sampler is not None:
        return data.collate_fn
    return default_collate
