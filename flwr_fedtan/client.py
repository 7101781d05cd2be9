"""Flower client side of FedTAN: :class:`FedTANClient` and :func:`fedtan_client_app`.

Flower keeps no Python object alive between two messages of a node: in simulation a
message may be handled by any Ray actor, in deployment every message starts a fresh
process. A round in flight is therefore kept two ways:

- in process memory (an LRU cache keyed by run and node): the live
  :class:`~flwr_fedtan.training.ClientRound`, paused inside its synchronised step; a
  message that finds it resumes it at once;
- in ``context.state``, which Flower carries with the node: the round's seed and the
  aggregates received so far, plus the round's starting weights or (by default) a
  reference to a node-local copy of them (:mod:`flwr_fedtan.replay_store`). A message
  that lands in a process without the live round rebuilds it with
  :meth:`ClientRound.replay`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from . import schema
from .aggregation import BackwardSums, ForwardStats
from .batchnorm import convert_batchnorm
from .replay_store import discard_weights, load_weights, resolve_store, save_weights
from .runtime import live_rounds, run_at_home
from .step import Aggregate
from .training import ClientRound, derive_seed

__all__ = ["FedTANClient", "fedtan_client_app", "clear_live_rounds"]

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

REPLAY_STATE = "fedtan.replay"  # ConfigRecord in context.state
REPLAY_LOG = "fedtan.log"  # ArrayRecord in context.state: aggregates of the round so far


class FedTANClient(NumPyClient):
    """A Flower ``NumPyClient`` that trains a BatchNorm model the FedTAN way.

    ``fit`` and ``evaluate`` keep ``NumPyClient`` semantics (``fit`` runs ordinary local
    steps, so the client also serves plain FedAvg); the synchronised FedTAN round is driven
    by the ``train.fedtan`` messages that :func:`fedtan_client_app` routes to it.

    Parameters
    ----------
    model : nn.Module
        The model; its BatchNorm layers are converted with
        :func:`~flwr_fedtan.convert_batchnorm`.
    train_data : Dataset or DataLoader
        Map-style training data yielding ``(input, target)``; a DataLoader gives its
        dataset and batch size.
    loss_fn : Callable, optional
        Mean loss of a batch; defaults to cross-entropy.
    batch_size : int
        Samples per step (ignored when ``train_data`` is a DataLoader with a batch size).
    lr, momentum, weight_decay : float
        SGD settings (a fresh optimiser each round, as in FedAvg).
    local_steps : int
        ``E``, optimiser steps per round; the first ``sync_steps`` are synchronised.
    device : str or torch.device
        Where to train, e.g. ``"cpu"`` or ``"cuda:0"``.
    test_data : Dataset or DataLoader, optional
        Data for :meth:`evaluate`; defaults to ``train_data``.
    optimizer_fn : Callable[[Iterable[Parameter]], Optimizer], optional
        Replaces the SGD settings with any optimiser.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Union[Dataset, DataLoader],
        loss_fn: Optional[LossFn] = None,
        *,
        batch_size: int = 32,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        local_steps: int = 1,
        device: Union[str, torch.device] = "cpu",
        test_data: Optional[Union[Dataset, DataLoader]] = None,
        eval_batch_size: int = 512,
        optimizer_fn: Optional[Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]] = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = convert_batchnorm(model).to(self.device)
        self.train_data, loader_batch = _unwrap(train_data)
        self.batch_size = int(loader_batch or batch_size)
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if len(self.train_data) == 0:  # type: ignore[arg-type]
            raise ValueError("train_data is empty")
        self.test_data = _unwrap(test_data)[0] if test_data is not None else self.train_data
        self.loss_fn: LossFn = loss_fn or nn.functional.cross_entropy
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.local_steps = int(local_steps)
        self.eval_batch_size = eval_batch_size
        self.optimizer_fn = optimizer_fn

    # ------------------------------------------------------------------ weights
    def state_keys(self) -> list[str]:
        """Names of the arrays exchanged: the model's ``state_dict`` keys."""
        return list(self.model.state_dict().keys())

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        """All ``state_dict`` entries (parameters and BatchNorm buffers) as NumPy arrays."""
        return [v.detach().cpu().numpy() for v in self.model.state_dict().values()]

    def set_parameters(self, parameters: Sequence[np.ndarray]) -> None:
        """Load arrays given in ``state_dict`` order."""
        keys = self.state_keys()
        if len(parameters) != len(keys):
            raise ValueError(f"got {len(parameters)} arrays, the model has {len(keys)} state entries")
        state = {k: torch.as_tensor(np.asarray(v)) for k, v in zip(keys, parameters)}
        self.model.load_state_dict(state, strict=True)

    def load_arrays(self, arrays: ArrayRecord) -> None:
        """Load an ``ArrayRecord`` keyed by ``state_dict`` names."""
        self.model.load_state_dict(arrays.to_torch_state_dict(), strict=True)

    def arrays(self) -> ArrayRecord:
        """The model as an ``ArrayRecord`` keyed by ``state_dict`` names."""
        return ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in self.model.state_dict().items()})

    # ------------------------------------------------------------------ training pieces
    def make_optimizer(self, params: Iterable[nn.Parameter], lr: Optional[float] = None) -> torch.optim.Optimizer:
        if self.optimizer_fn is not None:
            return self.optimizer_fn(params)
        return torch.optim.SGD(
            params, lr=self.lr if lr is None else lr, momentum=self.momentum, weight_decay=self.weight_decay
        )

    def sample_batch(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch drawn for a seed: ``batch_size`` distinct samples (fewer if the data is smaller)."""
        generator = torch.Generator().manual_seed(int(seed))
        count = min(self.batch_size, len(self.train_data))  # type: ignore[arg-type]
        indices = torch.randperm(len(self.train_data), generator=generator)[:count]  # type: ignore[arg-type]
        inputs, targets = default_collate([self.train_data[int(i)] for i in indices])
        return inputs.to(self.device), targets.to(self.device)

    def new_round(self, seed: int, sync_steps: int, config: Optional[dict[str, Any]] = None) -> ClientRound:
        """A :class:`ClientRound` starting from the current weights."""
        config = config or {}
        local_steps = int(config.get("local-steps", self.local_steps))
        lr = config.get("lr")
        return ClientRound(
            self.model,
            self.sample_batch,
            self.loss_fn,
            lambda params: self.make_optimizer(params, None if lr is None else float(lr)),
            sync_steps=sync_steps,
            local_steps=max(local_steps, sync_steps),
            seed=seed,
        )

    # ------------------------------------------------------------------ NumPyClient API
    def fit(self, parameters: Sequence[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        """Ordinary local training (BatchNorm with local statistics), FedAvg style."""
        self.set_parameters(parameters)
        seed = int(config.get("seed", config.get("server-round", 0)))
        round_ = self.new_round(seed, sync_steps=0, config=config)
        round_.start()
        metrics = round_.finish()
        return self.get_parameters({}), int(metrics["num-examples"]), {"train-loss": metrics["train-loss"]}

    @torch.no_grad()
    def evaluate(self, parameters: Sequence[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict]:
        """Loss and accuracy of the given weights on ``test_data``."""
        self.set_parameters(parameters)
        loss, accuracy, count = evaluate_model(
            self.model, self.test_data, self.loss_fn, self.device, self.eval_batch_size
        )
        return loss, count, {"accuracy": accuracy}


def evaluate_model(
    model: nn.Module, data: Dataset, loss_fn: LossFn, device: torch.device, batch_size: int = 512
) -> tuple[float, float, int]:
    """Mean loss, accuracy and sample count of ``model`` in eval mode on ``data``."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for inputs, targets in DataLoader(data, batch_size=batch_size):
            inputs, targets = inputs.to(device), targets.to(device)
            outputs = model(inputs)
            total_loss += float(loss_fn(outputs, targets)) * len(targets)
            correct += int((outputs.argmax(dim=1) == targets).sum())
            count += len(targets)
    return total_loss / max(count, 1), correct / max(count, 1), count


def _unwrap(data: Union[Dataset, DataLoader]) -> tuple[Dataset, Optional[int]]:
    if isinstance(data, DataLoader):
        return data.dataset, data.batch_size
    return data, None


# ---------------------------------------------------------------------- live rounds
class _LiveRound:
    def __init__(self, client: FedTANClient, round_: ClientRound, server_round: int) -> None:
        self.client = client
        self.round = round_
        self.server_round = server_round
        # A paused step can only be resumed on the thread that started it; a message
        # handled on another thread (a threaded Ray actor, say) replays instead.
        self.thread = threading.current_thread()  # the object: thread idents are reused

    def close(self) -> None:
        self.round.close()


def clear_live_rounds() -> None:
    """Drop every live round of this process (e.g. between tests)."""
    live_rounds().clear()


# ---------------------------------------------------------------------- replay state
def _log_append(state: RecordDict, index: int, aggregate: Aggregate) -> None:
    log_record = state.array_records[REPLAY_LOG]
    if isinstance(aggregate, ForwardStats):
        log_record[f"{index}.mean"] = Array(np.asarray(aggregate.mean, dtype=np.float64))
        log_record[f"{index}.var"] = Array(np.asarray(aggregate.var, dtype=np.float64))
        log_record[f"{index}.counts"] = Array(np.array([aggregate.count, aggregate.num_examples], dtype=np.float64))
    else:
        log_record[f"{index}.sum-grad"] = Array(np.asarray(aggregate.sum_grad, dtype=np.float64))
        log_record[f"{index}.sum-grad-xhat"] = Array(np.asarray(aggregate.sum_grad_xhat, dtype=np.float64))


def _log_read(state: RecordDict, length: int) -> list[Aggregate]:
    log_record = state.array_records[REPLAY_LOG]
    out: list[Aggregate] = []
    for i in range(length):
        if f"{i}.mean" in log_record:
            counts = log_record[f"{i}.counts"].numpy()
            out.append(ForwardStats(count=float(counts[0]), num_examples=int(counts[1]),
                                    mean=log_record[f"{i}.mean"].numpy(), var=log_record[f"{i}.var"].numpy()))
        elif f"{i}.sum-grad" in log_record:
            out.append(BackwardSums(sum_grad=log_record[f"{i}.sum-grad"].numpy(),
                                    sum_grad_xhat=log_record[f"{i}.sum-grad-xhat"].numpy()))
        else:
            raise RuntimeError(f"replay log in context.state lacks aggregate {i}")
    return out


def _request_reply(msg: Message, round_no: int, round_: ClientRound, request) -> Message:
    point, payload = request
    return Message(schema.encode_request(round_no, round_.step_index, point, payload), reply_to=msg)


def client_seed_key(context: Context) -> int:
    """What makes a client's batch seeds its own: its data partition when the node config
    names one (``partition-id``, as Flower's simulation does), else its node id."""
    partition = context.node_config.get("partition-id")
    return int(partition) if isinstance(partition, int) else int(context.node_id)


def _client_from(client_fn: Callable[[Context], Any], context: Context) -> FedTANClient:
    client = client_fn(context)
    client = getattr(client, "numpy_client", client)  # accept NumPyClient.to_client()
    if not isinstance(client, FedTANClient):
        raise TypeError(f"client_fn must return a FedTANClient, got {type(client).__name__}")
    return client


def fedtan_client_app(
    client_fn: Callable[[Context], FedTANClient], replay_store: Optional[str] = None
) -> ClientApp:
    """A message-API ``ClientApp`` that serves every message FedTAN and FedAvg send.

    Parameters
    ----------
    client_fn : Callable[[Context], FedTANClient]
        Builds the node's client (model, data, settings) from the context, like the
        ``client_fn`` of a legacy ``ClientApp``.
    replay_store : Optional[str] (default: None)
        Where a round's starting weights are kept for replay in another process:
        ``"disk"`` (a node-local file, the default) or ``"context"`` (``context.state``,
        for multi-machine Ray clusters); ``None`` reads ``FEDTAN_REPLAY_STORE``. See
        :mod:`flwr_fedtan.replay_store`.

    Returns
    -------
    ClientApp
        Handles ``train.fedtan`` (FedTAN rounds), ``train`` (ordinary local training,
        e.g. for Flower's FedAvg) and ``evaluate``.

    Examples
    --------
    >>> app = fedtan_client_app(client_fn)
    """
    store = resolve_store(replay_store)
    app = ClientApp()

    @app.train(schema.ACTION)
    def fedtan_train(msg: Message, context: Context) -> Message:
        # Runs where the node's live rounds are kept (this process, a Ray home, the node worker).
        return run_at_home(_handle_fedtan, msg, context, client_fn, store)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        client = _client_from(client_fn, context)
        arrays = msg.content.array_records["arrays"]
        config = dict(msg.content.config_records.get("config", ConfigRecord()))
        client.load_arrays(arrays)
        # The same batches a FedTAN round would draw (strategy seed, round, attempt 0).
        round_seed = derive_seed(int(config.get("seed", 0)), int(config.get("server-round", 0)), 0)
        config["seed"] = derive_seed(round_seed, client_seed_key(context))
        _, num_examples, metrics = client.fit(client.get_parameters({}), config)
        record = MetricRecord({"num-examples": num_examples, **metrics})
        return Message(RecordDict({"arrays": client.arrays(), "metrics": record}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        client = _client_from(client_fn, context)
        client.load_arrays(msg.content.array_records["arrays"])
        config = dict(msg.content.config_records.get("config", ConfigRecord()))
        loss, count, metrics = client.evaluate(client.get_parameters({}), config)
        record = MetricRecord(
            {"num-examples": count, "eval-loss": loss, **{f"eval-{k}": v for k, v in metrics.items()}}
        )
        return Message(RecordDict({"metrics": record}), reply_to=msg)

    return app


def _handle_fedtan(msg: Message, context: Context, client_fn: Callable[[Context], Any], store: str) -> Message:
    control = schema.decode_control(msg.content)
    key = (context.run_id, context.node_id)
    state = context.state
    cache = live_rounds()
    if control.phase == schema.PHASE_BEGIN:
        cache.forget(key)
        client = _client_from(client_fn, context)
        arrays = msg.content.array_records[schema.ARRAYS]
        client.load_arrays(arrays)
        config = dict(msg.content.config_records.get(schema.CONFIG, ConfigRecord()))
        seed = derive_seed(control.seed, client_seed_key(context))
        state[REPLAY_STATE] = ConfigRecord(
            {"round": control.round, "seed": seed, "sync-steps": control.sync_steps,
             "received": 0, "replays": 0, "sync-seconds": 0.0,
             "local-steps": int(config.get("local-steps", client.local_steps)),
             **({"lr": float(config["lr"])} if "lr" in config else {})}
        )
        state[REPLAY_LOG] = ArrayRecord()
        save_weights(state, client.arrays(), store, context.run_id, context.node_id)
        round_ = client.new_round(seed, control.sync_steps, config)
        live = _LiveRound(client, round_, control.round)
        started = time.perf_counter()
        try:
            request = round_.start()
        except BaseException:
            round_.close()
            raise
        _add_seconds(state, time.perf_counter() - started)
    else:
        replay = state.config_records.get(REPLAY_STATE)
        if replay is None or int(replay["round"]) != control.round:
            raise RuntimeError(
                f"node {context.node_id} got an aggregate for round {control.round} but holds "
                f"no state for it (state round: {None if replay is None else replay['round']})"
            )
        received = int(replay["received"])
        if control.point != received:
            raise RuntimeError(
                f"node {context.node_id}: aggregate for point {control.point} of round "
                f"{control.round}, but {received} aggregates were received so far"
            )
        live = cache.get(key)
        started = time.perf_counter()
        if (
            live is None
            or live.server_round != control.round
            or len(live.round.received) != received
            or live.thread is not threading.current_thread()
        ):
            cache.forget(key)
            live = _rebuild(context, client_fn, replay)
        try:
            request = live.round.resume(control.aggregate)  # type: ignore[arg-type]
        except BaseException:
            cache.forget(key)
            live.round.close()
            raise
        _log_append(state, received, control.aggregate)  # type: ignore[arg-type]
        replay["received"] = received + 1
        _add_seconds(state, time.perf_counter() - started)

    if request is not None:
        cache.remember(key, live)
        return _request_reply(msg, control.round, live.round, request)

    cache.forget(key)
    metrics = live.round.finish()
    replay = state.config_records[REPLAY_STATE]
    metrics["sync-seconds"] = float(replay["sync-seconds"])
    metrics["replays"] = float(replay["replays"])
    del state[REPLAY_LOG]
    discard_weights(state)
    content = schema.encode_done(control.round, live.client.arrays(), MetricRecord(metrics))
    return Message(content, reply_to=msg)


def _add_seconds(state: RecordDict, seconds: float) -> None:
    replay = state.config_records[REPLAY_STATE]
    replay["sync-seconds"] = float(replay["sync-seconds"]) + seconds


def _rebuild(context: Context, client_fn: Callable[[Context], Any], replay: ConfigRecord) -> _LiveRound:
    """Rebuild the round in this process from ``context.state`` (deterministic replay)."""
    state = context.state
    client = _client_from(client_fn, context)
    client.load_arrays(load_weights(state))
    config = {"local-steps": int(replay["local-steps"])}
    if "lr" in replay:
        config["lr"] = float(replay["lr"])
    round_ = client.new_round(int(replay["seed"]), int(replay["sync-steps"]), config)
    aggregates = _log_read(state, int(replay["received"]))
    try:
        request = round_.replay(aggregates)
    except BaseException:
        round_.close()
        raise
    if request is None:
        raise RuntimeError("replayed round completed before the pending aggregate: state is inconsistent")
    replay["replays"] = int(replay["replays"]) + 1
    return _LiveRound(client, round_, int(replay["round"]))
