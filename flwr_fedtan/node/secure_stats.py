"""A node's side of secure statistics: its key pair of a round or pass, the attempt's
roster and shifts (and what it refuses of them), its masked payloads, and the canary
masks it reveals when asked to blame.

See :mod:`flwr_fedtan.secure` for the arithmetic and ``docs/security.md`` for the threat
model.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Union

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from .. import secure
from ..protocol import wire
from ..errors import KeyAgreementError, ServerMessageError
from ..secure.models import mask_model
from .state import PassProgress, RoundProgress, SecureKey
from .turn import Turn

__all__ = ["begin_secure", "blame", "keys", "masked", "masked_model"]


def keys(turn: Turn) -> Message:
    """A key exchange of a round (``keys``) or statistics pass (``stats-keys``): a fresh
    key pair, whose private key the node keeps for that round or pass."""
    pair = secure.generate_key_pair()
    key = SecureKey(round=turn.control.round, private_key=pair.private)
    if turn.control.phase == wire.PHASE_KEYS:
        turn.node.round_key = key
    else:
        turn.node.pass_key = key
    return turn.reply(wire.encode_public_key(turn.control.round, pair.public))


def blame(turn: Turn) -> Message:
    """Secure statistics, after the canaries failed: this node's canary masks of the asked
    exchange, if it is one this node sent in the current attempt, at its true length."""
    control, key, progress = turn.control, turn.node.round_key, turn.node.round
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
    start = reference()
    masked = mask_model(
        {k: arrays[k].numpy() for k in sorted(arrays.keys())}, float(metrics[key.model_weight_key]),
        {k: start[k].numpy() for k in sorted(start.keys())}, node_id=node_id,
        private_key=key.private_key, roster=key.roster, round=turn.control.round, attempt=key.attempt,
    )
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in masked.to_arrays().items()})
