"""Checks of the detection side's numeric settings: one message format, ``"name: expected ..., got ..."``,
so ``moevl.config.build`` can prefix the recipe key and the CLI the option name."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Literal

#: Names the command line checks before anything heavy is imported (``moevl.detection.cli``).
DistillMethod = Literal["none", "kl", "ld", "bckd"]
DISTILL_METHODS: tuple[str, ...] = typing.get_args(DistillMethod)
SPLITS = ("train", "validation", "test")  # the split names of moevl.data too
ROLES = ("teacher", "student")

__all__ = ["check_fields", "check_number", "check_seed"]

SEED_LIMIT = 2**64  # torch.manual_seed takes 0 .. 2**64 - 1


def check_number(
    name: str, value: object, *, minimum: float, inclusive: bool = True, integer: bool = False
) -> None:
    """``ValueError`` unless ``value`` is a finite number (never a bool; an ``int`` when ``integer``)
    that is ``>= minimum`` (``> minimum`` when not ``inclusive``)."""
    kind = "an integer" if integer else "a finite number"
    bound = f"{'>=' if inclusive else '>'} {minimum:g}"
    number = int if integer else int | float
    ok = isinstance(value, number) and not isinstance(value, bool)
    ok = ok and (isinstance(value, int) or math.isfinite(value))  # NOTE: isfinite(10**400) overflows
    if not (ok and (value >= minimum if inclusive else value > minimum)):
        raise ValueError(f"{name}: expected {kind} {bound}, got {value!r}")


def check_fields(obj: object, rules: dict[str, tuple[float, bool]]) -> None:
    """``check_number`` on each field of the dataclass ``obj`` named in ``rules`` (``minimum, inclusive``);
    a field annotated ``int`` must hold an ``int``."""
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        if f.name in rules:
            minimum, inclusive = rules[f.name]
            integer = f.type in (int, "int")
            check_number(f.name, getattr(obj, f.name), minimum=minimum, inclusive=inclusive, integer=integer)


def check_seed(name: str, value: object) -> None:
    """``ValueError`` unless ``value`` is an integer torch accepts as a seed (``0 <= value < 2**64``)."""
    check_number(name, value, minimum=0, integer=True)
    if value >= SEED_LIMIT:  # type: ignore[operator]
        raise ValueError(f"{name}: expected an integer < 2**64 (torch's seed range), got {value}")
