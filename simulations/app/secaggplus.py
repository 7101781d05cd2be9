"""Flower's SecAgg+ on a legacy FedAvg app: the baseline of FedTAN's secure rounds (issue 28).

Flower's secure aggregation (``SecAggPlusWorkflow`` and ``secaggplus_mod``) runs only in
the legacy API: a ``LegacyContext`` with a legacy strategy, run by ``DefaultWorkflow``, and
a ClientApp built from a ``client_fn`` with ``mods=[secaggplus_mod]``. This module is that
app for this project's model and data:

- ServerApp side, run-config ``mode``: ``legacy-fedavg`` runs Flower's legacy
  ``FedAvg`` through ``DefaultWorkflow`` in the clear, ``legacy-secaggplus`` the same with
  ``fit_workflow=SecAggPlusWorkflow(...)`` (:func:`run_legacy_fedavg`); both for
  ``num-server-rounds`` rounds, with the run config's ``model``, ``dataset`` and
  ``local-steps``, every node training every round (``flwr run . --run-config
  'mode="legacy-secaggplus"'``).
- ClientApp side: the legacy messages (a ``fitins.config`` record, or SecAgg+'s
  ``secaggplus`` record) reach :func:`serve` from the app's ``train`` handler
  (:mod:`simulations.app.client_app`); each node's client is the app's
  :class:`~flwr_fedtan.FedTANClient`, a ``NumPyClient`` whose ``fit`` is ordinary local
  training, so the two apps train the same model on the same batches.

SecAgg+'s parameters (:func:`secaggplus_workflow`): ``num_shares=1.0`` (every sampled
client is every other's neighbour, the same pairs FedTAN masks with) and
``reconstruction_threshold = N // 2 + 1`` (a majority of the N clients must answer the
unmask stage: fewer than half may drop, and no minority can reconstruct a secret);
Flower's defaults for the rest (values clipped to [-8, 8], quantised to 2^22 levels,
masks mod 2^32), except ``max_weight``: 1000, or ``batch-size`` x ``local-steps`` (a
client's examples in a round) if larger.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from flwr_fedtan.grids import ForwardingGrid
from flwr_fedtan.protocol.wire import record_bytes

__all__ = ["ExchangeRecorder", "LEGACY_MODES", "LegacyRun", "is_legacy_message", "message_bytes", "run_legacy",
           "run_legacy_fedavg", "secaggplus_workflow", "serve"]

LEGACY_MODES = ("legacy-fedavg", "legacy-secaggplus")
"""Values of the run-config key ``mode`` that run this app: clear, and with SecAgg+."""

_LEGACY_FIT_CONFIG = "fitins.config"  # the config record of a legacy FitIns message


# ---------------------------------------------------------------------- ClientApp side
def _legacy_client(context: Context):
    from .client_app import client_fn  # the app's ClientApp dispatches here: import late

    return client_fn(context).to_client()


clear_client_app = ClientApp(client_fn=_legacy_client)
"""Legacy FedAvg in the clear: ``fit`` on the node's client."""

secaggplus_client_app = ClientApp(client_fn=_legacy_client, mods=[secaggplus_mod])
"""Legacy FedAvg under SecAgg+: Flower's mod runs the protocol's stages around ``fit``."""


def is_legacy_message(msg: Message) -> bool:
    """A ``train`` message of the legacy workflows (clear or SecAgg+), not of the message API."""
    records = msg.content.config_records
    return RECORD_KEY_CONFIGS in records or _LEGACY_FIT_CONFIG in records


def serve(msg: Message, context: Context) -> Message:
    """Answer a legacy ``train`` message: SecAgg+'s stages through its mod, else plain ``fit``."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_client_app(msg, context)
    return clear_client_app(msg, context)


# ---------------------------------------------------------------------- ServerApp side
def message_bytes(content: RecordDict) -> int:
    """Bytes of a message's records, as Flower's ``count_bytes`` (and FedTAN's ledger,
    :func:`flwr_fedtan.protocol.wire.record_bytes`) count them, except that an empty list in
    a ``ConfigRecord`` (SecAgg+ sends some) counts its key only where Flower's count fails."""
    total = 0
    for record in content.values():
        if isinstance(record, ConfigRecord):
            total += sum(_config_item_bytes(k, v) for k, v in record.items())
        else:
            total += record_bytes(RecordDict({"record": record}))
    return total


def _config_item_bytes(key: str, value: Any) -> int:
    if isinstance(value, list) and not value:
        return len(key)
    return ConfigRecord({key: value}).count_bytes()


class ExchangeRecorder(ForwardingGrid):
    """A Grid that forwards everything and records each batch of messages it pushes (one
    ``push_messages`` or ``send_and_receive``): message type, bytes sent and bytes of the
    replies (error replies count 0), as Flower's ``count_bytes`` of the records."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.batches: list[dict[str, Any]] = []
        self._batch_of: dict[str, dict[str, Any]] = {}

    def _open(self, messages: list[Message]) -> dict[str, Any]:
        batch = {"type": messages[0].metadata.message_type if messages else "", "messages": len(messages),
                 "sent": sum(message_bytes(m.content) for m in messages), "received": 0, "replies": 0}
        self.batches.append(batch)
        return batch

    @staticmethod
    def _count_reply(reply: Message, batch: Optional[dict[str, Any]]) -> None:
        if batch is None:
            return
        batch["replies"] += 1
        if not reply.has_error():
            batch["received"] += message_bytes(reply.content)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Forwarded; recorded."""
        messages = list(messages)
        batch = self._open(messages)
        ids = list(self.inner.push_messages(messages))
        for message_id in ids:
            if message_id:
                self._batch_of[message_id] = batch
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Forwarded; recorded."""
        replies = list(self.inner.pull_messages(message_ids))
        for reply in replies:
            self._count_reply(reply, self._batch_of.pop(reply.metadata.reply_to_message_id, None))
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        """Forwarded; recorded."""
        messages = list(messages)
        batch = self._open(messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            self._count_reply(reply, batch)
        return replies

    def total_bytes(self) -> int:
        """Bytes sent and received so far."""
        return sum(b["sent"] + b["received"] for b in self.batches)


def secaggplus_workflow(num_nodes: int, max_weight: float = 1000.0) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ for ``num_nodes`` clients, every one sampled each round: full
    neighbourhoods and a majority threshold (see the module's docstring); ``max_weight``
    bounds a client's weight (its examples in the round)."""
    if num_nodes < 2:
        raise ValueError(f"SecAgg+ needs at least 2 clients, got {num_nodes}")
    return SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=num_nodes // 2 + 1, max_weight=max_weight)


@dataclass
class LegacyRun:
    """What :func:`run_legacy_fedavg` measured: per round (from 1) its wall seconds and the
    bytes of the messages the server sent and received, and the final global model."""

    round_seconds: dict[int, float] = field(default_factory=dict)
    round_bytes: dict[int, int] = field(default_factory=dict)
    arrays: Optional[ArrayRecord] = None


def run_legacy_fedavg(grid: Grid, context: Context, config: Mapping[str, Any], initial: ArrayRecord,
                      num_rounds: int, *, secure: bool) -> LegacyRun:
    """``num_rounds`` rounds of Flower's legacy FedAvg on every node of ``grid``, with
    SecAgg+ if ``secure``.

    A round's seconds run from the end of the previous round's aggregation to the end of
    its own (legacy FedAvg calls its ``evaluate_fn`` after each); its bytes are what the
    Grid counted in between, if it counts (a ``total_bytes()`` method, e.g.
    :class:`ExchangeRecorder`). ``initial`` is keyed by the
    model's ``state_dict`` names, in order. The workflows keep their state in a fresh
    context of ``context``'s run, so runs can follow one another.
    """
    nodes = len(list(grid.get_node_ids()))
    keys = list(initial.keys())
    counted = getattr(grid, "total_bytes", lambda: 0)
    measured = LegacyRun()
    last = {"time": 0.0, "bytes": 0}

    def after_round(server_round: int, ndarrays: list[np.ndarray], _config: dict) -> None:
        now, sent = time.perf_counter(), int(counted())
        if server_round > 0:
            measured.round_seconds[server_round] = now - last["time"]
            measured.round_bytes[server_round] = sent - last["bytes"]
            measured.arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(keys, ndarrays)})
        last["time"], last["bytes"] = now, sent
        return None

    def fit_config(server_round: int) -> dict:
        return {"lr": float(config["lr"]), "local-steps": int(config["local-steps"]), "server-round": server_round}

    strategy = LegacyFedAvg(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=nodes, min_available_clients=nodes,
        initial_parameters=ndarrays_to_parameters([initial[k].numpy() for k in keys]),
        on_fit_config_fn=fit_config, evaluate_fn=after_round,
    )
    fresh = Context(run_id=context.run_id, node_id=context.node_id, node_config=dict(context.node_config),
                    state=RecordDict(), run_config=dict(context.run_config))
    legacy = LegacyContext(fresh, config=ServerConfig(num_rounds=num_rounds), strategy=strategy)
    examples = int(config.get("batch-size", 32)) * int(config["local-steps"])  # a client's weight in a round
    workflow = (DefaultWorkflow(fit_workflow=secaggplus_workflow(nodes, max(1000.0, float(examples))))
                if secure else DefaultWorkflow())
    workflow(grid, legacy)
    if len(measured.round_seconds) != num_rounds:
        raise RuntimeError(f"legacy FedAvg ({'SecAgg+' if secure else 'clear'}) finished "
                           f"{len(measured.round_seconds)} of {num_rounds} rounds: see the ServerApp log above")
    return measured


def run_legacy(grid: Grid, context: Context, initial: ArrayRecord) -> tuple[LegacyRun, dict]:
    """The ServerApp's ``legacy-*`` modes: ``num-server-rounds`` rounds; the run and a
    JSON-ready summary (seconds and bytes per round)."""
    config = context.run_config
    secure = str(config["mode"]) == "legacy-secaggplus"
    run = run_legacy_fedavg(ExchangeRecorder(grid), context, config, initial, int(config["num-server-rounds"]),
                            secure=secure)
    return run, {"config": dict(config), "secaggplus": secure, "round-seconds": run.round_seconds,
                 "round-bytes": run.round_bytes}
