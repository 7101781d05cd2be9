"""FedTAN's checkpoint files: arrays in a NumPy ``.npz`` archive, everything else as JSON.

No pickle anywhere: a checkpoint is data, and loading one runs no code (``np.load`` with
``allow_pickle=False``; object arrays are refused on writing). The files are private
(:mod:`flwr_fedtan.private_files`: folders ``0700``, files ``0600``, written to a fresh
name and renamed, read without following links and only if this user owns them).

A strategy's state is whatever plain data its attributes hold: numbers, strings, NumPy
arrays, lists, tuples and dicts of those (FedAdam's ``m_t``/``v_t``, FedAvgM's momentum),
and Flower's ``Array``/``ArrayRecord``/``MetricRecord``/``ConfigRecord``. An attribute
holding anything else (a lock, a client handle) is not state to resume and is left out.
NumPy, Flower records and the standard library only; no torch.
"""

from __future__ import annotations

import io
import json
import re
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from .quarantine import FailureRecord
from .private_files import private_dir, read_private_file, write_private_file
from .errors import UnsafePathError

__all__ = ["FORMAT", "SUFFIX", "checkpoint_name", "round_of", "list_checkpoints", "write", "read",
           "encode_state", "decode_state", "Unsupported", "save_run", "load_run", "evaluate_after"]

FORMAT = 2  # format 1 was a pickle: never loaded
SUFFIX = ".fedtan-ckpt"
_NAME = re.compile(r"round-(\d+)" + re.escape(SUFFIX) + r"\Z")
_STATE = "state.json"


class Unsupported(TypeError):
    """A value that is not plain data (see the module docstring)."""


def checkpoint_name(server_round: int) -> str:
    """``round-NNNNN.fedtan-ckpt`` (at least five digits; more past round 99999)."""
    return f"round-{server_round:05d}{SUFFIX}"


def round_of(name: str) -> Optional[int]:
    """The round number of a checkpoint's file name, ``None`` if it is not one."""
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """The checkpoints in ``folder`` as ``(round, path)``, sorted by round number (not by
    name: round 100000 comes after 99999)."""
    found = []
    for path in Path(folder).iterdir():
        number = round_of(path.name)
        if number is not None:
            found.append((number, path))
    return sorted(found)


# ---------------------------------------------------------------------- plain data <-> JSON + arrays
def encode_state(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """``value`` as JSON-able data; its arrays go to ``arrays`` under fresh names.

    Raises
    ------
    Unsupported
        If ``value`` holds anything but plain data.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)) and type(value) in (int, float):
        return value
    if isinstance(value, np.generic):
        return {"scalar": _store(np.asarray(value), arrays)}
    if isinstance(value, np.ndarray):
        return {"array": _store(value, arrays)}
    if isinstance(value, Array):
        return {"flwr-array": _store(value.numpy(), arrays)}
    if isinstance(value, ArrayRecord):
        return {"array-record": [[k, _store(v.numpy(), arrays)] for k, v in value.items()]}
    for kind, record_type in (("metric-record", MetricRecord), ("config-record", ConfigRecord)):
        if isinstance(value, record_type):
            return {kind: [[k, encode_state(v, arrays)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [encode_state(v, arrays) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[encode_state(k, arrays), encode_state(v, arrays)] for k, v in value.items()]}
    raise Unsupported(f"{type(value).__name__} is not plain data")


def decode_state(data: Any, arrays: dict[str, np.ndarray]) -> Any:
    """Inverse of :func:`encode_state`."""
    if data is None or isinstance(data, (bool, str, int, float)):
        return data
    if not isinstance(data, dict) or len(data) != 1:
        raise ValueError(f"checkpoint state holds an unknown entry {str(data)[:80]!r}")
    ((kind, inner),) = data.items()
    if kind == "scalar":
        return arrays[inner][()]
    if kind == "array":
        return arrays[inner]
    if kind == "flwr-array":
        return Array(arrays[inner])
    if kind == "array-record":
        return ArrayRecord({k: Array(arrays[name]) for k, name in inner})
    if kind == "metric-record":
        return MetricRecord({k: decode_state(v, arrays) for k, v in inner})
    if kind == "config-record":
        return ConfigRecord({k: decode_state(v, arrays) for k, v in inner})
    if kind == "list":
        return [decode_state(v, arrays) for v in inner]
    if kind == "tuple":
        return tuple(decode_state(v, arrays) for v in inner)
    if kind == "dict":
        return {decode_state(k, arrays): decode_state(v, arrays) for k, v in inner}
    raise ValueError(f"checkpoint state holds an unknown kind {kind!r}")


def _store(array: np.ndarray, arrays: dict[str, np.ndarray]) -> str:
    array = np.asarray(array)
    if array.dtype.hasobject:
        raise Unsupported("an array of Python objects is not plain data")
    name = f"a{len(arrays)}"
    arrays[name] = array
    return name


# ---------------------------------------------------------------------- files
def write(folder: Path, server_round: int, header: dict, state: Any) -> Path:
    """Write a checkpoint (``header`` and ``state`` encoded with :func:`encode_state`) to
    ``folder/round-NNNNN.fedtan-ckpt``, privately and atomically; return its path."""
    folder = Path(folder)
    if not folder.is_absolute():
        folder = Path.cwd() / folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder = private_dir(base=folder)
    except UnsafePathError as error:
        raise UnsafePathError(f"checkpoint_dir {folder}: {error} (for checkpoints: or choose another "
                              "checkpoint_dir)") from None
    arrays: dict[str, np.ndarray] = {}
    document = {"format": FORMAT, **header, "state": encode_state(state, arrays)}
    arrays[_STATE] = np.frombuffer(json.dumps(document).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    target = folder / checkpoint_name(server_round)
    write_private_file(target, buffer.getvalue())
    return target


def read(path: Path) -> tuple[dict, Any]:
    """``(document, state)`` of a checkpoint file: its JSON header and its decoded state.

    Raises
    ------
    UnsafePathError
        If the file is a link, or not private to this user (see :mod:`private_files`).
    ValueError
        If it is not a FedTAN checkpoint of this format (a format-1 pickle among them).
    """
    data = read_private_file(path)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        document = json.loads(arrays.pop(_STATE).tobytes().decode())
    except Exception as error:  # pylint: disable=broad-except  # a zip, npy or JSON error: not ours
        raise ValueError(
            f"{path} is not a FedTAN checkpoint of format {FORMAT} ({type(error).__name__}: {error}); "
            "checkpoints of format 1 were pickles and are not loaded"
        ) from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{path} is not a FedTAN checkpoint of format {FORMAT}")
    return document, decode_state(document.pop("state"), arrays)


# ---------------------------------------------------------------------- FedTAN's run state
def save_run(folder: Path, server_round: int, arrays: ArrayRecord, strategy: Strategy, seed: int,
             failures: dict[int, FailureRecord], keep: int) -> Path:
    """Write the state of a FedTAN run after ``server_round`` in ``folder``: the global
    ``arrays``, the wrapped ``strategy``'s plain-data attributes, the ``failures`` records
    and the ``seed``; keep the newest ``keep`` checkpoints there (0: all). Returns the file."""
    header = {
        "round": int(server_round),
        "seed": seed,
        "strategy-class": type(strategy).__name__,
        "failures": [[int(n), vars(r).copy()] for n, r in failures.items()],
    }
    state = {"arrays": ArrayRecord({k: v for k, v in arrays.items()}), "strategy": _capture_state(strategy)}
    target = write(folder, server_round, header, state)
    if keep > 0:
        for _, old in list_checkpoints(target.parent)[: -keep]:
            old.unlink(missing_ok=True)
    return target


def load_run(path: Path, strategy: Strategy, seed: int) -> tuple[int, ArrayRecord, dict[int, FailureRecord]]:
    """Restore ``strategy``'s state from a checkpoint (a file, or a folder: the one of the
    highest round number); return its round, global arrays and failure records."""
    file = path
    if file.is_dir() and not file.is_symlink():
        found = list_checkpoints(file)
        if not found:
            raise FileNotFoundError(f"no FedTAN checkpoint (round-*{SUFFIX}) in {file}")
        file = found[-1][1]
    payload, state = read(file)
    if payload.get("strategy-class") != type(strategy).__name__:
        raise ValueError(
            f"{file} was written by FedTAN around {payload.get('strategy-class')}, this one wraps "
            f"{type(strategy).__name__}: build the same strategy to resume"
        )
    if payload.get("seed") != seed:
        log(WARNING, "FedTAN: checkpoint seed %s differs from this strategy's %s: the resumed rounds "
            "will not match the original run", payload.get("seed"), seed)
    _restore_state(strategy, state["strategy"])
    failures = {int(n): FailureRecord(**r) for n, r in payload["failures"]}
    log(INFO, "FedTAN: resuming after round %d from %s", payload["round"], file)
    return int(payload["round"]), state["arrays"], failures


def evaluate_after(
    done: int, evaluate_fn: Optional[Callable[[int, ArrayRecord], Optional[MetricRecord]]]
) -> Optional[Callable[[int, ArrayRecord], Optional[MetricRecord]]]:
    """``evaluate_fn`` for a run resumed after round ``done``: the rounds before it were
    evaluated by the interrupted run (round ``done``, the checkpoint's model, is evaluated)."""
    if evaluate_fn is None:
        return None

    def evaluate(server_round: int, arrays: ArrayRecord) -> Optional[MetricRecord]:
        return None if server_round < done else evaluate_fn(server_round, arrays)

    return evaluate


def _capture_state(obj: Any) -> dict:
    """A strategy's plain-data attributes (nested wrapped strategies included), encodable
    in a checkpoint."""
    state = {}
    for name, value in vars(obj).items():
        if isinstance(value, Strategy):
            state[name] = ("strategy", _capture_state(value))
        elif callable(value):
            continue
        else:
            try:
                encode_state(value, {})
            except Unsupported:  # e.g. a lock or a client handle: not state to resume
                continue
            state[name] = ("value", value)
    return state


def _restore_state(obj: Any, state: dict) -> None:
    for name, (kind, value) in state.items():
        if kind == "strategy":
            _restore_state(getattr(obj, name), value)
        else:
            setattr(obj, name, value)
