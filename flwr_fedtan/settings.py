"""The one place where flwr-fedtan reads environment variables.

Every option is an argument with a documented default (``fedtan_client_app(client_fn,
replay_store=..., state_dir=..., live_memory=...)`` and the same on
:func:`~flwr_fedtan.add_fedtan`). An environment variable, when set to a non-empty value,
**overrides** the argument: an operator can change a deployed app's behaviour (a Ray
cluster's workers, a SuperNode's machine) without editing its code. When an override
replaces an argument given explicitly with a different value, a warning says so once.

==============================  =======================================  ==========================================
variable                        overrides                                default without either
==============================  =======================================  ==========================================
``FEDTAN_REPLAY_STORE``         ``replay_store`` (``disk``/``context``)  ``"disk"``
``FEDTAN_STATE_DIR``            ``state_dir``                            ``$XDG_RUNTIME_DIR/flwr-fedtan``, else
                                                                         ``<tempdir>/flwr-fedtan-<uid>``
``FEDTAN_LIVE_MEMORY``          ``live_memory``                          ``"50%"`` of the memory available
                                                                         to a home, shared by the homes of
                                                                         its machine (see :mod:`.runtime.live`)
``FEDTAN_MAX_LIVE_ROUNDS``      ``max_live_rounds``                      none (no cap by count)
``FEDTAN_STATE_MAX_AGE_HOURS``  the replay store's ``max_age_hours``     ``24`` (hours before a run's replay folder
                                                                         counts as left behind)
``FEDTAN_LIVE_HOME``            ``live_home``                            ``"auto"`` (see :mod:`flwr_fedtan.runtime`)
``FEDTAN_RUNTIME_DIR``          the node worker's socket folder          ``<state dir>/worker``
``FEDTAN_NODE_WORKER_SOCKET``   the node worker's socket path            one per node and app in that folder
``FEDTAN_WORKER_IDLE_TIMEOUT``  the node worker's idle timeout           ``600`` seconds
``FEDTAN_RAY_HOMES``            the number of Ray home actors            one per ClientAppActor
==============================  =======================================  ==========================================

The values are read when a message is handled, not when the app is built, so they are
those of the process that handles it (a Ray actor inherits the SuperLink's environment).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Union

__all__ = [
    "DEFAULT_LIVE_MEMORY",
    "DEFAULT_MAX_LIVE_ROUNDS",
    "LIVE_MEMORY_ENV",
    "DEFAULT_REPLAY_STORE",
    "DEFAULT_STATE_MAX_AGE_HOURS",
    "MAX_LIVE_ROUNDS_ENV",
    "REPLAY_STORES",
    "REPLAY_STORE_ENV",
    "STATE_DIR_ENV",
    "STATE_MAX_AGE_ENV",
    "check_live_home",
    "check_live_memory",
    "check_max_live_rounds",
    "check_replay_store",
    "default_state_dir",
    "live_home",
    "live_memory",
    "max_live_rounds",
    "ray_homes",
    "runtime_dir",
    "worker_idle_timeout",
    "worker_socket",
    "replay_store",
    "state_dir",
    "state_max_age_hours",
]

log = logging.getLogger(__name__)

REPLAY_STORE_ENV = "FEDTAN_REPLAY_STORE"
STATE_DIR_ENV = "FEDTAN_STATE_DIR"
MAX_LIVE_ROUNDS_ENV = "FEDTAN_MAX_LIVE_ROUNDS"
STATE_MAX_AGE_ENV = "FEDTAN_STATE_MAX_AGE_HOURS"
LIVE_HOME_ENV = "FEDTAN_LIVE_HOME"
RUNTIME_DIR_ENV = "FEDTAN_RUNTIME_DIR"
WORKER_SOCKET_ENV = "FEDTAN_NODE_WORKER_SOCKET"
WORKER_IDLE_ENV = "FEDTAN_WORKER_IDLE_TIMEOUT"
RAY_HOMES_ENV = "FEDTAN_RAY_HOMES"
LIVE_MEMORY_ENV = "FEDTAN_LIVE_MEMORY"

LIVE_HOMES = ("auto", "process", "ray", "worker")

REPLAY_STORES = ("disk", "context")
DEFAULT_REPLAY_STORE = "disk"
DEFAULT_MAX_LIVE_ROUNDS: Optional[int] = None  # no cap by count: the memory budget bounds the cache
DEFAULT_LIVE_MEMORY = 0.5  # a fraction of the memory available, shared by the homes of a machine
_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}
DEFAULT_STATE_MAX_AGE_HOURS = 24.0

_warned: set[tuple[str, str, str]] = set()


def _override(variable: str, argument: object) -> Optional[str]:
    """The variable's value if set and non-empty (warning once if it replaces a different
    explicit argument), else ``None``."""
    value = os.environ.get(variable, "").strip()
    if not value:
        return None
    if argument is not None and str(argument) != value and (variable, value, str(argument)) not in _warned:
        _warned.add((variable, value, str(argument)))
        log.warning("%s=%s overrides the argument %r given in the code", variable, value, argument)
    return value


def check_replay_store(store: Optional[str], source: str = "replay_store") -> Optional[str]:
    """``store`` if it is ``None`` or one of :data:`REPLAY_STORES`, else ``ValueError``."""
    if store is not None and store not in REPLAY_STORES:
        raise ValueError(f"{source} must be one of {REPLAY_STORES}, got {store!r}")
    return store


def check_max_live_rounds(limit: Union[int, float, str, None], source: str = "max_live_rounds") -> Optional[int]:
    """``limit`` if it is ``None`` or an integer >= 0, else ``ValueError``."""
    if limit is None:
        return None
    try:
        value = int(limit)
    except (TypeError, ValueError):
        raise ValueError(f"{source} must be an integer >= 0, got {limit!r}") from None
    if value < 0 or (isinstance(limit, float) and not limit.is_integer()):
        raise ValueError(f"{source} must be an integer >= 0, got {limit!r}")
    return value


def replay_store(argument: Optional[str] = None) -> str:
    """Where a round's starting weights are kept: ``FEDTAN_REPLAY_STORE``, else
    ``argument``, else ``"disk"``."""
    check_replay_store(argument)
    value = _override(REPLAY_STORE_ENV, argument)
    if value is not None:
        return check_replay_store(value, source=REPLAY_STORE_ENV)  # type: ignore[return-value]
    return argument or DEFAULT_REPLAY_STORE


def default_state_dir() -> Path:
    """Node-local, private to this user: :func:`flwr_fedtan.private_files.default_base`."""
    from .private_files import default_base

    return default_base()


def state_dir(argument: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The folder of node-local replay files: ``FEDTAN_STATE_DIR``, else ``argument``,
    else :func:`default_state_dir`."""
    value = _override(STATE_DIR_ENV, None if argument is None else os.fspath(argument))
    if value is not None:
        return Path(value)
    return Path(argument) if argument is not None else default_state_dir()


def max_live_rounds(argument: Optional[int] = None) -> Optional[int]:
    """At most how many paused rounds a process keeps in memory, a hard cap on top of the
    memory budget: ``FEDTAN_MAX_LIVE_ROUNDS``, else ``argument``, else ``None`` (no cap).
    ``0`` keeps none (every message replays)."""
    check_max_live_rounds(argument)
    value = _override(MAX_LIVE_ROUNDS_ENV, argument)
    if value is not None:
        return check_max_live_rounds(value, source=MAX_LIVE_ROUNDS_ENV)
    return DEFAULT_MAX_LIVE_ROUNDS if argument is None else int(argument)


def check_live_memory(budget: Union[int, float, str, None], source: str = "live_memory") -> Union[int, float, None]:
    """``budget`` as bytes (an ``int``) or a fraction of the memory available (a ``float``
    in (0, 1]); ``None`` stays ``None``. Accepted: an int (bytes), a float fraction, or a
    string: ``"2GB"``, ``"512MiB"``, ``"1500000"`` (bytes), ``"25%"`` or ``"0.25"``
    (fractions). Else ``ValueError``."""
    if budget is None:
        return None
    if isinstance(budget, bool):
        pass
    elif isinstance(budget, int):
        if budget >= 0:
            return budget
    elif isinstance(budget, float):
        if 0 < budget <= 1:
            return budget
    elif isinstance(budget, str):
        text = budget.strip().lower().replace(" ", "")
        try:
            if text.endswith("%"):
                return check_live_memory(float(text[:-1]) / 100, source)
            number = text.rstrip("kmgtib")
            unit = text[len(number):].removesuffix("b")
            if unit in _UNITS and (unit or text.isdigit()):
                return check_live_memory(int(float(number) * _UNITS[unit]), source)
            if not unit and "." in number:
                return check_live_memory(float(number), source)
        except ValueError:
            pass
    raise ValueError(f"{source} must be bytes (an integer >= 0, or e.g. '2GB', '512MiB') or a fraction of the "
                     f"memory available (a float in (0, 1], or e.g. '25%'), got {budget!r}")


def live_memory(argument: Union[int, float, str, None] = None) -> Union[int, float]:
    """The memory budget of a home's paused rounds: ``FEDTAN_LIVE_MEMORY``, else
    ``argument``, else ``0.5``; bytes (``int``) or a fraction of the memory available
    (``float``, see :func:`check_live_memory`)."""
    checked = check_live_memory(argument)
    value = _override(LIVE_MEMORY_ENV, argument)
    if value is not None:
        checked = check_live_memory(value, source=LIVE_MEMORY_ENV)
    return DEFAULT_LIVE_MEMORY if checked is None else checked


def state_max_age_hours(argument: Optional[float] = None) -> float:
    """Hours after which a run's replay folder counts as left behind:
    ``FEDTAN_STATE_MAX_AGE_HOURS``, else ``argument``, else 24."""
    value = _override(STATE_MAX_AGE_ENV, argument)
    if value is not None:
        try:
            hours = float(value)
        except ValueError:
            raise ValueError(f"{STATE_MAX_AGE_ENV} must be a number of hours, got {value!r}") from None
    else:
        hours = DEFAULT_STATE_MAX_AGE_HOURS if argument is None else argument
    if not hours > 0:
        raise ValueError(f"the age of a stale run folder must be positive hours, got {hours!r}")
    return float(hours)


def check_live_home(home: Optional[str], source: str = "live_home") -> Optional[str]:
    """``home`` if it is ``None`` or one of :data:`LIVE_HOMES`, else ``ValueError``."""
    if home is not None and home not in LIVE_HOMES:
        raise ValueError(f"{source} must be one of {LIVE_HOMES}, got {home!r}")
    return home


def live_home(argument: Optional[str] = None) -> str:
    """Where a node's live rounds are kept: ``FEDTAN_LIVE_HOME``, else ``argument``, else
    ``"auto"``."""
    check_live_home(argument)
    value = _override(LIVE_HOME_ENV, argument)
    if value is not None:
        return check_live_home(value, source=LIVE_HOME_ENV)  # type: ignore[return-value]
    return argument or "auto"


def runtime_dir() -> Optional[Path]:
    """``FEDTAN_RUNTIME_DIR`` (the node worker's socket folder), if set."""
    value = _override(RUNTIME_DIR_ENV, None)
    return Path(value) if value is not None else None


def worker_socket() -> Optional[Path]:
    """``FEDTAN_NODE_WORKER_SOCKET`` (an operator-chosen socket path), if set."""
    value = _override(WORKER_SOCKET_ENV, None)
    return Path(value) if value is not None else None


def worker_idle_timeout(default: float) -> float:
    """Seconds a node worker waits for a message before it exits:
    ``FEDTAN_WORKER_IDLE_TIMEOUT``, else ``default``."""
    value = _override(WORKER_IDLE_ENV, None)
    if value is None:
        return float(default)
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{WORKER_IDLE_ENV} must be a number of seconds, got {value!r}") from None
    if not seconds >= 0:  # 0: never (as the worker's --idle-timeout)
        raise ValueError(f"{WORKER_IDLE_ENV} must be a number of seconds >= 0 (0: never), got {value!r}")
    return seconds


def ray_homes() -> Optional[int]:
    """``FEDTAN_RAY_HOMES`` (how many Ray home actors), if set."""
    value = _override(RAY_HOMES_ENV, None)
    if value is None:
        return None
    try:
        return max(1, int(value))
    except ValueError:
        raise ValueError(f"{RAY_HOMES_ENV} must be an integer, got {value!r}") from None
