"""Flower client side of FedTAN: :class:`FedTANClient`, a ``NumPyClient`` with the model,
the data, the seeded batches and evaluation (its data handling and :func:`evaluate_model`
are in :mod:`flwr_fedtan.client_data`).

The ``ClientApp`` that serves FedTAN's messages is built by :mod:`flwr_fedtan.clientapp`
(:func:`~flwr_fedtan.add_fedtan`, :func:`~flwr_fedtan.fedtan_client_app`); a node's side
of the exchanges is :mod:`flwr_fedtan.node.session`.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections import OrderedDict
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context
from flwr.client import NumPyClient
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .batchnorm import convert_batchnorm, validate
from .client_checks import check_client_arguments, check_training_data
from .client_data import LossFn, UnpackBatch, as_dataset, collate_fn_of, evaluate_model, training_data, unpack
from .errors import ClientDataError, InvalidArgumentsError, UnsupportedModelError
from .runtime import live_rounds
from .statistics_pass import StatisticsPass
from .training import ClientRound

__all__ = ["FedTANClient", "clear_live_rounds", "client_seed_key", "evaluate_model"]

log = logging.getLogger(__name__)

# The node whose client_fn is running (set by _client_from): a FedTANClient built for a
# node checks its training data once per process, not at every message (or replay).
_building_for: contextvars.ContextVar[Optional[tuple[int, int]]] = contextvars.ContextVar(
    "fedtan_building_for", default=None
)
_CHECKED_DATA: "OrderedDict[tuple, None]" = OrderedDict()
_CHECKED_DATA_CAPACITY = 1024
_checked_lock = threading.Lock()


class FedTANClient(NumPyClient):
    """A Flower ``NumPyClient`` that trains a BatchNorm model the FedTAN way.

    It replaces the app's own training loop for FedTAN rounds: each step's batch is drawn
    from a seed derived from the server's run seed, the round and the attempt (``batch_size``
    distinct samples of ``train_data``, not the DataLoader's sampler or shuffling), so that
    a paused step can be rebuilt identically in another process; the optimiser is built afresh every round; the train
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
        self.train_data, self.batch_size, self.collate_fn = training_data(train_data, batch_size)
        self.model = convert_batchnorm(model).to(self.device)
        if test_data is None:
            self.test_data, self.test_collate_fn = self.train_data, self.collate_fn
        else:
            self.test_data, self.test_collate_fn = as_dataset(test_data, "test_data"), collate_fn_of(test_data)
        self.loss_fn: LossFn = loss_fn or nn.functional.cross_entropy
        # Refuse up front what a synchronised step cannot do exactly, every issue with its fix.
        validate(self.model, self.loss_fn, strict=True)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.local_steps = int(local_steps)
        self.eval_batch_size = eval_batch_size
        self.optimizer_fn = optimizer_fn
        self.unpack_batch = unpack_batch
        key = self._data_check_key()
        with _checked_lock:
            checked = key is not None and key in _CHECKED_DATA
        if not checked:
            check_training_data(self.model, self.train_data, self._collated, self.loss_fn, self.batch_size)
            if key is not None:
                with _checked_lock:
                    _CHECKED_DATA[key] = None
                    while len(_CHECKED_DATA) > _CHECKED_DATA_CAPACITY:
                        _CHECKED_DATA.popitem(last=False)

    def _data_check_key(self) -> Optional[tuple]:
        """What the data checks of a client built for a node depend on: the node, the data's
        kind, size and tensor layout, the model's layout, the loss and the batching. ``None``
        outside a node's client_fn (a client built directly is always checked).

        A node's client_fn builds the same client at every message (its documented
        contract), so the checks of its first construction in a process hold for the next."""
        node = _building_for.get()
        if node is None:
            return None
        data = self.train_data
        tensors = getattr(data, "tensors", None)
        layout = tuple((tuple(t.shape), str(t.dtype)) for t in tensors) if isinstance(tensors, tuple) else ()
        model = tuple((name, tuple(value.shape), str(value.dtype)) for name, value in self.model.state_dict().items())
        functions = tuple(
            (type(f), getattr(f, "__code__", f)) for f in (self.loss_fn, self.collate_fn, self.unpack_batch)
        )
        return (node, type(data), len(data), layout, type(self.model), model, functions,  # type: ignore[arg-type]
                self.batch_size, str(self.device))

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
        return unpack(batch, self.unpack_batch)

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


def clear_live_rounds() -> None:
    """Drop every live round of this process, and what it remembers of the nodes' data
    checks (e.g. between tests)."""
    live_rounds().clear()
    with _checked_lock:
        _CHECKED_DATA.clear()


def client_seed_key(context: Context) -> int:
    """What makes a client's batch seeds its own: its data partition when the node config
    names one (``partition-id``, as Flower's simulation does), else its node id."""
    partition = context.node_config.get("partition-id")
    return int(partition) if isinstance(partition, int) else int(context.node_id)


def _client_from(client_fn: Callable[[Context], Any], context: Context) -> FedTANClient:
    token = _building_for.set((int(context.run_id), int(context.node_id)))
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
    finally:
        _building_for.reset(token)
    client = getattr(client, "numpy_client", client)  # accept NumPyClient.to_client()
    if not isinstance(client, FedTANClient):
        raise TypeError(f"FedTAN's client_fn must return a FedTANClient, got {type(client).__name__}")
    return client


