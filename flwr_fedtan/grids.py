"""Flower Grids FedTAN wraps around the real one. No torch, no strategy logic.

- :class:`ForwardingGrid`: forwards every call (a base for Grid wrappers).
- :class:`ExchangeGrid`: the Grid :class:`~flwr_fedtan.FedTAN` hands Flower's round loop,
  turning a round's train messages into FedTAN's exchanges.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from .protocol import wire

__all__ = ["ExchangeGrid", "ForwardingGrid"]


class ForwardingGrid(Grid):
    """A Grid that forwards every call to another Grid (``inner``).

    A base for Grid wrappers (counting traffic, intercepting a round's messages): a
    subclass overrides only the calls it changes.
    """

    def __init__(self, grid: Grid) -> None:
        self.inner = grid

    @property
    def run(self):
        """The inner Grid's run."""
        return self.inner.run

    def set_run(self, run: Run) -> None:
        """Forwarded."""
        self.inner.set_run(run)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        """Forwarded."""
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Forwarded."""
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Forwarded."""
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Forwarded."""
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        """Forwarded."""
        return self.inner.send_and_receive(messages, timeout=timeout)


class ExchangeGrid(ForwardingGrid):
    """The Grid FedTAN hands to Flower's round loop.

    Flower's loop sends a round's train messages with one ``send_and_receive``; for FedTAN's
    messages this runs the round's exchanges on the real Grid (``run_round``, i.e.
    :meth:`FedTAN.run_round <flwr_fedtan.FedTAN.run_round>`) and returns the clients' final
    replies. Everything else is forwarded.
    """

    def __init__(self, grid: Grid, run_round: Callable[[Grid, list[Message]], list[Message]]) -> None:
        super().__init__(grid)
        self.run_round = run_round

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        """A FedTAN round for FedTAN's messages; forwarded otherwise."""
        messages = list(messages)
        if messages and all(m.metadata.message_type == wire.MESSAGE_TYPE for m in messages):
            return self.run_round(self.inner, messages)
        if not messages:
            return []
        return self.inner.send_and_receive(messages, timeout=timeout)
