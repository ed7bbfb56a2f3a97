"""Names that left a package's public surface (or moved to another package) keep working for one release.

A package lists them with the module that holds each one now and sets ``__getattr__ = moved_names(...)``:
``from moevl.hf import load_moe_model`` then still returns the object, with a ``DeprecationWarning`` that
says where to import it from. Lazy: nothing is imported until such a name is asked for. A leaf module:
imports nothing of moevl.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

#: The release that removes the old names.
REMOVED_IN = "0.3"


def moved_names(package: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``moved[name]`` is the module that holds ``name`` now, or
    ``"module:new_name"`` for an older name of another object (``UpcycleSettings`` -> ``MoESettings``)."""

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, new = moved[name].partition(":")
        where = f"use {module}.{new}" if new else f"import it from {module}"
        warnings.warn(
            f"{package}.{name} is deprecated and goes in moevl {REMOVED_IN}: {where}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), new or name)

    return __getattr__
