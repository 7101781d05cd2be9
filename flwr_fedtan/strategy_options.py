"""FedTAN's options: checked all at once, each kept where it is read, forwarded as attributes.

No torch here. The options of the rounds and of the statistics passes live in one
:class:`~flwr_fedtan.protocol.driver.RoundOptions` that :class:`~flwr_fedtan.FedTAN` holds
and both drivers read; the repeat-offender options live in its
:class:`~flwr_fedtan.quarantine.Quarantine`. FedTAN's attributes of the same names forward
to them (:func:`forwarded`), so ``strategy.exchange_timeout = 30`` after construction
reaches the next round, checked as the constructor checks it.
"""

from __future__ import annotations

from logging import INFO
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from flwr.supercore import log

from .arguments import ArgumentChecks
from .exact_statistics import STATISTICS_CHECKS
from .round_models import CLIENT_WEIGHTS

if TYPE_CHECKING:
    from .strategy import FedTAN

__all__ = ["OPTION_CHECKS", "check_options", "forwarded", "log_summary"]

OPTION_CHECKS: dict[str, Callable[[ArgumentChecks, Any], object]] = {
    "sync_steps": lambda checks, value: checks.integer("sync_steps", value, 1),
    "exchange_timeout": lambda checks, value: checks.number(
        "exchange_timeout", value, above=0, fix="give the seconds to wait for a reply, > 0"),
    "max_restarts": lambda checks, value: checks.integer("max_restarts", value, 0),
    "poll_interval": lambda checks, value: checks.number("poll_interval", value, above=0),
    "seed": lambda checks, value: checks.integer("seed", value),
    "client_weight": lambda checks, value: checks.choice("client_weight", value, CLIENT_WEIGHTS),
    "quarantine_after": lambda checks, value: value is None or checks.integer(
        "quarantine_after", value, 1, fix="give a whole number >= 1, or None"),
    "max_quarantine_rounds": lambda checks, value: checks.integer("max_quarantine_rounds", value, 1),
    "keep_checkpoints": lambda checks, value: checks.integer(
        "keep_checkpoints", value, 0, fix="give a whole number >= 0 (0 keeps all)"),
    "secure_stats": lambda checks, value: checks.boolean("secure_stats", value),
    "secure_models": lambda checks, value: checks.boolean("secure_models", value),
    "max_growth": lambda checks, value: checks.number("max_growth", value, above=1),
    "progress_interval": lambda checks, value: value is None or checks.number(
        "progress_interval", value, at_least=0,
        fix="give the seconds between two progress lines, >= 0, or None for no such line"),
    **STATISTICS_CHECKS,
}
"""How FedTAN checks each of its options, in the order its error lists the problems."""


def check_options(values: Mapping[str, Any], owner: str = "FedTAN") -> None:
    """Check ``values`` (option name -> value); raise one
    :class:`~flwr_fedtan.errors.InvalidArgumentsError` listing every problem with its fix."""
    checks = ArgumentChecks(owner)
    for name, check in OPTION_CHECKS.items():
        if name in values:
            check(checks, values[name])
    checks.raise_if_any()


def forwarded(holder: str, name: str, field: Optional[str] = None,
              check: Optional[Callable[[FedTAN, Any], object]] = None) -> property:
    """FedTAN's attribute ``name``: ``self.<holder>.<field>`` (``field`` defaults to
    ``name``), read where it is used; setting it checks the value first (and calls
    ``check(strategy, value)``, which raises to refuse it)."""
    field = field or name

    def get(strategy: FedTAN) -> Any:
        return getattr(getattr(strategy, holder), field)

    def set_(strategy: FedTAN, value: Any) -> None:
        check_options({name: value})
        if check is not None:
            check(strategy, value)
        setattr(getattr(strategy, holder), field, value)

    return property(get, set_, doc=f"FedTAN's ``{name}`` (see its parameters); settable between rounds.")


def log_summary(strategy: FedTAN) -> None:
    """Log FedTAN's settings (Flower's ``summary``), then the wrapped strategy's."""
    log(INFO, "\t├──> FedTAN around %s:", type(strategy.strategy).__name__)
    log(INFO, "\t│\t├── Synchronised steps per round: %d", strategy.sync_steps)
    log(INFO, "\t│\t├── Secure statistics: %s; secure models: %s", "on" if strategy.secure_stats else "off",
        "on" if strategy.secure_models else "off")
    log(INFO, "\t│\t├── Exchange timeout: %.1fs, poll interval %.3fs", strategy.exchange_timeout,
        strategy.poll_interval)
    log(INFO, "\t│\t├── Max restarts per round: %d; sit out after %s failed rounds (at most %d rounds)",
        strategy.max_restarts, strategy.quarantine_after, strategy.max_quarantine_rounds)
    log(INFO, "\t│\t├── BatchNorm statistics: %s", "exact (pass every %d rounds, %d examples per client)" % (
        strategy.statistics_every, strategy.statistics_examples) if strategy.statistics == "exact" else "running")
    log(INFO, "\t│\t└── Client weight: %s; seed %d", strategy.client_weight, strategy.seed)
    strategy.strategy.summary()
