"""Save and reload upcycled models: ``save_pretrained`` safetensors + ``config.moevl``."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from moevl.hf.upcycle import UpcycleSettings, upcycle


def save_upcycled(model: nn.Module, directory: str | Path, **kwargs) -> None:
    """Save an upcycled HF model (weights as safetensors; MoE settings in ``config.json``)."""
    if getattr(model, "moe_settings", None) is None:
        raise ValueError("save_upcycled: the model is not upcycled (no moe_settings); use save_pretrained")
    model.config.moevl = model.moe_settings.to_dict()
    kwargs.setdefault("save_original_format", False)  # the model's own key names: exact round trip
    model.save_pretrained(str(directory), **kwargs)


def load_upcycled(directory: str | Path, model_class: type, **upcycle_overrides) -> nn.Module:
    """Rebuild an upcycled model saved by ``save_upcycled`` (or by the HF Trainer).

    Args:
        directory: the saved folder (``config.json`` + ``*.safetensors``).
        model_class: the HF class to build from the config, e.g. ``LlavaForConditionalGeneration``.
        upcycle_overrides: settings to change on reload (e.g. ``stgc=None`` for inference).
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"load_upcycled: no config.json in {directory}")
    config = model_class.config_class.from_pretrained(str(directory))
    settings = getattr(config, "moevl", None)
    if settings is None:
        raise ValueError(
            f"load_upcycled: {directory}/config.json has no `moevl` entry; it is not an upcycled model"
        )
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"load_upcycled: no *.safetensors weights in {directory}")
    model = model_class(config)
    s = UpcycleSettings.from_dict(settings if isinstance(settings, dict) else json.loads(settings))
    kwargs = dict(
        num_experts=s.num_experts,
        top_k=s.top_k,
        layers=s.layers,
        router=s.router,
        ltdr=s.ltdr,
        stgc=s.stgc,
        balance_coef=s.balance_coef,
        z_loss_coef=s.z_loss_coef,
        balance_from=s.balance_from,
        capacity_factor=s.capacity_factor,
        jitter=s.jitter,
    )
    kwargs.update(upcycle_overrides)
    upcycle(model, **kwargs)
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    if not set(state) <= set(model.state_dict()):
        state = _to_model_key_names(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(
            f"load_upcycled: checkpoint in {directory} does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


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
