"""The app's ClientApp: one app for every method of the run-config key ``strategy``.

- ``train.fedtan`` (FedTAN's rounds): the handler :func:`flwr_fedtan.add_fedtan` adds;
- ``fedtan`` and ``fedavg``: ``train`` and ``evaluate`` of
  :func:`flwr_fedtan.fedtan_client_app` (FedTAN's batch sampling and metric names);
- ``fedbn``, ``silobn``, ``fixbn``, ``fedgn``, ``centralised``: ``train`` and ``evaluate``
  are served by :mod:`simulations.app.baselines` (local BatchNorm entries in
  ``context.state``, frozen statistics, GroupNorm model, pooled data);
- Flower's legacy FedAvg, clear or under SecAgg+ (run-config ``mode`` ``legacy-*``): its
  ``train`` messages are served by :mod:`simulations.app.secaggplus`.
"""

from __future__ import annotations

import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from flwr_fedtan import FedTANClient, add_fedtan, fedtan_client_app
from flwr_fedtan.client import _client_from

from . import baselines, secaggplus
from .task import make_client


def client_fn(context: Context) -> FedTANClient:
    """Build the node's client from the run config and the node's partition, in a process
    running ``torch-threads`` intra-op threads (the same count everywhere: the runs repeat
    bit for bit, see docs/reproducibility.md)."""
    threads = int(context.run_config.get("torch-threads", 0))
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if "strategy" in context.run_config:
        return baselines.make_method_client(context.run_config, context.node_config)
    return make_client(context.run_config, context.node_config)


fedtan_app = fedtan_client_app(client_fn)
"""FedTAN's own ClientApp, whose ``train`` and ``evaluate`` serve FedTAN and FedAvg runs."""

app = ClientApp()
add_fedtan(app, client_fn)  # train.fedtan: FedTAN's rounds


def _served_by_baselines(context: Context) -> bool:
    return "strategy" in context.run_config and baselines.method_spec(context.run_config).baseline_client


def _node_client(context: Context) -> FedTANClient:
    """The node's client; an error building it names the node, as FedTAN's handlers do."""
    return _client_from(client_fn, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training of a round, for the method of ``context.run_config["strategy"]``, or
    for Flower's legacy workflows (:mod:`simulations.app.secaggplus`)."""
    if secaggplus.is_legacy_message(msg):
        return secaggplus.serve(msg, context)
    if _served_by_baselines(context):
        return baselines.client_train(msg, context, _node_client(context))
    return fedtan_app(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluation: personalised models for FedBN/SiloBN, else FedTAN's client's evaluate."""
    if _served_by_baselines(context):
        return baselines.client_evaluate(msg, context, _node_client(context))
    return fedtan_app(msg, context)


@app.query("ping")
def ping(msg: Message, context: Context) -> Message:
    """An empty reply: the bare cost of one exchange (simulations/bench_flower.py)."""
    return Message(RecordDict(), reply_to=msg)
