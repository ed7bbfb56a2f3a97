"""The moevl checkpoint format: MoE models that no transformers class can load exactly.

An upcycled model (alternate-layer Llama, LTDR's tail rule, capacity, ...) has no transformers class
that computes what it computes. Its checkpoint must therefore be impossible to load *silently
wrong* without moevl — a plain ``LlamaForCausalLM.from_pretrained`` would otherwise build dense
MLPs, drop the experts as "unexpected keys" and run. The format makes every plain load fail:

* ``config.json`` has ``model_type: "moevl"``: ``AutoConfig`` / ``AutoModel*`` raise transformers'
  "does not recognize this architecture" error. The original ``model_type`` and architecture,
  the method (``upcycle`` / ``adopt``), the resolved ``MoESettings``, an adopted model's routing rules
  (``rules``: what adoption found, so that loading searches nothing) and the weights file name are
  kept under ``config.moevl`` (``MOEVL_FORMAT``); every other field is the model's own config.
* the weights are ``moevl-model.safetensors`` (or shards with ``moevl-model.safetensors.index.json``),
  a name ``XxxForCausalLM.from_pretrained`` does not look for: it raises "no file named
  model.safetensors" instead of random-initialising the experts.

``load_moe_model`` rebuilds the base model from the stored config, re-applies ``upcycle`` /
``adopt`` with the stored settings and loads every tensor strictly. After
``moevl.checkpoint.register_auto_classes()``, ``AutoModelForCausalLM`` / ``AutoModelForImageTextToText``
load the format too (``moevl.checkpoint.auto``).

Writes are atomic: everything goes to a temporary directory beside ``directory`` first. A new (or
empty) ``directory`` is then a single rename; into an existing directory the files are moved with
``config.json`` removed first and written last, so a crash leaves a directory that refuses to load,
never a mix of two checkpoints that loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moevl.atomic import atomic_directory, atomic_write_text
from moevl.hf.runtime import find_moe_state, moe_blocks
from moevl.hf.settings import STRUCTURAL_FIELDS, MoESettings

#: Key of the format description in ``config.json`` (and ``config.moevl`` of a moevl checkpoint).
MOEVL_MODEL_TYPE = "moevl"
MOEVL_FORMAT = 1
WEIGHTS_NAME = "moevl-model.safetensors"
WEIGHTS_INDEX_NAME = "moevl-model.safetensors.index.json"
#: transformers' own weight file names (``save_pretrained`` writes these; renamed on save).
_HF_WEIGHTS_NAME = "model.safetensors"
_HF_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
#: Weight files a previous save may have left in a directory; removed when a checkpoint is written
#: there, so that no stale ``model.safetensors`` can be loaded beside the new config.
_STALE_WEIGHTS = re.compile(
    r"(moevl-)?model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?|pytorch_model(-\d{5}-of-\d{5})?\.bin(\.index\.json)?"
)
#: Architecture names the Auto classes see (``moevl.checkpoint.auto`` registers them).
CAUSAL_LM_ARCHITECTURE = "MoevlForCausalLM"
IMAGE_TEXT_ARCHITECTURE = "MoevlForImageTextToText"


# --- writing --------------------------------------------------------------------------------------


def save_moe_model(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    processor: Any | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    max_shard_size: int | str = "5GB",
    save_original_format: bool = False,
    is_main_process: bool = True,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Save an upcycled or adopted model in the moevl format (module doc), atomically.

    Args:
        model: a model with moevl MoE layers (``upcycle`` / ``adopt``).
        directory: the checkpoint folder; created if needed. An existing folder keeps its other
            files (tokenizer, trainer state, ...); old weight files in it are removed.
        processor: a tokenizer or processor to save into the same folder (same atomic write).
        state_dict: the tensors to save instead of ``model.state_dict()`` (the HF Trainer passes
            the gathered state dict under FSDP / DeepSpeed).
        max_shard_size: shard the weights above this size (``save_pretrained``'s option).
        save_original_format: write transformers' legacy key names (``save_pretrained``'s option);
            the default keeps the model's own names. Both load back.
        is_main_process: False on the other ranks of a distributed job: they take part in the
            state-dict gather of ``save_pretrained`` and write nothing.
        extra_files: file name -> text, written into the folder in the same atomic write (a README).
    Returns:
        The checkpoint folder.
    """
    settings = _moe_settings(model, "save_moe_model")
    directory = Path(directory)
    _check_not_a_file(directory, "save_moe_model")
    source_config = model.config.to_dict()
    with staged_directory(directory, commit=is_main_process) as tmp:
        model.save_pretrained(
            tmp,
            state_dict=state_dict,
            max_shard_size=max_shard_size,
            save_original_format=save_original_format,
            is_main_process=is_main_process,
        )
        if not is_main_process:
            return directory
        weights = _rename_weights(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config.pop("transformers_weights", None)  # a name transformers would load without moevl
        config["moevl"] = {
            "format": MOEVL_FORMAT,
            "model_type": source_config["model_type"],
            "architectures": [type(model).__name__],
            "method": _method(model),
            "settings": settings.to_dict(),
            "rules": _rule_records(model),
            "weights": weights,
        }
        config["model_type"] = MOEVL_MODEL_TYPE
        config["architectures"] = [_auto_architecture(type(model).__name__)]
        write_json(tmp / "config.json", config)
        if processor is not None:
            processor.save_pretrained(str(tmp))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return directory


def staged_directory(directory: str | os.PathLike, *, commit: bool = True) -> AbstractContextManager[Path]:
    """A temporary folder beside ``directory`` to write a checkpoint into (``moevl.atomic.atomic_directory``);
    on success its files replace ``directory``'s by a checkpoint's rules (module doc: ``config.json`` last,
    stale weight files removed, other files kept), on error nothing in ``directory`` changes."""
    directory = Path(directory)
    _check_not_a_file(directory, "save")
    return atomic_directory(
        directory, merge=True, marker="config.json", stale=_STALE_WEIGHTS.fullmatch, commit=commit
    )


def write_json(path: str | os.PathLike, data: Any) -> None:
    """JSON with sorted keys, written to a temporary file and renamed into place."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _rename_weights(folder: Path) -> str:
    """``model*.safetensors`` -> ``moevl-model*.safetensors`` (and the index); returns the name
    the config points to."""
    index = folder / _HF_WEIGHTS_INDEX_NAME
    if index.is_file():
        data = json.loads(index.read_text())
        renamed = {}
        for key, file in data["weight_map"].items():
            renamed[key] = "moevl-" + file
        for file in set(data["weight_map"].values()):
            os.replace(folder / file, folder / ("moevl-" + file))
        data["weight_map"] = renamed
        write_json(folder / WEIGHTS_INDEX_NAME, data)
        index.unlink()
        return WEIGHTS_INDEX_NAME
    if not (folder / _HF_WEIGHTS_NAME).is_file():
        raise RuntimeError(f"save_pretrained wrote no {_HF_WEIGHTS_NAME} in {folder}")
    os.replace(folder / _HF_WEIGHTS_NAME, folder / WEIGHTS_NAME)
    return WEIGHTS_NAME


# --- reading --------------------------------------------------------------------------------------


def is_moevl_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a moevl-format checkpoint (``config.json`` with
    ``model_type: "moevl"``). A ``config.json`` that is not valid JSON raises ``ValueError``."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return False
    return _read_config(path).get("model_type") == MOEVL_MODEL_TYPE


def load_moe_model(
    directory: str | os.PathLike,
    *,
    model_class: type | None = None,
    dtype: torch.dtype | str | None = "auto",
    implementation: str = "auto",
    freeze_dense: bool = False,
    **settings_overrides: Any,
) -> nn.Module:
    """Rebuild a model saved by ``save_moe_model`` (or by older moevl versions), exactly.

    The base model is built from the stored original config, ``upcycle`` or ``adopt`` is applied
    with the stored ``MoESettings`` and every tensor is loaded strictly: a missing or unexpected
    key, a shape mismatch or an unreadable weights file raises ``ValueError`` naming it.

    Also reads the checkpoints older moevl versions wrote (the model's own ``model_type`` with the
    settings in ``config.moevl`` and ``model.safetensors``).

    Args:
        directory: the checkpoint folder.
        model_class: the transformers class to build (default: the stored architecture).
        dtype: ``"auto"`` (the stored ``config.dtype``), a dtype, or None (torch's default).
        implementation: experts implementation (``auto``, ``grouped``, ``loop``).
        freeze_dense: train only the MoE layers.
        settings_overrides: ``MoESettings`` fields to change, e.g. ``stgc=None`` for inference,
            ``router="topk"`` to drop LTDR. ``num_experts`` and ``layers`` are fixed by the weights.
    Returns:
        The model in eval mode, with its ``MoEState`` (``moe_state(model).settings`` and ``.context``).
    """
    from moevl.hf.adopt import adopt, is_native_moe
    from moevl.hf.upcycle import upcycle

    directory = Path(directory)
    stored = read_checkpoint_config(directory)
    model_class = stored.model_class if model_class is None else model_class
    config = stored.base_config(model_class)
    settings = stored.settings.reconfigure(
        settings_overrides, num_layers=_num_layers(config), holder="the checkpoint"
    )
    if dtype == "auto":
        dtype = config.dtype
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every tensor is loaded below: skip the random initialisation
        model = model_class._from_config(config, dtype=dtype)
    model.tie_weights()
    method = stored.method or ("adopt" if is_native_moe(model) else "upcycle")
    native_files = method == "adopt" and stored.legacy
    if native_files:
        # A native MoE checkpoint (an adopted model saved with save_pretrained): transformers reads
        # its own formats (per-expert legacy names included); checked strictly here.
        model, info = model_class.from_pretrained(
            str(directory), config=config, dtype=dtype, output_loading_info=True
        )
        bad = {
            k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
        }
        if bad:
            raise ValueError(f"load_moe_model: {directory} does not match {model_class.__name__}: {bad}")
    if method == "adopt":
        # NOTE: the saved rules (``rules``) make adopt search nothing; without them (older checkpoints) adopt
        # checks its routing rule against the native block's own outputs on probes, so the weights are loaded
        # first (an adopted model keeps the native keys): never probes on uninitialised memory, which may hold
        # NaN. LoRA adapters come after adopt: the native tensors load first (under their names before PEFT's
        # ``base_layer``), then every tensor, adapters included.
        if not native_files:
            _load_weights_strict(
                model,
                directory,
                stored.weight_files,
                caller="load_moe_model",
                transform=None if settings.lora is None else _without_lora,
            )
        adopt(
            model,
            dataclasses.replace(settings, lora=None),
            implementation=implementation,
            freeze_dense=freeze_dense,
            adoptions=stored.rules,  # None (older checkpoints): the rule is searched again
        )
        if settings.lora is not None:
            from moevl.hf.lora import apply_lora

            apply_lora(model, settings.lora)
            _load_weights_strict(model, directory, stored.weight_files, caller="load_moe_model")
        return model.eval()
    upcycle(model, settings, implementation=implementation, freeze_dense=freeze_dense)
    _load_weights_strict(model, directory, stored.weight_files, caller="load_moe_model")
    return model.eval()


def load_moe_state_into(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load the weights of a moevl checkpoint into an already built MoE model, strictly (resume).

    The checkpoint's MoE layout (the structural settings: ``num_experts``, ``top_k``, ``layers``, ``lora``; the
    method) must be the model's; every
    tensor of the model must be in the checkpoint and nothing else.
    """
    own = _moe_settings(model, "load_moe_state_into")
    directory = Path(directory)
    stored = read_checkpoint_config(directory)
    for name in STRUCTURAL_FIELDS:
        if getattr(stored.settings, name) != getattr(own, name):
            raise ValueError(
                f"load_moe_state_into: the checkpoint in {directory} has {name}="
                f"{getattr(stored.settings, name)}, the model has {getattr(own, name)}"
            )
    if stored.method is not None and stored.method != _method(model):
        raise ValueError(
            f"load_moe_state_into: the checkpoint in {directory} holds an {stored.method}ed model, "
            f"the model is {_method(model)}ed"
        )
    _load_weights_strict(model, directory, stored.weight_files, caller="load_moe_state_into")
    return model


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """What ``config.json`` of a moevl checkpoint says (``read_checkpoint_config``).

    Attributes:
        config: the model's own config dict (original ``model_type`` and architectures restored).
        settings: the stored ``MoESettings``.
        method: ``"upcycle"``, ``"adopt"``, or None (an older checkpoint: decided by structure).
        architecture: the class name the model was saved from.
        weight_files: the safetensors files holding the weights.
        legacy: written by an older moevl (``save_pretrained`` names, the model's ``model_type``).
        rules: by layer index, each adopted block's ``rule_record`` (what adoption found), or None.
    """

    config: dict[str, Any]
    settings: MoESettings
    method: str | None
    architecture: str | None
    weight_files: tuple[Path, ...]
    legacy: bool
    rules: dict[str, Any] | None = None

    @property
    def model_class(self) -> type:
        import transformers

        name = self.architecture
        cls = getattr(transformers, name, None) if name else None
        if cls is None or not isinstance(cls, type):
            raise ValueError(
                f"the checkpoint was saved from {name!r}, which is not a transformers class; pass model_class="
            )
        return cls

    def base_config(self, model_class: type) -> Any:
        """The original transformers config object (``moevl`` settings kept, as ``upcycle`` sets)."""
        config_class = getattr(model_class, "config_class", None)
        if config_class is None or config_class.model_type != self.config.get("model_type"):
            from transformers import AutoConfig

            return AutoConfig.for_model(**self.config)
        return config_class.from_dict(self.config)


def read_checkpoint_config(directory: str | os.PathLike) -> CheckpointConfig:
    """Parse ``config.json`` of a moevl checkpoint (either format); ``ValueError`` /
    ``FileNotFoundError`` naming what is wrong."""
    directory = Path(directory)
    if directory.is_file():
        raise ValueError(f"{directory} is a file; a checkpoint is a directory")
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}: not a checkpoint (or an interrupted save)")
    raw = _read_config(path)
    info = raw.get("moevl")
    if raw.get("model_type") == MOEVL_MODEL_TYPE:
        if not isinstance(info, dict) or info.get("format") != MOEVL_FORMAT:
            raise ValueError(
                f"{path}: config.moevl is not a moevl format-{MOEVL_FORMAT} description (got {info!r})"
            )
        config = {k: v for k, v in raw.items() if k != "moevl"}
        config["model_type"] = info["model_type"]
        config["architectures"] = info["architectures"]
        config["moevl"] = info["settings"]
        files = _weight_files(directory, info["weights"])
        return CheckpointConfig(
            config=config,
            settings=_settings(info["settings"], path),
            method=info["method"],
            architecture=info["architectures"][0],
            weight_files=files,
            legacy=False,
            rules=info.get("rules"),
        )
    if info is None:
        raise ValueError(f"{path} has no `moevl` entry: it is not a checkpoint of a moevl MoE model")
    architectures = raw.get("architectures") or [None]
    files = ()
    if (directory / _HF_WEIGHTS_INDEX_NAME).is_file():
        files = _weight_files(directory, _HF_WEIGHTS_INDEX_NAME)
    elif (directory / _HF_WEIGHTS_NAME).is_file():
        files = _weight_files(directory, _HF_WEIGHTS_NAME)
    else:
        files = tuple(sorted(directory.glob("*.safetensors")))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {directory}")
    return CheckpointConfig(
        config=raw,
        settings=_settings(info if isinstance(info, dict) else json.loads(info), path),
        method=None,
        architecture=architectures[0],
        weight_files=files,
        legacy=True,
    )


def _weight_files(directory: Path, name: str) -> tuple[Path, ...]:
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: the weights file {name} named by config.json is missing")
    if not name.endswith(".index.json"):
        return (path,)
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (ValueError, KeyError) as err:
        raise ValueError(f"{path} is not a safetensors index (no readable weight_map): {err}") from None
    files = tuple(directory / f for f in sorted(set(weight_map.values())))
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: shards {missing} named by {name} are missing")
    return files


def _without_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint with LoRA adapters as the model had them before ``apply_lora``: no adapter
    factors, PEFT's ``base_layer`` names back to the layer's own."""
    from moevl.hf.lora import is_lora_parameter

    return {k.replace(".base_layer.", "."): v for k, v in state.items() if not is_lora_parameter(k)}


def _load_weights_strict(
    model: nn.Module,
    directory: Path,
    files: tuple[Path, ...],
    *,
    caller: str,
    transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> None:
    """Copy the tensors of ``files`` (through ``transform``, if given) into ``model``: every key known,
    every shape equal, every model tensor present (tied copies aside); else ``ValueError`` naming the keys."""
    from safetensors import safe_open

    expected = model.state_dict(keep_vars=True)
    loaded: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as err:  # safetensors raises its own error types for truncated files
            raise ValueError(
                f"{caller}: {file} is not a readable safetensors file (truncated or corrupt?): {err}"
            ) from None
        if transform is not None:
            state = transform(state)
        if not set(state) <= set(expected):
            state = _to_model_key_names(model, state)
        for key, value in state.items():
            if key not in expected:
                unexpected.append(key)
            elif tuple(value.shape) != tuple(expected[key].shape):
                mismatched.append(
                    f"{key}: checkpoint {tuple(value.shape)}, model {tuple(expected[key].shape)}"
                )
            elif key in loaded:
                raise ValueError(f"{caller}: {key} is stored twice in {directory}")
            else:
                loaded.add(key)
        if not unexpected and not mismatched:
            with torch.no_grad():
                for key, value in state.items():
                    expected[key].copy_(value)
    # a tied tensor (lm_head tied to the embeddings) is stored once, under one of its names
    tied_ok = {id(expected[k]) for k in loaded}
    missing = [k for k, t in expected.items() if k not in loaded and id(t) not in tied_ok]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)):
        if keys:
            problems.append(f"{len(keys)} {label} ({', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''})")
    if problems:
        raise ValueError(
            f"{caller}: the checkpoint in {directory} does not match the {type(model).__name__}: "
            + "; ".join(problems)
        )


def _to_model_key_names(model: nn.Module, state: dict) -> dict:
    """Rename a checkpoint saved in the legacy ("original") format, as ``save_pretrained`` does by
    default for LLaVA-family models, to the model's key names, with transformers' own mapping."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    return {rename_source_key(k, renamings, converters, prefix, meta)[0]: v for k, v in state.items()}


# --- helpers --------------------------------------------------------------------------------------


def _moe_settings(model: nn.Module, caller: str) -> MoESettings:
    state = find_moe_state(model)
    if state is None:
        raise ValueError(
            f"{caller}: {type(model).__name__} has no moevl MoE layers (not upcycled or adopted); "
            "save a dense model with save_pretrained"
        )
    return state.settings


def _method(model: nn.Module) -> str:
    methods = {block.method for block in moe_blocks(model)}
    if len(methods) != 1:
        raise ValueError(
            f"save_moe_model: the model's MoE layers were built by {sorted(methods)}; one method expected"
        )
    return methods.pop()


def _rule_records(model: nn.Module) -> dict[str, Any] | None:
    """By layer index, what each block needs to be rebuilt without a search (``MoEBlock.rule_record``), or
    None when the settings suffice (upcycled)."""
    records = {str(block.layer_index): block.rule_record() for block in moe_blocks(model)}
    return None if all(r is None for r in records.values()) else records


def _auto_architecture(class_name: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    image_text = set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values())
    return IMAGE_TEXT_ARCHITECTURE if class_name in image_text else CAUSAL_LM_ARCHITECTURE


def _check_not_a_file(directory: Path, caller: str) -> None:
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{caller}: {directory} is an existing file; a checkpoint is written to a directory")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _settings(data: Any, path: Path) -> MoESettings:
    try:
        return MoESettings.from_dict(data)
    except ValueError as err:
        raise ValueError(f"{path}: bad moevl settings: {err}") from None


def _num_layers(config: Any) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "num_hidden_layers", None)
