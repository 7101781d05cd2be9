"""Federated partitions of the app's data sets (finding and reading them is in
:mod:`simulations.app.datasets`).

- :func:`partition_indices` splits example indices among clients with the partitioners
  of ``flwr_datasets`` (pathological, Dirichlet, IID), run on a ``datasets.Dataset`` that
  holds only the labels;
- :func:`cached_partition_indices` keeps its results on disk
  (``~/.cache/flwr-fedtan/partitions``, or ``$FEDTAN_CACHE_DIR/partitions``), so that a
  fresh ClientApp process does not import ``datasets`` and re-partition;
- :func:`dataset_partitions` is the app's one in-process cache on top of it: the
  partitions of a loaded data set, computed once per process;
- :func:`client_partition` returns one client's images and labels.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .datasets import PathLike, cache_root, load_dataset

__all__ = [
    "PARTITION_SCHEMES",
    "partition_indices",
    "cached_partition_indices",
    "dataset_partitions",
    "client_partition",
]

PARTITION_SCHEMES = ("pathological", "dirichlet", "iid")

_PARTITIONS: dict[tuple, tuple[np.ndarray, ...]] = {}


def partition_indices(
    labels: Union[np.ndarray, torch.Tensor, Sequence[int]],
    num_partitions: int,
    scheme: str,
    seed: int = 0,
    classes_per_partition: int = 2,
    alpha: float = 0.5,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Split example indices among clients with a ``flwr_datasets`` partitioner.

    Parameters
    ----------
    labels : array-like of int
        Label of every example.
    num_partitions : int
        Number of clients.
    scheme : str
        - ``"pathological"``: each client gets the examples of ``classes_per_partition``
          classes. Sorted classes are grouped in consecutive blocks (0-1, 2-3, ... for
          two classes per client) and client ``i`` gets block ``i % num_blocks``, so
          with as many clients as blocks (5 clients x 2 classes of 10) the clients'
          classes are disjoint; clients sharing a block split its examples evenly.
        - ``"dirichlet"``: for each class, client shares drawn from Dirichlet(``alpha``).
        - ``"iid"``: a random permutation cut into equal parts.
    seed : int
        Seed of the random choices: the same arguments give the same partitions.
    classes_per_partition : int
        Classes per client for ``"pathological"``.
    alpha : float
        Concentration for ``"dirichlet"``; smaller is more heterogeneous.
    min_partition_size : int
        For ``"dirichlet"``: the draw is repeated (at most 10 times) until every client
        has at least this many examples.

    Returns
    -------
    list of np.ndarray
        For each client, the sorted int64 indices of its examples. Clients' indices are
        disjoint.

    Raises
    ------
    ValueError
        If ``scheme`` is unknown or the partitioner cannot satisfy the request.
    """
    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    if scheme not in PARTITION_SCHEMES:
        raise ValueError(
            f"unknown partitioning scheme {scheme!r}; "
            f"valid schemes: {', '.join(PARTITION_SCHEMES)}"
        )
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be positive, got {num_partitions}")
    labels_array = np.asarray(labels, dtype=np.int64).reshape(-1)
    columns = {"label": labels_array, "index": np.arange(len(labels_array), dtype=np.int64)}

    if scheme == "pathological":
        if classes_per_partition < 1:
            raise ValueError(
                f"classes_per_partition must be positive, got {classes_per_partition}"
            )
        # PathologicalPartitioner's "deterministic" mode gives client i the classes
        # i, i+1, ... (overlapping pairs) and "first-deterministic" draws all but the
        # first class at random; neither gives disjoint blocks. Partitioning by the
        # block id with one "class" per client does.
        class_rank = np.unique(labels_array, return_inverse=True)[1]
        columns["block"] = class_rank // classes_per_partition
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="block",
            num_classes_per_partition=1,
            class_assignment_mode="deterministic",
            seed=seed,
        )
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_partition_size,
            seed=seed,
        )
    else:
        partitioner = IidPartitioner(num_partitions=num_partitions)

    dataset = datasets.Dataset.from_dict(columns)
    if scheme == "iid":
        # IidPartitioner cuts the rows into contiguous shards without shuffling.
        dataset = dataset.shuffle(seed=seed)
    partitioner.dataset = dataset
    with warnings.catch_warnings():
        # "Classes ... will NOT be used": expected when there are fewer clients than blocks.
        warnings.filterwarnings("ignore", message="Classes: .* will NOT be used")
        parts = [partitioner.load_partition(i) for i in range(num_partitions)]
    # part["index"] would be a datasets.Column, converted row by row; slicing is batched.
    return [np.sort(np.asarray(part[:]["index"], dtype=np.int64)) for part in parts]


def _partitions_cache_dir() -> Path:
    return cache_root() / "partitions"


def cached_partition_indices(
    labels: Union[np.ndarray, torch.Tensor, Sequence[int]],
    num_partitions: int,
    scheme: str,
    seed: int = 0,
    classes_per_partition: int = 2,
    alpha: float = 0.5,
) -> list[np.ndarray]:
    """:func:`partition_indices`, cached on disk under ``cache_root() / "partitions"``.

    Partitioning goes through ``datasets`` and ``flwr_datasets`` (seconds to import and
    run); a process that only needs its client's share, such as every ClientApp process
    of a deployment, reads the cached indices instead. The cache key covers the labels'
    content, every argument and the ``flwr-datasets`` version; an unreadable entry is
    recomputed.
    """
    labels_array = np.ascontiguousarray(np.asarray(labels, dtype=np.int64).reshape(-1))
    key = hashlib.sha256(labels_array.tobytes())
    key.update(repr((num_partitions, scheme, seed, classes_per_partition, float(alpha),
                     importlib.metadata.version("flwr-datasets"))).encode())
    path = _partitions_cache_dir() / f"{key.hexdigest()[:32]}.npz"
    try:
        with np.load(path, allow_pickle=False) as cached:
            parts = [cached[f"p{i}"] for i in range(num_partitions)]
        if all(p.dtype == np.int64 and p.ndim == 1 for p in parts):
            return parts
    except (OSError, KeyError, ValueError):
        pass  # absent or unreadable: compute it
    parts = partition_indices(labels_array, num_partitions, scheme, seed=seed,
                              classes_per_partition=classes_per_partition, alpha=alpha)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        with open(partial, "wb") as handle:
            np.savez(handle, **{f"p{i}": part for i, part in enumerate(parts)})
        os.replace(partial, path)
    except OSError as error:  # a read-only home still trains, only slower
        warnings.warn(f"could not cache partitions in {path.parent}: {error}", stacklevel=2)
    return parts


def dataset_partitions(
    dataset: str,
    num_partitions: int,
    scheme: str,
    split: str = "train",
    seed: int = 0,
    classes_per_partition: int = 2,
    alpha: float = 0.5,
    data_dir: Optional[PathLike] = None,
    sources: Union[str, Sequence[str], None] = None,
    download: Optional[bool] = None,
) -> tuple[np.ndarray, ...]:
    """The clients' index arrays of a data set split, computed once per process.

    Loads the split with :func:`simulations.app.datasets.load_dataset` (``data_dir``,
    ``sources``, ``download``) and partitions its labels with :func:`cached_partition_indices`
    (``num_partitions``, ``scheme``, ``seed``, ``classes_per_partition``, ``alpha``).
    The result is shared between callers: do not modify the arrays.
    """
    _, labels = load_dataset(dataset, split, data_dir=data_dir, download=download, sources=sources)
    # load_dataset keeps every split it loaded alive for the whole process, so the
    # address of the labels identifies this copy of the data set.
    key = (labels.data_ptr(), len(labels), int(num_partitions), scheme, int(seed),
           int(classes_per_partition), float(alpha))
    if key not in _PARTITIONS:
        _PARTITIONS[key] = tuple(cached_partition_indices(
            labels.numpy(), num_partitions, scheme, seed=seed,
            classes_per_partition=classes_per_partition, alpha=alpha,
        ))
    return _PARTITIONS[key]


def client_partition(
    dataset: str,
    partition_id: int,
    num_partitions: int,
    scheme: str,
    split: str = "train",
    seed: int = 0,
    classes_per_partition: int = 2,
    alpha: float = 0.5,
    data_dir: Optional[PathLike] = None,
    download: Optional[bool] = None,
    sources: Union[str, Sequence[str], None] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one client's share of a data set.

    Parameters
    ----------
    dataset : str
        One of :data:`simulations.app.datasets.DATASET_NAMES`.
    partition_id : int
        The client, ``0 <= partition_id < num_partitions``.
    num_partitions, scheme, seed, classes_per_partition, alpha
        As for :func:`partition_indices`.
    split : str
        ``"train"`` or ``"test"``.
    data_dir, download, sources
        As for :func:`simulations.app.datasets.load_dataset`.

    Returns
    -------
    images : torch.Tensor
        float32 ``(n, C, H, W)``.
    labels : torch.Tensor
        int64 ``(n,)``.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id {partition_id} outside 0..{num_partitions - 1}")
    images, labels = load_dataset(dataset, split, data_dir=data_dir, download=download, sources=sources)
    parts = dataset_partitions(dataset, num_partitions, scheme, split=split, seed=seed,
                               classes_per_partition=classes_per_partition, alpha=alpha,
                               data_dir=data_dir, sources=sources, download=download)
    indices = torch.from_numpy(parts[partition_id])
    return images[indices], labels[indices]
