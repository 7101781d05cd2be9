"""Secure aggregation of BatchNorm statistics: an honest-but-curious server (one that runs
the protocol faithfully) learns only the sums over clients.

A malicious server is not covered: it can substitute public keys (a man in the middle) and
then read each client's payload. What the clients refuse from any server (invalid keys,
repeated or decreasing attempts) is listed in docs/security.md, "What FedTAN trusts".

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

One job per module, all importable from here:

- :mod:`.fixed_point`: the ring and the fixed-point encoding;
- :mod:`.keys`: key pairs, public-key checks, the roster;
- :mod:`.masks`: pair keys, pairwise masks, canary tracing;
- :mod:`.payloads`: a client's masked payload and the server's unmasked sum;
- :mod:`.server`: the server's session over a run, and the public shifts.

Secure models (``FedTAN(secure_models=True)``) build on these, importable from their own
modules (not from here, to keep the statistics' import light):

- :mod:`.models`: a client's masked model and the server's unmasked weighted average;
- :mod:`.releases`: which sums may be released without revealing a client (differencing);
- :mod:`.composition`: which wrapped strategies can work on one averaged reply.
"""

from __future__ import annotations

from .fixed_point import (
    DEFAULT_FRACTIONAL_BITS, RING_BITS, decode_fixed_point, encode_fixed_point, ring_sum, unmask_sum, value_bound,
)
from .fixed_point import _ring_neg as _ring_neg  # tests/test_secure.py checks mask cancellation with it
from .keys import KeyPair, Roster, check_public_key, generate_key_pair
from .masks import blame_canary, canary_masks, pairwise_masks
from .payloads import MaskedPayload, client_encode, describe_point, server_decode
from .server import ServerSession, shift_for, shifts_from_arrays, shifts_to_arrays

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
    "unmask_sum",
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
