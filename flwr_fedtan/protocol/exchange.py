"""Exchanges of FedTAN messages on a Flower Grid. No torch, no strategy.

:func:`exchange` pushes one message to each node, pulls the replies until all are in or the
timeout passes, and decodes them. :class:`Exchanges` runs the exchanges of one round or
statistics pass on top of it: it counts their cost in an :class:`ExchangeLedger`, drops the
nodes that failed (one log line each) and restarts the attempt (:class:`Restart`). Used by
the round driver (:class:`~flwr_fedtan.protocol.driver.RoundDriver`) and by the statistics
pass (:class:`~flwr_fedtan.protocol.pass_driver.StatisticsPassDriver`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any, Mapping, Optional, Union

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from .. import progress
from . import wire
from ..aggregation import BackwardSums, ForwardStats
from ..errors import PayloadError
from ..progress import ExchangeProgress, ExchangeTiming
from ..secure import MaskedPayload, ServerSession

_ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")
_CLIENTAPP_MESSAGE = "occurred. Message: "  # flwr.clientapp.ClientAppException's wording


def client_error_text(reason: str) -> str:
    """The client's own message in an error reply's reason.

    In Ray simulation the reason is Ray's whole traceback, coloured, with the ClientApp's
    exception at its end (``... ClientAppException occurred. Message: <the client's text>``):
    a drop line quoting its first characters would show Ray's frames, never the node's
    message or its fix. Other reasons are returned without colour codes, otherwise as they are.
    """
    text = _ANSI_CODES.sub("", reason)
    if _CLIENTAPP_MESSAGE in text:
        text = text.rsplit(_CLIENTAPP_MESSAGE, 1)[1].strip()
        if text.endswith("')") or text.endswith("'>"):
            text = text[:-2].rstrip()
    return text


__all__ = [
    "ExchangeLedger",
    "accept_keys",
    "ExchangeResult",
    "Exchanges",
    "Restart",
    "count_claims",
    "exchange",
    "payload_kind_mismatches",
    "unexpected",
    "within_limit",
]

_NONE = np.zeros(0)  # mean/var of a masked forward payload's stand-in: only its counts are checked


def unexpected(error: Exception) -> str:
    """The drop reason for an error no check foresaw while handling one client's reply."""
    return f"its reply could not be handled ({type(error).__name__}: {error})"


@dataclass
class ExchangeResult:
    """What one exchange brought back."""

    statuses: dict[int, wire.Status] = field(default_factory=dict)  # valid replies, by node
    replies: dict[int, Message] = field(default_factory=dict)  # every reply received, by node
    failures: dict[int, str] = field(default_factory=dict)  # node -> why it failed, in the order found
    bytes_sent: int = 0
    bytes_received: int = 0
    timing: Optional[ExchangeTiming] = None


def exchange(
    grid: Grid,
    contents: dict[int, RecordDict],
    *,
    server_round: int,
    timeout: float,
    poll_interval: float,
    weighted_by_key: str = "num-examples",
) -> ExchangeResult:
    """Send ``contents[node]`` to each node (message type ``train.fedtan``) and collect the
    replies: a node that does not answer within ``timeout`` seconds, answers with an error,
    or whose reply does not decode or is for another round, is in ``failures`` with the
    reason. Replies are decoded in node order, not arrival order, so that sums over clients
    are bitwise reproducible for a given set of node ids. Each reply is decoded as soon as it
    is pulled, while the others are still being computed: the last reply's arrival is
    followed by its own decoding only."""
    result = ExchangeResult()
    messages = []
    for node, content in contents.items():
        messages.append(Message(content=content, dst_node_id=node, message_type=wire.MESSAGE_TYPE))
        result.bytes_sent += wire.record_bytes(content)
    started, slowest = progress.clock(), None
    message_ids = {mid: msg.metadata.dst_node_id for mid, msg in zip(grid.push_messages(messages), messages)}
    deadline = time.monotonic() + timeout
    pending = set(message_ids)
    decoded: dict[int, Union[wire.Status, str]] = {}  # node -> its status, or why its reply failed
    while pending:
        for reply in grid.pull_messages(list(pending)):
            reply_to = reply.metadata.reply_to_message_id
            if reply_to in pending:
                pending.discard(reply_to)
                node = message_ids[reply_to]
                result.replies[node] = reply
                slowest = node
                decoded[node] = _decode(reply, node, server_round, weighted_by_key, result)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll_interval)
    result.timing = ExchangeTiming(progress.clock() - started, slowest)
    for mid in pending:
        result.failures[message_ids[mid]] = f"no reply within {timeout:g}s"
    result.replies = dict(sorted(result.replies.items()))
    for node in result.replies:  # in node order, as the sums over clients will be
        outcome = decoded[node]
        if isinstance(outcome, str):
            result.failures[node] = outcome
        else:
            result.statuses[node] = outcome
    return result


def _decode(reply: Message, node: int, server_round: int, weighted_by_key: str,
            result: ExchangeResult) -> Union[wire.Status, str]:
    """One reply's status, or why it failed; its bytes are counted in ``result``."""
    try:
        if reply.has_error():
            return f"error reply: {client_error_text(reply.error.reason or '')}"
        result.bytes_received += wire.record_bytes(reply.content)
        status = wire.decode_reply(reply.content, node, weighted_by_key)
        if status.round != server_round:
            raise PayloadError(node, f"replied for round {status.round} during round {server_round}")
        return status
    except PayloadError as error:
        return str(error)
    except Exception as error:  # whatever one reply holds, it ends that client, not the run
        return unexpected(error)


class Restart(Exception):
    """Some clients failed during an attempt (of a synchronised step or a statistics pass):
    restart it without them."""


@dataclass
class ExchangeLedger:
    """What the exchanges of one round or statistics pass cost, and whom they dropped.

    ``title`` starts every drop line (e.g. ``"FedTAN round 3"``); a drop reason longer than
    ``reason_chars`` is cut there (``None``: kept whole).
    """

    title: str = "FedTAN"
    reason_chars: Optional[int] = None
    exchanges: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    restarts: int = 0
    dropped: dict[int, str] = field(default_factory=dict)
    progress: ExchangeProgress = field(default_factory=lambda: ExchangeProgress("FedTAN"))
    last_exchange: Optional[ExchangeTiming] = None

    def drop(self, node: int, reason: str) -> None:
        """Drop ``node`` for ``reason`` (logged once; a node is dropped for its first reason)."""
        if node in self.dropped:
            return
        if self.reason_chars is not None and len(reason) > self.reason_chars:
            reason = reason[: self.reason_chars] + "..."
        self.dropped[node] = reason
        log(WARNING, "%s: dropping node %s: %s", self.title, node, reason)

    def restart_if_dropped(self, nodes: Mapping[int, object]) -> None:
        """Raise :class:`Restart` if any of ``nodes`` was dropped."""
        if self.dropped.keys() & nodes.keys():
            raise Restart()


class Exchanges:
    """The exchanges of one round or statistics pass on ``grid``, counted in ``ledger``."""

    def __init__(self, grid: Grid, ledger: ExchangeLedger, *, server_round: int, timeout: float,
                 poll_interval: float, weighted_by_key: str = "num-examples") -> None:
        self.grid = grid
        self.ledger = ledger
        self.server_round = server_round
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.weighted_by_key = weighted_by_key

    def send(self, contents: dict[int, RecordDict], *, restart: bool = True) -> ExchangeResult:
        """Send ``contents[node]`` to each node and collect the valid replies; the nodes that
        failed are dropped, and with ``restart`` the attempt restarts if any did."""
        ledger = self.ledger
        ledger.exchanges += 1
        result = exchange(self.grid, contents, server_round=self.server_round, timeout=self.timeout,
                          poll_interval=self.poll_interval, weighted_by_key=self.weighted_by_key)
        ledger.bytes_sent += result.bytes_sent
        ledger.bytes_received += result.bytes_received
        ledger.last_exchange = result.timing
        for node, reason in result.failures.items():
            ledger.drop(node, reason)
        if restart and len(result.statuses) != len(contents):
            raise Restart()
        return result


def accept_keys(ledger: ExchangeLedger, session: ServerSession, statuses: Mapping[int, wire.Status]) -> None:
    """Take each node's public key from its reply to a key exchange (a round's or a
    statistics pass's) into ``session``; a node that replied another phase or a key the
    session refuses is dropped with the reason, and so is one whose reply raised anything
    else: it ends that node, never the round."""
    for node, status in statuses.items():
        try:
            if not isinstance(status, wire.KeysStatus):
                raise PayloadError(node, f"replied {status.phase!r} to the key exchange")
            session.accept_public_key(node, status.public_key)
        except PayloadError as error:
            ledger.drop(node, str(error))
        except Exception as error:  # pylint: disable=broad-except
            ledger.drop(node, unexpected(error))


def payload_kind_mismatches(payloads: Mapping[int, object], masked: bool, what: str) -> dict[int, str]:
    """The clients whose payload is clear in a secure ``what`` (``masked``) or masked in a
    clear one, with the reason."""
    sent, expected = ("clear", "secure") if masked else ("masked", "clear")
    return {node: f"sent {sent} statistics in a {expected} {what}"
            for node, payload in payloads.items() if masked != isinstance(payload, MaskedPayload)}


def count_claims(payloads: Mapping[int, Any], masked: bool) -> dict[int, ForwardStats]:
    """The forward payloads as their counts are checked: clear payloads as they are, masked
    ones (:class:`~flwr_fedtan.secure.MaskedPayload`) as stand-ins carrying their clear counts."""
    if not masked:
        return dict(payloads)
    return {node: ForwardStats(count=payload.count, num_examples=payload.num_examples, mean=_NONE, var=_NONE)
            for node, payload in payloads.items()}


def within_limit(aggregate: Union[ForwardStats, BackwardSums], limit: float) -> bool:
    """Whether every value of an aggregate (pooled statistics or summed gradients) is finite
    and within ``limit`` in magnitude."""
    values = ([aggregate.mean, aggregate.var] if isinstance(aggregate, ForwardStats)
              else [aggregate.sum_grad, aggregate.sum_grad_xhat])
    return all(np.isfinite(v).all() and (np.abs(v) <= limit).all() for v in values)
