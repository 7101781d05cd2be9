"""Pairwise masks: the pair keys of an attempt (X25519, then HKDF-SHA256), their ChaCha20
keystreams per exchange, the signed sum a client adds to its payload, and the tracing of
canaries that did not cancel."""

from __future__ import annotations

import functools
import struct
from typing import TYPE_CHECKING, Mapping

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import KeyAgreementError
from .fixed_point import _U64, _ring_add, _ring_neg
from .keys import _PROTOCOL_LABEL, Roster, _private_key, _public_of

if TYPE_CHECKING:
    from .payloads import MaskedPayload

__all__ = ["pairwise_masks", "canary_masks", "blame_canary"]


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
