"""Hugging Face integration, model surgery: upcycling, adopting native MoE models, LoRA, the routing runtime.

Checkpoint formats are in ``moevl.checkpoint``, the Trainer in ``moevl.training`` (both import this package).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from moevl.hf.adopt import adopt, is_native_moe
from moevl.hf.lora import apply_lora, merge_lora
from moevl.hf.runtime import RoutingContext, aux_loss, moe_blocks
from moevl.hf.settings import MoESettings
from moevl.hf.settings import UpcycleSettings as UpcycleSettings  # older name, not in __all__
from moevl.hf.upcycle import upcycle

__all__ = [
    "MoESettings",
    "RoutingContext",
    "adopt",
    "apply_lora",
    "aux_loss",
    "is_native_moe",
    "merge_lora",
    "moe_blocks",
    "upcycle",
]

#: Names ``moevl.hf`` exported before they moved (issue 25) -> their package now. They still resolve here,
#: with a ``DeprecationWarning``, for one release; imported on first use, since those packages import ``hf``.
_MOVED = {
    "ExportResult": "moevl.checkpoint",
    "export": "moevl.checkpoint",
    "is_moevl_checkpoint": "moevl.checkpoint",
    "load_moe_llava": "moevl.checkpoint",
    "load_moe_model": "moevl.checkpoint",
    "load_upcycled": "moevl.checkpoint",
    "save_moe_model": "moevl.checkpoint",
    "save_upcycled": "moevl.checkpoint",
    "MoETrainer": "moevl.training",
    "UniformRoutingMonitor": "moevl.training",
    "routing_statistics": "moevl.training",
}


def __getattr__(name: str) -> Any:
    package = _MOVED.get(name)
    if package is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"moevl.hf.{name} moved to {package}.{name}; the old name will be removed in the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(package), name)
