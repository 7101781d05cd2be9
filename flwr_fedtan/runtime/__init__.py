"""Where a node's live FedTAN step lives between messages.

- :mod:`.live`: the in-process home, an LRU cache of paused rounds bounded by memory
  (:mod:`.footprint` measures a round and the memory available);
- :mod:`.ray_home`: Ray home actors, for simulations with several ClientAppActors and for
  Ray clusters;
- :mod:`.worker`: the node worker of a deployed SuperNode, behind a private Unix socket
  (:mod:`.framing`: its wire format);
- :mod:`.dispatch`: picks the home of a message (:func:`run_at_home`);
- :mod:`.node_app`: :func:`node_client_app`, a ClientApp whose module imports no torch.

Importing this package imports Flower but neither torch nor Ray.
"""

from .dispatch import HOMES, home_kind, run_at_home
from .live import LiveRounds, live_rounds
from .node_app import node_client_app

__all__ = ["HOMES", "LiveRounds", "home_kind", "live_rounds", "node_client_app", "run_at_home"]
