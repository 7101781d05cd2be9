"""Per-call BatchNorm arithmetic of a synchronised step.

Everything a synchronised BatchNorm call computes on its own client: the local per-channel
moments it sends, the normalisation with the pooled statistics it gets back, the local
backward sums ``(sum g, sum g * x_hat)`` and, once the sums over all clients are known, the
gradient with respect to its input. Per-channel vectors are handled as float64 NumPy arrays
(C-sized, where a torch op each would cost more in dispatch than in arithmetic); the
activations go through PyTorch's own fused BatchNorm kernels.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

__all__ = [
    "channel_moments",
    "normalize",
    "to_numpy",
    "to_vector",
    "parameter_dtype",
    "local_backward_sums",
    "input_gradient",
]

_NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


def channel_shape(x: torch.Tensor) -> list[int]:
    """The shape that broadcasts a per-channel vector against ``x`` (N, C, *)."""
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def normalize(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel, by PyTorch's fused
    inference-mode BatchNorm kernel: one pass, several times faster on CPU than the same
    arithmetic as broadcast elementwise ops. Not cuDNN, which rejects ``eps`` below 1e-5."""
    return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x`` (N, C, *).

    On CPU, the fused statistics kernel PyTorch's own BatchNorm uses in training (so the
    same rounding as centralised training). Elsewhere the corrected two-pass algorithm,
    which is as accurate as ``torch.var_mean``. Half and bfloat16 inputs get float32
    statistics, as PyTorch's own BatchNorm computes them.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if x.device.type == "cpu":
        return torch.batch_norm_update_stats(x, None, None, 0.0)
    dims = _reduce_dims(x)
    n = x.numel() // x.shape[1]
    with torch.no_grad():
        mean = x.sum(dims, keepdim=True).div_(n)
        centred = x - mean
        residual = centred.sum(dims).div_(n)  # what rounding left of the mean
        var = centred.mul_(centred).sum(dims).div_(n).sub_(residual * residual)
    return mean.view(-1).add_(residual), var.clamp_(min=0)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A float64 NumPy copy of a (small) tensor."""
    if t.dtype not in _NUMPY_DTYPES:
        t = t.float()
    return t.numpy(force=True).astype(np.float64)


def to_vector(values: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` (per-channel, one row per quantity) as one tensor: a single conversion,
    as small ops cost more in dispatch than in work."""
    if device.type == "cpu" and dtype in _NUMPY_DTYPES:
        return torch.from_numpy(values.astype(_NUMPY_DTYPES[dtype]))
    return torch.as_tensor(values, dtype=dtype, device=device)


def parameter_dtype(weight: Optional[torch.Tensor], x: torch.Tensor) -> torch.dtype:
    """The dtype per-channel arguments of BatchNorm kernels must have for input ``x``: the
    weight's, else float32 for half and bfloat16 inputs (the mixed-precision kernels),
    else ``x``'s."""
    if weight is not None:
        return weight.dtype
    if x.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return x.dtype


def local_backward_sums(
    g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum g, sum g * x_hat)`` per channel, ``x_hat`` normalised with the pooled
    statistics: PyTorch's fused BatchNorm backward returns exactly these as grad_bias and
    grad_weight."""
    _, sum_gxhat, sum_g = torch.ops.aten.native_batch_norm_backward(
        g, x.detach(), None, None, None, mean, invstd, True, eps, [False, True, True]
    )
    return sum_g, sum_gxhat


def input_gradient(
    x: torch.Tensor,
    g: torch.Tensor,
    gamma: Union[np.ndarray, float],
    mean: np.ndarray,
    invstd: np.ndarray,
    count: float,
    total_sum_grad: np.ndarray,
    total_sum_grad_xhat: np.ndarray,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``dF/dx`` of a synchronised BatchNorm call from the sums over all clients.

    ``dF/dx = gamma * invstd * (g - S1/M - x_hat * S2/M)`` per channel, computed as
    ``a * g + b * (x - mu) + c``.
    """
    a = gamma * invstd
    b = -a * invstd * np.asarray(total_sum_grad_xhat, np.float64) / count
    c = -a * np.asarray(total_sum_grad, np.float64) / count
    # = a * g + b * x + (c - b * mu): one pass fewer over the activations. Folding mu
    # into the constant rounds like x itself does (|b * mu| ~ |b * x|), so it is as
    # accurate as PyTorch's own BatchNorm backward in float32, whatever the mean.
    # b * x + (c - b * mu) as a BatchNorm with unit variance and eps 0 (exactly
    # x * b + (c - b * mu) in its kernel), the fastest per-channel affine map on CPU.
    a_, b_, c_, zero, one = to_vector(
        np.array([a, b, c - b * mean, np.zeros_like(a), np.ones_like(a)]), dtype, x.device
    ).unbind()
    grad_input = normalize(x.detach(), b_, c_, zero, one, 0.0)
    grad_input.addcmul_(g, a_.view(channel_shape(x)))
    return grad_input
