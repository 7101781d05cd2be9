"""The server's side of secure models in a round: the masked final models in, the released
weighted average out (:func:`release_round_average`, :func:`release_final`), or a restart of
the final exchange alone without the clients at fault (:class:`FinalRestart`, then
:func:`remask`).

No torch here. Called by :class:`~flwr_fedtan.protocol.driver.RoundDriver` once the clients
of an attempt (or of a re-mask) replied to the final exchange with their masked models
(:mod:`flwr_fedtan.secure.models`). The arithmetic and the release rule are
:func:`~flwr_fedtan.secure.releases.release_average`'s; this module records which sums the
server could compute, names the clients it can (a malformed payload, a weight that is not
the one it synchronised with, a canary that blame traces to it) and turns the rest into a
re-mask with fresh keys, or into a round that ends without a new model when releasing would
reveal a client.
"""

from __future__ import annotations

import time
from logging import WARNING
from typing import Any, Callable, Mapping, Optional, cast

import numpy as np
from flwr.app import Message
from flwr.supercore import log

from ..errors import CanaryMismatchError, FixedPointOverflowError, PayloadError, SecureStatsError
from ..secure import Roster, ServerSession
from ..secure.models import MaskedModel, ModelLayout, SecureAverage
from ..secure.releases import ReleaseLedger, release_average
from . import wire
from .exchange import ExchangeResult, Exchanges, Restart
from .round_ledger import TrainRound

__all__ = ["FinalRestart", "release_final", "release_round_average", "remask", "sorted_reference",
           "unless_final_exchange"]

_WEIGHT_TOLERANCE = 1e-9  # relative: the decoded total weight against the sum of the clear weights

Blame = Callable[[Mapping[int, MaskedModel]], Mapping[int, str]]
"""Asks the clients for their model canary's pair masks; returns the clients at fault, with why."""

RosterBlame = Callable[[Exchanges, Roster, Mapping[int, Any]], Mapping[int, str]]
"""The same, on the round's exchanges and for a roster (the driver's)."""


class FinalRestart(Restart):
    """The final exchange failed after the clients trained: the survivors keep their final
    models, and only the final exchange restarts (fresh keys, then a re-mask).
    ``synchronised`` is each client's synchronised examples, for the re-mask's weight check."""

    def __init__(self, synchronised: Optional[dict[int, int]] = None) -> None:
        super().__init__()
        self.synchronised: dict[int, int] = dict(synchronised or {})


def sorted_reference(reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The global model in sorted key order: the layout both sides mask and unmask in."""
    return {key: reference[key] for key in sorted(reference)}


def release_round_average(
    releases: ReleaseLedger,
    round_: TrainRound,
    statuses: dict[int, wire.DoneStatus],
    roster: Roster,
    *,
    weighted_by_key: str,
    synchronised: Optional[dict[int, int]],
    blame: Optional[Blame] = None,
) -> Optional[SecureAverage]:
    """The weighted average of the roster's masked models, or ``None`` if releasing it would
    reveal a client's model (the round then ends without a new global model, logged).

    ``statuses`` are the ``done`` replies of the roster's members (a member without one has
    been dropped by the exchange). Once the server holds a well-formed payload of every
    member, the roster is recorded as computable in ``releases``, before any other check
    (the sum is one addition away). ``synchronised`` (each client's synchronised examples),
    if given, must equal each client's clear weight (``client_weight="synchronised"``).
    A client whose payload or weight is at fault is dropped and the final exchange restarts
    (:class:`FinalRestart`); so does a sum whose masks do not cancel (``blame`` names the
    clients whose canary does not add up: they are dropped and their term of the recorded
    sum marked spoiled) or whose total weight is not the sum of the clear weights (no
    client can be named: the same clients re-mask under fresh keys).
    """
    ledger, server_round = round_.ledger, round_.server_round
    reference = sorted_reference(round_.reference)
    length = ModelLayout.of(reference).length
    payloads: dict[int, MaskedModel] = {}
    for node, status in statuses.items():
        try:
            payloads[node] = MaskedModel.from_arrays(node, {k: v.numpy() for k, v in status.arrays.items()}, length)
        except PayloadError as error:
            ledger.drop(node, f"masked model rejected: {error}")
    if all(node in payloads for node in roster.node_ids):
        try:
            releases.record(server_round, roster.node_ids)
        except SecureStatsError as error:  # the release rule: these payloads are discarded unread
            log(WARNING, "Round %d: %s", server_round, error)
            return None
    for node, status in statuses.items():
        reported = _weight(status, weighted_by_key)
        if synchronised is not None and reported != float(synchronised.get(node, 0)):
            ledger.drop(node, f"reports '{weighted_by_key}' = {reported:g} but synchronised with "
                              f"{synchronised.get(node, 0)} examples; if your clients weigh by something else, "
                              "use FedTAN(client_weight='reported')")
    if any(node in ledger.dropped or node not in payloads for node in roster.node_ids):
        raise FinalRestart()
    try:
        average = release_average(releases, server_round, payloads, roster, reference)
    except PayloadError as error:
        node = cast(int, error.client)
        releases.spoil(server_round, roster.node_ids, [node])
        ledger.drop(node, f"masked model rejected: {error}")
        raise FinalRestart() from None
    except CanaryMismatchError as error:
        log(WARNING, "Round %d: secure models failed: %s", server_round, error)
        blamed = dict(blame(payloads)) if blame is not None else {}
        if blamed:
            releases.spoil(server_round, roster.node_ids, blamed)
        for node, why in blamed.items():
            ledger.drop(node, f"its masked model's canary did not cancel: {why}")
        raise FinalRestart() from None
    except FixedPointOverflowError as error:
        log(WARNING, "Round %d: secure models failed, re-masking with fresh keys: %s", server_round, error)
        raise FinalRestart() from None
    except SecureStatsError as error:  # the release rule: these payloads are discarded unread
        log(WARNING, "Round %d: %s", server_round, error)
        return None
    total = sum(_weight(s, weighted_by_key) for s in statuses.values())
    if abs(average.total_weight - total) > _WEIGHT_TOLERANCE * total:
        log(WARNING, "Round %d: the masked models weigh %g in total but the clients report %g; some client masked "
            "another weight than it reported; re-masking with fresh keys", server_round, average.total_weight, total)
        raise FinalRestart()
    return average


def _weight(status: wire.DoneStatus, weighted_by_key: str) -> float:
    """A client's clear weight (:func:`~flwr_fedtan.protocol.wire.decode_reply` checked it is a positive number)."""
    return float(cast(float, status.metrics[weighted_by_key]))


# ---------------------------------------------------------------------- the final exchange
def unless_final_exchange(sent: Mapping[int, Any], statuses: Mapping[int, wire.Status],
                          synchronised: dict[int, int]) -> None:
    """After an exchange sent without restarting on failures (secure models), if some clients
    failed: when every other client is done (the final exchange), it restarts alone
    (:class:`FinalRestart`: the survivors keep their models); otherwise the attempt restarts."""
    if len(statuses) == len(sent):
        return
    if statuses and all(isinstance(s, wire.DoneStatus) for s in statuses.values()):
        raise FinalRestart(synchronised)
    raise Restart()


def release_final(releases: ReleaseLedger, exchanges: Exchanges, round_: TrainRound, result: ExchangeResult,
                  roster: Roster, *, weighted_by_key: str, check_weights: bool, blame: RosterBlame) -> list[Message]:
    """Release the average of the final exchange's masked models into ``round_`` and return
    the replies (empty if the release rule refuses it); a failure restarts the final
    exchange alone (:class:`FinalRestart`, carrying ``round_.synchronised`` for the
    re-mask's weight check, made with ``check_weights`` once the round saw a forward point)."""
    done = {n: s for n, s in result.statuses.items() if isinstance(s, wire.DoneStatus)}
    checked = check_weights and round_.saw_forward
    try:
        average = release_round_average(
            releases, round_, done, roster, weighted_by_key=weighted_by_key,
            synchronised=round_.synchronised if checked else None,
            blame=lambda payloads: blame(exchanges, roster, payloads))
    except FinalRestart as restart:
        restart.synchronised = dict(round_.synchronised)
        raise
    if average is None:
        return []
    round_.secure_average = average
    round_.statuses = done
    return [result.replies[n] for n in sorted(done)]


def remask(releases: ReleaseLedger, session: ServerSession, exchanges: Exchanges, round_: TrainRound,
           participants: list[int], attempt: int, synchronised: dict[int, int], *, weighted_by_key: str,
           sync_steps: int, check_weights: bool, blame: RosterBlame) -> list[Message]:
    """Restart the final exchange alone: the survivors ``participants`` (who just sent fresh
    keys to ``session``) mask the final models they kept under the new roster, for
    ``attempt``; released as by :func:`release_final`. Not even asked for (round ends, logged)
    if the survivors' sum, with the round's computable sums, would reveal a client."""
    ledger, server_round = round_.ledger, round_.server_round
    try:
        releases.check(server_round, participants)
    except SecureStatsError as error:
        log(WARNING, "Round %d: the final exchange is not restarted: %s", server_round, error)
        return []
    roster = session.roster(participants)
    content = wire.encode_remask(server_round, sync_steps, attempt, roster)
    sent = time.perf_counter()
    result = exchanges.send({n: content for n in participants}, restart=False)
    ledger.final_exchange_seconds += time.perf_counter() - sent
    for node, status in result.statuses.items():
        if not isinstance(status, wire.DoneStatus):
            ledger.drop(node, f"replied {status.phase!r} to the re-mask of its final model")
    if ledger.last_exchange is not None:
        ledger.progress.record(ledger.last_exchange, f"re-mask of the final models, attempt {attempt + 1}",
                               force=True, counted=False)
    if len(result.statuses) != len(participants) or any(n in ledger.dropped for n in result.statuses):
        raise FinalRestart(synchronised)
    round_.synchronised = synchronised
    return release_final(releases, exchanges, round_, result, roster, weighted_by_key=weighted_by_key,
                         check_weights=check_weights, blame=blame)
