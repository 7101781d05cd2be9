"""Flower client side of FedTAN: :class:`FedTANClient`, :func:`add_fedtan` and
:func:`fedtan_client_app`.

:func:`add_fedtan` adds FedTAN's handler (message type ``train.fedtan``) to an existing
message-API ``ClientApp`` and leaves the app's own handlers alone; :func:`fedtan_client_app`
builds a whole ``ClientApp`` (FedTAN, plain ``train`` and ``evaluate``) for apps that start
from scratch.

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

import hashlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from . import schema, secure, settings
from .aggregation import BackwardSums, ForwardStats
from .arguments import InvalidArgumentsError
from .batchnorm import UnsupportedModelError, convert_batchnorm, validate
from .client_checks import ClientDataError, check_client_arguments, check_training_data
from .losses import loss_reduction, reduce_loss
from .replay_store import discard_weights, load_weights, save_weights
from .runtime import live_rounds, run_at_home
from .statistics_pass import StatisticsPass
from .step import Aggregate
from .training import ClientRound, derive_seed

__all__ = ["FedTANClient", "add_fedtan", "fedtan_client_app", "clear_live_rounds"]

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
UnpackBatch = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]

REPLAY_STATE = "fedtan.replay"  # ConfigRecord in context.state
REPLAY_LOG = "fedtan.log"  # ArrayRecord in context.state: aggregates of the round so far
SECURE_KEY = "fedtan.secure-key"  # ConfigRecord in context.state: the round's private key, attempt
SECURE_ROSTER = "fedtan.secure-roster"  # ArrayRecord in context.state: the attempt's roster
SECURE_SHIFTS = "fedtan.secure-shifts"  # ArrayRecord in context.state: public shifts
STATS_STATE = "fedtan.stats-pass"  # ConfigRecord in context.state: the statistics pass in flight
STATS_LOG = "fedtan.stats-log"  # ArrayRecord in context.state: its pooled statistics so far


@dataclass(frozen=True)
class _SecureRecords:
    """Where a node keeps one protocol's secure-statistics material in ``context.state``."""

    key: str  # ConfigRecord: private key, round, attempt
    roster: str  # ArrayRecord: the attempt's roster
    shifts: str  # ArrayRecord: public shifts


_ROUND_SECURE = _SecureRecords(SECURE_KEY, SECURE_ROSTER, SECURE_SHIFTS)
_PASS_SECURE = _SecureRecords("fedtan.stats-secure-key", "fedtan.stats-secure-roster", "fedtan.stats-secure-shifts")


class FedTANClient(NumPyClient):
    """A Flower ``NumPyClient`` that trains a BatchNorm model the FedTAN way.

    It replaces the app's own training loop for FedTAN rounds: each step's batch is drawn
    from a seed the server sends (``batch_size`` distinct samples of ``train_data``, not
    the DataLoader's sampler or shuffling), so that a paused step can be rebuilt
    identically in another process; the optimiser is built afresh every round; the train
    metrics it reports are ``num-examples``, ``train-loss``, ``sync-seconds``,
    ``local-seconds`` and ``replays``. ``fit`` and ``evaluate`` keep ``NumPyClient``
    semantics (``fit`` runs ordinary local steps, so the client also serves plain FedAvg);
    the synchronised round is driven by the ``train.fedtan`` messages that
    :func:`add_fedtan` or :func:`fedtan_client_app` route to it.

    Parameters
    ----------
    model : nn.Module
        The model; its BatchNorm layers are converted with
        :func:`~flwr_fedtan.convert_batchnorm` (``state_dict`` keys unchanged).
    train_data : Dataset or DataLoader
        Map-style training data. A DataLoader contributes its dataset, its ``batch_size``
        and its ``collate_fn``; its sampler, ``shuffle`` and ``drop_last`` are not used.
    loss_fn : Callable[[Tensor, Tensor], Tensor], optional
        Mean loss of a batch; defaults to cross-entropy.
    batch_size : int, optional
        Samples per step. Required when ``train_data`` is a ``Dataset`` (there is no
        default: a silent one would change results) or a DataLoader without a batch size
        (``batch_sampler``); with a batching DataLoader it may be omitted, and if given
        must equal the DataLoader's. A step uses ``min(batch_size, len(dataset))`` samples.
    lr : float (default: 0.01)
        SGD learning rate. The ``lr`` of a round's train config (the ``ConfigRecord`` the
        strategy sends, e.g. ``FedTAN.start(..., train_config=ConfigRecord({"lr": 0.1}))``)
        wins over this value for that round.
    momentum, weight_decay : float (default: 0.0)
        SGD settings (a fresh optimiser each round, as in FedAvg).
    local_steps : int (default: 1)
        ``E``, optimiser steps per round; the first ``sync_steps`` (a setting of the
        strategy, ``FedTAN(sync_steps=...)``) are synchronised. A ``local-steps`` entry in
        the round's train config wins over this value.
    device : str or torch.device (default: "cpu")
        Where to train, e.g. ``"cpu"`` or ``"cuda:0"``.
    test_data : Dataset or DataLoader, optional
        Data for :meth:`evaluate`; defaults to ``train_data``.
    eval_batch_size : int (default: 512)
        Batch size of :meth:`evaluate`.
    optimizer_fn : Callable[[Iterable[Parameter]], Optimizer], optional
        Replaces the SGD settings (``lr`` included) with any optimiser.
    unpack_batch : Callable[[Any], tuple[Tensor, Tensor]], optional
        Turns a collated batch into ``(inputs, targets)``; needed when the data yields
        something other than pairs, e.g. ``lambda b: (b["img"], b["label"])`` for the
        dictionaries of a Hugging Face dataset. By default a batch must be a pair.

    Raises
    ------
    InvalidArgumentsError
        Listing every invalid setting with its fix: types and ranges of ``batch_size``,
        ``lr`` (> 0), ``momentum`` (in [0, 1)), ``weight_decay`` (>= 0), ``local_steps``,
        ``eval_batch_size`` (>= 1), functions that are not callable, a ``device`` this
        machine does not have.
    ValueError
        If the batch size is missing or ambiguous, or ``train_data`` is empty.
    ClientDataError
        If ``train_data`` holds NaN or infinite values, or does not fit the model and loss
        (checked on the ``meta`` device: no forward pass).
    UnsupportedModelError
        For what :func:`~flwr_fedtan.validate` refuses in the model and loss (a scalar loss
        that sums without declaring ``reduction="sum"`` included).
    TypeError
        If ``train_data`` is not a ``Dataset`` or ``DataLoader``.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Union[Dataset, DataLoader],
        loss_fn: Optional[LossFn] = None,
        *,
        batch_size: Optional[int] = None,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        local_steps: int = 1,
        device: Union[str, torch.device] = "cpu",
        test_data: Optional[Union[Dataset, DataLoader]] = None,
        eval_batch_size: int = 512,
        optimizer_fn: Optional[Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]] = None,
        unpack_batch: Optional[UnpackBatch] = None,
    ) -> None:
        check_client_arguments(
            loss_fn=loss_fn, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
            local_steps=local_steps, device=device, eval_batch_size=eval_batch_size, optimizer_fn=optimizer_fn,
            unpack_batch=unpack_batch,
        )
        self.device = torch.device(device)
        self.train_data, self.batch_size, self.collate_fn = _training_data(train_data, batch_size)
        self.model = convert_batchnorm(model).to(self.device)
        if test_data is None:
            self.test_data, self.test_collate_fn = self.train_data, self.collate_fn
        else:
            self.test_data, self.test_collate_fn = _as_dataset(test_data, "test_data"), _collate_fn_of(test_data)
        self.loss_fn: LossFn = loss_fn or nn.functional.cross_entropy
        # Refuse up front what a synchronised step cannot do exactly, every issue with its fix.
        validate(self.model, self.loss_fn, strict=True)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.local_steps = int(local_steps)
        self.eval_batch_size = eval_batch_size
        self.optimizer_fn = optimizer_fn
        self.unpack_batch = unpack_batch
        check_training_data(self.model, self.train_data, self._collated, self.loss_fn, self.batch_size)

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
        """The round's optimiser: ``optimizer_fn(params)``, or SGD with ``lr`` (the round's
        train config) or else the constructor's ``lr``."""
        if self.optimizer_fn is not None:
            return self.optimizer_fn(params)
        return torch.optim.SGD(
            params, lr=self.lr if lr is None else lr, momentum=self.momentum, weight_decay=self.weight_decay
        )

    def batch_indices(self, seed: int, count: Optional[int] = None) -> list[int]:
        """The indices of the samples :meth:`sample_batch` draws for a seed."""
        generator = torch.Generator().manual_seed(int(seed))
        size = len(self.train_data)  # type: ignore[arg-type]
        count = min(self.batch_size if count is None else int(count), size)
        return torch.randperm(size, generator=generator)[:count].tolist()

    def sample_batch(self, seed: int, count: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch drawn for a seed: ``count`` (default ``batch_size``) distinct samples,
        fewer if the data is smaller, collated like the DataLoader's and on ``device``."""
        indices = self.batch_indices(seed, count)
        batch = self.collate_fn([self.train_data[int(i)] for i in indices])
        inputs, targets = self._unpack(batch)
        return inputs.to(self.device), targets.to(self.device)

    def _collated(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self._unpack(self.collate_fn([self.train_data[i] for i in indices]))
        return inputs.to(self.device), targets.to(self.device)

    def statistics_pass(self, seed: int, examples: int) -> StatisticsPass:
        """A :class:`~flwr_fedtan.statistics_pass.StatisticsPass` of the current weights over
        ``examples`` training samples drawn for ``seed`` (all of them if the data is smaller)."""
        inputs, _ = self.sample_batch(seed, examples)
        return StatisticsPass(self.model, inputs, seed=seed)

    def _unpack(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.unpack_batch is not None:
            inputs, targets = self.unpack_batch(batch)
        elif isinstance(batch, Mapping):
            raise TypeError(
                f"FedTANClient: the training data yields dictionaries (keys {sorted(batch)}), not "
                "(inputs, targets) pairs: pass unpack_batch=lambda batch: (batch[<inputs key>], "
                "batch[<targets key>])"
            )
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            inputs, targets = batch
        else:
            raise TypeError(
                f"FedTANClient: a batch must be an (inputs, targets) pair, got {type(batch).__name__}"
                f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}: pass "
                "unpack_batch=<function returning (inputs, targets) from a batch>"
            )
        if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise TypeError(
                f"FedTANClient: inputs and targets must be tensors, got {type(inputs).__name__} and "
                f"{type(targets).__name__}"
            )
        return inputs, targets

    def new_round(self, seed: int, sync_steps: int, config: Optional[dict[str, Any]] = None) -> ClientRound:
        """A :class:`ClientRound` starting from the current weights; ``config`` is the
        round's train config, whose ``lr`` and ``local-steps`` win over the constructor's."""
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
            self.model, self.test_data, self.loss_fn, self.device, self.eval_batch_size,
            collate_fn=self.test_collate_fn, unpack_batch=self._unpack,
        )
        return loss, count, {"accuracy": accuracy}


def evaluate_model(
    model: nn.Module,
    data: Dataset,
    loss_fn: LossFn,
    device: torch.device,
    batch_size: int = 512,
    *,
    collate_fn: Optional[Callable[[list], Any]] = None,
    unpack_batch: Optional[UnpackBatch] = None,
) -> tuple[float, float, int]:
    """Mean loss per sample, accuracy and sample count of ``model`` in eval mode on ``data``
    (batches collated with ``collate_fn`` and split by ``unpack_batch``; defaults: pairs)."""
    model.eval()
    reduction = loss_reduction(loss_fn)
    total_loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for batch in DataLoader(data, batch_size=batch_size, collate_fn=collate_fn):
            inputs, targets = unpack_batch(batch) if unpack_batch is not None else batch
            inputs, targets = inputs.to(device), targets.to(device)
            outputs = model(inputs)
            batch_loss = float(reduce_loss(loss_fn(outputs, targets), len(targets), reduction))
            total_loss += batch_loss * len(targets) if reduction == "mean" else batch_loss
            correct += int((outputs.argmax(dim=1) == targets).sum())
            count += len(targets)
    return total_loss / max(count, 1), correct / max(count, 1), count


def _as_dataset(data: Union[Dataset, DataLoader], name: str) -> Dataset:
    if isinstance(data, DataLoader):
        return _as_dataset(data.dataset, f"the dataset of {name}'s DataLoader")
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        raise TypeError(
            f"FedTANClient: {name} is a {type(data).__name__} of tensors; wrap them in "
            "torch.utils.data.TensorDataset(inputs, targets)"
        )
    if isinstance(data, IterableDataset) or not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise TypeError(
            f"FedTANClient: {name} must be a map-style Dataset (with __getitem__ and __len__) or a "
            f"DataLoader over one, got {type(data).__name__}: FedTAN draws each step's batch by index "
            "from a seed, so that a step can be rebuilt in another process"
        )
    return data


def _training_data(
    data: Union[Dataset, DataLoader], batch_size: Optional[int]
) -> tuple[Dataset, int, Callable[[list], Any]]:
    """The dataset, batch size and collate function of ``train_data`` (see FedTANClient)."""
    dataset = _as_dataset(data, "train_data")
    collate_fn = _collate_fn_of(data)
    loader_batch = data.batch_size if isinstance(data, DataLoader) else None
    if batch_size is None and loader_batch is None:
        what = "a DataLoader without a batch_size" if isinstance(data, DataLoader) else (
            f"a {type(data).__name__}, which carries no batch size")
        raise ValueError(
            f"FedTANClient: train_data is {what}: pass batch_size=<samples per step>, or a "
            "DataLoader(dataset, batch_size=...)"
        )
    if batch_size is not None and loader_batch is not None and int(batch_size) != int(loader_batch):
        raise ValueError(
            f"FedTANClient: batch_size={batch_size} but the DataLoader has batch_size={loader_batch}: "
            "pass one of them"
        )
    size = batch_size if batch_size is not None else loader_batch
    if isinstance(size, bool) or int(size) != size or int(size) <= 0:  # type: ignore[arg-type]
        raise ValueError(f"FedTANClient: batch_size must be a positive integer, got {size!r}")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("FedTANClient: train_data is empty")
    return dataset, int(size), collate_fn  # type: ignore[arg-type]


def _collate_fn_of(data: Union[Dataset, DataLoader]) -> Callable[[list], Any]:
    """A batching DataLoader's ``collate_fn``, else torch's ``default_collate``."""
    if isinstance(data, DataLoader) and data.batch_sampler is not None:
        return data.collate_fn
    return default_collate


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


class _LivePass:
    def __init__(self, client: FedTANClient, stats_pass: StatisticsPass, server_round: int) -> None:
        self.client = client
        self.stats_pass = stats_pass
        self.server_round = server_round
        self.thread = threading.current_thread()

    def close(self) -> None:
        self.stats_pass.close()


def clear_live_rounds() -> None:
    """Drop every live round of this process (e.g. between tests)."""
    live_rounds().clear()


# ---------------------------------------------------------------------- replay state
def _log_append(state: RecordDict, index: int, aggregate: Aggregate, name: str = REPLAY_LOG) -> None:
    log_record = state.array_records[name]
    if isinstance(aggregate, ForwardStats):
        log_record[f"{index}.mean"] = Array(np.asarray(aggregate.mean, dtype=np.float64))
        log_record[f"{index}.var"] = Array(np.asarray(aggregate.var, dtype=np.float64))
        log_record[f"{index}.counts"] = Array(np.array([aggregate.count, aggregate.num_examples], dtype=np.float64))
    else:
        log_record[f"{index}.sum-grad"] = Array(np.asarray(aggregate.sum_grad, dtype=np.float64))
        log_record[f"{index}.sum-grad-xhat"] = Array(np.asarray(aggregate.sum_grad_xhat, dtype=np.float64))


def _log_read(state: RecordDict, length: int, name: str = REPLAY_LOG) -> list[Aggregate]:
    log_record = state.array_records[name]
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


def _request_reply(msg: Message, context: Context, round_no: int, round_: ClientRound, request) -> Message:
    point, payload = request
    if SECURE_ROSTER in context.state.array_records:
        payload = _masked(context, round_no, round_.step_index, point, payload)
    return Message(schema.encode_request(round_no, round_.step_index, point, payload), reply_to=msg)


def _masked(
    context: Context, round_no: int, step: int, point, payload,
    records: _SecureRecords = _ROUND_SECURE, progress: str = REPLAY_STATE,
) -> secure.MaskedPayload:
    """Secure statistics: the payload masked for this exchange (the number of aggregates
    received so far in the attempt, from the ``progress`` record)."""
    state = context.state
    key = state.config_records.get(records.key)
    if key is None or int(key["round"]) != round_no:
        raise secure.KeyAgreementError(
            f"node {context.node_id}: no private key for round {round_no} (it missed the key exchange)"
        )
    roster = secure.Roster.from_arrays({k: v.numpy() for k, v in state.array_records[records.roster].items()})
    shifts = secure.shifts_from_arrays({k: v.numpy() for k, v in state.array_records[records.shifts].items()})
    forward = point.phase == schema.PHASE_FORWARD
    replay = state.config_records[progress]
    exchange = int(replay["received"])
    masked = secure.client_encode(
        payload,
        node_id=context.node_id,
        private_key=key["private-key"],  # type: ignore[arg-type]
        roster=roster,
        round=round_no,
        attempt=int(key["attempt"]),
        exchange=exchange,
        shift=secure.shift_for(shifts, point.index, point.channels) if forward else None,
        where=secure.describe_point(round_no, step, point.phase, point.index, point.call),
    )
    # The length of each exchange's payload: a blame request may reveal only that canary's masks.
    lengths = list(replay.get("masked-lengths", []))[:exchange]
    replay["masked-lengths"] = lengths + [int(masked.masked.shape[1])]
    return masked


def _canary_masks(context: Context, control: schema.Control) -> dict:
    """Secure statistics, after the canaries failed: this node's canary masks of the asked
    exchange, if it is one this node sent in the current attempt, at its true length."""
    state = context.state
    key = state.config_records.get(SECURE_KEY)
    replay = state.config_records.get(REPLAY_STATE)
    if key is None or int(key["round"]) != control.round or replay is None or int(replay["round"]) != control.round:
        raise schema.ServerMessageError(f"blame request for round {control.round}, which this node is not in")
    lengths = list(replay.get("masked-lengths", []))
    if not 0 <= control.exchange < len(lengths) or lengths[control.exchange] != control.length:
        raise schema.ServerMessageError(
            f"blame request for exchange {control.exchange} with length {control.length}, but this node sent "
            f"payloads of lengths {lengths} this attempt: it reveals only the canary of a payload it sent"
        )
    roster = secure.Roster.from_arrays({k: v.numpy() for k, v in state.array_records[SECURE_ROSTER].items()})
    return secure.canary_masks(key["private-key"], context.node_id, roster, control.round,  # type: ignore[arg-type]
                               int(key["attempt"]), control.exchange, control.length)


def _forget_secure(state: RecordDict) -> None:
    """Remove the round's key material (private key, roster, shifts) from ``context.state``."""
    for name in (SECURE_KEY, SECURE_ROSTER, SECURE_SHIFTS):
        if name in state:
            del state[name]


def _begin_secure(
    context: Context, control: schema.Control, require_secure_stats: bool, records: _SecureRecords = _ROUND_SECURE
) -> None:
    """Keep (or clear) the attempt's roster and shifts in ``context.state``.

    Refuses what a malicious server could use to unmask this node's statistics: a begin
    in the clear after the round's key exchange (or at all, with ``require_secure_stats``),
    and a begin whose attempt is not above the last one begun with the same key (the same
    pair keys and exchange numbers would mask other data with the same masks)."""
    state = context.state
    for name in (records.roster, records.shifts):
        if name in state:
            del state[name]
    key = state.config_records.get(records.key)
    keyed = key is not None and int(key["round"]) == control.round
    if control.roster is None:
        if require_secure_stats:
            raise schema.ServerMessageError(
                f"begin of round {control.round} without a roster: this node requires secure statistics "
                "(require_secure_stats=True) and never sends its statistics in the clear"
            )
        if keyed:
            raise schema.ServerMessageError(
                f"begin of round {control.round} without a roster after this round's key exchange: the "
                "statistics would go out in the clear"
            )
        return
    if not keyed:
        raise secure.KeyAgreementError(
            f"node {context.node_id}: begin of round {control.round} with secure statistics, but this "
            "node holds no private key for that round (it missed the key exchange)"
        )
    begun = int(key.get("begun", -1))
    if control.attempt <= begun:
        raise schema.ServerMessageError(
            f"begin of round {control.round}, attempt {control.attempt}: this node already began attempt {begun} "
            "with this key; a repeated or earlier attempt would reuse its masks"
        )
    key["attempt"] = key["begun"] = control.attempt
    state[records.roster] = ArrayRecord({k: Array(v) for k, v in control.roster.to_arrays().items()})
    state[records.shifts] = ArrayRecord(
        {k: Array(v) for k, v in secure.shifts_to_arrays(control.shifts or {}).items()}
    )


def client_seed_key(context: Context) -> int:
    """What makes a client's batch seeds its own: its data partition when the node config
    names one (``partition-id``, as Flower's simulation does), else its node id."""
    partition = context.node_config.get("partition-id")
    return int(partition) if isinstance(partition, int) else int(context.node_id)


def _client_from(client_fn: Callable[[Context], Any], context: Context) -> FedTANClient:
    try:
        client = client_fn(context)
    # The reply goes to the server, which drops the node: say which node, and why.
    except InvalidArgumentsError as error:
        raise InvalidArgumentsError(f"node {context.node_id}: {error.owner}", error.problems) from error
    except UnsupportedModelError as error:
        named = UnsupportedModelError(f"node {context.node_id}: {error}")
        named.issues = error.issues
        raise named from error
    except ClientDataError as error:
        raise ClientDataError(f"node {context.node_id}: {error}") from error
    client = getattr(client, "numpy_client", client)  # accept NumPyClient.to_client()
    if not isinstance(client, FedTANClient):
        raise TypeError(f"FedTAN's client_fn must return a FedTANClient, got {type(client).__name__}")
    return client


@dataclass(frozen=True)
class _Options:
    """The app's settings as given in the code; environment overrides are applied per
    message (:mod:`flwr_fedtan.settings`)."""

    replay_store: Optional[str] = None
    state_dir: Optional[Union[str, os.PathLike]] = None
    max_live_rounds: Optional[int] = None
    live_home: Optional[str] = None
    require_secure_stats: bool = False

    def __post_init__(self) -> None:
        settings.check_replay_store(self.replay_store)
        settings.check_max_live_rounds(self.max_live_rounds)
        settings.check_live_home(self.live_home)


def add_fedtan(
    app: ClientApp,
    client_fn: Optional[Callable[[Context], FedTANClient]] = None,
    *,
    replay_store: Optional[str] = None,
    state_dir: Optional[Union[str, os.PathLike]] = None,
    max_live_rounds: Optional[int] = None,
    live_home: Optional[str] = None,
    require_secure_stats: bool = False,
) -> Any:
    """Add FedTAN to an existing message-API ``ClientApp``; the app's own handlers stay.

    Call it with the ``client_fn`` (``add_fedtan(app, client_fn)``), or use it as a
    decorator on the ``client_fn`` (``@add_fedtan(app)``).

    Registers one handler, for FedTAN's message type ``train.fedtan`` (what
    ``@app.train("fedtan")`` would register). Every handler the app already has, or gets
    later, is untouched: its ``@app.train()`` still serves Flower's ``FedAvg`` (and any
    other strategy), its ``@app.evaluate()`` serves evaluation, including the evaluation
    rounds of :class:`~flwr_fedtan.FedTAN`, which sends Flower's ordinary ``evaluate``
    messages. Mods given to ``ClientApp(mods=...)`` wrap FedTAN's handler too; Flower's
    differential-privacy mods act on messages of type ``train`` only and let
    ``train.fedtan`` pass unchanged.

    Parameters
    ----------
    app : ClientApp
        The app, built with handler decorators (``app = ClientApp()``, ``@app.train()``,
        ...); not a legacy ``ClientApp(client_fn=...)``.
    client_fn : Callable[[Context], FedTANClient], optional
        Builds the node's :class:`FedTANClient` from the context (model, data, settings).
        Called at the start of each round and whenever a round must be rebuilt in another
        process, so it must build the same client every time. Omitted: ``add_fedtan``
        returns a decorator that registers the function it decorates.
    replay_store : {"disk", "context"}, optional
        Where a round's starting weights are kept for replay in another process:
        ``"disk"`` (default: a node-local file under ``state_dir``) or ``"context"``
        (``context.state``, for multi-machine Ray clusters). ``FEDTAN_REPLAY_STORE``
        overrides it. See :mod:`flwr_fedtan.replay_store`.
    state_dir : str or os.PathLike, optional
        Base folder of the ``"disk"`` store's private files; default
        ``$XDG_RUNTIME_DIR/flwr-fedtan``, else ``<tempdir>/flwr-fedtan-<uid>``. ``FEDTAN_STATE_DIR`` overrides it.
    max_live_rounds : int, optional
        Paused rounds a process keeps in memory (an LRU shared by the process's nodes);
        default 16; ``0`` keeps none, so every message replays. ``FEDTAN_MAX_LIVE_ROUNDS``
        overrides it.
    live_home : {"auto", "process", "ray", "worker"}, optional
        Where a node's live rounds are kept between its messages (its *home*, see
        :mod:`flwr_fedtan.runtime`): ``"auto"`` (default) picks this process in a
        single-actor simulation, a Ray home actor when the simulation runs several
        ClientAppActors (or on a Ray cluster), and the node worker in a deployed
        ``flwr-clientapp`` process. ``FEDTAN_LIVE_HOME`` overrides it.
    require_secure_stats : bool (default: False)
        Refuse every round that would send this node's statistics in the clear (a begin
        without a roster): for nodes that must only take part under
        ``FedTAN(secure_stats=True)``, whatever the server asks.

    Returns
    -------
    ClientApp or decorator
        ``app`` itself; without ``client_fn``, a decorator that registers the function
        and returns it unchanged.

    Raises
    ------
    TypeError
        If ``app`` is not a ``ClientApp``.
    ValueError
        If ``app`` is a legacy ``ClientApp(client_fn=...)``, already handles
        ``train.fedtan``, or an option is invalid.

    Examples
    --------
    >>> app = ClientApp()
    >>> @app.train()
    ... def train(msg, context): ...       # your FedAvg training, unchanged
    >>> @add_fedtan(app)
    ... def client_fn(context):
    ...     trainloader, _ = load_data(context.node_config["partition-id"], ...)
    ...     return FedTANClient(Net(), trainloader, local_steps=len(trainloader))

    or, the same, ``add_fedtan(app, client_fn)`` after defining ``client_fn``.
    """
    if not isinstance(app, ClientApp):
        raise TypeError(f"add_fedtan needs a flwr.clientapp.ClientApp, got {type(app).__name__}")
    if getattr(app, "_call", None) is not None:
        raise ValueError(
            "add_fedtan needs a ClientApp whose handlers are registered with decorators "
            "(app = ClientApp(); @app.train() ...); a legacy ClientApp(client_fn=...) routes "
            "every message to its client_fn and cannot take one more handler. Use "
            "fedtan_client_app(client_fn) with a client_fn returning a FedTANClient instead"
        )
    if schema.MESSAGE_TYPE in getattr(app, "_registered_funcs", {}):
        raise ValueError(f"this ClientApp already handles {schema.MESSAGE_TYPE!r} (add_fedtan called twice?)")
    options = _Options(replay_store, state_dir, max_live_rounds, live_home, bool(require_secure_stats))
    if client_fn is None:

        def register(function: Callable[[Context], FedTANClient]) -> Callable[[Context], FedTANClient]:
            add_fedtan(
                app, function, replay_store=replay_store, state_dir=state_dir,
                max_live_rounds=max_live_rounds, live_home=live_home, require_secure_stats=require_secure_stats,
            )
            return function

        return register
    if not callable(client_fn):
        raise TypeError(f"add_fedtan: client_fn must be a function of the Context, got {type(client_fn).__name__}")

    @app.train(schema.ACTION)
    def fedtan_train(msg: Message, context: Context) -> Message:
        # Runs where the node's live rounds are kept (this process, a Ray home, the node worker).
        home = settings.live_home(options.live_home)
        return run_at_home(_handle_fedtan, msg, context, client_fn, options, home=home)

    return app


def fedtan_client_app(
    client_fn: Callable[[Context], FedTANClient],
    *,
    replay_store: Optional[str] = None,
    state_dir: Optional[Union[str, os.PathLike]] = None,
    max_live_rounds: Optional[int] = None,
    live_home: Optional[str] = None,
    require_secure_stats: bool = False,
) -> ClientApp:
    """A message-API ``ClientApp`` that serves every message FedTAN and FedAvg send.

    For apps that start from scratch; to keep an app's own handlers, use
    :func:`add_fedtan`.

    Parameters
    ----------
    client_fn : Callable[[Context], FedTANClient]
        Builds the node's client (model, data, settings) from the context, like the
        ``client_fn`` of a legacy ``ClientApp``.
    replay_store, state_dir, max_live_rounds, live_home, require_secure_stats
        As in :func:`add_fedtan` (environment variables override the first four).

    Returns
    -------
    ClientApp
        Handles ``train.fedtan`` (FedTAN rounds), ``train`` (ordinary local training with
        FedTAN's batch sampling, e.g. for Flower's FedAvg; metrics ``num-examples`` and
        ``train-loss``) and ``evaluate`` (:meth:`FedTANClient.evaluate`; metrics
        ``num-examples``, ``eval-loss``, ``eval-accuracy``).

    Examples
    --------
    >>> app = fedtan_client_app(client_fn)
    """
    app = add_fedtan(
        ClientApp(), client_fn, replay_store=replay_store, state_dir=state_dir,
        max_live_rounds=max_live_rounds, live_home=live_home, require_secure_stats=require_secure_stats,
    )

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


def _handle_fedtan(msg: Message, context: Context, client_fn: Callable[[Context], Any], options: _Options) -> Message:
    control = schema.decode_control(msg.content)
    if control.phase in schema.STATS_PHASES:
        return _handle_statistics(msg, context, client_fn, options, control)
    key = (context.run_id, context.node_id)
    state = context.state
    if control.phase == schema.PHASE_KEYS:
        pair = secure.generate_key_pair()
        state[SECURE_KEY] = ConfigRecord(
            {"round": control.round, "attempt": 0, "begun": -1, "private-key": pair.private}
        )
        return Message(schema.encode_public_key(control.round, pair.public), reply_to=msg)
    if control.phase == schema.PHASE_BLAME:
        return Message(schema.encode_canary_masks(control.round, _canary_masks(context, control)), reply_to=msg)
    cache = live_rounds()
    if control.phase == schema.PHASE_BEGIN:
        cache.forget(key)
        _begin_secure(context, control, options.require_secure_stats)
        client = _client_from(client_fn, context)
        arrays = msg.content.array_records[schema.ARRAYS]
        client.load_arrays(arrays)
        config = dict(msg.content.config_records.get(schema.CONFIG, ConfigRecord()))
        seed = derive_seed(control.seed, client_seed_key(context))
        batch = _batch_digest(client, seed)
        pooled = _pooled_batches(context, control)
        if control.roster is not None and batch in pooled:
            raise secure.SecureStatsError(
                f"node {context.node_id}: round {control.round} restarted (attempt {control.attempt}) on the same "
                "samples this node already pooled in an earlier attempt (its batch is all of its data): the "
                "difference of the two pooled sums would be the dropped clients' statistics; it sits this round out"
            )
        state[REPLAY_STATE] = ConfigRecord(
            {"round": control.round, "seed": seed, "sync-steps": control.sync_steps, "batch": batch,
             "pooled": pooled,
             "received": 0, "replays": 0, "sync-seconds": 0.0,
             "local-steps": int(config.get("local-steps", client.local_steps)),
             **({"lr": float(config["lr"])} if "lr" in config else {})}
        )
        state[REPLAY_LOG] = ArrayRecord()
        store = settings.replay_store(options.replay_store)
        save_weights(state, client.arrays(), store, context.run_id, context.node_id, directory=options.state_dir)
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
        cache.remember(key, live, capacity=settings.max_live_rounds(options.max_live_rounds))
        return _request_reply(msg, context, control.round, live.round, request)

    cache.forget(key)
    metrics = live.round.finish()
    replay = state.config_records[REPLAY_STATE]
    metrics["sync-seconds"] = float(replay["sync-seconds"])
    metrics["replays"] = float(replay["replays"])
    del state[REPLAY_LOG]
    discard_weights(state)
    _forget_secure(state)
    content = schema.encode_done(control.round, live.client.arrays(), MetricRecord(metrics))
    return Message(content, reply_to=msg)


def _batch_digest(client: FedTANClient, seed: int) -> str:
    """Which samples the round's first synchronised step uses (a digest of their indices)."""
    indices = sorted(client.batch_indices(derive_seed(seed, 0)))
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()


def _pooled_batches(context: Context, control: schema.Control) -> list[str]:
    """Digests of the batches this node pooled in earlier attempts of the round, i.e. whose
    aggregates it received. With secure statistics a restart on one of them is refused:
    the survivors' sums over the same model and data, subtracted from the earlier ones,
    would be the dropped clients' statistics."""
    previous = context.state.config_records.get(REPLAY_STATE)
    if previous is None or int(previous["round"]) != control.round:
        return []
    pooled = [str(b) for b in previous.get("pooled", [])]
    if int(previous["received"]) > 0 and "batch" in previous and previous["batch"] not in pooled:
        pooled.append(str(previous["batch"]))
    return pooled


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


# ---------------------------------------------------------------------- statistics pass
def _handle_statistics(
    msg: Message, context: Context, client_fn: Callable[[Context], Any], options: _Options, control: schema.Control
) -> Message:
    """One message of a statistics pass (:mod:`flwr_fedtan.statistics_pass`): kept live in
    the node's home like a round, rebuilt from the stored global weights, seed and pooled
    statistics so far when the message lands elsewhere."""
    state = context.state
    key = (context.run_id, context.node_id, "stats")
    cache = live_rounds()
    if control.phase == schema.PHASE_STATS_KEYS:
        pair = secure.generate_key_pair()
        state[_PASS_SECURE.key] = ConfigRecord({"round": control.round, "attempt": 0, "private-key": pair.private})
        return Message(schema.encode_public_key(control.round, pair.public), reply_to=msg)
    if control.phase == schema.PHASE_STATS_BEGIN:
        cache.forget(key)
        _begin_secure(context, control, options.require_secure_stats, _PASS_SECURE)
        client = _client_from(client_fn, context)
        client.load_arrays(msg.content.array_records[schema.ARRAYS])
        seed = derive_seed(control.seed, client_seed_key(context))
        state[STATS_STATE] = ConfigRecord(
            {"round": control.round, "seed": seed, "examples": control.examples, "received": 0, "replays": 0}
        )
        state[STATS_LOG] = ArrayRecord()
        store = settings.replay_store(options.replay_store)
        save_weights(state, client.arrays(), store, context.run_id, context.node_id, directory=options.state_dir)
        live = _LivePass(client, client.statistics_pass(seed, control.examples), control.round)
        try:
            request = live.stats_pass.start()
        except BaseException:
            live.close()
            raise
    else:
        progress = state.config_records.get(STATS_STATE)
        if progress is None or int(progress["round"]) != control.round:
            raise RuntimeError(
                f"node {context.node_id} got statistics for the pass of round {control.round} but holds no "
                f"state for it (state round: {None if progress is None else progress['round']})"
            )
        received = int(progress["received"])
        if control.point != received:
            raise RuntimeError(
                f"node {context.node_id}: pooled statistics {control.point} of the pass of round "
                f"{control.round}, but {received} were received so far"
            )
        live = cache.get(key)  # type: ignore[assignment]
        if (
            not isinstance(live, _LivePass)
            or live.server_round != control.round
            or len(live.stats_pass.received) != received
            or live.thread is not threading.current_thread()
        ):
            cache.forget(key)
            live = _rebuild_pass(context, client_fn, progress)
        try:
            request = live.stats_pass.resume(control.aggregate)  # type: ignore[arg-type]
        except BaseException:
            cache.forget(key)
            live.close()
            raise
        _log_append(state, received, control.aggregate, STATS_LOG)  # type: ignore[arg-type]
        progress["received"] = received + 1
    if request is not None:
        cache.remember(key, live, capacity=settings.max_live_rounds(options.max_live_rounds))
        point, payload = request
        if _PASS_SECURE.roster in state.array_records:
            payload = _masked(context, control.round, 0, point, payload, _PASS_SECURE, STATS_STATE)
        return Message(schema.encode_request(control.round, 0, point, payload), reply_to=msg)
    cache.forget(key)
    stats_pass = live.stats_pass
    for name in (STATS_LOG, _PASS_SECURE.key, _PASS_SECURE.roster, _PASS_SECURE.shifts):
        if name in state:
            del state[name]
    discard_weights(state)
    content = schema.encode_stats_done(control.round, stats_pass.buffer_calls or {}, stats_pass.num_examples)
    return Message(content, reply_to=msg)


def _rebuild_pass(context: Context, client_fn: Callable[[Context], Any], progress: ConfigRecord) -> _LivePass:
    """Rebuild a statistics pass in this process from ``context.state``."""
    state = context.state
    client = _client_from(client_fn, context)
    client.load_arrays(load_weights(state))
    inputs, _ = client.sample_batch(int(progress["seed"]), int(progress["examples"]))
    aggregates = _log_read(state, int(progress["received"]), STATS_LOG)
    stats_pass, request = StatisticsPass.replay(
        client.model, inputs, aggregates, seed=int(progress["seed"])  # type: ignore[arg-type]
    )
    if request is None:
        stats_pass.close()
        raise RuntimeError("replayed statistics pass completed before the pending statistics: state is inconsistent")
    progress["replays"] = int(progress["replays"]) + 1
    return _LivePass(client, stats_pass, int(progress["round"]))
