"""The model, and each partition's data and device with its fault."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

FEATURES = 4
CLASSES = 3
SAMPLES = 16


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, CLASSES))


def fault_of(faults: str, partition: int) -> str:
    listed = [fault.strip() for fault in faults.split(",")] if faults else []
    return listed[partition] if partition < len(listed) else ""


def partition_data(partition: int, fault: str) -> TensorDataset:
    generator = torch.Generator().manual_seed(100 + partition)
    width = FEATURES + 1 if fault == "shape" else FEATURES
    inputs = torch.randn(SAMPLES, width, generator=generator)
    if fault == "nan":
        inputs[3, 1] = float("nan")
    targets = torch.arange(SAMPLES) % CLASSES
    if fault == "empty":
        return TensorDataset(inputs[:0], targets[:0])
    return TensorDataset(inputs, targets)


def partition_device(fault: str) -> str:
    return "cuda" if fault == "device" else "cpu"
