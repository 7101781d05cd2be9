"""A folder only this user can open, for the node worker's socket.

``$XDG_RUNTIME_DIR/flwr-fedtan`` when the session has one (a per-user tmpfs), else
``<tempdir>/flwr-fedtan-<uid>``; ``FEDTAN_RUNTIME_DIR`` overrides both. The folder is
created with mode 0700, and an existing one is used only if this user owns it and no one
else can enter it: a socket in a folder another user can write to could be replaced by
theirs.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

__all__ = ["PrivateFolderError", "private_folder"]


class PrivateFolderError(RuntimeError):
    """The folder exists but is not private to this user."""


def _default_folder() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "flwr-fedtan"
    return Path(tempfile.gettempdir()) / f"flwr-fedtan-{os.getuid()}"


def private_folder(path: "str | os.PathLike[str] | None" = None) -> Path:
    """The private folder (created if needed), checked: owned by this user, mode 0700.

    Raises
    ------
    PrivateFolderError
        If it is not a folder, belongs to another user, or others can open it.
    """
    folder = Path(path or os.environ.get("FEDTAN_RUNTIME_DIR") or _default_folder())
    try:
        folder.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise PrivateFolderError(f"{folder} is not a folder (a symlink or a file?); remove it or set "
                                 "FEDTAN_RUNTIME_DIR to a private folder")
    if info.st_uid != os.getuid():
        raise PrivateFolderError(f"{folder} belongs to uid {info.st_uid}, not to this user ({os.getuid()}); "
                                 "set FEDTAN_RUNTIME_DIR to a folder of your own")
    if info.st_mode & 0o077:
        raise PrivateFolderError(f"{folder} has mode {stat.S_IMODE(info.st_mode):o}: others can open it; "
                                 f"run `chmod 700 {folder}` or set FEDTAN_RUNTIME_DIR")
    return folder
