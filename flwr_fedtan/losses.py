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
of its batch or per-sample losses (a plain callable that sums is indistinguishable from
one that averages, and would weigh each sample by its own client's batch size).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from .batchnorm import ModelIssue, UnsupportedModelError

__all__ = ["loss_issues", "loss_reduction", "reduce_loss"]

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
