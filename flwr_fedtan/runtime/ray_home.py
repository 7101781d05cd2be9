"""Ray homes: a few actors that hold the live rounds of a simulation's nodes.

With several ClientAppActors, Flower hands a node's next message to whichever actor is
idle. Each ClientAppActor therefore forwards a FedTAN message to the node's *home*, a
named actor ``fedtan-home-<run>-<i>-of-<H>``, chosen by the node's partition id (or node
id) modulo ``H``; the home resumes the node's paused round and returns the reply and the
node's state (:mod:`flwr_fedtan.node.state`). The first ClientAppActor that needs a home creates it
(``get_if_exists``), the others find it by name.

Sizing and placement
    ``H`` equals the number of ClientAppActors Flower builds (its rule: per Ray node,
    ``CPU // client CPUs``, capped by GPUs when clients ask for GPUs), and home ``i`` is
    placed (soft affinity) on the Ray node of the ``i``-th such slot, so a cluster's homes
    spread like its ClientAppActors. Homes reserve no CPU or GPU (``num_cpus=0``):
    Flower sizes its pool from the cluster's *total* resources, and a home that held a
    CPU would leave a ClientAppActor pending forever. The compute moves with the round:
    while a home runs a node's step, the ClientAppActor that forwarded it waits idle, so
    the machine runs as many steps at once as before. Each home is one process with torch
    (~0.5 GB), however many nodes it serves. Its live rounds are bounded by memory
    (:mod:`.live`): the default budget, half of the memory available, is shared evenly
    by the homes placed on the same Ray node; ``FEDTAN_LIVE_MEMORY`` and
    ``FEDTAN_MAX_LIVE_ROUNDS`` apply per home. Nodes spread evenly: partition ids
    ``0..N-1`` go round-robin over the homes, and the homes over the Ray nodes like the
    ClientAppActors.

Lifetime
    A home is owned by the ClientAppActor that created it: when the run ends Flower
    terminates its actors (and ``ray.shutdown()``), and the homes go with them. Homes of
    an earlier run are never reached (the name holds the run id).

Faults
    A home that died (killed, its machine lost) is recreated at the next message and
    starts empty: the node's round is replayed from its state, with the same result. On
    a multi-machine cluster the new home may be on another machine, where the
    node-local replay weights are missing: the replay then fails with
    :class:`~flwr_fedtan.node.weights.ReplayWeightsMissing`, naming the fix
    (``replay_store="context"``), and the server drops the node for that round.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from typing import Any, Callable, Optional

from flwr.app import Context, Message, RecordDict

from .. import settings
from ..node import state as node_state
from .identity import mark_home

__all__ = ["call_home", "home_index", "homes_wanted", "in_ray_actor", "where"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_slots: Optional[list[str]] = None  # Ray node id of each home
_threads = 1
_gpus = 0.0  # GPUs of one ClientAppActor
_handles: dict[str, Any] = {}
_home_class: Any = None


def _ray():
    return sys.modules.get("ray")


def in_ray_actor() -> bool:
    """Whether this process is a Ray actor of an initialised Ray (a ClientAppActor)."""
    ray = _ray()
    if ray is None or not ray.is_initialized():
        return False
    try:
        return ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - an unusual Ray context means: not an actor
        return False


def _compute_slots() -> tuple[list[str], int]:
    """One Ray node id per ClientAppActor Flower builds, and the CPUs of one."""
    global _gpus
    ray = _ray()
    assigned = ray.get_runtime_context().get_assigned_resources()
    cpus, gpus = float(assigned.get("CPU", 0.0)), float(assigned.get("GPU", 0.0))
    _gpus = gpus
    slots: list[str] = []
    for node in ray.nodes():
        resources = node.get("Resources") or {}
        if not node.get("Alive", True) or not resources:
            continue
        count = int(resources.get("CPU", 0) / cpus) if cpus > 0 else 1
        if gpus > 0:
            count = min(count, int(resources.get("GPU", 0) / gpus))
        slots += [node["NodeID"]] * count
    return slots, max(1, int(cpus))


def _layout() -> list[str]:
    global _slots, _threads
    with _lock:
        if _slots is None:
            _slots, _threads = _compute_slots()
        return _slots


def homes_wanted() -> int:
    """How many homes this simulation uses (its number of ClientAppActors)."""
    override = settings.ray_homes()
    if override is not None:
        return override
    return len(_layout())


def home_index(context: Context, homes: int) -> int:
    """The home of a node: its partition id (Flower's simulation numbers them 0..N-1, so
    nodes spread evenly) or else its node id, modulo the number of homes."""
    partition = context.node_config.get("partition-id")
    key = int(partition) if isinstance(partition, int) else int(context.node_id)
    return key % homes


def where() -> dict[str, Any]:
    """Where this process runs: host, pid and (in Ray) node id and address."""
    out: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    ray = _ray()
    if ray is not None and ray.is_initialized():
        context = ray.get_runtime_context()
        out["ray-node-id"] = context.get_node_id()
        try:
            out["ray-node-ip"] = ray.util.get_node_ip_address()
        except Exception:  # noqa: BLE001
            pass
    return out


class _Home:
    """A home actor: runs FedTAN handlers next to the live rounds it keeps."""

    def __init__(self, name: str, threads: int, sharers: int = 1) -> None:
        from .live import live_rounds

        mark_home("ray")
        live_rounds().sharers = max(1, sharers)
        self.name = name
        self.nodes: set[int] = set()
        try:
            import torch

            torch.set_num_threads(max(1, threads))
        except ImportError:  # pragma: no cover - FedTAN's handlers need torch anyway
            pass

    def call(self, handler: Callable[..., Message], msg: Message, context: Context,
             args: tuple) -> tuple[Message, RecordDict]:
        if context.node_id not in self.nodes:
            self.nodes.add(context.node_id)
            info = where()
            # One line per (home, node): where each node's live step lives (see the docs).
            print(f"FedTAN live home {self.name}: node {context.node_id} (run {context.run_id}) "
                  f"on host {info['host']} ray-node {info.get('ray-node-id')} "
                  f"ip {info.get('ray-node-ip')} pid {info['pid']}", flush=True)
        reply = handler(msg, context, *args)
        return reply, node_state.records(context)

    def stats(self) -> dict[str, Any]:
        from .live import live_rounds

        return {**where(), "name": self.name, "nodes": sorted(self.nodes), **live_rounds().stats()}


def _remote_class():
    global _home_class
    if _home_class is None:
        _home_class = _ray().remote(_Home)
    return _home_class


def _sharers(slots: list[str], index: int, homes: int) -> int:
    """How many of the ``homes`` are placed on the Ray node of home ``index``."""
    if not slots:
        return homes
    machine = slots[index % len(slots)]
    return sum(slots[other % len(slots)] == machine for other in range(homes))


def _handle(run_id: int, index: int, homes: int, fresh: bool = False):
    name = f"fedtan-home-{run_id}-{index}-of-{homes}"
    with _lock:
        if not fresh and name in _handles:
            return _handles[name]
    slots = _layout()
    options: dict[str, Any] = dict(name=name, get_if_exists=True, num_cpus=0, num_gpus=0, max_concurrency=1,
                                   max_restarts=0)
    if _gpus > 0:
        # A home reserves no GPU (a reservation would leave a ClientAppActor pending), and Ray
        # hides the GPUs from an actor without one unless told not to: the home then sees
        # the GPUs of its machine, and the clients' device (e.g. "cuda:0") names one of them.
        options["runtime_env"] = {"env_vars": {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}}
    if slots:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(slots[index % len(slots)], soft=True)
    handle = _remote_class().options(**options).remote(name, _threads, _sharers(slots, index, homes))
    with _lock:
        # Kept for the life of this process: a home is owned by the process that created
        # it, and Ray ends an actor whose owner dropped every handle to it.
        _handles[name] = handle
    return handle


def call_home(handler: Callable[..., Message], msg: Message, context: Context,
              args: tuple) -> tuple[Message, RecordDict]:
    """Run ``handler(msg, context, *args)`` in the node's home actor; (reply, state)."""
    ray = _ray()
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    homes = homes_wanted()
    index = home_index(context, homes)
    for attempt in range(2):
        home = _handle(context.run_id, index, homes, fresh=attempt > 0)
        try:
            return ray.get(home.call.remote(handler, msg, context, args))
        except (RayActorError, ActorDiedError, ActorUnavailableError) as error:
            if attempt:
                raise RuntimeError(
                    f"FedTAN: the live-round home {index} of node {context.node_id} died twice in a row "
                    f"({error}); the node's message cannot be served"
                ) from None
            log.warning("FedTAN: live-round home %d of node %s is gone (%s); recreating it, the node's "
                        "round will be replayed from its state", index, context.node_id, error)
    raise AssertionError("unreachable")  # pragma: no cover
