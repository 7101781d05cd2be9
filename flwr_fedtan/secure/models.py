"""Secure aggregation of the models: the server learns only the weighted sum of the clients'
models and the total weight, and returns the same average as
:func:`~flwr_fedtan.aggregation.aggregate_arrays`.

The arithmetic of ``FedTAN(secure_models=True)`` (wired in
:mod:`flwr_fedtan.protocol.model_release` and :func:`flwr_fedtan.node.secure_stats.masked_model`). Pure
functions on NumPy arrays, built on the primitives of :mod:`flwr_fedtan.secure` (fixed point
in the ring of integers modulo ``2**128``, pairwise masks from the round's X25519 keys); no
torch, no Flower.

What a client sends
-------------------
With weight ``w`` (its number of examples), global model ``g`` (the arrays the server sent,
identical on every client and on the server) and returned arrays ``a``, the client encodes,
in the reference's key order, one ring vector

``[w, w * a (every array but the running statistics), w * (m - c), w * (v + (m - c)**2), 0]``

where ``m``/``v`` are a BatchNorm layer's ``running_mean``/``running_var`` and ``c`` the
global model's ``running_mean`` of that layer (a public shift that only improves float64
conditioning). The last element is a *canary*, an encoded zero. The vector is encoded in
fixed point (:func:`~flwr_fedtan.secure.encode_fixed_point`) and masked with the pairwise
masks of the attempt at the reserved exchange index :data:`MODEL_EXCHANGE` (the statistics'
exchanges count aggregates from 0, so model masks never reuse a statistics keystream).

The server sums the roster's vectors; the masks cancel, the canary must decode to exactly
zero, and it divides by the decoded total weight ``W``, as :func:`aggregate_arrays` does:
floating arrays ``S / W``; running means ``c + S1 / W`` and variances
``S2 / W - (S1 / W)**2`` (pooled moments); integer arrays (``num_batches_tracked``) ``S / W``
rounded to the nearest integer. Each result is cast to the reference's dtype.

Precision (default ``fractional_bits = 64``, as for the statistics)
-------------------------------------------------------------------
- Scale ``2**64``, ring ``Z_2^128`` (16 bytes per value: 4 times a float32 model's bytes).
- Bound: every encoded value, i.e. ``|value| * weight`` (and the weight itself), must stay
  below ``2**(126 - fractional_bits) / K`` for ``K`` clients, ``2**62 / K`` = ``4.6e18 / K``
  by default: with a million clients, values times weights up to ``4.6e12``. A client
  beyond it refuses to encode with :class:`~flwr_fedtan.errors.FixedPointOverflowError`
  naming the node and the array (NaN or Inf, or a negative running variance, are refused by
  :func:`~flwr_fedtan.aggregation.check_arrays` naming them too). ``K`` is only limited
  through that bound.
- Resolution: encoding rounds ``w * value`` to a multiple of ``2**-64``, so a decoded average
  is off by at most ``K * 2**-65 / W`` (about ``2.7e-20 * K / W``) absolute, plus float64
  rounding: every entry of magnitude above ``2.7e-14 * K / W`` is exact to ``1e-6``
  relative, which covers every float32 entry that matters; after the cast to float32 the
  secure and clear averages agree to one float32 rounding step (``tests/test_secure_models.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Mapping

import numpy as np

from ..aggregation import check_arrays, running_stat_keys, value_limit
from ..errors import FixedPointOverflowError, MissingPayloadError, PayloadError
from .fixed_point import DEFAULT_FRACTIONAL_BITS, encode_fixed_point, ring_sum, unmask_sum, value_bound
from .keys import Roster
from .masks import pairwise_masks

__all__ = [
    "MODEL_EXCHANGE",
    "ModelLayout",
    "MaskedModel",
    "SecureAverage",
    "model_vector",
    "mask_model",
    "unmask_average",
]

MODEL_EXCHANGE = 2**63
"""The exchange index (ChaCha20 nonce) of the masked model of an attempt: reserved, far
above any count of statistics exchanges, so no keystream serves two payloads."""

_DIGEST_BYTES = 32


@dataclass(frozen=True)
class ModelLayout:
    """Where each array of the model sits in the ring vector (``[weight, arrays..., canary]``).

    Built from the global model alone (:meth:`of`), identically on the clients and the server.
    """

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    offsets: tuple[int, ...]
    mean_of_var: Mapping[str, str]

    @classmethod
    def of(cls, reference: Mapping[str, np.ndarray]) -> "ModelLayout":
        """The layout of ``reference``; :class:`ValueError` for an array that cannot be
        averaged in fixed point (complex or object dtype)."""
        keys, shapes, dtypes, offsets = [], [], [], []
        offset = 1
        for key, value in reference.items():
            value = np.asarray(value)
            if value.dtype.kind not in "fiub":
                raise ValueError(
                    f"{key} has dtype {value.dtype}: secure model aggregation sums floating, integer and "
                    "boolean arrays only"
                )
            keys.append(key)
            shapes.append(tuple(value.shape))
            dtypes.append(value.dtype)
            offsets.append(offset)
            offset += int(value.size)
        offsets.append(offset)
        pairs = running_stat_keys(keys)
        return cls(keys=tuple(keys), shapes=tuple(shapes), dtypes=tuple(dtypes), offsets=tuple(offsets),
                   mean_of_var={var: mean for mean, var in pairs.items()})

    @property
    def length(self) -> int:
        """Ring elements of a payload: the weight, every value, the canary."""
        return self.offsets[-1] + 1

    def span(self, index: int) -> slice:
        """The slice of the vector holding array ``self.keys[index]``."""
        return slice(self.offsets[index], self.offsets[index + 1])


@dataclass(frozen=True)
class MaskedModel:
    """What a client sends instead of its model: the masked ``(2, n)`` uint64 ring vector
    and, in the clear, the digest of the roster its masks were made with (so that a client
    masked under another roster is named instead of only spoiling the sum)."""

    masked: np.ndarray
    roster_digest: bytes

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The payload as NumPy arrays (for an ``ArrayRecord``)."""
        return {
            "masked": np.ascontiguousarray(self.masked, dtype=np.uint64),
            "roster-digest": np.frombuffer(self.roster_digest, dtype=np.uint8).copy(),
        }

    @classmethod
    def from_arrays(cls, sender: Hashable, arrays: Mapping[str, np.ndarray], length: int) -> "MaskedModel":
        """Inverse of :meth:`to_arrays`, checked against the layout's ``length``;
        :class:`PayloadError` names ``sender`` if malformed."""
        if set(arrays) != {"masked", "roster-digest"}:
            raise PayloadError(sender, f"masked model holds {sorted(arrays)}, expected ['masked', 'roster-digest']")
        masked = np.asarray(arrays["masked"])
        if masked.dtype != np.uint64 or masked.shape != (2, length):
            raise PayloadError(
                sender, f"masked model is {masked.dtype} {masked.shape}, expected uint64 (2, {length}) for the "
                "global model's layout"
            )
        digest = np.asarray(arrays["roster-digest"])
        if digest.dtype != np.uint8 or digest.shape != (_DIGEST_BYTES,):
            raise PayloadError(sender, f"roster-digest is {digest.dtype} {digest.shape}, expected uint8 (32,)")
        return cls(masked=masked, roster_digest=digest.tobytes())


@dataclass(frozen=True)
class SecureAverage:
    """What the server learns: the weighted average (typed as the global model), the total
    weight and how many clients it pools."""

    arrays: dict[str, np.ndarray]
    total_weight: float
    num_clients: int


def model_vector(
    arrays: Mapping[str, np.ndarray], weight: float, reference: Mapping[str, np.ndarray], layout: ModelLayout
) -> np.ndarray:
    """The float64 vector a client encodes (before fixed point): see the module docstring."""
    vector = np.empty(layout.length, dtype=np.float64)
    vector[0] = weight
    vector[-1] = 0.0
    for index, key in enumerate(layout.keys):
        value = np.asarray(arrays[key], dtype=np.float64).reshape(-1)
        if key in layout.mean_of_var:
            mean_key = layout.mean_of_var[key]
            centred = np.asarray(arrays[mean_key], dtype=np.float64).reshape(-1) - _shift(reference, mean_key)
            value = value + centred**2
        elif key in layout.mean_of_var.values():
            value = value - _shift(reference, key)
        vector[layout.span(index)] = weight * value
    return vector


def _shift(reference: Mapping[str, np.ndarray], mean_key: str) -> np.ndarray:
    return np.asarray(reference[mean_key], dtype=np.float64).reshape(-1)


def mask_model(
    arrays: Mapping[str, np.ndarray],
    weight: float,
    reference: Mapping[str, np.ndarray],
    *,
    node_id: int,
    private_key: bytes,
    roster: Roster,
    round: int,
    attempt: int,
    fractional_bits: int = DEFAULT_FRACTIONAL_BITS,
) -> MaskedModel:
    """Encode and mask one client's weighted model (runs on the client).

    Parameters
    ----------
    arrays : Mapping[str, np.ndarray]
        The client's trained model (parameters and buffers, as ``state_dict`` names them).
    weight : float
        Its averaging weight (number of examples).
    reference : Mapping[str, np.ndarray]
        The global model the server sent this round: keys, shapes and dtypes the client must
        return, and the running means that shift the running variances.
    node_id, private_key, roster, round, attempt
        As for :func:`~flwr_fedtan.secure.client_encode`: this client and the attempt's keys.
    fractional_bits : int (default: 64)
        Fixed-point scale ``2**fractional_bits``; the server must use the same.

    Raises
    ------
    PayloadError
        Naming the node: keys, shapes or dtypes unlike ``reference``, NaN or Inf, a negative
        running variance, a weight that is not positive (:func:`check_arrays`).
    FixedPointOverflowError
        Naming the node and the array: ``|value| * weight`` beyond the fixed-point bound.
    KeyAgreementError
        The node or its key does not fit the roster.
    """
    weight = check_arrays(node_id, arrays, weight, reference)
    layout = ModelLayout.of(reference)
    vector = model_vector(arrays, weight, reference, layout)
    bound = value_bound(len(roster), fractional_bits)
    if not abs(weight) < bound:
        raise FixedPointOverflowError(
            f"node {node_id}: weight {weight:.6g} exceeds the fixed-point bound {bound:.3g} for "
            f"{len(roster)} clients; lower fractional_bits"
        )
    for index, key in enumerate(layout.keys):
        part = vector[layout.span(index)]
        largest = float(np.abs(part).max(initial=0.0))
        if not largest < bound:
            raise FixedPointOverflowError(
                f"node {node_id}: {key} reaches |value| * weight = {largest:.6g} (weight {weight:g}), beyond the "
                f"fixed-point bound {bound:.3g} (2**{126 - fractional_bits} / {len(roster)} clients); lower "
                "fractional_bits (each bit less doubles the bound and halves the resolution), or check the "
                "model for diverging values"
            )
    encoded = encode_fixed_point(vector, len(roster), fractional_bits, f"node {node_id}: masked model")
    masks = pairwise_masks(private_key, node_id, roster, round, attempt, MODEL_EXCHANGE, layout.length)
    return MaskedModel(masked=ring_sum([encoded, masks]), roster_digest=roster.digest())


def unmask_average(
    payloads: Mapping[int, MaskedModel],
    roster: Roster,
    reference: Mapping[str, np.ndarray],
    fractional_bits: int = DEFAULT_FRACTIONAL_BITS,
    where: str = "masked models",
) -> SecureAverage:
    """Unmask the sum of the roster's masked models and return their weighted average (server).

    Equals :func:`~flwr_fedtan.aggregation.aggregate_arrays` of the clear models, to float64
    rounding before the cast to the reference's dtypes (see the module docstring).

    Raises
    ------
    MissingPayloadError
        Some roster members sent nothing: the others' sum stays masked; restart the exchange
        with the survivors (a new attempt: fresh keys and masks), subject to
        :class:`~flwr_fedtan.secure.releases.ReleaseLedger`.
    PayloadError
        Naming the client: not in the roster, masked under another roster, or a vector of
        another length than the global model's layout.
    CanaryMismatchError
        The masks did not cancel (:func:`~flwr_fedtan.secure.blame_canary` finds who, with
        ``exchange=MODEL_EXCHANGE``).
    FixedPointOverflowError
        Naming the array: a decoded sum beyond the ring's headroom, a total weight that is
        not positive, a negative pooled variance, or an average beyond the dtype's range (a
        client encoded garbage under the right masks: it cannot be named, the sum is all the
        server sees).
    """
    layout = ModelLayout.of(reference)
    extra = [node for node in payloads if node not in roster.node_ids]
    if extra:
        raise PayloadError(extra[0], f"{where}: sent a masked model but is not in the roster {list(roster.node_ids)}")
    missing = [node for node in roster.node_ids if node not in payloads]
    if missing:
        raise MissingPayloadError(
            missing, f"{where}: no masked model from nodes {missing}; the others' sum stays masked, restart the "
            "exchange with the survivors (fresh masks) if the release rule allows it"
        )
    digest = roster.digest()
    for node, payload in payloads.items():
        if not isinstance(payload, MaskedModel):
            raise PayloadError(node, f"{where}: expected a masked model, got {type(payload).__name__}")
        if payload.roster_digest != digest:
            raise PayloadError(node, f"{where}: masked under another roster than the server relayed")
        if payload.masked.dtype != np.uint64 or payload.masked.shape != (2, layout.length):
            raise PayloadError(
                node, f"{where}: masked model is {payload.masked.dtype} {payload.masked.shape}, expected uint64 "
                f"(2, {layout.length})"
            )
    sums = unmask_sum([payloads[node].masked for node in roster.node_ids], roster.node_ids, fractional_bits, where)
    weight = float(sums[0])
    if not weight > 0:
        raise FixedPointOverflowError(f"{where}: the total weight decodes to {weight!r}, not a positive number")
    # what fixed point may have rounded off a pooled mean: K half-steps, over W
    resolution = len(roster) * 2.0 ** -fractional_bits / weight
    return SecureAverage(arrays=_average(sums, weight, reference, layout, resolution, where), total_weight=weight,
                         num_clients=len(roster))


def _average(
    sums: np.ndarray, weight: float, reference: Mapping[str, np.ndarray], layout: ModelLayout, resolution: float,
    where: str,
) -> dict[str, np.ndarray]:
    result: dict[str, np.ndarray] = {}
    var_of_mean = {mean: var for var, mean in layout.mean_of_var.items()}
    for index, key in enumerate(layout.keys):
        shape, dtype = layout.shapes[index], layout.dtypes[index]
        part = sums[layout.span(index)]
        if key in layout.mean_of_var:
            mean_index = layout.keys.index(layout.mean_of_var[key])
            centred_mean = sums[layout.span(mean_index)] / weight
            second = part / weight
            value = second - centred_mean**2
            # a difference: rounding may leave a nil spread a hair below zero
            negative = value < -(1e-12 * np.abs(second) + 4 * resolution * (1 + np.abs(centred_mean)))
            if negative.any():
                raise FixedPointOverflowError(
                    f"{where}: {key} pools to a negative variance {value[negative].min():.3g}; some client encoded "
                    "a running variance that is not one"
                )
            value = np.maximum(value, 0.0)
        elif key in var_of_mean:
            value = _shift(reference, key) + part / weight
        elif dtype.kind in "iub":
            value = np.rint(part / weight)
        else:
            value = part / weight
        low, high = _dtype_range(dtype)
        if not (np.isfinite(value).all() and (value >= low).all() and (value <= high).all()):
            raise FixedPointOverflowError(
                f"{where}: {key} averages to values beyond {dtype}'s range (largest {np.abs(value).max():.3g}); "
                "some client encoded values the model cannot hold"
            )
        result[key] = value.astype(dtype).reshape(shape)
    return result


def _dtype_range(dtype: np.dtype) -> tuple[float, float]:
    """The values ``dtype`` holds (a float array's largest magnitude as
    :func:`~flwr_fedtan.aggregation.value_limit` has it)."""
    if dtype.kind == "f":
        limit = value_limit({"": np.empty(0, dtype=dtype)})
        return -limit, limit
    if dtype.kind == "b":
        return 0.0, 1.0
    return float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)
