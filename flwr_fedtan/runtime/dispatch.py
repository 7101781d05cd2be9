"""Where a node's message handler runs: this process, a Ray home actor, or a node worker.

Flower gives a node's messages no process affinity: in a simulation with several Ray
actors any actor may get the next message, and in deployment every message starts a
fresh ``flwr-clientapp`` process. FedTAN's round is paused in memory between messages
(:mod:`.live`), so :func:`run_at_home` sends the handler of a node's message to the one
process that keeps that node's live rounds, its *home*:

``"process"``
    This process (the single-actor simulation, tests, in-process use).
``"ray"``
    A Ray actor chosen by the node (:mod:`.ray_home`), reached from whichever
    ClientAppActor got the message. Used automatically when the simulation runs more
    than one ClientAppActor.
``"worker"``
    A long-lived process on the node's machine reached over a private Unix socket
    (:mod:`.worker`), started on demand. Used automatically in a ``flwr-clientapp``
    process (deployment).
``"auto"`` (default)
    The above, by where the handler runs.

Every statistic still travels in Flower messages: a home only holds what a single
long-lived ClientApp process would hold. The node's state (:mod:`flwr_fedtan.node.state`)
is sent to the home with the message and comes back with the reply, so a home that is
lost (killed, restarted, on another machine) costs a replay from that state, not a wrong
result.

This module imports neither torch nor Ray.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from flwr.app import Context, Message

from .. import settings
from ..node import state as node_state
from .identity import in_flwr_clientapp_process, in_home, mark_home

__all__ = ["HOMES", "home_kind", "in_home", "mark_home", "resolve_home", "run_at_home"]

HOMES = settings.LIVE_HOMES

Handler = Callable[..., Message]


def resolve_home(home: Optional[str]) -> str:
    """``FEDTAN_LIVE_HOME``, else ``home``, else ``"auto"``; validated."""
    return settings.live_home(home)


def home_kind(home: Optional[str] = None) -> str:
    """Where a handler called now would run: ``"process"``, ``"ray"`` or ``"worker"``."""
    chosen = resolve_home(home)
    if in_home() is not None:
        return "process"
    if chosen != "auto":
        return chosen
    from . import ray_home  # imports Ray only if this process already did

    if ray_home.in_ray_actor():
        return "ray" if ray_home.homes_wanted() > 1 else "process"
    if in_flwr_clientapp_process():
        return "worker"
    return "process"


def run_at_home(handler: Handler, msg: Message, context: Context, *args: Any, home: Optional[str] = None) -> Message:
    """``handler(msg, context, *args)``, run in the node's home.

    ``handler`` and ``args`` must be picklable (module-level functions are pickled by
    name) when the home is another process. The node's state is updated in place with
    the state the handler left.
    """
    kind = home_kind(home)
    if kind == "process":
        return handler(msg, context, *args)
    if kind == "ray":
        from .ray_home import call_home
    else:
        from .worker import call_worker as call_home
    reply, state = call_home(handler, msg, context, args)
    node_state.replace(context, state)
    return reply
