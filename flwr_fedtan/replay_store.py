"""Where a node keeps a round's starting weights for replay.

A message that lands in a process without the node's live round rebuilds the round from
its starting weights, batch seed and aggregates so far (see :mod:`flwr_fedtan.client`).
The seed and aggregates are small and ride in ``context.state``. The weights are a whole
model: carried in ``context.state`` they would be serialised twice with every message of
the round (in a Ray simulation they go through Ray's object store each time, which
costs more than the synchronised step itself). So by default they are written once per
round to a node-local file and ``context.state`` holds only its path and SHA-256.

Stores
------
``"disk"`` (default)
    A file under ``FEDTAN_STATE_DIR`` (default: ``<tempdir>/flwr-fedtan-state-<uid>``),
    one per (run, node); any process on the same machine can replay. Right for Ray
    simulation on one machine and for deployment (a SuperNode's ClientApp processes run
    on its machine).
``"context"``
    The weights in ``context.state``: replay works wherever Flower delivers the message,
    e.g. on a multi-machine Ray cluster where a node's messages may reach actors on other
    machines, at the serialisation cost above.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from . import settings

__all__ = ["STORES", "ReplayWeightsMissing", "discard_weights", "load_weights", "resolve_store", "save_weights"]

STORES = settings.REPLAY_STORES
WEIGHTS_REF = "fedtan.weights-ref"  # ConfigRecord in context.state: store, path, sha256
WEIGHTS = "fedtan.weights"  # ArrayRecord in context.state ("context" store)


class ReplayWeightsMissing(RuntimeError):
    """The round's starting weights cannot be found (or do not match their checksum)."""


def resolve_store(store: str | None) -> str:
    """``FEDTAN_REPLAY_STORE``, or ``store``, or ``"disk"``; validated (:mod:`flwr_fedtan.settings`)."""
    return settings.replay_store(store)


def state_dir(configured: str | os.PathLike | None = None) -> Path:
    """The folder of node-local replay files: ``FEDTAN_STATE_DIR``, or ``configured``, or
    the default (:func:`flwr_fedtan.settings.state_dir`)."""
    return settings.state_dir(configured)


def _path_for(run_id: int, node_id: int, directory: str | os.PathLike | None = None) -> Path:
    return state_dir(directory) / f"run-{run_id}" / f"node-{node_id}.npz"


def save_weights(
    state: RecordDict, arrays: ArrayRecord, store: str, run_id: int, node_id: int,
    directory: str | os.PathLike | None = None,
) -> None:
    """Keep ``arrays`` as the starting weights of the node's current round (``directory``:
    the ``"disk"`` store's folder, see :func:`state_dir`)."""
    discard_weights(state)
    if store == "context":
        state[WEIGHTS] = arrays
        return
    buffer = io.BytesIO()
    np.savez(buffer, **{key: array.numpy() for key, array in arrays.items()})
    data = buffer.getvalue()
    path = _path_for(run_id, node_id, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)  # atomic: a concurrent reader sees the old or the new file
    state[WEIGHTS_REF] = ConfigRecord(
        {"store": "disk", "path": str(path), "sha256": hashlib.sha256(data).hexdigest()}
    )


def load_weights(state: RecordDict) -> ArrayRecord:
    """The starting weights kept by :func:`save_weights`.

    Raises
    ------
    ReplayWeightsMissing
        If they are not in ``context.state`` nor in a node-local file with the recorded
        checksum (e.g. the message reached a process on another machine).
    """
    if WEIGHTS in state.array_records:
        return state.array_records[WEIGHTS]
    ref = state.config_records.get(WEIGHTS_REF)
    if ref is None:
        raise ReplayWeightsMissing("context.state holds no starting weights for this round")
    path = Path(str(ref["path"]))
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ReplayWeightsMissing(
            f"the round's starting weights are not in the node-local store ({path}: "
            f"{error.strerror}). If this node's messages can reach processes on other "
            "machines (a multi-machine Ray cluster), use replay_store='context' "
            "(FEDTAN_REPLAY_STORE=context)"
        ) from None
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise ReplayWeightsMissing(f"{path} does not hold this round's starting weights (checksum differs)")
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return ArrayRecord({key: Array(npz[key]) for key in npz.files})


def discard_weights(state: RecordDict) -> None:
    """Forget the starting weights (the round is over, or a new one begins)."""
    if WEIGHTS in state.array_records:
        del state[WEIGHTS]
    ref = state.config_records.get(WEIGHTS_REF)
    if ref is not None:
        Path(str(ref["path"])).unlink(missing_ok=True)
        del state[WEIGHTS_REF]
