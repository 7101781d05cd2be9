"""FedTAN once ``nodes`` nodes are connected."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from flwr_fedtan import FedTAN, convert_batchnorm

from .task import make_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = FedTAN(fraction_evaluate=0.0, min_available_nodes=int(context.run_config["nodes"]),
                      exchange_timeout=60.0)
    strategy.start(grid, ArrayRecord(convert_batchnorm(make_model()).state_dict()),
                   num_rounds=int(context.run_config["num-server-rounds"]))
