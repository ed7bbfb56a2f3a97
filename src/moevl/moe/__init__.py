"""The sparse MoE layer: routers, grouped experts, the MoE feed-forward block.

Knows nothing of Hugging Face or of training. Axis legend: ``N`` tokens, ``E`` experts, ``K``
slots per token, ``D`` model dim, ``H`` expert hidden dim.
"""

from moevl.moe.experts import GroupedExperts
from moevl.moe.layer import MoEFeedForward
from moevl.moe.lora import LoRAConfig
from moevl.moe.ltdr import LTDRConfig, LTDRRouter, ltdr_tail_mask
from moevl.moe.routing import TopKRouter

__all__ = [
    "GroupedExperts",
    "LTDRConfig",
    "LTDRRouter",
    "LoRAConfig",
    "MoEFeedForward",
    "TopKRouter",
    "ltdr_tail_mask",
]
