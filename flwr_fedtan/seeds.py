"""Seed derivation shared by the server and the clients (NumPy only: no torch here)."""

from __future__ import annotations

import numpy as np

__all__ = ["derive_seed"]


def derive_seed(*parts: int) -> int:
    """A 31-bit seed mixed from integers (e.g. round seed, node id, step index)."""
    words = []
    for part in parts:
        part = int(part)
        words.extend([part & 0xFFFFFFFF, (part >> 32) & 0xFFFFFFFF])
    return int(np.random.SeedSequence(words).generate_state(1)[0] & 0x7FFFFFFF)
