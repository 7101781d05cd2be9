"""The one checked encoding of FedTAN's payloads in Flower records.

Statistics (:class:`~flwr_fedtan.aggregation.ForwardStats`), sums
(:class:`~flwr_fedtan.aggregation.BackwardSums`), masked payloads
(:class:`~flwr_fedtan.secure.MaskedPayload`), rosters and public shifts become an
``ArrayRecord`` plus a few scalars here and nowhere else. The wire
(:mod:`flwr_fedtan.protocol.wire`) and the node's replay log (:mod:`flwr_fedtan.node.state`)
both use it, so a log entry is checked exactly like the message it came from, and a
corrupt log raises the same :class:`ServerMessageError` as a corrupt message.

NumPy and Flower records only: no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Hashable, Optional, Union, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from ..aggregation import BackwardSums, ForwardStats
from ..errors import KeyAgreementError, PayloadError, SecureStatsError, ServerMessageError
from ..secure import MaskedPayload, Roster, shifts_from_arrays, shifts_to_arrays

__all__ = [
    "BACKWARD",
    "array_values",
    "FORWARD",
    "Payload",
    "client_payload",
    "get_int",
    "log_append",
    "log_read",
    "payload_record",
    "pooled_aggregate",
    "roster_record",
    "secure_from_records",
    "shifts_record",
    "to_array",
]

FORWARD = "forward"
BACKWARD = "backward"
STATS = "fedtan.stats"  # the ArrayRecord a payload travels in (named in error messages)
_ARRAYS = {FORWARD: ("mean", "var"), BACKWARD: ("sum-grad", "sum-grad-xhat")}
_MASKED_ARRAYS = {"masked", "roster-digest"}

Payload = Union[ForwardStats, BackwardSums]


# ---------------------------------------------------------------------- arrays
# Flower's Array holds an array as ``np.save`` writes it: a header (format, dtype, shape)
# and the raw bytes. Building and parsing that header (``np.load`` evaluates it as a Python
# literal) costs more than the few values a payload holds, at every exchange for every
# node, on the server and on the node. The payloads of a run have a handful of dtypes and
# shapes: each header is built and parsed once, and reused byte for byte.
_NUMPY_STYPE = Array(np.zeros(0)).stype
_NPY_V1 = b"\x93NUMPY\x01\x00"
_HEADERS_KEPT = 1024  # beyond that many layouts the tables start over
_headers: dict[tuple[str, tuple[int, ...]], bytes] = {}  # (dtype, shape) -> the header np.save writes
_layouts: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}  # header -> (dtype, shape, bytes)


def _keep(table: dict, key: Any, value: Any) -> None:
    if len(table) >= _HEADERS_KEPT:
        table.clear()
    table[key] = value


def to_array(values: np.ndarray) -> Array:
    """``Array(values)``, the same bytes, with the header of a known dtype and shape reused."""
    if not values.flags.c_contiguous or values.dtype.hasobject:
        return Array(values)
    key = (values.dtype.str, values.shape)
    header = _headers.get(key)
    if header is None:
        array = Array(values)
        _keep(_headers, key, array.data[: len(array.data) - values.nbytes])
        return array
    return Array(dtype=str(values.dtype), shape=tuple(values.shape), stype=_NUMPY_STYPE,
                 data=header + values.tobytes())


def array_values(array: Array) -> np.ndarray:
    """``array.numpy()``, with the header of a known dtype and shape recognised without
    parsing it again. Anything else (another header, a length that does not match it) goes
    through ``numpy()`` and fails there as it would."""
    data = array.data
    if array.stype == _NUMPY_STYPE and isinstance(data, bytes) and data[:8] == _NPY_V1 and len(data) >= 10:
        end = 10 + int.from_bytes(data[8:10], "little")
        layout = _layouts.get(data[:end])
        if layout is not None and len(data) - end == layout[2]:
            dtype, shape, _ = layout
            return np.frombuffer(data, dtype=dtype, offset=end).reshape(shape).copy()
        values = array.numpy()
        header = data[:end]
        if b"'fortran_order': False" in header and values.flags.c_contiguous and len(data) - end == values.nbytes:
            _keep(_layouts, header, (values.dtype, values.shape, values.nbytes))
        return values
    return array.numpy()


def get_int(sender: Hashable, record: Mapping[str, Any], key: str) -> int:
    """``record[key]`` if it is an int (not a bool); else :class:`PayloadError` naming ``sender``."""
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise PayloadError(sender, f"'{key}' must be an int, got {value!r}")
    return value


# ---------------------------------------------------------------------- payloads
def payload_record(payload: Union[Payload, MaskedPayload]) -> tuple[ArrayRecord, dict]:
    """A payload or aggregate as its arrays and its scalars (``count``, ``num-examples``,
    ``masked``), float64 for statistics and sums."""
    if isinstance(payload, MaskedPayload):  # sums masked; a forward payload's counts also clear
        scalars: dict = {"masked": True}
        if payload.count is not None:
            # a masked forward payload carries its examples with its count
            scalars.update({"count": float(payload.count), "num-examples": int(cast(int, payload.num_examples))})
        return ArrayRecord({k: to_array(v) for k, v in payload.to_arrays().items()}), scalars
    if isinstance(payload, ForwardStats):
        names, values = _ARRAYS[FORWARD], (payload.mean, payload.var)
        scalars = {"count": float(payload.count), "num-examples": int(payload.num_examples)}
    else:
        names, values = _ARRAYS[BACKWARD], (payload.sum_grad, payload.sum_grad_xhat)
        scalars = {}
    record = ArrayRecord({k: to_array(np.ascontiguousarray(v, dtype=np.float64)) for k, v in zip(names, values)})
    return record, scalars


def client_payload(
    sender: Hashable, phase: str, stats: Optional[ArrayRecord], scalars: Mapping[str, Any]
) -> Union[Payload, MaskedPayload]:
    """A client's payload at a sync point of ``phase`` (server side); :class:`PayloadError`
    names ``sender`` when it is malformed."""
    names = _ARRAYS[FORWARD] if phase == FORWARD else _ARRAYS[BACKWARD]
    if stats is None:
        raise PayloadError(sender, f"missing ArrayRecord '{STATS}'")
    if scalars.get("masked") is True:
        expected = _MASKED_ARRAYS | ({"shift"} if phase == FORWARD else set())
        if set(stats.keys()) != expected:  # before decoding anything a client sent
            raise PayloadError(sender, f"masked payload holds {sorted(stats.keys())}, expected {sorted(expected)}")
        try:
            arrays = {name: array_values(stats[name]) for name in expected}
        except Exception as error:  # a corrupt Array
            raise PayloadError(sender, f"'{STATS}' cannot be decoded: {error}") from None
        return MaskedPayload.from_arrays(
            sender, phase, get_int(sender, scalars, "channels"), arrays,
            count=scalars.get("count") if phase == FORWARD else None,
            num_examples=scalars.get("num-examples") if phase == FORWARD else None,
        )
    if set(stats.keys()) != set(names):
        raise PayloadError(sender, f"'{STATS}' holds {sorted(stats.keys())}, expected {list(names)}")
    try:
        values = {name: array_values(stats[name]) for name in names}
    except Exception as error:  # a corrupt Array
        raise PayloadError(sender, f"'{STATS}' cannot be decoded: {error}") from None
    if phase == FORWARD:
        count, examples = scalars.get("count"), scalars.get("num-examples")
        if not isinstance(count, (int, float)) or isinstance(count, bool):
            raise PayloadError(sender, f"forward payload needs a numeric 'count', got {count!r}")
        if not isinstance(examples, int) or isinstance(examples, bool):
            raise PayloadError(sender, f"forward payload needs an int 'num-examples', got {examples!r}")
        return ForwardStats(count=float(count), num_examples=examples, mean=values["mean"], var=values["var"])
    return BackwardSums(*(values[name] for name in names))


def pooled_aggregate(scalars: Mapping[str, Any], stats: Optional[ArrayRecord], where: str) -> Payload:
    """The server's aggregate (``scalars`` holds its ``sync-phase``, and ``count`` and
    ``num-examples`` when forward), checked for what the wire guarantees: the arrays of
    its phase, float64, one value per channel, finite, equal in length, and for the
    forward phase a pooled count and example number that can be divided by. Whether it
    fits the step's pending sync point (phase, channels, examples) is checked by the step
    itself (:meth:`flwr_fedtan.step.SyncStep.resume`).

    Raises
    ------
    ServerMessageError
        Naming ``where`` and what is wrong.
    """
    sync_phase = scalars.get("sync-phase")
    if sync_phase not in (FORWARD, BACKWARD):
        raise ServerMessageError(f"{where}: 'sync-phase' must be '{FORWARD}' or '{BACKWARD}', got {sync_phase!r}")
    where = f"{where} ({sync_phase})"
    names = _ARRAYS[sync_phase]
    if stats is None:
        raise ServerMessageError(f"{where}: no ArrayRecord '{STATS}'")
    if set(stats.keys()) != set(names):
        raise ServerMessageError(
            f"{where}: '{STATS}' holds {sorted(stats.keys())}, a {sync_phase} aggregate holds {list(names)}"
        )
    values = {}
    for name in names:
        try:
            value = array_values(stats[name])
        except Exception as error:  # a corrupt Array
            raise ServerMessageError(f"{where}: '{name}' cannot be decoded: {error}") from None
        if value.dtype != np.float64:
            raise ServerMessageError(
                f"{where}: '{name}' has dtype {value.dtype}, FedTAN sends aggregates as float64 "
                "(is the server running another flwr-fedtan version?)"
            )
        if value.ndim != 1 or value.size == 0:
            raise ServerMessageError(f"{where}: '{name}' has shape {value.shape}, expected one value per channel (C,)")
        if not np.isfinite(value).all():
            raise ServerMessageError(f"{where}: '{name}' contains NaN or Inf")
        values[name] = value
    first, second = (values[name] for name in names)
    if first.shape != second.shape:
        raise ServerMessageError(f"{where}: '{names[0]}' has {first.size} channels but '{names[1]}' has {second.size}")
    if sync_phase == BACKWARD:
        return BackwardSums(sum_grad=first, sum_grad_xhat=second)
    if (values["var"] < 0).any():
        raise ServerMessageError(f"{where}: pooled 'var' has negative entries (min {values['var'].min():.3g})")
    count, examples = scalars.get("count"), scalars.get("num-examples")
    if (not isinstance(count, (int, float)) or isinstance(count, bool)
            or not np.isfinite(count) or not count >= 1):
        raise ServerMessageError(f"{where}: pooled 'count' must be a finite number >= 1, got {count!r}")
    if not isinstance(examples, int) or isinstance(examples, bool) or examples < 1:
        raise ServerMessageError(f"{where}: pooled 'num-examples' must be an int >= 1, got {examples!r}")
    return ForwardStats(count=float(count), num_examples=examples, mean=values["mean"], var=values["var"])


# ---------------------------------------------------------------------- rosters and shifts
def roster_record(roster: Roster) -> ArrayRecord:
    """A roster of public keys as an ``ArrayRecord``."""
    return ArrayRecord({k: Array(v) for k, v in roster.to_arrays().items()})


def shifts_record(shifts: Optional[Mapping[int, np.ndarray]]) -> ArrayRecord:
    """Public shifts by sync-point index as an ``ArrayRecord``."""
    return ArrayRecord({k: Array(v) for k, v in shifts_to_arrays(shifts or {}).items()})


def secure_from_records(
    roster: ArrayRecord, shifts: Optional[ArrayRecord], where: str
) -> tuple[Roster, dict[int, np.ndarray]]:
    """The roster and shifts of :func:`roster_record` and :func:`shifts_record`, checked;
    :class:`ServerMessageError` naming ``where`` if either is malformed."""
    try:
        return (
            Roster.from_arrays({k: v.numpy() for k, v in roster.items()}),
            shifts_from_arrays({k: v.numpy() for k, v in (shifts or ArrayRecord()).items()}),
        )
    except (KeyAgreementError, SecureStatsError) as error:
        raise ServerMessageError(f"{where}: {error}") from None


# ---------------------------------------------------------------------- replay log
def log_append(arrays: ArrayRecord, scalars: ConfigRecord, index: int, aggregate: Payload) -> None:
    """Add the ``index``-th aggregate of a round to a replay log (an ``ArrayRecord`` and a
    ``ConfigRecord``), encoded as on the wire under the prefix ``"<index>."``."""
    record, values = payload_record(aggregate)
    values["sync-phase"] = FORWARD if isinstance(aggregate, ForwardStats) else BACKWARD
    for name, array in record.items():
        arrays[f"{index}.{name}"] = array
    for name, value in values.items():
        scalars[f"{index}.{name}"] = value


def log_read(arrays: ArrayRecord, scalars: ConfigRecord, length: int, where: str) -> list[Payload]:
    """The first ``length`` aggregates of a replay log, each checked like the message it
    came in (:func:`pooled_aggregate`).

    Raises
    ------
    ServerMessageError
        If an entry is missing or corrupt, naming it and ``where``.
    """
    entries: dict[str, tuple[dict, dict]] = {}
    for records, part in ((arrays, 0), (scalars, 1)):
        for key, value in records.items():
            index, _, name = key.partition(".")
            entries.setdefault(index, ({}, {}))[part][name] = value
    out: list[Payload] = []
    for position in range(length):
        entry_arrays, entry_scalars = entries.get(str(position), ({}, {}))
        out.append(pooled_aggregate(entry_scalars, ArrayRecord(entry_arrays), f"{where}, aggregate {position}"))
    return out
