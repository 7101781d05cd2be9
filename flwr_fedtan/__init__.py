"""FedTAN for Flower: federated training whose BatchNorm uses the pooled batch of all clients.

Core (no Flower): :func:`convert_batchnorm`, :class:`SyncStep`, :func:`pooled_backward`
and the aggregation functions. Flower integration: :class:`FedTAN` (strategy) and
:class:`FedTANClient` (client).

Names are imported on first use (PEP 562): a deployment ClientApp process that only
forwards messages (:func:`flwr_fedtan.runtime.node_client_app`) imports
``flwr_fedtan.runtime`` without importing torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BackwardSums": "aggregation",
    "ForwardStats": "aggregation",
    "PayloadError": "aggregation",
    "SyncPoint": "aggregation",
    "aggregate_arrays": "aggregation",
    "pool_forward_stats": "aggregation",
    "sum_backward_sums": "aggregation",
    "FedTANBatchNorm": "batchnorm",
    "UnsupportedModelError": "batchnorm",
    "convert_batchnorm": "batchnorm",
    "FedTANClient": "client",
    "fedtan_client_app": "client",
    "pooled_backward": "reference",
    "StepProtocolError": "step",
    "SyncStep": "step",
    "FedTAN": "strategy",
    "ClientRound": "training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flwr_fedtan' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
