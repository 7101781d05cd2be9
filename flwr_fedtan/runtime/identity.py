"""What this process is: a node's home (a Ray home actor, a node worker), or a deployment
``flwr-clientapp`` process. Imported by every runtime module; imports none of them."""

from __future__ import annotations

import os
import sys
from typing import Optional

__all__ = ["in_flwr_clientapp_process", "in_home", "mark_home"]

_inside_home: Optional[str] = None


def mark_home(kind: str) -> None:
    """Declare this process a home (a Ray home actor or a node worker): handlers run here."""
    global _inside_home
    _inside_home = kind


def in_home() -> Optional[str]:
    """The kind of home this process is, if it is one."""
    return _inside_home


def in_flwr_clientapp_process() -> bool:
    """Whether this is a deployment ``flwr-clientapp`` process (one per message)."""
    return os.path.basename(sys.argv[0] if sys.argv else "").startswith("flwr-clientapp")
