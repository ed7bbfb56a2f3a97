"""LoRA on a moevl MoE model (upcycled or adopted): adapters on the experts, the routers and the attention.

``apply_lora(model, config)`` (called by ``upcycle`` / ``adopt`` when ``MoESettings.lora`` is set, so that
``load_moe_model`` rebuilds the same adapters before loading a checkpoint strictly) adds, per target:

* ``experts``: moevl's own adapters inside the grouped experts (``moevl.moe.lora``: why not PEFT's
  ``target_parameters`` there), ``{layer}_lora_A`` / ``{layer}_lora_B`` beside the stacked weights;
* ``routers``: a ``RouterLoRA`` as the router module's ``lora`` child (upcycled ``router.lora``, adopted
  ``gate.lora``), added to the logits moevl routes on. NOTE: an adopted model whose loss keeps its native
  auxiliary loss (``balance_coef`` None) computes that loss from its router's own logits, without the adapter;
* ``attention``: PEFT's LoRA (``peft.inject_adapter_in_model``) on the ``nn.Linear`` layers of each decoder
  layer's attention module, in place (the model stays a transformers model; keys become PEFT's
  ``q_proj.base_layer.weight`` / ``q_proj.lora_A.default.weight``).

Every ``B`` starts at 0: the model computes exactly what it did. The targeted weights are frozen, the adapters
train. ``merge_lora`` folds every adapter into its weight and removes it (the model then has its original
keys and ``export`` writes it like any other).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moevl.hf.block import MoEBlock
from moevl.hf.runtime import decoder_layers, find_moe_state, moe_blocks, set_moe_settings
from moevl.moe.lora import LoRAConfig, RouterLoRA

_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter name (``named_parameters``) is a LoRA adapter factor."""
    leaf = name.split(".")
    return any(p in ("lora_A", "lora_B") or p.endswith(("_lora_A", "_lora_B")) for p in leaf)


def lora_frozen_parameters(model: nn.Module) -> set[int]:
    """``id`` of every parameter LoRA freezes: the non-adapter parameters of the targeted parts (the routed
    experts, the routers) and PEFT's base layers."""
    state = find_moe_state(model)
    settings = None if state is None else state.settings
    config = None if settings is None else settings.lora
    if config is None:
        return set()
    frozen: set[int] = set()
    for block in moe_blocks(model):
        if "experts" in config.targets:
            frozen |= {id(p) for n, p in block.experts.named_parameters() if not is_lora_parameter(n)}
        if "routers" in config.targets:
            frozen |= {id(p) for n, p in block.router_module().named_parameters() if not is_lora_parameter(n)}
    for name, p in model.named_parameters():
        if ".base_layer." in name:
            frozen.add(id(p))
    return frozen


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Add LoRA adapters (module doc) to an upcycled or adopted ``model``, in place; the targeted weights are
    frozen, every other parameter keeps its ``requires_grad``. ``ValueError`` naming the target that cannot
    take adapters."""
    if not isinstance(config, LoRAConfig):
        raise ValueError(f"lora must be a LoRAConfig, got {config!r}")
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError(f"lora: {type(model).__name__} has no moevl MoE layers (upcycle or adopt it first)")
    if any(is_lora_parameter(n) for n, _ in model.named_parameters()):
        raise ValueError("lora: the model already has LoRA adapters")
    for block in blocks:
        if "experts" in config.targets:
            block.experts.add_lora(config)
        if "routers" in config.targets:
            _add_router_lora(block, config)
    if "attention" in config.targets:
        _add_attention_lora(model, config)
    state = find_moe_state(model)
    settings = None if state is None else state.settings
    if settings is not None and settings.lora != config:
        set_moe_settings(model, dataclasses.replace(settings, lora=config))
    targeted = lora_frozen_parameters(model)
    for name, p in model.named_parameters():
        if id(p) in targeted:
            p.requires_grad_(False)
        elif is_lora_parameter(name):
            p.requires_grad_(True)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (``W += (alpha / r) · B A``, in float32) and remove it, in place;
    the settings' ``lora`` becomes None. The merged model computes what the adapter model computed (at
    inference: no dropout) up to float rounding."""
    return _remove_lora(model, merge=True, caller="merge_lora")


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging it, in place: the base model the adapters were trained on (what
    ``export(..., lora="adapter")`` writes beside the adapter)."""
    return _remove_lora(model, merge=False, caller="unload_lora")


def _remove_lora(model: nn.Module, *, merge: bool, caller: str) -> nn.Module:
    state = find_moe_state(model)
    settings = None if state is None else state.settings
    if settings is None or settings.lora is None:
        raise ValueError(
            f"{caller}: {type(model).__name__} has no LoRA adapters (its settings' lora is None)"
        )
    for block in moe_blocks(model):
        if block.experts.lora is not None:
            block.experts.merge_lora(fold=merge)
        lora = block.remove_router_lora()
        if lora is not None and merge:
            router = block.router_module()
            with torch.no_grad():
                router.weight.copy_((router.weight.float() + lora.delta_weight()).to(router.weight.dtype))
    _remove_peft(model, merge=merge)
    set_moe_settings(model, dataclasses.replace(settings, lora=None))
    return model


# --- targets --------------------------------------------------------------------------------------------------


def _add_router_lora(block: MoEBlock, config: LoRAConfig) -> None:
    router = block.router_module()
    weight = getattr(router, "weight", None)
    num_experts = block.experts.num_experts
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != num_experts:
        raise ValueError(
            f"lora.targets 'routers': the router {type(router).__name__} of layer {block.layer_index} has no "
            f"(E={num_experts}, D) `weight` to adapt; leave 'routers' out of lora.targets"
        )
    lora = RouterLoRA(hidden_size=weight.shape[1], num_experts=num_experts, config=config)
    block.add_router_lora(
        lora.to(device=weight.device, dtype=torch.promote_types(weight.dtype, torch.float32))
    )


def _attention_linears(model: nn.Module) -> list[str]:
    """Full names of the ``nn.Linear`` layers inside each decoder layer's attention module."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for layer in decoder_layers(model):
        for child_name, child in layer.named_children():
            if child_name in _ATTENTION_NAMES:
                out += [names[id(m)] for m in child.modules() if isinstance(m, nn.Linear)]
    if not out:
        raise ValueError(
            f"lora.targets 'attention': found no nn.Linear under a decoder layer's {'/'.join(_ATTENTION_NAMES)} "
            f"in {type(model).__name__}; leave 'attention' out of lora.targets"
        )
    return out


def _add_attention_lora(model: nn.Module, config: LoRAConfig) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    flags = {id(p): p.requires_grad for p in model.parameters()}
    peft_config = PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=_attention_linears(model),
        bias="none",
    )
    inject_adapter_in_model(peft_config, model)
    # PEFT marks every other parameter frozen; moevl decides that (stage 3's ``trainable``): restore them
    for p in model.parameters():
        if id(p) in flags:
            p.requires_grad_(flags[id(p)])
    model.__dict__.pop("peft_config", None)
    model._modules.pop("peft_config", None)


def _remove_peft(model: nn.Module, *, merge: bool) -> None:
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            if merge:
                module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
