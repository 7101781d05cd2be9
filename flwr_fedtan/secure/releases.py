"""Which sums of masked models the server may release after drops: never one that, with the
sums of the same round it could already compute, reveals one client's model.

A round whose masked-model exchange lost a client restarts that exchange with fresh masks for
the survivors. The survivors send the same models again, so the sum over a roster ``A`` and
the sum over a later roster ``B`` differ by exactly the models of ``A - B``: with
``A - B = {d}``, client ``d``'s model in the clear. More generally the server learns every
linear combination of the sums it could compute, and client ``i`` is revealed when the
indicator vector of ``{i}`` lies in the span of the rosters' indicator vectors: the sums
over ``{1, 2, 3, 4}``, ``{1, 2}`` and ``{3, 4}`` reveal nobody, those over ``{1, 2, 3}``,
``{1, 2}`` and ``{2, 3}`` reveal all three clients.

This generalises the rule of secure statistics (a client refuses a restart on samples it
already pooled; the statistics pass is not restarted after releasing a pooled sum) to any
sequence of rosters, and it is exact: a survivors' sum that reveals nobody (e.g. after a
drop before anything was computable) is released.

What counts as computable: a roster is computable as soon as the server holds the masked
payload of *every* member, whether or not it unmasks it (the sum is one addition away). So
the server asks :meth:`ReleaseLedger.check` before reading the last payload of a roster
(including a late payload that would complete an abandoned attempt: if refused, it is
discarded unread) and records the roster with :meth:`ReleaseLedger.record` once complete.
A server that keeps such a late payload anyway (not honest-but-curious) learns the dropped
client's model; so does one that reads a late payload when the exchange's message TTL let
it arrive after the restart's release; see ``docs/security.md``.

Exact rational arithmetic on small integer matrices (the rosters of a round are few).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Collection, Hashable, Iterable, Mapping, Sequence

import numpy as np

from ..errors import MissingPayloadError, SecureStatsError
from .fixed_point import DEFAULT_FRACTIONAL_BITS
from .keys import Roster
from .models import MaskedModel, SecureAverage, unmask_average

__all__ = ["revealed_clients", "ReleaseLedger", "release_average"]


def revealed_clients(rosters: Iterable[Collection[int]]) -> list[int]:
    """The clients whose own model is a linear combination of the sums over ``rosters``.

    Client ``i`` is revealed iff a row of the reduced row echelon form of the rosters'
    indicator matrix is the unit vector of ``i`` (the row space holds that unit vector
    exactly then). Sorted; empty if the sums reveal nobody.
    """
    return sorted(int(c) for c in _revealed_unknowns([frozenset(int(n) for n in r) for r in rosters])
                  if isinstance(c, int))


def _revealed_unknowns(rows: Sequence[frozenset[Hashable]]) -> list[Hashable]:
    """The unknowns (columns) that the sums over ``rows`` determine on their own."""
    unknowns = list(dict.fromkeys(u for row in rows for u in sorted(row, key=repr)))
    column = {u: index for index, u in enumerate(unknowns)}
    matrix = [[Fraction(0)] * len(unknowns) for _ in rows]
    for row, members in zip(matrix, rows):
        for u in members:
            row[column[u]] = Fraction(1)
    reduced = _row_echelon(matrix, len(unknowns))
    return [
        unknowns[nonzero[0]]
        for row in reduced
        if len(nonzero := [index for index, value in enumerate(row) if value != 0]) == 1
    ]


def _row_echelon(matrix: list[list[Fraction]], width: int) -> list[list[Fraction]]:
    """Reduced row echelon form (Gauss-Jordan, exact), zero rows dropped."""
    rows = [list(row) for row in matrix]
    pivot_row = 0
    for col in range(width):
        pivot = next((r for r in range(pivot_row, len(rows)) if rows[r][col] != 0), None)
        if pivot is None:
            continue
        rows[pivot_row], rows[pivot] = rows[pivot], rows[pivot_row]
        lead = rows[pivot_row][col]
        rows[pivot_row] = [value / lead for value in rows[pivot_row]]
        for r in range(len(rows)):
            if r != pivot_row and rows[r][col] != 0:
                factor = rows[r][col]
                rows[r] = [a - factor * b for a, b in zip(rows[r], rows[pivot_row])]
        pivot_row += 1
        if pivot_row == len(rows):
            break
    return rows[:pivot_row]


class ReleaseLedger:
    """The rosters of masked-model sums the server could compute, by round, and the rule
    for the next one.

    Assumes, conservatively, that every client sends the same model in every attempt of a
    round (what a restart of the final exchange does); across rounds the models differ and
    nothing is combined. A client *spoiled* a sum (:meth:`spoil`) when its own payload is
    shown not to be its model masked under the roster (its canary is not the sum of the
    masks it revealed, or it masked under another roster): its term in that sum counts as
    an unknown of its own, so the others' later sum is released. Honest clients stay
    covered; a client that broke the protocol is not (had it spoiled its canary only, the
    difference is its model).
    """

    def __init__(self) -> None:
        self._computable: dict[int, list[tuple[frozenset[int], frozenset[int]]]] = {}

    def computable(self, round: int) -> Sequence[frozenset[int]]:
        """The rosters of ``round`` recorded so far, in order."""
        return tuple(members for members, _ in self._computable.get(int(round), ()))

    def spoiled(self, round: int) -> Sequence[frozenset[int]]:
        """For each roster of :meth:`computable`, the members that spoiled its sum."""
        return tuple(spoiled for _, spoiled in self._computable.get(int(round), ()))

    def _rows(self, round: int) -> list[frozenset[Hashable]]:
        return [frozenset(members - spoiled) | frozenset(("spoiled", index, n) for n in spoiled)
                for index, (members, spoiled) in enumerate(self._computable.get(int(round), ()))]

    def revealed_by(self, round: int, roster: Collection[int]) -> list[int]:
        """The clients that ``roster``'s sum, with the round's computable sums, would reveal."""
        rows = [*self._rows(round), frozenset(int(n) for n in roster)]
        return sorted(int(c) for c in _revealed_unknowns(rows) if isinstance(c, int))

    def check(self, round: int, roster: Collection[int]) -> None:
        """Refuse a sum over ``roster`` that would reveal a client.

        Raises
        ------
        SecureStatsError
            Naming the revealed clients, the roster and the earlier rosters of the round.
        """
        revealed = self.revealed_by(round, roster)
        if revealed:
            earlier = [sorted(r) for r in self.computable(round)]
            raise SecureStatsError(
                f"round {round}: the sum of the masked models of nodes {sorted(int(n) for n in roster)}, with the "
                f"sums of rosters {earlier} of this round, would reveal the model of nodes {revealed}; it is not "
                "released (discard those payloads unread; the round ends without a new global model, or restarts "
                "with a roster that reveals nobody)"
            )

    def record(self, round: int, roster: Collection[int]) -> None:
        """Record that the server holds every payload of ``roster`` (checked first)."""
        self.check(round, roster)
        row = (frozenset(int(n) for n in roster), frozenset[int]())
        known = self._computable.setdefault(int(round), [])
        if row not in known:
            known.append(row)

    def spoil(self, round: int, roster: Collection[int], nodes: Iterable[int]) -> None:
        """Mark ``nodes`` as having spoiled the last recorded sum over ``roster`` (see the class)."""
        members = frozenset(int(n) for n in roster)
        known = self._computable.get(int(round), [])
        for index in range(len(known) - 1, -1, -1):
            if known[index][0] == members:
                known[index] = (members, known[index][1] | (members & frozenset(int(n) for n in nodes)))
                return
        raise ValueError(f"round {round}: no recorded sum over {sorted(members)} to mark as spoiled")

    def forget_before(self, round: int) -> None:
        """Drop the rosters of the rounds before ``round`` (their models are not sent again)."""
        for old in [r for r in self._computable if r < int(round)]:
            del self._computable[old]


def release_average(
    ledger: ReleaseLedger,
    round: int,
    payloads: Mapping[int, MaskedModel],
    roster: Roster,
    reference: Mapping[str, np.ndarray],
    fractional_bits: int = DEFAULT_FRACTIONAL_BITS,
) -> SecureAverage:
    """The server's one call once an attempt's masked models are in: the release rule, then
    :func:`~flwr_fedtan.secure.models.unmask_average`.

    With a member missing nothing is computable and nothing is recorded
    (:class:`MissingPayloadError`: restart with the survivors). With all present, the roster
    is recorded as computable first (the sum is one addition away, even if the canary
    then fails), unless it would reveal a client.

    Raises
    ------
    MissingPayloadError
        Naming the members whose payload is missing.
    SecureStatsError
        The sum, with the round's computable sums, would reveal a client: discard these
        payloads unread.
    PayloadError, CanaryMismatchError, FixedPointOverflowError
        As :func:`~flwr_fedtan.secure.models.unmask_average`.
    """
    missing = [node for node in roster.node_ids if node not in payloads]
    if missing:
        raise MissingPayloadError(
            missing, f"round {round}: no masked model from nodes {missing}; the others' sum stays masked, restart "
            "the exchange with the survivors (fresh masks) if the release rule allows it"
        )
    ledger.record(round, roster.node_ids)
    return unmask_average(payloads, roster, reference, fractional_bits, f"round {round}, masked models")
