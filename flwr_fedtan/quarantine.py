"""Repeat offenders on the server: nodes that failed rounds in a row sit out a while.

No torch here. A node dropped in ``after`` consecutive rounds sits out the next round; each
further consecutive failure doubles its time out (1, 2, 4, ... rounds, at most
``max_rounds``), and one round completed without a drop clears its record. A round in which
no client got through charges nobody.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Iterable, Optional

from flwr.supercore import log

__all__ = ["FailureRecord", "Quarantine"]


@dataclass
class FailureRecord:
    """A node's run of consecutive failed rounds and when it may train again."""

    consecutive: int = 0
    benched_through: int = 0
    reason: str = ""


@dataclass
class Quarantine:
    """The failure records of every node that failed its last round(s)."""

    after: Optional[int] = 2  # None: never bench a node
    max_rounds: int = 8
    failures: dict[int, FailureRecord] = field(default_factory=dict)

    def benched(self, node: int, server_round: int) -> bool:
        """Whether ``node`` sits out ``server_round`` (logged if it does)."""
        record = self.failures.get(node)
        if record is None or record.benched_through < server_round:
            return False
        log(INFO, "FedTAN round %d: node %s sits out (failed %d rounds in a row, last: %s); back in round %d",
            server_round, node, record.consecutive, record.reason, record.benched_through + 1)
        return True

    def update(self, server_round: int, nodes: Iterable[int], dropped: dict[int, str], completed: bool) -> None:
        """Record the round's outcome for ``nodes`` (those it started with): a node in
        ``dropped`` failed it, the others cleared their record. Nothing is recorded when no
        client got through (not ``completed``): not evidence against any one node."""
        if not completed:
            return
        for node in nodes:
            reason = dropped.get(node)
            if reason is None:
                self.failures.pop(node, None)
                continue
            record = self.failures.setdefault(node, FailureRecord())
            record.consecutive += 1
            record.reason = reason
            if self.after is not None and record.consecutive >= self.after:
                rounds = min(2 ** (record.consecutive - self.after), self.max_rounds)
                record.benched_through = server_round + rounds
                log(WARNING, "FedTAN: node %s failed %d rounds in a row: it sits out rounds %d-%d",
                    node, record.consecutive, server_round + 1, record.benched_through)
