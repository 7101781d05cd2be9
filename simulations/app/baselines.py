"""The baselines FedTAN is compared with, server and client side, for the app in simulations/.

Every method runs through the same Flower app (``flwr run .``), chosen with the run-config
key ``strategy``; :data:`METHODS` says what each one does:

================  =====  ============================  ====================================
``strategy``      norm   BatchNorm entries              test accuracy ("test-accuracy")
================  =====  ============================  ====================================
``fedtan``        BN     pooled-batch sync, averaged,   global model, on the server
                         then the statistics pass
``fedavg``        BN     averaged as plain arrays       global model, on the server
``fedavg-exact``  BN     averaged, then the running     global model, on the server
                         statistics of the pass
``fedbn``         BN     all local (never sent)         personalised models, on the clients
``silobn``        BN     gamma/beta averaged,           personalised models, on the clients
                         statistics local
``fixbn``         BN     averaged until the switch      global model, on the server
                         round, then statistics frozen
``fedgn``         GN     (GroupNorm: nothing special)   global model, on the server
``centralised``   BN     one client holding all data    global model, on the server
================  =====  ============================  ====================================

The statistics pass (:mod:`flwr_fedtan.exact_statistics`): after aggregation the clients
forward up to ``statistics-examples`` training examples through the new global model,
every BatchNorm call pooled over all clients, and the global running statistics become
the exact pooled ones (``fedtan`` with ``statistics='exact'``, the default).

Server side: :class:`PartialFedAvg` (Flower's FedAvg over the *shared* entries; the
server keeps its own value of every other entry) and its specialisations :class:`FedBN`,
:class:`SiloBN` and :class:`FixBN`. Client side: :func:`client_train` and
:func:`client_evaluate` serve the ``train``/``evaluate`` messages of these methods; the
entries a client keeps to itself live in ``context.state`` (an ``ArrayRecord`` under
:data:`LOCAL_STATE_KEY`) between rounds.

Batches: in every method served here, client ``k`` draws the batch of step ``s`` of round
``r`` from ``derive_seed(derive_seed(derive_seed(seed, r, 0), key_k), s)``, which is the
seed FedTAN's client uses for the same step (``key_k`` = partition id). All of them
therefore see the very same batches as FedTAN. (The ``fedavg`` path of
:func:`flwr_fedtan.fedtan_client_app` seeds differently: ``derive_seed(r, key_k)``.)

Test accuracy of the methods with local BatchNorm entries (FedBN, SiloBN): the global
model alone has no meaningful BatchNorm (FedBN's server never sees any BN entry; SiloBN's
never sees running statistics), so "test-accuracy" of round ``r >= 1`` is measured by
federated evaluation: every client evaluates *its personalised model* (the global shared
entries plus its own local BN entries) on the whole global test set, and the server
averages the clients' accuracies with equal weights (also "test-accuracy-min"/"-max" over
clients). Round 0 is measured on the server: every client then holds the initial model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, Collection, Iterable, Mapping, Optional

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from flwr_fedtan import FedTANClient
from flwr_fedtan.client import client_seed_key, evaluate_model
from flwr_fedtan.training import derive_seed

from .task import make_client, model_from_config, pooled_dataset, test_dataset

__all__ = [
    "METHODS",
    "MethodSpec",
    "method_spec",
    "model_norm",
    "LOCAL_STATE_KEY",
    "FREEZE_BN_STATS",
    "batchnorm_keys",
    "round_seed",
    "fixbn_switch_round",
    "equal_weight_metrics",
    "PartialFedAvg",
    "FedBN",
    "SiloBN",
    "FixBN",
    "make_method_client",
    "train_locally",
    "client_train",
    "client_evaluate",
]

LOCAL_STATE_KEY = "baseline.local-bn"
"""``context.state`` entry (an ``ArrayRecord``) holding a client's local BatchNorm entries."""

FREEZE_BN_STATS = "freeze-bn-stats"
"""Train-config flag (bool) of FixBN's second phase: train with the frozen statistics."""

DEFAULT_FIXBN_SWITCH = 0.5


@dataclass(frozen=True)
class MethodSpec:
    """What a value of the run-config key ``strategy`` means.

    Attributes
    ----------
    name : str
        The ``strategy`` value.
    norm : str
        Normalisation layers of the model, ``"bn"`` or ``"gn"`` (see ``build_model``).
    local_bn : str
        BatchNorm entries that never leave the clients: ``"none"``, ``"all"`` (weights,
        biases, running statistics, ``num_batches_tracked``) or ``"stats"`` (running
        statistics and ``num_batches_tracked``).
    evaluation : str
        ``"server"``: the global model on the test set, on the server, every round;
        ``"federated"``: the clients' personalised models on the test set, averaged.
    single_client : bool
        Centralised training: one SuperNode holding the union of all partitions.
    baseline_client : bool
        Whether the client's ``train``/``evaluate`` messages are served by this module
        (``False``: by :func:`flwr_fedtan.fedtan_client_app`, unchanged).
    description : str
        One line for logs and reports.
    """

    name: str
    norm: str
    local_bn: str
    evaluation: str
    single_client: bool
    baseline_client: bool
    description: str


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("fedtan", "bn", "none", "server", False, False,
                   "FedTAN: synchronised pooled-batch BatchNorm, BN-aware averaging"),
        MethodSpec("fedavg", "bn", "none", "server", False, False,
                   "Flower's FedAvg: BatchNorm entries averaged as plain arrays"),
        MethodSpec("fedavg-exact", "bn", "none", "server", False, False,
                   "Flower's FedAvg, then the exact statistics pass over its global model"),
        MethodSpec("fedbn", "bn", "all", "federated", False, True,
                   "FedBN: BatchNorm layers stay local"),
        MethodSpec("silobn", "bn", "stats", "federated", False, True,
                   "SiloBN: gamma/beta averaged, running statistics local"),
        MethodSpec("fixbn", "bn", "none", "server", False, True,
                   "FixBN: FedAvg, then BatchNorm statistics frozen at their global values"),
        MethodSpec("fedgn", "gn", "none", "server", False, True,
                   "FedAvg with GroupNorm instead of BatchNorm"),
        MethodSpec("centralised", "bn", "none", "server", True, True,
                   "Centralised SGD on the pooled data, K x batch-size per step"),
    )
}


def method_spec(config_or_name: Mapping[str, Any] | str) -> MethodSpec:
    """The :class:`MethodSpec` of a run config (its ``strategy``) or of a name.

    Raises
    ------
    ValueError
        If the name is not one of :data:`METHODS`.
    """
    name = config_or_name if isinstance(config_or_name, str) else str(config_or_name["strategy"])
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose from {tuple(METHODS)}") from None


def model_norm(config: Mapping[str, Any]) -> str:
    """Normalisation (``"bn"``/``"gn"``) of the model of a run config's method."""
    return method_spec(config).norm


# ---------------------------------------------------------------------- state entries
def batchnorm_keys(model: nn.Module) -> tuple[list[str], list[str]]:
    """The ``state_dict`` keys of the BatchNorm layers of ``model``.

    Parameters
    ----------
    model : nn.Module
        Any model; BatchNorm layers are the ``_BatchNorm`` modules (``BatchNorm1d/2d/3d``,
        ``SyncBatchNorm``, ``FedTANBatchNorm``).

    Returns
    -------
    params : list of str
        ``weight`` and ``bias`` (gamma, beta) of every affine BatchNorm layer.
    stats : list of str
        ``running_mean``, ``running_var`` and ``num_batches_tracked``.
    """
    state_keys = set(model.state_dict().keys())
    params, stats = [], []
    for name, module in model.named_modules():
        if not isinstance(module, _BatchNorm):
            continue
        prefix = f"{name}." if name else ""
        params += [prefix + k for k in ("weight", "bias") if prefix + k in state_keys]
        stats += [prefix + k for k in ("running_mean", "running_var", "num_batches_tracked")
                  if prefix + k in state_keys]
    return params, stats


def local_keys(spec: MethodSpec, model: nn.Module) -> list[str]:
    """Entries of ``model`` a client of method ``spec`` keeps to itself between rounds."""
    params, stats = batchnorm_keys(model)
    if spec.local_bn == "all":
        return params + stats
    if spec.local_bn == "stats":
        return stats
    return []


def round_seed(run_seed: int, server_round: int, seed_key: int) -> int:
    """A client's seed for a round; step ``s`` draws its batch with ``derive_seed(seed, s)``.

    The same derivation as FedTAN's client (round seed ``derive_seed(run_seed, round, 0)``,
    then the client's partition id), so every method draws FedTAN's batches.
    """
    return derive_seed(derive_seed(run_seed, server_round, 0), seed_key)


def fixbn_switch_round(config: Mapping[str, Any]) -> int:
    """Last FedAvg round of FixBN: ``floor(fixbn-switch * num-server-rounds)``.

    Rounds after it train with frozen BatchNorm statistics.
    """
    fraction = float(config.get("fixbn-switch", DEFAULT_FIXBN_SWITCH))
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fixbn-switch must be in [0, 1], got {fraction}")
    return int(math.floor(fraction * int(config["num-server-rounds"]) + 1e-9))


def equal_weight_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Average the clients' metrics with equal weights; add ``-min``/``-max`` of accuracies.

    The signature of Flower's ``evaluate_metrics_aggr_fn``. Used for the federated test
    accuracy of personalised models: each client's model counts once, whatever its data.
    """
    values: dict[str, list[float]] = {}
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        for key, value in metrics.items():
            if key != weighted_by_key and isinstance(value, (int, float)):
                values.setdefault(key, []).append(float(value))
    out = MetricRecord({key: float(np.mean(v)) for key, v in values.items()})
    for key, v in values.items():
        if key.endswith("accuracy"):
            out[f"{key}-min"] = float(np.min(v))
            out[f"{key}-max"] = float(np.max(v))
    out["clients"] = len(records)
    return out


def _as_dtype(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast an aggregate back to the global entry's dtype (integers rounded)."""
    if np.dtype(dtype).kind in "iub" and value.dtype.kind == "f":
        value = np.rint(value)
    return np.asarray(value, dtype=dtype)


# ---------------------------------------------------------------------- server side
class PartialFedAvg(FedAvg):
    """Flower's FedAvg over the shared entries; the server keeps its value of the others.

    Each round the entries in :meth:`kept_keys` are excluded from aggregation: the new
    global model holds the server's previous value of each (so they are never averaged),
    and any such entry a client sends anyway is discarded (counted in the round's
    metric ``kept-entries-received``). With ``send_kept_entries=False`` they are also left
    out of the messages to the clients, which then hold their own (FedBN, SiloBN); with
    ``True`` the clients receive the server's values (FixBN's frozen statistics).

    Parameters
    ----------
    kept_keys : Collection[str]
        Entries kept out of aggregation (in every round unless :meth:`kept_keys` is
        overridden).
    send_kept_entries : bool
        Whether the kept entries go out with the global model.
    **fedavg_kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(self, kept_keys: Collection[str], *, send_kept_entries: bool = False,
                 **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        self._kept_keys = frozenset(kept_keys)
        self.send_kept_entries = send_kept_entries
        self._global: Optional[ArrayRecord] = None
        self._round_kept: frozenset[str] = frozenset()

    def kept_keys(self, server_round: int) -> frozenset[str]:
        """Entries not aggregated in ``server_round``."""
        return self._kept_keys

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """The train config of a round (a copy; subclasses add flags)."""
        return ConfigRecord(dict(config))

    def summary(self) -> None:
        """Log the strategy's settings."""
        super().summary()
        log(INFO, "\t└──> %s: %d entries kept out of aggregation, sent to clients: %s",
            type(self).__name__, len(self._kept_keys), self.send_kept_entries)

    def _outgoing(self, arrays: ArrayRecord, kept: frozenset[str]) -> ArrayRecord:
        if self.send_kept_entries or not kept:
            return arrays
        return ArrayRecord({k: v for k, v in arrays.items() if k not in kept})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's ``configure_train`` with the kept entries handled as configured."""
        self._global = arrays
        self._round_kept = self.kept_keys(server_round)
        return super().configure_train(
            server_round, self._outgoing(arrays, self._round_kept),
            self.round_config(server_round, config), grid,
        )

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Average the shared entries (FedAvg); keep the server's value of the others."""
        kept, received = self._round_kept, 0
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                continue
            for name, record in list(reply.content.array_records.items()):
                leaked = [k for k in record.keys() if k in kept]
                if leaked:
                    received += len(leaked)
                    reply.content[name] = ArrayRecord({k: v for k, v in record.items() if k not in kept})
        if received:
            log(WARNING, "%s: discarded %d kept entries sent by clients in round %d",
                type(self).__name__, received, server_round)
        averaged, metrics = super().aggregate_train(server_round, replies)
        if averaged is None or self._global is None:
            return averaged, metrics
        merged = ArrayRecord()
        for key, value in self._global.items():
            if key in kept or key not in averaged:
                merged[key] = value
            else:
                merged[key] = Array(_as_dtype(averaged[key].numpy(), value.numpy().dtype))
        metrics = metrics if metrics is not None else MetricRecord()
        metrics["kept-entries"] = len(kept)
        metrics["kept-entries-received"] = received
        return merged, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """FedAvg's ``configure_evaluate``; kept entries sent only if they are for training."""
        return super().configure_evaluate(
            server_round, self._outgoing(arrays, self.kept_keys(server_round)),
            ConfigRecord(dict(config)), grid,
        )


class FedBN(PartialFedAvg):
    """FedBN (Li et al., ICLR 2021): BatchNorm layers never leave the clients.

    Parameters
    ----------
    model : nn.Module
        The global model (only its ``state_dict`` keys and BatchNorm layers are read).
    **fedavg_kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(self, model: nn.Module, **fedavg_kwargs: Any) -> None:
        params, stats = batchnorm_keys(model)
        super().__init__(params + stats, send_kept_entries=False, **fedavg_kwargs)


class SiloBN(PartialFedAvg):
    """SiloBN (Andreux et al., 2020): gamma/beta averaged, running statistics local.

    Parameters
    ----------
    model : nn.Module
        The global model (only its ``state_dict`` keys and BatchNorm layers are read).
    **fedavg_kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(self, model: nn.Module, **fedavg_kwargs: Any) -> None:
        _, stats = batchnorm_keys(model)
        super().__init__(stats, send_kept_entries=False, **fedavg_kwargs)


class FixBN(PartialFedAvg):
    """FixBN (Zhong et al., 2023): FedAvg, then BatchNorm statistics frozen.

    Rounds ``1 .. switch_round`` are Flower's FedAvg (running statistics averaged as plain
    arrays). From round ``switch_round + 1`` on, the global running statistics are frozen:
    the clients receive them with the flag :data:`FREEZE_BN_STATS` and train with their
    BatchNorm layers normalising by them (evaluation mode: no batch statistics, no
    updates), do not send them back, and the server keeps them unchanged.

    Parameters
    ----------
    model : nn.Module
        The global model (only its ``state_dict`` keys and BatchNorm layers are read).
    switch_round : int
        Last round of the FedAvg phase (see :func:`fixbn_switch_round`).
    **fedavg_kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(self, model: nn.Module, switch_round: int, **fedavg_kwargs: Any) -> None:
        _, stats = batchnorm_keys(model)
        super().__init__(stats, send_kept_entries=True, **fedavg_kwargs)
        self.switch_round = int(switch_round)

    def frozen(self, server_round: int) -> bool:
        """Whether the statistics are frozen in ``server_round``."""
        return server_round > self.switch_round

    def kept_keys(self, server_round: int) -> frozenset[str]:
        """The running statistics after the switch round, nothing before."""
        return self._kept_keys if self.frozen(server_round) else frozenset()

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """The train config with :data:`FREEZE_BN_STATS` set for the round."""
        config = ConfigRecord(dict(config))
        config[FREEZE_BN_STATS] = self.frozen(server_round)
        return config

    def summary(self) -> None:
        """Log the strategy's settings."""
        super().summary()
        log(INFO, "\t└──> FixBN: statistics frozen after round %d", self.switch_round)


# ---------------------------------------------------------------------- client side
def make_method_client(config: Mapping[str, Any], node_config: Mapping[str, Any]) -> FedTANClient:
    """The node's client for the run config's method.

    Like :func:`simulations.app.task.make_client` with the method's model norm; for
    ``centralised`` the client holds the union of all ``num-partitions`` partitions (in
    index order) and draws ``num-partitions x batch-size`` samples per step.
    """
    spec = method_spec(config)
    if not spec.single_client:
        return make_client(config, node_config, norm=spec.norm)
    num_partitions = int(config.get("num-partitions", 1))
    return FedTANClient(
        model_from_config(config, norm=spec.norm),
        pooled_dataset(config, num_partitions),
        batch_size=num_partitions * int(config["batch-size"]),
        lr=float(config["lr"]),
        local_steps=int(config["local-steps"]),
        device=str(config.get("device", "cpu")),
    )


def train_locally(client: FedTANClient, seed: int, local_steps: int, lr: Optional[float] = None,
                  freeze_bn_stats: bool = False) -> dict[str, float]:
    """Plain local training: ``local_steps`` optimiser steps, as FedTAN's ordinary steps.

    Parameters
    ----------
    client : FedTANClient
        Holds the model (with the round's starting weights), data and optimiser settings.
    seed : int
        The round's seed; step ``s`` uses the batch ``client.sample_batch(derive_seed(seed, s))``.
    local_steps : int
        Number of steps.
    lr : float, optional
        Learning rate (defaults to the client's).
    freeze_bn_stats : bool
        Train with every BatchNorm layer in evaluation mode: normalise with the running
        statistics and leave them unchanged (gamma and beta still train).

    Returns
    -------
    dict
        ``num-examples`` (samples seen), ``train-loss`` (mean over steps),
        ``local-seconds``.
    """
    started = time.perf_counter()
    model = client.model
    model.train()
    if freeze_bn_stats:
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.eval()
    optimizer = client.make_optimizer([p for p in model.parameters() if p.requires_grad], lr)
    losses, examples = [], 0
    for step in range(local_steps):
        inputs, targets = client.sample_batch(derive_seed(seed, step))
        optimizer.zero_grad(set_to_none=True)
        loss = client.loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        examples += int(inputs.shape[0])
    return {
        "num-examples": float(examples),
        "train-loss": float(np.mean(losses)) if losses else float("nan"),
        "local-seconds": time.perf_counter() - started,
    }


def _load_round_model(client: FedTANClient, received: ArrayRecord, state: RecordDict,
                      kept: list[str], node_id: int) -> None:
    """Global entries first, then the client's own kept entries (if it has any yet).

    Entries neither received nor kept keep the freshly built model's values (a client's
    first round of FedBN/SiloBN: BatchNorm's deterministic initial values, which are also
    the server's initial ones).
    """
    model_state = client.model.state_dict()
    update = {k: torch.as_tensor(v.numpy()) for k, v in received.items() if k not in kept}
    own = state.array_records.get(LOCAL_STATE_KEY)
    if own is not None:
        update.update({k: torch.as_tensor(v.numpy()) for k, v in own.items() if k in kept})
    unknown = set(update) - set(model_state)
    if unknown:
        raise ValueError(f"node {node_id}: received entries the model does not have: {sorted(unknown)[:5]}. "
                         "Fix: give the server and the clients the same model (run config 'model', 'dataset')")
    model_state.update(update)
    client.model.load_state_dict(model_state, strict=True)


def _state_arrays(model: nn.Module, keys: Optional[Collection[str]] = None,
                  exclude: Collection[str] = ()) -> ArrayRecord:
    excluded = set(exclude)
    return ArrayRecord({
        k: Array(v.detach().cpu().numpy())
        for k, v in model.state_dict().items()
        if (keys is None or k in keys) and k not in excluded
    })


def client_train(msg: Message, context: Context, client: FedTANClient) -> Message:
    """Serve a ``train`` message of a baseline method (not FedTAN, not Flower's FedAvg).

    Loads the global entries, then the client's local BatchNorm entries from
    ``context.state`` (FedBN: all, SiloBN: statistics); runs ``local-steps`` steps
    (FixBN after its switch: with frozen statistics); stores the local entries back in
    ``context.state`` and replies with every other entry (FixBN after its switch: without
    the frozen statistics).

    Parameters
    ----------
    msg : Message
        Content: ``arrays`` (the global entries sent) and ``config`` (``server-round``,
        ``lr``, ``local-steps``, optionally :data:`FREEZE_BN_STATS`).
    context : Context
        The node's context: run config, node config, state.
    client : FedTANClient
        The node's client (see :func:`make_method_client`).

    Returns
    -------
    Message
        Reply with ``arrays`` and ``metrics`` (``num-examples``, ``train-loss``,
        ``local-seconds``).
    """
    spec = method_spec(context.run_config)
    config = dict(msg.content.config_records.get("config", ConfigRecord()))
    kept = local_keys(spec, client.model)
    _load_round_model(client, msg.content.array_records["arrays"], context.state, kept, context.node_id)
    freeze = bool(config.get(FREEZE_BN_STATS, False))
    server_round = int(config.get("server-round", 0))
    seed = round_seed(int(context.run_config.get("seed", 0)), server_round, client_seed_key(context))
    metrics = train_locally(
        client, seed, int(config.get("local-steps", client.local_steps)),
        float(config["lr"]) if "lr" in config else None, freeze_bn_stats=freeze,
    )
    if kept:
        context.state[LOCAL_STATE_KEY] = _state_arrays(client.model, keys=kept)
    not_sent = list(kept)
    if freeze:
        not_sent += batchnorm_keys(client.model)[1]
    reply = RecordDict({"arrays": _state_arrays(client.model, exclude=not_sent),
                        "metrics": MetricRecord(metrics)})
    return Message(reply, reply_to=msg)


def client_evaluate(msg: Message, context: Context, client: FedTANClient) -> Message:
    """Evaluate the client's personalised model on the global test set.

    The personalised model is the global entries received plus the client's local
    BatchNorm entries from ``context.state``; the test set is
    :func:`simulations.app.task.test_dataset` of the run config.

    Returns
    -------
    Message
        Reply with ``metrics``: ``test-accuracy``, ``test-loss``, ``num-examples``
        (test-set size) and ``has-local-state`` (1 if the client had trained).
    """
    spec = method_spec(context.run_config)
    kept = local_keys(spec, client.model)
    _load_round_model(client, msg.content.array_records["arrays"], context.state, kept, context.node_id)
    data = test_dataset(context.run_config)
    loss, accuracy, count = evaluate_model(client.model, data, client.loss_fn, client.device)
    record = MetricRecord({
        "num-examples": count,
        "test-loss": loss,
        "test-accuracy": accuracy,
        "has-local-state": int(LOCAL_STATE_KEY in context.state.array_records),
    })
    return Message(RecordDict({"metrics": record}), reply_to=msg)

