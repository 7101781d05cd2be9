"""A node's side of secure statistics and models: its key pair of a round or pass, the
attempt's roster and shifts (and what it refuses of them), its masked payloads and final
model, the final model it keeps for a re-mask after a drop (and what it refuses of that),
and the canary masks it reveals when asked to blame.

See :mod:`flwr_fedtan.secure` for the arithmetic and ``docs/security.md`` for the threat
model.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Union

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from .. import secure
from ..protocol import wire
from ..errors import KeyAgreementError, ServerMessageError
from ..secure.models import MODEL_EXCHANGE, MaskedModel, mask_model
from .state import FinalModel, NodeState, PassProgress, RoundProgress, SecureKey
from .turn import Turn

__all__ = ["begin_secure", "blame", "end_final", "keys", "masked", "masked_model", "remask"]


def keys(turn: Turn) -> Message:
    """A key exchange of a round (``keys``) or statistics pass (``stats-keys``): a fresh
    key pair, whose private key the node keeps for that round or pass."""
    pair = secure.generate_key_pair()
    key = SecureKey(round=turn.control.round, private_key=pair.private)
    if turn.control.phase == wire.PHASE_KEYS:
        final = turn.node.final
        if final is not None and final.round != turn.control.round:  # another round: the kept one has ended
            end_final(turn.node)
            turn.node.discard_weights()
        turn.node.round_key = key
    else:
        turn.node.pass_key = key
    return turn.reply(wire.encode_public_key(turn.control.round, pair.public))


def blame(turn: Turn) -> Message:
    """Secure statistics, after the canaries failed: this node's canary masks of the asked
    exchange, if it is one this node sent in the current attempt, at its true length."""
    control, key, progress = turn.control, turn.node.round_key, turn.node.round
    if control.model:
        return _blame_model(turn)
    if (key is None or key.round != control.round or key.roster is None
            or progress is None or progress.round != control.round):
        raise ServerMessageError(f"blame request for round {control.round}, which this node is not in")
    lengths = progress.masked_lengths
    if not 0 <= control.exchange < len(lengths) or lengths[control.exchange] != control.length:
        raise ServerMessageError(
            f"blame request for exchange {control.exchange} with length {control.length}, but this node sent "
            f"payloads of lengths {lengths} this attempt: it reveals only the canary of a payload it sent"
        )
    masks = secure.canary_masks(key.private_key, turn.context.node_id, key.roster, control.round, key.attempt,
                                control.exchange, control.length)
    return turn.reply(wire.encode_canary_masks(control.round, masks))


def _blame_model(turn: Turn) -> Message:
    """Secure models, after the masked models' canary failed: this node's pair masks of its
    masked model's canary, if it sent one this round with its current key, at its true length."""
    control, key, final = turn.control, turn.node.round_key, turn.node.final
    if (key is None or final is None or key.round != control.round or final.round != control.round
            or not key.model_masked or key.roster is None):
        raise ServerMessageError(
            f"blame request for the masked model of round {control.round}, which this node has not sent with its "
            "current key"
        )
    if control.length != final.masked_length:
        raise ServerMessageError(
            f"blame request for a masked model of length {control.length}, but this node's has length "
            f"{final.masked_length}: it reveals only the canary of the payload it sent"
        )
    masks = secure.canary_masks(key.private_key, turn.context.node_id, key.roster, control.round, key.attempt,
                                MODEL_EXCHANGE, control.length)
    return turn.reply(wire.encode_canary_masks(control.round, masks))


def end_final(node: NodeState) -> None:
    """The round of the kept final model has ended (or restarts from its begin): forget the
    model and retire the key that masked it (the caller discards the starting weights)."""
    node.final = None
    if node.round_key is not None and node.round_key.model_masked:
        node.round_key = None


def remask(turn: Turn) -> Message:
    """Secure models, after a drop in the final exchange: the final model this node kept,
    masked again under the fresh keys of the survivors' roster, as a ``done`` reply.

    Refuses a re-mask of a round this node did not finish (or is not in), one with a key
    that already masked a model or began an attempt (no fresh key exchange: the same masks
    again would let two payloads be subtracted), and one whose attempt is not above the
    last this model was masked for."""
    control, node, node_id = turn.control, turn.node, turn.context.node_id
    final, key, roster = node.final, node.round_key, control.roster
    if final is None or final.round != control.round:
        raise ServerMessageError(
            f"node {node_id}: remask of round {control.round}, but this node holds no finished model of that round "
            f"(it is not in the round, has not finished it, or the round has ended; kept: "
            f"{None if final is None else f'round {final.round}'})"
        )
    if key is None or key.round != control.round:
        raise KeyAgreementError(
            f"node {node_id}: remask of round {control.round}, but this node holds no private key for that round "
            "(it missed the key exchange)"
        )
    if key.model_masked or key.begun >= 0:
        raise KeyAgreementError(
            f"node {node_id}: remask of round {control.round} without a fresh key exchange: this node's key of the "
            "round already masked a payload; masking with it again would reuse its masks"
        )
    if control.attempt <= final.attempt:
        raise ServerMessageError(
            f"node {node_id}: remask of round {control.round}, attempt {control.attempt}, but this node's model "
            f"was already masked for attempt {final.attempt}: a repeated or earlier attempt is refused"
        )
    if roster is None or node_id not in roster.node_ids:
        raise KeyAgreementError(
            f"node {node_id}: remask of round {control.round} with a roster that does not include this node"
        )
    masked = _mask(turn, key, final.arrays, final.weight, node.load_weights(), roster, control.attempt)
    key.roster, key.shifts, key.attempt, key.mask_stats, key.model_masked = roster, {}, control.attempt, False, True
    final.attempt, final.masked_length = control.attempt, int(masked.masked.shape[1])
    return turn.reply(wire.encode_done(control.round, _record(masked), final.metrics))


def begin_secure(turn: Turn, key: Optional[SecureKey]) -> None:
    """Keep (or clear) the attempt's roster and shifts.

    Refuses what a malicious server could use to unmask this node's statistics: a begin
    in the clear after the round's key exchange (or at all, with ``require_secure_stats``),
    and a begin whose attempt is not above the last one begun with the same key (the same
    pair keys and exchange numbers would mask other data with the same masks)."""
    control = turn.control
    if key is not None:
        key.roster = key.shifts = key.model_weight_key = None
        key.mask_stats = True
    keyed = key is not None and key.round == control.round
    if control.roster is None:
        if turn.options.require_secure_stats:
            raise ServerMessageError(
                f"begin of round {control.round} without a roster: this node requires secure statistics "
                "(require_secure_stats=True) and never sends its statistics in the clear"
            )
        if keyed:
            raise ServerMessageError(
                f"begin of round {control.round} without a roster after this round's key exchange: the "
                "statistics would go out in the clear"
            )
        return
    if turn.options.require_secure_stats and not control.mask_stats:
        raise ServerMessageError(
            f"begin of round {control.round} with a roster for the models only: this node requires secure "
            "statistics (require_secure_stats=True) and never sends its statistics in the clear"
        )
    if key is None or not keyed:
        raise KeyAgreementError(
            f"node {turn.context.node_id}: begin of round {control.round} with secure statistics, but this "
            "node holds no private key for that round (it missed the key exchange)"
        )
    if control.attempt <= key.begun:
        raise ServerMessageError(
            f"begin of round {control.round}, attempt {control.attempt}: this node already began attempt "
            f"{key.begun} with this key; a repeated or earlier attempt would reuse its masks"
        )
    key.attempt = key.begun = control.attempt
    key.roster, key.shifts = control.roster, dict(control.shifts or {})
    key.mask_stats, key.model_weight_key = control.mask_stats, control.model_weight_key


def masked(turn: Turn, key: Optional[SecureKey], progress: Union[RoundProgress, PassProgress], step: int, point,
           payload):
    """The payload masked for this exchange (the number of aggregates received so far in
    the attempt); in an attempt in the clear, the payload itself."""
    if key is None or key.roster is None or not key.mask_stats:
        return payload
    round_no = turn.control.round
    if key.round != round_no:
        raise KeyAgreementError(
            f"node {turn.context.node_id}: no private key for round {round_no} (it missed the key exchange)"
        )
    exchange = progress.received
    encoded = secure.client_encode(
        payload,
        node_id=turn.context.node_id,
        private_key=key.private_key,
        roster=key.roster,
        round=round_no,
        attempt=key.attempt,
        exchange=exchange,
        shift=secure.shift_for(key.shifts or {}, point.index, point.channels)
        if point.phase == wire.PHASE_FORWARD else None,
        where=secure.describe_point(round_no, step, point.phase, point.index, point.call),
    )
    # The length of each exchange's payload: a blame request may reveal only that canary's masks.
    progress.masked_lengths = progress.masked_lengths[:exchange] + [int(encoded.masked.shape[1])]
    return encoded


def masked_model(turn: Turn, key: Optional[SecureKey], arrays: ArrayRecord, reference: Callable[[], ArrayRecord],
                 metrics: Mapping) -> ArrayRecord:
    """Secure models: the final model ``arrays`` (every array: parameters and BatchNorm
    buffers) weighed and masked with the attempt's keys against the global model
    ``reference()`` it started from (read only then); in an attempt without secure models, ``arrays`` itself.
    With secure models the node keeps the model, its metrics, the key and the starting
    weights until the round ends (``node.final``: a re-mask may ask for it again).

    Both sides lay the model out in sorted key order, so the masks line up whatever order
    the model's ``state_dict`` has."""
    if key is None or key.roster is None or key.model_weight_key is None:
        return arrays
    node_id = turn.context.node_id
    if key.model_weight_key not in metrics:
        raise KeyAgreementError(
            f"node {node_id}: secure models weigh the model by metric {key.model_weight_key!r}, which this "
            f"client does not report (it reports {sorted(metrics)})"
        )
    weight = float(metrics[key.model_weight_key])
    masked = _mask(turn, key, arrays, weight, reference(), key.roster, key.attempt)
    key.model_masked = True
    turn.node.final = FinalModel(round=turn.control.round, attempt=key.attempt, weight=weight,
                                 masked_length=int(masked.masked.shape[1]), arrays=arrays,
                                 metrics=MetricRecord(dict(metrics)))
    return _record(masked)


def _mask(turn: Turn, key: SecureKey, arrays: ArrayRecord, weight: float, start: ArrayRecord, roster: secure.Roster,
          attempt: int) -> MaskedModel:
    return mask_model(
        {k: arrays[k].numpy() for k in sorted(arrays.keys())}, weight,
        {k: start[k].numpy() for k in sorted(start.keys())}, node_id=turn.context.node_id,
        private_key=key.private_key, roster=roster, round=turn.control.round, attempt=attempt,
    )


def _record(masked: MaskedModel) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in masked.to_arrays().items()})
