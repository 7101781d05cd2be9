"""Fixed point in the ring of integers modulo ``2**128``: what a masked payload is made of.

A ring vector of length ``n`` is a ``(2, n)`` uint64 array, row 0 the low limb and row 1
the high one (two's complement). The bound and the resolution of the encoding are in the
package docstring (:mod:`flwr_fedtan.secure`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..errors import CanaryMismatchError, FixedPointOverflowError

__all__ = ["RING_BITS", "DEFAULT_FRACTIONAL_BITS", "ring_sum", "value_bound", "encode_fixed_point",
           "decode_fixed_point", "unmask_sum"]

RING_BITS = 128
DEFAULT_FRACTIONAL_BITS = 64
_HEADROOM_BITS = 126  # |decoded sum| < 2**126: one spare bit below the sign bit
_U64 = np.uint64
_TWO_64 = 2.0**64
_TWO_63 = 2.0**63


# NumPy's uint64 array arithmetic wraps modulo 2**64; carries are propagated by hand.


def _ring_add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    low = a[0] + b[0]
    carry = (low < a[0]).astype(_U64)
    return np.stack([low, a[1] + b[1] + carry])


def _ring_neg(a: np.ndarray) -> np.ndarray:
    low = ~a[0] + _U64(1)
    carry = (a[0] == 0).astype(_U64)
    return np.stack([low, ~a[1] + carry])


def ring_sum(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """Sum of ring vectors modulo ``2**128``."""
    total = vectors[0].copy()
    for vector in vectors[1:]:
        total = _ring_add(total, vector)
    return total


def value_bound(num_clients: int, fractional_bits: int = DEFAULT_FRACTIONAL_BITS) -> float:
    """The largest magnitude a client may encode: ``2**(126 - fractional_bits) / num_clients``
    (exclusive). ``2**62 / K``, about ``4.6e18 / K``, by default."""
    return math.ldexp(1.0, _HEADROOM_BITS - fractional_bits) / max(1, int(num_clients))


def _check_fractional_bits(fractional_bits: int) -> int:
    if not isinstance(fractional_bits, int) or not 8 <= fractional_bits <= 110:
        raise ValueError(f"fractional_bits must be an int in [8, 110], got {fractional_bits!r}")
    return fractional_bits


def encode_fixed_point(
    values: np.ndarray,
    num_clients: int,
    fractional_bits: int = DEFAULT_FRACTIONAL_BITS,
    where: str = "payload",
) -> np.ndarray:
    """Encode float64 values as ``round(v * 2**fractional_bits)`` in the ring ``Z_2^128``.

    Parameters
    ----------
    values : np.ndarray
        1-D floating values.
    num_clients : int
        ``K``, how many payloads will be summed: the bound below shrinks with it.
    fractional_bits : int (default: 64)
        The scale is ``2**fractional_bits``.
    where : str
        Names the payload in errors (e.g. the sync point).

    Returns
    -------
    np.ndarray
        ``(2, n)`` uint64: low and high limbs.

    Raises
    ------
    FixedPointOverflowError
        A value is NaN, Inf, or ``|v| >= 2**(126 - fractional_bits) / num_clients``.
    """
    _check_fractional_bits(fractional_bits)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise FixedPointOverflowError(f"{where}: entry {bad} is {values[bad]}; only finite values can be summed")
    bound = value_bound(num_clients, fractional_bits)
    too_big = np.abs(values) >= bound
    if too_big.any():
        bad = int(np.flatnonzero(too_big)[0])
        raise FixedPointOverflowError(
            f"{where}: entry {bad} = {values[bad]:.6g} exceeds the fixed-point bound {bound:.3g} "
            f"(2**{_HEADROOM_BITS - fractional_bits} / {num_clients} clients); lower fractional_bits "
            "or check the model for diverging activations or gradients"
        )
    magnitude = np.abs(np.rint(np.ldexp(values, fractional_bits)))  # exact integers < 2**126
    high = np.floor(magnitude / _TWO_64)
    low = magnitude - high * _TWO_64  # exact: the bits of `magnitude` below 2**64
    upper_half = low >= _TWO_63
    low_limb = (low - np.where(upper_half, _TWO_63, 0.0)).astype(_U64) + upper_half.astype(_U64) * _U64(1 << 63)
    encoded = np.stack([low_limb, high.astype(_U64)])
    negative = values < 0
    if negative.any():
        encoded[:, negative] = _ring_neg(encoded[:, negative])
    return encoded


def decode_fixed_point(
    ring: np.ndarray, fractional_bits: int = DEFAULT_FRACTIONAL_BITS, where: str = "sum"
) -> np.ndarray:
    """Decode ring elements (two's complement) to float64: the inverse of
    :func:`encode_fixed_point`, rounding to the nearest float64.

    Raises
    ------
    FixedPointOverflowError
        An element is ``>= 2**126`` in magnitude: no sum of in-range payloads gets there, so
        the masks did not cancel or a payload was corrupt.
    """
    _check_fractional_bits(fractional_bits)
    negative = ring[1] >= _U64(1 << 63)
    magnitude = ring.copy()
    if negative.any():
        magnitude[:, negative] = _ring_neg(ring[:, negative])
    out_of_range = magnitude[1] >= _U64(1 << (_HEADROOM_BITS - 64))
    if out_of_range.any():
        bad = int(np.flatnonzero(out_of_range)[0])
        raise FixedPointOverflowError(
            f"{where}: decoded entry {bad} is beyond the headroom 2**{_HEADROOM_BITS} of the ring "
            "(a client exceeded the fixed-point bound, or the masks did not cancel)"
        )
    value = magnitude[1].astype(np.float64) * _TWO_64 + magnitude[0].astype(np.float64)
    return np.ldexp(np.where(negative, -value, value), -fractional_bits)


def unmask_sum(masked: Sequence[np.ndarray], node_ids: Sequence[int], fractional_bits: int, where: str) -> np.ndarray:
    """The decoded sum of the roster's masked payloads, their last entry (the canary, whose
    masks alone must cancel) checked and dropped; :class:`CanaryMismatchError` if it is not 0."""
    total = ring_sum(list(masked))
    if total[0, -1] != 0 or total[1, -1] != 0:
        raise CanaryMismatchError(
            f"{where}: the masks of nodes {list(node_ids)} did not cancel; some client used another key, "
            "round, attempt or exchange index (a stale or replayed payload?)"
        )
    return decode_fixed_point(total[:, :-1], fractional_bits, where)
