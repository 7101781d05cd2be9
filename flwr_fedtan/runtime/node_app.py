"""A light ClientApp that runs another ClientApp where the node's live rounds are.

In deployment every message imports the ClientApp's module in a fresh ``flwr-clientapp``
process. :func:`node_client_app` lets that module import only Flower: it names the real
ClientApp (``"package.module:app"``) instead of importing it, and

- in a ``flwr-clientapp`` process, forwards each message to the node worker
  (:mod:`.worker`), which imports the real app once and keeps the node's live rounds,
  client, model and data between messages;
- anywhere else (Flower's simulation, tests), imports the real app and calls it here (its
  FedTAN handler still picks the node's home, see :mod:`.dispatch`).

.. code-block:: python

    # my_app/node.py: the module named in pyproject's [tool.flwr.app.components]
    from flwr_fedtan.runtime import node_client_app

    app = node_client_app("my_app.client_app:app")
"""

from __future__ import annotations

import importlib
from typing import Callable, Mapping, Optional

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ..node import state as node_state
from .dispatch import home_kind, resolve_home

__all__ = ["NodeClientApp", "node_client_app"]

_apps: dict[str, ClientApp] = {}


def load_app(reference: str) -> ClientApp:
    """The ClientApp named ``"module:attribute"`` (imported once per process)."""
    app = _apps.get(reference)
    if app is None:
        module_name, sep, attribute = reference.partition(":")
        if not sep or not module_name or not attribute:
            raise ValueError(f"expected 'module:attribute', got {reference!r}")
        app = getattr(importlib.import_module(module_name), attribute)
        if not callable(app):
            raise TypeError(f"{reference} is not a ClientApp (got {type(app).__name__})")
        _apps[reference] = app
    return app


def call_app(msg: Message, context: Context, reference: str) -> Message:
    """Handle ``msg`` with the ClientApp named by ``reference``, in this process."""
    return load_app(reference)(msg, context)


class NodeClientApp(ClientApp):
    """A ClientApp that delegates every message to the ClientApp named by ``reference``;
    see :func:`node_client_app`."""

    def __init__(self, reference: str, live_home: Optional[str] = None,
                 local: Optional[Mapping[str, Callable[[Message, Context], Message]]] = None) -> None:
        super().__init__()
        module_name, sep, attribute = reference.partition(":")
        if not sep or not module_name or not attribute:
            raise ValueError(f"node_client_app needs 'module:attribute', got {reference!r}")
        self.reference = reference
        self.live_home = resolve_home(live_home)
        self.local = dict(local or {})

    def __call__(self, message: Message, context: Context) -> Message:
        handler = self.local.get(message.metadata.message_type)
        if handler is not None:
            return handler(message, context)
        if home_kind(self.live_home) == "worker":
            from .worker import call_worker

            reply, state = call_worker(call_app, message, context, (self.reference,))
            node_state.replace(context, state)
            return reply
        return call_app(message, context, self.reference)


def node_client_app(reference: str, live_home: Optional[str] = None,
                    local: Optional[Mapping[str, Callable[[Message, Context], Message]]] = None) -> ClientApp:
    """A ClientApp that serves every message with the ClientApp named by ``reference``.

    Parameters
    ----------
    reference : str
        ``"module:attribute"`` of the real ClientApp (e.g. one built with
        :func:`flwr_fedtan.fedtan_client_app`), importable where the node runs.
    live_home : Optional[str] (default: None)
        ``"auto"`` (the default, also via ``FEDTAN_LIVE_HOME``): the node worker in a
        deployment ``flwr-clientapp`` process, this process elsewhere; ``"worker"`` or
        ``"process"`` force one.
    local : Optional[Mapping[str, Callable[[Message, Context], Message]]] (default: None)
        Handlers by message type (e.g. ``"query.ping"``) that run right here, in the
        light process, without the real app (they should import no torch).

    Returns
    -------
    ClientApp
        Importing the module that defines it imports Flower only, not torch.
    """
    return NodeClientApp(reference, live_home, local)
