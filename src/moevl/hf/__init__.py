"""Hugging Face integration, model surgery: upcycling, adopting native MoE models, LoRA, the routing runtime.

Checkpoint formats are in ``moevl.checkpoint``, the Trainer in ``moevl.training`` (both import this package).
The routing runtime's parts (``MoEState``, ``attach``, ``detach``, ``RoutingContext``, ``aux_loss``) are in
``moevl.hf.runtime``.
"""

from __future__ import annotations

from moevl._deprecated import moved_names
from moevl.hf.adopt import adopt
from moevl.hf.lora import apply_lora, merge_lora
from moevl.hf.runtime import moe_blocks, moe_state
from moevl.hf.settings import MoESettings
from moevl.hf.upcycle import upcycle

__all__ = ["MoESettings", "adopt", "apply_lora", "merge_lora", "moe_blocks", "moe_state", "upcycle"]

#: Names ``moevl.hf`` exported before issue 25 -> where they are now. They still resolve here, with a
#: ``DeprecationWarning``, for one release; imported on first use (``checkpoint`` and ``training`` import ``hf``).
__getattr__ = moved_names(
    __name__,
    {
        "ExportResult": "moevl.checkpoint.export",
        "export": "moevl.checkpoint",
        "is_moevl_checkpoint": "moevl.checkpoint.format",
        "load_moe_llava": "moevl.checkpoint",
        "load_moe_model": "moevl.checkpoint",
        "load_upcycled": "moevl.checkpoint.format",
        "save_moe_model": "moevl.checkpoint",
        "save_upcycled": "moevl.checkpoint.format",
        "UpcycleSettings": "moevl.hf:MoESettings",
        "MoETrainer": "moevl.training",
        "UniformRoutingMonitor": "moevl.training",
        "routing_statistics": "moevl.training",
        "RoutingContext": "moevl.hf.runtime",
        "aux_loss": "moevl.hf.runtime",
        "is_native_moe": "moevl.hf.adopt",
    },
)
