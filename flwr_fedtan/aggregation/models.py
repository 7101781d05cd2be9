"""The global model's new arrays: the clients' models averaged, BatchNorm-aware
(:func:`aggregate_arrays`), and the running buffers a statistics pass gives
(:func:`exact_running_statistics`). Integer buffers stay integers.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..ordering import canonical_items
from .buffers import running_stat_keys
from .model_checks import check_arrays
from .statistics import ClientId, ForwardStats

__all__ = ["aggregate_arrays", "exact_running_statistics"]


def _model_parts(contribution: Any) -> tuple:
    return tuple(contribution) if isinstance(contribution, tuple) else (contribution,)


def aggregate_arrays(
    contributions: Mapping[ClientId, tuple[Mapping[str, np.ndarray], float]],
    reference: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Average models weighted by examples, BatchNorm-aware.

    - floating arrays: ``sum w_k a_k`` with ``w_k = n_k / sum n``;
    - BatchNorm running statistics (``running_mean``/``running_var`` pairs): pooled
      moments, ``mean = sum w_k mean_k``, ``var = sum w_k (var_k + (mean_k - mean)^2)``;
    - integer arrays (``num_batches_tracked``): weighted mean rounded to the nearest
      integer, dtype kept.

    Parameters
    ----------
    contributions : Mapping[client id, (arrays, num_examples)]
        Each client's arrays by name and its weight.
    reference : Optional[Mapping[str, np.ndarray]]
        The arrays sent out (the global model): every client must return exactly these
        keys, shapes and dtypes. Defaults to the first client's.

    Returns
    -------
    dict[str, np.ndarray]
        The aggregated arrays, keyed and typed as ``reference``.
    """
    if not contributions:
        raise ValueError("no contributions to aggregate")
    if reference is None:
        reference = next(iter(contributions.values()))[0]
    contributions = dict(canonical_items(contributions, _model_parts))
    weights = {
        client: check_arrays(client, arrays, num_examples, reference)
        for client, (arrays, num_examples) in contributions.items()
    }
    total = sum(weights.values())
    share = {client: w / total for client, w in weights.items()}

    def weighted(key: str) -> np.ndarray:
        parts = (share[c] * arrays[key].astype(np.float64) for c, (arrays, _) in contributions.items())
        return sum(parts)  # type: ignore[return-value]  # arrays: contributions is never empty

    result: dict[str, np.ndarray] = {}
    stat_pairs = running_stat_keys(list(reference))
    var_keys = set(stat_pairs.values())
    for key, ref in reference.items():
        if key in var_keys:
            continue
        if key in stat_pairs:
            var_key = stat_pairs[key]
            mean = weighted(key)
            var = sum(
                share[c] * (arrays[var_key].astype(np.float64) + (arrays[key].astype(np.float64) - mean) ** 2)
                for c, (arrays, _) in contributions.items()
            )
            result[key] = mean.astype(ref.dtype)
            result[var_key] = var.astype(reference[var_key].dtype)
        elif ref.dtype.kind in "iub":
            result[key] = np.rint(weighted(key)).astype(ref.dtype)
        else:
            result[key] = weighted(key).astype(ref.dtype)
    return {key: np.asarray(result[key], dtype=reference[key].dtype) for key in reference}


def exact_running_statistics(
    pooled: Sequence[ForwardStats],
    buffer_calls: Mapping[str, tuple[str, Sequence[int]]],
    reference: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """The BatchNorm running buffers a statistics pass gives the global model.

    ``pooled[i]`` is the pooled statistics of BatchNorm call ``i`` of the pass;
    ``buffer_calls`` says which calls fed which buffer (``{key: ("mean" | "var", [calls])}``,
    :attr:`flwr_fedtan.statistics_pass.StatisticsPass.buffer_calls`). A ``running_mean``
    becomes the mean over its calls of the pooled means, a ``running_var`` the mean of the
    pooled variances unbiased with the pooled count, ``var * M / (M - 1)``: precise-BN
    (cumulative average from reset buffers) on the union of the clients' examples.

    Returns
    -------
    dict[str, np.ndarray]
        The new buffers, typed as ``reference``.

    Raises
    ------
    ValueError
        A key that ``reference`` lacks, a call index out of range, a width that does not
        match the buffer, a pooled count of 1 for a variance, or a non-finite or negative
        result: nothing partial is returned.
    """
    out: dict[str, np.ndarray] = {}
    for key, entry in buffer_calls.items():
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise ValueError(f"buffer {key!r}: expected (kind, calls), got {entry!r}")
        kind, calls = entry
        if key not in reference:
            raise ValueError(f"buffer {key!r} is not an array of the global model")
        if kind not in ("mean", "var"):
            raise ValueError(f"buffer {key!r}: kind must be 'mean' or 'var', got {kind!r}")
        if not calls or any(not isinstance(c, (int, np.integer)) or not 0 <= c < len(pooled) for c in calls):
            raise ValueError(f"buffer {key!r}: call indices {list(calls)[:5]} outside 0..{len(pooled) - 1}")
        ref = reference[key]
        values = []
        for call in calls:
            stats = pooled[int(call)]
            if np.shape(stats.mean) != ref.shape:
                raise ValueError(f"buffer {key!r} has shape {ref.shape}, BatchNorm call {call} {np.shape(stats.mean)}")
            if kind == "mean":
                values.append(np.asarray(stats.mean, dtype=np.float64))
            else:
                if not stats.count > 1:
                    raise ValueError(f"buffer {key!r}: BatchNorm call {call} pooled {stats.count} values per channel")
                values.append(np.asarray(stats.var, dtype=np.float64) * (stats.count / (stats.count - 1)))
        with np.errstate(over="ignore", invalid="ignore"):
            value = np.mean(values, axis=0).astype(ref.dtype)
        if not np.isfinite(value).all() or (kind == "var" and (value < 0).any()):
            raise ValueError(
                f"buffer {key!r}: the pooled statistics give non-finite or negative values in {ref.dtype}"
            )
        out[key] = value
    return out
