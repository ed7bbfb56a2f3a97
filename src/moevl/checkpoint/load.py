"""Load a local checkpoint directory with the loader its format needs.

* the moevl format (``is_moevl_checkpoint``): ``load_moe_model``, exactly;
* a released MoE-LLaVA checkpoint (``is_moe_llava_checkpoint``): ``load_moe_llava``;
* anything else, dense or natively sparse: transformers' ``AutoModelForImageTextToText``.

Local files only: nothing downloads. The processor (read from the directory, or for MoE-LLaVA built around
its tokenizer) is ``moevl.vlm.io``'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from moevl.checkpoint.format import is_moevl_checkpoint, load_moe_model
from moevl.checkpoint.moe_llava import SUPPORTED_MODEL_TYPES, load_moe_llava


class LoadedCheckpoint(NamedTuple):
    """What ``load_checkpoint`` returns (unpacks as ``model, tokenizer``)."""

    model: nn.Module  #: in eval mode
    #: MoE-LLaVA's tokenizer with ``<image>`` added (the embeddings follow it), or None when there is none;
    #: None for the other formats, whose directory holds their processor
    tokenizer: Any | None


def is_moe_llava_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a released MoE-LLaVA checkpoint (``config.json`` with a ``moe_llava*``
    ``model_type``; ``load_moe_llava`` names the ones it does not support)."""
    config = Path(directory) / "config.json"
    if not config.is_file():
        return False
    model_type = json.loads(config.read_text()).get("model_type", "")
    return model_type in SUPPORTED_MODEL_TYPES or model_type.startswith("moe_llava")


def is_sparse_checkpoint(directory: str | os.PathLike) -> bool:
    """A checkpoint whose MoE layers moevl loads itself (the moevl format, or a released MoE-LLaVA one)."""
    return is_moevl_checkpoint(directory) or is_moe_llava_checkpoint(directory)


def load_checkpoint(
    directory: str | os.PathLike, *, moe_overrides: dict[str, Any] | None = None
) -> LoadedCheckpoint:
    """The model in ``directory``, loaded by its format's loader (module doc).

    Args:
        directory: a local checkpoint folder.
        moe_overrides: for the sparse formats, ``MoESettings`` fields that leave the weights' layout alone
            (STGC, LTDR, balancing) replacing the stored ones; a dense checkpoint has none to replace.
    Returns:
        ``LoadedCheckpoint(model, tokenizer)``.
    Raises:
        The loaders' own errors: ``OSError``, ``ValueError``, ``RuntimeError``, safetensors'
        ``SafetensorError`` (a truncated weights file).
    """
    if is_moevl_checkpoint(directory):
        return LoadedCheckpoint(load_moe_model(directory, **(moe_overrides or {})), None)
    if is_moe_llava_checkpoint(directory):
        model, tokenizer = load_moe_llava(directory, **(moe_overrides or {}))
        return LoadedCheckpoint(model, tokenizer)
    from transformers import AutoModelForImageTextToText

    return LoadedCheckpoint(
        AutoModelForImageTextToText.from_pretrained(str(directory), local_files_only=True), None
    )
