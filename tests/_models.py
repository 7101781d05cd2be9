"""Small test models and helpers for the core tests (independent of simulations/app/models.py).

Models: CIFAR-style ResNet-20 (19 BatchNorm layers, option-A parameter-free shortcuts), a
VGG-style CNN with BatchNorm and dropout, an MLP with BatchNorm1d (also on the raw input),
a network calling one BatchNorm module twice, BatchNorm feeding BatchNorm, a network with
tied weights across a skip (the staged backward's fallback), and one without BatchNorm.

Helpers: non-IID batches of unequal sizes, a centralised reference step on the
concatenated batch, a lockstep driver that records every request and aggregate.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from flwr_fedtan import SyncStep
from flwr_fedtan.reference import aggregate_requests


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread for these tiny workloads: on a shared 2-core machine, OpenMP
    threads spinning against other processes made a 1 s test take 30 s. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- models
# Activations. float64 tests use ReLU. float32 tests use SiLU: a ReLU whose input lies
# within float32 rounding of 0 flips its mask between two float32 computations of the same
# value (observed: one element of 33k in ResNet-20 changed the lower layers' gradients by
# 5e-3 relative), which has nothing to do with FedTAN; SiLU is smooth, so rounding stays
# rounding.
ACTS = {"relu": (F.relu, nn.ReLU), "silu": (F.silu, nn.SiLU)}


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: str = "relu") -> None:
        super().__init__()
        self.act = ACTS[act][0]
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.pad:  # option A: subsample and zero-pad channels, no parameters
            short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return self.act(out + short)


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016): 3 stages x 3 basic blocks, 19 BatchNorm layers."""

    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, width: int = 16, act: str = "relu"
    ) -> None:
        super().__init__()
        self.act = ACTS[act][0]
        self.conv = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(3):
                blocks.append(_Block(cin, cout, 2 if (stage > 0 and i == 0) else 1, act))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(x)))
        x = self.blocks(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class VGG(nn.Module):
    """VGG-style CNN: conv(bias)-BN-ReLU(inplace) blocks, BN1d head with dropout."""

    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, p: float = 0.5, act: str = "relu"
    ) -> None:
        super().__init__()
        A = ACTS[act][1]
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), A(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), A(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), A(inplace=True),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(p), nn.Linear(64, 32), nn.BatchNorm1d(32),
            A(inplace=True), nn.Dropout(p), nn.Linear(32, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """BatchNorm1d on the raw input (input needs no grad) and after each hidden layer."""

    def __init__(
        self, features: int = 12, hidden: int = 16, num_classes: int = 5, act: str = "relu"
    ) -> None:
        super().__init__()
        A = ACTS[act][1]
        self.net = nn.Sequential(
            nn.BatchNorm1d(features),
            nn.Linear(features, hidden), nn.BatchNorm1d(hidden), A(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), A(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TwiceBN(nn.Module):
    """One BatchNorm module called twice (2 BN calls), the second time on a BN output path."""

    def __init__(
        self, features: int = 12, hidden: int = 10, num_classes: int = 5, act: str = "relu"
    ) -> None:
        super().__init__()
        self.act = ACTS[act][0]
        self.lin1 = nn.Linear(features, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.lin2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.lin1(x)))
        h = torch.tanh(self.bn(self.lin2(h))) + h  # skip past the second call
        return self.out(h)


class ChainedBN(nn.Module):
    """A BatchNorm whose input is another BatchNorm's output (a backward stage starting
    at a graph cut); the first output also takes a skip path past the second."""

    def __init__(
        self, features: int = 12, hidden: int = 10, num_classes: int = 5, act: str = "relu"
    ) -> None:
        super().__init__()
        self.act = ACTS[act][0]
        self.lin = nn.Linear(features, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.bn2 = nn.BatchNorm1d(hidden, affine=False)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.lin(x))
        return self.out(self.act(self.bn2(h)) + h)


class TiedWeights(nn.Module):
    """The input layer's weight reused by the output layer, across a skip past the
    BatchNorm: the staged backward cannot keep its stages apart (the loss stage would run
    the BatchNorm stage's nodes to reach the shared weight) and falls back to one backward
    per root."""

    def __init__(self, features: int = 8, act: str = "relu") -> None:
        super().__init__()
        self.act = ACTS[act][0]
        self.inp = nn.Linear(features, features)
        self.mid = nn.Linear(features, features)
        self.bn = nn.BatchNorm1d(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        z = self.act(self.bn(self.mid(h))) + h
        return F.linear(z, self.inp.weight)


class NoBN(nn.Module):
    def __init__(
        self, features: int = 12, hidden: int = 16, num_classes: int = 5, act: str = "relu"
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden), ACTS[act][1](), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# name -> (constructor, input shape without batch, number of classes, BN calls per step)
MODELS: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...], int, int]] = {
    "resnet20": (lambda act: ResNet20(3, 10, act=act), (3, 8, 8), 10, 19),
    "vgg": (lambda act: VGG(3, 10, act=act), (3, 8, 8), 10, 4),
    "mlp": (lambda act: MLP(12, 16, 5, act=act), (12,), 5, 3),
    "twice-bn": (lambda act: TwiceBN(12, 10, 5, act=act), (12,), 5, 2),
    "chained-bn": (lambda act: ChainedBN(12, 10, 5, act=act), (12,), 5, 2),
    "tied-weights": (lambda act: TiedWeights(8, act=act), (8,), 8, 1),
    "nobn": (lambda act: NoBN(12, 16, 5, act=act), (12,), 5, 0),
}


def build(
    name: str, dtype: torch.dtype = torch.float64, seed: int = 0, act: str | None = None
) -> nn.Module:
    """A model with non-trivial BatchNorm affine parameters and running statistics.

    ``act`` defaults to ReLU in float64 and SiLU in float32 (see ``ACTS``)."""
    if act is None:
        act = "relu" if dtype == torch.float64 else "silu"
    ctor = MODELS[name][0]
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)
    model = ctor(act)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
            if isinstance(m, _BatchNorm) and m.track_running_stats:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(3)
    torch.set_rng_state(gen_state)
    return model.to(dtype).train()


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout in eval mode: masks can't match between K clients and one pooled batch."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    return model


def make_batches(
    name: str, sizes: Sequence[int], dtype: torch.dtype = torch.float64, seed: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Non-IID client batches: client k's inputs are shifted and scaled differently and it
    sees only two classes."""
    _, shape, classes, _ = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    batches = []
    for k, n in enumerate(sizes):
        x = torch.randn((n, *shape), generator=g, dtype=torch.float64)
        x = x * (0.5 + 0.4 * k) + (k - len(sizes) / 2) * 0.7
        y = torch.randint(0, 2, (n,), generator=g) + (2 * k) % (classes - 1)
        batches.append((x.to(dtype), y))
    return batches


def concat(batches: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def bn_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def centralised_step(model: nn.Module, batches, loss_fn=F.cross_entropy, record_inputs=False):
    """Forward + backward of the (unconverted) model on the concatenated batch.

    Returns (loss, [BN input of every BN call in execution order] if record_inputs)."""
    inputs: list[torch.Tensor] = []
    handles = []
    if record_inputs:
        for _, m in bn_modules(model):
            handles.append(m.register_forward_pre_hook(lambda mod, a: inputs.append(a[0].detach().clone())))
    x, y = concat(batches)
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    for h in handles:
        h.remove()
    return float(loss.detach()), inputs


def grad_vector(models: Sequence[nn.Module]) -> torch.Tensor:
    """Sum over models of every parameter's .grad (None counts as 0), flattened, float64."""
    parts = []
    for params in zip(*[list(m.parameters()) for m in models]):
        total = torch.zeros(params[0].numel(), dtype=torch.float64)
        for p in params:
            if p.grad is not None:
                total += p.grad.detach().to(torch.float64).flatten()
        parts.append(total)
    return torch.cat(parts)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-relative error ||a - b|| / ||b||."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_buffers()}


class Recorder:
    """Lockstep driver over K steps recording each client's requests and the aggregates."""

    def __init__(self, steps: Sequence[SyncStep]) -> None:
        self.steps = steps
        self.requests: list[dict[int, tuple]] = []  # per exchange: client -> (point, payload copy)
        self.points = []
        self.aggregates = []

    def run(self) -> int:
        try:
            reqs = {k: s.start() for k, s in enumerate(self.steps)}
            while all(r is not None for r in reqs.values()):
                self.requests.append({k: (r[0], copy.deepcopy(r[1])) for k, r in reqs.items()})
                point, agg = aggregate_requests(reqs)
                self.points.append(point)
                self.aggregates.append(agg)
                reqs = {k: self.steps[k].resume(agg) for k in reqs}
            assert all(r is None for r in reqs.values())
            return len(self.aggregates)
        finally:
            for s in self.steps:
                s.close()


def make_steps(models, batches, loss_fn=F.cross_entropy, seeds=None, total=True):
    sizes = [int(x.shape[0]) for x, _ in batches]
    steps = []
    for k, (m, (x, y)) in enumerate(zip(models, batches)):
        m.zero_grad(set_to_none=True)
        steps.append(
            SyncStep(
                m,
                (lambda m=m, x=x, y=y: loss_fn(m(x), y)),
                num_examples=sizes[k],
                total_examples=sum(sizes) if total else None,
                seed=None if seeds is None else seeds[k],
            )
        )
    return steps


def payload_arrays(payload) -> dict[str, np.ndarray]:
    return {k: v for k, v in vars(payload).items() if isinstance(v, np.ndarray)}
