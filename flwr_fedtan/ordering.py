"""The order in which the server adds up its clients' contributions.

Floating-point addition is not associative: the same contributions summed in another order
can differ in the last bits, and those bits grow over a run. Flower draws node ids at random
in every ``flwr run`` (and replies arrive in any order), so ordering by node id or by
arrival makes two runs of the same seed differ. Every reduction of the server (pooled
statistics, backward sums, BatchNorm buffers, the replies the wrapped strategy averages)
takes its contributions in *canonical order* instead: sorted by their content (the bytes of
a sync point's statistics, a digest of a model's arrays).
The result then depends only on what the clients sent, not on who sent it or when, so a
deployment operator has nothing to set. Identical contributions tie, and their order does
not change the sum.

NumPy only: no torch, no Flower.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

__all__ = ["canonical_items", "canonical_permutation", "content_digest"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def content_digest(parts: Iterable[Any]) -> bytes:
    """A BLAKE2 digest of ``parts``: arrays by dtype, shape and bytes; anything else by its type and
    ``repr`` (numbers, strings, ``None``); mappings by sorted key, sequences in order."""
    digest = hashlib.blake2b(digest_size=16)
    _update(digest, list(parts))
    return digest.digest()


def _update(digest: Any, part: Any) -> None:
    if isinstance(part, np.ndarray):
        digest.update(f"a|{part.dtype.str}|{part.shape}|".encode())
        digest.update(part.tobytes())  # C order whatever the strides
    elif isinstance(part, Mapping):
        digest.update(f"m|{len(part)}|".encode())
        for key in sorted(part, key=repr):
            digest.update(f"{key!r}=".encode())
            _update(digest, part[key])
    elif isinstance(part, (list, tuple)):
        digest.update(f"s|{len(part)}|".encode())
        for item in part:
            _update(digest, item)
    else:
        digest.update(f"v|{type(part).__name__}|{part!r}|".encode())


def canonical_permutation(contents: Sequence[Iterable[Any]]) -> list[int]:
    """Indices of ``contents`` sorted by their content (stable for equal content)."""
    keys = [_sort_key(parts) for parts in contents]
    return sorted(range(len(keys)), key=keys.__getitem__)


def _sort_key(parts: Iterable[Any]) -> bytes:
    """Flat arrays and numbers (a sync point's statistics: small, on the step's path) sort by
    their bytes directly; anything else (a model's arrays) by its :func:`content_digest`."""
    parts = list(parts)
    if all(isinstance(p, (np.ndarray, int, float)) for p in parts):
        return b"|".join(p.dtype.str.encode() + p.tobytes() if isinstance(p, np.ndarray) else repr(p).encode()
                         for p in parts)
    return content_digest(parts)


def canonical_items(mapping: Mapping[K, V], content: Callable[[V], Iterable[Any]]) -> list[tuple[K, V]]:
    """``mapping``'s items in canonical order: by ``content(value)``
    (:func:`canonical_permutation`); the keys (client ids) play no part."""
    items = list(mapping.items())
    if len(items) < 2:
        return items
    return [items[i] for i in canonical_permutation([content(value) for _, value in items])]
