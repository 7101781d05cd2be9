"""The app's ClientApp: one FedTANClient per node, serving FedTAN and FedAvg messages."""

from __future__ import annotations

from flwr.app import Context

from flwr_fedtan import FedTANClient, fedtan_client_app

from .task import make_client


def client_fn(context: Context) -> FedTANClient:
    """Build the node's client from the run config and the node's partition."""
    return make_client(context.run_config, context.node_config)


app = fedtan_client_app(client_fn)
