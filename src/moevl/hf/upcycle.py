"""Sparse upcycling of Hugging Face decoders (MoE-LLaVA stage 3).

``upcycle`` replaces the decoder MLPs of a Hugging Face model (Llama, Qwen2, Mistral, Phi-3,
StableLM, Gemma, Phi, and LLaVA-family wrappers around them) by ``HFMoEBlock`` layers whose
experts are exact copies of the dense MLP and whose router is fresh. MLPs are found by structure
(``gate_proj/up_proj/down_proj``, fused ``gate_up_proj/down_proj``, or ``fc1/fc2``), not by class
name. The runtime (routing context, hooks, aux losses) is ``moevl.hf.runtime``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from moevl.hf.adopt import is_native_sparse_block
from moevl.hf.runtime import (
    HFMoEBlock,
    RoutingContext,
    attach,
    decoder_layers,
    freeze_all_but_moe,
    make_router,
    vision_token_ids,
)
from moevl.hf.settings import UPCYCLE_BALANCE_COEF, MoESettings, select_layers, settings_from
from moevl.hf.settings import UpcycleSettings as UpcycleSettings  # re-export: older imports
from moevl.moe import GroupedExperts


def _linear(mlp: nn.Module, name: str) -> nn.Linear | None:
    m = getattr(mlp, name, None)
    return m if isinstance(m, nn.Linear) else None


def _activation(mlp: nn.Module) -> Any:
    for name in ("act_fn", "activation_fn", "act"):
        if hasattr(mlp, name):
            return getattr(mlp, name)
    raise ValueError(f"upcycle: MLP {type(mlp).__name__} has no act_fn / activation_fn attribute")


def experts_from_mlp(mlp: nn.Module, num_experts: int, implementation: str = "auto") -> GroupedExperts:
    """``num_experts`` exact copies of a dense HF MLP as ``GroupedExperts``."""
    gate, up, down = _linear(mlp, "gate_proj"), _linear(mlp, "up_proj"), _linear(mlp, "down_proj")
    gate_up = _linear(mlp, "gate_up_proj")
    fc1, fc2 = _linear(mlp, "fc1"), _linear(mlp, "fc2")
    if gate is not None and up is not None and down is not None:
        gated, weights = True, {"gate_proj": gate, "up_proj": up, "down_proj": down}
        hidden, inter = gate.in_features, gate.out_features
    elif gate_up is not None and down is not None:  # Phi-3: gate and up fused, gate first
        gated, hidden, inter = True, gate_up.in_features, gate_up.out_features // 2
        weights = {"gate_up_proj": gate_up, "down_proj": down}
    elif fc1 is not None and fc2 is not None:
        gated, weights = False, {"fc1": fc1, "fc2": fc2}
        hidden, inter = fc1.in_features, fc1.out_features
    else:
        children = ", ".join(n for n, _ in mlp.named_children())
        raise ValueError(
            f"upcycle: unsupported MLP {type(mlp).__name__} (children: {children}); expected linear layers "
            "gate_proj/up_proj/down_proj, gate_up_proj/down_proj or fc1/fc2"
        )
    has_bias = any(lin.bias is not None for lin in weights.values())
    ref = next(iter(weights.values())).weight
    experts = GroupedExperts(
        num_experts=num_experts,
        hidden_size=hidden,
        intermediate_size=inter,
        gated=gated,
        activation=_activation(mlp),
        bias=has_bias,
        implementation=implementation,  # type: ignore[arg-type]
    ).to(device=ref.device, dtype=ref.dtype)

    def copy(name: str, w: Tensor, b: Tensor | None) -> None:
        getattr(experts, name).data.copy_(w.detach().unsqueeze(0).expand(num_experts, *w.shape))
        bias = getattr(experts, f"{name}_bias")
        if bias is not None:
            bias.data.copy_(
                (b.detach() if b is not None else torch.zeros(w.shape[0])).expand(num_experts, -1)
            )

    def cat_bias(*lins: nn.Linear) -> Tensor | None:
        if all(lin.bias is None for lin in lins):
            return None
        return torch.cat(
            [lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features) for lin in lins]
        )

    # Native layout: gate_up_proj (E, 2H, D) holds the gate rows then the up rows; fc1/fc2 are up/down.
    with torch.no_grad():
        if "gate_proj" in weights:
            copy("gate_up_proj", torch.cat([gate.weight, up.weight]), cat_bias(gate, up))
            copy("down_proj", down.weight, down.bias)
        elif "fc1" in weights:
            copy("up_proj", fc1.weight, fc1.bias)
            copy("down_proj", fc2.weight, fc2.bias)
        else:
            for name, lin in weights.items():
                copy(name, lin.weight, lin.bias)
    return experts


def upcycle(
    model: nn.Module,
    settings: MoESettings | None = None,
    *,
    freeze_dense: bool = False,
    implementation: str = "auto",
    **kwargs: Any,
) -> nn.Module:
    """Turn a dense HF decoder (or LLaVA-family model) into a sparse MoE one, in place.

    Sparse upcycling (Komatsuzaki et al. 2023; MoE-LLaVA stage 3): each chosen decoder MLP becomes
    ``num_experts`` exact copies of itself with a fresh router, so at initialisation the model
    computes exactly what the dense one did (renormalised top-k weights sum to 1).

    Args:
        model: a ``PreTrainedModel`` (CausalLM, or a LLaVA-family model whose language model is one).
        settings: a ``MoESettings`` (``num_experts`` and ``top_k`` required; ``layers`` None means
            ``"alternate"``; ``balance_coef`` None means MoE-LLaVA's 0.01), or None and the same
            fields as keyword arguments: ``num_experts``, ``top_k``, ``layers``, ``router``
            (``"topk"`` | ``"ltdr"``), ``ltdr``, ``stgc``, ``balance_coef``, ``z_loss_coef``,
            ``balance_from``, ``capacity_factor``, ``jitter``. Not both.
        freeze_dense: train only experts and routers (MoE-LLaVA stage 3).
        implementation: experts implementation (``auto``, ``grouped``, ``loop``).
    Returns:
        The same model object, upcycled, with ``model.moe_context`` (``RoutingContext``) and
        ``model.moe_settings`` (the resolved ``MoESettings``, also in ``config.moevl``).
    """
    if getattr(model, "moe_context", None) is not None:
        raise ValueError("upcycle: this model is already upcycled or adopted (it has moevl MoE layers)")
    settings = settings_from(settings, kwargs, caller="upcycle")
    if settings.num_experts is None or settings.top_k is None:
        raise ValueError(
            f"upcycle needs num_experts and top_k, got num_experts={settings.num_experts}, top_k={settings.top_k}"
        )
    layer_list = decoder_layers(model)
    chosen = select_layers(settings.layers if settings.layers is not None else "alternate", len(layer_list))
    native = [i for i in chosen if is_native_sparse_block(layer_list[i].mlp)]
    if native:
        raise ValueError(
            f"upcycle: layers {native} already hold transformers-native sparse MoE blocks; "
            "bring the model in with moevl.hf.adopt instead"
        )
    balance_coef = UPCYCLE_BALANCE_COEF if settings.balance_coef is None else settings.balance_coef
    settings = dataclasses.replace(settings, layers=tuple(chosen), balance_coef=balance_coef)
    context = RoutingContext(vision_token_ids=vision_token_ids(getattr(model, "config", None)))
    for i in chosen:
        experts = experts_from_mlp(layer_list[i].mlp, settings.num_experts, implementation)
        router = make_router(settings, hidden_size=experts.hidden_size)
        router.to(next(experts.parameters()).device)
        layer_list[i].mlp = HFMoEBlock(
            router=router,
            experts=experts,
            layer_index=i,
            context=context,
            stgc=settings.stgc,
            stgc_scale=1.0 / len(chosen),
        )
    if freeze_dense:
        freeze_all_but_moe(model)
    attach(model, settings=settings, context=context)
    return model
