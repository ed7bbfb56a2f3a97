"""Model directories: load any local Hugging Face vision-language checkpoint (dense, natively MoE or saved
by moevl) with its processor, and save a stage's model atomically.

A model directory a stage writes holds the model (``config.json`` + safetensors), the processor (tokenizer,
image processor, chat template) and ``moevl.json`` (stage, method, seed, the recipe), so that the next stage
and ``moevl eval`` need nothing but the directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from moevl.atomic import atomic_write_json, replace_directory

META_FILE = "moevl.json"
MODEL_DIR = "model"


class CheckpointError(FileNotFoundError):
    """A model or checkpoint directory that is missing, incomplete or unreadable."""


class OutputDirError(OSError):
    """An output path that cannot be created or written."""


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The model directory: ``path`` itself, or ``path/model`` when a stage's output directory is given."""
    path = Path(path)
    if (path / MODEL_DIR / "config.json").is_file() and not (path / "config.json").is_file():
        return path / MODEL_DIR
    return path


def check_model_dir(path: str | os.PathLike) -> Path:
    """``CheckpointError`` unless ``path`` looks like a loadable checkpoint (config.json + weights)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model directory not found: {path}")
    model_dir = resolve_model_dir(path)
    config = model_dir / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{model_dir} is not a model directory (no config.json)")
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config} is not valid JSON: {e}") from None
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise CheckpointError(f"{model_dir} holds no weights (*.safetensors)")
    meta = model_dir / META_FILE
    if meta.is_file():
        try:
            json.loads(meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{meta} is not valid JSON: {e}") from None
    return model_dir


def read_meta(model_dir: str | os.PathLike) -> dict[str, Any]:
    """``moevl.json`` of a model directory ({} for a checkpoint moevl did not write)."""
    meta = resolve_model_dir(model_dir) / META_FILE
    return json.loads(meta.read_text()) if meta.is_file() else {}


def load_model(
    path: str | os.PathLike,
    *,
    chat_template: str | None = None,
    moe_overrides: dict[str, Any] | None = None,
) -> tuple[nn.Module, Any]:
    """``(model, processor)`` from a local checkpoint directory; nothing downloads.

    Dense and natively sparse checkpoints load with ``AutoModelForImageTextToText``; checkpoints moevl saved
    with MoE layers load exactly through ``moevl.hf.load_moe_model``, with ``moe_overrides`` (``MoESettings``
    fields that leave the weights' layout alone: STGC, LTDR, balancing) replacing the stored ones.
    ``chat_template`` (Jinja text) replaces the processor's template.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from moevl.hf import is_moevl_checkpoint, load_moe_model

    model_dir = check_model_dir(path)
    try:
        processor = AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{model_dir}: cannot load the processor ({e})") from None
    if chat_template is not None:
        processor.chat_template = chat_template
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.chat_template = chat_template
    try:
        if is_moevl_checkpoint(model_dir):
            model = load_moe_model(model_dir, **(moe_overrides or {}))
        else:
            model = AutoModelForImageTextToText.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{model_dir}: cannot load the model ({e})") from None
    return model, processor


def save_final_model(trainer: Any, path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Saves a stage's model, processor and ``moevl.json`` to ``path`` atomically (``path`` always holds
    either the old or the new complete model).

    Every process calls it: ``trainer.save_model`` gathers sharded (ZeRO-3, FSDP) weights and the main
    process writes them (MoE models in the moevl format, ``MoETrainer._save``) into a staging directory,
    which then replaces ``path`` in one rename.
    """
    path = Path(path)
    staging = path.with_name(f".{path.name}.staging")
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    if main:
        atomic_write_json(staging / META_FILE, meta)
        replace_directory(staging, path)
    trainer.accelerator.wait_for_everyone()
    return path


def ensure_writable(path: str | os.PathLike) -> Path:
    """Creates the directory ``path`` and checks a file can be written in it; ``OutputDirError`` otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".moevl-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"output directory {path} is not writable: {e.strerror or e}") from None
    return path


def check_writable_target(path: str | os.PathLike) -> Path:
    """Checks, without creating anything, that ``path`` could be created as a directory (or is one and is
    writable); ``OutputDirError`` naming the path otherwise. Used before any work starts."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise OutputDirError(f"output directory {path} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputDirError(f"output directory {path} is not writable")
        return path
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputDirError(
            f"output directory {path} cannot be created ({parent} is not a writable directory)"
        )
    return path
