"""The in-process home of live rounds: a cache keyed by (run, node), bounded by memory.

A live round is a client's round paused inside its synchronised step (a forward paused
in a greenlet, a graph in memory). The message handler of the node's next message
resumes it when it finds it here; otherwise it replays the round from the node's state
(see :mod:`flwr_fedtan.node.session`). This module imports no torch: the entries are opaque
objects with a ``close()`` method, measured by :func:`.footprint.live_bytes`.

The budget
    Each paused round is measured when it pauses (parameters, gradients, optimiser state,
    the paused forward's or backward's tensors and what autograd saved for them). The
    cache keeps rounds while their sum fits the budget (``live_memory``, default half of
    the memory available to the process when it first keeps a round, shared evenly by
    the homes of its machine; ``FEDTAN_LIVE_MEMORY`` overrides it) and, if set, at most
    ``max_live_rounds`` of them. Beyond that it closes the least recently used rounds:
    their nodes' next messages replay them, with the same result, and a warning says so
    once per process with the figures.

Measuring once per position
    Walking a paused round's tensors costs about a millisecond (more for larger models)
    each time a round pauses, that is for every node at every exchange. An entry that
    says what fixes its size (a ``footprint_key()``: for a FedTAN round, the round, the
    sync point reached and the batch size) is measured once per run and key, and the
    nodes paused at the same point on batches of the same size reuse that figure.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable, Optional, Protocol, Union

from .. import settings
from .footprint import describe_bytes, live_bytes, memory_available

__all__ = ["DEFAULT_MAX_LIVE_ROUNDS", "LiveRounds", "live_rounds", "max_live_rounds"]

log = logging.getLogger(__name__)

DEFAULT_MAX_LIVE_ROUNDS = settings.DEFAULT_MAX_LIVE_ROUNDS
Budget = Union[int, float, str, None]
_KNOWN_SIZES = 4096  # footprints kept for reuse; beyond that the table starts over


class _Closable(Protocol):
    def close(self) -> None: ...


def max_live_rounds() -> Optional[int]:
    """The cap by count: ``FEDTAN_MAX_LIVE_ROUNDS`` (an override), else none."""
    return settings.max_live_rounds()


class LiveRounds:
    """Live rounds of one process, least recently used evicted first.

    Parameters
    ----------
    max_rounds : int, optional
        At most how many rounds to keep; ``None`` reads :func:`max_live_rounds` at every
        insert (so a test or an operator can change it without a restart). ``0`` keeps
        none: every message replays.
    budget : int, float or str, optional
        Bytes the paused rounds may hold together, or a fraction of the memory available
        (see :func:`flwr_fedtan.settings.check_live_memory`); ``None`` reads
        ``FEDTAN_LIVE_MEMORY`` at every insert, else the default (half).
    measure : Callable[[object], int], optional
        The size of an entry in bytes; default :func:`.footprint.live_bytes`. An entry with
        a ``footprint_key()`` method is measured once per run and key (see above).

    Attributes
    ----------
    sharers : int
        How many homes share this machine's memory (a fraction budget is divided by it).
    nbytes, peak_bytes : int
        Bytes held now; the most held since the cache was last empty and got a round.
    """

    def __init__(self, max_rounds: Optional[int] = None, budget: Budget = None,
                 measure: Optional[Callable[[Any], int]] = None) -> None:
        self._max_rounds = max_rounds
        self._budget = settings.check_live_memory(budget)
        self._measure = measure or live_bytes
        self._known_sizes: dict[Hashable, int] = {}  # (run, entry's footprint key) -> bytes
        self._entries: "OrderedDict[Hashable, _Closable]" = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self._lock = threading.Lock()
        self._available: Optional[int] = None
        self._warned = False
        self.sharers = 1
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.nbytes = 0
        self.peak_bytes = 0

    @property
    def capacity(self) -> Optional[int]:
        return max_live_rounds() if self._max_rounds is None else max(0, self._max_rounds)

    def budget_bytes(self, budget: Budget = None) -> int:
        """The budget in bytes: ``budget`` (else this cache's, else the setting's), a
        fraction being of the memory available when first asked, divided by :attr:`sharers`."""
        spec = settings.live_memory(budget if budget is not None else self._budget)
        if isinstance(spec, int):
            return spec
        if self._available is None:
            self._available = memory_available()
        return int(spec * self._available / max(1, self.sharers))

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

    def remember(self, key: Hashable, entry: _Closable, capacity: Optional[int] = None,
                 budget: Budget = None) -> None:
        """Keep ``entry`` as the live round of ``key`` (closing any other one it replaces),
        then evict down to ``capacity`` rounds (default: :attr:`capacity`) and ``budget``
        (default: this cache's, see :meth:`budget_bytes`)."""
        evicted = []
        limit = self.capacity if capacity is None else max(0, int(capacity))
        allowed = self.budget_bytes(budget)
        size = self._size(key, entry)
        with self._lock:
            previous = self._entries.get(key)
            if previous is not None and previous is not entry:
                evicted.append(self._pop(key))
            if not self._entries:
                self.peak_bytes = 0  # a new round: its peak starts here
            self._entries[key] = entry
            self._entries.move_to_end(key)
            self.nbytes += size - self._sizes.get(key, 0)
            self._sizes[key] = size
            self.peak_bytes = max(self.peak_bytes, self.nbytes)
            held, count = self.nbytes, len(self._entries)
            while self._entries and ((limit is not None and len(self._entries) > limit) or self.nbytes > allowed):
                evicted.append(self._pop(next(iter(self._entries))))
            self.evictions += len(evicted) - (previous is not None and previous is not entry)
            warn = self.nbytes < held and held > allowed and not self._warned
            self._warned = self._warned or warn
        if warn:
            log.warning("FedTAN live rounds: %d paused rounds hold %s, over this home's budget of %s (the newest "
                        "%s): closing the least recently used; their nodes' next messages replay them (same "
                        "result, more compute). Raise live_memory or FEDTAN_LIVE_MEMORY to keep more (said once)",
                        count, describe_bytes(held), describe_bytes(allowed), describe_bytes(size))
        for old in evicted:
            old.close()

    def _size(self, key: Hashable, entry: _Closable) -> int:
        """``entry``'s bytes: measured, or the figure of an entry of the same run measured at
        the same footprint key."""
        footprint_key = getattr(entry, "footprint_key", None)
        if footprint_key is None:
            return self._measure(entry)
        known = (key[0] if isinstance(key, tuple) and key else key, footprint_key())
        size = self._known_sizes.get(known)
        if size is None:
            size = self._measure(entry)
            with self._lock:
                if len(self._known_sizes) >= _KNOWN_SIZES:
                    self._known_sizes.clear()  # older runs' and rounds' figures
                self._known_sizes[known] = size
        return size

    def _pop(self, key: Hashable) -> _Closable:
        self.nbytes -= self._sizes.pop(key, 0)
        return self._entries.pop(key)

    def forget(self, key: Hashable) -> None:
        """Drop and close the live round of ``key``, if any."""
        with self._lock:
            entry = self._pop(key) if key in self._entries else None
        if entry is not None:
            entry.close()

    def forget_run(self, run_id: int) -> int:
        """Drop every live round of a run (keys ``(run_id, node_id)``); how many."""
        with self._lock:
            keys = [k for k in self._entries if isinstance(k, tuple) and k and k[0] == run_id]
            entries = [self._pop(k) for k in keys]
        for entry in entries:
            entry.close()
        return len(entries)

    def clear(self) -> None:
        """Drop and close every live round."""
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
            self._sizes.clear()
            self.nbytes = 0
        for entry in entries:
            entry.close()

    def stats(self) -> dict[str, Any]:
        """Figures for a home's ``stats``: rounds held, bytes, budget, hits and misses."""
        return {"live": len(self), "live-bytes": self.nbytes, "live-peak-bytes": self.peak_bytes,
                "live-budget-bytes": self.budget_bytes(), "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions}


_PROCESS_LIVE_ROUNDS = LiveRounds()


def live_rounds() -> LiveRounds:
    """This process's live rounds (one cache per process, shared by every ClientApp in it)."""
    return _PROCESS_LIVE_ROUNDS
