"""The server's side of secure statistics over a run (:class:`ServerSession`), and the
public shifts it relays: as NumPy arrays for the wire, and as each node picks its own."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from ..aggregation import ForwardStats
from ..errors import KeyAgreementError, PayloadError, SecureStatsError
from .fixed_point import DEFAULT_FRACTIONAL_BITS, _check_fractional_bits
from .keys import _KEY_BYTES, Roster, check_public_key
from .payloads import MaskedPayload, Payload, server_decode

__all__ = ["ServerSession", "shift_for", "shifts_to_arrays", "shifts_from_arrays"]


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
