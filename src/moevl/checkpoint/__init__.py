"""Checkpoint formats: the moevl format (``format``), native export (``export``), MoE-LLaVA import
(``moe_llava``), the loader a directory's format needs (``load``), the moevl format's registration with
transformers' Auto classes (``auto``).

Model surgery is ``moevl.hf``'s; this package sits above it (loading a checkpoint rebuilds the model with
``upcycle`` / ``adopt``), and ``moevl.hf`` never imports it.
"""

from moevl.checkpoint.auto import register_auto_classes
from moevl.checkpoint.export import export
from moevl.checkpoint.format import load_moe_model, save_moe_model
from moevl.checkpoint.moe_llava import load_moe_llava

__all__ = ["export", "load_moe_llava", "load_moe_model", "register_auto_classes", "save_moe_model"]
