"""Server-side arithmetic of FedTAN: pure functions on NumPy arrays, no Flower, no torch.

- :func:`pool_forward_stats`: exact moments of the pooled batch from per-client moments;
- :func:`sum_backward_sums`: sums of the backward statistics over clients;
- :func:`aggregate_arrays`: model averaging weighted by examples, with BatchNorm running
  statistics combined as pooled moments and integer buffers kept integers.

Every function validates what it is given and raises :class:`PayloadError` naming the
offending client, so that a bad client can be dropped before it reaches the global model.

One job per module, all importable from here:

- :mod:`.statistics`: sync points, pooled moments and summed sums, count consistency;
- :mod:`.buffers`: BatchNorm buffers recognised by their names;
- :mod:`.model_checks`: a client's returned model checked against the global one;
- :mod:`.models`: the averaged model and the running buffers of a statistics pass.
"""

from __future__ import annotations

from .buffers import BATCHNORM_BUFFER_SUFFIXES, is_batchnorm_buffer, running_stat_keys
from .model_checks import DEFAULT_MAX_GROWTH, check_arrays, check_layout, check_magnitudes, nonfinite_culprit
from .models import aggregate_arrays, exact_running_statistics
from .statistics import (
    BackwardSums, ForwardStats, SyncPoint, check_payload, forward_count_violations, pool_forward_stats,
    sum_backward_sums, value_limit,
)

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
