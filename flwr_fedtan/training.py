"""One client's part of a FedTAN round, resumable and replayable; no Flower here.

A round on a client is ``S`` synchronised steps (each a :class:`~flwr_fedtan.step.SyncStep`
followed by an optimiser step with the gradient of the client's own mean loss) and then
``E - S`` ordinary local steps. Batches are drawn from a seed, so the whole round is a
deterministic function of (starting weights, seed, aggregates received), and
:meth:`ClientRound.replay` can rebuild it anywhere.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .errors import UnsupportedModelError
from .losses import loss_reduction, reduce_loss, summed_loss_issue
from .seeds import derive_seed
from .step import SyncStep
from .resumable import Aggregate, SyncRequest

__all__ = ["ClientRound", "derive_seed"]

BatchSampler = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class ClientRound:
    """A client's round: ``sync_steps`` synchronised steps, then local steps.

    Parameters
    ----------
    model : nn.Module
        The model holding the round's starting weights (conversion with
        :func:`~flwr_fedtan.convert_batchnorm` optional).
    sample_batch : Callable[[int], tuple[Tensor, Tensor]]
        Returns the ``(inputs, targets)`` batch for a seed, on the model's device.
    loss_fn : Callable[[Tensor, Tensor], Tensor]
        ``loss_fn(outputs, targets)``: the mean loss of a batch, or per-sample losses
        (``reduction="none"``), or the batch's sum for a loss module declaring
        ``reduction="sum"`` (see :mod:`flwr_fedtan.losses`).
    make_optimizer : Callable[[Iterable[Parameter]], Optimizer]
        Builds the round's optimiser (a fresh one every round, as in FedAvg).
    sync_steps : int
        ``S``, synchronised steps at the start of the round.
    local_steps : int
        ``E >= S``, all steps of the round.
    seed : int
        The round's seed for this client; step ``s`` uses ``derive_seed(seed, s)``.
    """

    def __init__(
        self,
        model: nn.Module,
        sample_batch: BatchSampler,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        make_optimizer: OptimizerFactory,
        sync_steps: int,
        local_steps: int,
        seed: int,
    ) -> None:
        if sync_steps < 0 or local_steps < sync_steps:
            raise ValueError(
                f"need 0 <= sync_steps <= local_steps, got sync_steps={sync_steps}, "
                f"local_steps={local_steps}"
            )
        self.model = model
        self.sample_batch = sample_batch
        self.loss_fn = loss_fn
        self.reduction = loss_reduction(loss_fn)
        self._make_optimizer = make_optimizer
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self.sync_steps = sync_steps
        self.local_steps = local_steps
        self.seed = seed
        self.step_index = 0
        self.received: list[Aggregate] = []
        self.num_examples = 0
        self.losses: list[float] = []
        self.sync_seconds = 0.0
        self._step: Optional[SyncStep] = None
        self._started = False
        self._loss_probed = False

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The round's optimiser, built on first use: a message that only replays a paused
        step (every message in deployment) never pays for importing torch.optim."""
        if self._optimizer is None:
            self._optimizer = self._make_optimizer([p for p in self.model.parameters() if p.requires_grad])
        return self._optimizer

    def _clear_gradients(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    @property
    def synchronised_done(self) -> bool:
        """Whether all synchronised steps are complete."""
        return self._started and self._step is None

    def start(self) -> Optional[SyncRequest]:
        """Start the round; return the first request, or ``None`` if no sync is needed."""
        if self._started:
            raise RuntimeError("round already started")
        self._started = True
        return self._timed(lambda: self._next_sync_step(0))

    def resume(self, aggregate: Aggregate) -> Optional[SyncRequest]:
        """Feed the pending aggregate; return the next request or ``None``."""
        if self._step is None:
            raise RuntimeError("no synchronised step is waiting for an aggregate")

        def advance() -> Optional[SyncRequest]:
            request = self._step.resume(aggregate)  # type: ignore[union-attr]
            self.received.append(aggregate)
            if request is not None:
                return request
            self._apply_sync_step()
            return self._next_sync_step(self.step_index + 1)

        return self._timed(advance)

    def replay(self, aggregates: Sequence[Aggregate]) -> Optional[SyncRequest]:
        """Start and feed logged aggregates; return the request now pending (if any)."""
        request = self.start()
        for i, aggregate in enumerate(aggregates):
            if request is None:
                raise RuntimeError(
                    f"replay log holds {len(aggregates)} aggregates but the round needed {i}: "
                    "starting weights, seed or model differ from the original round"
                )
            request = self.resume(aggregate)
        return request

    def finish(self) -> dict[str, float]:
        """Run the remaining ``E - S`` local steps; return the round's metrics."""
        if not self.synchronised_done:
            raise RuntimeError("finish() before the synchronised steps completed")
        start = time.perf_counter()
        self.model.train()
        for s in range(self.sync_steps, self.local_steps):
            inputs, targets = self.sample_batch(derive_seed(self.seed, s))
            self._clear_gradients()
            loss = reduce_loss(self._loss_of(inputs, targets), int(inputs.shape[0]), self.reduction)
            loss.backward()
            self.optimizer.step()
            self.losses.append(float(loss.detach()))
            if self.sync_steps == 0:
                self.num_examples += int(inputs.shape[0])
        return {
            "num-examples": float(self.num_examples),
            "train-loss": float(np.mean(self.losses)) if self.losses else float("nan"),
            "sync-seconds": self.sync_seconds,
            "local-seconds": time.perf_counter() - start,
        }

    def close(self) -> None:
        """Release a step still in flight (paused forward, graph)."""
        if self._step is not None:
            self._step.close()
            self._step = None

    # ------------------------------------------------------------------ internals
    def _loss_of(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of a batch; the round's first one also probes, on these very outputs
        (no extra forward), that a scalar loss sums only if it says so."""
        outputs = self.model(inputs)
        if not self._loss_probed and isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor):
            self._loss_probed = True
            issue = summed_loss_issue(self.loss_fn, outputs.detach(), targets, self.reduction)
            if issue is not None:
                raise UnsupportedModelError([issue])
        return self.loss_fn(outputs, targets)

    def _timed(self, fn: Callable[[], Optional[SyncRequest]]) -> Optional[SyncRequest]:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.sync_seconds += time.perf_counter() - start

    def _next_sync_step(self, index: int) -> Optional[SyncRequest]:
        self.model.train()
        while index < self.sync_steps:
            step_seed = derive_seed(self.seed, index)
            inputs, targets = self.sample_batch(step_seed)
            self._clear_gradients()
            self._step = SyncStep(
                self.model,
                lambda: self._loss_of(inputs, targets),
                num_examples=int(inputs.shape[0]),
                seed=step_seed,
                reduction=self.reduction,
            )
            self.step_index = index
            request = self._step.start()
            if request is not None:
                return request
            self._apply_sync_step()
            index += 1
        self._step = None
        self.step_index = index
        return None

    def _apply_sync_step(self) -> None:
        step = self._step
        assert step is not None and step.done
        scale = step.local_gradient_scale
        if scale != 1.0:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        self.optimizer.step()
        self.losses.append(float(step.loss))  # type: ignore[arg-type]
        self.num_examples += step.num_examples
        self._step = None
