"""FedTAN for Flower: federated training whose BatchNorm uses the pooled batch of all clients.

Core (no Flower): :func:`convert_batchnorm`, :func:`validate`, :class:`SyncStep`,
:func:`pooled_backward` and the aggregation functions. Flower integration: :class:`FedTAN`
(strategy) and :class:`FedTANClient` (client), added to an existing ``ClientApp`` with
:func:`add_fedtan` or served by :func:`fedtan_client_app`. Errors: :mod:`flwr_fedtan.errors`.

Names are imported on first use, so that the server side (``flwr_fedtan.strategy``,
``flwr_fedtan.aggregation``, ``flwr_fedtan.seeds``) runs without importing torch, and a
deployment ClientApp process that only forwards messages
(:func:`flwr_fedtan.runtime.node_client_app`) imports no torch either.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

_HOMES = {
    "ClientDataError": "errors",
    "FedTANError": "errors",
    "InvalidArgumentsError": "errors",
    "ModelIssue": "errors",
    "PayloadError": "errors",
    "SecureStatsError": "errors",
    "ServerMessageError": "errors",
    "StepProtocolError": "errors",
    "UnsupportedModelError": "errors",
    "BackwardSums": "aggregation",
    "ForwardStats": "aggregation",
    "SyncPoint": "aggregation",
    "aggregate_arrays": "aggregation",
    "pool_forward_stats": "aggregation",
    "sum_backward_sums": "aggregation",
    "FedTANBatchNorm": "batchnorm",
    "convert_batchnorm": "batchnorm",
    "validate": "batchnorm",
    "FedTANClient": "client",
    "fedtan_client_app": "clientapp",
    "add_fedtan": "clientapp",
    "pooled_backward": "reference",
    "SyncStep": "step",
    "FedTAN": "strategy",
    "ClientRound": "training",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'flwr_fedtan' has no attribute {name!r}")
    value = getattr(import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))


if TYPE_CHECKING:  # for type checkers and IDEs
    from .aggregation import (  # noqa: F401
        BackwardSums, ForwardStats, SyncPoint, aggregate_arrays, pool_forward_stats, sum_backward_sums,
    )
    from .batchnorm import FedTANBatchNorm, convert_batchnorm, validate  # noqa: F401
    from .client import FedTANClient  # noqa: F401
    from .clientapp import add_fedtan, fedtan_client_app  # noqa: F401
    from .reference import pooled_backward  # noqa: F401
    from .errors import (  # noqa: F401
        ClientDataError, FedTANError, InvalidArgumentsError, ModelIssue, PayloadError, SecureStatsError,
        ServerMessageError, StepProtocolError, UnsupportedModelError,
    )
    from .step import SyncStep  # noqa: F401
    from .strategy import FedTAN  # noqa: F401
    from .training import ClientRound  # noqa: F401
