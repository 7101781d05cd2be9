"""FedTAN's ClientApp over the partitions' data, faults included."""

from __future__ import annotations

from flwr.app import Context

from flwr_fedtan import FedTANClient, fedtan_client_app

from .task import fault_of, make_model, partition_data, partition_device


def client_fn(context: Context) -> FedTANClient:
    partition = int(context.node_config["partition-id"])
    fault = fault_of(str(context.run_config.get("faults", "")), partition)
    return FedTANClient(make_model(), partition_data(partition, fault), batch_size=4, lr=0.1, local_steps=1,
                        device=partition_device(fault))


app = fedtan_client_app(client_fn)
