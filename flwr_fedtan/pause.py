"""Pausing a function mid-way on the caller's own thread, with torch's thread state kept apart.

A synchronised step's forward code runs in a greenlet (a coroutine with its own C stack, on
the caller's OS thread) and pauses at every BatchNorm call until the pooled statistics come
back. Being on the caller's thread matters for speed: a worker thread per paused step gets
its own OpenMP team, and K paused steps' teams spinning against each other cost more than
the compute on a small machine.

The paused function and its caller share one OS thread, hence torch's thread-local state:
at every switch the side that is leaving gives the thread back as the other side left it
(:class:`TorchThreadState`). The function may draw from a private RNG stream, swapped in
while it runs (:class:`PrivateRNG`), so that a replay in another process draws the same
numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import greenlet
import torch

__all__ = ["PausableCall", "PrivateRNG", "TorchThreadState"]

_AUTOCAST_DEVICES = tuple(torch._C._autocast_supported_devices())
_INFRA_DISPATCH_KEYS = tuple(torch._C._TorchDispatchModeKey.__members__.values())
_eval_frame = torch._C._dynamo.eval_frame


def _function_modes() -> tuple:
    return tuple(torch._C._get_function_stack_at(i) for i in range(torch._C._len_torch_function_stack()))


def _dispatch_modes() -> tuple:
    return tuple(torch._C._get_dispatch_stack_at(i) for i in range(torch._C._len_torch_dispatch_stack()))


def _infra_dispatch_modes() -> tuple:
    return tuple(torch._C._get_dispatch_mode(key) for key in _INFRA_DISPATCH_KEYS)


def _saved_tensors_hooks() -> tuple:
    """The stack of default saved-tensor hooks, bottom first (popped and pushed back: torch
    exposes only its top)."""
    stack = []
    while (top := torch._C._autograd._top_saved_tensors_default_hooks(True)) is not None:
        stack.append(top)
        torch._C._autograd._pop_saved_tensors_default_hooks()
    stack.reverse()
    for pack, unpack in stack:
        torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)
    return tuple(stack)


@dataclass
class TorchThreadState:
    """Torch's thread-local state that code may change around a pause.

    Grad mode, autocast (every device type, its dtype and cache), the default saved-tensor
    hooks (and whether they are disabled), torch function modes and their enabled state,
    torch dispatch modes (user and infrastructure ones), the compiler's eval-frame callback
    (``torch.compile``), and the current CUDA device. Inference mode cannot be switched
    back and forth; a pause refuses to happen under it.
    """

    grad_enabled: bool
    autocast: tuple[tuple[bool, torch.dtype], ...]
    autocast_cache: bool
    saved_tensors_hooks: tuple
    saved_tensors_hooks_disabled: Optional[str]
    function_modes: tuple
    function_state: Any
    dispatch_modes: tuple
    infra_dispatch_modes: tuple
    eval_frame_callback: Any
    cuda_device: Optional[int]

    @classmethod
    def capture(cls) -> "TorchThreadState":
        hooks_enabled = torch._C._autograd._saved_tensors_hooks_is_enabled()  # type: ignore[attr-defined]
        return cls(
            grad_enabled=torch.is_grad_enabled(),
            autocast=tuple(
                (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES
            ),
            autocast_cache=torch.is_autocast_cache_enabled(),
            saved_tensors_hooks=_saved_tensors_hooks(),
            saved_tensors_hooks_disabled=(
                None if hooks_enabled else torch._C._autograd._saved_tensors_hooks_get_disabled_error_message()
            ),
            function_modes=_function_modes(),
            function_state=torch._C._get_torch_function_state(),  # type: ignore[attr-defined]
            dispatch_modes=_dispatch_modes(),
            infra_dispatch_modes=_infra_dispatch_modes(),
            eval_frame_callback=_eval_frame.get_eval_frame_callback(),
            cuda_device=torch.cuda.current_device() if torch.cuda.is_initialized() else None,
        )

    def restore(self, now: Optional["TorchThreadState"] = None) -> None:
        """Make this the thread's state, touching only what differs from ``now`` (the
        thread's current state, captured here if not given)."""
        if now is None:
            now = TorchThreadState.capture()
        if now.grad_enabled != self.grad_enabled:
            torch.set_grad_enabled(self.grad_enabled)
        if now.autocast != self.autocast:
            for device, (enabled, dtype) in zip(_AUTOCAST_DEVICES, self.autocast):
                torch.set_autocast_enabled(device, enabled)
                torch.set_autocast_dtype(device, dtype)
        if now.autocast_cache != self.autocast_cache:
            torch.set_autocast_cache_enabled(self.autocast_cache)
        if now.saved_tensors_hooks != self.saved_tensors_hooks:
            for _ in now.saved_tensors_hooks:
                torch._C._autograd._pop_saved_tensors_default_hooks()
            for pack, unpack in self.saved_tensors_hooks:
                torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)
        if now.saved_tensors_hooks_disabled != self.saved_tensors_hooks_disabled:
            if self.saved_tensors_hooks_disabled is None:
                torch._C._autograd._saved_tensors_hooks_enable()
            else:
                torch._C._autograd._saved_tensors_hooks_disable(self.saved_tensors_hooks_disabled)
        if now.function_modes != self.function_modes:
            for _ in now.function_modes:
                torch._C._pop_torch_function_stack()
            for mode in self.function_modes:
                torch._C._push_on_torch_function_stack(mode)
        if now.function_state != self.function_state:
            torch._C._set_torch_function_state(self.function_state)  # type: ignore[attr-defined]
        if now.dispatch_modes != self.dispatch_modes:
            for _ in now.dispatch_modes:
                torch._C._pop_torch_dispatch_stack(None)
            for mode in self.dispatch_modes:
                torch._C._push_on_torch_dispatch_stack(mode)
        if now.infra_dispatch_modes != self.infra_dispatch_modes:
            for key, mode in zip(_INFRA_DISPATCH_KEYS, self.infra_dispatch_modes):
                torch._C._unset_dispatch_mode(key)
                if mode is not None:
                    torch._C._set_dispatch_mode(mode)
        if now.eval_frame_callback is not self.eval_frame_callback:
            _eval_frame.set_eval_frame(self.eval_frame_callback)
        if self.cuda_device is not None and now.cuda_device != self.cuda_device:
            torch.cuda.set_device(self.cuda_device)


class PrivateRNG:
    """A private RNG stream (CPU and the given CUDA devices), seeded on first use.

    :meth:`swap` exchanges the global generator states with the private ones; calling it
    twice gives the global ones back.
    """

    def __init__(self, seed: int, cuda_devices: Callable[[], Sequence[torch.device]]) -> None:
        self._seed = seed
        self._find_devices = cuda_devices
        self._devices: Optional[Sequence[torch.device]] = None
        self._states: Optional[list[torch.Tensor]] = None

    def swap(self) -> None:
        if self._devices is None:
            self._devices = list(self._find_devices())
        current = [torch.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in self._devices]
        if self._states is None:
            torch.random.default_generator.manual_seed(self._seed)
            for d in self._devices:
                with torch.cuda.device(d):
                    torch.cuda.manual_seed(self._seed)
        else:
            torch.set_rng_state(self._states[0])
            for d, state in zip(self._devices, self._states[1:]):
                torch.cuda.set_rng_state(state, d)
        self._states = current


class Aborted(BaseException):
    """Raised inside a paused function to unwind it when its caller gives up on it."""


_ABORT = object()


class PausableCall:
    """``body()`` run in a greenlet that can pause and hand a value out to its driver.

    The driver calls :meth:`switch_in`, which returns ``("pause", value)`` when the body
    calls :meth:`pause` (from any depth), ``("done", result)`` when it returns, or
    ``("error", exception)``. :meth:`abort` unwinds a paused body.

    Parameters
    ----------
    body : Callable[[], Any]
        The function to run.
    rng : Optional[PrivateRNG]
        A private RNG stream the body draws from (swapped in while it runs), or ``None``
        for the global one.
    """

    def __init__(self, body: Callable[[], Any], rng: Optional[PrivateRNG] = None) -> None:
        self._body = body
        self._rng = rng
        self._greenlet: Optional[greenlet.greenlet] = greenlet.greenlet(self._run)
        self._state: Optional[TorchThreadState] = None

    @property
    def paused(self) -> bool:
        """Whether the body has started and is waiting in :meth:`pause`."""
        g = self._greenlet
        return g is not None and bool(g) and not g.dead

    def _run(self, _: object) -> tuple:
        self._swap_rng()
        try:
            return ("done", self._body())
        except Aborted:
            return ("aborted", None)
        except BaseException as error:  # handed to the driver
            return ("error", error)
        finally:
            self._swap_rng()

    def _swap_rng(self) -> None:
        if self._rng is not None:
            self._rng.swap()

    def switch_in(self, value: object = None) -> tuple:
        """Run the body until its next pause (or its end); return its message."""
        g = self._greenlet
        assert g is not None
        caller_state = TorchThreadState.capture()
        g.parent = greenlet.getcurrent()
        if self._state is not None and self._state != caller_state:
            self._state.restore(now=caller_state)
        try:
            message = g.switch(value)
        finally:
            left = TorchThreadState.capture()
            self._state = None if g.dead else left
            if left != caller_state:
                caller_state.restore(now=left)
            if g.dead:
                self._greenlet = None
        return message

    def pause(self, value: object) -> Any:
        """Called in the body: hand ``value`` to the driver, return what it sends back."""
        self._swap_rng()
        reply = greenlet.getcurrent().parent.switch(("pause", value))
        self._swap_rng()
        if reply is _ABORT:
            raise Aborted()
        return reply

    def abort(self) -> None:
        """Unwind a paused body (its ``finally`` blocks run); a no-op otherwise."""
        if self.paused:
            self.switch_in(_ABORT)
        self._greenlet = None

    def drop(self) -> None:
        """Forget the body without unwinding it (when not on its thread)."""
        self._greenlet = None
