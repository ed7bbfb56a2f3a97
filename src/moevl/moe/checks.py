"""Argument checks shared by the routers and the settings objects.

Each check raises ``ValueError`` naming the argument, what was expected and what was given. Numbers
must be finite (nan and inf are refused everywhere) and ``bool`` is never accepted as a number
(``True`` is an ``int`` in Python; a flag where a count belongs is a mistake, not a 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` must be an ``int`` (not a bool, not a float) in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer{_range(minimum, maximum)}, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer{_range(minimum, maximum)}, got {value!r}")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
) -> float:
    """``value`` must be a finite real number (int or float, not a bool) in the given range."""
    bounds = _range(minimum, maximum, exclusive_minimum, exclusive_maximum)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{bounds}, got {value!r}")
    low_bad = minimum is not None and (value <= minimum if exclusive_minimum else value < minimum)
    high_bad = maximum is not None and (value >= maximum if exclusive_maximum else value > maximum)
    if low_bad or high_bad:
        raise ValueError(f"{name} must be a finite number{bounds}, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` must be ``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` must be one of the strings ``choices``."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def _range(
    minimum: float | None,
    maximum: float | None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
) -> str:
    low = None if minimum is None else f"{'>' if exclusive_minimum else '>='} {minimum}"
    high = None if maximum is None else f"{'<' if exclusive_maximum else '<='} {maximum}"
    parts = [p for p in (low, high) if p is not None]
    return f" {' and '.join(parts)}" if parts else ""
