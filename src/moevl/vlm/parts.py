"""Which parameters train in which stage: the parts of a vision-language model, found by structure.

MoE-LLaVA trains the projector in stage 1, projector and language model in stage 2, and only the experts
and routers in stage 3. Families name these parts differently (LLaVA: ``vision_tower`` /
``multi_modal_projector`` / ``language_model``; Qwen2-VL: ``visual`` with its ``merger`` as projector);
a parameter's part is read from its module path:

* ``experts`` / ``routers``: the parameters of moevl's MoE blocks (routers: what computes the routing logits,
  an adopted block's native ``gate`` included; experts: everything else in the block, shared experts included);
* ``vision_tower``: under a vision module (``vision_tower``, ``visual``, ``vision_model``, ``image_tower``),
  except its projector/merger;
* ``language_model``: under ``language_model`` (the decoder) and the output head ``lm_head``;
* ``projector``: in a model with a vision module, everything else (``multi_modal_projector``, ``merger``, LLaVA-NeXT's ``image_newline``:
  the parameters that connect vision to language).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

PARTS = ("vision_tower", "projector", "language_model", "experts", "routers")

_VISION = ("vision_tower", "visual", "vision_model", "image_tower")
_PROJECTOR = ("multi_modal_projector", "merger", "mm_projector", "connector", "projector")
_LANGUAGE = ("language_model",)
_HEAD = ("lm_head",)


def _moe_parts(model: nn.Module) -> dict[str, str]:
    from moevl.hf import moe_blocks

    parts: dict[str, str] = {}
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    for block in moe_blocks(model):
        router_ids = {id(p) for p in block.router_parameters()}
        for p in block.parameters():
            if id(p) in names:
                parts[names[id(p)]] = "routers" if id(p) in router_ids else "experts"
    return parts


def parameter_parts(model: nn.Module) -> dict[str, str]:
    """``{parameter name: part}`` for every parameter of ``model`` (names as ``named_parameters``)."""
    moe = _moe_parts(model)
    names = [name for name, _ in model.named_parameters()]
    # A text-only decoder (no vision module): everything outside the MoE blocks is the language model.
    has_vision = any(p in _VISION for name in names for p in name.split(".")[:-1])
    out = {}
    for name in names:
        if name in moe:
            out[name] = moe[name]
            continue
        path = name.split(".")[:-1]
        if any(p in _PROJECTOR for p in path):
            out[name] = "projector"
        elif any(p in _VISION for p in path):
            out[name] = "vision_tower"
        elif any(p in _LANGUAGE for p in path) or (path and path[0] in _HEAD) or not has_vision:
            out[name] = "language_model"
        else:
            out[name] = "projector"
    return out


def set_trainable(model: nn.Module, parts: Iterable[str]) -> int:
    """Train only ``parts`` (names from ``PARTS``); returns the number of trainable parameters.

    With LoRA adapters (``moe.lora``): every adapter trains, the weights they adapt never do, and the other
    parameters of ``parts`` train fully (stage 3's ``[experts, routers]`` with ``targets: [experts]``: the
    experts' adapters and the routers)."""
    parts = set(parts)
    unknown = parts - set(PARTS)
    if unknown:
        raise ValueError(f"parts must be names among {PARTS}, got {sorted(unknown)}")
    by_name = parameter_parts(model)
    present = set(by_name.values())
    missing = parts - present
    if missing & {"experts", "routers"}:
        raise ValueError(f"parts {sorted(missing)} were asked to train, but the model has no MoE layers")
    from moevl.hf.lora import is_lora_parameter, lora_frozen_parameters

    frozen = lora_frozen_parameters(model)  # the weights LoRA adapts (moevl.hf.lora): never trained
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_parameter(name) or (by_name[name] in parts and id(p) not in frozen))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
