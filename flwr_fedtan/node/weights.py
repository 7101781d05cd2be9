"""Where a node keeps a round's starting weights for replay.

A message that lands in a process without the node's live round rebuilds the round from
its starting weights, batch seed and aggregates so far (see :mod:`flwr_fedtan.node.session`).
The seed and aggregates are small and ride in the node's state (:mod:`flwr_fedtan.node.state`).
The weights are a whole model: carried in the node's state they would be serialised twice
with every message of the round (in a Ray simulation they go through Ray's object store
each time, which costs more than the synchronised step itself). So by default they are
written once per round to a node-local file and the node's state holds only a
:class:`WeightsRef`: its path and SHA-256.

Stores
------
``"disk"`` (default)
    A file private to this user, one per (run, node), in
    ``<base>/replay/run-<run>/node-<node>.npz``; any process of the same user on the same
    machine can replay. Right for Ray simulation on one machine and for deployment (a
    SuperNode's ClientApp processes run on its machine).
``"context"``
    The weights in the node's state, which Flower carries: replay works wherever Flower
    delivers the message, e.g. on a multi-machine Ray cluster where a node's messages may
    reach actors on other machines, at the serialisation cost above.

Node-local files
----------------
``<base>`` is the ``state_dir`` given to :func:`~flwr_fedtan.add_fedtan` /
:func:`~flwr_fedtan.fedtan_client_app`, else :func:`flwr_fedtan.private_files.default_base`
(``$XDG_RUNTIME_DIR/flwr-fedtan``, or ``<tempdir>/flwr-fedtan-<uid>``); ``FEDTAN_STATE_DIR``
overrides both (:mod:`flwr_fedtan.settings`). Folders are ``0700`` and verified to be this user's,
files ``0600``, written to a fresh ``O_EXCL | O_NOFOLLOW`` name and renamed into place
(:mod:`flwr_fedtan.private_files`).

A file lives for one round: it is written when the round begins and removed when the
node's round ends (its ``done`` reply), with the run's folder once no node of the run
holds a file in it, so nothing is left after a run's last round. A node that is dropped
mid-round, or a process killed, leaves its file until the node's next round begins; the
folders of runs whose files have not changed for 24 hours (``FEDTAN_STATE_MAX_AGE_HOURS``
overrides it) are removed whenever a round begins on the machine.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Optional

import numpy as np
from flwr.app import Array, ArrayRecord

from .. import settings
from ..private_files import private_dir, read_private_file, remove_if_empty, remove_stale, write_private_file
from ..errors import UnsafePathError

__all__ = [
    "ReplayWeightsMissing",
    "UnsafePathError",
    "WeightsRef",
    "clean_stale_runs",
    "discard_weights",
    "load_weights",
    "replay_dir",
    "save_weights",
    "state_dir",
]

REPLAY_FOLDER = "replay"  # under the base: run-<run>/node-<node>.npz
RUN_PREFIX = "run-"


class ReplayWeightsMissing(RuntimeError):
    """The round's starting weights cannot be found (or do not match their checksum)."""


@dataclass(frozen=True)
class WeightsRef:
    """Where a round's starting weights are: ``arrays`` themselves (the ``"context"``
    store), or the ``path`` of a node-local file and its ``sha256`` (``"disk"``)."""

    store: str
    path: Optional[str] = None
    sha256: Optional[str] = None
    arrays: Optional[ArrayRecord] = None


def state_dir(configured: str | os.PathLike | None = None) -> Path:
    """The base folder of node-local state: ``FEDTAN_STATE_DIR``, else ``configured``, else
    :func:`~flwr_fedtan.private_files.default_base`. Not created here."""
    return settings.state_dir(configured).absolute()


def replay_dir(run_id: int, directory: str | os.PathLike | None = None) -> Path:
    """The run's private folder of replay files under :func:`state_dir` (``directory``:
    the configured base), created (0700) or verified.

    Raises
    ------
    UnsafePathError
        If the base, its ``replay`` folder or the run's folder is not private to this user.
    """
    return private_dir(REPLAY_FOLDER, f"{RUN_PREFIX}{int(run_id)}", base=state_dir(directory))


def clean_stale_runs(
    keep_run: Optional[int] = None, max_age_hours: Optional[float] = None, directory: str | os.PathLike | None = None
) -> list[Path]:
    """Remove the replay folders of runs in which nothing changed for ``max_age_hours``.

    Parameters
    ----------
    keep_run : Optional[int]
        A run whose folder is never removed (the caller's own).
    max_age_hours : Optional[float] (default: 24; ``FEDTAN_STATE_MAX_AGE_HOURS`` overrides it)
        Age after which a run's folder counts as left behind. A round that lasts longer
        than this could lose its replay file to another run's cleaning.
    directory : Optional[PathLike]
        The configured base folder (see :func:`state_dir`).

    Returns
    -------
    list[Path]
        The folders removed.
    """
    age = settings.state_max_age_hours(max_age_hours)
    keep = () if keep_run is None else (f"{RUN_PREFIX}{int(keep_run)}",)
    parent = private_dir(REPLAY_FOLDER, base=state_dir(directory))
    return remove_stale(parent, RUN_PREFIX, age * 3600.0, keep=keep)


def save_weights(
    arrays: ArrayRecord,
    store: str,
    run_id: int,
    node_id: int,
    *,
    max_age_hours: Optional[float] = None,
    directory: str | os.PathLike | None = None,
) -> WeightsRef:
    """Keep ``arrays`` as the starting weights of the node's current round (``directory``:
    the ``"disk"`` store's base folder, see :func:`state_dir`); where they are.

    With the ``"disk"`` store this also removes stale folders of other runs (see
    :func:`clean_stale_runs`, ``max_age_hours``).

    Raises
    ------
    UnsafePathError
        If the node-local folder is not private to this user (the message says what to fix).
    OSError
        If the file cannot be written (e.g. a full disk); the message names the fixes.
    """
    if store == "context":
        return WeightsRef("context", arrays=arrays)
    buffer = io.BytesIO()
    np.savez(buffer, **{key: array.numpy() for key, array in arrays.items()})  # type: ignore[arg-type]
    data = buffer.getvalue()
    clean_stale_runs(keep_run=run_id, max_age_hours=max_age_hours, directory=directory)
    for attempt in range(3):
        path = replay_dir(run_id, directory) / f"node-{int(node_id)}.npz"
        try:
            write_private_file(path, data)
            break
        except UnsafePathError:
            raise
        except FileNotFoundError:
            # Another node of the run finished its round and removed the (then empty)
            # folder between replay_dir() and the write: make it again.
            if attempt == 2:
                raise
        except OSError as error:
            raise OSError(
                error.errno,
                f"cannot write this round's starting weights ({len(data)} bytes) to {path}: "
                f"{error.strerror}. Point FEDTAN_STATE_DIR to a folder with room (the default "
                "under XDG_RUNTIME_DIR is a small in-memory file system), or use "
                "replay_store='context' (FEDTAN_REPLAY_STORE=context)",
            ) from error
    return WeightsRef("disk", path=str(path), sha256=hashlib.sha256(data).hexdigest())


def load_weights(ref: Optional[WeightsRef]) -> ArrayRecord:
    """The starting weights kept by :func:`save_weights`.

    Raises
    ------
    ReplayWeightsMissing
        If there are none (``ref`` is ``None``), or they are not in a node-local file with
        the recorded checksum (e.g. the message reached a process on another machine).
    UnsafePathError
        If the node-local file is a symbolic link or not private to this user.
    """
    if ref is None:
        raise ReplayWeightsMissing("the node's state holds no starting weights for this round")
    if ref.arrays is not None:
        return ref.arrays
    path = Path(str(ref.path))
    try:
        data = read_private_file(path)
    except UnsafePathError:
        raise
    except OSError as error:
        raise ReplayWeightsMissing(
            f"the round's starting weights are not in the node-local store ({path}: "
            f"{error.strerror}). If this node's messages can reach processes on other "
            "machines (a multi-machine Ray cluster), use replay_store='context' "
            "(FEDTAN_REPLAY_STORE=context)"
        ) from None
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise ReplayWeightsMissing(f"{path} does not hold this round's starting weights (checksum differs)")
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return ArrayRecord({key: Array(npz[key]) for key in npz.files})


def discard_weights(ref: Optional[WeightsRef]) -> None:
    """Forget the starting weights (the round is over, or a new one begins).

    The node's file is removed, and the run's folder with it when no other node of the
    run holds a file there: after a run's last round nothing is left on the node.
    """
    if ref is not None and ref.path is not None:
        path = Path(ref.path)
        path.unlink(missing_ok=True)
        if path.parent.name.startswith(RUN_PREFIX):
            remove_if_empty(path.parent)
