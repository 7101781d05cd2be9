"""A resumable synchronised training step.

:class:`SyncStep` runs a client's ordinary forward code (model + loss) and pauses at every
BatchNorm sync point, handing out the client's per-channel statistics and resuming once
the caller feeds back the aggregate of all clients:

.. code-block:: python

    step = SyncStep(model, lambda: loss_fn(model(x), y), num_examples=len(x))
    request = step.start()
    while request is not None:
        point, payload = request               # SyncPoint, ForwardStats | BackwardSums
        request = step.resume(exchange(point, payload))
    # model parameters' .grad now hold this client's share of dF/dtheta

How the pauses work
-------------------
Forward: the forward code runs as a :class:`~.pause.PausableCall` (a greenlet on the
caller's OS thread); every batch-statistics ``F.batch_norm`` / ``torch.batch_norm`` call
it makes, whichever module or hand-written code makes it, is handed to the step (see
:mod:`~.intercept`); each such call switches back to the caller with its statistics,
and the step switches into the greenlet again with the pooled statistics. The per-call
arithmetic lives in :mod:`~.bn_ops`.

Backward: nothing ever blocks inside autograd. Each synchronised BatchNorm output is an
autograd node with no path back to its input or the layer's parameters (it hangs from a
private leaf), so the graph is *cut* there, and the gradient arriving at the output is
captured at its ``GradientEdge`` without that node ever running. The step drives the
backward itself, in stages, from the calling thread (:class:`~.staged_backward.StagedBackward`):
from the loss down to the cuts, then for BatchNorm calls in reverse execution order it
posts ``(sum g, sum g * x_hat)``, waits for the sums over clients, forms ``dF/dx`` and runs
``torch.autograd.grad`` from that call's input down to the cuts below it, each graph node
once. On CUDA this keeps autograd's per-device engine thread free, so several steps can
share one process.

Replay
------
A step is a deterministic function of (weights, batch, RNG seed, aggregates so far).
:meth:`SyncStep.replay` rebuilds a step in a fresh process from the aggregates it had
received and returns it paused at the first sync point whose aggregate is not known yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generator, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from . import bn_ops
from .aggregation import BackwardSums, ForwardStats, SyncPoint
from .batchnorm import check_model
from .errors import StepProtocolError, UnsupportedModelError
from .intercept import intercept_batch_norm, refuse_checkpointing
from .losses import reduce_loss
from .resumable import Aggregate, ResumableProgram, SyncRequest, check_pooled_forward
from .staged_backward import StagedBackward

__all__ = ["SyncStep"]


@dataclass
class _BatchNormCall:
    """What one synchronised BatchNorm call keeps for its backward stage."""

    point: SyncPoint
    input: torch.Tensor  # the graph node feeding the layer; backward starts from it
    input_version: int
    mean: np.ndarray  # pooled statistics, float64
    invstd: np.ndarray
    count: float
    gamma: Union[np.ndarray, float]  # the weight as the forward used it (1 if none)
    weight: Optional[torch.Tensor]  # leaves that take (sum g * x_hat, sum g)
    bias: Optional[torch.Tensor]
    eps: float
    mean_t: torch.Tensor  # ``mean`` and ``invstd`` as the forward's device tensors
    invstd_t: torch.Tensor
    cut: Optional[GradientEdge] = None  # where the output's gradient is captured

class SyncStep(ResumableProgram):
    """One client's synchronised forward/backward pass, resumable at each sync point.

    Parameters
    ----------
    model : nn.Module
        The client's model. Every batch-statistics BatchNorm computation in its forward
        (``nn.BatchNorm*``, ``SyncBatchNorm`` outside a process group, subclasses such as
        timm's ``BatchNormAct2d``, hand-written layers calling ``F.batch_norm`` or
        ``torch.batch_norm``) is synchronised; converting it with
        :func:`~flwr_fedtan.convert_batchnorm` is optional. :func:`~flwr_fedtan.validate`
        lists what is refused.
    forward_fn : Callable[[], torch.Tensor]
        The client's ordinary forward code, e.g. ``lambda: loss_fn(model(x), y)``,
        returning the *mean* loss over its batch (its *sum* with ``reduction="sum"``), or
        per-sample losses of shape ``(n_k, ...)`` that the step reduces itself. Do not
        call ``backward()`` in it.
    num_examples : int
        ``n_k``, the number of samples in this client's batch.
    total_examples : Optional[int]
        ``N``, the pooled batch size, if known in advance; otherwise it comes with the
        first forward aggregate (a model with no synchronised BatchNorm call then uses
        ``N = n_k``).
    seed : Optional[int]
        Seeds a private RNG stream for ``forward_fn`` (dropout, ...), so that a replay
        in another process draws the same numbers. ``None`` uses the global RNG as is.
    reduction : str
        The objective ``F`` over the pooled batch: ``"mean"`` (default) of the per-sample
        losses, or their ``"sum"`` (for a loss with ``reduction="sum"``; see
        :func:`~flwr_fedtan.losses.loss_reduction`).

    Notes
    -----
    Gradients accumulate into ``.grad`` like ``loss.backward()`` does; what they
    accumulate is this client's share of ``dF/dtheta``: with ``reduction="mean"``,
    ``n_k / N`` times the gradient of the client's own mean loss
    (:attr:`local_gradient_scale` converts back); with ``"sum"``, the gradient of the
    client's own sum.
    """

    _NAME = "step"
    _NOT_WAITING = "no sync point is waiting for an aggregate"
    _WRONG_THREAD = (
        "a SyncStep must be resumed in the thread that started it (its paused "
        "forward lives on that thread's stack); rebuild it with SyncStep.replay "
        "in this thread instead"
    )
    _REPLAY_MISMATCH = (
        "replay log holds {log} aggregates but the step completed "
        "after {done}: weights, batch or model differ from the original step"
    )

    received: list[Aggregate]

    def __init__(
        self,
        model: nn.Module,
        forward_fn: Callable[[], torch.Tensor],
        num_examples: int,
        total_examples: Optional[int] = None,
        seed: Optional[int] = None,
        reduction: str = "mean",
    ) -> None:
        check_model(model)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        if int(num_examples) <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        self.model = model
        self.num_examples = int(num_examples)
        self.total_examples: Optional[int] = int(total_examples) if total_examples else None
        self.loss: Optional[float] = None
        self.used_fallback_backward: Optional[bool] = None
        self._forward_fn = forward_fn
        self._seed = seed
        self._calls: list[_BatchNormCall] = []
        self._num_points = 0
        super().__init__()

    # ------------------------------------------------------------------ public driving API
    @property
    def num_sync_points(self) -> int:
        """Sync points reached so far (forward and backward)."""
        return self._num_points

    @property
    def pending(self) -> Optional[SyncPoint]:
        """The sync point waiting for an aggregate, if any."""
        return None if self._pending_request is None else self._pending_request[0]

    @property
    def local_gradient_scale(self) -> float:
        """Turns this client's share of ``dF/dtheta`` into the gradient of its own loss:
        ``N / n_k`` for a mean objective, 1 for a sum."""
        if self.total_examples is None or self.reduction == "sum":
            return 1.0
        return self.total_examples / self.num_examples

    def _release(self) -> None:
        self._calls = []

    @classmethod
    def replay(
        cls,
        model: nn.Module,
        forward_fn: Callable[[], torch.Tensor],
        num_examples: int,
        aggregates: Sequence[Aggregate],
        total_examples: Optional[int] = None,
        seed: Optional[int] = None,
    ) -> tuple["SyncStep", Optional[SyncRequest]]:
        """Rebuild a step from the aggregates it received, e.g. in a fresh process.

        ``model`` must hold the same weights (and BatchNorm buffers) as when the original
        step started, and ``forward_fn`` must see the same batch.

        Returns
        -------
        tuple[SyncStep, Optional[SyncRequest]]
            The step, paused at the first sync point with no known aggregate, and that
            point's request (``None`` if the aggregates complete the step).
        """
        step = cls(model, forward_fn, num_examples, total_examples=total_examples, seed=seed)
        return step, step._resume_through(aggregates)

    # ------------------------------------------------------------------ internals
    def _check_aggregate(self, point: SyncPoint, own: Aggregate, aggregate: Any) -> None:
        c = point.channels
        if point.phase == "forward":
            check_pooled_forward(
                f"sync point {point.index}", point, own, aggregate, self.num_examples, self.total_examples,
            )
        else:
            if not isinstance(aggregate, BackwardSums):
                raise StepProtocolError(
                    f"sync point {point.index} needs BackwardSums, got {type(aggregate).__name__}"
                )
            if aggregate.sum_grad.shape != (c,) or aggregate.sum_grad_xhat.shape != (c,):
                raise StepProtocolError(
                    f"sync point {point.index}: expected {c} channels, got sums "
                    f"{aggregate.sum_grad.shape}, {aggregate.sum_grad_xhat.shape}"
                )
            if not (
                np.isfinite(aggregate.sum_grad).all() and np.isfinite(aggregate.sum_grad_xhat).all()
            ):
                raise StepProtocolError(f"sync point {point.index}: non-finite backward sums")

    def _new_point(self, phase: str, call: int, channels: int) -> SyncPoint:
        point = SyncPoint(index=self._num_points, phase=phase, call=call, channels=channels)
        self._num_points += 1
        return point

    def _forward_body(self) -> torch.Tensor:
        """The forward code, run as the step's :class:`~.pause.PausableCall`."""
        intercept = intercept_batch_norm(self.sync_batch_norm, self.model, self._forward_fn, self.num_examples)
        with intercept, torch.enable_grad():
            loss = self._forward_fn()
            return reduce_loss(loss, self.num_examples, self.reduction)

    def _pause_forward(self, point: SyncPoint, payload: Aggregate) -> Aggregate:
        """Called in the forward: hand ``payload`` out, wait for the aggregate."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "a synchronised step cannot run under torch.inference_mode(): BatchNorm "
                f"call {point.call} needs autograd for its backward sync point"
            )
        return self._pause(point, payload)

    def sync_batch_norm(
        self,
        x: torch.Tensor,
        running_mean: Optional[torch.Tensor],
        running_var: Optional[torch.Tensor],
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        momentum: float,
        eps: float,
    ) -> torch.Tensor:
        """One batch-statistics BatchNorm call (``F.batch_norm(..., training=True)``), with
        the statistics of the pooled batch (runs in the step's forward)."""
        index = len(self._calls)
        if x.dim() < 2:
            raise ValueError(f"BatchNorm call {index}: expected at least 2D input (got {x.dim()}D input)")
        for name, tensor in (("weight", weight), ("bias", bias)):
            if tensor is not None and tensor.requires_grad and tensor.grad_fn is not None:
                raise UnsupportedModelError(
                    f"BatchNorm call {index}: its {name} is computed in the forward (not a leaf "
                    "tensor such as a Parameter); FedTAN adds that call's gradient to the leaf "
                    f"directly. Fix: pass the {name} Parameter itself to F.batch_norm"
                )
        refuse_checkpointing(index)
        local = bn_ops.to_numpy(torch.stack(bn_ops.channel_moments(x.detach())))
        count = x.numel() // x.shape[1]
        point = self._new_point("forward", index, x.shape[1])
        payload = ForwardStats(
            count=float(count), num_examples=self.num_examples, mean=local[0], var=local[1]
        )
        pooled: ForwardStats = self._pause_forward(point, payload)  # type: ignore[assignment]
        if self.total_examples is None:
            self.total_examples = int(pooled.num_examples)
        total = float(pooled.count)
        if total <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel in the pooled batch when training, "
                f"got input size {tuple(x.shape)} and pooled count {total:g}"
            )
        # Per-channel arithmetic in float64 NumPy: C-sized vectors, where a torch op each
        # would cost more in dispatch than in arithmetic.
        mu = np.asarray(pooled.mean, dtype=np.float64)
        pooled_var = np.asarray(pooled.var, dtype=np.float64)
        invstd = 1.0 / np.sqrt(pooled_var + eps)
        unbiased = pooled_var * (total / (total - 1))
        mean_t, var_t, unbiased_t, invstd_t = bn_ops.to_vector(
            np.array([mu, pooled_var, unbiased, invstd]), bn_ops.parameter_dtype(weight, x), x.device
        ).unbind()
        # What F.batch_norm does to the running statistics, with the pooled batch's.
        with torch.no_grad():
            for running, value in ((running_mean, mean_t), (running_var, unbiased_t)):
                if running is not None:
                    running.lerp_(value.to(running.dtype), momentum)
        gamma: Union[np.ndarray, float] = 1.0 if weight is None else bn_ops.to_numpy(weight)
        weight_d = None if weight is None else weight.detach()
        bias_d = None if bias is None else bias.detach()
        call = _BatchNormCall(
            point, x, x._version, mu, invstd, total, gamma, weight, bias, eps, mean_t, invstd_t
        )
        self._calls.append(call)
        if not torch.is_grad_enabled():
            return bn_ops.normalize(x.detach(), weight_d, bias_d, mean_t, var_t, eps)
        # The output must be an autograd node whose incoming gradient the backward can
        # capture (see StagedBackward), without a path back to x or the parameters: it
        # hangs from a private leaf, the bias (or a zero bias) detached from the layer.
        # Nothing else reaches that leaf, so the node itself never runs.
        anchor = bias_d if bias_d is not None else torch.zeros_like(mean_t)
        output = bn_ops.normalize(x.detach(), weight_d, anchor.requires_grad_(), mean_t, var_t, eps)
        call.cut = get_gradient_edge(output)
        return output

    def _run(self) -> Generator[SyncRequest, Any, None]:
        """The step as a generator: yields requests, receives aggregates."""
        loss = yield from self._forward_program()
        yield from self._backward(loss)

    def _backward(self, loss: torch.Tensor) -> Generator[SyncRequest, Any, None]:
        if self.total_examples is None:
            self.total_examples = self.num_examples
        self.loss = float(loss.detach())
        if not loss.requires_grad:
            raise RuntimeError(
                "the loss of a synchronised step does not require grad: do not run the "
                "step under torch.no_grad(), and make sure the model has trainable parameters"
            )
        share = self.num_examples / self.total_examples if self.reduction == "mean" else 1.0
        calls = list(reversed(self._calls))
        staged = StagedBackward(
            loss,
            [call.input if call.input.requires_grad else None for call in calls],
            [call.cut for call in calls],
        )
        self.used_fallback_backward = staged.fallback
        staged.run_loss_stage(torch.full_like(loss, share))
        del loss
        for stage, call in enumerate(calls, start=1):
            yield from self._backward_stage(call, staged, stage)
        self._calls = []

    def _backward_stage(
        self, call: _BatchNormCall, staged: StagedBackward, stage: int
    ) -> Generator[SyncRequest, Any, None]:
        x = call.input
        if x._version != call.input_version:
            raise RuntimeError(
                f"the input of BatchNorm call {call.point.call} was modified in place after "
                "the layer used it; FedTAN needs it unchanged for the backward pass"
            )
        g = staged.cut_gradient(stage - 1)
        # An output no loss reached (used under no_grad, or unused) leaves gradients
        # untouched, as in centralised training, unless other clients' sums say otherwise.
        reached = g is not None
        if g is None:
            g = torch.zeros_like(x)
        sum_g, sum_gxhat = bn_ops.local_backward_sums(g, x, call.mean_t, call.invstd_t, call.eps)
        sums = bn_ops.to_numpy(torch.stack([sum_g, sum_gxhat]))
        local = BackwardSums(sum_grad=sums[0], sum_grad_xhat=sums[1])
        point = self._new_point("backward", call.point.call, x.shape[1])
        total: BackwardSums = yield point, local

        if reached:
            if call.weight is not None:
                self._accumulate(call.weight, sum_gxhat)
            if call.bias is not None:
                self._accumulate(call.bias, sum_g)
        if x.requires_grad and not (reached or total.sum_grad.any() or total.sum_grad_xhat.any()):
            staged.run_stage(stage, None)  # still passes on what earlier stages left below
        elif x.requires_grad:
            grad_input = bn_ops.input_gradient(
                x, g, call.gamma, call.mean, call.invstd, call.count,
                total.sum_grad, total.sum_grad_xhat, call.mean_t.dtype,
            )
            staged.run_stage(stage, grad_input)
        call.input = None  # type: ignore[assignment]

    @staticmethod
    def _accumulate(param: torch.Tensor, value: torch.Tensor) -> None:
        """Add ``value`` (a fresh tensor) to ``param.grad`` as autograd would."""
        if not param.requires_grad:
            return
        value = value.to(param.dtype)
        if param.grad is None:
            param.grad = value
        else:
            param.grad.add_(value)
