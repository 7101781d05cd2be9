"""Where a synchronised step catches BatchNorm: every batch-statistics ``F.batch_norm`` /
``torch.batch_norm`` call its forward makes, whichever module or hand-written code makes it.

Two routes hand such a call to the step, with the same result:

- **fast**: ``torch.batch_norm`` is replaced by a pass-through wrapper,
  :func:`fedtan_batch_norm` (``F.batch_norm``, and with it every ``nn.BatchNorm*`` layer
  and their subclasses, calls it by attribute). Inside a step's forward the wrapper hands a
  training-mode call to the step active in the current greenlet (a context variable, so
  paused forwards of other clients and other threads never see it); everywhere else it
  calls PyTorch's function. Other ops cost nothing.
- **mode**: a :class:`~torch.overrides.TorchFunctionMode` over the forward. It also sees
  calls through references bound before the wrapper was installed
  (``from torch import batch_norm``), and it is what ``torch.compile`` traces correctly,
  but it costs a Python call per op of the forward.

The first forward of a given code (the model's module classes and the forward function)
runs under the mode, which records whether every BatchNorm call came through the wrapper;
if so, later steps of the same code take the fast route. The mode is always used while
``torch.compile`` is in use (it has compiled a frame in this process, or the model or the
forward function is compiled) and for single-example steps (``F.batch_norm`` would refuse
the client's one-sample batch before the wrapper sees it).

Importing FedTAN changes nothing in torch: the wrapper is installed (:func:`install`) by the
first synchronised step or statistics pass, and stays for the process's later steps.
:func:`uninstall` gives ``torch.batch_norm`` back to PyTorch (refused while a step is
running); the next step installs the wrapper again. :func:`installed` tells whether it is.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import sys
import threading
from types import FrameType
from typing import Callable, Hashable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .errors import UnsupportedModelError

__all__ = ["fedtan_batch_norm", "install", "installed", "intercept_batch_norm", "refuse_checkpointing", "uninstall"]

#: ``sync(x, running_mean, running_var, weight, bias, momentum, eps) -> output``
SyncFn = Callable[..., torch.Tensor]


def _functional_args(input, running_mean, running_var, weight=None, bias=None, training=False,
                     momentum=0.1, eps=1e-5):  # noqa: ANN001 -- F.batch_norm's signature
    return input, running_mean, running_var, weight, bias, training, momentum, eps


def _aten_args(input, weight, bias, running_mean, running_var, training, momentum, eps,
               cudnn_enabled=True):  # noqa: ANN001 -- torch.batch_norm's signature
    return input, running_mean, running_var, weight, bias, training, momentum, eps


class _Route:
    """The step a forward's BatchNorm calls go to, and what the mode learnt on the way."""

    __slots__ = ("sync", "fast", "via_wrapper", "bound_calls")

    def __init__(self, sync: SyncFn, fast: bool) -> None:
        self.sync = sync
        self.fast = fast
        self.via_wrapper = False  # the next torch.batch_norm the mode sees came through it
        self.bound_calls = 0  # training-mode calls the wrapper would have missed


_ROUTE: contextvars.ContextVar[Optional[_Route]] = contextvars.ContextVar("fedtan_route", default=None)

_TORCH_BATCH_NORM = getattr(torch.batch_norm, "__wrapped_by_fedtan__", torch.batch_norm)
_F_BATCH_NORM = F.batch_norm
_is_compiling = torch.compiler.is_compiling


def fedtan_batch_norm(*args, **kwargs):  # noqa: ANN002, ANN003 -- torch.batch_norm's signature
    """``torch.batch_norm`` while FedTAN's interception is installed (see
    :mod:`flwr_fedtan.intercept`): inside a synchronised step's forward, a batch-statistics
    call goes to the step; everywhere else PyTorch's ``torch.batch_norm`` runs, unchanged."""
    route = _ROUTE.get()
    if _is_compiling():
        if route is not None and route.fast:
            raise UnsupportedModelError(
                "torch.compile began compiling inside a synchronised step that runs without "
                "the torch function mode, so its graph would skip the step's BatchNorm "
                "exchanges. Fix: run the compiled model once before its first step (later "
                "steps then always use the mode)"
            )
        return _TORCH_BATCH_NORM(*args, **kwargs)
    if route is not None:
        x, running_mean, running_var, weight, bias, training, momentum, eps = _aten_args(*args, **kwargs)
        if training:
            if route.fast:
                return route.sync(x, running_mean, running_var, weight, bias, momentum, eps)
            route.via_wrapper = True  # the mode sees this call next
    return _TORCH_BATCH_NORM(*args, **kwargs)


fedtan_batch_norm.__wrapped__ = _TORCH_BATCH_NORM  # type: ignore[attr-defined]  # for inspect.signature
fedtan_batch_norm.__wrapped_by_fedtan__ = _TORCH_BATCH_NORM  # type: ignore[attr-defined]

_INSTALL_LOCK = threading.Lock()
_ACTIVE_ROUTES = 0  # intercepting blocks entered and not left (paused forwards included)


def installed() -> bool:
    """Whether ``torch.batch_norm`` is FedTAN's wrapper, :func:`fedtan_batch_norm`."""
    return torch.batch_norm is fedtan_batch_norm


def install() -> None:
    """Replace ``torch.batch_norm`` by :func:`fedtan_batch_norm` (idempotent).

    Called by every synchronised step and statistics pass before its forward; there is no
    need to call it yourself."""
    if torch.batch_norm is fedtan_batch_norm:
        return
    with _INSTALL_LOCK:
        if torch.batch_norm is fedtan_batch_norm:
            return
        torch.batch_norm = fedtan_batch_norm
        _forget_compiler_rules()
        # TorchScript compiles F.batch_norm's body: map the wrapper to the same aten op.
        with contextlib.suppress(ImportError, AttributeError):
            from torch.jit._builtins import _register_builtin

            _register_builtin(fedtan_batch_norm, "aten::batch_norm")


def uninstall() -> None:
    """Give ``torch.batch_norm`` back to PyTorch (idempotent; a no-op if not installed).

    Raises ``RuntimeError`` while a synchronised step or statistics pass is running (a
    paused forward included: close it first), since its later BatchNorm calls would then
    normalise with local statistics. The next step installs the wrapper again."""
    with _INSTALL_LOCK:
        if _ACTIVE_ROUTES:
            raise RuntimeError(
                f"cannot uninstall FedTAN's torch.batch_norm wrapper: {_ACTIVE_ROUTES} synchronised "
                "step(s) or statistics pass(es) are running. Fix: finish or close() them first"
            )
        if torch.batch_norm is fedtan_batch_norm:
            torch.batch_norm = _TORCH_BATCH_NORM
            _forget_compiler_rules()


def _forget_compiler_rules() -> None:
    """torch.compile's table of in-graph torch functions is built once, from the functions
    ``torch.*`` names hold then: rebuild it so that ``torch.batch_norm``, whichever function
    it now is, traces as the batch-norm op (no graph break at the wrapper)."""
    trace_rules = sys.modules.get("torch._dynamo.trace_rules")
    with contextlib.suppress(AttributeError):
        if trace_rules is not None:
            trace_rules.get_torch_obj_rule_map.cache_clear()


def _count_active(change: int) -> None:
    global _ACTIVE_ROUTES
    with _INSTALL_LOCK:
        _ACTIVE_ROUTES += change


_MODE_FUNCTIONS = {
    _F_BATCH_NORM: _functional_args,
    _TORCH_BATCH_NORM: _aten_args,
    fedtan_batch_norm: _aten_args,
}


class _BatchNormInterceptor(TorchFunctionMode):
    """Routes every batch-statistics ``F.batch_norm`` / ``torch.batch_norm`` call of a step's
    forward to the step; everything else (and BatchNorm in eval mode) runs as usual.

    Active only while the step's forward runs (the pause takes it off the thread's mode
    stack whenever the forward is paused).
    """

    def __init__(self, route: _Route) -> None:
        super().__init__()
        self.route = route

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        parse = _MODE_FUNCTIONS.get(func)
        if parse is None:  # every other op of the forward: keep this path short
            return func(*args, **kwargs) if kwargs else func(*args)
        route = self.route
        via_wrapper, route.via_wrapper = route.via_wrapper, False
        x, running_mean, running_var, weight, bias, training, momentum, eps = parse(*args, **(kwargs or {}))
        if not training:
            return func(*args, **(kwargs or {}))
        if func is not _F_BATCH_NORM and not via_wrapper:  # F.batch_norm calls the wrapper
            route.bound_calls += 1
        return route.sync(x, running_mean, running_var, weight, bias, momentum, eps)


def _compiler_disabled(fn: Callable) -> Callable:
    """``fn`` hidden from torch.compile (imported only when torch.compile is in use: it costs
    seconds)."""
    import torch._dynamo

    return torch._dynamo.disable(fn, recursive=True)


@functools.lru_cache(maxsize=None)
def _hide_wrapper_from_compiler() -> None:
    """Keep torch.compile from compiling the wrapper's own frame when a graph break (the
    step's exchange) makes it run eagerly; traced from compiled code, it is
    ``torch.batch_norm``, an op in the graph, either way."""
    with contextlib.suppress(ImportError, AttributeError):
        from torch._dynamo.eval_frame import skip_code

        skip_code(fedtan_batch_norm.__code__)


_FAST_ROUTE_KEYS: set[Hashable] = set()
"""Forward codes whose BatchNorm calls all came through the wrapper under the mode."""


def _route_key(modules: Sequence[nn.Module], forward_fn: Callable) -> Hashable:
    """What decides which BatchNorm calls a forward makes, and how: its code."""
    return tuple(type(m) for m in modules), getattr(forward_fn, "__code__", type(forward_fn))


def _compiler_in_use(modules: Sequence[nn.Module], forward_fn: Callable) -> bool:
    """Whether torch.compile has compiled anything in this process, or is set on the model
    or the forward function (it compiles on first call). Its graphs are guarded on the
    torch function mode stack, not on the wrapper's context variable: only the mode makes a
    graph traced outside a step retrace inside one."""
    if "torch._dynamo" not in sys.modules:  # torchvision, timm and flwr import it, unused
        return False
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    _hide_wrapper_from_compiler()
    return bool(
        counters["frames"]["total"]
        or hasattr(forward_fn, "_torchdynamo_orig_callable")
        or any(isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
               for m in modules)
    )


@contextlib.contextmanager
def intercept_batch_norm(
    sync: SyncFn, model: nn.Module, forward_fn: Callable, num_examples: int
) -> Iterator[None]:
    """Hand every batch-statistics BatchNorm call ``forward_fn`` makes inside the block (in
    this greenlet) to ``sync``; see the module docstring for the route taken."""
    install()
    modules = list(model.modules())
    key = _route_key(modules, forward_fn)
    fast = key in _FAST_ROUTE_KEYS and num_examples > 1 and not _compiler_in_use(modules, forward_fn)
    if not fast and "torch._dynamo" in sys.modules:  # torch.compile may trace: keep the exchange out
        sync = _compiler_disabled(sync)
    route = _Route(sync, fast)
    token = _ROUTE.set(route)
    _count_active(+1)
    try:
        if route.fast:
            yield
            return
        with _BatchNormInterceptor(route):
            yield
        if route.bound_calls == 0 and not _compiler_in_use(modules, forward_fn):  # it may have compiled now
            _FAST_ROUTE_KEYS.add(key)
    finally:
        _count_active(-1)
        _ROUTE.reset(token)


_CHECKPOINT_FILE = os.path.join("torch", "utils", "checkpoint.py")


def refuse_checkpointing(index: int) -> None:
    """Refuse a BatchNorm call under activation checkpointing: its recomputation in the
    backward pass would normalise with local statistics."""
    frame: Optional[FrameType] = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith(_CHECKPOINT_FILE):
            raise UnsupportedModelError(
                f"BatchNorm call {index} runs under activation checkpointing "
                "(torch.utils.checkpoint), whose recomputation in the backward pass would "
                "normalise with local statistics. Fix: turn checkpointing off for the "
                "synchronised steps (timm: model.set_grad_checkpointing(False); or keep "
                "BatchNorm layers out of checkpointed segments)"
            )
        frame = frame.f_back
