"""Secure statistics (flwr_fedtan.secure): pure NumPy tests, no torch, no Flower.

References are independent of the code under test: NumPy moments of the concatenated data,
and flwr_fedtan.aggregation's clear pooling (what the server computes without masks).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from flwr_fedtan import secure
from flwr_fedtan.aggregation import BackwardSums, ForwardStats, pool_forward_stats, sum_backward_sums
from flwr_fedtan.errors import (
    FixedPointOverflowError,
    KeyAgreementError,
    MaskMismatchError,
    MissingPayloadError,
    PayloadError,
    SecureStatsError,
)
from flwr_fedtan.secure import KeyPair, MaskedPayload, Roster, client_encode, server_decode

NODES = (11, 4, 907, 23)  # unsorted on purpose: the sign of a mask follows the ids, not the order


def key_pairs(nodes=NODES, seed=0) -> dict[int, KeyPair]:
    rng = np.random.default_rng(seed)
    return {n: KeyPair.from_private(rng.bytes(32)) for n in nodes}


def roster_of(keys: dict[int, KeyPair]) -> Roster:
    return Roster.from_keys({n: k.public for n, k in keys.items()})


def encode_all(stats, keys, roster, round=3, attempt=0, exchange=0, shift=None):
    return {
        n: client_encode(
            stats[n], node_id=n, private_key=keys[n].private, roster=roster,
            round=round, attempt=attempt, exchange=exchange, shift=shift,
        )
        for n in stats
    }


def client_activations(seed=1, nodes=NODES, channels=6):
    """Unequal batches, non-IID: per-client means and scales differ, some channels far off zero."""
    rng = np.random.default_rng(seed)
    data = {}
    for i, n in enumerate(nodes):
        count = int(rng.integers(3, 200))
        loc = rng.normal(0, 5, size=channels) + 40.0 * (i % 2)
        data[n] = rng.normal(loc, rng.uniform(0.1, 3, size=channels), size=(count, channels))
    return data


def forward_stats(data, spatial=1):
    return {
        n: ForwardStats(count=float(x.shape[0]), num_examples=x.shape[0] // spatial, mean=x.mean(0), var=x.var(0))
        for n, x in data.items()
    }


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / np.maximum(np.abs(np.asarray(b)), 1e-300)))


# ---------------------------------------------------------------------- fixed point
def test_fixed_point_round_trip_is_exact_for_representable_values():
    bound = secure.value_bound(3)
    values = np.array([0.0, 1.0, -1.0, 0.5, -2.0**-64, 2.0**-64, 123456.789, -9.75e10,
                       np.nextafter(bound, 0), -np.nextafter(bound, 0), 2.0**-30 * 3])
    decoded = secure.decode_fixed_point(secure.encode_fixed_point(values, 3))
    assert np.array_equal(decoded, values)
    # Below the resolution 2**-64, values round to the nearest multiple of it.
    assert secure.decode_fixed_point(secure.encode_fixed_point(np.array([1e-21, -3e-20]), 2)).tolist() == [
        0.0, -(2.0**-64)
    ]


def test_ring_sum_wraps_like_integers_mod_2_128():
    values = np.array([2.0**59, -(2.0**59), -1.5, 7.25, -(2.0**-64)])
    rng = np.random.default_rng(5)
    noise = rng.integers(0, 2**63, size=(2, 5), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    encoded = secure.encode_fixed_point(values, 4)
    # x + r - r == x, with r arbitrary ring elements: exercises carries in both directions
    minus_noise = secure._ring_neg(noise)
    back = secure.ring_sum([encoded, noise, minus_noise])
    assert np.array_equal(back, encoded)
    as_ints = [int(lo) + (int(hi) << 64) for lo, hi in zip(*secure.ring_sum([encoded, noise]))]
    expected = [(round(v * 2**64) + int(lo) + (int(hi) << 64)) % 2**128 for v, lo, hi in zip(values, *noise)]
    assert as_ints == expected


def test_values_beyond_the_bound_raise_naming_the_sync_point():
    bound = secure.value_bound(4)
    assert bound == 2.0**62 / 4
    with pytest.raises(FixedPointOverflowError, match=r"forward sync point 7 \(BatchNorm call 3\).*entry 1"):
        secure.encode_fixed_point(np.array([1.0, bound]), 4, where="forward sync point 7 (BatchNorm call 3)")
    with pytest.raises(FixedPointOverflowError, match="backward sync point 2.*nan"):
        secure.encode_fixed_point(np.array([np.nan]), 4, where="backward sync point 2")
    keys = key_pairs()
    roster = roster_of(keys)
    huge = BackwardSums(sum_grad=np.array([1.0, 2e18]), sum_grad_xhat=np.zeros(2))
    with pytest.raises(FixedPointOverflowError, match="BatchNorm call 5"):
        client_encode(huge, node_id=4, private_key=keys[4].private, roster=roster, round=1, attempt=0,
                      exchange=0, where="backward sync point 9 (BatchNorm call 5)")


def test_a_sum_beyond_the_headroom_is_refused_never_wrapped():
    keys = key_pairs()
    roster = roster_of(keys)
    stats = {n: BackwardSums(sum_grad=np.ones(3), sum_grad_xhat=np.ones(3)) for n in NODES}
    payloads = encode_all(stats, keys, roster)
    tampered = payloads[4].masked.copy()
    tampered[1, 0] += np.uint64(1 << 62)  # + 2**126 in the ring: as if a client skipped the bound
    payloads[4] = MaskedPayload("backward", 3, tampered, payloads[4].roster_digest)
    with pytest.raises(FixedPointOverflowError, match="entry 0 is beyond the headroom"):
        server_decode(payloads, roster, where="backward sync point 1")


# ---------------------------------------------------------------------- secure == clear
@pytest.mark.parametrize("shift", ["none", "near-mean"])
def test_secure_pooled_moments_equal_clear_and_numpy_on_unequal_batches(shift):
    data = client_activations()
    stats = forward_stats(data)
    keys = key_pairs()
    roster = roster_of(keys)
    pooled_x = np.concatenate(list(data.values()))
    c = None if shift == "none" else np.round(pooled_x.mean(0) + 0.3, 1)
    decoded = server_decode(encode_all(stats, keys, roster, shift=c), roster)
    clear = pool_forward_stats(stats)
    assert decoded.count == clear.count == pooled_x.shape[0]
    assert decoded.num_examples == clear.num_examples == pooled_x.shape[0]
    assert rel_err(decoded.mean, pooled_x.mean(0)) < 1e-13
    assert rel_err(decoded.var, pooled_x.var(0)) < 1e-11
    assert rel_err(decoded.mean, clear.mean) < 1e-13
    assert rel_err(decoded.var, clear.var) < 1e-11


def test_secure_forward_counts_with_spatial_positions():
    rng = np.random.default_rng(7)
    # (n_k, C, H, W) activations: m_k = n_k * H * W values per channel
    batches = {n: rng.normal(1.0, 2.0, size=(b, 5, 4, 3)) for n, b in zip(NODES, (1, 7, 2, 16))}
    stats = {
        n: ForwardStats(count=float(x.shape[0] * 12), num_examples=x.shape[0],
                        mean=x.mean((0, 2, 3)), var=x.var((0, 2, 3)))
        for n, x in batches.items()
    }
    keys = key_pairs()
    roster = roster_of(keys)
    decoded = server_decode(encode_all(stats, keys, roster), roster)
    pooled = np.concatenate(list(batches.values()))
    assert (decoded.count, decoded.num_examples) == (26 * 12, 26)
    assert rel_err(decoded.mean, pooled.mean((0, 2, 3))) < 1e-12
    assert rel_err(decoded.var, pooled.var((0, 2, 3))) < 1e-12


def test_secure_backward_sums_equal_clear_and_numpy():
    rng = np.random.default_rng(3)
    grads = {n: rng.normal(0, 1e-3, size=(int(rng.integers(2, 90)), 9)) for n in NODES}
    xhat = {n: rng.normal(0, 1, size=g.shape) for n, g in grads.items()}
    sums = {n: BackwardSums(sum_grad=g.sum(0), sum_grad_xhat=(g * xhat[n]).sum(0)) for n, g in grads.items()}
    keys = key_pairs()
    roster = roster_of(keys)
    decoded = server_decode(encode_all(sums, keys, roster, exchange=5), roster)
    clear = sum_backward_sums(sums)
    all_g = np.concatenate(list(grads.values()))
    all_gx = np.concatenate([grads[n] * xhat[n] for n in NODES])
    assert isinstance(decoded, BackwardSums)
    assert rel_err(decoded.sum_grad, all_g.sum(0)) < 1e-12
    assert rel_err(decoded.sum_grad_xhat, all_gx.sum(0)) < 1e-12
    assert rel_err(decoded.sum_grad, clear.sum_grad) < 1e-13


def test_float32_scale_statistics_within_1e_6_relative_at_the_default_scale():
    """Activations and gradients as a float32 model produces them, over many magnitudes."""
    rng = np.random.default_rng(11)
    keys = key_pairs()
    roster = roster_of(keys)
    worst = 0.0
    for magnitude in (1e-6, 1e-3, 1.0, 1e3, 1e5):
        data = {n: (rng.normal(magnitude, magnitude, size=(512, 16))).astype(np.float32) for n in NODES}
        stats = forward_stats({n: x.astype(np.float64) for n, x in data.items()})
        pooled = np.concatenate(list(data.values())).astype(np.float64)
        decoded = server_decode(encode_all(stats, keys, roster), roster)
        worst = max(worst, rel_err(decoded.mean, pooled.mean(0)), rel_err(decoded.var, pooled.var(0)))
        # backward: per-element gradients of a mean loss over 2048 samples are small
        g = {n: rng.normal(0, magnitude / 2048, size=(512, 16)).astype(np.float32) for n in NODES}
        sums = {n: BackwardSums(sum_grad=v.sum(0, dtype=np.float64), sum_grad_xhat=(v * 0.7).sum(0, dtype=np.float64))
                for n, v in g.items()}
        decoded_b = server_decode(encode_all(sums, keys, roster, exchange=1), roster)
        reference = np.concatenate(list(g.values())).astype(np.float64).sum(0)
        worst = max(worst, rel_err(decoded_b.sum_grad, reference))
    assert worst <= 1e-6, worst


# ---------------------------------------------------------------------- no information
def _chi_square_p(counts: np.ndarray, expected: np.ndarray) -> float:
    """Upper-tail p-value of Pearson's chi-square (Wilson-Hilferty normal approximation)."""
    statistic = float(((counts - expected) ** 2 / expected).sum())
    df = counts.size - 1
    z = ((statistic / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def _payload_bytes(stats_of_exchange, keys, roster, node, exchanges) -> np.ndarray:
    chunks = []
    for e in range(exchanges):
        payload = client_encode(stats_of_exchange(e), node_id=node, private_key=keys[node].private, roster=roster,
                                round=1, attempt=0, exchange=e)
        chunks.append(payload.masked.tobytes())
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def test_masked_payloads_are_uniform_and_do_not_depend_on_the_data():
    keys = key_pairs(seed=21)
    roster = roster_of(keys)
    channels, exchanges = 32, 120
    rng = np.random.default_rng(2)
    large_data = rng.normal(500.0, 80.0, size=(exchanges, channels))

    def small(e):
        return ForwardStats(count=4.0, num_examples=4, mean=np.zeros(channels), var=np.full(channels, 1e-4))

    def large(e):
        return ForwardStats(count=9000.0, num_examples=90, mean=large_data[e], var=large_data[e] ** 2 / 7)

    a = _payload_bytes(small, keys, roster, 4, exchanges)
    b = _payload_bytes(large, keys, roster, 4, exchanges)
    assert a.size == b.size == exchanges * 16 * (2 * channels + 3)

    # bytes uniform over 0..255
    for sample in (a, b):
        counts = np.bincount(sample, minlength=256).astype(float)
        assert _chi_square_p(counts, np.full(256, sample.size / 256)) > 1e-6
    # the two data sets give indistinguishable byte distributions (2 x 256 contingency table)
    table = np.stack([np.bincount(a, minlength=256), np.bincount(b, minlength=256)]).astype(float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    df = 255
    z = ((statistic / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    assert 0.5 * math.erfc(z / math.sqrt(2)) > 1e-6
    # every one of the 128 bit positions of a ring element is set half of the time
    for sample in (a, b):
        words = sample.view("<u8").reshape(-1, 2)
        bits = np.concatenate([(words[:, limb, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
                               for limb in (0, 1)], axis=1)
        frequency = bits.mean(0)
        sigma = 0.5 / math.sqrt(words.shape[0])
        assert np.abs(frequency - 0.5).max() < 5.5 * sigma

    # The same tests do see the data without masks: they are not blind.
    plain = b"".join(
        secure.encode_fixed_point(np.concatenate([[9000.0, 90], 9000 * large_data[e], np.ones(channels), [0]]), 4)
        .tobytes() for e in range(exchanges)
    )
    plain = np.frombuffer(plain, dtype=np.uint8)
    counts = np.bincount(plain, minlength=256).astype(float)
    assert _chi_square_p(counts, np.full(256, plain.size / 256)) < 1e-12


def test_a_partial_sum_stays_masked():
    """Without one client's payload the others' sum is as random as a single payload."""
    keys = key_pairs(seed=8)
    roster = roster_of(keys)
    channels = 40
    stats = {n: ForwardStats(count=10.0, num_examples=10, mean=np.full(channels, 2.0), var=np.ones(channels))
             for n in NODES}
    chunks = []
    for e in range(60):
        payloads = encode_all(stats, keys, roster, exchange=e)
        chunks.append(secure.ring_sum([payloads[n].masked for n in NODES if n != 907]).tobytes())
    sample = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    counts = np.bincount(sample, minlength=256).astype(float)
    assert _chi_square_p(counts, np.full(256, sample.size / 256)) > 1e-6
    with pytest.raises(MissingPayloadError, match=r"no payload from nodes \[907\].*restart") as info:
        server_decode({n: p for n, p in payloads.items() if n != 907}, roster)
    assert info.value.missing == (907,)


# ---------------------------------------------------------------------- dropout, restart
def test_dropout_then_restart_with_survivors_uses_fresh_masks_and_gives_the_right_sum():
    keys = key_pairs(seed=4)
    data = client_activations(seed=9)
    stats = forward_stats(data)
    roster = roster_of(keys)
    # attempt 0: exchanges 0 and 1 complete, node 23 dies before sending exchange 2
    for e in (0, 1):
        assert server_decode(encode_all(stats, keys, roster, attempt=0, exchange=e), roster).count == sum(
            x.shape[0] for x in data.values())
    partial = {n: p for n, p in encode_all(stats, keys, roster, attempt=0, exchange=2).items() if n != 23}
    with pytest.raises(MissingPayloadError):
        server_decode(partial, roster)

    # restart: the survivors keep their round keys, the attempt number changes every mask
    survivors = {n: k for n, k in keys.items() if n != 23}
    roster_1 = roster_of(survivors)
    fresh = encode_all({n: stats[n] for n in survivors}, survivors, roster_1, attempt=1, exchange=2)
    for n in survivors:
        assert not np.array_equal(fresh[n].masked, partial[n].masked)
    # same roster and exchange, next attempt: still fresh (never reuse a mask)
    again = encode_all({n: stats[n] for n in survivors}, survivors, roster_1, attempt=2, exchange=2)
    assert all(not np.array_equal(again[n].masked, fresh[n].masked) for n in survivors)

    decoded = server_decode(fresh, roster_1)
    pooled = np.concatenate([data[n] for n in survivors])
    assert decoded.count == pooled.shape[0]
    assert rel_err(decoded.mean, pooled.mean(0)) < 1e-13
    assert rel_err(decoded.var, pooled.var(0)) < 1e-11
    # the old roster's payloads cannot be mixed into the new attempt
    mixed = dict(fresh)
    mixed[4] = partial[4]
    with pytest.raises(PayloadError, match="client 4: .*another roster"):
        server_decode(mixed, roster_1)


# ---------------------------------------------------------------------- wrong or missing keys
def test_a_private_key_that_does_not_match_the_roster_is_refused_on_the_client():
    keys = key_pairs()
    roster = roster_of(keys)
    stats = BackwardSums(sum_grad=np.ones(2), sum_grad_xhat=np.ones(2))
    with pytest.raises(KeyAgreementError, match="node 4: its private key does not match"):
        client_encode(stats, node_id=4, private_key=keys[11].private, roster=roster, round=1, attempt=0, exchange=0)
    with pytest.raises(KeyAgreementError, match="node 4: the private key must be 32 raw bytes"):
        client_encode(stats, node_id=4, private_key=b"short", roster=roster, round=1, attempt=0, exchange=0)
    with pytest.raises(KeyAgreementError, match="node 5 is not in the roster"):
        client_encode(stats, node_id=5, private_key=keys[4].private, roster=roster, round=1, attempt=0, exchange=0)


def test_a_client_given_another_key_is_named_by_the_server():
    keys = key_pairs()
    roster = roster_of(keys)
    forged = Roster.from_keys({**{n: k.public for n, k in keys.items()}, 907: key_pairs(seed=99)[907].public})
    stats = {n: BackwardSums(sum_grad=np.ones(2), sum_grad_xhat=np.ones(2)) for n in NODES}
    payloads = encode_all(stats, keys, roster)
    payloads[11] = client_encode(stats[11], node_id=11, private_key=keys[11].private, roster=forged,
                                 round=3, attempt=0, exchange=0)
    with pytest.raises(PayloadError, match="client 11: .*another roster") as info:
        server_decode(payloads, roster)
    assert info.value.client == 11


def test_masks_of_another_attempt_or_exchange_do_not_cancel_and_are_detected():
    keys = key_pairs()
    roster = roster_of(keys)
    stats = {n: BackwardSums(sum_grad=np.ones(3), sum_grad_xhat=np.ones(3)) for n in NODES}
    for changed in ({"attempt": 1}, {"exchange": 8}, {"round": 4}):
        payloads = encode_all(stats, keys, roster)
        payloads[907] = client_encode(stats[907], node_id=907, private_key=keys[907].private, roster=roster,
                                      **{"round": 3, "attempt": 0, "exchange": 0, **changed})
        with pytest.raises(MaskMismatchError, match="did not cancel"):
            server_decode(payloads, roster, where="backward sync point 4")


def test_roster_validation_and_wire_round_trip():
    keys = key_pairs()
    roster = roster_of(keys)
    assert roster.node_ids == (4, 11, 23, 907)
    again = Roster.from_arrays(roster.to_arrays())
    assert again == roster and again.digest() == roster.digest()
    with pytest.raises(KeyAgreementError, match="at least 2 clients"):
        Roster.from_keys({4: keys[4].public})
    with pytest.raises(KeyAgreementError, match="node 11: public key must be 32 raw bytes"):
        Roster.from_keys({4: keys[4].public, 11: b"x" * 31})
    with pytest.raises(KeyAgreementError, match="same public key"):
        Roster.from_keys({4: keys[4].public, 11: keys[4].public})
    with pytest.raises(KeyAgreementError, match="lacks 'public-keys'"):
        Roster.from_arrays({"node-ids": np.array([1, 2], dtype=np.uint64)})
    # an X25519 point of small order gives no shared secret: refused on receipt, naming its node
    with pytest.raises(KeyAgreementError, match="node 11: public key is a point of small order"):
        Roster.from_keys({4: keys[4].public, 11: bytes(32)})
    # and, should one get past the roster, key agreement names the pair
    weak = Roster(node_ids=(4, 11), public_keys=(keys[4].public, bytes(32)))
    with pytest.raises(KeyAgreementError, match="between nodes 4 and 11"):
        secure.pairwise_masks(keys[4].private, 4, weak, 1, 0, 0, 3)


def test_masked_payload_wire_round_trip_and_validation():
    keys = key_pairs()
    roster = roster_of(keys)
    payload = client_encode(ForwardStats(count=6.0, num_examples=3, mean=np.ones(4), var=np.ones(4)),
                            node_id=23, private_key=keys[23].private, roster=roster, round=1, attempt=0, exchange=0)
    arrays = payload.to_arrays()
    back = MaskedPayload.from_arrays(23, "forward", 4, arrays, count=6.0, num_examples=3)
    assert np.array_equal(back.masked, payload.masked) and back.roster_digest == payload.roster_digest
    with pytest.raises(PayloadError, match=r"client 23: masked payload is uint64 \(2, 11\), expected uint64 \(2, 9\)"):
        MaskedPayload.from_arrays(23, "forward", 3, arrays, count=6.0, num_examples=3)
    with pytest.raises(PayloadError, match="client 23: masked payload holds"):
        MaskedPayload.from_arrays(23, "backward", 4, arrays)
    with pytest.raises(PayloadError, match="client 23: shift must be finite"):
        MaskedPayload.from_arrays(23, "forward", 4, {**arrays, "shift": np.array([np.nan] * 4)}, count=6.0,
                                  num_examples=3)
    with pytest.raises(PayloadError, match="client 23: masked forward payload lacks its clear 'count'"):
        MaskedPayload.from_arrays(23, "forward", 4, arrays)


def test_server_names_a_client_with_a_different_shift_or_an_unknown_node():
    keys = key_pairs()
    roster = roster_of(keys)
    stats = forward_stats(client_activations())
    payloads = encode_all(stats, keys, roster, shift=np.zeros(6))
    payloads[907] = client_encode(stats[907], node_id=907, private_key=keys[907].private, roster=roster,
                                  round=3, attempt=0, exchange=0, shift=np.ones(6))
    with pytest.raises(PayloadError, match="client 907: .*shift differs"):
        server_decode(payloads, roster)
    payloads = encode_all(stats, keys, roster)
    with pytest.raises(PayloadError, match="client 5: .*not in the roster"):
        server_decode({**payloads, 5: payloads[4]}, roster)


# ---------------------------------------------------------------------- server session
def test_server_session_keys_rosters_and_shifts_over_two_rounds():
    session = secure.ServerSession()
    data = client_activations(seed=13)
    for round_ in (1, 2):
        session.new_round(round_)
        keys = key_pairs(seed=round_)  # fresh keys every round
        for node, pair in keys.items():
            session.accept_public_key(node, np.frombuffer(pair.public, dtype=np.uint8))
        with pytest.raises(PayloadError, match="client 4: .*already sent"):
            session.accept_public_key(4, keys[11].public)
        with pytest.raises(PayloadError, match="client 5: public key must be 32 bytes"):
            session.accept_public_key(5, b"abc")
        with pytest.raises(KeyAgreementError, match=r"nodes \[6\] have no public key"):
            session.roster([4, 6])
        roster = session.roster(list(keys))
        # the shifts travel to the clients and back as arrays
        shifts = secure.shifts_from_arrays(secure.shifts_to_arrays(session.shifts))
        shift = secure.shift_for(shifts, 0, 6)
        assert (shift is None) == (round_ == 1)
        stats = forward_stats({n: x + round_ for n, x in data.items()})
        decoded = session.decode(encode_all(stats, keys, roster, round=round_, shift=shift), roster, 0,
                                 secure.describe_point(round_, 0, "forward", 0, 0))
        pooled = np.concatenate(list(data.values())) + round_
        assert rel_err(decoded.mean, pooled.mean(0)) < 1e-13
        assert rel_err(decoded.var, pooled.var(0)) < 1e-11
        assert np.array_equal(session.shifts[0], decoded.mean)
    assert secure.shift_for(session.shifts, 0, 5) is None  # a layer of another width: no shift
    with pytest.raises(SecureStatsError, match="malformed shift 'x'"):
        secure.shifts_from_arrays({"x": np.zeros(2)})


def test_forward_counts_also_travel_in_the_clear_and_must_add_up():
    keys = key_pairs()
    roster = roster_of(keys)
    stats = forward_stats(client_activations())
    payloads = encode_all(stats, keys, roster)
    assert {n: (p.count, p.num_examples) for n, p in payloads.items()} == {
        n: (s.count, s.num_examples) for n, s in stats.items()
    }
    back = MaskedPayload.from_arrays(4, "forward", 6, payloads[4].to_arrays(), count=payloads[4].count,
                                     num_examples=payloads[4].num_examples)
    assert (back.count, back.num_examples) == (payloads[4].count, payloads[4].num_examples)
    with pytest.raises(PayloadError, match="client 4: num-examples must be an int >= 1"):
        MaskedPayload.from_arrays(4, "forward", 6, payloads[4].to_arrays(), count=3.0, num_examples=0)
    # a client claims a bigger batch in the clear than it put into the masked sums
    liar = payloads[23]
    payloads[23] = MaskedPayload(liar.phase, liar.channels, liar.masked, liar.roster_digest, liar.shift,
                                 count=liar.count + 1, num_examples=liar.num_examples + 1)
    with pytest.raises(MaskMismatchError, match="clear counts add up to"):
        server_decode(payloads, roster)
