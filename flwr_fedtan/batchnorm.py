"""FedTAN's BatchNorm layer and the model conversion.

:class:`FedTANBatchNorm` is a drop-in replacement for ``nn.BatchNorm1d/2d/3d`` and
``nn.SyncBatchNorm``: same ``state_dict`` keys, shapes and dtypes, and the very same
computation outside a synchronised step. Inside a synchronised step (see
:mod:`flwr_fedtan.step`) it hands its per-channel statistics to the step, which pauses
until the statistics of the pooled batch of all clients come back.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase

__all__ = [
    "FedTANBatchNorm", "ModelIssue", "UnsupportedModelError", "check_model", "convert_batchnorm", "validate",
]


class UnsupportedModelError(ValueError):
    """A model or layer configuration FedTAN cannot synchronise.

    ``issues`` lists every :class:`ModelIssue` found (empty when raised for one layer).
    """

    def __init__(self, issues: "str | list[ModelIssue]") -> None:
        if isinstance(issues, str):
            self.issues: list[ModelIssue] = []
            super().__init__(issues)
        else:
            self.issues = list(issues)
            super().__init__(
                f"FedTAN cannot synchronise this model ({len(self.issues)} issue"
                + ("s" if len(self.issues) != 1 else "") + "):\n"
                + "\n".join(f"- {issue}" for issue in self.issues)
            )


# A context variable, not a thread-local: a step's forward runs in its own greenlet, which
# has its own context, on the thread of the code driving the step.
_active_step: contextvars.ContextVar[Optional[Any]] = contextvars.ContextVar(
    "fedtan_active_step", default=None
)


def active_step() -> Optional[Any]:
    """Return the synchronised step whose forward code is running here, or ``None``."""
    return _active_step.get()


def _set_active_step(step: Optional[Any]) -> None:
    _active_step.set(step)


# Input ranks the original layer types accept; ``None`` means "any rank >= 2".
_INPUT_DIMS = {
    nn.BatchNorm1d: (2, 3),
    nn.BatchNorm2d: (4,),
    nn.BatchNorm3d: (5,),
    nn.SyncBatchNorm: None,
}


class FedTANBatchNorm(_BatchNorm):
    r"""BatchNorm whose batch statistics can be those of the pooled batch of all clients.

    Outside a synchronised step the layer computes exactly what the layer it replaced
    computes, in training and in evaluation. Inside a synchronised step (a
    :class:`~flwr_fedtan.step.SyncStep` running its forward code) a call that
    normalises with batch statistics (training mode, or ``track_running_stats=False``)
    becomes one forward sync point and, later, one backward sync point of that step.

    Parameters
    ----------
    num_features : int
        Number of channels ``C`` of the expected input ``(N, C, *)``.
    eps : float
        Added to the variance for numerical stability.
    momentum : Optional[float]
        Running statistics update factor; ``None`` means a cumulative moving average.
    affine : bool
        Whether the layer has learnable ``weight`` (gamma) and ``bias`` (beta).
    track_running_stats : bool
        Whether the layer keeps running statistics.
    input_dims : Optional[tuple of int]
        Input ranks accepted, as the replaced layer accepted them (``(4,)`` for
        ``BatchNorm2d``); ``None`` accepts any rank >= 2.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        input_dims: Optional[tuple[int, ...]] = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.input_dims = input_dims

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if self.input_dims is None:
            if input.dim() < 2:
                raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        elif input.dim() not in self.input_dims:
            wanted = " or ".join(f"{d}D" for d in self.input_dims)
            raise ValueError(f"expected {wanted} input (got {input.dim()}D input)")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", input_dims={self.input_dims}"

    def uses_batch_statistics(self) -> bool:
        """Whether a call normalises with batch statistics (and so must be synchronised)."""
        return self.training or not self.track_running_stats

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        step = active_step()
        if step is None or not self.uses_batch_statistics():
            return super().forward(input)
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__} expects {self.num_features} channels, "
                f"got input of shape {tuple(input.shape)}"
            )
        return step.sync_forward(self, input)


def _replacement_for(module: _BatchNorm) -> FedTANBatchNorm:
    if isinstance(module, _LazyNormBase) and module.has_uninitialized_params():
        raise UnsupportedModelError(
            f"{type(module).__name__} is still uninitialised: run one forward pass "
            "(or replace it by a BatchNorm with a fixed num_features) before convert_batchnorm"
        )
    input_dims = None
    for cls, dims in _INPUT_DIMS.items():
        if isinstance(module, cls):
            input_dims = dims
            break
    else:
        if not isinstance(module, FedTANBatchNorm):
            raise UnsupportedModelError(
                f"unknown BatchNorm subclass {type(module).__name__}: FedTAN knows "
                "BatchNorm1d/2d/3d and SyncBatchNorm; convert a subclass by hand"
            )
    ref = module.weight if module.affine else module.running_mean
    new = FedTANBatchNorm(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        input_dims=input_dims,
        device=ref.device if ref is not None else None,
        dtype=ref.dtype if ref is not None else None,
    )
    if module.affine:
        # Keep the very Parameter objects, so optimisers built beforehand still see them.
        new.weight = module.weight
        new.bias = module.bias
    if module.track_running_stats:
        new.running_mean = module.running_mean
        new.running_var = module.running_var
        new.num_batches_tracked = module.num_batches_tracked
    new.train(module.training)
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` by a :class:`FedTANBatchNorm`.

    Works like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: the replacement
    shares the original parameters and buffers, so ``state_dict`` keys, shapes and dtypes
    (and any optimiser built on the parameters) are unchanged.

    Parameters
    ----------
    module : nn.Module
        A model, or a single BatchNorm1d/2d/3d or SyncBatchNorm layer.

    Returns
    -------
    nn.Module
        ``module`` itself with its BatchNorm children replaced, or the replacement layer
        when ``module`` is a BatchNorm layer.

    Examples
    --------
    >>> model = convert_batchnorm(torchvision.models.resnet18())
    """
    if isinstance(module, FedTANBatchNorm):
        return module
    if isinstance(module, _BatchNorm):
        return _replacement_for(module)
    for name, child in module.named_children():
        converted = convert_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


@dataclass(frozen=True)
class ModelIssue:
    """One thing FedTAN cannot synchronise in a model, where it is, and how to fix it."""

    module: str  # qualified module name ("<model>" for the model itself)
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.module}: {self.problem}. Fix: {self.fix}"


def validate(model: nn.Module, *, strict: bool = False) -> list[ModelIssue]:
    """Every reason ``model`` cannot run a synchronised step, each with its fix.

    Opacus-style: the whole model is inspected before any round, so that a round never
    fails mid-way for a reason known at the start.

    Parameters
    ----------
    model : nn.Module
        The model a client will train.
    strict : bool
        Raise :class:`UnsupportedModelError` (listing every issue) instead of returning
        the list when there is any.

    Returns
    -------
    list[ModelIssue]
        Empty when the model is supported.
    """
    issues = []
    for name, module in model.named_modules():
        name = name or "<model>"
        if not isinstance(module, _BatchNorm) or isinstance(module, FedTANBatchNorm):
            continue
        if isinstance(module, _LazyNormBase) and module.has_uninitialized_params():
            issues.append(ModelIssue(
                name, f"{type(module).__name__} is still uninitialised",
                "run one forward pass (or use a BatchNorm with a fixed num_features) first",
            ))
        elif not any(isinstance(module, cls) for cls in _INPUT_DIMS):
            issues.append(ModelIssue(
                name, f"unknown BatchNorm subclass {type(module).__name__}",
                "replace it by nn.BatchNorm1d/2d/3d or convert it by hand",
            ))
        else:
            issues.append(ModelIssue(
                name, f"{type(module).__name__} is not converted",
                "call flwr_fedtan.convert_batchnorm(model) first",
            ))
    if strict and issues:
        raise UnsupportedModelError(issues)
    return issues


def check_model(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` listing every issue :func:`validate` finds."""
    validate(model, strict=True)
