"""Hugging Face integration, model surgery: upcycling, adopting native MoE models, LoRA, the routing runtime.

Checkpoint formats are in ``moevl.checkpoint``, the Trainer in ``moevl.training`` (both import this package).
The routing runtime's parts (``MoEState``, ``attach``, ``detach``, ``RoutingContext``, ``aux_loss``) are in
``moevl.hf.runtime``.
"""

from __future__ import annotations

from moevl.hf.adopt import adopt
from moevl.hf.lora import apply_lora, merge_lora
from moevl.hf.runtime import moe_blocks, moe_state
from moevl.hf.settings import MoESettings
from moevl.hf.upcycle import upcycle

__all__ = ["MoESettings", "adopt", "apply_lora", "merge_lora", "moe_blocks", "moe_state", "upcycle"]
