"""Checks of a client's returned model against the global model it was sent: layout, dtypes
and finiteness (:func:`check_arrays`), magnitudes (:func:`check_magnitudes`), and which
client pushed an aggregate out of range (:func:`nonfinite_culprit`).

Pure functions on NumPy arrays; a bad model raises :class:`PayloadError` naming its client.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np

from ..errors import PayloadError
from .buffers import running_stat_keys
from .statistics import ClientId

__all__ = ["DEFAULT_MAX_GROWTH", "check_layout", "check_arrays", "check_magnitudes", "nonfinite_culprit"]

DEFAULT_MAX_GROWTH = 1e6
"""How far a client's returned model may reach beyond the global model it was sent: every
value within ``max_growth`` times the largest magnitude of the same array in the global
model (at least 1), ``max_growth**2`` times for running variances (see
:func:`check_magnitudes`)."""


def check_layout(
    client: Hashable, shapes: Mapping[str, Sequence[int]], reference: Mapping[str, np.ndarray]
) -> None:
    """The keys and shapes of a client's model against the global one, from what its arrays
    declare, before any of them is decoded.

    Raises
    ------
    PayloadError
        Naming ``client``: missing or unexpected keys, or a shape that differs.
    """
    missing = set(reference) - set(shapes)
    extra = set(shapes) - set(reference)
    if missing or extra:
        raise PayloadError(
            client,
            f"arrays do not match the global model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(extra)[:5]}",
        )
    for key, ref in reference.items():
        if tuple(shapes[key]) != tuple(np.shape(ref)):
            raise PayloadError(client, f"{key} has shape {tuple(shapes[key])}, expected {tuple(np.shape(ref))}")


def check_arrays(
    client: Hashable,
    arrays: Mapping[str, np.ndarray],
    num_examples: object,
    reference: Mapping[str, np.ndarray],
) -> float:
    """Validate one client's model against the global one; return its weight.

    Raises
    ------
    PayloadError
        Naming ``client``: keys, shapes or dtypes differ from ``reference``, values are
        not finite, a BatchNorm running variance is negative, or the weight is not a
        positive number.
    """
    try:
        weight = float(num_examples)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PayloadError(client, f"num_examples is not a number: {num_examples!r}") from None
    if not np.isfinite(weight) or weight <= 0:
        raise PayloadError(client, f"num_examples must be positive, got {num_examples}")
    check_layout(client, {key: np.shape(value) for key, value in arrays.items()}, reference)
    for key, ref in reference.items():
        value = arrays[key]
        if not isinstance(value, np.ndarray):
            raise PayloadError(client, f"{key} is a {type(value).__name__}, not an array")
        if value.shape != ref.shape or value.dtype != ref.dtype:
            raise PayloadError(
                client,
                f"{key} has shape {value.shape} and dtype {value.dtype}, expected "
                f"{ref.shape} and {ref.dtype}",
            )
        if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
            raise PayloadError(client, f"{key} contains NaN or Inf")
    for var_key in running_stat_keys(list(reference)).values():
        if np.any(arrays[var_key] < 0):
            raise PayloadError(client, f"{var_key} has negative entries")
    return weight


def _magnitude_limit(key: str, reference: np.ndarray, max_growth: float) -> float:
    """The largest magnitude a client may return for ``key``: ``max_growth`` times the
    global array's largest magnitude (at least 1); squared growth for a running variance
    (a variance scales as the square of the values). Capped so that any average of such
    values stays finite in the array's dtype (a running mean's spread is squared into the
    pooled variance, hence its square-root cap)."""
    ref = np.asarray(reference)
    scale = max(1.0, float(np.abs(ref.astype(np.float64)).max())) if ref.size else 1.0
    is_var = key == "running_var" or key.endswith(".running_var")
    is_mean = key == "running_mean" or key.endswith(".running_mean")
    limit = scale * max_growth * (max_growth if is_var else 1.0)  # float products saturate to inf
    if ref.dtype.kind == "f":
        top = float(np.finfo(ref.dtype).max)
        cap = np.sqrt(top) / 4 if is_mean else top / 4
    elif ref.dtype.kind in "iu":
        cap = float(np.iinfo(ref.dtype).max) / 4
    else:
        cap = float("inf")
    return min(limit, cap)


def check_magnitudes(
    client: Hashable,
    arrays: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    max_growth: float = DEFAULT_MAX_GROWTH,
) -> None:
    """Bound one client's returned model by the global model the server sent.

    A finite but huge value (a running mean of 1e160, whose square makes the pooled running
    variance Inf; 2e19 is enough in float32) would poison the average for good. Every value
    must stay within ``max_growth`` times the largest magnitude of the same array in the
    global model (at least 1; ``max_growth**2`` for running variances), and within a
    quarter of its dtype's range (the square root of it for running means).

    Raises
    ------
    PayloadError
        Naming ``client`` and the array, its largest magnitude and the limit.
    """
    for key, ref in reference.items():
        value = np.asarray(arrays[key])
        if value.dtype.kind not in "fiu" or not value.size:
            continue
        largest = float(np.abs(value.astype(np.float64)).max())
        limit = _magnitude_limit(key, ref, max_growth)
        if not largest <= limit:
            raise PayloadError(
                client,
                f"{key} reaches {largest:.3g}, beyond its limit {limit:.3g} ({max_growth:g} times the global "
                "model's largest value in that array, or the dtype's safe range); if honest training "
                "legitimately grows values that fast, raise FedTAN(max_growth=...)",
            )


def nonfinite_culprit(
    aggregated: Mapping[str, np.ndarray],
    contributions: Mapping[ClientId, tuple[Mapping[str, np.ndarray], float]],
) -> tuple[str, ClientId | None] | None:
    """``(key, client)`` if an aggregated floating array holds NaN or Inf: the first such
    array and the client that returned the largest magnitude in it (the one that can push
    an average out of range). ``None`` if the aggregate is finite."""
    for key, value in aggregated.items():
        value = np.asarray(value)
        if value.dtype.kind not in "fc" or np.isfinite(value).all():
            continue
        largest = {
            client: float(np.abs(np.asarray(arrays[key], dtype=np.float64)).max(initial=0.0))
            for client, (arrays, _) in contributions.items()
            if key in arrays
        }
        if not largest:
            return key, None
        return key, max(largest, key=lambda c: largest[c])
    return None
