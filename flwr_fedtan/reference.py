"""In-process FedTAN: K clients in one process, driven through the real step and aggregation.

This is the reference the Flower integration is tested against, and the compute floor
for benchmarks: no messages, no serialisation, just the synchronised step.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Mapping, Optional, Protocol, Sequence, cast

import numpy as np

import torch
from torch import nn

from .aggregation import (
    BackwardSums, ForwardStats, SyncPoint, aggregate_arrays, exact_running_statistics, pool_forward_stats,
    sum_backward_sums,
)
from .errors import StepProtocolError
from .losses import loss_reduction, reduce_loss
from .seeds import derive_seed
from .statistics_pass import StatisticsPass
from .step import SyncStep
from .resumable import Aggregate, SyncRequest

__all__ = [
    "InProcessClient", "pooled_backward", "pooled_statistics", "aggregate_requests", "drive_steps",
    "fedtan_round_in_process",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class InProcessClient(Protocol):
    """What :func:`fedtan_round_in_process` reads of a client (a
    :class:`~flwr_fedtan.FedTANClient` has all of it): the reference runs its own step and
    SGD, and takes from the client only its model, loss, optimiser settings and data."""

    model: nn.Module
    loss_fn: LossFn
    optimizer_fn: Optional[Callable[..., Any]]
    momentum: float
    weight_decay: float

    def sample_batch(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def aggregate_requests(requests: Mapping[Hashable, SyncRequest]) -> tuple[SyncPoint, Aggregate]:
    """Aggregate one sync point's payloads from all clients.

    All clients must be at the same sync point (index, phase, BatchNorm call, width);
    otherwise :class:`~flwr_fedtan.errors.StepProtocolError` names the client that is not.
    Payload errors raise :class:`~flwr_fedtan.errors.PayloadError`.
    """
    items = iter(requests.items())
    first_client, (point, _) = next(items)
    for client, (other, _) in items:
        if other != point:
            raise StepProtocolError(
                f"client {client} is at sync point {other}, client {first_client} at {point}: "
                "clients must run the same model"
            )
    payloads = {client: payload for client, (_, payload) in requests.items()}
    if point.phase == "forward":
        return point, pool_forward_stats(cast(Mapping[Hashable, ForwardStats], payloads), channels=point.channels)
    return point, sum_backward_sums(cast(Mapping[Hashable, BackwardSums], payloads), channels=point.channels)


def drive_steps(steps: Sequence[SyncStep | StatisticsPass]) -> int:
    """Run K fresh steps in lockstep until all complete; return the exchanges used.

    On any error every step is closed (no paused forward is left holding its graph) and the error
    propagates.
    """
    try:
        return _drive(steps)
    finally:
        for step in steps:
            step.close()


def _drive(steps: Sequence[SyncStep | StatisticsPass]) -> int:
    requests = {k: step.start() for k, step in enumerate(steps)}
    exchanges = 0
    while True:
        finished = [k for k, r in requests.items() if r is None]
        if finished:
            if len(finished) != len(requests):
                raise StepProtocolError(
                    f"clients {finished} finished their step while others wait at a sync "
                    "point: clients must run the same model"
                )
            return exchanges
        _, aggregate = aggregate_requests(requests)  # type: ignore[arg-type]
        exchanges += 1
        requests = {k: steps[k].resume(aggregate) for k in requests}


def pooled_backward(
    models: Sequence[nn.Module],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: LossFn,
    seeds: Optional[Sequence[int]] = None,
) -> float:
    """One synchronised forward/backward for K in-process clients.

    Parameters
    ----------
    models : Sequence[nn.Module]
        K models in train mode (typically K copies of one global model); converting them
        with :func:`~flwr_fedtan.convert_batchnorm` is optional.
    batches : Sequence[tuple[Tensor, Tensor]]
        Each client's ``(inputs, targets)``; sizes may differ.
    loss_fn : Callable[[Tensor, Tensor], Tensor]
        ``loss_fn(outputs, targets)``: the *mean* loss of a batch, or per-sample losses
        (``reduction="none"``; the pooled mean is formed here), or, for a loss module or
        ``functools.partial`` declaring ``reduction="sum"``, the sum (objective: the pooled
        sum). See :mod:`flwr_fedtan.losses`.
    seeds : Optional[Sequence[int]]
        Per-client RNG seeds for stochastic layers (see :class:`SyncStep`).

    Returns
    -------
    float
        ``F``, the mean loss over the pooled batch (the sum for ``reduction="sum"``).

    Notes
    -----
    Gradients are reset first. Afterwards each model's ``.grad`` holds that client's share
    of ``dF/dtheta``: summed over clients they equal the gradient that centralised training
    computes on the concatenated batch. BatchNorm running statistics are updated with the
    pooled statistics (variance unbiased with the pooled count).
    """
    if len(models) != len(batches):
        raise ValueError(f"got {len(models)} models but {len(batches)} batches")
    if not models:
        raise ValueError("pooled_backward needs at least one client")
    if seeds is not None and len(seeds) != len(models):
        raise ValueError(f"got {len(seeds)} seeds for {len(models)} clients")
    reduction = loss_reduction(loss_fn)
    sizes = [int(inputs.shape[0]) for inputs, _ in batches]
    total = sum(sizes)
    steps = []
    for k, (model, (inputs, targets)) in enumerate(zip(models, batches)):
        model.zero_grad(set_to_none=True)
        steps.append(
            SyncStep(
                model,
                _forward_and_loss(model, inputs, targets, loss_fn),
                num_examples=sizes[k],
                total_examples=total,
                seed=None if seeds is None else seeds[k],
                reduction=reduction,
            )
        )
    drive_steps(steps)
    losses = [cast(float, step.loss) for step in steps]  # every step completed
    if reduction == "sum":
        return sum(losses)
    return sum(loss * n / total for loss, n in zip(losses, sizes))


def _forward_and_loss(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn
) -> Callable[[], torch.Tensor]:
    return lambda: loss_fn(model(inputs), targets)


def pooled_statistics(
    models: Sequence[nn.Module],
    inputs: Sequence[torch.Tensor],
    seeds: Optional[Sequence[int]] = None,
    load: bool = True,
) -> dict[str, np.ndarray]:
    """The statistics pass for K in-process clients: exact BatchNorm statistics of the
    pooled examples, through the same pass and aggregation code as a Flower run.

    Parameters
    ----------
    models : Sequence[nn.Module]
        K copies of one model (the global model), one per client.
    inputs : Sequence[Tensor]
        Each client's examples (sizes may differ), forwarded as one batch per client.
    seeds : Optional[Sequence[int]]
        Per-client RNG seeds for stochastic layers (see :class:`StatisticsPass`).
    load : bool (default: True)
        Load the new buffers into every model.

    Returns
    -------
    dict[str, np.ndarray]
        The new ``running_mean``/``running_var`` buffers by ``state_dict`` key (see
        :func:`~flwr_fedtan.aggregation.exact_running_statistics`): what precise-BN gives on
        the concatenation of ``inputs``. Parameters and other buffers are unchanged.
    """
    if len(models) != len(inputs):
        raise ValueError(f"got {len(models)} models but {len(inputs)} input batches")
    if not models:
        raise ValueError("pooled_statistics needs at least one client")
    if seeds is not None and len(seeds) != len(models):
        raise ValueError(f"got {len(seeds)} seeds for {len(models)} clients")
    passes = [
        StatisticsPass(model, x, seed=None if seeds is None else seeds[k])
        for k, (model, x) in enumerate(zip(models, inputs))
    ]
    pooled: list[ForwardStats] = []
    try:
        requests = {k: p.start() for k, p in enumerate(passes)}
        while any(r is not None for r in requests.values()):
            if any(r is None for r in requests.values()):
                raise StepProtocolError("some clients finished their statistics pass while others wait: "
                                        "clients must run the same model")
            _, aggregate = aggregate_requests(requests)  # type: ignore[arg-type]
            pooled.append(cast(ForwardStats, aggregate))
            requests = {k: passes[k].resume(aggregate) for k in requests}
    finally:
        for p in passes:
            p.close()
    reference = {k: v.detach().cpu().numpy() for k, v in models[0].state_dict().items()}
    buffers = exact_running_statistics(pooled, passes[0].buffer_calls or {}, reference)
    if load:
        for model in models:
            state = model.state_dict()
            with torch.no_grad():
                for key, value in buffers.items():
                    state[key].copy_(torch.as_tensor(value))
    return buffers


def fedtan_round_in_process(
    clients: Sequence[InProcessClient],
    seed_keys: Sequence[int],
    arrays: Mapping[str, np.ndarray],
    round_seed: int,
    lr: float,
    local_steps: int = 1,
) -> dict[str, np.ndarray]:
    """One FedTAN round of :class:`~flwr_fedtan.FedTANClient` s computed without Flower.

    The reference a Flower run is checked against: the synchronised first step through
    :func:`pooled_backward`, each client stepping plain SGD with the gradient of its own
    mean loss, ``local_steps - 1`` ordinary local steps, then BatchNorm-aware averaging
    weighted by the synchronised batch sizes. Batches are drawn exactly as the clients
    draw them in a Flower round (``seed_keys``: each client's partition id or node id;
    ``round_seed``: the seed the strategy sends).
    """
    for client in clients:
        if client.optimizer_fn is not None or client.momentum or client.weight_decay:
            raise ValueError("the in-process reference implements plain SGD only")
        client.model.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()})
    seeds = [derive_seed(round_seed, key) for key in seed_keys]
    batches = [c.sample_batch(derive_seed(s, 0)) for c, s in zip(clients, seeds)]
    pooled_backward([c.model for c in clients], batches, clients[0].loss_fn)
    reduction = loss_reduction(clients[0].loss_fn)
    total = sum(len(x) for x, _ in batches)
    contributions: dict[Hashable, tuple[Mapping[str, np.ndarray], float]] = {}
    for k, (client, seed, (x, _)) in enumerate(zip(clients, seeds, batches)):
        model = client.model
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(lr * p.grad * (total / len(x) if reduction == "mean" else 1.0))
        for step in range(1, local_steps):
            inputs, targets = client.sample_batch(derive_seed(seed, step))
            model.zero_grad(set_to_none=True)
            reduce_loss(client.loss_fn(model(inputs), targets), len(inputs), reduction).backward()
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p.sub_(lr * p.grad)
        state = {name: v.detach().cpu().numpy().copy() for name, v in model.state_dict().items()}
        contributions[k] = (state, len(x))
    return aggregate_arrays(contributions, dict(arrays))
