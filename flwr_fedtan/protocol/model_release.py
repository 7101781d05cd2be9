"""The server's side of secure models in a round: the masked final models in, the released
weighted average out (:func:`release_round_average`), or a restart without the clients at fault.

No torch here. Called by :class:`~flwr_fedtan.protocol.driver.RoundDriver` once every client
of an attempt replied ``done`` with its masked model (:mod:`flwr_fedtan.secure.models`). The
arithmetic and the release rule are :func:`~flwr_fedtan.secure.releases.release_average`'s;
this module names the clients it can (a malformed payload, a weight that is not the one it
synchronised with) and turns the rest into a restart with fresh keys, or into a round that
ends without a new model when releasing would reveal a client.
"""

from __future__ import annotations

from logging import WARNING
from typing import Optional, cast

import numpy as np
from flwr.supercore import log

from ..errors import CanaryMismatchError, FixedPointOverflowError, PayloadError, SecureStatsError
from ..secure import Roster
from ..secure.models import MaskedModel, ModelLayout, SecureAverage
from ..secure.releases import ReleaseLedger, release_average
from . import wire
from .exchange import Restart
from .round_ledger import TrainRound

__all__ = ["sorted_reference", "release_round_average"]

_WEIGHT_TOLERANCE = 1e-9  # relative: the decoded total weight against the sum of the clear weights


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
) -> Optional[SecureAverage]:
    """The weighted average of the attempt's masked models, or ``None`` if releasing it would
    reveal a client's model (the round then ends without a new global model, logged).

    ``synchronised`` (each client's synchronised examples), if given, must equal each
    client's clear weight (``client_weight="synchronised"``). A client whose payload or
    weight is at fault is dropped and the attempt restarts (:class:`Restart`); so does a sum
    whose masks do not cancel or whose total weight is not the sum of the clear weights
    (the server cannot tell whose it is).
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
            continue
        reported = _weight(status, weighted_by_key)
        if synchronised is not None and reported != float(synchronised.get(node, 0)):
            ledger.drop(node, f"reports '{weighted_by_key}' = {reported:g} but synchronised with "
                              f"{synchronised.get(node, 0)} examples; if your clients weigh by something else, "
                              "use FedTAN(client_weight='reported')")
    ledger.restart_if_dropped(statuses)
    try:
        average = release_average(releases, server_round, payloads, roster, reference)
    except PayloadError as error:
        ledger.drop(cast(int, error.client), f"masked model rejected: {error}")
        raise Restart() from None
    except (CanaryMismatchError, FixedPointOverflowError) as error:
        log(WARNING, "Round %d: secure models failed, restarting with fresh keys: %s", server_round, error)
        raise Restart() from None
    except SecureStatsError as error:  # the release rule: these payloads are discarded unread
        log(WARNING, "Round %d: %s", server_round, error)
        return None
    total = sum(_weight(s, weighted_by_key) for s in statuses.values())
    if abs(average.total_weight - total) > _WEIGHT_TOLERANCE * total:
        log(WARNING, "Round %d: the masked models weigh %g in total but the clients report %g; some client masked "
            "another weight than it reported; restarting with fresh keys", server_round, average.total_weight, total)
        raise Restart()
    return average


def _weight(status: wire.DoneStatus, weighted_by_key: str) -> float:
    """A client's clear weight (:func:`~flwr_fedtan.protocol.wire.decode_reply` checked it is a positive number)."""
    return float(cast(float, status.metrics[weighted_by_key]))
