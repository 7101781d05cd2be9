"""One exchange of FedTAN messages on a Flower Grid: push one message to each node, pull
the replies until all are in or the timeout passes, decode them. No torch, no strategy.

Used by the round driver (:class:`~flwr_fedtan.FedTAN`) and by the statistics pass
(:class:`~flwr_fedtan.exact_statistics.StatisticsPassDriver`); each decides what a failure
means (drop, restart) and keeps its own ledger.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from . import progress, schema
from .aggregation import PayloadError
from .progress import ExchangeTiming

__all__ = ["ExchangeResult", "exchange", "unexpected"]


def unexpected(error: Exception) -> str:
    """The drop reason for an error no check foresaw while handling one client's reply."""
    return f"its reply could not be handled ({type(error).__name__}: {error})"


@dataclass
class ExchangeResult:
    """What one exchange brought back."""

    statuses: dict[int, schema.Status] = field(default_factory=dict)  # valid replies, by node
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
    are bitwise reproducible for a given set of node ids."""
    result = ExchangeResult()
    messages = []
    for node, content in contents.items():
        messages.append(Message(content=content, dst_node_id=node, message_type=schema.MESSAGE_TYPE))
        result.bytes_sent += schema.record_bytes(content)
    started, slowest = progress.clock(), None
    message_ids = {mid: msg.metadata.dst_node_id for mid, msg in zip(grid.push_messages(messages), messages)}
    deadline = time.monotonic() + timeout
    pending = set(message_ids)
    while pending:
        for reply in grid.pull_messages(list(pending)):
            reply_to = reply.metadata.reply_to_message_id
            if reply_to in pending:
                pending.discard(reply_to)
                result.replies[message_ids[reply_to]] = reply
                slowest = message_ids[reply_to]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll_interval)
    result.timing = ExchangeTiming(progress.clock() - started, slowest)
    for mid in pending:
        result.failures[message_ids[mid]] = f"no reply within {timeout:g}s"
    result.replies = dict(sorted(result.replies.items()))
    for node, reply in result.replies.items():
        try:
            if reply.has_error():
                result.failures[node] = f"error reply: {reply.error.reason}"
                continue
            result.bytes_received += schema.record_bytes(reply.content)
            status = schema.decode_reply(reply.content, node, weighted_by_key)
            if status.round != server_round:
                raise PayloadError(node, f"replied for round {status.round} during round {server_round}")
            result.statuses[node] = status
        except PayloadError as error:
            result.failures[node] = str(error)
        except Exception as error:  # whatever one reply holds, it ends that client, not the run
            result.failures[node] = unexpected(error)
    return result
