"""A client's replies on the wire: one status type per phase, encoded by the node and
decoded, checked, by the server (:func:`decode_reply`).

No torch here. Part of the wire format (:mod:`flwr_fedtan.protocol.wire` describes the
exchanges and re-exports every name of this module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Optional, Union

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ..aggregation import SyncPoint
from ..errors import PayloadError
from ..secure import MaskedPayload
from .codec import Payload, payload_record
from .codec import client_payload as _payload_from
from .codec import get_int as _get_int
from .names import (
    ARRAYS,
    METRICS,
    PHASE_BACKWARD,
    PHASE_BLAME,
    PHASE_DONE,
    PHASE_FORWARD,
    PHASE_KEYS,
    PHASE_STATS_DONE,
    SECURE,
    STATS,
    STATS_BUFFERS,
    STATUS,
)

__all__ = [
    "Status",
    "KeysStatus",
    "BlameStatus",
    "SyncStatus",
    "DoneStatus",
    "StatsDoneStatus",
    "point_of",
    "encode_public_key",
    "encode_canary_masks",
    "encode_request",
    "encode_done",
    "encode_stats_done",
    "decode_reply",
]


@dataclass(frozen=True)
class Status:
    """A client's reply, decoded (:func:`decode_reply`): one subclass per reply phase, each
    with the fields of its phase only."""

    phase: str
    round: int
    step: int


@dataclass(frozen=True)
class KeysStatus(Status):
    """The reply to a key exchange (``keys``): the client's public key for the round."""

    public_key: bytes


@dataclass(frozen=True)
class BlameStatus(Status):
    """The reply to a blame request: the canary's pair mask with every peer."""

    canary_masks: dict  # {peer: (2,) uint64}


@dataclass(frozen=True)
class SyncStatus(Status):
    """A reply at a sync point (``forward`` or ``backward``): the point and its payload."""

    point: SyncPoint
    payload: Union[Payload, MaskedPayload]


@dataclass(frozen=True)
class DoneStatus(Status):
    """A client's last reply of a round (``done``): its trained model and metrics."""

    arrays: ArrayRecord
    metrics: MetricRecord


@dataclass(frozen=True)
class StatsDoneStatus(Status):
    """A client's last reply of a statistics pass (``stats-done``)."""

    buffer_calls: dict  # {key: ("mean" | "var", [calls])}
    num_examples: int  # examples the client forwarded


def point_of(status: Status) -> Optional[SyncPoint]:
    """The sync point a reply is at, ``None`` for a reply that is not at one."""
    return status.point if isinstance(status, SyncStatus) else None


def encode_public_key(round: int, public_key: bytes) -> RecordDict:
    """A client's reply to the key exchange: its public key for the round."""
    status = ConfigRecord({"phase": PHASE_KEYS, "round": round, "step": -1, "point": -1})
    key = ArrayRecord({"public-key": Array(np.frombuffer(public_key, dtype=np.uint8).copy())})
    return RecordDict({STATUS: status, SECURE: key})


def encode_canary_masks(round: int, masks: dict) -> RecordDict:
    """A client's reply to a blame request: its canary mask with every peer."""
    peers = sorted(masks)
    status = ConfigRecord({"phase": PHASE_BLAME, "round": round, "step": -1, "point": -1})
    record = ArrayRecord({
        "peers": Array(np.array(peers, dtype=np.uint64)),
        "masks": Array(np.stack([np.asarray(masks[p], dtype=np.uint64) for p in peers], axis=1)
                       if peers else np.zeros((2, 0), dtype=np.uint64)),
    })
    return RecordDict({STATUS: status, SECURE: record})


def encode_request(
    round: int, step: int, point: SyncPoint, payload: Union[Payload, MaskedPayload]
) -> RecordDict:
    """A client's reply at a sync point."""
    stats, scalars = payload_record(payload)
    status = ConfigRecord(
        {"phase": point.phase, "round": round, "step": step, "point": point.index,
         "call": point.call, "channels": point.channels, **scalars}
    )
    return RecordDict({STATUS: status, STATS: stats})


def encode_done(round: int, arrays: ArrayRecord, metrics: MetricRecord) -> RecordDict:
    """A client's last reply of a round: its trained model and metrics."""
    status = ConfigRecord({"phase": PHASE_DONE, "round": round, "step": -1, "point": -1})
    return RecordDict({STATUS: status, ARRAYS: arrays, METRICS: metrics})


def encode_stats_done(round: int, buffer_calls: dict, num_examples: int) -> RecordDict:
    """A client's last reply of a statistics pass: which BatchNorm calls fed which running
    buffer (``{key: ("mean" | "var", [calls])}``) and how many examples it forwarded."""
    status = ConfigRecord(
        {"phase": PHASE_STATS_DONE, "round": round, "step": -1, "point": -1, "num-examples": int(num_examples)}
    )
    buffers = ConfigRecord({f"{kind}:{key}": [int(c) for c in calls] for key, (kind, calls) in buffer_calls.items()})
    return RecordDict({STATUS: status, STATS_BUFFERS: buffers})


def _buffer_calls_from(sender: Hashable, record: Optional[ConfigRecord]) -> dict:
    if record is None:
        raise PayloadError(sender, f"stats-done reply has no ConfigRecord '{STATS_BUFFERS}'")
    calls: dict = {}
    for name, value in record.items():
        kind, _, key = name.partition(":")
        if kind not in ("mean", "var") or not key:
            raise PayloadError(sender, f"'{STATS_BUFFERS}' entry {name!r:.80} is not 'mean:<key>' or 'var:<key>'")
        if (not isinstance(value, list) or not value
                or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in value)):
            raise PayloadError(
                sender, f"'{STATS_BUFFERS}' entry {name!r:.80} must list call indices, got {value!r:.80}"
            )
        if key in calls:
            raise PayloadError(sender, f"'{STATS_BUFFERS}' names buffer {key!r:.80} twice")
        calls[key] = (kind, list(value))
    return calls


def decode_reply(content: RecordDict, sender: Hashable, weighted_by_key: str) -> Status:
    """Decode and validate a client's reply; :class:`PayloadError` names ``sender``."""
    status = content.config_records.get(STATUS)
    if status is None:
        raise PayloadError(sender, f"reply has no ConfigRecord '{STATUS}'")
    phase = status.get("phase")
    round_ = _get_int(sender, status, "round")
    step = _get_int(sender, status, "step")
    if phase == PHASE_KEYS:
        record = content.array_records.get(SECURE)
        if record is None or "public-key" not in record:
            raise PayloadError(sender, f"keys reply has no ArrayRecord '{SECURE}' with 'public-key'")
        key = record["public-key"].numpy()
        if key.dtype != np.uint8 or key.shape != (32,):
            raise PayloadError(sender, f"public-key is {key.dtype} {key.shape}, expected uint8 (32,)")
        return KeysStatus(phase=phase, round=round_, step=step, public_key=key.tobytes())
    if phase == PHASE_BLAME:
        record = content.array_records.get(SECURE)
        if record is None or set(record.keys()) != {"peers", "masks"}:
            raise PayloadError(sender, f"blame reply needs ArrayRecord '{SECURE}' with 'peers' and 'masks'")
        peers, masks = record["peers"].numpy(), record["masks"].numpy()
        if (peers.dtype != np.uint64 or peers.ndim != 1 or masks.dtype != np.uint64
                or masks.shape != (2, peers.shape[0])):
            raise PayloadError(sender, f"blame reply: peers {peers.dtype} {peers.shape}, masks {masks.dtype} "
                                       f"{masks.shape}; expected uint64 (P,) and (2, P)")
        revealed = {int(peer): masks[:, i].copy() for i, peer in enumerate(peers)}
        return BlameStatus(phase=phase, round=round_, step=step, canary_masks=revealed)
    if phase == PHASE_DONE:
        arrays = content.array_records.get(ARRAYS)
        metrics = content.metric_records.get(METRICS)
        if arrays is None:
            raise PayloadError(sender, f"done reply has no ArrayRecord '{ARRAYS}'")
        if metrics is None or weighted_by_key not in metrics:
            raise PayloadError(sender, f"done reply has no MetricRecord '{METRICS}' with '{weighted_by_key}'")
        weight = metrics[weighted_by_key]
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
            raise PayloadError(sender, f"'{weighted_by_key}' must be a positive number, got {weight!r}")
        return DoneStatus(phase=phase, round=round_, step=step, arrays=arrays, metrics=metrics)
    if phase == PHASE_STATS_DONE:
        examples = _get_int(sender, status, "num-examples")
        if examples < 1:
            raise PayloadError(sender, f"'num-examples' must be >= 1, got {examples}")
        buffer_calls = _buffer_calls_from(sender, content.config_records.get(STATS_BUFFERS))
        return StatsDoneStatus(phase=phase, round=round_, step=step, buffer_calls=buffer_calls,
                               num_examples=examples)
    if phase not in (PHASE_FORWARD, PHASE_BACKWARD):
        raise PayloadError(sender, f"unknown reply phase {phase!r}")
    point = SyncPoint(
        index=_get_int(sender, status, "point"),
        phase=phase,
        call=_get_int(sender, status, "call"),
        channels=_get_int(sender, status, "channels"),
    )
    payload = _payload_from(sender, phase, content.array_records.get(STATS), status)
    return SyncStatus(phase=phase, round=round_, step=step, point=point, payload=payload)
