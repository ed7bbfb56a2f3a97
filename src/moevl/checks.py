"""Argument checks for all of moevl, with one message: ``"<name> must be <what>, got <value>"``.

``name`` is the argument as its caller knows it (``top_k``, ``stgc.weight``, ``--steps``, ``config key
'moe.top_k'``), ``what`` the values accepted, ``value`` the one given (its ``repr``), e.g. ``"stgc.scope
must be one of 'all', 'last', 'delta', got 'first'"``. Each check raises ``ValueError`` (``check`` raises
the subclass a caller asks for, e.g. ``ConfigError``). Numbers must be finite (nan and inf are refused
everywhere) and ``bool`` is never accepted as a number (``True`` is an ``int`` in Python; a flag where a
count belongs is a mistake, not a 1). Messages that need a shape or a type name as the given value are
written in the same words where they are raised (``"hidden must be (N, 8), got shape (3, 4)"``).

A leaf: this module imports nothing of moevl, so every part may use it, ``moe`` included (``moe``
imports nothing else of moevl).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["SEED_LIMIT", "check", "check_bool", "check_choice", "check_float", "check_int", "check_seed"]

SEED_LIMIT = 2**64  # torch.manual_seed takes 0 .. 2**64 - 1


def check(ok: bool, name: str, what: str, given: Any, *, error: type[ValueError] = ValueError) -> None:
    """``error(f"{name} must be {what}, got {given!r}")`` unless ``ok``: the check no helper below
    expresses (a relation between values, a non-empty list, ...)."""
    if not ok:
        raise error(f"{name} must be {what}, got {given!r}")


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` must be an ``int`` (not a bool, not a float) in ``[minimum, maximum]``."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    check(ok, name, f"an integer{_range(minimum, maximum)}", value)
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
    """``value`` must be a finite real number (int or float, not a bool) in the given range; returns it
    as a ``float``."""
    what = f"a finite number{_range(minimum, maximum, exclusive_minimum, exclusive_maximum)}"
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    try:
        number = float(value) if ok else math.nan
    except OverflowError:  # an integer beyond float's range
        number = math.nan
    check(math.isfinite(number), name, what, value)
    low_bad = minimum is not None and (number <= minimum if exclusive_minimum else number < minimum)
    high_bad = maximum is not None and (number >= maximum if exclusive_maximum else number > maximum)
    check(not (low_bad or high_bad), name, what, value)
    return number


def check_bool(name: str, value: Any) -> bool:
    """``value`` must be ``True`` or ``False`` (not 0/1, not a string)."""
    check(isinstance(value, bool), name, "True or False", value)
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` must be one of the strings ``choices``."""
    choices = tuple(choices)
    check(isinstance(value, str) and value in choices, name, f"one of {', '.join(map(repr, choices))}", value)
    return value


def check_seed(name: str, value: Any) -> int:
    """``value`` must be an integer torch accepts as a seed (``0 <= value < 2**64``)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < SEED_LIMIT
    check(ok, name, "an integer in [0, 2**64) (torch's seed range)", value)
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
