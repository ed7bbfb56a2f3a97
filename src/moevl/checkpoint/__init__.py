"""Checkpoint formats: the moevl format (``format``), native export (``export``), MoE-LLaVA import
(``moe_llava``), the loader a directory's format needs (``load``), the moevl format's registration with
transformers' Auto classes (``auto``).

Model surgery is ``moevl.hf``'s; this package sits above it (loading a checkpoint rebuilds the model with
``upcycle`` / ``adopt``), and ``moevl.hf`` never imports it.
"""

from moevl.checkpoint.auto import register_auto_classes
from moevl.checkpoint.export import ExportResult, export, export_adapter
from moevl.checkpoint.format import (
    CheckpointConfig,
    is_moevl_checkpoint,
    load_moe_model,
    load_moe_state_into,
    read_checkpoint_config,
    save_moe_model,
)
from moevl.checkpoint.format import load_upcycled as load_upcycled  # older name, not in __all__
from moevl.checkpoint.format import save_upcycled as save_upcycled  # older name, not in __all__
from moevl.checkpoint.load import (
    LoadedCheckpoint,
    is_moe_llava_checkpoint,
    is_sparse_checkpoint,
    load_checkpoint,
)
from moevl.checkpoint.moe_llava import load_moe_llava

__all__ = [
    "CheckpointConfig",
    "ExportResult",
    "LoadedCheckpoint",
    "export",
    "export_adapter",
    "is_moe_llava_checkpoint",
    "is_moevl_checkpoint",
    "is_sparse_checkpoint",
    "load_checkpoint",
    "load_moe_llava",
    "load_moe_model",
    "load_moe_state_into",
    "read_checkpoint_config",
    "register_auto_classes",
    "save_moe_model",
]
