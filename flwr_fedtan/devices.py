"""Whether a torch device exists on this machine, asked before any tensor is put on it
(torch's own error comes late, deep in a traceback, and names no setting)."""

from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["device_problem"]


def device_problem(device: Any) -> Optional[tuple[str, str]]:
    """``(problem, fix)`` when ``device`` cannot be used on this machine, else ``None``.

    Checks ``cpu``, ``cuda[:index]``, ``mps`` and any other backend torch exposes as
    ``torch.<type>.is_available()``; initialises no device.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        return f"not a torch device ({error})", "use 'cpu', 'cuda', 'cuda:<index>' or 'mps'"
    kind = parsed.type
    if kind == "cpu":
        return None
    if kind == "meta":
        return "the meta device holds no data", "use 'cpu' or an accelerator this machine has"
    if kind == "cuda":
        if not torch.cuda.is_available():
            return "torch finds no CUDA device on this machine", "use device 'cpu' (or run where a GPU is)"
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            return (f"this machine has {count} CUDA device{'s' if count != 1 else ''}",
                    f"use an index from 0 to {count - 1}, or 'cpu'")
        return None
    if kind == "mps":
        if not torch.backends.mps.is_available():
            return "torch finds no MPS (Apple GPU) device on this machine", "use device 'cpu'"
        return None
    backend = getattr(torch, kind, None)
    is_available = getattr(backend, "is_available", None)
    if callable(is_available) and not is_available():
        return f"torch finds no {kind} device on this machine", "use device 'cpu'"
    return None
