"""What a synchronised step (:class:`~flwr_fedtan.step.SyncStep`) and the statistics pass
(:class:`~flwr_fedtan.statistics_pass.StatisticsPass`) share: a forward run as a
:class:`~flwr_fedtan.pause.PausableCall` inside a generator program that yields one
``(point, payload)`` request per sync point and receives the aggregate of all clients;
its driving API (start, resume, close, replay); and the check of pooled forward
statistics both apply.
"""

from __future__ import annotations

import threading
from typing import Any, Generator, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .aggregation import BackwardSums, ForwardStats, SyncPoint
from .errors import StepProtocolError
from .pause import PausableCall, PrivateRNG

__all__ = ["Aggregate", "ResumableProgram", "SyncRequest", "check_pooled_forward"]

Aggregate = Union[ForwardStats, BackwardSums]
SyncRequest = tuple[SyncPoint, Aggregate]

def check_pooled_forward(
    where: str,
    point: SyncPoint,
    own: object,
    aggregate: object,
    num_examples: int,
    total_examples: Optional[int],
) -> None:
    """Refuse pooled forward statistics that cannot be this forward call's: another type
    or width, non-finite or negative moments, a pooled count or batch smaller than this
    client's own payload (``own``), or another pooled batch than earlier calls'.

    Raises
    ------
    StepProtocolError
        Naming ``where`` and what does not fit.
    """
    c = point.channels
    if not isinstance(aggregate, ForwardStats):
        raise StepProtocolError(f"{where} needs ForwardStats, got {type(aggregate).__name__}")
    if np.shape(aggregate.mean) != (c,) or np.shape(aggregate.var) != (c,):
        raise StepProtocolError(
            f"{where}: expected {c} channels, got mean {np.shape(aggregate.mean)}, var {np.shape(aggregate.var)}"
        )
    if not (np.isfinite(aggregate.mean).all() and np.isfinite(aggregate.var).all()):
        raise StepProtocolError(f"{where}: non-finite pooled moments")
    if (np.asarray(aggregate.var) < 0).any():
        raise StepProtocolError(f"{where}: negative pooled variance")
    own_count = own.count if isinstance(own, ForwardStats) else 1.0
    # ``not >=`` so that a NaN count is refused too.
    if not (aggregate.count >= max(own_count, 1.0)) or aggregate.num_examples < num_examples:
        raise StepProtocolError(
            f"{where}: pooled count {aggregate.count} / examples {aggregate.num_examples} smaller than this "
            f"client's own ({own_count:g} / {num_examples})"
        )
    if total_examples is not None and aggregate.num_examples != total_examples:
        raise StepProtocolError(
            f"{where}: pooled batch has {aggregate.num_examples} examples, expected {total_examples}"
        )


class ResumableProgram:
    """A client's forward (and whatever follows it), resumable at each sync point.

    A subclass sets ``model``, ``num_examples`` and ``_seed``, implements
    :meth:`_run` (the program: usually ``yield from self._forward_program()`` and more),
    :meth:`_forward_body` (the forward, run in the pausable call) and
    :meth:`_check_aggregate`, and names itself in the error messages through the
    ``_NAME``, ``_NOT_WAITING``, ``_WRONG_THREAD`` and ``_REPLAY_MISMATCH`` attributes.
    """

    _NAME = "program"
    _NOT_WAITING = "no sync point is waiting for an aggregate"
    _WRONG_THREAD = "a program must be resumed in the thread that started it"
    _REPLAY_MISMATCH = "{log} aggregates but it completed after {done}"

    model: nn.Module
    num_examples: int
    _seed: Optional[int]

    def __init__(self) -> None:
        self.received: list[Any] = []
        self._pending_request: Optional[SyncRequest] = None
        self._forward: Optional[PausableCall] = None
        self._thread: Optional[threading.Thread] = None  # the object: idents are reused
        self._program = self._run()
        self._started = False
        self._finished = False

    # ------------------------------------------------------------------ driving API
    @property
    def done(self) -> bool:
        """Whether the program has completed."""
        return self._finished

    def start(self) -> Optional[SyncRequest]:
        """Run until the first sync point; return ``(point, payload)`` or ``None`` if done."""
        if self._started:
            raise StepProtocolError(f"{self._NAME} already started")
        self._started = True
        self._thread = threading.current_thread()
        return self._advance(None)

    def resume(self, aggregate: Any) -> Optional[SyncRequest]:
        """Feed the aggregate of the pending sync point; run to the next one.

        Returns
        -------
        Optional[SyncRequest]
            The next ``(point, payload)``, or ``None`` when the program is complete.
        """
        if self._pending_request is None:
            raise StepProtocolError(self._NOT_WAITING)
        self._check_thread()
        self._check_aggregate(*self._pending_request, aggregate)
        self.received.append(aggregate)
        return self._advance(aggregate)

    def close(self) -> None:
        """Abandon the program, releasing its paused forward (and its graph)."""
        if not self._finished:
            if self._thread is None or self._thread is threading.current_thread():
                self._program.close()
            elif self._forward is not None:  # a paused forward unwinds only on its thread
                self._forward.drop()
                self._forward = None
            self._finished = True
        self._pending_request = None
        self._release()

    def _resume_through(self, aggregates: Sequence[Any]) -> Optional[SyncRequest]:
        """Start, then feed ``aggregates`` (a replay log); closed again if that fails."""
        try:
            request = self.start()
            for i, aggregate in enumerate(aggregates):
                if request is None:
                    raise StepProtocolError(self._REPLAY_MISMATCH.format(log=len(aggregates), done=i))
                request = self.resume(aggregate)
        except BaseException:
            self.close()  # else its paused forward lingers, holding the graph
            raise
        return request

    # ------------------------------------------------------------------ for subclasses
    def _run(self) -> Generator[SyncRequest, Any, None]:
        raise NotImplementedError

    def _forward_body(self) -> Any:
        raise NotImplementedError

    def _check_aggregate(self, point: SyncPoint, own: Aggregate, aggregate: Any) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        """What else :meth:`close` lets go of."""

    def _forward_program(self) -> Generator[SyncRequest, Any, Any]:
        """Run :meth:`_forward_body` as a pausable call (with the private RNG stream of
        ``_seed``), yielding its requests; return its result."""
        rng = None if self._seed is None else PrivateRNG(self._seed, self._cuda_devices)
        self._forward = forward = PausableCall(self._forward_body, rng)
        try:
            kind, value = forward.switch_in(None)
            while kind == "pause":
                aggregate = yield value
                kind, value = forward.switch_in(aggregate)
            if kind == "error":
                raise value
            return value
        finally:
            forward.abort()  # unwinds a forward still paused (the program was closed early)
            self._forward = None

    def _pause(self, point: SyncPoint, payload: Aggregate) -> Any:
        """Called in the forward: hand ``(point, payload)`` out, return the aggregate."""
        assert self._forward is not None
        return self._forward.pause((point, payload))

    def _advance(self, value: Optional[Aggregate]) -> Optional[SyncRequest]:
        try:
            request = self._program.send(value)
        except StopIteration:
            self._pending_request = None
            self._finished = True
            return None
        except BaseException:
            self._pending_request = None
            self._finished = True
            raise
        self._pending_request = request
        return request

    def _check_thread(self) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            raise StepProtocolError(self._WRONG_THREAD)

    def _cuda_devices(self) -> list[torch.device]:
        return sorted({p.device for p in self.model.parameters() if p.device.type == "cuda"}, key=str)
