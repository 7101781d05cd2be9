"""Masked payloads: what a client sends at a sync point (:class:`MaskedPayload`,
:func:`client_encode`) and how the server unmasks their sum into pooled statistics
(:func:`server_decode`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Mapping, Optional, Union

import numpy as np

from ..aggregation import BackwardSums, ForwardStats
from ..errors import (
    FixedPointOverflowError, MaskMismatchError, MissingPayloadError, PayloadError,
)
from .fixed_point import (
    _U64, DEFAULT_FRACTIONAL_BITS, _check_fractional_bits, _ring_add, encode_fixed_point,
    unmask_sum,
)
from .keys import Roster
from .masks import pairwise_masks

__all__ = ["MaskedPayload", "client_encode", "server_decode", "describe_point"]

Payload = Union[ForwardStats, BackwardSums]


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
        Fixed-point scale ``2**fractional_bits``; see :mod:`flwr_fedtan.secure` for the bound.
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
    sums = unmask_sum([payloads[node].masked for node in roster.node_ids], roster.node_ids, fractional_bits, where)
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


def describe_point(round: int, step: int, phase: str, index: int, call: int) -> str:
    """How errors name a sync point, e.g. ``"round 3, step 0, forward sync point 4
    (BatchNorm call 2)"``."""
    return f"round {round}, step {step}, {phase} sync point {index} (BatchNorm call {call})"
