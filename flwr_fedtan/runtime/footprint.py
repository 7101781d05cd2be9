"""How much memory a paused round holds, and how much a home may spend on paused rounds.

:func:`live_bytes` sums the storage bytes of the tensors a paused round keeps alive: the
model's parameters, buffers and gradients, the optimiser's state, the tensors held by the
paused forward (the greenlet's frames) or backward (a generator's frame), and the
tensors autograd saved for the backward of the graph they lead to. Each storage is
counted once, however many views of it there are. The node's dataset is not counted: it
is the client's, not the round's.

:func:`memory_available` is what the budget's default is a fraction of. This module
imports neither torch nor greenlet: it looks for them among the loaded modules.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any, Optional

__all__ = ["describe_bytes", "live_bytes", "memory_available"]

_PACKAGE = __name__.split(".")[0]
_saved_names: dict[type, tuple[str, ...]] = {}
_python_nodes: dict[type, bool] = {}  # a custom autograd.Function's node: its context holds tensors


def describe_bytes(count: float) -> str:
    """``count`` bytes for a log line: ``"12.3 MB"``."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def _saved_attributes(node: Any) -> tuple[str, ...]:
    """The ``_saved_*`` attributes of an autograd node's type (looked up once per type)."""
    kind = type(node)
    names = _saved_names.get(kind)
    if names is None:
        names = _saved_names[kind] = tuple(n for n in dir(node) if n.startswith("_saved_"))
        _python_nodes[kind] = hasattr(node, "saved_tensors") or hasattr(node, "__dict__")
    return names


class _Walk:
    def __init__(self, torch: Any) -> None:
        self.torch = torch
        data = sys.modules.get("torch.utils.data")
        self.dataset = data.Dataset if data is not None else ()
        greenlets = sys.modules.get("greenlet")
        self.greenlet = greenlets.greenlet if greenlets is not None else ()
        self.storages: dict[tuple[str, int], int] = {}
        self.seen: set[int] = set()
        self.keep: list[Any] = []  # objects made during the walk (frame locals) keep their ids
        self.stack: list[Any] = []

    def run(self, root: Any) -> int:
        self.stack.append(root)
        while self.stack:
            obj = self.stack.pop()
            if obj is None or id(obj) in self.seen:
                continue
            self.seen.add(id(obj))
            self.keep.append(obj)
            self.visit(obj)
        return sum(self.storages.values())

    def visit(self, obj: Any) -> None:
        torch, push = self.torch, self.stack.extend
        if isinstance(obj, torch.Tensor):
            self.tensor(obj)
        elif isinstance(obj, torch.nn.Module):
            push(obj.parameters())
            push(obj.buffers())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            push(obj)
        elif isinstance(obj, dict):
            push(obj.values())
        elif isinstance(obj, types.FrameType):
            push((obj.f_locals, obj.f_back))
        elif isinstance(obj, (types.GeneratorType, types.CoroutineType)):
            push((getattr(obj, "gi_frame", None) or getattr(obj, "cr_frame", None),))
        elif self.greenlet and isinstance(obj, self.greenlet):
            push((obj.gr_frame,))
        elif self.dataset and isinstance(obj, self.dataset):
            pass
        elif hasattr(obj, "param_groups") and hasattr(obj, "state"):  # an optimiser
            push((obj.state,))
        elif type(obj).__module__.split(".")[0] == _PACKAGE and hasattr(obj, "__dict__"):
            push(vars(obj).values())

    def tensor(self, tensor: Any) -> None:
        try:
            storage = tensor.untyped_storage()
            self.storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # sparse, meta, ...: no plain storage
            pass
        if tensor.is_leaf and tensor.grad is not None:
            self.stack.append(tensor.grad)
        if tensor.grad_fn is not None:
            self.graph(tensor.grad_fn)

    def graph(self, start: Any) -> None:
        nodes = [start]
        while nodes:
            node = nodes.pop()
            if node is None or id(node) in self.seen:
                continue
            self.seen.add(id(node))
            self.keep.append(node)
            nodes.extend(next_node for next_node, _ in node.next_functions)
            for name in _saved_attributes(node):
                try:
                    value = getattr(node, name)
                except RuntimeError:  # freed by a backward already run
                    continue
                self.stack.append(value)
            if _python_nodes[type(node)]:
                try:
                    self.stack.append(node.saved_tensors)
                except (AttributeError, RuntimeError):
                    pass
                self.stack.extend(getattr(node, "__dict__", {}).values())


def live_bytes(root: Any) -> int:
    """Bytes of the distinct tensor storages ``root`` (a paused round) keeps alive; 0 when
    torch is not loaded."""
    torch = sys.modules.get("torch")
    if torch is None:
        return 0
    return _Walk(torch).run(root)


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_headroom() -> Optional[int]:
    """The cgroup's memory limit minus its usage (cgroup v2, else v1), if limited."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit = _read_int(Path("/sys/fs/cgroup") / limit_file)
        usage = _read_int(Path("/sys/fs/cgroup") / usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            return max(0, limit - usage)
    return None


def _mem_available() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_available() -> int:
    """Memory this process can still use: the smaller of the machine's ``MemAvailable``
    and its cgroup's limit minus usage; 4 GB if neither can be read."""
    known = [v for v in (_mem_available(), _cgroup_headroom()) if v is not None]
    return min(known) if known else 4 * 1000**3
