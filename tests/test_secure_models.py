"""Secure aggregation of the models (issue 28, arithmetic only): the masked sum gives the
clear average of :func:`flwr_fedtan.aggregation.aggregate_arrays`, a client's payload looks
uniform over the ring, out-of-bound values are refused by name, sums that would reveal a
client by differencing are never released, and only strategies that work on a sum compose."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flwr_fedtan import secure
from flwr_fedtan.aggregation import aggregate_arrays
from flwr_fedtan.errors import (
    CanaryMismatchError, FixedPointOverflowError, InvalidArgumentsError, MissingPayloadError, PayloadError,
    SecureStatsError,
)
from flwr_fedtan.secure import KeyPair, Roster
from flwr_fedtan.secure.composition import check_secure_models_composes, secure_models_problems
from flwr_fedtan.secure.models import (
    MODEL_EXCHANGE, MaskedModel, ModelLayout, mask_model, model_vector, unmask_average,
)
from flwr_fedtan.secure.releases import ReleaseLedger, release_average, revealed_clients

ROOT = Path(__file__).resolve().parent.parent


def key_pairs(nodes, seed: int = 0) -> dict[int, KeyPair]:
    """Deterministic key pairs (the statistical tests must not depend on luck)."""
    rng = np.random.default_rng(seed)
    return {node: KeyPair.from_private(rng.integers(0, 256, 32, dtype=np.uint8).tobytes()) for node in nodes}


def roster_of(keys: dict[int, KeyPair]) -> Roster:
    return Roster.from_keys({node: pair.public for node, pair in keys.items()})


def mask_all(clients, reference, keys, roster, round=1, attempt=0, **options):
    return {node: mask_model(arrays, weight, reference, node_id=node, private_key=keys[node].private,
                             roster=roster, round=round, attempt=attempt, **options)
            for node, (arrays, weight) in clients.items()}


def small_model(rng, dtype=np.float32) -> dict[str, np.ndarray]:
    return {
        "conv.weight": rng.normal(0, 0.3, (6, 3, 3, 3)).astype(dtype),
        "bn.weight": rng.uniform(0.5, 1.5, 6).astype(dtype),
        "bn.bias": rng.normal(0, 0.2, 6).astype(dtype),
        "bn.running_mean": rng.normal(0, 0.5, 6).astype(dtype),
        "bn.running_var": rng.uniform(0.5, 2.0, 6).astype(dtype),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "fc.weight": rng.normal(0, 0.1, (4, 6)).astype(dtype),
        "fc.bias": np.zeros(4, dtype=dtype),
    }


def client_models(rng, reference, nodes, spread=0.2):
    clients = {}
    for node in nodes:
        arrays = {}
        for key, value in reference.items():
            if value.dtype.kind == "f":
                moved = value + rng.normal(0, spread, value.shape) * (1 + np.abs(value))
                arrays[key] = np.abs(moved).astype(value.dtype) if key.endswith("running_var") else \
                    moved.astype(value.dtype)
            else:
                arrays[key] = np.asarray(value + int(rng.integers(0, 4)), dtype=value.dtype)
        clients[node] = (arrays, int(rng.integers(1, 500)))
    return clients


def assert_matches_clear(secure_arrays, clear, reference):
    for key, ref in reference.items():
        got, want = secure_arrays[key], clear[key]
        assert got.dtype == ref.dtype and got.shape == ref.shape, key
        if ref.dtype.kind == "f":
            scale = np.maximum(np.abs(want.astype(np.float64)), 1e-30)
            worst = float((np.abs(got.astype(np.float64) - want.astype(np.float64)) / scale).max(initial=0.0))
            assert worst <= (1e-6 if ref.dtype == np.float32 else 1e-12), (key, worst)
        else:
            np.testing.assert_array_equal(got, want, err_msg=key)


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("num_clients", [2, 3, 7])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_secure_average_is_the_clear_aggregation(num_clients, dtype):
    rng = np.random.default_rng(num_clients)
    reference = small_model(rng, dtype)
    nodes = [int(n) for n in rng.choice(10**6, num_clients, replace=False)]
    clients = client_models(rng, reference, nodes)
    keys = key_pairs(nodes, seed=num_clients)
    roster = roster_of(keys)

    average = unmask_average(mask_all(clients, reference, keys, roster), roster, reference)

    assert_matches_clear(average.arrays, aggregate_arrays(clients, reference), reference)
    assert average.total_weight == sum(weight for _, weight in clients.values())
    assert average.num_clients == num_clients


def test_running_variances_far_from_their_mean_stay_exact():
    """Running means around 1e6 with variances around 1e-4: a plain sum of squares
    (``w * (v + m**2)``, without the public shift) loses the variance to float64 rounding."""
    rng = np.random.default_rng(5)
    reference = {"bn.running_mean": np.full(16, 1e6, np.float32), "bn.running_var": np.full(16, 1e-4, np.float32),
                 "w": rng.normal(size=16).astype(np.float32)}
    clients = {}
    for node in (1, 2, 3):
        arrays = {"bn.running_mean": (1e6 + rng.normal(0, 0.5, 16)).astype(np.float32),
                  "bn.running_var": rng.uniform(1e-4, 2e-4, 16).astype(np.float32),
                  "w": rng.normal(size=16).astype(np.float32)}
        clients[node] = (arrays, int(rng.integers(5, 50)))
    keys = key_pairs(clients, seed=5)
    roster = roster_of(keys)
    average = unmask_average(mask_all(clients, reference, keys, roster), roster, reference)
    assert_matches_clear(average.arrays, aggregate_arrays(clients, reference), reference)


def test_a_real_cnn_trained_by_each_client_averages_as_in_the_clear():
    """ResNet-20 (270k parameters, 19 BatchNorm layers) trained two SGD steps by each of four
    clients on its own data: parameters, running statistics and num_batches_tracked."""
    torch = pytest.importorskip("torch")
    from tests._models import build

    torch.set_num_threads(1)
    global_model = build("resnet20", torch.float32, seed=3)
    reference = {k: v.detach().numpy().copy() for k, v in global_model.state_dict().items()}
    clients = {}
    for node in (11, 12, 13, 14):
        model = build("resnet20", torch.float32, seed=3)
        optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        generator = torch.Generator().manual_seed(node)
        examples = 4 + node % 5
        for _ in range(2):
            x = torch.randn(examples, 3, 8, 8, generator=generator) * (1 + node % 3)
            y = torch.randint(0, 10, (examples,), generator=generator)
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimiser.step()
        clients[node] = ({k: v.detach().numpy().copy() for k, v in model.state_dict().items()}, examples)
    keys = key_pairs(clients, seed=9)
    roster = roster_of(keys)

    average = unmask_average(mask_all(clients, reference, keys, roster), roster, reference)

    assert sum(v.size for v in reference.values()) > 250_000
    assert_matches_clear(average.arrays, aggregate_arrays(clients, reference), reference)


def test_the_layout_is_weight_arrays_canary():
    rng = np.random.default_rng(0)
    reference = small_model(rng)
    layout = ModelLayout.of(reference)
    assert layout.length == 1 + sum(v.size for v in reference.values()) + 1
    arrays, weight = client_models(rng, reference, [1])[1]
    vector = model_vector(arrays, weight, reference, layout)
    assert vector[0] == weight and vector[-1] == 0.0
    index = layout.keys.index("fc.weight")
    np.testing.assert_array_equal(vector[layout.span(index)], weight * arrays["fc.weight"].astype(np.float64).ravel())
    with pytest.raises(ValueError, match="complex"):
        ModelLayout.of({"z": np.zeros(2, np.complex64)})


# ---------------------------------------------------------------------- what the server sees
def _chi_square_p(counts: np.ndarray) -> float:
    """Upper-tail p-value of Pearson's chi-square against equal bucket counts
    (Wilson-Hilferty's normal approximation of the chi-square distribution)."""
    expected = counts.sum() / counts.size
    statistic = float(((counts - expected) ** 2 / expected).sum())
    df = counts.size - 1
    z = ((statistic / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def _ks_uniform_p(fractions: np.ndarray) -> float:
    """Asymptotic p-value of the Kolmogorov-Smirnov test of ``fractions`` against U(0, 1)."""
    x = np.sort(fractions)
    n = x.size
    grid = np.arange(1, n + 1) / n
    d = max(float((grid - x).max()), float((x - (grid - 1 / n)).max()))
    t = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    return min(1.0, max(0.0, 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * t * t) for k in range(1, 101))))


def _looks_uniform(ring: np.ndarray) -> tuple[float, float]:
    """(chi-square p of the bytes over 256 buckets, KS p of the elements as fractions of the ring)."""
    data = np.ascontiguousarray(ring, dtype=np.uint64)
    counts = np.bincount(np.frombuffer(data.tobytes(), dtype=np.uint8), minlength=256).astype(float)
    fractions = data[1].astype(np.float64) / 2.0**64 + data[0].astype(np.float64) / 2.0**128
    return _chi_square_p(counts), _ks_uniform_p(fractions)


def test_each_masked_model_is_uniform_over_the_ring_and_the_test_flags_clear_data():
    rng = np.random.default_rng(8)
    reference = {"w": rng.normal(0, 0.1, 6000).astype(np.float32), "bn.running_mean": np.zeros(500, np.float32),
                 "bn.running_var": np.ones(500, np.float32)}
    nodes = [3, 8, 21]
    clients = client_models(rng, reference, nodes)
    keys = key_pairs(nodes, seed=8)
    roster = roster_of(keys)
    masked = mask_all(clients, reference, keys, roster)
    layout = ModelLayout.of(reference)
    for node, payload in masked.items():
        chi, ks = _looks_uniform(payload.masked)
        assert chi > 1e-4 and ks > 1e-4, (node, chi, ks)
        arrays, weight = clients[node]
        clear = secure.encode_fixed_point(model_vector(arrays, weight, reference, layout), len(roster))
        chi, ks = _looks_uniform(clear)
        assert chi < 1e-12 and ks < 1e-12, (node, chi, ks)


def test_the_payload_of_a_model_does_not_depend_on_it():
    """Two very different models masked with the same keys: the chi-square test of the two
    byte histograms against each other cannot tell them apart."""
    rng = np.random.default_rng(4)
    reference = {"w": np.zeros(8000, np.float32)}
    keys = key_pairs([1, 2], seed=4)
    roster = roster_of(keys)
    tiny = {"w": np.full(8000, 1e-6, np.float32)}
    huge = {"w": rng.normal(5e3, 1e3, 8000).astype(np.float32)}
    histograms = []
    for arrays, round in ((tiny, 1), (huge, 2)):
        payload = mask_model(arrays, 3, reference, node_id=1, private_key=keys[1].private, roster=roster,
                             round=round, attempt=0)
        histograms.append(np.bincount(np.frombuffer(payload.masked.tobytes(), np.uint8), minlength=256))
    table = np.array(histograms, dtype=float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    df = 255
    z = ((statistic / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    assert 0.5 * math.erfc(z / math.sqrt(2)) > 1e-4


def test_model_masks_never_reuse_a_statistics_keystream():
    keys = key_pairs([1, 2], seed=1)
    roster = roster_of(keys)
    model = secure.pairwise_masks(keys[1].private, 1, roster, 1, 0, MODEL_EXCHANGE, 64)
    for exchange in range(8):
        statistics = secure.pairwise_masks(keys[1].private, 1, roster, 1, 0, exchange, 64)
        assert not (model == statistics).all(axis=0).any()


# ---------------------------------------------------------------------- refusals
def test_a_value_times_weight_beyond_the_bound_is_refused_naming_node_and_array():
    reference = {"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}
    keys = key_pairs([4, 9, 17], seed=2)
    roster = roster_of(keys)
    bound = secure.value_bound(3)  # 2**62 / 3
    arrays = {"a": np.ones(3, np.float32), "b": np.array([1.0, 2e12], np.float32)}
    weight = 1e6  # 2e18 > 1.5e18
    assert 2e12 * weight >= bound
    with pytest.raises(FixedPointOverflowError, match=r"node 9: b reaches .*bound"):
        mask_model(arrays, weight, reference, node_id=9, private_key=keys[9].private, roster=roster, round=1,
                   attempt=0)
    # the same values with fewer clients (a looser bound) or a smaller weight are fine
    two = {n: keys[n] for n in (4, 9)}
    mask_model(arrays, weight, reference, node_id=9, private_key=keys[9].private, roster=roster_of(two), round=1,
               attempt=0)
    mask_model(arrays, 1e5, reference, node_id=9, private_key=keys[9].private, roster=roster, round=1, attempt=0)
    with pytest.raises(FixedPointOverflowError, match="node 9: weight"):
        mask_model({"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}, 2e18, reference, node_id=9,
                   private_key=keys[9].private, roster=roster, round=1, attempt=0)


@pytest.mark.parametrize("bad, match", [
    ({"a": np.array([1.0, np.nan, 0.0], np.float32)}, "client 4: a contains NaN"),
    ({"a": np.zeros(3, np.float64)}, "client 4: a has shape .* dtype float64"),
    ({"bn.running_var": np.array([1.0, -1.0], np.float32)}, "client 4: bn.running_var has negative"),
])
def test_a_malformed_model_is_refused_naming_the_client(bad, match):
    reference = {"a": np.zeros(3, np.float32), "bn.running_mean": np.zeros(2, np.float32),
                 "bn.running_var": np.ones(2, np.float32)}
    keys = key_pairs([4, 5], seed=3)
    with pytest.raises(PayloadError, match=match):
        mask_model({**reference, **bad}, 2, reference, node_id=4, private_key=keys[4].private,
                   roster=roster_of(keys), round=1, attempt=0)


def test_the_server_refuses_missing_foreign_and_stale_payloads():
    rng = np.random.default_rng(6)
    reference = small_model(rng)
    clients = client_models(rng, reference, [1, 2, 3])
    keys = key_pairs([1, 2, 3], seed=6)
    roster = roster_of(keys)
    masked = mask_all(clients, reference, keys, roster)

    with pytest.raises(MissingPayloadError) as missing:
        unmask_average({n: masked[n] for n in (1, 3)}, roster, reference)
    assert missing.value.missing == (2,)

    other = roster_of({**keys, 3: key_pairs([3], seed=99)[3]})
    foreign = mask_all({3: clients[3]}, reference, {3: key_pairs([3], seed=99)[3]}, other)[3]
    with pytest.raises(PayloadError, match="client 3: .*another roster"):
        unmask_average({**masked, 3: foreign}, roster, reference)

    stale = mask_all({2: clients[2]}, reference, keys, roster, attempt=1)[2]
    with pytest.raises(CanaryMismatchError):
        unmask_average({**masked, 2: stale}, roster, reference)
    # the canary blame of secure statistics names the client at the model's exchange
    length = ModelLayout.of(reference).length
    revealed = {n: secure.canary_masks(keys[n].private, n, roster, 1, 0, MODEL_EXCHANGE, length) for n in (1, 3)}
    revealed[2] = secure.canary_masks(keys[2].private, 2, roster, 1, 1, MODEL_EXCHANGE, length)
    assert set(secure.blame_canary({**masked, 2: stale}, roster, revealed)) <= {1, 2, 3}
    assert secure.blame_canary({**masked, 2: stale}, roster, revealed)

    with pytest.raises(PayloadError, match="expected uint64"):
        MaskedModel.from_arrays(2, {**masked[2].to_arrays(), "masked": masked[2].masked[:, :-1]}, length)
    back = MaskedModel.from_arrays(2, masked[2].to_arrays(), length)
    assert back.roster_digest == masked[2].roster_digest and np.array_equal(back.masked, masked[2].masked)


def _with_garbage(reference, honest, tamper):
    """Client 1 honest, client 2 encodes ``tamper(vector)`` under the right masks."""
    keys = key_pairs([1, 2], seed=7)
    roster = roster_of(keys)
    masked = mask_all({1: (honest, 1)}, reference, keys, roster)
    layout = ModelLayout.of(reference)
    vector = model_vector(honest, 1.0, reference, layout)
    tamper(vector, layout)
    ring = secure.encode_fixed_point(vector, 2)
    masks = secure.pairwise_masks(keys[2].private, 2, roster, 1, 0, MODEL_EXCHANGE, layout.length)
    masked[2] = MaskedModel(masked=secure.ring_sum([ring, masks]), roster_digest=roster.digest())
    return masked, roster


def _set(key, value):
    def tamper(vector, layout):
        if key == "weight":
            vector[0] = value
        else:
            vector[layout.span(layout.keys.index(key))] = value
    return tamper


@pytest.mark.parametrize("key, value, match", [
    ("w", 1e6, "w averages to values beyond float16's range"),
    ("weight", -1.0, "total weight decodes to 0.0"),
    ("bn.running_var", -50.0, "bn.running_var pools to a negative variance"),
])
def test_garbage_under_the_right_masks_is_refused_by_array_not_averaged(key, value, match):
    """What a client encodes cannot be checked on its own any more; what its garbage does to
    the sum is refused, naming the array (the client cannot be named: only the sum is seen)."""
    reference = {"w": np.zeros(3, np.float16), "bn.running_mean": np.zeros(2, np.float16),
                 "bn.running_var": np.ones(2, np.float16)}
    masked, roster = _with_garbage(reference, dict(reference), _set(key, value))
    with pytest.raises(FixedPointOverflowError, match=match):
        unmask_average(masked, roster, reference)
    honest, roster = _with_garbage(reference, dict(reference), lambda vector, layout: None)
    assert unmask_average(honest, roster, reference).total_weight == 2.0


# ---------------------------------------------------------------------- differencing
def _revealed_by_rank(rosters, clients) -> list[int]:
    """Independent reference: client i is revealed iff adding its unit vector to the
    rosters' indicator matrix does not raise the rank (floating-point rank, small 0/1 sizes)."""
    matrix = np.array([[1.0 if c in r else 0.0 for c in clients] for r in rosters])
    rank = np.linalg.matrix_rank(matrix)
    return [c for i, c in enumerate(clients)
            if np.linalg.matrix_rank(np.vstack([matrix, np.eye(len(clients))[i]])) == rank]


def test_revealed_clients_agrees_with_a_rank_test_on_random_roster_families():
    rng = np.random.default_rng(12)
    clients = list(range(1, 8))
    for _ in range(300):
        count = int(rng.integers(1, 5))
        rosters = [set(int(c) for c in clients if rng.random() < 0.6) or {1, 2} for _ in range(count)]
        assert revealed_clients(rosters) == sorted(
            _revealed_by_rank(rosters, sorted(set().union(*rosters)))), rosters


@pytest.mark.parametrize("rosters, revealed", [
    ([{1, 2, 3}, {1, 2}], [3]),
    ([{1, 2, 3, 4}, {1, 2}, {3, 4}], []),
    ([{1, 2, 3}, {1, 2}, {2, 3}], [1, 2, 3]),
    ([{1, 2, 3, 4}, {1, 2, 3}], [4]),
    ([{1, 2, 3, 4}, {1, 2}], []),
    ([{7}], [7]),
    ([{1, 2}, {1, 2}], []),
])
def test_revealed_clients_examples(rosters, revealed):
    assert revealed_clients(rosters) == revealed


def test_the_ledger_releases_survivors_only_when_no_client_is_revealed():
    ledger = ReleaseLedger()
    # attempt 0: node 4 never sent, nothing was computable: the survivors' sum is released
    ledger.record(1, [1, 2, 3])
    assert ledger.computable(1) == (frozenset({1, 2, 3}),)
    # attempt 1 of the same round without node 3: the difference would be node 3's model
    with pytest.raises(SecureStatsError, match=r"round 1: .*nodes \[1, 2\].*reveal the model of nodes \[3\]"):
        ledger.check(1, [1, 2])
    with pytest.raises(SecureStatsError):
        ledger.record(1, [1, 2])
    assert ledger.computable(1) == (frozenset({1, 2, 3}),)
    # another round's models are other models: nothing combines across rounds
    ledger.check(2, [1, 2])
    ledger.record(2, [1, 2, 3, 4])
    ledger.record(2, [1, 2])  # the difference is the sum of two clients, not one
    with pytest.raises(SecureStatsError, match=r"nodes \[3, 4\]"):
        ledger.check(2, [3])
    ledger.forget_before(2)
    assert ledger.computable(1) == ()


def test_a_late_payload_completing_an_abandoned_roster_is_refused():
    """Attempt 0 over {1, 2, 3} lost node 3; attempt 1 released {1, 2}. Node 3's late payload
    would complete attempt 0: its sum minus attempt 1's is node 3's model."""
    ledger = ReleaseLedger()
    ledger.record(5, [1, 2])
    with pytest.raises(SecureStatsError, match=r"nodes \[3\]"):
        ledger.check(5, [1, 2, 3])


def test_a_drop_restarts_with_the_survivors_and_a_late_payload_would_reveal_the_dropped_model():
    rng = np.random.default_rng(13)
    reference = small_model(rng, np.float64)
    clients = client_models(rng, reference, [1, 2, 3, 4])
    ledger = ReleaseLedger()
    keys0 = key_pairs([1, 2, 3, 4], seed=30)
    roster0 = roster_of(keys0)
    attempt0 = mask_all(clients, reference, keys0, roster0, round=3, attempt=0)
    on_time = {n: attempt0[n] for n in (1, 2, 3)}  # node 4 is late
    with pytest.raises(MissingPayloadError):
        release_average(ledger, 3, on_time, roster0, reference)
    assert ledger.computable(3) == ()

    keys1 = key_pairs([1, 2, 3], seed=31)  # the restart agrees fresh keys
    roster1 = roster_of(keys1)
    survivors = {n: clients[n] for n in (1, 2, 3)}
    released = release_average(ledger, 3, mask_all(survivors, reference, keys1, roster1, round=3, attempt=1),
                               roster1, reference)
    assert_matches_clear(released.arrays, aggregate_arrays(survivors, reference), reference)

    # node 4's attempt-0 payload arrives now: it would complete roster 0, refused unread ...
    with pytest.raises(SecureStatsError, match=r"nodes \[4\]"):
        release_average(ledger, 3, attempt0, roster0, reference)
    # ... for good reason: its sum minus the released one is node 4's weighted model
    full = unmask_average(attempt0, roster0, reference)
    arrays4, weight4 = clients[4]
    leaked = (full.arrays["fc.weight"] * full.total_weight
              - released.arrays["fc.weight"] * released.total_weight) / (full.total_weight - released.total_weight)
    np.testing.assert_allclose(leaked, arrays4["fc.weight"], rtol=1e-9, atol=1e-12)
    assert full.total_weight - released.total_weight == weight4
    # and a further restart without node 3 is refused as well
    keys2 = key_pairs([1, 2], seed=32)
    with pytest.raises(SecureStatsError, match=r"nodes \[3\]"):
        release_average(ledger, 3, mask_all({n: clients[n] for n in (1, 2)}, reference, keys2, roster_of(keys2),
                                            round=3, attempt=2), roster_of(keys2), reference)


# ---------------------------------------------------------------------- composition
def _flower():
    return pytest.importorskip("flwr.serverapp.strategy")


@pytest.mark.parametrize("make", [
    lambda f: f.DifferentialPrivacyServerSideFixedClipping(f.FedAvg(), 1.0, 1.0, 2),
    lambda f: f.DifferentialPrivacyServerSideAdaptiveClipping(f.FedAvg(), 0.1, 20),
    lambda f: f.FedMedian(),
    lambda f: f.FedTrimmedAvg(),
    lambda f: f.Krum(),
    lambda f: f.MultiKrum(),
    lambda f: f.Bulyan(),
    lambda f: f.QFedAvg(client_learning_rate=0.1),
    lambda f: f.FedXgbBagging(),
    lambda f: f.FedXgbCyclic(),
], ids=["dp-server-fixed", "dp-server-adaptive", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan",
        "qfedavg", "xgb-bagging", "xgb-cyclic"])
def test_strategies_that_need_individual_updates_are_refused_with_the_fix(make):
    strategy = make(_flower())
    with pytest.raises(InvalidArgumentsError) as refused:
        check_secure_models_composes(strategy)
    message = str(refused.value)
    assert "FedTAN(secure_models=True)" in message and type(strategy).__name__ in message and "Fix:" in message
    if "ServerSide" in type(strategy).__name__:
        assert "DifferentialPrivacyClientSide" in message


@pytest.mark.parametrize("make", [
    lambda f: f.FedAvg(),
    lambda f: f.FedAdam(),
    lambda f: f.FedYogi(),
    lambda f: f.FedAdagrad(),
    lambda f: f.FedAvgM(server_momentum=0.9),
    lambda f: f.FedProx(proximal_mu=0.1),
    lambda f: f.DifferentialPrivacyClientSideFixedClipping(f.FedAvg(), 1.0, 1.0, 2),
    lambda f: f.DifferentialPrivacyClientSideAdaptiveClipping(f.FedAdam(), 0.1, 20),
], ids=["fedavg", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedprox", "dp-client-fixed", "dp-client-adaptive"])
def test_strategies_that_work_on_the_sum_are_accepted(make):
    strategy = make(_flower())
    check_secure_models_composes(strategy)
    assert secure_models_problems(strategy) == []


def test_client_side_dp_around_a_robust_strategy_is_refused_naming_the_inner_one():
    f = _flower()
    problems = secure_models_problems(f.DifferentialPrivacyClientSideFixedClipping(f.Krum(), 1.0, 1.0, 2))
    assert [(p.name, p.value) for p in problems] == [("strategy.strategy", "Krum")]


def test_custom_aggregation_is_refused_unless_vouched_for():
    f = _flower()

    class Configured(f.FedAvg):  # only configuration: FedAvg's aggregate_train
        def summary(self) -> None:
            pass

    class Custom(f.FedAvg):
        def aggregate_train(self, server_round, replies):
            return super().aggregate_train(server_round, replies)

    check_secure_models_composes(Configured())
    with pytest.raises(InvalidArgumentsError, match="Custom.*aggregate_train"):
        check_secure_models_composes(Custom())
    check_secure_models_composes(Custom(), allow_custom=True)


# ---------------------------------------------------------------------- layering
def test_the_server_arithmetic_imports_neither_torch_nor_flower():
    code = ("import sys, flwr_fedtan.secure.models, flwr_fedtan.secure.releases, flwr_fedtan.secure.composition; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'flwr')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_every_pair_of_the_examples_is_checked_both_ways():
    """The ledger's answer does not depend on the order the rosters were computed in."""
    for rosters in ([{1, 2, 3}, {1, 2}], [{1, 2, 3, 4}, {1, 2}, {3, 4}]):
        for order in itertools.permutations(rosters):
            assert revealed_clients(order) == revealed_clients(rosters)
