"""Sparse upcycling of Hugging Face decoders (MoE-LLaVA stage 3).

``upcycle`` replaces the decoder MLPs of a Hugging Face model (Llama, Qwen2, Mistral, Phi-3,
StableLM, Gemma, Phi, GPT-2, GPT-NeoX, GPT-J, and LLaVA-family wrappers around them) by
``UpcycledMoEBlock`` layers whose experts are exact copies of the dense MLP and whose router is fresh.
MLPs are found by the shapes of their linear layers and verified against their own forward
(``moevl.hf.mlp.find_mlp``), not by class or layer names. The runtime (routing context, hooks,
aux losses) is ``moevl.hf.runtime``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import nn

from moevl.hf.adopt.discovery import is_native_sparse_block
from moevl.hf.block import UpcycledMoEBlock
from moevl.hf.lora import apply_lora
from moevl.hf.mlp import experts_from_mlp
from moevl.hf.runtime import (
    RoutingContext,
    attach,
    decoder_layers,
    find_moe_state,
    freeze_all_but_moe,
    make_router,
    vision_token_ids,
)
from moevl.hf.settings import UPCYCLE_BALANCE_COEF, MoESettings, select_layers, settings_from


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
            ``balance_from``, ``capacity_factor``, ``jitter``, ``lora`` (``moevl.hf.lora``). Not both.
        freeze_dense: train only experts and routers (MoE-LLaVA stage 3).
        implementation: experts implementation (``auto``, ``grouped``, ``loop``).
    Returns:
        The same model object, upcycled, with a ``MoEState``: ``moe_state(model).context``
        (``RoutingContext``) and ``moe_state(model).settings`` (the resolved ``MoESettings``, also in
        ``config.moevl``).
    """
    if find_moe_state(model) is not None:
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
        # MoE-LLaVA's gate is DeepSpeed's torch.nn.Linear(d, E): U(-1/sqrt(d), 1/sqrt(d)), whose logits on unit-RMS
        # inputs spread ~0.58 whatever d. (HF's std 0.02 gives 0.02 sqrt(d): near-uniform routing at small
        # widths, which the balancing loss then keeps uniform.)
        nn.init.kaiming_uniform_(router.weight, a=math.sqrt(5))
        router.to(next(experts.parameters()).device)
        # the new block takes the mode of the MLP it replaces (router jitter only in training)
        layer_list[i].mlp = UpcycledMoEBlock(
            router=router,
            experts=experts,
            layer_index=i,
            context=context,
            stgc=settings.stgc,
            stgc_scale=1.0 / len(chosen),
        ).train(layer_list[i].mlp.training)
    if freeze_dense:
        freeze_all_but_moe(model)
    attach(model, settings=settings, context=context)
    if settings.lora is not None:
        apply_lora(model, settings.lora)
    return model
