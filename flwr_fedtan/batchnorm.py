"""FedTAN's BatchNorm layer, the optional model conversion, and model validation.

Inside a synchronised step (see :mod:`flwr_fedtan.step`) every batch-statistics call of
``F.batch_norm`` / ``torch.batch_norm`` is intercepted and normalises with the statistics
of the pooled batch of all clients, whichever module (or hand-written code) makes it. So a
model needs no conversion. :class:`FedTANBatchNorm` and :func:`convert_batchnorm` remain for
models that must not depend on ``torch.distributed`` (a ``SyncBatchNorm`` inside an
initialised process group would synchronise over the process group instead) and for code
written against earlier versions; :func:`validate` lists what FedTAN refuses, with fixes.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase

from .errors import ModelIssue, UnsupportedModelError
from .losses import loss_issues, probe_loss

__all__ = [
    "FedTANBatchNorm", "check_model", "convert_batchnorm", "validate",
]


# Input ranks the original layer types accept; ``None`` means "any rank >= 2".
_INPUT_DIMS = {
    nn.BatchNorm1d: (2, 3),
    nn.BatchNorm2d: (4,),
    nn.BatchNorm3d: (5,),
    nn.SyncBatchNorm: None,
}


class FedTANBatchNorm(_BatchNorm):
    r"""BatchNorm whose batch statistics can be those of the pooled batch of all clients.

    A plain ``_BatchNorm`` that accepts the input ranks of the layer it replaced and never
    synchronises over ``torch.distributed``. Outside a synchronised step it computes
    exactly what the replaced layer computes, in training and in evaluation. Inside a
    synchronised step (a :class:`~flwr_fedtan.step.SyncStep` running its forward code) a
    call that normalises with batch statistics (training mode, or
    ``track_running_stats=False``) becomes one forward sync point and, later, one backward
    sync point of that step, like any other BatchNorm.

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


def _replacement_for(module: _BatchNorm) -> FedTANBatchNorm:
    if isinstance(module, _LazyNormBase) and module.has_uninitialized_params():
        raise UnsupportedModelError(
            f"{type(module).__name__} is still uninitialised: run one forward pass "
            "(or replace it by a BatchNorm with a fixed num_features) before convert_batchnorm"
        )
    input_dims = _INPUT_DIMS[type(module)]
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
    """Replace every ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` of ``module`` by a
    :class:`FedTANBatchNorm` (optional: a synchronised step intercepts BatchNorm wherever
    it is computed).

    Works like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: the replacement
    shares the original parameters and buffers, so ``state_dict`` keys, shapes and dtypes
    (and any optimiser built on the parameters) are unchanged. Only layers of exactly those
    four classes are replaced: a subclass (timm's ``BatchNormAct2d``, which applies an
    activation after normalising) keeps its own behaviour and is synchronised as it is.

    Parameters
    ----------
    module : nn.Module
        A model, or a single BatchNorm layer.

    Returns
    -------
    nn.Module
        ``module`` itself with its BatchNorm children replaced, or the replacement layer
        when ``module`` is a BatchNorm layer of one of the four classes.

    Raises
    ------
    UnsupportedModelError
        For a lazy BatchNorm that has not been initialised yet.

    Examples
    --------
    >>> model = convert_batchnorm(torchvision.models.resnet18())
    """
    if isinstance(module, _LazyNormBase) and module.has_uninitialized_params():
        return _replacement_for(cast(_BatchNorm, module))  # raises, naming the fix
    if type(module) in _INPUT_DIMS:
        return _replacement_for(cast(_BatchNorm, module))
    for name, child in module.named_children():
        converted = convert_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


def _defining_class(cls: type, name: str) -> Any:
    return next(klass for klass in cls.__mro__ if name in vars(klass))


@functools.lru_cache(maxsize=None)
def _calls_batch_norm(cls: Any) -> bool:
    """Whether ``cls.forward`` (a BatchNorm subclass's own) visibly reaches F.batch_norm."""
    try:
        source = inspect.getsource(_defining_class(cls, "forward").forward)
    except (OSError, TypeError):
        return True  # no source to read (compiled, dynamic): trust it
    return "batch_norm" in source or "super(" in source


def validate(
    model: nn.Module, loss_fn: Optional[Callable[..., Any]] = None, *, strict: bool = False
) -> list[ModelIssue]:
    """Every reason ``model`` (and ``loss_fn``) cannot run a synchronised step exactly,
    each with its module name and its fix.

    Opacus-style: the whole model is inspected before any round, so that a round never
    fails mid-way for a reason known at the start. Found here:

    - a lazy BatchNorm not initialised yet;
    - a BatchNorm subclass whose own ``forward`` never calls ``F.batch_norm`` (nothing to
      intercept: it would normalise with local statistics);
    - a ``SyncBatchNorm`` while ``torch.distributed`` is initialised (it would synchronise
      over the process group instead);
    - activation checkpointing switched on in a module (``grad_checkpointing`` as in timm,
      ``gradient_checkpointing`` as in Hugging Face);
    - with ``loss_fn``: a reduction that has no exact pooled form (see
      :func:`flwr_fedtan.losses.loss_issues`), and a scalar loss that sums without declaring
      ``reduction="sum"`` (probed on synthetic logits, no forward pass:
      :func:`flwr_fedtan.losses.probe_loss`).

    Caught when the step runs instead, before the call's statistics leave the client:
    ``torch.utils.checkpoint`` around a BatchNorm call, a BatchNorm ``weight``/``bias``
    computed in the forward rather than passed as a leaf tensor, and an undeclared summing
    loss the synthetic probe could not judge (probed on a round's first real outputs).

    Parameters
    ----------
    model : nn.Module
        The model a client will train.
    loss_fn : Optional[Callable]
        The loss function it will train with, if known.
    strict : bool
        Raise :class:`UnsupportedModelError` (listing every issue) instead of returning
        the list when there is any.

    Returns
    -------
    list[ModelIssue]
        Empty when the model is supported.
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    issues = []
    for name, module in model.named_modules():
        name = name or "<model>"
        kind = type(module).__name__
        for flag in ("grad_checkpointing", "gradient_checkpointing"):
            if getattr(module, flag, False) is True:
                issues.append(ModelIssue(
                    name, f"activation checkpointing is on ({kind}.{flag} = True): its recomputation in "
                    "the backward pass would normalise with local statistics",
                    "turn it off for FedTAN (timm: model.set_grad_checkpointing(False); Hugging Face: "
                    "model.gradient_checkpointing_disable())",
                ))
        if not isinstance(module, _BatchNorm):
            continue
        if isinstance(module, _LazyNormBase) and module.has_uninitialized_params():
            issues.append(ModelIssue(
                name, f"{kind} is still uninitialised",
                "run one forward pass (or use a BatchNorm with a fixed num_features) first",
            ))
        elif distributed and isinstance(module, nn.SyncBatchNorm) and not isinstance(module, FedTANBatchNorm):
            issues.append(ModelIssue(
                name, f"{kind} would synchronise over the initialised torch.distributed process group",
                "call flwr_fedtan.convert_batchnorm(model) first",
            ))
        elif type(module) not in _INPUT_DIMS and not _calls_batch_norm(cast(Any, type(module))):  # a class: hashable
            issues.append(ModelIssue(
                name, f"BatchNorm subclass {kind} overrides forward without calling F.batch_norm, so "
                "FedTAN cannot give it the pooled statistics",
                "compute the normalisation with torch.nn.functional.batch_norm in its forward",
            ))
    if loss_fn is not None:

        declared = loss_issues(loss_fn)
        issues.extend(declared)
        summed = None if declared else probe_loss(loss_fn)
        if summed is not None:
            issues.append(summed)
    if strict and issues:
        raise UnsupportedModelError(issues)
    return issues


def check_model(model: nn.Module, loss_fn: Optional[Callable[..., Any]] = None) -> None:
    """Raise :class:`UnsupportedModelError` listing every issue :func:`validate` finds."""
    validate(model, loss_fn, strict=True)
