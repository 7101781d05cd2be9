"""Secure aggregation of BatchNorm statistics: an honest-but-curious server (one that runs
the protocol faithfully) learns only the sums over clients.

A malicious server is not covered: it can substitute public keys (a man in the middle) and
then read each client's payload. What the clients refuse from any server (invalid keys,
repeated or decreasing attempts) is listed in the README's "What FedTAN trusts".

Pure functions on NumPy arrays and byte strings, built on ``cryptography`` (a Flower
dependency); no torch, no Flower.

How a payload is protected
--------------------------
1. **Key agreement** (once per round): every client makes an X25519 key pair
   (:func:`generate_key_pair`); the server relays the public keys as a :class:`Roster`.
   Clients ``i`` and ``j`` share ``X25519(sk_i, pk_j) == X25519(sk_j, pk_i)``; HKDF-SHA256 of it,
   with the round, the attempt (restart number), both node ids and the roster's digest as
   context, is the pair's key for that attempt.
2. **Fixed point in a ring**: each float64 value ``v`` becomes the integer
   ``round(v * 2**fractional_bits)`` in the ring of integers modulo ``2**128`` (two's complement,
   two uint64 limbs; :func:`encode_fixed_point`).
3. **Pairwise masks**: for exchange ``e`` (the number of aggregates the client received
   before this payload), the pair's ChaCha20 keystream with nonce ``e`` is a vector of ring
   elements; client ``i`` adds it for every peer ``j > i`` and subtracts it for every
   ``j < i``. In the sum over the roster every mask appears once with each sign and cancels;
   any single payload, or any sum over part of the roster, is uniformly random.
4. **Sums, not moments**: a forward payload is ``[m_k, n_k, sum(x - c), sum((x - c)**2)]``
   with a public per-channel shift ``c``, a backward payload ``[sum g, sum g * x_hat]``; each
   ends with a *canary*, an encoded zero, whose sum is exactly zero only if all masks cancelled.
   The server (:func:`server_decode`) sums the ring vectors, checks the canary and decodes
   the pooled moments: ``M = sum m_k``, ``mu = c + S1 / M``, ``var = S2 / M - (S1 / M)**2``.

Fixed-point bound and resolution (default ``fractional_bits = 64``)
-------------------------------------------------------------------
With ``K`` clients every encoded value must satisfy ``|v| < 2**(126 - fractional_bits) / K``
(``2**62 / K``, about ``4.6e18 / K``, by default), so that the sum of ``K`` of them stays below
``2**126`` in magnitude, half of the ring's signed range; a decoded sum at or above ``2**126``
can only come from masks that did not cancel or from a corrupted payload, and is refused.
Encoding rounds each value to the nearest multiple of ``2**-fractional_bits``, an error of
at most ``2**-(fractional_bits + 1)`` (``2.7e-20`` by default), so a sum over ``K`` clients is
off by at most ``K * 2.7e-20``: a sum above ``K * 3e-14`` in magnitude is exact to ``1e-6``
relative, and the decoded moments agree with
:func:`~flwr_fedtan.aggregation.pool_forward_stats` to float64 rounding. Out-of-range values
raise :class:`FixedPointOverflowError` naming the sync point, never a silently wrong sum.
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Hashable, Mapping, Optional, Sequence, Union

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .aggregation import BackwardSums, ForwardStats
from .errors import (
    CanaryMismatchError, FixedPointOverflowError, KeyAgreementError, MaskMismatchError, MissingPayloadError,
    PayloadError, SecureStatsError,
)

__all__ = [
    "DEFAULT_FRACTIONAL_BITS",
    "RING_BITS",
    "canary_masks",
    "blame_canary",
    "KeyPair",
    "Roster",
    "MaskedPayload",
    "generate_key_pair",
    "encode_fixed_point",
    "decode_fixed_point",
    "ring_sum",
    "pairwise_masks",
    "client_encode",
    "server_decode",
    "value_bound",
    "describe_point",
    "check_public_key",
    "shift_for",
    "shifts_to_arrays",
    "shifts_from_arrays",
    "ServerSession",
]

RING_BITS = 128
DEFAULT_FRACTIONAL_BITS = 64
_HEADROOM_BITS = 126  # |decoded sum| < 2**126: one spare bit below the sign bit
_KEY_BYTES = 32
_PROTOCOL_LABEL = b"flwr-fedtan/secure-stats/v1"
_U64 = np.uint64
_TWO_64 = 2.0**64
_TWO_63 = 2.0**63

Payload = Union[ForwardStats, BackwardSums]


# ---------------------------------------------------------------------- errors


# ---------------------------------------------------------------------- keys
@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair as raw 32-byte strings (``private`` stays on the client)."""

    private: bytes
    public: bytes

    @classmethod
    def from_private(cls, private: bytes) -> "KeyPair":
        """The pair of a stored private key (e.g. kept in the node's state between messages)."""
        return cls(private=bytes(private), public=_public_of(_private_key(private, -1)))


def generate_key_pair() -> KeyPair:
    """A fresh X25519 key pair (one per client and round)."""
    key = X25519PrivateKey.generate()
    return KeyPair(private=key.private_bytes_raw(), public=_public_of(key))


@functools.lru_cache(maxsize=256)
def check_public_key(key: bytes) -> None:
    """Refuse a public key that cannot key a pair: not 32 bytes, or a point of small order
    (the all-zero key among them), whose shared secret with any private key is all zero,
    so every pair key with it would be the same public value.

    Raises
    ------
    KeyAgreementError
        Naming what is wrong with the key.
    """
    if not isinstance(key, (bytes, bytearray)) or len(key) != _KEY_BYTES:
        raise KeyAgreementError(
            f"public key must be {_KEY_BYTES} raw bytes (X25519), got {type(key).__name__} of length "
            f"{len(key) if hasattr(key, '__len__') else '?'}"
        )
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(bytes(key)))
    except ValueError:
        raise KeyAgreementError(
            "public key is a point of small order (e.g. all zeros): it gives an all-zero shared secret"
        ) from None


def _public_of(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _private_key(private: object, node_id: int) -> X25519PrivateKey:
    if not isinstance(private, (bytes, bytearray)) or len(private) != _KEY_BYTES:
        who = "" if node_id < 0 else f"node {node_id}: "
        raise KeyAgreementError(
            f"{who}the private key must be {_KEY_BYTES} raw bytes, got "
            f"{type(private).__name__} of length {len(private) if hasattr(private, '__len__') else '?'}; "
            "it is made by generate_key_pair() at the round's key exchange"
        )
    return X25519PrivateKey.from_private_bytes(bytes(private))


@dataclass(frozen=True)
class Roster:
    """The round's participants and their public keys, as relayed by the server.

    ``node_ids`` are sorted ascending; ``public_keys[i]`` belongs to ``node_ids[i]``. Build it
    with :meth:`from_keys`, which validates it.
    """

    node_ids: tuple[int, ...]
    public_keys: tuple[bytes, ...]

    @classmethod
    def from_keys(cls, keys: Mapping[int, bytes]) -> "Roster":
        """A roster from ``{node_id: public key}``.

        Raises
        ------
        KeyAgreementError
            Fewer than two nodes (a lone client's payload could not be masked), a key that
            is not 32 bytes or of small order (naming its node), or two nodes with the same
            key.
        """
        if len(keys) < 2:
            raise KeyAgreementError(
                f"secure statistics need at least 2 clients, the roster has {len(keys)}: "
                "a single client's statistics cannot be hidden in a sum"
            )
        ids = sorted(int(node) for node in keys)
        public = []
        for node in ids:
            key = keys[node]
            try:
                check_public_key(bytes(key) if isinstance(key, bytearray) else key)
            except KeyAgreementError as error:
                raise KeyAgreementError(f"node {node}: {error}") from None
            public.append(bytes(key))
        if len(set(public)) != len(public):
            raise KeyAgreementError("two nodes of the roster sent the same public key")
        return cls(node_ids=tuple(ids), public_keys=tuple(public))

    def __len__(self) -> int:
        return len(self.node_ids)

    def key_of(self, node_id: int) -> bytes:
        """The public key of ``node_id``; :class:`KeyAgreementError` if it is not listed."""
        try:
            return self.public_keys[self.node_ids.index(int(node_id))]
        except ValueError:
            raise KeyAgreementError(
                f"node {node_id} is not in the roster {list(self.node_ids)}: it has no public "
                "key for this round (it missed the key exchange or was dropped)"
            ) from None

    def digest(self) -> bytes:
        """SHA-256 of the node ids and keys: what every payload of the attempt is bound to."""
        h = hashlib.sha256(_PROTOCOL_LABEL + b"/roster")
        for node, key in zip(self.node_ids, self.public_keys):
            h.update(struct.pack(">Q", node & 0xFFFFFFFFFFFFFFFF))
            h.update(key)
        return h.digest()

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The roster as NumPy arrays (for an ``ArrayRecord``)."""
        return {
            "node-ids": np.array(self.node_ids, dtype=np.uint64),
            "public-keys": np.frombuffer(b"".join(self.public_keys), dtype=np.uint8).reshape(-1, _KEY_BYTES),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "Roster":
        """Inverse of :meth:`to_arrays`, validated."""
        try:
            ids = np.asarray(arrays["node-ids"])
            keys = np.asarray(arrays["public-keys"])
        except KeyError as missing:
            raise KeyAgreementError(
                f"roster lacks {missing}; the server must relay 'node-ids' and 'public-keys'"
            ) from None
        if ids.ndim != 1 or keys.shape != (ids.shape[0], _KEY_BYTES) or keys.dtype != np.uint8:
            raise KeyAgreementError(
                f"malformed roster: node-ids {ids.shape}, public-keys {keys.shape} {keys.dtype}; "
                f"expected (K,) and (K, {_KEY_BYTES}) uint8"
            )
        mapping = {int(node): keys[i].tobytes() for i, node in enumerate(ids)}
        if len(mapping) != len(ids):
            raise KeyAgreementError("the roster lists a node twice")
        return cls.from_keys(mapping)


# ---------------------------------------------------------------------- the ring Z_2^128
# A ring vector of length n is a (2, n) uint64 array: row 0 the low limb, row 1 the high one.
# NumPy's uint64 array arithmetic wraps modulo 2**64; carries are propagated by hand.


def _ring_add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    low = a[0] + b[0]
    carry = (low < a[0]).astype(_U64)
    return np.stack([low, a[1] + b[1] + carry])


def _ring_neg(a: np.ndarray) -> np.ndarray:
    low = ~a[0] + _U64(1)
    carry = (a[0] == 0).astype(_U64)
    return np.stack([low, ~a[1] + carry])


def ring_sum(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """Sum of ring vectors modulo ``2**128``."""
    total = vectors[0].copy()
    for vector in vectors[1:]:
        total = _ring_add(total, vector)
    return total


def value_bound(num_clients: int, fractional_bits: int = DEFAULT_FRACTIONAL_BITS) -> float:
    """The largest magnitude a client may encode: ``2**(126 - fractional_bits) / num_clients``
    (exclusive). ``2**62 / K``, about ``4.6e18 / K``, by default."""
    return math.ldexp(1.0, _HEADROOM_BITS - fractional_bits) / max(1, int(num_clients))


def _check_fractional_bits(fractional_bits: int) -> int:
    if not isinstance(fractional_bits, int) or not 8 <= fractional_bits <= 110:
        raise ValueError(f"fractional_bits must be an int in [8, 110], got {fractional_bits!r}")
    return fractional_bits


def encode_fixed_point(
    values: np.ndarray,
    num_clients: int,
    fractional_bits: int = DEFAULT_FRACTIONAL_BITS,
    where: str = "payload",
) -> np.ndarray:
    """Encode float64 values as ``round(v * 2**fractional_bits)`` in the ring ``Z_2^128``.

    Parameters
    ----------
    values : np.ndarray
        1-D floating values.
    num_clients : int
        ``K``, how many payloads will be summed: the bound below shrinks with it.
    fractional_bits : int (default: 64)
        The scale is ``2**fractional_bits``.
    where : str
        Names the payload in errors (e.g. the sync point).

    Returns
    -------
    np.ndarray
        ``(2, n)`` uint64: low and high limbs.

    Raises
    ------
    FixedPointOverflowError
        A value is NaN, Inf, or ``|v| >= 2**(126 - fractional_bits) / num_clients``.
    """
    _check_fractional_bits(fractional_bits)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise FixedPointOverflowError(f"{where}: entry {bad} is {values[bad]}; only finite values can be summed")
    bound = value_bound(num_clients, fractional_bits)
    too_big = np.abs(values) >= bound
    if too_big.any():
        bad = int(np.flatnonzero(too_big)[0])
        raise FixedPointOverflowError(
            f"{where}: entry {bad} = {values[bad]:.6g} exceeds the fixed-point bound {bound:.3g} "
            f"(2**{_HEADROOM_BITS - fractional_bits} / {num_clients} clients); lower fractional_bits "
            "or check the model for diverging activations or gradients"
        )
    magnitude = np.abs(np.rint(np.ldexp(values, fractional_bits)))  # exact integers < 2**126
    high = np.floor(magnitude / _TWO_64)
    low = magnitude - high * _TWO_64  # exact: the bits of `magnitude` below 2**64
    upper_half = low >= _TWO_63
    low_limb = (low - np.where(upper_half, _TWO_63, 0.0)).astype(_U64) + upper_half.astype(_U64) * _U64(1 << 63)
    encoded = np.stack([low_limb, high.astype(_U64)])
    negative = values < 0
    if negative.any():
        encoded[:, negative] = _ring_neg(encoded[:, negative])
    return encoded


def decode_fixed_point(
    ring: np.ndarray, fractional_bits: int = DEFAULT_FRACTIONAL_BITS, where: str = "sum"
) -> np.ndarray:
    """Decode ring elements (two's complement) to float64: the inverse of
    :func:`encode_fixed_point`, rounding to the nearest float64.

    Raises
    ------
    FixedPointOverflowError
        An element is ``>= 2**126`` in magnitude: no sum of in-range payloads gets there, so
        the masks did not cancel or a payload was corrupt.
    """
    _check_fractional_bits(fractional_bits)
    negative = ring[1] >= _U64(1 << 63)
    magnitude = ring.copy()
    if negative.any():
        magnitude[:, negative] = _ring_neg(ring[:, negative])
    out_of_range = magnitude[1] >= _U64(1 << (_HEADROOM_BITS - 64))
    if out_of_range.any():
        bad = int(np.flatnonzero(out_of_range)[0])
        raise FixedPointOverflowError(
            f"{where}: decoded entry {bad} is beyond the headroom 2**{_HEADROOM_BITS} of the ring "
            "(a client exceeded the fixed-point bound, or the masks did not cancel)"
        )
    value = magnitude[1].astype(np.float64) * _TWO_64 + magnitude[0].astype(np.float64)
    return np.ldexp(np.where(negative, -value, value), -fractional_bits)


# ---------------------------------------------------------------------- masks
def _pair_key(own: X25519PrivateKey, own_id: int, peer_id: int, peer_public: bytes,
              round: int, attempt: int, roster_digest: bytes) -> bytes:
    try:
        shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as error:
        raise KeyAgreementError(f"key agreement between nodes {own_id} and {peer_id} failed: {error}") from None
    low, high = sorted((own_id, peer_id))
    info = _PROTOCOL_LABEL + struct.pack(">qqQQ", round, attempt, low & (2**64 - 1), high & (2**64 - 1)) + roster_digest
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _keystream(key: bytes, exchange: int, length: int) -> np.ndarray:
    """``length`` ring elements from ChaCha20(key) with the exchange index as nonce."""
    nonce = b"\x00" * 4 + struct.pack("<Q", exchange) + b"\x00" * 4  # 32-bit block counter, 96-bit nonce
    stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(16 * length))
    return np.frombuffer(stream, dtype="<u8").reshape(length, 2).T.astype(_U64)


def pairwise_masks(
    private_key: bytes,
    node_id: int,
    roster: Roster,
    round: int,
    attempt: int,
    exchange: int,
    length: int,
) -> np.ndarray:
    """The sum of ``node_id``'s signed pairwise masks for one exchange.

    ``+PRG(k_ij)`` for every peer ``j`` with a larger node id, ``-PRG(k_ij)`` for a smaller
    one, where ``k_ij`` is fresh per (round, attempt) and the PRG's nonce is ``exchange``; so
    the masks of all roster members sum to zero, and change with any of the three.

    Raises
    ------
    KeyAgreementError
        ``node_id`` is not in the roster, or ``private_key`` is not the key behind its
        public key there.
    """
    if exchange < 0 or attempt < 0:
        raise ValueError(f"exchange and attempt must be >= 0, got {exchange}, {attempt}")
    total = np.zeros((2, length), dtype=_U64)
    for peer, key in _attempt_keys(bytes(private_key), int(node_id), roster, int(round), int(attempt)):
        stream = _keystream(key, exchange, length)
        total = _ring_add(total, stream if node_id < peer else _ring_neg(stream))
    return total


@functools.lru_cache(maxsize=32)
def _attempt_keys(private_key: bytes, node_id: int, roster: Roster, round: int, attempt: int) -> tuple:
    """``((peer, pair key), ...)`` of one attempt: X25519 and HKDF once per attempt and peer,
    not once per exchange (a live round's process reuses them for its ``2L`` exchanges)."""
    own = _private_key(private_key, node_id)
    if _public_of(own) != roster.key_of(node_id):
        raise KeyAgreementError(
            f"node {node_id}: its private key does not match its public key in the roster "
            "(a key from another round or node; the key exchange must be redone)"
        )
    digest = roster.digest()
    return tuple(
        (peer, _pair_key(own, node_id, peer, public, round, attempt, digest))
        for peer, public in zip(roster.node_ids, roster.public_keys)
        if peer != node_id
    )


def canary_masks(
    private_key: bytes, node_id: int, roster: Roster, round: int, attempt: int, exchange: int, length: int
) -> dict[int, np.ndarray]:
    """The pair masks of the canary, the last of ``length`` elements, of one exchange: for
    every peer, that element of the pair's keystream (unsigned, ``(2,)`` uint64).

    Revealed to the server after the canaries did not cancel, so that it can tell which
    client's canary is wrong (:func:`blame_canary`). The canary carries an encoded zero and
    each keystream element is an independent output of ChaCha20, so these elements tell
    nothing about the masks of the statistics; ``length`` must be the true length of the
    payload the client sent at that exchange, or another element would be revealed.
    """
    if exchange < 0 or length < 1:
        raise ValueError(f"exchange must be >= 0 and length >= 1, got {exchange}, {length}")
    return {
        peer: _keystream(key, exchange, length)[:, -1].copy()
        for peer, key in _attempt_keys(bytes(private_key), int(node_id), roster, int(round), int(attempt))
    }


def blame_canary(
    payloads: Mapping[int, "MaskedPayload"], roster: Roster, revealed: Mapping[int, Mapping[int, np.ndarray]]
) -> dict[int, str]:
    """Which clients made the canaries fail, with the reason (server side).

    ``revealed[i][j]`` is the canary mask client ``i`` says it shares with ``j``. Client ``i``
    is named if it revealed nothing usable, or if its canary is not the signed sum of the
    masks it revealed (it added something else). Otherwise some pair disagrees about its
    shared mask (one of the two lies): a client that disagrees with more peers than any
    other is named; a lone disagreeing pair names both (the server cannot tell which of the
    two lies). Empty if every canary is what the revealed masks give and every pair agrees
    (then the canaries did cancel).
    """
    blamed: dict[int, str] = {}
    nodes = roster.node_ids
    for node in nodes:
        claims = revealed.get(node)
        peers = set(nodes) - {node}
        if (claims is None or set(claims) != peers
                or any(np.asarray(v).dtype != _U64 or np.shape(v) != (2,) for v in claims.values())):
            blamed[node] = "did not reveal its canary masks for every peer of the roster"
            continue
        expected = np.zeros((2, 1), dtype=_U64)
        for peer, mask in claims.items():
            element = np.asarray(mask, dtype=_U64).reshape(2, 1)
            expected = _ring_add(expected, element if node < peer else _ring_neg(element))
        if not np.array_equal(expected[:, 0], payloads[node].masked[:, -1]):
            blamed[node] = "its canary is not the sum of the pair masks it revealed (it added something else)"
    if blamed:
        return blamed
    disagreements: dict[int, list[int]] = {node: [] for node in nodes}
    for i, node in enumerate(nodes):
        for peer in nodes[i + 1:]:
            if not np.array_equal(revealed[node][peer], revealed[peer][node]):
                disagreements[node].append(peer)
                disagreements[peer].append(node)
    most = max((len(peers) for peers in disagreements.values()), default=0)
    if most == 0:
        return {}
    if most > 1:
        return {node: f"disagrees with nodes {peers} about their pair keys' canary masks"
                for node, peers in disagreements.items() if len(peers) == most}
    return {node: f"disagrees with node {peers[0]} about their pair key's canary mask (one of the two lies)"
            for node, peers in disagreements.items() if peers}


# ---------------------------------------------------------------------- payloads
@dataclass(frozen=True)
class MaskedPayload:
    """What a client sends at a sync point when statistics are secure.

    ``masked`` is the ``(2, n)`` uint64 ring vector (``n = 2 * channels + 3`` forward:
    count, examples, sums, canary; ``2 * channels + 1`` backward). ``shift`` is the public
    per-channel shift ``c`` of a forward payload (the same on every client). ``roster_digest``
    names the roster the masks were made with, in the clear, so that a client with other
    keys is named instead of only spoiling the sum.

    ``count`` (``m_k``) and ``num_examples`` (``n_k``) of a forward payload also travel in the
    clear: ``n_k`` is the client's averaging weight, which the server sees with its model
    anyway, and ``m_k`` is ``n_k`` times the layer's values per example (the model's shape).
    The server uses them to bind each client's weight to its synchronised batch and checks
    that they add up to the pooled count decoded from the masked sums.
    """

    phase: str
    channels: int
    masked: np.ndarray
    roster_digest: bytes
    shift: Optional[np.ndarray] = None
    count: Optional[float] = None
    num_examples: Optional[int] = None

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The payload as NumPy arrays (for an ``ArrayRecord``)."""
        arrays: dict[str, np.ndarray] = {
            "masked": np.ascontiguousarray(self.masked, dtype=_U64),
            "roster-digest": np.frombuffer(self.roster_digest, dtype=np.uint8).copy(),
        }
        if self.shift is not None:
            arrays["shift"] = np.ascontiguousarray(self.shift, dtype=np.float64)
        return arrays

    @classmethod
    def from_arrays(
        cls,
        sender: Hashable,
        phase: str,
        channels: int,
        arrays: Mapping[str, np.ndarray],
        count: Optional[float] = None,
        num_examples: Optional[int] = None,
    ) -> "MaskedPayload":
        """Inverse of :meth:`to_arrays` (with the clear ``count`` and ``num_examples`` of a
        forward payload, which travel as scalars); :class:`PayloadError` names ``sender`` if
        malformed."""
        expected = {"masked", "roster-digest"} | ({"shift"} if phase == "forward" else set())
        if set(arrays) != expected:
            raise PayloadError(sender, f"masked payload holds {sorted(arrays)}, expected {sorted(expected)}")
        masked = np.asarray(arrays["masked"])
        length = _payload_length(phase, channels)
        if masked.dtype != _U64 or masked.shape != (2, length):
            raise PayloadError(
                sender, f"masked payload is {masked.dtype} {masked.shape}, expected uint64 (2, {length}) "
                f"for a {phase} sync point of {channels} channels"
            )
        digest = np.asarray(arrays["roster-digest"])
        if digest.dtype != np.uint8 or digest.shape != (32,):
            raise PayloadError(sender, f"roster-digest is {digest.dtype} {digest.shape}, expected uint8 (32,)")
        shift = None
        if phase == "forward":
            shift = np.asarray(arrays["shift"])
            if shift.dtype != np.float64 or shift.shape != (channels,) or not np.isfinite(shift).all():
                raise PayloadError(
                    sender, f"shift must be finite float64 ({channels},), got {shift.dtype} {shift.shape}"
                )
        if phase == "forward":
            if count is None or num_examples is None:
                raise PayloadError(
                    sender, "masked forward payload lacks its clear 'count' or 'num-examples' (the server "
                    "binds the client's averaging weight to them)"
                )
            if (not isinstance(count, (int, float)) or isinstance(count, bool) or not math.isfinite(count)
                    or count < 1):
                raise PayloadError(sender, f"count must be a finite number >= 1, got {count!r}")
            if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples < 1:
                raise PayloadError(sender, f"num-examples must be an int >= 1, got {num_examples!r}")
        return cls(
            phase=phase, channels=channels, masked=masked, roster_digest=digest.tobytes(), shift=shift,
            count=None if count is None else float(count), num_examples=num_examples,
        )


def _payload_length(phase: str, channels: int) -> int:
    if phase == "forward":
        return 2 * channels + 3
    if phase == "backward":
        return 2 * channels + 1
    raise ValueError(f"phase must be 'forward' or 'backward', got {phase!r}")


def _plain_vector(
    payload: Payload, shift: Optional[np.ndarray], where: str
) -> tuple[str, int, np.ndarray, Optional[np.ndarray]]:
    """The payload as the float64 vector to be encoded (canary last)."""
    if isinstance(payload, ForwardStats):
        mean = np.asarray(payload.mean, dtype=np.float64)
        var = np.asarray(payload.var, dtype=np.float64)
        channels = mean.shape[0]
        if mean.ndim != 1 or var.shape != mean.shape:
            raise ValueError(f"{where}: mean and var must be 1-D of equal length, got {mean.shape} and {var.shape}")
        shift = np.zeros(channels) if shift is None else np.asarray(shift, dtype=np.float64).reshape(-1)
        if shift.shape != (channels,) or not np.isfinite(shift).all():
            raise ValueError(f"{where}: shift must be {channels} finite values, got shape {shift.shape}")
        if (var < 0).any():
            raise ValueError(f"{where}: local variance has negative entries (min {var.min():.3g})")
        count = float(payload.count)
        centred = mean - shift
        vector = np.concatenate([
            [count, float(payload.num_examples)], count * centred, count * (var + centred**2), [0.0],
        ])
        return "forward", channels, vector, shift
    if isinstance(payload, BackwardSums):
        sum_grad = np.asarray(payload.sum_grad, dtype=np.float64)
        sum_grad_xhat = np.asarray(payload.sum_grad_xhat, dtype=np.float64)
        if sum_grad.ndim != 1 or sum_grad_xhat.shape != sum_grad.shape:
            raise ValueError(f"{where}: backward sums must be 1-D of equal length")
        return "backward", sum_grad.shape[0], np.concatenate([sum_grad, sum_grad_xhat, [0.0]]), None
    raise TypeError(f"{where}: expected ForwardStats or BackwardSums, got {type(payload).__name__}")


def client_encode(
    payload: Payload,
    *,
    node_id: int,
    private_key: bytes,
    roster: Roster,
    round: int,
    attempt: int,
    exchange: int,
    shift: Optional[np.ndarray] = None,
    fractional_bits: int = DEFAULT_FRACTIONAL_BITS,
    where: str = "sync point",
) -> MaskedPayload:
    """Encode and mask one client's payload (runs on the client).

    Parameters
    ----------
    payload : ForwardStats | BackwardSums
        The client's statistics, as :class:`~flwr_fedtan.step.SyncStep` hands them out.
    node_id, private_key, roster
        This client's id and private key, and the round's roster relayed by the server.
    round, attempt, exchange : int
        Server round, restart number within it (0 first), and the number of aggregates
        this client has received in the attempt: together they make the masks fresh.
    shift : Optional[np.ndarray] (default: None, zeros)
        Public per-channel shift ``c`` of a forward payload, identical on every client (e.g.
        the layer's running mean, which all clients share during synchronised steps). It only
        improves float64 conditioning: ``var = S2/M - (S1/M)**2`` cancels ``(mu - c)**2``.
    fractional_bits : int (default: 64)
        Fixed-point scale ``2**fractional_bits``; see the module docstring for the bound.
    where : str
        Names the sync point (e.g. ``"forward sync point 3 (BatchNorm call 1)"``) in errors.

    Raises
    ------
    KeyAgreementError
        The node or its key does not fit the roster.
    FixedPointOverflowError
        A statistic is not finite or exceeds the bound.
    """
    phase, channels, vector, shift = _plain_vector(payload, shift, where)
    encoded = encode_fixed_point(vector, len(roster), fractional_bits, where)
    masks = pairwise_masks(private_key, node_id, roster, round, attempt, exchange, vector.shape[0])
    forward = isinstance(payload, ForwardStats)
    return MaskedPayload(
        phase=phase, channels=channels, masked=_ring_add(encoded, masks),
        roster_digest=roster.digest(), shift=shift,
        count=float(payload.count) if forward else None,  # type: ignore[union-attr]
        num_examples=int(payload.num_examples) if forward else None,  # type: ignore[union-attr]
    )


def server_decode(
    payloads: Mapping[int, MaskedPayload],
    roster: Roster,
    fractional_bits: int = DEFAULT_FRACTIONAL_BITS,
    where: str = "sync point",
) -> Payload:
    """Unmask the sum of the roster's payloads and decode the pooled statistics (server).

    Parameters
    ----------
    payloads : Mapping[node id, MaskedPayload]
        One payload per roster member, all for the same sync point.
    roster : Roster
        The roster relayed for this attempt.

    Returns
    -------
    ForwardStats | BackwardSums
        Forward: pooled ``count`` (M), ``num_examples`` (N), ``mean`` and biased ``var``,
        as :func:`~flwr_fedtan.aggregation.pool_forward_stats` returns them. Backward: the
        summed ``sum_grad`` and ``sum_grad_xhat``.

    Raises
    ------
    MissingPayloadError
        Some roster members sent nothing: their masks keep the sum hidden; restart.
    PayloadError
        Naming the client: not in the roster, masked with another roster, a different
        shift, phase or width than the others.
    MaskMismatchError
        The masks did not cancel (the canary is not zero).
    FixedPointOverflowError
        The decoded sum exceeds the headroom, or the pooled counts are not integers.
    """
    _check_fractional_bits(fractional_bits)
    extra = [node for node in payloads if node not in roster.node_ids]
    if extra:
        raise PayloadError(extra[0], f"{where}: sent a masked payload but is not in the roster {list(roster.node_ids)}")
    missing = [node for node in roster.node_ids if node not in payloads]
    if missing:
        raise MissingPayloadError(
            missing,
            f"{where}: no payload from nodes {missing}; the others' sum stays masked, restart "
            "the step with the survivors (fresh masks)",
        )
    digest = roster.digest()
    first = payloads[roster.node_ids[0]]
    for node, payload in payloads.items():
        if not isinstance(payload, MaskedPayload):
            raise PayloadError(node, f"{where}: expected a masked payload, got {type(payload).__name__}")
        if payload.roster_digest != digest:
            raise PayloadError(
                node, f"{where}: masked with another roster (other public keys or participants) "
                "than the server relayed; its masks cannot cancel"
            )
        if payload.phase != first.phase or payload.channels != first.channels:
            raise PayloadError(
                node, f"{where}: {payload.phase} payload of {payload.channels} channels, the others "
                f"{first.phase} of {first.channels}"
            )
    if first.phase == "forward":
        _check_shared_shift(payloads, where)
    total = ring_sum([payloads[node].masked for node in roster.node_ids])
    if total[0, -1] != 0 or total[1, -1] != 0:
        raise CanaryMismatchError(
            f"{where}: the masks of nodes {list(roster.node_ids)} did not cancel; some client used "
            "another key, round, attempt or exchange index (a stale or replayed payload?)"
        )
    sums = decode_fixed_point(total[:, :-1], fractional_bits, where)
    channels = first.channels
    if first.phase == "backward":
        return BackwardSums(sum_grad=sums[:channels], sum_grad_xhat=sums[channels:])
    count, examples = sums[0], sums[1]
    if not (count >= 1 and examples >= 1 and count == round(count) and examples == round(examples)):
        raise FixedPointOverflowError(
            f"{where}: pooled count {count!r} / examples {examples!r} are not positive integers"
        )
    claimed = [payloads[n] for n in roster.node_ids]
    if all(p.count is not None and p.num_examples is not None for p in claimed):
        claimed_count = sum(p.count for p in claimed)  # type: ignore[misc]
        claimed_examples = sum(p.num_examples for p in claimed)  # type: ignore[misc]
        if claimed_count != count or claimed_examples != examples:
            raise MaskMismatchError(
                f"{where}: the masked sums give a pooled count of {count:g} values and {examples:g} examples, "
                f"the clients' clear counts add up to {claimed_count:g} and {claimed_examples}: some client's "
                "clear and masked counts disagree"
            )
    centred_sum, square_sum = sums[2:2 + channels], sums[2 + channels:]
    centred_mean = centred_sum / count
    var = square_sum / count - centred_mean**2
    # var is a difference: rounding may leave it a hair below zero when the spread is nil.
    rounding = 1e-12 * np.abs(square_sum / count)
    if (var < -rounding).any():
        bad = int(np.flatnonzero(var < -rounding)[0])
        raise FixedPointOverflowError(f"{where}: channel {bad} decodes to a negative variance {var[bad]:.3g}")
    return ForwardStats(
        count=float(count), num_examples=int(examples), mean=first.shift + centred_mean, var=np.maximum(var, 0.0)
    )


def _check_shared_shift(payloads: Mapping[int, MaskedPayload], where: str) -> None:
    by_bytes: dict[bytes, list[int]] = {}
    for node, payload in payloads.items():
        by_bytes.setdefault(np.asarray(payload.shift, dtype=np.float64).tobytes(), []).append(node)
    if len(by_bytes) > 1:
        majority = max(by_bytes.values(), key=len)
        odd = next(node for nodes in by_bytes.values() if nodes is not majority for node in nodes)
        raise PayloadError(odd, f"{where}: its public shift differs from the other clients' (it must be shared)")


# ---------------------------------------------------------------------- protocol adapters
def describe_point(round: int, step: int, phase: str, index: int, call: int) -> str:
    """How errors name a sync point, e.g. ``"round 3, step 0, forward sync point 4
    (BatchNorm call 2)"``."""
    return f"round {round}, step {step}, {phase} sync point {index} (BatchNorm call {call})"


def shift_for(shifts: Mapping[int, np.ndarray], index: int, channels: int) -> Optional[np.ndarray]:
    """The public shift of forward sync point ``index`` if the server sent one of the right
    width, else ``None`` (zeros): the first round, or a model whose layers changed."""
    shift = shifts.get(int(index))
    if shift is None or np.shape(shift) != (channels,):
        return None
    return np.asarray(shift, dtype=np.float64)


def shifts_to_arrays(shifts: Mapping[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Shifts by sync-point index as NumPy arrays keyed by the index (for an ``ArrayRecord``)."""
    return {str(int(index)): np.ascontiguousarray(shift, dtype=np.float64) for index, shift in shifts.items()}


def shifts_from_arrays(arrays: Mapping[str, np.ndarray]) -> dict[int, np.ndarray]:
    """Inverse of :func:`shifts_to_arrays`, validated."""
    shifts = {}
    for key, value in arrays.items():
        value = np.asarray(value)
        if not key.isdigit() or value.ndim != 1 or value.dtype != np.float64 or not np.isfinite(value).all():
            raise SecureStatsError(
                f"malformed shift {key!r}: {value.dtype} {value.shape}; expected finite float64 (C,)"
            )
        shifts[int(key)] = value
    return shifts


class ServerSession:
    """The server's side of secure statistics over a run (no Flower, no torch).

    Per round it collects the public keys (:meth:`new_round`, :meth:`accept_public_key`) and
    builds the roster of each attempt (:meth:`roster`); per sync point it unmasks the sum
    (:meth:`decode`). It remembers the last pooled mean of every forward sync point (by its
    index within a step), which becomes that point's public shift ``c`` in the next round
    (:attr:`shifts`): pooled statistics the clients have received already, and that the
    global model's running means reveal to the same degree.

    Parameters
    ----------
    fractional_bits : int (default: 64)
        Fixed-point scale ``2**fractional_bits``; the clients must use the same.
    """

    def __init__(self, fractional_bits: int = DEFAULT_FRACTIONAL_BITS) -> None:
        self.fractional_bits = _check_fractional_bits(fractional_bits)
        self.round: Optional[int] = None
        self.public_keys: dict[int, bytes] = {}
        self.shifts: dict[int, np.ndarray] = {}

    def new_round(self, round: int) -> None:
        """Forget the previous round's keys."""
        self.round = int(round)
        self.public_keys = {}

    def accept_public_key(self, node: int, key: object) -> None:
        """Record ``node``'s public key; :class:`PayloadError` naming it if malformed or of
        small order (refused on receipt, so it never reaches a roster)."""
        if isinstance(key, np.ndarray) and key.dtype == np.uint8:
            key = key.tobytes()
        if not isinstance(key, (bytes, bytearray)) or len(key) != _KEY_BYTES:
            raise PayloadError(node, f"public key must be {_KEY_BYTES} bytes (X25519 raw), got {key!r:.60}")
        try:
            check_public_key(bytes(key))
        except KeyAgreementError as error:
            raise PayloadError(node, str(error)) from None
        if bytes(key) in self.public_keys.values():
            raise PayloadError(node, "sent a public key another node of this round already sent")
        self.public_keys[int(node)] = bytes(key)

    def roster(self, participants: Sequence[int]) -> Roster:
        """The roster of an attempt: the participants' keys of this round."""
        missing = [n for n in participants if n not in self.public_keys]
        if missing:
            raise KeyAgreementError(f"round {self.round}: nodes {missing} have no public key (missed the key exchange)")
        return Roster.from_keys({int(n): self.public_keys[n] for n in participants})

    def decode(
        self, payloads: Mapping[int, MaskedPayload], roster: Roster, index: int, where: str
    ) -> Payload:
        """:func:`server_decode`, remembering a forward point's pooled mean as its next shift."""
        aggregate = server_decode(payloads, roster, self.fractional_bits, where)
        if isinstance(aggregate, ForwardStats):
            self.shifts[int(index)] = np.asarray(aggregate.mean, dtype=np.float64)
        return aggregate
