"""An in-process Flower Grid for fast protocol tests (no Ray, no SuperLink).

Messages are handled synchronously by a ClientApp when pushed; replies wait to be pulled.
``separate_processes=True`` forgets every live round before each message, as if each
message landed in a fresh process (Flower deployment): the client must replay.
"""

from __future__ import annotations

import uuid
from typing import Callable, Iterable, Optional

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from flwr_fedtan.client import clear_live_rounds


class LocalGrid(Grid):
    def __init__(
        self,
        client_app,
        num_nodes: int,
        run_config: dict,
        separate_processes: bool = False,
        node_ids: Optional[list[int]] = None,
        intercept: Optional[Callable[[int, Message], Optional[Message]]] = None,
    ) -> None:
        # Messages read the run's identity from the process (set by Flower's runtime).
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.client_app = client_app
        self.node_ids = node_ids or [1000 + 7 * i for i in range(num_nodes)]
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i, node in enumerate(self.node_ids)
        }
        self.separate_processes = separate_processes
        self.intercept = intercept
        self._replies: dict[str, Message] = {}
        self.messages_handled = 0

    # Grid API -------------------------------------------------------------------------
    @property
    def run(self):  # pragma: no cover - not used by strategies
        raise NotImplementedError

    def set_run(self, run_id: int) -> None:  # pragma: no cover
        pass

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            message_id = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = message_id
            ids.append(message_id)
            node = msg.metadata.dst_node_id
            if self.separate_processes:
                clear_live_rounds()
            reply = self.intercept(node, msg) if self.intercept else None
            if reply is None:
                try:
                    reply = self.client_app(msg, self.contexts[node])
                except Exception as error:  # Flower turns handler errors into error replies
                    reply = Message(Error(code=1, reason=f"{type(error).__name__}: {error}"), reply_to=msg)
            if reply is not False:  # False: the node never answers
                reply.metadata.__dict__["_src_node_id"] = node
                self._replies[message_id] = reply
            self.messages_handled += 1
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for message_id in message_ids:
            reply = self._replies.pop(message_id, None)
            if reply is not None:
                out.append(reply)
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))


class RecordingGrid(LocalGrid):
    """A LocalGrid that keeps every reply the server pulls: what an honest-but-curious server sees."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        self.seen.extend(replies)
        return replies
