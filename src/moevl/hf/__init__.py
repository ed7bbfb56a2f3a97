"""Hugging Face integration: upcycling, modality routing context, aux losses, the Trainer."""

from moevl.hf.io import load_upcycled, save_upcycled
from moevl.hf.stats import routing_statistics
from moevl.hf.trainer import MoETrainer
from moevl.hf.upcycle import (
    HFMoEBlock,
    RoutingContext,
    UpcycleSettings,
    aux_loss,
    decoder_layers,
    experts_from_mlp,
    moe_blocks,
    upcycle,
)

__all__ = [
    "HFMoEBlock",
    "MoETrainer",
    "RoutingContext",
    "UpcycleSettings",
    "aux_loss",
    "decoder_layers",
    "experts_from_mlp",
    "load_upcycled",
    "moe_blocks",
    "routing_statistics",
    "save_upcycled",
    "upcycle",
]
