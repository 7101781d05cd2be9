"""The private folder of the node worker's socket, made and checked by
:mod:`flwr_fedtan.private_files` (mode 0700, owned by this user, no links).

Default: ``<state base>/worker``, the base being ``FEDTAN_STATE_DIR`` or
:func:`~flwr_fedtan.private_files.default_base`; ``FEDTAN_RUNTIME_DIR`` names another
folder (see :mod:`flwr_fedtan.settings`). A socket in a folder another user can write to
could be replaced by theirs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from .. import settings
from ..private_files import private_dir
from ..errors import UnsafePathError

__all__ = ["PrivateFolderError", "private_folder"]

PrivateFolderError = UnsafePathError


def private_folder(path: Optional[Union[str, "os.PathLike[str]"]] = None) -> Path:
    """The worker's private folder (created if needed, every level checked).

    Raises
    ------
    PrivateFolderError
        If it is not a folder, is a link, belongs to another user, or others can open it;
        the message says what to fix.
    """
    folder = Path(path) if path is not None else settings.runtime_dir()
    if folder is None:
        return private_dir("worker", base=settings.state_dir())
    folder = folder if folder.is_absolute() else Path.cwd() / folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    return private_dir(base=folder)
