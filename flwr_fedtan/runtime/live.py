"""The in-process home of live rounds: a bounded LRU cache keyed by (run, node).

A live round is a client's round paused inside its synchronised step (a forward paused
in a greenlet, a graph in memory). The message handler of the node's next message
resumes it when it finds it here; otherwise it replays the round from the node's state
(see :mod:`flwr_fedtan.node.session`). This module imports no torch: the entries are opaque
objects with a ``close()`` method.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable, Optional, Protocol

from .. import settings

__all__ = ["DEFAULT_MAX_LIVE_ROUNDS", "LiveRounds", "live_rounds", "max_live_rounds"]

DEFAULT_MAX_LIVE_ROUNDS = settings.DEFAULT_MAX_LIVE_ROUNDS


class _Closable(Protocol):
    def close(self) -> None: ...


def max_live_rounds() -> int:
    """The cache bound: ``FEDTAN_MAX_LIVE_ROUNDS`` (an override), else 16."""
    return settings.max_live_rounds()


class LiveRounds:
    """Live rounds of one process, least recently used evicted first.

    Parameters
    ----------
    max_rounds : int, optional
        How many rounds to keep; ``None`` reads :func:`max_live_rounds` at every insert
        (so a test or an operator can change it without a restart). ``0`` keeps none:
        every message replays.

    Notes
    -----
    Each round holds a forward graph (activations of one batch): the bound is what caps
    the memory of a process that serves many simulated nodes. An evicted round is closed
    and its node's next message replays it.
    """

    def __init__(self, max_rounds: Optional[int] = None) -> None:
        self._max_rounds = max_rounds
        self._entries: "OrderedDict[Hashable, _Closable]" = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def capacity(self) -> int:
        return max_live_rounds() if self._max_rounds is None else max(0, self._max_rounds)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable) -> Optional[_Closable]:
        """The live round of ``key`` (counted as a hit or a miss), or ``None``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
            else:
                self.hits += 1
                self._entries.move_to_end(key)
            return entry

    def remember(self, key: Hashable, entry: _Closable, capacity: Optional[int] = None) -> None:
        """Keep ``entry`` as the live round of ``key`` (closing any other one it replaces),
        then evict down to ``capacity`` (default: :attr:`capacity`)."""
        evicted = []
        limit = self.capacity if capacity is None else max(0, int(capacity))
        with self._lock:
            previous = self._entries.get(key)
            if previous is not None and previous is not entry:
                evicted.append(self._entries.pop(key))
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > limit:
                evicted.append(self._entries.popitem(last=False)[1])
        for old in evicted:
            old.close()

    def forget(self, key: Hashable) -> None:
        """Drop and close the live round of ``key``, if any."""
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is not None:
            entry.close()

    def forget_run(self, run_id: int) -> int:
        """Drop every live round of a run (keys ``(run_id, node_id)``); how many."""
        with self._lock:
            keys = [k for k in self._entries if isinstance(k, tuple) and k and k[0] == run_id]
            entries = [self._entries.pop(k) for k in keys]
        for entry in entries:
            entry.close()
        return len(entries)

    def clear(self) -> None:
        """Drop and close every live round."""
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            entry.close()


_PROCESS_LIVE_ROUNDS = LiveRounds()


def live_rounds() -> LiveRounds:
    """This process's live rounds (one cache per process, shared by every ClientApp in it)."""
    return _PROCESS_LIVE_ROUNDS
