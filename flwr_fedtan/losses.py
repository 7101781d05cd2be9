"""What a loss means to a synchronised step: the objective over the pooled batch.

A synchronised step makes the clients' gradients sum to the gradient of one objective
over the pooled batch of all clients. That objective is the *mean* of the per-sample
losses (the usual ``reduction="mean"``), or their *sum* for a loss with
``reduction="sum"``. A loss function may return:

- a scalar: the mean loss of the client's batch (or its sum, for ``reduction="sum"``);
- per-sample losses (``reduction="none"``), shape ``(n_k, ...)``: the step forms the mean
  over the pooled batch itself (all elements weigh alike, as in ``reduction="mean"``).

The reduction is read from the loss module's ``reduction`` attribute (``nn.*Loss``) or a
``functools.partial``'s ``reduction`` keyword; a plain callable must return the mean loss
of its batch or per-sample losses. A scalar loss that sums without declaring it would weigh
each sample by its own client's batch size; :func:`summed_loss_issue` tells it apart by
the loss alone, with no forward pass: on a batch repeated twice a mean is unchanged and a
sum doubles (:func:`~flwr_fedtan.batchnorm.validate` probes synthetic logits, a round its
first real outputs).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

from .errors import ModelIssue, UnsupportedModelError

__all__ = ["loss_issues", "loss_reduction", "probe_loss", "reduce_loss", "summed_loss_issue"]

_MEAN_LIKE = {"mean", "batchmean", "elementwise_mean", "none"}


def _declared(loss_fn: Callable[..., Any], name: str) -> Any:
    if isinstance(loss_fn, functools.partial):
        if name in loss_fn.keywords:
            return loss_fn.keywords[name]
        return _declared(loss_fn.func, name)
    return getattr(loss_fn, name, None)


def loss_issues(loss_fn: Callable[..., Any]) -> list[ModelIssue]:
    """Why ``loss_fn`` cannot be synchronised exactly, each with its fix (empty if it can)."""
    reduction = _declared(loss_fn, "reduction")
    issues = []
    if reduction is not None and reduction not in _MEAN_LIKE | {"sum"}:
        issues.append(ModelIssue(
            "loss_fn", f"unknown reduction {reduction!r}", "use reduction 'mean', 'sum' or 'none'"
        ))
    weighted = _declared(loss_fn, "weight") is not None
    classes = (nn.CrossEntropyLoss, nn.NLLLoss)
    is_class_loss = isinstance(loss_fn, classes) or (
        isinstance(loss_fn, functools.partial)
        and getattr(loss_fn.func, "__name__", "") in ("cross_entropy", "nll_loss")
    )
    if weighted and is_class_loss and reduction in (None, "mean"):
        issues.append(ModelIssue(
            "loss_fn",
            "class-weighted cross-entropy with reduction='mean' divides by the batch's sum of "
            "weights, which no per-client mean reproduces",
            "use reduction='sum' (objective: the pooled sum of weighted losses), or unweighted",
        ))
    return issues


def loss_reduction(loss_fn: Callable[..., Any]) -> str:
    """``"mean"`` or ``"sum"``: the objective ``loss_fn`` declares over the pooled batch.

    Raises
    ------
    UnsupportedModelError
        If :func:`loss_issues` finds anything.
    """
    issues = loss_issues(loss_fn)
    if issues:
        raise UnsupportedModelError(issues)
    return "sum" if _declared(loss_fn, "reduction") == "sum" else "mean"


def reduce_loss(loss: Any, num_examples: int, reduction: str) -> torch.Tensor:
    """The client's scalar loss (its mean, or its sum for ``reduction="sum"``) from what a
    loss function returned: a scalar, or per-sample losses of shape ``(num_examples, ...)``."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the loss must be a tensor, got {type(loss).__name__}")
    if loss.dim() == 0:
        return loss
    if loss.numel() == 1:
        return loss.reshape(())
    if loss.dim() >= 1 and loss.shape[0] == num_examples:
        return loss.mean() if reduction == "mean" else loss.sum()
    raise TypeError(
        f"the loss must be a scalar (the batch's mean loss, or its sum with reduction='sum') "
        f"or per-sample losses of shape ({num_examples}, ...); got shape {tuple(loss.shape)}"
    )


_PROBE_TOLERANCE = 1e-4


def summed_loss_issue(
    loss_fn: Callable[..., Any], outputs: torch.Tensor, targets: torch.Tensor, declared: Optional[str] = None
) -> Optional[ModelIssue]:
    """The issue when ``loss_fn`` sums where it declares a mean (or the reverse), else ``None``.

    ``loss_fn`` is called on ``(outputs, targets)`` and on both repeated twice, without
    gradients: a mean (or per-sample losses) gives the same value, a sum twice the value.
    Inconclusive (``None``): the loss fails on them, returns per-sample losses, zero, a
    non-finite value, or neither relation holds (a loss coupling the samples).
    ``declared`` defaults to :func:`loss_reduction`'s reading of ``loss_fn``.
    """
    declared = declared or loss_reduction(loss_fn)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. broadcasting warnings on a probe that does not fit
            once = loss_fn(outputs, targets)
            twice = loss_fn(torch.cat([outputs, outputs]), torch.cat([targets, targets]))
    except Exception:  # noqa: BLE001 - a probe the loss cannot take says nothing about it
        return None
    if not all(isinstance(v, torch.Tensor) and v.numel() == 1 for v in (once, twice)):
        return None
    single, double = float(once), float(twice)
    if not (math.isfinite(single) and math.isfinite(double)) or abs(single) < 1e-12:
        return None
    sums = math.isclose(double, 2 * single, rel_tol=_PROBE_TOLERANCE)
    averages = math.isclose(double, single, rel_tol=_PROBE_TOLERANCE)
    if declared == "mean" and sums:
        return ModelIssue(
            "loss_fn",
            "it returns the batch's sum (twice the value on the batch repeated twice) but declares no "
            "reduction='sum', so a synchronised step would weigh each sample by its own client's batch size",
            "declare the sum (nn.CrossEntropyLoss(reduction='sum'), functools.partial(F.cross_entropy, "
            "reduction='sum'), or a reduction='sum' attribute on the callable), return the batch's mean, "
            "or return per-sample losses (reduction='none')",
        )
    if declared == "sum" and averages:
        return ModelIssue(
            "loss_fn",
            "it declares reduction='sum' but returns the batch's mean (the same value on the batch "
            "repeated twice)",
            "declare reduction='mean' (or none), or make it return the batch's sum",
        )
    return None


def probe_loss(loss_fn: Callable[..., Any]) -> Optional[ModelIssue]:
    """:func:`summed_loss_issue` on synthetic data: logits with class targets, then
    outputs with same-shaped float targets; the first pair the loss takes decides."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, generator=generator)
    pairs = ((logits, torch.tensor([0, 2, 1, 0])), (logits, torch.randn(4, 3, generator=generator)))
    declared = loss_reduction(loss_fn)
    for outputs, targets in pairs:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                value = loss_fn(outputs, targets)
        except Exception:  # noqa: BLE001 - this loss does not take this kind of pair
            continue
        if isinstance(value, torch.Tensor) and value.numel() >= 1:
            return summed_loss_issue(loss_fn, outputs, targets, declared)
    return None
