"""Server arithmetic: pooled moments, summed backward statistics, model averaging, validation."""

from __future__ import annotations

import numpy as np
import pytest

from flwr_fedtan import (
    BackwardSums,
    ForwardStats,
    PayloadError,
    StepProtocolError,
    SyncPoint,
    aggregate_arrays,
    pool_forward_stats,
    sum_backward_sums,
)
from flwr_fedtan.reference import aggregate_requests

C = 4
BAD = "node-7"


def client_data(sizes, offset=0.0, spread=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return {
        f"node-{k}": offset + spread * (rng.normal(size=(n, C)) * (1 + k) + 3 * k)
        for k, n in enumerate(sizes)
    }


def stats_of(data: np.ndarray, examples: int | None = None) -> ForwardStats:
    mean = data.mean(axis=0)
    var = ((data - mean) ** 2).mean(axis=0)  # two-pass, biased
    return ForwardStats(float(len(data)), examples or len(data), mean, var)


@pytest.mark.parametrize("sizes", [[1, 2], [7, 16, 33, 5, 12], [1000, 1, 3]])
def test_pool_forward_stats_exact(sizes):
    data = client_data(sizes)
    pooled = pool_forward_stats({k: stats_of(v) for k, v in data.items()})
    everything = np.concatenate(list(data.values()))
    assert pooled.count == len(everything) and pooled.num_examples == sum(sizes)
    np.testing.assert_allclose(pooled.mean, everything.mean(axis=0), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(pooled.var, everything.var(axis=0), rtol=1e-12)
    assert pooled.mean.dtype == np.float64 and pooled.var.dtype == np.float64


def test_pool_forward_stats_count_and_examples_differ():
    # 2D feature maps: count m_k = n_k * positions, num_examples = n_k
    rng = np.random.default_rng(1)
    maps = {k: rng.normal(size=(n, C, 3, 5)) + k for k, n in enumerate([3, 8, 2])}
    flat = {k: v.transpose(0, 2, 3, 1).reshape(-1, C) for k, v in maps.items()}
    pooled = pool_forward_stats({k: stats_of(flat[k], len(maps[k])) for k in maps})
    assert pooled.count == 13 * 15 and pooled.num_examples == 13
    allv = np.concatenate(list(flat.values()))
    np.testing.assert_allclose(pooled.var, allv.var(axis=0), rtol=1e-12)


def test_pool_forward_stats_numerically_stable():
    """Values around 1e8 with a spread of ~1e-2: the naive E[x^2] - E[x]^2 loses every digit;
    the parallel-variance pooling matches a float64 two-pass over the concatenation."""
    data = client_data([7, 16, 33, 5, 12], offset=1e8, spread=1e-2, seed=3)
    pooled = pool_forward_stats({k: stats_of(v) for k, v in data.items()})
    everything = np.concatenate(list(data.values()))
    mu = everything.mean(axis=0)
    two_pass = ((everything - mu) ** 2).mean(axis=0)
    np.testing.assert_allclose(pooled.mean, mu, rtol=1e-15)
    np.testing.assert_allclose(pooled.var, two_pass, rtol=1e-6)
    naive = (everything**2).mean(axis=0) - mu**2
    assert np.max(np.abs(naive - two_pass) / two_pass) > 1e-2  # the test can tell


def test_sum_backward_sums():
    rng = np.random.default_rng(2)
    parts = {f"n{k}": BackwardSums(rng.normal(size=C), rng.normal(size=C)) for k in range(5)}
    parts["f32"] = BackwardSums(rng.normal(size=C).astype(np.float32), np.zeros(C, np.float32))
    total = sum_backward_sums(parts)
    np.testing.assert_allclose(total.sum_grad, sum(p.sum_grad.astype(np.float64) for p in parts.values()), rtol=1e-15)
    np.testing.assert_allclose(total.sum_grad_xhat, sum(p.sum_grad_xhat for p in parts.values()), rtol=1e-15)
    assert total.sum_grad.dtype == np.float64


# --------------------------------------------------------------------------- model averaging
def _model_arrays(rng, data=None):
    arrays = {
        "conv.weight": rng.normal(size=(3, 2, 3, 3)).astype(np.float32),
        "bn.weight": rng.normal(size=C).astype(np.float32),
        "bn.bias": rng.normal(size=C).astype(np.float32),
        "bn.running_mean": rng.normal(size=C).astype(np.float32),
        "bn.running_var": rng.uniform(0.5, 2, size=C).astype(np.float32),
        "bn.num_batches_tracked": np.array(5, dtype=np.int64),
        "fc.weight": rng.normal(size=(2, C)),
        "running_mean": rng.normal(size=C),  # top-level BN (a model that *is* a BN layer)
        "running_var": rng.uniform(0.5, 2, size=C),
    }
    if data is not None:
        arrays["bn.running_mean"] = data.mean(axis=0).astype(np.float32)
        arrays["bn.running_var"] = data.var(axis=0).astype(np.float32)
        arrays["running_mean"] = data.mean(axis=0)
        arrays["running_var"] = data.var(axis=0)
    return arrays


def test_aggregate_arrays_weighted_and_pooled_running_stats():
    sizes = [7, 16, 33, 5]
    data = client_data(sizes, seed=4)
    rng = np.random.default_rng(5)
    contributions = {k: (_model_arrays(rng, d), n) for (k, d), n in zip(data.items(), sizes)}
    out = aggregate_arrays(contributions)
    total = sum(sizes)
    ref = next(iter(contributions.values()))[0]
    assert list(out) == list(ref)
    for key, value in out.items():
        assert value.dtype == ref[key].dtype and value.shape == ref[key].shape, key
    for key in ("conv.weight", "bn.weight", "bn.bias", "fc.weight"):
        expected = sum(a[key].astype(np.float64) * n / total for a, n in contributions.values())
        np.testing.assert_allclose(out[key], expected, rtol=1e-6 if ref[key].dtype == np.float32 else 1e-13)
    everything = np.concatenate(list(data.values()))
    np.testing.assert_allclose(out["running_mean"], everything.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["running_var"], everything.var(axis=0), rtol=1e-12)
    np.testing.assert_allclose(out["bn.running_mean"], everything.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["bn.running_var"], everything.var(axis=0), rtol=1e-5)
    # not the plain average of the variances
    plain = sum(a["running_var"] * n / total for a, n in contributions.values())
    assert np.all(out["running_var"] > plain + 1e-3)
    assert out["bn.num_batches_tracked"].dtype == np.int64 and int(out["bn.num_batches_tracked"]) == 5


def test_aggregate_arrays_integer_buffers_stay_integer():
    a = {"w": np.ones(2), "bn.num_batches_tracked": np.array(10, dtype=np.int64)}
    b = {"w": np.zeros(2), "bn.num_batches_tracked": np.array(12, dtype=np.int64)}
    out = aggregate_arrays({"a": (a, 3), "b": (b, 1)})
    assert out["bn.num_batches_tracked"].dtype == np.int64
    assert int(out["bn.num_batches_tracked"]) == 10  # 10.5 rounds to even
    np.testing.assert_allclose(out["w"], [0.75, 0.75])


# --------------------------------------------------------------------------- validation
def _good_forward(rng):
    return ForwardStats(10.0, 5, rng.normal(size=C), rng.uniform(0.1, 1, size=C))


FORWARD_CORRUPTIONS = {
    "wrong shape": lambda s: ForwardStats(s.count, s.num_examples, np.zeros(C + 1), s.var),
    "2-D": lambda s: ForwardStats(s.count, s.num_examples, s.mean[None, :], s.var),
    "int dtype": lambda s: ForwardStats(s.count, s.num_examples, s.mean, np.ones(C, dtype=np.int64)),
    "nan": lambda s: ForwardStats(s.count, s.num_examples, np.where(np.arange(C) == 1, np.nan, s.mean), s.var),
    "inf": lambda s: ForwardStats(s.count, s.num_examples, s.mean, np.full(C, np.inf)),
    "negative var": lambda s: ForwardStats(s.count, s.num_examples, s.mean, s.var - 5),
    "zero count": lambda s: ForwardStats(0.0, s.num_examples, s.mean, s.var),
    "negative count": lambda s: ForwardStats(-3.0, s.num_examples, s.mean, s.var),
    "nan count": lambda s: ForwardStats(float("nan"), s.num_examples, s.mean, s.var),
    "zero examples": lambda s: ForwardStats(s.count, 0, s.mean, s.var),
    "negative examples": lambda s: ForwardStats(s.count, -2, s.mean, s.var),
    "list not array": lambda s: ForwardStats(s.count, s.num_examples, list(s.mean), s.var),
    "wrong type": lambda s: BackwardSums(s.mean, s.var),
}


@pytest.mark.parametrize("position", ["first", "middle"])
@pytest.mark.parametrize("kind", list(FORWARD_CORRUPTIONS))
def test_pool_forward_stats_rejects_malformed_payloads(kind, position):
    rng = np.random.default_rng(0)
    names = [BAD, "node-1", "node-2"] if position == "first" else ["node-1", BAD, "node-2"]
    payloads = {n: _good_forward(rng) for n in names}
    payloads[BAD] = FORWARD_CORRUPTIONS[kind](payloads[BAD])
    with pytest.raises(PayloadError) as err:
        pool_forward_stats(payloads, channels=C)
    assert err.value.client == BAD and BAD in str(err.value)
    if position == "middle":  # also without the expected width given
        with pytest.raises(PayloadError) as err:
            pool_forward_stats(payloads)
        assert err.value.client == BAD and BAD in str(err.value)


BACKWARD_CORRUPTIONS = {
    "wrong shape": lambda s: BackwardSums(np.zeros(C - 1), s.sum_grad_xhat),
    "int dtype": lambda s: BackwardSums(s.sum_grad, np.zeros(C, dtype=np.int32)),
    "nan": lambda s: BackwardSums(np.full(C, np.nan), s.sum_grad_xhat),
    "inf": lambda s: BackwardSums(s.sum_grad, np.full(C, -np.inf)),
    "wrong type": lambda s: ForwardStats(1.0, 1, s.sum_grad, s.sum_grad_xhat ** 2),
}


@pytest.mark.parametrize("kind", list(BACKWARD_CORRUPTIONS))
def test_sum_backward_sums_rejects_malformed_payloads(kind):
    rng = np.random.default_rng(0)
    payloads = {n: BackwardSums(rng.normal(size=C), rng.normal(size=C)) for n in ["node-1", BAD, "node-2"]}
    payloads[BAD] = BACKWARD_CORRUPTIONS[kind](payloads[BAD])
    with pytest.raises(PayloadError) as err:
        sum_backward_sums(payloads, channels=C)
    assert err.value.client == BAD and BAD in str(err.value)


def _drop(arrays, key):
    return {k: v for k, v in arrays.items() if k != key}


ARRAY_CORRUPTIONS = {
    "missing key": lambda a, n: (_drop(a, "bn.bias"), n),
    "extra key": lambda a, n: ({**a, "extra.weight": np.zeros(2)}, n),
    "wrong shape": lambda a, n: ({**a, "fc.weight": np.zeros((C, 2))}, n),
    "wrong dtype": lambda a, n: ({**a, "bn.weight": a["bn.weight"].astype(np.float64)}, n),
    "int for float": lambda a, n: ({**a, "bn.bias": np.zeros(C, dtype=np.int64)}, n),
    "nan": lambda a, n: ({**a, "conv.weight": np.full_like(a["conv.weight"], np.nan)}, n),
    "inf": lambda a, n: ({**a, "running_mean": np.full(C, np.inf)}, n),
    "negative running var": lambda a, n: ({**a, "bn.running_var": -a["bn.running_var"]}, n),
    "not an array": lambda a, n: ({**a, "bn.bias": list(a["bn.bias"])}, n),
    "zero examples": lambda a, n: (a, 0),
    "negative examples": lambda a, n: (a, -4),
    "nan examples": lambda a, n: (a, float("nan")),
    "non-numeric examples": lambda a, n: (a, "many"),
}


@pytest.mark.parametrize("with_reference", [False, True])
@pytest.mark.parametrize("kind", list(ARRAY_CORRUPTIONS))
def test_aggregate_arrays_rejects_malformed_contributions(kind, with_reference):
    rng = np.random.default_rng(0)
    base = _model_arrays(rng)
    contributions = {n: ({k: v.copy() for k, v in base.items()}, 10) for n in ["node-1", BAD, "node-2"]}
    contributions[BAD] = ARRAY_CORRUPTIONS[kind](*contributions[BAD])
    with pytest.raises(PayloadError) as err:
        aggregate_arrays(contributions, reference=base if with_reference else None)
    assert err.value.client == BAD and BAD in str(err.value)


def test_aggregate_arrays_against_reference_names_first_client():
    rng = np.random.default_rng(0)
    base = _model_arrays(rng)
    wrong = _drop(base, "fc.weight")
    with pytest.raises(PayloadError) as err:
        aggregate_arrays({BAD: (wrong, 3), "node-1": (base, 3)}, reference=base)
    assert err.value.client == BAD


def test_aggregate_requests_mismatched_sync_point_names_client():
    rng = np.random.default_rng(0)
    p = SyncPoint(index=3, phase="forward", call=3, channels=C)
    q = SyncPoint(index=4, phase="forward", call=4, channels=C)
    requests = {"node-1": (p, _good_forward(rng)), BAD: (q, _good_forward(rng)), "node-2": (p, _good_forward(rng))}
    with pytest.raises(StepProtocolError, match=BAD):
        aggregate_requests(requests)
    # a payload error at an agreed point is a PayloadError naming the client
    requests[BAD] = (p, BackwardSums(np.zeros(C), np.zeros(C)))
    with pytest.raises(PayloadError) as err:
        aggregate_requests(requests)
    assert err.value.client == BAD
    # backward point: summed
    b = SyncPoint(index=5, phase="backward", call=2, channels=C)
    point, total = aggregate_requests({k: (b, BackwardSums(np.ones(C), np.full(C, 2.0))) for k in "abc"})
    assert point == b
    np.testing.assert_array_equal(total.sum_grad, np.full(C, 3.0))
    np.testing.assert_array_equal(total.sum_grad_xhat, np.full(C, 6.0))


@pytest.mark.parametrize(
    "field,value",
    [("num_examples", float("nan")), ("num_examples", None), ("num_examples", "five"),
     ("num_examples", 2.5), ("count", None), ("count", "ten")],
)
def test_pool_forward_stats_non_numeric_count_names_client(field, value):
    """A count or num_examples that is not a positive number (as a deserialised payload may
    hold) is a PayloadError naming the client, not a bare ValueError/TypeError."""
    rng = np.random.default_rng(0)
    payloads = {n: _good_forward(rng) for n in ["node-1", BAD]}
    good = payloads[BAD]
    fields = dict(count=good.count, num_examples=good.num_examples, mean=good.mean, var=good.var)
    fields[field] = value
    payloads[BAD] = ForwardStats(**fields)
    with pytest.raises(PayloadError) as err:
        pool_forward_stats(payloads, channels=C)
    assert err.value.client == BAD and BAD in str(err.value)


# ---------------------------------------------------------------------- forward counts
def _stats(count, examples, channels=2):
    return ForwardStats(count=count, num_examples=examples, mean=np.zeros(channels), var=np.ones(channels))


def test_forward_counts_consistent_pass():
    from flwr_fedtan.aggregation import forward_count_violations

    payloads = {1: _stats(4 * 16, 4), 2: _stats(9 * 16, 9), 3: _stats(5 * 16, 5)}
    assert forward_count_violations(payloads, {}) == {}
    assert forward_count_violations(payloads, {1: 4, 2: 9, 3: 5}) == {}


def test_forward_counts_inconsistent_are_named():
    from flwr_fedtan.aggregation import forward_count_violations

    # Client 2 doubles its count: 32 values per example where the others have 16.
    payloads = {1: _stats(4 * 16, 4), 2: _stats(9 * 32, 9), 3: _stats(5 * 16, 5)}
    violations = forward_count_violations(payloads, {})
    assert list(violations) == [2] and "32 values per example" in violations[2] and "others have 16" in violations[2]
    # Allowed when the inputs legitimately differ in size.
    assert forward_count_violations(payloads, {}, uniform_positions=False) == {}
    # Not a whole multiple of num-examples.
    violations = forward_count_violations({1: _stats(4 * 16, 4), 2: _stats(50, 9)}, {})
    assert list(violations) == [2] and "whole multiple" in violations[2]
    # num-examples changing within a step.
    violations = forward_count_violations({1: _stats(4 * 16, 4), 2: _stats(10 * 16, 10)}, {1: 4, 2: 9})
    assert list(violations) == [2] and "10 at this BatchNorm call but 9" in violations[2]
    # Two clients disagreeing: the smaller count per example wins (inflating raises it).
    violations = forward_count_violations({1: _stats(4 * 16, 4), 2: _stats(9 * 64, 9)}, {})
    assert list(violations) == [2]


def test_batchnorm_buffers_by_name():
    from flwr_fedtan.aggregation import is_batchnorm_buffer

    assert is_batchnorm_buffer("layer1.0.bn1.running_mean") and is_batchnorm_buffer("running_var")
    assert is_batchnorm_buffer("bn.num_batches_tracked")
    assert not is_batchnorm_buffer("bn.weight") and not is_batchnorm_buffer("fc.running_mean_proj.weight")
