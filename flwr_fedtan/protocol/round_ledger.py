"""A FedTAN round in flight on the server, and what it cost: its ledger and summary line.

No torch here. :class:`TrainRound` lives from :class:`~flwr_fedtan.FedTAN`'s
``configure_train`` to its ``aggregate_train``; the round driver
(:class:`~flwr_fedtan.protocol.driver.RoundDriver`) counts the round's exchanges, bytes,
restarts and drops in its :class:`RoundLedger`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Optional, cast

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.supercore import log

from ..secure.models import SecureAverage
from ..progress import ExchangeProgress, describe_bytes
from . import wire
from .exchange import ExchangeLedger

__all__ = ["REASON_CHARS", "RoundLedger", "TrainRound", "new_round_ledger", "round_summary", "skipped_round"]

REASON_CHARS = 400  # a drop reason quotes the client's own text: keep the log readable


@dataclass
class RoundLedger(ExchangeLedger):
    """What one round cost: counted on the server."""

    sync_seconds: float = 0.0
    final_exchange_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    batchnorm_calls: Optional[int] = None  # L, known from the first backward sync point

    def metrics(self, clients: int) -> dict:
        """The round's cost as train metrics (``fedtan-*``)."""
        return {
            "fedtan-clients": clients,
            "fedtan-exchanges": self.exchanges,
            "fedtan-bytes-sent": self.bytes_sent,
            "fedtan-bytes-received": self.bytes_received,
            "fedtan-sync-wall-seconds": self.sync_seconds,
            "fedtan-final-exchange-seconds": self.final_exchange_seconds,
            "fedtan-round-seconds": time.perf_counter() - self.started,
            "fedtan-restarts": self.restarts,
            "fedtan-dropped": len(self.dropped),
        }


@dataclass
class TrainRound:
    """A round in flight: from ``configure_train`` to ``aggregate_train``."""

    server_round: int
    reference: dict[str, np.ndarray]  # the global model the round started from
    contents: dict[int, RecordDict]  # each node's begin message
    ledger: RoundLedger
    synchronised: dict[int, int] = field(default_factory=dict)  # examples each client synchronised with
    saw_forward: bool = False
    statuses: dict[int, wire.DoneStatus] = field(default_factory=dict)  # the final replies
    secure_average: Optional[SecureAverage] = None  # secure models: the released average, not the replies'


def new_round_ledger(server_round: int, progress_interval: Optional[float]) -> RoundLedger:
    """The ledger of a new round: its drop lines and progress lines name the round."""
    return RoundLedger(title=f"FedTAN round {server_round}", reason_chars=REASON_CHARS,
                       progress=ExchangeProgress(f"FedTAN round {server_round}", progress_interval))


def round_summary(round_: TrainRound, clients: int) -> dict:
    """Log the round's summary line; return its ``fedtan-*`` metrics."""
    ledger = round_.ledger
    replays = sum(int(cast(int, s.metrics.get("replays", 0))) for s in round_.statuses.values())
    metrics = ledger.metrics(clients)
    metrics.update(ledger.progress.metrics("fedtan-"))
    metrics["fedtan-replays"] = replays
    log(INFO, "FedTAN round %d done in %.1f s: %d exchanges; synchronised step: %s; final exchange %.2f s; "
        "%s sent, %s received; %d replays; %d restarts; %d dropped", round_.server_round,
        metrics["fedtan-round-seconds"], ledger.exchanges, ledger.progress.describe(),
        ledger.final_exchange_seconds, describe_bytes(ledger.bytes_sent), describe_bytes(ledger.bytes_received),
        replays, ledger.restarts, len(ledger.dropped))
    return metrics


def skipped_round(round_: TrainRound) -> MetricRecord:
    """Log why the round was skipped; return its metrics (``fedtan-skipped`` and the summary's)."""
    reason = "; ".join(f"node {n}: {why}" for n, why in round_.ledger.dropped.items()) or "too few clients"
    log(WARNING, "Round %d skipped, global model kept (%s)", round_.server_round, reason)
    metrics = MetricRecord({"fedtan-skipped": 1})
    metrics.update(round_summary(round_, 0))
    return metrics
