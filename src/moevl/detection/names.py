"""The detection side's vocabularies, in a module without torch: the command line checks its options
against them before anything heavy is imported (``moevl.detection.cli``)."""

from __future__ import annotations

import typing
from typing import Literal

__all__ = ["DISTILL_METHODS", "ROLES", "SPLITS", "DistillMethod"]

DistillMethod = Literal["none", "kl", "ld", "bckd"]
DISTILL_METHODS: tuple[str, ...] = typing.get_args(DistillMethod)
SPLITS = ("train", "validation", "test")  # the split names of moevl.data too
ROLES = ("teacher", "student")
