"""What a long round is doing, in the ServerApp log and in the round's metrics.

No torch here. The server times each exchange (from pushing its messages to the last reply)
and notes the node whose reply came last. :class:`ExchangeProgress` logs one line per
exchange at INFO, at most one every ``interval`` seconds besides the lines a caller forces
(the first and last exchange of a round), and turns the recorded timings into figures for a
summary line and the round's metrics.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from logging import INFO
from typing import Optional

import numpy as np
from flwr.supercore import log

__all__ = ["DEFAULT_PROGRESS_INTERVAL", "ExchangeProgress", "ExchangeTiming", "clock", "describe_bytes"]

DEFAULT_PROGRESS_INTERVAL = 30.0
"""Seconds between two per-exchange progress lines (the first and last exchange of a round
are always logged)."""

NO_NODE = -1
"""``*-slowest-node`` when no exchange was timed."""


def clock() -> float:
    """Seconds on the clock that times exchanges and spaces the progress lines."""
    return time.perf_counter()


@dataclass(frozen=True)
class ExchangeTiming:
    """One exchange: its seconds (push to last reply) and the node whose reply came last
    (``None`` if none came). Replies collected by the same pull arrive together for the
    server: then the last one the Grid returned counts as the slowest."""

    seconds: float
    slowest: Optional[int]


@dataclass
class ExchangeProgress:
    """The progress lines and figures of one round's (or one statistics pass's) exchanges.

    Parameters
    ----------
    title : str
        Starts every line, e.g. ``"FedTAN round 3"``.
    interval : float or None
        At most one per-exchange line every ``interval`` seconds (0: every exchange), besides
        the forced ones; ``None``: no per-exchange line at all.
    """

    title: str
    interval: Optional[float] = DEFAULT_PROGRESS_INTERVAL
    timings: list[ExchangeTiming] = field(default_factory=list)
    _last_line: Optional[float] = field(default=None, init=False, repr=False)

    def record(self, timing: ExchangeTiming, where: str, *, force: bool = False, counted: bool = True) -> None:
        """Log ``timing`` (``where`` describes the exchange) if due or ``force``; keep it
        for the figures unless ``counted`` is false."""
        if counted:
            self.timings.append(timing)
        if self.interval is None:
            return
        now = clock()
        if force or self._last_line is None or now - self._last_line >= self.interval:
            self._last_line = now
            slowest = "none" if timing.slowest is None else timing.slowest
            log(INFO, "%s: exchange %s: %.2f s, slowest node %s", self.title, where, timing.seconds, slowest)

    def median_seconds(self) -> float:
        """Median seconds of the recorded exchanges (0 if none)."""
        return float(np.median([t.seconds for t in self.timings])) if self.timings else 0.0

    def max_seconds(self) -> float:
        """Longest recorded exchange, in seconds (0 if none)."""
        return max((t.seconds for t in self.timings), default=0.0)

    def slowest_node(self) -> tuple[int, int]:
        """The node that replied last in the most recorded exchanges (on a tie: the lower
        id), and in how many; ``(NO_NODE, 0)`` if none."""
        counts = Counter(t.slowest for t in self.timings if t.slowest is not None)
        if not counts:
            return NO_NODE, 0
        node = min(counts, key=lambda n: (-counts[n], n))
        return int(node), counts[node]

    def metrics(self, prefix: str) -> dict:
        """``<prefix>exchange-seconds-median``, ``-max``, ``<prefix>slowest-node`` and
        ``<prefix>slowest-node-exchanges``."""
        node, times = self.slowest_node()
        return {
            f"{prefix}exchange-seconds-median": self.median_seconds(),
            f"{prefix}exchange-seconds-max": self.max_seconds(),
            f"{prefix}slowest-node": node,
            f"{prefix}slowest-node-exchanges": times,
        }

    def describe(self) -> str:
        """The figures in words, for a summary line."""
        if not self.timings:
            return "no exchange timed"
        node, times = self.slowest_node()
        return (f"{self.median_seconds():.2f} s median, {self.max_seconds():.2f} s max per exchange "
                f"(over {len(self.timings)}), slowest node {node} in {times}")


def describe_bytes(count: float) -> str:
    """A byte count for a log line (``"1.25 MB"``)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"
