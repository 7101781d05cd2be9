"""The ``ClientApp`` side of FedTAN: :func:`add_fedtan` and :func:`fedtan_client_app`
register FedTAN's handler (message type ``train.fedtan``, served by
:func:`flwr_fedtan.node.session.handle` in the node's home, see :mod:`flwr_fedtan.runtime`)
with their options.

:func:`add_fedtan` adds FedTAN's handler to an existing message-API ``ClientApp`` and
leaves the app's own handlers alone; :func:`fedtan_client_app` builds a whole
``ClientApp`` (FedTAN, plain ``train`` and ``evaluate``) for apps that start from scratch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union, cast

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import settings
from .protocol import wire
from .client import FedTANClient, _client_from, client_seed_key
from .node import session
from .runtime import run_at_home
from .seeds import derive_seed, round_seed

__all__ = ["Options", "add_fedtan", "fedtan_client_app"]


@dataclass(frozen=True)
class Options:
    """The app's settings as given in the code; environment overrides are applied per
    message (:mod:`flwr_fedtan.settings`)."""

    replay_store: Optional[str] = None
    state_dir: Optional[Union[str, os.PathLike]] = None
    max_live_rounds: Optional[int] = None
    live_home: Optional[str] = None
    require_secure_stats: bool = False
    live_memory: Union[int, float, str, None] = None

    def __post_init__(self) -> None:
        settings.check_replay_store(self.replay_store)
        settings.check_max_live_rounds(self.max_live_rounds)
        settings.check_live_memory(self.live_memory)
        settings.check_live_home(self.live_home)


def add_fedtan(
    app: ClientApp,
    client_fn: Optional[Callable[[Context], FedTANClient]] = None,
    *,
    replay_store: Optional[str] = None,
    state_dir: Optional[Union[str, os.PathLike]] = None,
    max_live_rounds: Optional[int] = None,
    live_home: Optional[str] = None,
    require_secure_stats: bool = False,
    live_memory: Union[int, float, str, None] = None,
) -> Any:
    """Add FedTAN to an existing message-API ``ClientApp``; the app's own handlers stay.

    Call it with the ``client_fn`` (``add_fedtan(app, client_fn)``), or use it as a
    decorator on the ``client_fn`` (``@add_fedtan(app)``).

    Registers one handler, for FedTAN's message type ``train.fedtan`` (what
    ``@app.train("fedtan")`` would register). Every handler the app already has, or gets
    later, is untouched: its ``@app.train()`` still serves Flower's ``FedAvg`` (and any
    other strategy), its ``@app.evaluate()`` serves evaluation, including the evaluation
    rounds of :class:`~flwr_fedtan.FedTAN`, which sends Flower's ordinary ``evaluate``
    messages. Mods given to ``ClientApp(mods=...)`` wrap FedTAN's handler too; Flower's
    differential-privacy mods act on messages of type ``train`` only and let
    ``train.fedtan`` pass unchanged.

    Parameters
    ----------
    app : ClientApp
        The app, built with handler decorators (``app = ClientApp()``, ``@app.train()``,
        ...); not a legacy ``ClientApp(client_fn=...)``.
    client_fn : Callable[[Context], FedTANClient], optional
        Builds the node's :class:`FedTANClient` from the context (model, data, settings).
        Called at the start of each round and whenever a round must be rebuilt in another
        process, so it must build the same client every time. Omitted: ``add_fedtan``
        returns a decorator that registers the function it decorates.
    replay_store : {"disk", "context"}, optional
        Where a round's starting weights are kept for replay in another process:
        ``"disk"`` (default: a node-local file under ``state_dir``) or ``"context"``
        (the node's state that Flower carries, for multi-machine Ray clusters).
        ``FEDTAN_REPLAY_STORE`` overrides it. See :mod:`flwr_fedtan.node.weights`.
    state_dir : str or os.PathLike, optional
        Base folder of the ``"disk"`` store's private files; default
        ``$XDG_RUNTIME_DIR/flwr-fedtan``, else ``<tempdir>/flwr-fedtan-<uid>``. ``FEDTAN_STATE_DIR`` overrides it.
    max_live_rounds : int, optional
        At most how many paused rounds a home keeps in memory (an LRU shared by its
        nodes), on top of ``live_memory``; default: no cap by count; ``0`` keeps none, so
        every message replays. ``FEDTAN_MAX_LIVE_ROUNDS`` overrides it.
    live_home : {"auto", "process", "ray", "worker"}, optional
        Where a node's live rounds are kept between its messages (its *home*, see
        :mod:`flwr_fedtan.runtime`): ``"auto"`` (default) picks this process in a
        single-actor simulation, a Ray home actor when the simulation runs several
        ClientAppActors (or on a Ray cluster), and the node worker in a deployed
        ``flwr-clientapp`` process. ``FEDTAN_LIVE_HOME`` overrides it.
    require_secure_stats : bool (default: False)
        Refuse every round that would send this node's statistics in the clear (a begin
        without a roster): for nodes that must only take part under
        ``FedTAN(secure_stats=True)``, whatever the server asks.
    live_memory : int, float or str, optional
        The memory budget of a home's paused rounds: bytes (``2_000_000_000``, ``"2GB"``,
        ``"512MiB"``) or a fraction of the memory available (``0.25``, ``"25%"``); default
        half of the memory available to the home when it first keeps a round, shared
        evenly by the homes of its machine. Beyond it the least recently used rounds are
        closed and replayed at their nodes' next message. ``FEDTAN_LIVE_MEMORY`` overrides it.

    Returns
    -------
    ClientApp or decorator
        ``app`` itself; without ``client_fn``, a decorator that registers the function
        and returns it unchanged.

    Raises
    ------
    TypeError
        If ``app`` is not a ``ClientApp``.
    ValueError
        If ``app`` is a legacy ``ClientApp(client_fn=...)``, already handles
        ``train.fedtan``, or an option is invalid.

    Examples
    --------
    >>> app = ClientApp()
    >>> @app.train()
    ... def train(msg, context): ...       # your FedAvg training, unchanged
    >>> @add_fedtan(app)
    ... def client_fn(context):
    ...     trainloader, _ = load_data(context.node_config["partition-id"], ...)
    ...     return FedTANClient(Net(), trainloader, local_steps=len(trainloader))

    or, the same, ``add_fedtan(app, client_fn)`` after defining ``client_fn``.
    """
    if not isinstance(app, ClientApp):
        raise TypeError(f"add_fedtan needs a flwr.clientapp.ClientApp, got {type(app).__name__}")
    if getattr(app, "_call", None) is not None:
        raise ValueError(
            "add_fedtan needs a ClientApp whose handlers are registered with decorators "
            "(app = ClientApp(); @app.train() ...); a legacy ClientApp(client_fn=...) routes "
            "every message to its client_fn and cannot take one more handler. Use "
            "fedtan_client_app(client_fn) with a client_fn returning a FedTANClient instead"
        )
    if wire.MESSAGE_TYPE in getattr(app, "_registered_funcs", {}):
        raise ValueError(f"this ClientApp already handles {wire.MESSAGE_TYPE!r} (add_fedtan called twice?)")
    options = Options(replay_store, state_dir, max_live_rounds, live_home, bool(require_secure_stats), live_memory)
    if client_fn is None:

        def register(function: Callable[[Context], FedTANClient]) -> Callable[[Context], FedTANClient]:
            add_fedtan(
                app, function, replay_store=replay_store, state_dir=state_dir,
                max_live_rounds=max_live_rounds, live_home=live_home, require_secure_stats=require_secure_stats,
                live_memory=live_memory,
            )
            return function

        return register
    if not callable(client_fn):
        raise TypeError(f"add_fedtan: client_fn must be a function of the Context, got {type(client_fn).__name__}")

    @app.train(wire.ACTION)
    def fedtan_train(msg: Message, context: Context) -> Message:
        # Runs where the node's live rounds are kept (this process, a Ray home, the node worker).
        home = settings.live_home(options.live_home)
        return run_at_home(session.handle, msg, context, client_fn, options, home=home)

    return app


def fedtan_client_app(
    client_fn: Callable[[Context], FedTANClient],
    *,
    replay_store: Optional[str] = None,
    state_dir: Optional[Union[str, os.PathLike]] = None,
    max_live_rounds: Optional[int] = None,
    live_home: Optional[str] = None,
    require_secure_stats: bool = False,
    live_memory: Union[int, float, str, None] = None,
) -> ClientApp:
    """A message-API ``ClientApp`` that serves every message FedTAN and FedAvg send.

    For apps that start from scratch; to keep an app's own handlers, use
    :func:`add_fedtan`.

    Parameters
    ----------
    client_fn : Callable[[Context], FedTANClient]
        Builds the node's client (model, data, settings) from the context, like the
        ``client_fn`` of a legacy ``ClientApp``.
    replay_store, state_dir, max_live_rounds, live_home, require_secure_stats, live_memory
        As in :func:`add_fedtan` (environment variables override all but require_secure_stats).

    Returns
    -------
    ClientApp
        Handles ``train.fedtan`` (FedTAN rounds), ``train`` (ordinary local training with
        FedTAN's batch sampling, e.g. for Flower's FedAvg; metrics ``num-examples`` and
        ``train-loss``) and ``evaluate`` (:meth:`FedTANClient.evaluate`; metrics
        ``num-examples``, ``eval-loss``, ``eval-accuracy``).

    Examples
    --------
    >>> app = fedtan_client_app(client_fn)
    """
    app = add_fedtan(
        ClientApp(), client_fn, replay_store=replay_store, state_dir=state_dir,
        max_live_rounds=max_live_rounds, live_home=live_home, require_secure_stats=require_secure_stats,
        live_memory=live_memory,
    )

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        client = _client_from(client_fn, context)
        arrays = msg.content.array_records["arrays"]
        config = dict(msg.content.config_records.get("config", ConfigRecord()))
        client.load_arrays(arrays)
        # The same batches a FedTAN round would draw (strategy seed, round, attempt 0).
        seed = round_seed(int(cast(int, config.get("seed", 0))), int(cast(int, config.get("server-round", 0))), 0)
        config["seed"] = derive_seed(seed, client_seed_key(context))
        _, num_examples, metrics = client.fit(client.get_parameters({}), config)
        record = MetricRecord({"num-examples": num_examples, **metrics})
        return Message(RecordDict({"arrays": client.arrays(), "metrics": record}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        client = _client_from(client_fn, context)
        client.load_arrays(msg.content.array_records["arrays"])
        config = dict(msg.content.config_records.get("config", ConfigRecord()))
        loss, count, metrics = client.evaluate(client.get_parameters({}), config)
        record = MetricRecord(
            {"num-examples": count, "eval-loss": loss, **{f"eval-{k}": v for k, v in metrics.items()}}
        )
        return Message(RecordDict({"metrics": record}), reply_to=msg)

    return app
