"""Settings checked all at once, before anything runs: every problem listed with its fix.

:class:`ArgumentChecks` collects the problems of a constructor's arguments (or of a run
config) and :meth:`ArgumentChecks.raise_if_any` raises one :class:`InvalidArgumentsError`
listing them all, so that a user fixes every setting in one go instead of meeting them one
per attempt, or in the middle of a round. No torch here: the server side uses it too.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Collection, Optional

from .errors import ArgumentProblem, InvalidArgumentsError

__all__ = ["ArgumentChecks"]


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


class ArgumentChecks:
    """Collects :class:`ArgumentProblem` s for ``owner`` (e.g. ``"FedTAN"``).

    Each check returns whether the value passed, so that checks depending on it (a
    combination of two settings) can be skipped when it is already wrong.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.problems: list[ArgumentProblem] = []

    def add(self, name: str, value: Any, problem: str, fix: str) -> None:
        """Record a problem."""
        self.problems.append(ArgumentProblem(name, value, problem, fix))

    def integer(self, name: str, value: Any, minimum: Optional[int] = None, *, fix: Optional[str] = None) -> bool:
        """``value`` is an integer (not a bool) ``>= minimum``."""
        if not _is_integer(value):
            self.add(name, value, "must be an integer", fix or f"give a whole number{_at_least(minimum)}")
            return False
        if minimum is not None and value < minimum:
            self.add(name, value, f"must be >= {minimum}", fix or f"give a whole number{_at_least(minimum)}")
            return False
        return True

    def number(
        self,
        name: str,
        value: Any,
        *,
        above: Optional[float] = None,
        at_least: Optional[float] = None,
        below: Optional[float] = None,
        at_most: Optional[float] = None,
        fix: Optional[str] = None,
    ) -> bool:
        """``value`` is a finite real number (an integer is fine, a bool is not) in the range."""
        bounds = [f"> {above}" if above is not None else "", f">= {at_least}" if at_least is not None else "",
                  f"< {below}" if below is not None else "", f"<= {at_most}" if at_most is not None else ""]
        wanted = " and ".join(b for b in bounds if b)
        default_fix = f"give a number{' ' + wanted if wanted else ''}"
        if not _is_number(value):
            self.add(name, value, "must be a finite number", fix or default_fix)
            return False
        real = float(value)
        outside = ((above is not None and real <= above) or (at_least is not None and real < at_least)
                   or (below is not None and real >= below) or (at_most is not None and real > at_most))
        if outside:
            self.add(name, value, f"must be {wanted}", fix or default_fix)
            return False
        return True

    def choice(self, name: str, value: Any, choices: Collection[Any], *, fix: Optional[str] = None) -> bool:
        """``value`` is one of ``choices``."""
        if value not in choices:
            self.add(name, value, f"must be one of {', '.join(repr(c) for c in choices)}", fix or "choose one of them")
            return False
        return True

    def boolean(self, name: str, value: Any) -> bool:
        """``value`` is ``True`` or ``False``."""
        if not isinstance(value, bool):
            self.add(name, value, "must be true or false", "give true or false")
            return False
        return True

    def raise_if_any(self) -> None:
        """Raise :class:`InvalidArgumentsError` listing every problem, if any was found."""
        if self.problems:
            raise InvalidArgumentsError(self.owner, self.problems)


def _at_least(minimum: Optional[int]) -> str:
    return "" if minimum is None else f" >= {minimum}"
