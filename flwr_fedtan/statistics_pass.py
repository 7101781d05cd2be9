"""The statistics pass: a model's exact BatchNorm statistics over the pooled data of all
clients, computed federatedly (a federated precise-BN). No Flower here.

After a round's aggregation, the global model's BatchNorm buffers are running averages
collected over the round's steps by models that drifted apart; they are not the averaged
model's statistics. A :class:`StatisticsPass` forwards a client's examples through the
global model once, with no gradient and no update, pausing at every batch-statistics
BatchNorm call like a synchronised step does: each call normalises with the statistics
of the pooled examples of all clients (earlier calls already normalised with theirs), so
the pooled statistics of call ``l`` are exactly those a centralised forward of the
concatenated examples computes. ``L`` exchanges, forward statistics only.

The running buffers are then set by whoever knows the pooled statistics (the server, or
:func:`flwr_fedtan.reference.pooled_statistics` in one process): each layer's
``running_mean`` becomes the mean, over the calls that used it, of the pooled means, and
``running_var`` the mean of the pooled variances unbiased with the pooled count
(:func:`flwr_fedtan.aggregation.exact_running_statistics`). That is what precise-BN on the
union of the clients' examples gives: a train-mode forward of the concatenated batch with
``momentum=None`` (cumulative average) from reset buffers. The pass reports which buffer
each call used (:attr:`StatisticsPass.buffer_calls`); it never changes the model's
parameters or buffers itself.

Like ``torch.optim.swa_utils.update_bn`` and fvcore's precise-BN, the pass runs the whole
model in training mode (stochastic layers draw from a private RNG stream seeded by
``seed``, so a pass rebuilt elsewhere draws the same numbers).
"""

from __future__ import annotations

from typing import Any, Callable, Generator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from . import bn_ops
from .aggregation import ForwardStats, SyncPoint
from .batchnorm import check_model
from .intercept import intercept_batch_norm
from .resumable import Aggregate, ResumableProgram, SyncRequest, check_pooled_forward

__all__ = ["StatisticsPass", "BufferCalls", "MEAN", "VAR"]

MEAN, VAR = "mean", "var"
BufferCalls = dict[str, tuple[str, list[int]]]
"""``{state_dict key: (MEAN or VAR, [BatchNorm call indices])}``: which calls of the pass
fed which running buffer."""


class StatisticsPass(ResumableProgram):
    """One client's forward-only pass, paused at each BatchNorm call for the pooled
    statistics of all clients.

    .. code-block:: python

        stats_pass = StatisticsPass(model, inputs)
        request = stats_pass.start()
        while request is not None:
            point, payload = request                  # SyncPoint, ForwardStats
            request = stats_pass.resume(exchange(point, payload))
        stats_pass.buffer_calls                        # {buffer key: (kind, [calls])}

    Parameters
    ----------
    model : nn.Module
        The model whose statistics are wanted (the global model); conversion with
        :func:`~flwr_fedtan.convert_batchnorm` optional. Its training flags are restored
        when the pass ends.
    inputs : torch.Tensor
        This client's examples, on the model's device, forwarded as one batch.
    seed : Optional[int]
        Seeds a private RNG stream for stochastic layers (``None``: the global RNG).
    forward_fn : Optional[Callable[[], object]]
        What to run instead of ``model(inputs)`` (e.g. a model taking several inputs).
    """

    _NAME = "statistics pass"
    _NOT_WAITING = "no BatchNorm call of the statistics pass is waiting for statistics"
    _WRONG_THREAD = "a statistics pass must be resumed in the thread that started it"
    _REPLAY_MISMATCH = (
        "statistics log holds {log} aggregates but the pass completed after {done}: "
        "weights, examples or model differ from the original pass"
    )

    received: list[ForwardStats]

    def __init__(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        seed: Optional[int] = None,
        forward_fn: Optional[Callable[[], object]] = None,
    ) -> None:
        check_model(model)
        self.model = model
        self.num_examples = int(inputs.shape[0])
        if self.num_examples <= 0:
            raise ValueError("a statistics pass needs at least one example")
        self.total_examples: Optional[int] = None
        self._forward_fn = forward_fn or (lambda: model(inputs))
        self._seed = seed
        self._buffers: list[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = []
        self.buffer_calls: Optional[BufferCalls] = None
        super().__init__()

    @property
    def num_calls(self) -> int:
        """BatchNorm calls reached so far."""
        return len(self._buffers) + (self._pending_request is not None)

    def _check_aggregate(self, point: SyncPoint, own: Aggregate, aggregate: Any) -> None:
        check_pooled_forward(f"statistics pass, BatchNorm call {point.call}", point, own, aggregate,
                             self.num_examples, self.total_examples)

    @classmethod
    def replay(
        cls,
        model: nn.Module,
        inputs: torch.Tensor,
        aggregates: Sequence[ForwardStats],
        seed: Optional[int] = None,
    ) -> tuple["StatisticsPass", Optional[SyncRequest]]:
        """Rebuild a pass from the pooled statistics it received (e.g. in another process);
        return it paused at the first call with no known statistics, and that call's
        request."""
        stats_pass = cls(model, inputs, seed=seed)
        return stats_pass, stats_pass._resume_through(aggregates)

    # ------------------------------------------------------------------ internals
    def _run(self) -> Generator[SyncRequest, Any, None]:
        modes = [(module, module.training) for module in self.model.modules()]
        # A train-mode forward counts batches (num_batches_tracked); the pass changes nothing.
        buffers = [(buffer, buffer.clone()) for buffer in self.model.buffers()]
        try:
            yield from self._forward_program()
        finally:
            for module, training in modes:
                module.training = training
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
        self.buffer_calls = self._buffer_calls()

    def _forward_body(self) -> None:
        self.model.train()
        intercept = intercept_batch_norm(self._sync_batch_norm, self.model, self._forward_fn, self.num_examples)
        with intercept, torch.no_grad():
            self._forward_fn()

    def _sync_batch_norm(
        self,
        x: torch.Tensor,
        running_mean: Optional[torch.Tensor],
        running_var: Optional[torch.Tensor],
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        momentum: float,
        eps: float,
    ) -> torch.Tensor:
        """One BatchNorm call: hand out the local moments, normalise with the pooled ones.
        The running buffers are left alone (they are set from the pooled statistics)."""
        index = len(self._buffers)
        if x.dim() < 2:
            raise ValueError(f"BatchNorm call {index}: expected at least 2D input (got {x.dim()}D input)")
        local = bn_ops.to_numpy(torch.stack(bn_ops.channel_moments(x.detach())))
        point = SyncPoint(index=index, phase="forward", call=index, channels=int(x.shape[1]))
        payload = ForwardStats(
            count=float(x.numel() // x.shape[1]), num_examples=self.num_examples, mean=local[0], var=local[1]
        )
        pooled: ForwardStats = self._pause(point, payload)
        if self.total_examples is None:
            self.total_examples = int(pooled.num_examples)
        self._buffers.append((running_mean, running_var))
        mean_t, var_t = bn_ops.to_vector(
            np.array([pooled.mean, pooled.var], dtype=np.float64), bn_ops.parameter_dtype(weight, x), x.device
        ).unbind()
        return bn_ops.normalize(
            x.detach(), None if weight is None else weight.detach(), None if bias is None else bias.detach(),
            mean_t, var_t, eps,
        )

    def _buffer_calls(self) -> BufferCalls:
        names = {id(buffer): name for name, buffer in self.model.named_buffers()}
        calls: BufferCalls = {}
        for index, (running_mean, running_var) in enumerate(self._buffers):
            for kind, buffer in ((MEAN, running_mean), (VAR, running_var)):
                if buffer is None:
                    continue
                name = names.get(id(buffer))
                if name is None:  # a running tensor that is not one of the model's buffers
                    continue
                calls.setdefault(name, (kind, []))[1].append(index)
        return calls
