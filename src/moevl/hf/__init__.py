"""Hugging Face integration, model surgery: upcycling, adopting native MoE models, LoRA, the routing runtime.

Checkpoint formats are in ``moevl.checkpoint``, the Trainer in ``moevl.training`` (both import this package).
"""

from __future__ import annotations

from moevl._deprecated import moved_names
from moevl.hf.adopt import adopt, is_native_moe
from moevl.hf.lora import apply_lora, merge_lora
from moevl.hf.runtime import (
    MoEState,
    RoutingContext,
    attach,
    aux_loss,
    detach,
    find_moe_state,
    moe_blocks,
    moe_state,
)
from moevl.hf.settings import MoESettings
from moevl.hf.settings import UpcycleSettings as UpcycleSettings  # older name, not in __all__
from moevl.hf.upcycle import upcycle

__all__ = [
    "MoESettings",
    "MoEState",
    "RoutingContext",
    "adopt",
    "apply_lora",
    "attach",
    "aux_loss",
    "detach",
    "find_moe_state",
    "is_native_moe",
    "merge_lora",
    "moe_blocks",
    "moe_state",
    "upcycle",
]

#: Names ``moevl.hf`` exported before they moved (issue 25) -> their package now. They still resolve here,
#: with a ``DeprecationWarning``, for one release; imported on first use, since those packages import ``hf``.
__getattr__ = moved_names(
    __name__,
    {
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
    },
)
