"""Seed derivation shared by the server and the clients (NumPy only: no torch here).

The server sends its run seed; each client derives the seed of a round's batches, or of a
statistics pass's examples, from it, the round and the attempt (restart number), and then
mixes in its own key (its partition or node id)."""

from __future__ import annotations

import numpy as np

__all__ = ["derive_seed", "pass_seed", "round_seed"]

_PASS_SEED_TAG = 0x57A7  # keeps the pass's example draws apart from the round's batches


def derive_seed(*parts: int) -> int:
    """A 31-bit seed mixed from integers (e.g. round seed, node id, step index)."""
    words = []
    for part in parts:
        part = int(part)
        words.extend([part & 0xFFFFFFFF, (part >> 32) & 0xFFFFFFFF])
    return int(np.random.SeedSequence(words).generate_state(1)[0] & 0x7FFFFFFF)


def round_seed(run_seed: int, server_round: int, attempt: int = 0) -> int:
    """The seed of an attempt of a round, before a client mixes in its own key."""
    return derive_seed(run_seed, server_round, attempt)


def pass_seed(run_seed: int, server_round: int, attempt: int = 0) -> int:
    """The seed of a statistics pass's attempt (which examples the clients forward), before
    a client mixes in its own key."""
    return derive_seed(run_seed, server_round, attempt, _PASS_SEED_TAG)
