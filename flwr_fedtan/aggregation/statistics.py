"""Pooled BatchNorm statistics: what the server makes of the clients' payloads at a sync point.

- :func:`pool_forward_stats`: exact moments of the pooled batch from per-client moments;
- :func:`sum_backward_sums`: sums of the backward statistics over clients;
- :func:`forward_count_violations`: clients whose counts do not fit together;
- :func:`check_payload`: one client's payload checked on its own.

Pure functions on NumPy arrays; a bad payload raises :class:`PayloadError` naming its client.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence, TypeVar

import numpy as np

from ..errors import PayloadError
from ..ordering import canonical_items

ClientId = TypeVar("ClientId", bound=Hashable)
"""Whatever the caller keys clients by (node ids on the server, names in tests); kept in results."""

__all__ = [
    "ForwardStats",
    "BackwardSums",
    "SyncPoint",
    "pool_forward_stats",
    "sum_backward_sums",
    "forward_count_violations",
    "check_payload",
    "value_limit",
]


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


def check_payload(client: Hashable, payload: object, phase: str, channels: int) -> None:
    """Check one client's clear payload on its own: what :func:`pool_forward_stats` or
    :func:`sum_backward_sums` would refuse, named. For finding, after an unexpected error,
    which client's payload caused it."""
    if phase == "forward":
        pool_forward_stats({client: payload}, channels=channels)  # type: ignore[dict-item]
    else:
        sum_backward_sums({client: payload}, channels=channels)  # type: ignore[dict-item]

