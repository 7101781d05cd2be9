"""BatchNorm buffers recognised by their ``state_dict`` names alone: the server needs no
knowledge of the model."""

from __future__ import annotations

from typing import Sequence

__all__ = ["BATCHNORM_BUFFER_SUFFIXES", "is_batchnorm_buffer", "running_stat_keys"]

BATCHNORM_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
"""Last name component of the buffers of ``torch.nn.BatchNorm*`` in a ``state_dict``."""


def is_batchnorm_buffer(key: str) -> bool:
    """Whether a ``state_dict`` key names a BatchNorm buffer (``running_mean``,
    ``running_var`` or ``num_batches_tracked``, as ``torch.nn.BatchNorm*`` and
    ``FedTANBatchNorm`` name them). These take the pooled aggregate, never an optimiser."""
    return key.rsplit(".", 1)[-1] in BATCHNORM_BUFFER_SUFFIXES


def running_stat_keys(keys: Sequence[str]) -> dict[str, str]:
    """Map each ``<prefix>.running_mean`` key to its ``<prefix>.running_var`` partner.

    BatchNorm layers are recognised by their ``state_dict`` naming alone, so the server
    needs no knowledge of the model.
    """
    key_set = set(keys)
    pairs = {}
    for key in keys:
        if key == "running_mean" or key.endswith(".running_mean"):
            partner = key[: -len("running_mean")] + "running_var"
            if partner in key_set:
                pairs[key] = partner
    return pairs


