"""Server-side arithmetic of FedTAN: pure functions on NumPy arrays, no Flower, no torch.

- :func:`pool_forward_stats`: exact moments of the pooled batch from per-client moments;
- :func:`sum_backward_sums`: sums of the backward statistics over clients;
- :func:`aggregate_arrays`: model averaging weighted by examples, with BatchNorm running
  statistics combined as pooled moments and integer buffers kept integers.

Every function validates what it is given and raises :class:`PayloadError` naming the
offending client, so that a bad client can be dropped before it reaches the global model.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence, TypeVar

import numpy as np

from .errors import PayloadError
from .ordering import canonical_items

ClientId = TypeVar("ClientId", bound=Hashable)
"""Whatever the caller keys clients by (node ids on the server, names in tests); kept in results."""

__all__ = [
    "ForwardStats",
    "BackwardSums",
    "SyncPoint",
    "pool_forward_stats",
    "sum_backward_sums",
    "aggregate_arrays",
    "check_arrays",
    "running_stat_keys",
    "is_batchnorm_buffer",
    "BATCHNORM_BUFFER_SUFFIXES",
    "forward_count_violations",
    "exact_running_statistics",
    "DEFAULT_MAX_GROWTH",
    "value_limit",
    "check_payload",
    "check_magnitudes",
    "check_layout",
    "nonfinite_culprit",
]

DEFAULT_MAX_GROWTH = 1e6
"""How far a client's returned model may reach beyond the global model it was sent: every
value within ``max_growth`` times the largest magnitude of the same array in the global
model (at least 1), ``max_growth**2`` times for running variances (see
:func:`check_magnitudes`)."""

BATCHNORM_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
"""Last name component of the buffers of ``torch.nn.BatchNorm*`` in a ``state_dict``."""


@dataclass(frozen=True)
class SyncPoint:
    """Where a synchronised step is: ``index`` counts sync points from 0.

    ``phase`` is ``"forward"`` or ``"backward"``; ``call`` is the index of the BatchNorm
    call (in forward execution order) the point belongs to; ``channels`` its width.
    """

    index: int
    phase: str
    call: int
    channels: int


@dataclass(frozen=True)
class ForwardStats:
    """Per-channel moments of one BatchNorm call's input.

    From a client: ``count`` values per channel (``m_k``), their ``mean`` and biased
    ``var``, and ``num_examples`` (``n_k``, samples in the client's batch). Pooled by the
    server: the same fields for the pooled batch (``M``, ``N``).
    """

    count: float
    num_examples: int
    mean: np.ndarray
    var: np.ndarray


@dataclass(frozen=True)
class BackwardSums:
    """Per-channel sums of ``g = dF/dy`` and ``g * x_hat`` of one BatchNorm call."""

    sum_grad: np.ndarray
    sum_grad_xhat: np.ndarray


def _check_vector(client: Hashable, name: str, value: object, channels: int) -> np.ndarray:
    """Type and shape of one client's vector; finiteness is checked over all clients at once
    (:func:`_check_finite`), as per-client NumPy calls would dominate for small layers."""
    if not isinstance(value, np.ndarray):
        raise PayloadError(client, f"{name} must be a numpy array, got {type(value).__name__}")
    if value.dtype.kind != "f":
        raise PayloadError(client, f"{name} must be floating point, got dtype {value.dtype}")
    if value.shape != (channels,):
        raise PayloadError(
            client, f"{name} has shape {value.shape}, expected ({channels},) for this layer"
        )
    return value


def _stack_checked(
    clients: Sequence[Hashable], name: str, values: Sequence[np.ndarray]
) -> np.ndarray:
    """The clients' vectors as one float64 (K, C) array, with the first client whose
    vector holds NaN or Inf named in the error."""
    stacked = np.array(values, dtype=np.float64)
    if not np.isfinite(stacked).all():
        bad = int(np.flatnonzero(~np.isfinite(stacked).all(axis=1))[0])
        raise PayloadError(clients[bad], f"{name} contains NaN or Inf")
    return stacked


def _first_width(contributions: Mapping[Hashable, object], field: str) -> int:
    if not contributions:
        raise ValueError("no contributions to aggregate")
    client, first = next(iter(contributions.items()))
    value = getattr(first, field, None)
    if not isinstance(value, np.ndarray) or value.ndim != 1:
        raise PayloadError(client, f"{field} must be a 1-D numpy array")
    return value.shape[0]


def _positive(value: object) -> float:
    """``value`` as a float if it is a finite positive number, else NaN."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")
    return number if number > 0 and number != float("inf") else float("nan")


def value_limit(reference: Mapping[str, np.ndarray]) -> float:
    """The largest magnitude an aggregate may hold: the range of the model's narrowest
    floating dtype (float32's 3.4e38 for a float32 model), float64's without float arrays.

    The clients cast the aggregates to the model's dtype; a value beyond its range would
    become Inf there."""
    limits = [float(np.finfo(a.dtype).max) for a in reference.values() if np.asarray(a).dtype.kind == "f"]
    return min(limits, default=float(np.finfo(np.float64).max))


def _out_of_range(values: Sequence[np.ndarray], limit: float) -> bool:
    return any(not (np.isfinite(v).all() and (np.abs(v) <= limit).all()) for v in values)


def _largest(clients: Sequence[Hashable], *stacks: np.ndarray) -> Hashable:
    """The client whose vectors hold the largest magnitude: the one that can push a pooled
    result out of range, since every term is bounded by its largest input."""
    magnitude = np.max([np.abs(stack).max(axis=1) for stack in stacks], axis=0)
    return clients[int(np.argmax(magnitude))]


def _outlier(clients: Sequence[Hashable], magnitudes: np.ndarray, max_growth: float | None) -> int | None:
    """Index of the client whose largest magnitude exceeds ``max_growth`` times the others'
    largest (at least 1), the biggest such; ``None`` with fewer than two clients."""
    if max_growth is None or len(clients) < 2:
        return None
    order = np.argsort(magnitudes)
    top, runner_up = int(order[-1]), float(magnitudes[order[-2]])
    return top if magnitudes[top] > max_growth * max(1.0, runner_up) else None


def _forward_parts(stats: Any) -> tuple:
    return tuple(getattr(stats, name, None) for name in ("count", "num_examples", "mean", "var"))


def _backward_parts(sums: Any) -> tuple:
    return tuple(getattr(sums, name, None) for name in ("sum_grad", "sum_grad_xhat"))


def _model_parts(contribution: Any) -> tuple:
    return tuple(contribution) if isinstance(contribution, tuple) else (contribution,)


def pool_forward_stats(
    contributions: Mapping[Hashable, ForwardStats],
    channels: int | None = None,
    limit: float | None = None,
    max_growth: float | None = None,
) -> ForwardStats:
    """Exact mean and biased variance of the pooled batch, for any counts.

    ``mu = sum m_k mean_k / M`` and ``var = sum m_k (var_k + (mean_k - mu)^2) / M``: a sum of
    non-negative terms in float64 (the parallel-variance formula), so no cancellation.

    Parameters
    ----------
    contributions : Mapping[client id, ForwardStats]
        One entry per client.
    channels : Optional[int]
        Expected number of channels; defaults to the first client's.
    limit : Optional[float]
        The largest magnitude the pooled mean and variance may reach (default: float64's
        range, see :func:`value_limit`). Finite inputs can pool to Inf (means of 1e300, or
        a mean of 1e160 whose square is the variance): the client with the largest values
        is then named.
    max_growth : Optional[float]
        With two clients or more, the largest ``|mean|`` or standard deviation of one client
        may not exceed ``max_growth`` times the other clients' largest (at least 1): a finite
        but absurd contribution is named before it steers everyone's normalisation.

    Returns
    -------
    ForwardStats
        The pooled ``count`` (M), ``num_examples`` (N), ``mean`` and ``var``.
    """
    width = channels if channels is not None else _first_width(contributions, "mean")
    clients, counts, means, variances, examples = [], [], [], [], 0
    for client, stats in canonical_items(contributions, _forward_parts):
        if not isinstance(stats, ForwardStats):
            raise PayloadError(client, f"expected forward statistics, got {type(stats).__name__}")
        count = _positive(stats.count)
        if count != count:
            raise PayloadError(client, f"count must be a positive number, got {stats.count!r}")
        num_examples = _positive(stats.num_examples)
        if num_examples != num_examples or num_examples != int(num_examples):
            raise PayloadError(
                client, f"num_examples must be a positive integer, got {stats.num_examples!r}"
            )
        clients.append(client)
        counts.append(count)
        means.append(_check_vector(client, "mean", stats.mean, width))
        variances.append(_check_vector(client, "var", stats.var, width))
        examples += int(num_examples)
    means_arr = _stack_checked(clients, "mean", means)
    vars_arr = _stack_checked(clients, "var", variances)
    if (vars_arr < 0).any():
        bad = int(np.flatnonzero((vars_arr < 0).any(axis=1))[0])
        raise PayloadError(
            clients[bad], f"var has negative entries (min {vars_arr[bad].min():.3g})"
        )
    weights = np.array(counts)[:, None]
    total = float(weights.sum())
    if not np.isfinite(total):
        culprit = clients[int(np.argmax(weights))]
        raise PayloadError(culprit, f"count {weights.max():.3g} makes the pooled count non-finite")
    magnitudes = np.maximum(np.abs(means_arr).max(axis=1), np.sqrt(vars_arr).max(axis=1))
    odd = _outlier(clients, magnitudes, max_growth)
    if odd is not None:
        raise PayloadError(
            clients[odd], f"its statistics reach {magnitudes[odd]:.3g} (largest |mean| or standard deviation), "
            f"more than {max_growth:g} times the other clients' largest (at least 1)"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        mu = (weights * means_arr).sum(axis=0) / total
        var = (weights * (vars_arr + (means_arr - mu) ** 2)).sum(axis=0) / total
    limit = float(np.finfo(np.float64).max) if limit is None else limit
    if _out_of_range([mu, var], limit):
        culprit = _largest(clients, means_arr, np.sqrt(vars_arr))
        raise PayloadError(
            culprit, f"its statistics (largest |mean| {np.abs(means_arr[clients.index(culprit)]).max():.3g}, "
            f"largest var {vars_arr[clients.index(culprit)].max():.3g}) make the pooled moments "
            f"non-finite or larger than {limit:.3g}, the model's floating-point range"
        )
    return ForwardStats(count=total, num_examples=examples, mean=mu, var=var)


def sum_backward_sums(
    contributions: Mapping[Hashable, BackwardSums],
    channels: int | None = None,
    limit: float | None = None,
    max_growth: float | None = None,
) -> BackwardSums:
    """Sum the per-channel backward statistics over clients (in float64); a sum beyond
    ``limit`` (default: float64's range) names the client with the largest values, and so
    does, with ``max_growth``, one client's largest magnitude beyond ``max_growth`` times
    the other clients' largest (at least 1)."""
    width = channels if channels is not None else _first_width(contributions, "sum_grad")
    clients, grads, grads_xhat = [], [], []
    for client, sums in canonical_items(contributions, _backward_parts):
        if not isinstance(sums, BackwardSums):
            raise PayloadError(client, f"expected backward sums, got {type(sums).__name__}")
        clients.append(client)
        grads.append(_check_vector(client, "sum_grad", sums.sum_grad, width))
        grads_xhat.append(_check_vector(client, "sum_grad_xhat", sums.sum_grad_xhat, width))
    grads_arr = _stack_checked(clients, "sum_grad", grads)
    grads_xhat_arr = _stack_checked(clients, "sum_grad_xhat", grads_xhat)
    magnitudes = np.maximum(np.abs(grads_arr).max(axis=1), np.abs(grads_xhat_arr).max(axis=1))
    odd = _outlier(clients, magnitudes, max_growth)
    if odd is not None:
        raise PayloadError(
            clients[odd], f"its backward sums reach {magnitudes[odd]:.3g}, more than {max_growth:g} times the "
            "other clients' largest (at least 1)"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        summed = BackwardSums(sum_grad=grads_arr.sum(axis=0), sum_grad_xhat=grads_xhat_arr.sum(axis=0))
    limit = float(np.finfo(np.float64).max) if limit is None else limit
    if _out_of_range([summed.sum_grad, summed.sum_grad_xhat], limit):
        culprit = _largest(clients, grads_arr, grads_xhat_arr)
        row = clients.index(culprit)
        largest = max(np.abs(grads_arr[row]).max(), np.abs(grads_xhat_arr[row]).max())
        raise PayloadError(
            culprit, f"its backward sums (largest magnitude {largest:.3g}) make the summed aggregate "
            f"non-finite or larger than {limit:.3g}, the model's floating-point range"
        )
    return summed


def is_batchnorm_buffer(key: str) -> bool:
    """Whether a ``state_dict`` key names a BatchNorm buffer (``running_mean``,
    ``running_var`` or ``num_batches_tracked``, as ``torch.nn.BatchNorm*`` and
    ``FedTANBatchNorm`` name them). These take the pooled aggregate, never an optimiser."""
    return key.rsplit(".", 1)[-1] in BATCHNORM_BUFFER_SUFFIXES


def forward_count_violations(
    contributions: Mapping[ClientId, ForwardStats],
    step_examples: Mapping[ClientId, int],
    uniform_positions: bool = True,
) -> dict[ClientId, str]:
    """Clients whose forward counts are inconsistent, with the reason.

    A client's statistics weigh ``count`` (``m_k``) in the pooled moments and its model
    weighs ``num_examples`` (``n_k``) in the average; both are its own claims. They must fit
    together: ``count`` is ``n_k`` times the layer's values per example (spatial positions),
    and ``n_k`` is the same at every BatchNorm call of one step.

    Parameters
    ----------
    contributions : Mapping[client id, ForwardStats]
        One sync point's forward payloads (other payload types are left to
        :func:`pool_forward_stats` to reject).
    step_examples : Mapping[client id, int]
        ``num_examples`` each client reported at the step's first forward call (empty at
        the first call).
    uniform_positions : bool
        Also require every client's values per example to equal the others' (the same input
        size); the value most clients report wins, ties going to the smallest (inflating a
        count raises it).

    Returns
    -------
    dict[client id, str]
        The offending clients and why; empty if all are consistent.
    """
    violations: dict[ClientId, str] = {}
    positions: dict[ClientId, int] = {}
    for client, stats in contributions.items():
        if not isinstance(stats, ForwardStats):
            continue
        examples, count = stats.num_examples, _positive(stats.count)
        if not isinstance(examples, (int, np.integer)) or examples <= 0 or count != count:
            continue  # malformed: pool_forward_stats names it
        expected = step_examples.get(client)
        if expected is not None and examples != expected:
            violations[client] = (
                f"num-examples {examples} at this BatchNorm call but {expected} at the step's first call"
            )
            continue
        per_example = count / examples
        if per_example < 1 or per_example != int(per_example):
            violations[client] = (
                f"count {stats.count:g} is not a whole multiple of num-examples {examples} "
                "(values per example at this BatchNorm call)"
            )
            continue
        positions[client] = int(per_example)
    if uniform_positions and positions:
        tally = Counter(positions.values())
        agreed = min(tally, key=lambda p: (-tally[p], p))
        for client, value in positions.items():
            if value != agreed:
                violations[client] = (
                    f"count {contributions[client].count:g} means {value} values per example at this "
                    f"BatchNorm call, the others have {agreed}; counts inconsistent with the input size "
                    "(FedTAN(uniform_positions=False) if the clients' inputs legitimately differ in size)"
                )
    return violations


def running_stat_keys(keys: Sequence[str]) -> dict[str, str]:
    """Map each ``<prefix>.running_mean`` key to its ``<prefix>.running_var`` partner.

    BatchNorm layers are recognised by their ``state_dict`` naming alone, so the server
    needs no knowledge of the model.
    """
    key_set = set(keys)
    pairs = {}
    for key in keys:
        if key == "running_mean" or key.endswith(".running_mean"):
            partner = key[: -len("running_mean")] + "running_var"
            if partner in key_set:
                pairs[key] = partner
    return pairs


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


def check_payload(client: Hashable, payload: object, phase: str, channels: int) -> None:
    """Check one client's clear payload on its own: what :func:`pool_forward_stats` or
    :func:`sum_backward_sums` would refuse, named. For finding, after an unexpected error,
    which client's payload caused it."""
    if phase == "forward":
        pool_forward_stats({client: payload}, channels=channels)  # type: ignore[dict-item]
    else:
        sum_backward_sums({client: payload}, channels=channels)  # type: ignore[dict-item]


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
