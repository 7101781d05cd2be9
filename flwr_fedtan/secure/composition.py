"""Which wrapped Flower strategies can work under secure model aggregation.

With secure models the server never holds a client's model, only the weighted average and
the total weight; the wrapped strategy receives that aggregate in place of the individual
replies. Strategies that average (FedAvg) and then step a server optimiser on the average
(FedAdam, FedYogi, FedAdagrad, FedAvgM), or that only change the clients' training (FedProx),
work unchanged, and so does client-side clipping DP (the clients clip, the server adds noise
to the aggregate). What needs the individual updates is refused at construction, with the
fix: server-side clipping DP, robust aggregation (FedMedian, FedTrimmedAvg, Krum, MultiKrum,
Bulyan), q-FFL (QFedAvg) and the XGBoost strategies.

Flower is imported inside the functions only, so importing this module costs nothing on a
server without it (the server side imports no torch either way).
"""

from __future__ import annotations

from typing import Any

from ..errors import ArgumentProblem, InvalidArgumentsError

__all__ = ["secure_models_problems", "check_secure_models_composes"]

_OWNER = "FedTAN(secure_models=True)"
_SUM_STRATEGIES = ("FedAvg", "FedAdam", "FedYogi", "FedAdagrad", "FedAvgM", "FedProx", "FedOpt")
_AVERAGING_FIX = (
    "wrap FedAvg, FedAdam, FedYogi, FedAdagrad, FedAvgM or FedProx (optionally in "
    "DifferentialPrivacyClientSideFixedClipping/AdaptiveClipping), or keep this strategy with secure_models=False"
)


def _refusals() -> list[tuple[tuple[type, ...], str, str]]:
    """``(classes, why, fix)`` of the strategies that need individual updates."""
    from flwr.serverapp import strategy as flower

    return [
        ((flower.DifferentialPrivacyServerSideFixedClipping, flower.DifferentialPrivacyServerSideAdaptiveClipping),
         "server-side clipping DP clips every client's update on the server, and the server never sees one",
         "clip on the clients: DifferentialPrivacyClientSideFixedClipping (with Flower's fixedclipping_mod on "
         "the ClientApp) or DifferentialPrivacyClientSideAdaptiveClipping (with adaptiveclipping_mod), which "
         "compose with secure models; or secure_models=False"),
        ((flower.FedMedian, flower.FedTrimmedAvg, flower.MultiKrum, flower.Krum, flower.Bulyan),
         "robust aggregation compares the individual updates (medians, trimmed means, Krum scores), and the "
         "server only learns their sum",
         _AVERAGING_FIX),
        ((flower.QFedAvg,),
         "q-FFL reweights each client's update by its own loss, and the server only learns the sum",
         _AVERAGING_FIX),
        ((flower.FedXgbBagging, flower.FedXgbCyclic),
         "the XGBoost strategies combine the clients' trees one by one, not a weighted sum of arrays",
         "secure_models=False"),
    ]


def _client_side_dp() -> tuple[type, ...]:
    from flwr.serverapp import strategy as flower

    return (flower.DifferentialPrivacyClientSideFixedClipping, flower.DifferentialPrivacyClientSideAdaptiveClipping)


def _aggregates_a_sum(strategy: Any) -> bool:
    """Whether ``strategy.aggregate_train`` is one of the averaging strategies' own (a subclass
    that only changes configuration inherits it)."""
    from flwr.serverapp import strategy as flower

    averaging = {getattr(flower, name) for name in _SUM_STRATEGIES if hasattr(flower, name)}
    owner = next((cls for cls in type(strategy).__mro__ if "aggregate_train" in vars(cls)), None)
    return owner in averaging


def secure_models_problems(strategy: Any, allow_custom: bool = False, name: str = "strategy") -> list[ArgumentProblem]:
    """Why ``strategy`` cannot work on the secure sum of the models, with the fix; empty if
    it can.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        The strategy FedTAN wraps (client-side DP wrappers are looked through to theirs).
    allow_custom : bool (default: False)
        Accept a strategy with its own ``aggregate_train`` that is none of the known ones:
        its author vouches that it works on one reply holding the weighted average.
    name : str
        How the problem names the argument.
    """
    label = type(strategy).__name__
    for classes, why, fix in _refusals():
        if isinstance(strategy, classes):
            return [ArgumentProblem(name, label, why, fix)]
    if isinstance(strategy, _client_side_dp()):
        return secure_models_problems(getattr(strategy, "strategy"), allow_custom, f"{name}.strategy")
    if _aggregates_a_sum(strategy) or allow_custom:
        return []
    return [ArgumentProblem(
        name, label,
        "its aggregate_train is none of the averaging strategies' (FedAvg, FedAdam, FedYogi, FedAdagrad, "
        "FedAvgM, FedProx): under secure models it would receive one reply holding the weighted average, "
        "never the individual updates",
        f"{_AVERAGING_FIX}; or, if it does work on that one reply, accept it explicitly (allow_custom=True)",
    )]


def check_secure_models_composes(strategy: Any, allow_custom: bool = False) -> None:
    """Refuse, at construction, a wrapped strategy that needs the individual updates.

    Raises
    ------
    InvalidArgumentsError
        Naming the strategy, why it cannot work on the sum, and the fix.
    """
    problems = secure_models_problems(strategy, allow_custom)
    if problems:
        raise InvalidArgumentsError(_OWNER, problems)
