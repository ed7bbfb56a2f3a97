"""Hugging Face integration: upcycling, adopting native MoE models, the runtime, the Trainer."""

from moevl.hf.adopt import adopt, is_native_moe
from moevl.hf.io import load_upcycled, save_upcycled
from moevl.hf.runtime import RoutingContext, aux_loss, moe_blocks
from moevl.hf.settings import MoESettings
from moevl.hf.settings import UpcycleSettings as UpcycleSettings  # older name, not in __all__
from moevl.hf.stats import routing_statistics
from moevl.hf.trainer import MoETrainer
from moevl.hf.upcycle import upcycle

__all__ = [
    "MoESettings",
    "MoETrainer",
    "RoutingContext",
    "adopt",
    "aux_loss",
    "is_native_moe",
    "load_upcycled",
    "moe_blocks",
    "routing_statistics",
    "save_upcycled",
    "upcycle",
]
