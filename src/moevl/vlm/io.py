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
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

from moevl.atomic import atomic_write_json, replace_directory

META_FILE = "moevl.json"
MODEL_DIR = "model"
RUN_FILE = "moevl-run.json"  # in a stage's --out: what the run is (checked by --resume)
SKIPPED_FILE = (
    "skipped_records.jsonl"  # in a stage's --out: records skipped during training (data.skip_bad_records)
)


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
    if not path.is_dir():
        raise CheckpointError(f"{path} must be a model directory (config.json and weights), got a file")
    model_dir = resolve_model_dir(path)
    config = model_dir / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{model_dir} is not a model directory (no config.json)")
    try:
        config_dict = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config} is not valid JSON: {e}") from None
    text_only = _text_only_class(model_dir, config_dict)
    if text_only is not None:
        raise CheckpointError(
            f"{model_dir} is a text-only checkpoint ({text_only}): moevl's commands take vision-language "
            "checkpoints, which AutoModelForImageTextToText and AutoProcessor load (a vision tower, a projector, "
            "a language model and an image processor: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, ...); a language model "
            "alone is upcycled with the Python API (moevl.hf.upcycle)"
        )
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise CheckpointError(f"{model_dir} holds no weights (*.safetensors)")
    meta = model_dir / META_FILE
    if meta.is_file():
        try:
            json.loads(meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{meta} is not valid JSON: {e}") from None
    return model_dir


def _text_only_class(model_dir: Path, config: Any) -> str | None:
    """The class of a text-only language model checkpoint (``LlamaForCausalLM``, model_type 'llama'), or None:
    a vision-language one, or a family transformers does not know (its loader then says what is wrong)."""
    if not isinstance(config, dict) or isinstance(config.get("vision_config"), dict):
        return None  # every image-text-to-text family we know keeps its tower's settings there
    from moevl.checkpoint.load import is_moe_llava_checkpoint

    if is_moe_llava_checkpoint(model_dir):
        return None
    inner = config.get("moevl") if config.get("model_type") == "moevl" else config
    model_type = inner.get("model_type") if isinstance(inner, dict) else None
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    if (
        model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ):
        return None
    architectures = inner.get("architectures") or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    return f"{architectures[0]}, model_type {model_type!r}"


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

    The model loads with the loader its format needs (``moevl.checkpoint.load_checkpoint``): dense and
    natively sparse checkpoints with ``AutoModelForImageTextToText``, the moevl format exactly, released
    MoE-LLaVA checkpoints through ``moevl.checkpoint.load_moe_llava``; for the sparse ones ``moe_overrides``
    (``MoESettings`` fields that leave the weights' layout alone: STGC, LTDR, balancing) replace the stored
    settings. ``chat_template`` (Jinja text) replaces the processor's template.
    """
    from safetensors import SafetensorError
    from transformers import AutoProcessor

    from moevl.checkpoint import register_auto_classes
    from moevl.checkpoint.format import is_moevl_checkpoint
    from moevl.checkpoint.load import is_moe_llava_checkpoint, load_checkpoint

    model_dir = check_model_dir(path)
    if is_moevl_checkpoint(model_dir):
        # the processor reads config.json (model_type "moevl") through AutoConfig, which knows the format
        # once it is registered (nothing registers at import)
        register_auto_classes()
    processor = None
    moe_llava = is_moe_llava_checkpoint(model_dir)
    if not moe_llava:  # MoE-LLaVA checkpoints carry a tokenizer only
        try:
            processor = AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
        except ImportError as e:  # a part of the processor needs a package that is not installed
            raise CheckpointError(_missing_package(model_dir, "processor", e)) from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{model_dir}: cannot load the processor ({_one_line(e)})") from None
        _set_chat_template(processor, chat_template)
    try:
        model, tokenizer = load_checkpoint(model_dir, moe_overrides=moe_overrides)
        if moe_llava:
            processor = _moe_llava_processor(model_dir, model, tokenizer, chat_template)
    except ImportError as e:
        raise CheckpointError(_missing_package(model_dir, "model", e)) from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # e.g. a truncated weights file
        raise CheckpointError(f"{model_dir}: cannot load the model ({e})") from None
    return model, processor


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _missing_package(model_dir: Path, part: str, error: ImportError) -> str:
    """One line for an ``ImportError`` raised while loading a checkpoint's ``part``: the package that is missing
    (from transformers' "X requires the Y library" message, the module Python could not import, or, for an
    error that names nothing, torchvision when it does not import: what most processors' optional parts need)
    and the checkpoint's family."""
    import importlib
    import re

    text = " ".join(str(error).split())
    needs, package = None, None
    found = re.search(r"(\w+) requires the ([\w.-]+) library", text)
    if found:
        needs, package = found.group(1), found.group(2).lower()
    elif getattr(error, "name", None):
        package = error.name.split(".")[0]
    elif found := re.search(r"No module named '([\w.]+)'", text):
        package = found.group(1).split(".")[0]
    else:
        try:
            importlib.import_module("torchvision")
        except Exception:  # missing, or built for another torch
            package = "torchvision"
    family = _family(model_dir)
    what = f"the {part} of this {family} checkpoint" + (f" ({needs})" if needs else "")
    if package is None:
        return f"{model_dir}: cannot load {what}: a package it needs does not import ({_one_line(error)})"
    advice = f"install {package} in this environment"
    if package == "torchvision":
        advice += " (the build that matches the installed torch)"
    return f"{model_dir}: {what} needs the package {package!r}, which is not installed or does not import here; {advice}"


def _family(model_dir: Path) -> str:
    """The checkpoint's ``model_type`` (the one inside a moevl-format config)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "?"
    inner = config.get("moevl") if config.get("model_type") == "moevl" else config
    return str(inner.get("model_type", "?")) if isinstance(inner, dict) else "?"


def _set_chat_template(processor: Any, chat_template: str | None) -> None:
    if chat_template is not None:
        processor.chat_template = chat_template
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.chat_template = chat_template


def _moe_llava_processor(model_dir: Path, model: nn.Module, tokenizer: Any, chat_template: str | None) -> Any:
    """A ``LlavaProcessor`` around a released MoE-LLaVA checkpoint's tokenizer (``moevl.checkpoint.moe_llava``):
    CLIP's image processing at the tower's resolution (OpenAI CLIP's mean and std, as MoE-LLaVA's towers)."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    if tokenizer is None:
        raise CheckpointError(f"{model_dir}: a MoE-LLaVA checkpoint without a tokenizer")
    vision = model.config.vision_config
    size = vision.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=list(OPENAI_CLIP_MEAN),
            image_std=list(OPENAI_CLIP_STD),
        ),
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )
    _set_chat_template(processor, chat_template if chat_template is not None else tokenizer.chat_template)
    return processor


def save_final_model(trainer: Any, path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Saves a stage's model, processor and ``moevl.json`` to ``path`` atomically (``path`` always holds
    either the old or the new complete model).

    Every process calls it: ``trainer.save_model`` gathers sharded (ZeRO-3, FSDP) weights and the main
    process writes them (MoE models in the moevl format, ``MoETrainer._save``) into a staging directory,
    which then replaces ``path`` in one rename.
    """
    path = Path(path)
    # NOTE: every process passes the same directory to ``save_model``, so the staging name is fixed here, not
    # a unique temporary one (``atomic_directory``); ``replace_directory`` renames it into place.
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
    """Creates the directory ``path`` and checks a file can be written in it; ``OutputDirError`` otherwise.
    Safe when every process of a distributed job calls it at once (each probes with its own file)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".moevl-write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
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


def previous_run(output_dir: str | os.PathLike) -> str | None:
    """What an earlier run left in a stage's ``output_dir`` (its checkpoints, its final model), or None."""
    output_dir = Path(output_dir)
    found = []
    checkpoints = sorted(output_dir.glob("checkpoint-*")) if output_dir.is_dir() else []
    if checkpoints:
        found.append(f"{len(checkpoints)} checkpoint(s), the last {checkpoints[-1].name}")
    if (output_dir / MODEL_DIR).exists():
        found.append(f"a final model in {MODEL_DIR}/")
    return " and ".join(found) or None


def check_run_identity(output_dir: str | os.PathLike, identity: dict[str, Any]) -> None:
    """``--resume``: ``ConfigError`` naming the first key of ``identity`` (stage, model, method, structural MoE
    settings, the learning-rate schedule) that differs from the run being resumed (its ``RUN_FILE``), with both
    values."""
    from moevl.config import ConfigError

    path = Path(output_dir) / RUN_FILE
    if not path.is_file():
        return  # a run from before this file existed: nothing to compare
    saved = json.loads(path.read_text())
    for key, value in identity.items():
        if key in saved and saved[key] != value:
            why = " (the learning-rate schedule is made from it)" if key.startswith("training.") else ""
            raise ConfigError(
                f"--resume: {key} is {value!r} but the run in {output_dir} was started with {saved[key]!r}{why}; "
                "resume it with the same settings, or start over with --overwrite"
            )


def clear_previous_run(output_dir: str | os.PathLike) -> None:
    """``--overwrite``: removes an earlier run's checkpoints, final model, run file and list of skipped records (its
    TensorBoard logs stay: each run writes its own folder)."""
    output_dir = Path(output_dir)
    for p in [*output_dir.glob("checkpoint-*"), output_dir / MODEL_DIR]:
        if p.is_dir():
            shutil.rmtree(p)
    (output_dir / RUN_FILE).unlink(missing_ok=True)
    (output_dir / SKIPPED_FILE).unlink(missing_ok=True)
