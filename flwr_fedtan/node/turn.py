"""One message being handled on a node (see :mod:`.session`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from flwr.app import Context, Message

from ..protocol import wire
from ..client import FedTANClient, _client_from
from .state import NodeState

__all__ = ["Turn"]


@dataclass
class Turn:
    """One message being handled."""

    msg: Message
    context: Context
    client_fn: Callable[[Context], Any]
    options: Any  # flwr_fedtan.clientapp.Options
    control: wire.Control
    node: NodeState

    def client(self) -> FedTANClient:
        return _client_from(self.client_fn, self.context)

    def reply(self, content) -> Message:
        return Message(content, reply_to=self.msg)
