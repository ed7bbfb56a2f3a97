"""Hugging Face integration: upcycling, adopting native MoE models, the runtime, the Trainer."""

from moevl.hf.adopt import adopt, is_native_moe
from moevl.hf.export import ExportResult, export
from moevl.hf.io import is_moevl_checkpoint, load_moe_model, load_upcycled, save_moe_model, save_upcycled
from moevl.hf.lora import apply_lora, merge_lora
from moevl.hf.moe_llava import load_moe_llava
from moevl.hf.routing_health import UniformRoutingMonitor
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
from moevl.hf.stats import routing_statistics
from moevl.hf.trainer import MoETrainer
from moevl.hf.upcycle import upcycle

__all__ = [
    "ExportResult",
    "MoESettings",
    "MoEState",
    "MoETrainer",
    "RoutingContext",
    "UniformRoutingMonitor",
    "adopt",
    "apply_lora",
    "attach",
    "aux_loss",
    "detach",
    "export",
    "find_moe_state",
    "is_moevl_checkpoint",
    "is_native_moe",
    "load_moe_llava",
    "load_moe_model",
    "load_upcycled",
    "merge_lora",
    "moe_blocks",
    "moe_state",
    "routing_statistics",
    "save_moe_model",
    "save_upcycled",
    "upcycle",
]
