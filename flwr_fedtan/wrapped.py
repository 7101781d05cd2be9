"""The strategy FedTAN wraps: built from FedAvg's options, its settings read through
Flower's wrappers, its node sampling seeded. No torch here."""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator, Optional

from flwr.serverapp.strategy import FedAvg, Strategy

__all__ = ["FEDAVG_OPTIONS", "find_attribute", "sampling_seed", "wrapped_strategy"]


@contextlib.contextmanager
def sampling_seed(seed: int) -> Iterator[None]:
    """Run a wrapped strategy's ``configure_train`` with the module ``random`` seeded.

    Flower's strategies sample nodes with ``random.sample`` on the global generator
    (``strategy_utils.sample_nodes``); seeding it here makes any wrapped strategy's choice a
    function of (FedTAN's seed, round), and restoring the state afterwards leaves the
    caller's random stream exactly as it was.
    """
    saved = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved)




FEDAVG_OPTIONS = (
    "fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
    "min_available_nodes", "weighted_by_key", "arrayrecord_key", "configrecord_key",
    "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn",
)


def find_attribute(strategy: Strategy, name: str, default: Any) -> Any:
    """``name`` of a strategy, or of the strategy it wraps (Flower's DP wrappers)."""
    seen = 0
    current: Optional[Strategy] = strategy
    while current is not None and seen < 16:
        if name in vars(current):
            return getattr(current, name)
        current = getattr(current, "strategy", None)
        seen += 1
    return default


def wrapped_strategy(strategy: Optional[Strategy], fedavg_options: dict[str, Any]) -> Strategy:
    """``strategy``, or without one a ``FedAvg`` built from ``fedavg_options`` (those not
    ``None``); options given beside a strategy are refused with the fix."""
    options = {name: value for name, value in fedavg_options.items() if value is not None}
    if strategy is None:
        strategy = FedAvg(**options)
    elif options:
        raise ValueError(
            f"FedTAN got both strategy= and FedAvg options {sorted(options)}: set them on the wrapped "
            f"strategy instead, e.g. FedTAN(strategy={type(strategy).__name__}({', '.join(sorted(options))}=...))"
        )
    if not isinstance(strategy, Strategy):
        raise TypeError(f"strategy must be a flwr.serverapp.strategy.Strategy, got {type(strategy).__name__}")
    return strategy
