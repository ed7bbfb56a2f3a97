"""The Hugging Face runtime of moevl's MoE layers, shared by ``upcycle`` and ``adopt``.

A model with moevl MoE layers owns one ``MoEState`` (``moe_state(model)``: its settings, a
``RoutingContext`` and the hooks; ``attach`` / ``detach``). A forward pre-hook on the model sets the
context from the input ids (vision positions: the config's image and video token ids) and the
attention mask, once per forward; every ``MoEBlock`` reads it and leaves its ``RoutingRecord``
there. A forward hook adds the layers' auxiliary losses to ``outputs.loss``, so
any trainer (HF Trainer, accelerate, a plain loop) optimises them. No globals; the context is
explicit state of the model that the next forward replaces.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moevl.checks import check_choice
from moevl.hf.block import MoEBlock, RoutingContext
from moevl.hf.settings import MoESettings
from moevl.moe import LTDRRouter, TopKRouter
from moevl.moe.dispatch import LAYOUTS
from moevl.moe.routing import update_choice_bias_

# Re-exported: ``upcycle`` and ``adopt`` read the vision token ids from here (the leaf ``moevl.vision_tokens``
# holds them so that ``moevl.data`` shares them without importing ``hf``).
from moevl.vision_tokens import VISION_TOKEN_ATTRIBUTES as VISION_TOKEN_ATTRIBUTES
from moevl.vision_tokens import vision_token_ids as vision_token_ids


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list (of a CausalLM or a LLaVA-family wrapper), found by structure: the first
    ``nn.ModuleList`` under ``model.get_decoder()`` whose layers all have an ``mlp``, else the first one holding
    moevl MoE blocks (a model whose sparse block has another name, e.g. GraniteMoE's ``block_sparse_moe``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    decoder = decoder if decoder is not None else model
    lists = [m for _, m in decoder.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for module in lists:
        if all(hasattr(m, "mlp") for m in module):
            return module
    for module in lists:
        if any(isinstance(block, MoEBlock) for layer in module for block in layer.modules()):
            return module
    raise ValueError(
        f"found no decoder layer list in {type(model).__name__} (looked for an nn.ModuleList "
        "whose layers all have an `mlp` attribute, or holding moevl MoE layers, under model.get_decoder())"
    )


def make_router(settings: MoESettings, *, hidden_size: int, **semantics: Any) -> TopKRouter:
    """The ``TopKRouter`` (or ``LTDRRouter``) of ``settings``; ``semantics`` are extra router
    options (scoring, groups, ... of an adopted model)."""
    common: dict[str, Any] = dict(
        hidden_size=hidden_size,
        num_experts=settings.num_experts,
        top_k=settings.top_k,
        balance_from=settings.balance_from,
        capacity_factor=settings.capacity_factor,
        jitter=settings.jitter,
        **{"score_bias": settings.bias_update_rate is not None, **semantics},
    )
    if settings.ltdr is not None:
        return LTDRRouter(
            **common,
            tail_top_k=settings.ltdr.tail_top_k,
            language_only_balance=settings.ltdr.language_only_balance,
            vision_tail=settings.ltdr.vision_tail,
            tail_ratio=settings.ltdr.tail_ratio,
        )
    return TopKRouter(**common)


class MoEState(nn.Module):
    """What makes a model "a moevl MoE model": its resolved settings, its routing context and the handles of
    the two hooks that drive it. ``attach`` registers it as the model's ``moe_state`` submodule (it holds no
    parameters or buffers: nothing of it is saved in a state dict; ``config.moevl`` carries the settings);
    ``moe_state(model)`` finds it, ``detach`` takes it off again.

    The wiring, all of it: the model's forward pre-hook (``_begin_forward``) sets ``context`` from the
    input ids and attention mask; every MoE block reads the masks from ``context`` (given to it when it was
    built) and leaves its ``RoutingRecord`` there; the model's forward hook (``_add_aux_loss``) adds
    ``aux_loss(model)`` to ``outputs.loss``.
    """

    def __init__(self, settings: MoESettings, context: RoutingContext) -> None:
        super().__init__()
        self.settings = settings
        self.context = context
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def extra_repr(self) -> str:
        s = self.settings
        return f"num_experts={s.num_experts}, top_k={s.top_k}, layers={s.layers}, router={s.router!r}"


#: The name of the ``MoEState`` submodule ``attach`` registers on a model.
STATE_NAME = "moe_state"


def find_moe_state(model: nn.Module) -> MoEState | None:
    """``model``'s ``MoEState``, looking through wrappers that keep the model as ``.module`` (DDP, DeepSpeed)
    or forward attributes to it (PEFT); None for a model without moevl MoE layers."""
    state = getattr(model, STATE_NAME, None)
    if isinstance(state, MoEState):
        return state
    inner = getattr(model, "module", None)
    return find_moe_state(inner) if isinstance(inner, nn.Module) and inner is not model else None


def moe_state(model: nn.Module) -> MoEState:
    """``model``'s ``MoEState`` (``find_moe_state``); ``ValueError`` for a model that has none."""
    state = find_moe_state(model)
    if state is None:
        raise ValueError(
            f"{type(model).__name__} has no moevl MoE layers (no MoEState): upcycle or adopt it first, or load a "
            "moevl checkpoint with moevl.checkpoint.load_moe_model"
        )
    return state


def set_moe_settings(model: nn.Module, settings: MoESettings) -> None:
    """``model``'s resolved settings, in its ``MoEState`` and in ``config.moevl`` (what a checkpoint saves)."""
    moe_state(model).settings = settings
    config = getattr(model, "config", None)
    if config is not None:
        config.moevl = settings.to_dict()


def attach(model: nn.Module, *, settings: MoESettings, context: RoutingContext) -> MoEState:
    """Make ``model`` a moevl MoE model: its ``MoEState`` (settings, context, the two hooks), ``config.moevl``.
    ``ValueError`` when it already is one."""
    if find_moe_state(model) is not None:
        raise ValueError(f"{type(model).__name__} already has moevl MoE layers (a MoEState); detach it first")
    state = MoEState(settings, context)
    model.add_module(STATE_NAME, state)
    set_moe_settings(model, settings)
    state.handles = [
        model.register_forward_pre_hook(_begin_forward, with_kwargs=True),
        model.register_forward_hook(_add_aux_loss),
    ]
    return state


def detach(model: nn.Module) -> MoEState:
    """Undo ``attach``: remove the hooks, the ``MoEState`` and ``config.moevl``; returns the state. The MoE
    blocks stay (their routing then sees every position as a text token and no loss term is added)."""
    state = moe_state(model)
    owner = next(m for m in model.modules() if m._modules.get(STATE_NAME) is state)  # through any wrapper
    for handle in state.handles:
        handle.remove()
    state.handles = []
    delattr(owner, STATE_NAME)
    config = getattr(owner, "config", None)
    if config is not None and hasattr(config, "moevl"):
        del config.moevl
    state.context.begin(None, None, None)  # no masks from the last forward stay in the blocks' context
    return state


#: Keywords of a moevl MoE model's call that are moevl's, taken out before the model sees them:
#: ``category_ids`` (statistics, ``RoutingContext.category_ids``) and ``moe_aux_scale`` (this forward's
#: ``RoutingContext.aux_scale``; 1.0 when not given).
FORWARD_KEYWORDS = ("category_ids", "moe_aux_scale")


def _begin_forward(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    seq_len = embeds.shape[1] if embeds is not None else None
    if not isinstance(input_ids, Tensor):
        input_ids = None
    context = moe_state(module).context
    changed = any(name in kwargs for name in FORWARD_KEYWORDS)
    category_ids = kwargs.pop("category_ids", None)  # for the statistics only, not the model
    aux_scale = kwargs.pop("moe_aux_scale", 1.0)
    context.begin(input_ids, kwargs.get("attention_mask"), seq_len, category_ids, aux_scale=aux_scale)
    if context.disable_native_aux_loss:
        return args, {**kwargs, "output_router_logits": False}
    return (args, kwargs) if changed else None


def aux_loss(model: nn.Module) -> Tensor | None:
    """Sum over the MoE layers of the last forward: ``α·L_balance + z·L_z`` plus the STGC anchors.

    ``α`` is ``settings.balance_coef``; None (the model's own balancing) adds no moevl term.
    """
    state = moe_state(model)
    context, settings = state.context, state.settings
    balance_coef = settings.balance_coef if settings.balance_coef is not None else 0.0
    total = None
    for record in context.records.values():
        term = record.aux_loss(balance_coef, settings.z_loss_coef)
        total = term if total is None else total + term
    return None if total is None else total * context.aux_scale


def _add_aux_loss(module: nn.Module, args: tuple, output: Any) -> Any:
    loss = getattr(output, "loss", None)
    if loss is not None:
        extra = aux_loss(module)
        if extra is not None:
            output.loss = loss + extra.to(loss.dtype)
    return output


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """The moevl MoE layers of a model (upcycled or adopted), in layer order."""
    return [m for m in model.modules() if isinstance(m, MoEBlock)]


def update_choice_biases(model: nn.Module, loads: dict[int, Tensor]) -> None:
    """Aux-loss-free balancing after an optimizer step (``MoESettings.bias_update_rate``): each MoE layer's
    choice bias moves by ``update_choice_bias_`` from ``loads[layer]`` (E,), the tokens routed to each expert
    over the step's whole batch. ``MoETrainer`` calls it; a training loop of one's own calls it after
    ``optimizer.step()``. No host synchronisation."""
    rate = moe_state(model).settings.bias_update_rate
    if rate is None:
        raise ValueError("update_choice_biases: the model's bias_update_rate is None (no aux-loss-free bias)")
    for block in moe_blocks(model):
        if block.layer_index in loads:
            update_choice_bias_(block.choice_bias(), loads[block.layer_index], rate)


def set_experts_layout(model: nn.Module, layout: str) -> None:
    """The row layout of every MoE layer's experts function (``auto``, ``sorted``, ``padded``:
    ``moevl.moe.expert_function.choose_capacity``): a setting of this model, no process-wide switch."""
    check_choice("layout", layout, LAYOUTS)
    for block in moe_blocks(model):
        block.experts.layout = layout


def freeze_all_but_moe(model: nn.Module) -> None:
    """Train only the MoE layers' parameters (routers, experts, shared experts): MoE-LLaVA stage 3."""
    trainable = {id(p) for block in moe_blocks(model) for p in block.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
