"""Key agreement material: X25519 key pairs, the checks of a public key, and the
:class:`Roster` of a round's participants as the server relays it."""

from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ..errors import KeyAgreementError

__all__ = ["KeyPair", "Roster", "generate_key_pair", "check_public_key"]

_KEY_BYTES = 32
_PROTOCOL_LABEL = b"flwr-fedtan/secure-stats/v1"


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
