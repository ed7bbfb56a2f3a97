"""Hugging Face integration: upcycling, adopting native MoE models, LoRA, the routing runtime."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from moevl.hf.adopt import adopt, is_native_moe
from moevl.hf.export import ExportResult, export
from moevl.hf.io import is_moevl_checkpoint, load_moe_model, load_upcycled, save_moe_model, save_upcycled
from moevl.hf.lora import apply_lora, merge_lora
from moevl.hf.moe_llava import load_moe_llava
from moevl.hf.runtime import RoutingContext, aux_loss, moe_blocks
from moevl.hf.settings import MoESettings
from moevl.hf.settings import UpcycleSettings as UpcycleSettings  # older name, not in __all__
from moevl.hf.upcycle import upcycle

__all__ = [
    "ExportResult",
    "MoESettings",
    "RoutingContext",
    "adopt",
    "apply_lora",
    "aux_loss",
    "export",
    "is_moevl_checkpoint",
    "is_native_moe",
    "load_moe_llava",
    "load_moe_model",
    "load_upcycled",
    "merge_lora",
    "moe_blocks",
    "save_moe_model",
    "save_upcycled",
    "upcycle",
]

#: Names ``moevl.hf`` exported before they moved (issue 25) -> their package now. They still resolve here,
#: with a ``DeprecationWarning``, for one release; imported on first use, since those packages import ``hf``.
_MOVED = {
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
