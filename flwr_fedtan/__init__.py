"""FedTAN for Flower: federated training whose BatchNorm uses the pooled batch of all clients.

Core (no Flower): :func:`convert_batchnorm`, :class:`SyncStep`, :func:`pooled_backward`
and the aggregation functions. Flower integration: :class:`FedTAN` (strategy) and
:class:`FedTANClient` (client), added to an existing ``ClientApp`` with :func:`add_fedtan`
or served by :func:`fedtan_client_app`.
"""

from .aggregation import (
    BackwardSums,
    ForwardStats,
    PayloadError,
    SyncPoint,
    aggregate_arrays,
    pool_forward_stats,
    sum_backward_sums,
)
from .batchnorm import FedTANBatchNorm, UnsupportedModelError, convert_batchnorm
from .client import FedTANClient, add_fedtan, fedtan_client_app
from .reference import pooled_backward
from .step import StepProtocolError, SyncStep
from .strategy import FedTAN
from .training import ClientRound

__all__ = [
    "BackwardSums",
    "ClientRound",
    "FedTAN",
    "FedTANClient",
    "fedtan_client_app",
    "FedTANBatchNorm",
    "ForwardStats",
    "PayloadError",
    "StepProtocolError",
    "SyncPoint",
    "SyncStep",
    "UnsupportedModelError",
    "add_fedtan",
    "aggregate_arrays",
    "convert_batchnorm",
    "pool_forward_stats",
    "pooled_backward",
    "sum_backward_sums",
]
