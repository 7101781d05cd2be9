"""Private node-local folders and files: this user's only, created without races.

FedTAN keeps node-local state (a round's starting weights for replay, and whatever a
node-local runtime adds, e.g. a worker's socket) on machines that other users may share:
university clusters, shared GPU servers. Everything here is pure standard library and
follows three rules:

- **Folders** are created with mode ``0700``. A folder that already exists is used only if
  it is a real folder (not a symbolic link), owned by this user and not accessible to its
  group or to others; anything else is refused with :class:`UnsafePathError`, whose
  message says what to fix. Nothing is ever ``chmod``-ed or ``chown``-ed into shape: a
  folder someone else prepared is a folder someone else can read or replace.
- **Files** are written to a fresh temporary name opened with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode ``0600`` (a planted file or symbolic link at
  that name makes the open fail instead of being followed), then renamed over the final
  name in one atomic step: a concurrent reader sees the old file or the new one, never
  half a file, and a symbolic link planted at the final name is replaced, not followed.
- **Cleaning**: :func:`remove_if_empty` removes a run's folder once its last file is gone;
  :func:`remove_stale` removes folders left by runs that ended abnormally (a process
  killed mid-round) once nothing in them has changed for a given age.

The base folder (:func:`default_base`) is ``$XDG_RUNTIME_DIR/flwr-fedtan`` when
``XDG_RUNTIME_DIR`` names a folder of this user (systemd's per-user ``/run/user/<uid>``:
private, in memory, emptied at logout), else ``<tempdir>/flwr-fedtan-<uid>``. Callers may
pass any other base, e.g. a configured one.

Ownership and mode checks apply on POSIX systems; elsewhere (Windows) the folders are
created in the user's own temporary folder and only the atomic replacement applies.

Examples
--------
>>> folder = private_dir("replay", "run-7")            # doctest: +SKIP
>>> write_private_file(folder / "node-3.npz", data)    # doctest: +SKIP
>>> read_private_file(folder / "node-3.npz") == data   # doctest: +SKIP
True
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional, Union

from .errors import UnsafePathError

__all__ = [
    "default_base",
    "private_dir",
    "write_private_file",
    "read_private_file",
    "remove_if_empty",
    "remove_stale",
]

PathLike = Union[str, "os.PathLike[str]"]

_POSIX = os.name == "posix" and hasattr(os, "geteuid")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)
_PARTIAL_SUFFIX = ".partial"


def _uid() -> Union[int, str]:
    return os.geteuid() if _POSIX else "user"


def default_base() -> Path:
    """The per-user base folder for FedTAN's private node-local state.

    ``$XDG_RUNTIME_DIR/flwr-fedtan`` when ``XDG_RUNTIME_DIR`` is set and names an existing
    folder owned by this user (it is not, e.g., after ``su`` or ``sudo -E``, which keep the
    other user's variable), else ``<tempdir>/flwr-fedtan-<uid>`` (``tempfile.gettempdir()``,
    i.e. ``TMPDIR`` or ``/tmp``). The folder itself is not created here: see
    :func:`private_dir`.

    ``XDG_RUNTIME_DIR`` is read here because it is the platform's convention for the
    default, not a FedTAN setting; FedTAN's own override (``FEDTAN_STATE_DIR``) is passed
    in by the caller as ``base``.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        try:
            info = os.stat(runtime)
        except OSError:
            info = None
        if info is not None and stat.S_ISDIR(info.st_mode) and (not _POSIX or info.st_uid == os.geteuid()):
            return Path(runtime) / "flwr-fedtan"
    return Path(tempfile.gettempdir()) / f"flwr-fedtan-{_uid()}"


def _fix_hint(path: Path) -> str:
    return (
        f"Remove {path} (as its owner or root) and let FedTAN create it again, or point "
        "FEDTAN_STATE_DIR to a folder of your own"
    )


def _check_parent(folder: Path) -> None:
    """The folder that holds the base must not let others rename or replace the base:
    owned by this user or root, and not writable by group/others unless sticky (like /tmp)."""
    parent = folder.parent
    try:
        info = os.stat(parent)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"cannot create FedTAN's private folder {folder}: {parent} does not exist. "
            "Create it, or point FEDTAN_STATE_DIR to a folder of your own"
        ) from None
    if info.st_uid not in (os.geteuid(), 0):
        raise UnsafePathError(
            f"{parent}, which holds FedTAN's private folder {folder}, is owned by uid "
            f"{info.st_uid}, neither this user (uid {os.geteuid()}) nor root: its owner could "
            "replace the folder. Point FEDTAN_STATE_DIR to a folder of your own"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        raise UnsafePathError(
            f"{parent}, which holds FedTAN's private folder {folder}, is writable by other "
            f"users (mode {stat.S_IMODE(info.st_mode):04o}) without the sticky bit: they could "
            f"rename the folder and put their own in its place. Run `chmod +t {parent}` or "
            "point FEDTAN_STATE_DIR to a folder of your own"
        )


def _ensure_private_folder(folder: Path, create: bool = True) -> None:
    """Create ``folder`` with mode 0700 (if ``create``), or verify the one that is there."""
    if create:
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
    if not _POSIX:
        if not os.path.lexists(folder):
            raise FileNotFoundError(f"{folder} does not exist")
        if not folder.is_dir():
            raise UnsafePathError(f"{folder} exists and is not a folder. {_fix_hint(folder)}")
        return
    info = os.lstat(folder)
    if stat.S_ISLNK(info.st_mode):
        raise UnsafePathError(
            f"{folder} is a symbolic link, not a folder: FedTAN does not follow links for its "
            f"private files. {_fix_hint(folder)}"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePathError(f"{folder} exists and is not a folder. {_fix_hint(folder)}")
    if info.st_uid != os.geteuid():
        raise UnsafePathError(
            f"{folder} is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()}): "
            "another user may have created it to read or replace this node's files. "
            f"{_fix_hint(folder)}"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise UnsafePathError(
            f"{folder} is accessible to its group or to others (mode {mode:04o}), and FedTAN "
            f"keeps model weights there. Run `chmod 700 {folder}`, or remove it and let FedTAN "
            "create it again, or point FEDTAN_STATE_DIR to a folder of your own"
        )


def private_dir(*parts: str, base: Optional[PathLike] = None) -> Path:
    """A folder private to this user, created (mode 0700) or verified level by level.

    Parameters
    ----------
    *parts : str
        Names of the nested folders under ``base``, e.g. ``("replay", "run-7")``; each a
        single path component (no ``/``, not ``.`` or ``..``).
    base : path-like, optional (default: :func:`default_base`)
        The base folder. It is created if missing (its parent must exist); the folder that
        holds it must not let other users replace it (owned by this user or root, and not
        writable by others unless it has the sticky bit, like ``/tmp``).

    Returns
    -------
    Path
        ``base / parts[0] / ... / parts[-1]``, every level a real folder owned by this user
        and not accessible to group or others.

    Raises
    ------
    UnsafePathError
        If any level exists but is a symbolic link, not a folder, owned by another user or
        accessible to group/others, or if the folder holding ``base`` lets other users
        replace it; the message says what to fix.
    FileNotFoundError
        If the folder that should hold ``base`` does not exist.
    """
    folder = Path(base) if base is not None else default_base()
    if not folder.is_absolute():
        folder = Path.cwd() / folder
    if _POSIX:
        _check_parent(folder)
    _ensure_private_folder(folder)
    for part in parts:
        if not part or part in (".", "..") or "/" in part or os.sep in part:
            raise ValueError(f"private_dir parts must be single folder names, got {part!r}")
        folder = folder / part
        _ensure_private_folder(folder)
    return folder


def _partial_name(final: Path) -> Path:
    """A fresh temporary name next to ``final`` (a module function so tests can pin it)."""
    return final.with_name(f".{final.name}.{secrets.token_hex(8)}{_PARTIAL_SUFFIX}")


def write_private_file(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600), replacing any previous file atomically.

    The data goes to a fresh name in the same folder, opened with
    ``O_CREAT | O_EXCL | O_NOFOLLOW``, which is then renamed over ``path``. Call it on a
    path inside a folder from :func:`private_dir`.

    Raises
    ------
    UnsafePathError
        If the folder of ``path`` is not private to this user.
    OSError
        If the file cannot be written (e.g. the disk is full); no partial file is left.
    """
    path = Path(path)
    _ensure_private_folder(path.parent, create=False)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC | _BINARY
    for _ in range(16):
        partial = _partial_name(path)
        try:
            fd = os.open(partial, flags, 0o600)
            break
        except FileExistsError:  # taken (by a planted file or link): never reuse it
            continue
    else:
        raise FileExistsError(f"no free temporary name next to {path} after 16 attempts")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(partial, path)
    except BaseException:
        try:
            os.unlink(partial)
        except OSError:
            pass
        raise


def read_private_file(path: PathLike) -> bytes:
    """The bytes of a file written by :func:`write_private_file`.

    Opened with ``O_NOFOLLOW`` and checked on the open file: a regular file owned by this
    user and not accessible to group or others.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    UnsafePathError
        If ``path`` is a symbolic link, not a regular file, or not private to this user.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _BINARY)
    except OSError:
        if _NOFOLLOW and os.path.islink(path):
            raise UnsafePathError(f"{path} is a symbolic link; FedTAN does not follow links") from None
        raise
    with os.fdopen(fd, "rb") as file:
        if _POSIX:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise UnsafePathError(f"{path} is not a regular file")
            if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
                raise UnsafePathError(
                    f"{path} is not private to this user (owner uid {info.st_uid}, mode "
                    f"{stat.S_IMODE(info.st_mode):04o}); FedTAN writes its files 0600. Remove it"
                )
        return file.read()


def remove_if_empty(folder: PathLike) -> bool:
    """Remove ``folder`` if it is empty; ``True`` if it was removed.

    A folder that is missing or still holds files (another node's, say) is left alone.
    """
    try:
        os.rmdir(folder)
    except OSError:
        return False
    return True


def _last_change(entry: os.DirEntry) -> float:
    newest = entry.stat(follow_symlinks=False).st_mtime
    try:
        with os.scandir(entry.path) as children:
            for child in children:
                try:
                    newest = max(newest, child.stat(follow_symlinks=False).st_mtime)
                except FileNotFoundError:
                    continue
    except (FileNotFoundError, NotADirectoryError):
        pass
    return newest


def remove_stale(
    folder: PathLike, prefix: str, max_age_seconds: float, keep: Iterable[str] = ()
) -> list[Path]:
    """Remove the sub-folders of ``folder`` named ``prefix*`` left untouched for too long.

    A sub-folder is stale when neither it nor anything directly in it was modified during
    the last ``max_age_seconds``. Symbolic links and files are never touched, nor the
    names in ``keep``. A missing ``folder`` is not an error.

    Returns
    -------
    list[Path]
        The folders removed.
    """
    removed: list[Path] = []
    now = time.time()
    keep = set(keep)
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix) or entry.name in keep:
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or now - _last_change(entry) <= max_age_seconds:
                continue
        except FileNotFoundError:  # removed meanwhile by another process
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if not os.path.lexists(entry.path):
            removed.append(Path(entry.path))
    return removed
