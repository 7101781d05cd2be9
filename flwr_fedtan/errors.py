"""The errors FedTAN raises, in one module every other module may import (it imports nothing
of the package, nor torch, nor Flower).

Every error derives from :class:`FedTANError` and from the built-in exception a caller
would expect (``ValueError`` for bad input, ``RuntimeError`` for a step driven out of
order, ``PermissionError`` for an unsafe path), so ``except ValueError`` keeps working.

- the model: :class:`UnsupportedModelError` listing :class:`ModelIssue`\\ s;
- settings and data: :class:`InvalidArgumentsError` listing :class:`ArgumentProblem`\\ s,
  :class:`ClientDataError`;
- a synchronised step: :class:`StepProtocolError`;
- the wire: :class:`PayloadError` (a client's contribution, server side),
  :class:`ServerMessageError` (the server's message, client side);
- secure statistics: :class:`SecureStatsError` and its subclasses;
- node-local files: :class:`UnsafePathError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Sequence, Union

__all__ = [
    "ArgumentProblem",
    "CanaryMismatchError",
    "ClientDataError",
    "FedTANError",
    "FixedPointOverflowError",
    "InvalidArgumentsError",
    "KeyAgreementError",
    "MaskMismatchError",
    "MissingPayloadError",
    "ModelIssue",
    "PayloadError",
    "SecureStatsError",
    "ServerMessageError",
    "StepProtocolError",
    "UnsafePathError",
    "UnsupportedModelError",
]


class FedTANError(Exception):
    """Base class of every error FedTAN raises on purpose."""


# ---------------------------------------------------------------------- the model
@dataclass(frozen=True)
class ModelIssue:
    """One thing FedTAN cannot synchronise in a model, where it is, and how to fix it."""

    module: str  # qualified module name ("<model>" for the model itself)
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.module}: {self.problem}. Fix: {self.fix}"


class UnsupportedModelError(FedTANError, ValueError):
    """A model or layer configuration FedTAN cannot synchronise.

    ``issues`` lists every :class:`ModelIssue` found (empty when raised for one layer).
    """

    def __init__(self, issues: Union[str, list[ModelIssue]]) -> None:
        if isinstance(issues, str):
            self.issues: list[ModelIssue] = []
            super().__init__(issues)
        else:
            self.issues = list(issues)
            super().__init__(
                f"FedTAN cannot synchronise this model ({len(self.issues)} issue"
                + ("s" if len(self.issues) != 1 else "") + "):\n"
                + "\n".join(f"- {issue}" for issue in self.issues)
            )


# ---------------------------------------------------------------------- settings and data
@dataclass(frozen=True)
class ArgumentProblem:
    """One setting that cannot work: its name, the value given, why, and the fix."""

    name: str
    value: Any
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.name}={self.value!r}: {self.problem}. Fix: {self.fix}"


class InvalidArgumentsError(FedTANError, ValueError):
    """Settings refused before anything ran; ``problems`` lists every one."""

    def __init__(self, owner: str, problems: list[ArgumentProblem]) -> None:
        self.owner = owner
        self.problems = list(problems)
        count = len(self.problems)
        super().__init__(
            f"{owner}: {count} invalid setting{'s' if count != 1 else ''}:\n"
            + "\n".join(f"- {problem}" for problem in self.problems)
        )


class ClientDataError(FedTANError, ValueError):
    """A client's training data cannot be trained on; the message says why and the fix."""


# ---------------------------------------------------------------------- a synchronised step
class StepProtocolError(FedTANError, RuntimeError):
    """The step was driven out of order, or an aggregate does not fit the sync point."""


# ---------------------------------------------------------------------- the wire
class PayloadError(FedTANError, ValueError):
    """A client's contribution is malformed.

    Attributes
    ----------
    client : Hashable
        The id of the offending client (a Flower node id, or a list index in-process).
    """

    def __init__(self, client: Hashable, message: str) -> None:
        super().__init__(f"client {client}: {message}")
        self.client = client


class ServerMessageError(FedTANError, ValueError):
    """A ``train.fedtan`` message from the server is malformed (client side).

    Raised before anything of the message reaches the client's step: a buggy or hostile
    server makes the client fail with this error (Flower returns it to the server as an
    error reply) instead of hanging or taking a wrong step. A node's replay log, which
    holds the server's aggregates, raises it too when an entry is corrupt
    (:mod:`flwr_fedtan.protocol.codec` checks both alike).
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"invalid train.fedtan message from the server: {message}")


# ---------------------------------------------------------------------- secure statistics
class SecureStatsError(FedTANError, ValueError):
    """Base class of the errors of secure statistics."""


class KeyAgreementError(SecureStatsError):
    """A key is missing, malformed or does not match the roster."""


class FixedPointOverflowError(SecureStatsError):
    """A value or a sum does not fit the fixed-point range (see :mod:`flwr_fedtan.secure`)."""


class MaskMismatchError(SecureStatsError):
    """The masks did not cancel: some client used other keys, another roster, round,
    attempt or exchange index than the others (e.g. a stale payload), or the counts sent
    in the clear do not add up to the pooled count decoded from the masked sums.

    Only the masks are checked: a client that encodes false statistics under the right
    masks is outside the threat model (see docs/security.md, "Secure statistics")."""


class CanaryMismatchError(MaskMismatchError):
    """The canaries did not sum to zero: some client's masks, or its canary, are not what
    its pair keys give. :func:`flwr_fedtan.secure.blame_canary` finds which client, from the
    pair masks of the canary position every client reveals
    (:func:`flwr_fedtan.secure.canary_masks`)."""


class MissingPayloadError(SecureStatsError):
    """Payloads of some roster members are missing: the sum cannot be unmasked without
    them. Restart the step with the survivors (a new attempt, so fresh masks)."""

    def __init__(self, missing: Sequence[int], message: str) -> None:
        super().__init__(message)
        self.missing = tuple(missing)


# ---------------------------------------------------------------------- node-local files
class UnsafePathError(FedTANError, PermissionError):
    """A node-local folder or file is not private to this user (or not what it should be).

    The message names the path, what is wrong with it and how to fix it.
    """
