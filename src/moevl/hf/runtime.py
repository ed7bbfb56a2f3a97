"""The Hugging Face runtime of moevl's MoE layers, shared by ``upcycle`` and ``adopt``.

A model with moevl MoE layers owns one ``MoEState`` (``moe_state(model)``: its settings, a
``RoutingContext`` and the hooks; ``attach`` / ``detach``). A forward pre-hook on the model sets the
context from the input ids (vision positions: the config's image and video token ids) and the
attention mask, once per forward; every ``HFMoEBlock`` reads it and leaves its ``RoutingRecord``
there. A forward hook adds the layers' auxiliary losses to ``outputs.loss``, so
any trainer (HF Trainer, accelerate, a plain loop) optimises them. No globals; the context is
explicit state of the model that the next forward replaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moevl.hf.settings import MoESettings
from moevl.moe import GroupedExperts, LTDRRouter, MoEFeedForward, TopKRouter
from moevl.moe.routing import RoutingRecord
from moevl.stgc import STGCConfig

# Re-exported: ``upcycle`` and ``adopt`` read the vision token ids from here (the leaf ``moevl.vision_tokens``
# holds them so that ``moevl.data`` shares them without importing ``hf``).
from moevl.vision_tokens import VISION_TOKEN_ATTRIBUTES as VISION_TOKEN_ATTRIBUTES
from moevl.vision_tokens import vision_token_ids as vision_token_ids


@dataclass
class RoutingContext:
    """Per-forward routing inputs shared by the MoE layers of one model, and their records.

    Set by the model's forward pre-hook; read by every ``HFMoEBlock``. The masks stay until the
    next forward of the model, so that gradient checkpointing recomputes the same routing.

    Attributes:
        vision_token_ids: token ids whose positions are vision features (image and video tokens).
        aux_scale: factor on the auxiliary losses added to ``outputs.loss`` (``MoETrainer`` sets
            ``1 / gradient_accumulation_steps`` when the task loss is normalised over the whole
            accumulated batch, so the aux terms keep their per-micro-batch weight).
        disable_native_aux_loss: the forward passes ``output_router_logits=False`` to the model, so
            that transformers adds no auxiliary loss of its own (an adopted model whose balancing
            moevl does instead).
        token_mask: (B, T) bool, real tokens of the current forward, or None (all real).
        vision_mask: (B, T) bool, vision-feature positions, or None (all text).
        category_ids: (B, T) long, a category of each position for the router statistics (e.g.
            the question family of its sample), ``-1`` for none; None: no category statistics.
            Set per forward from the model call's ``category_ids`` keyword (taken out before the
            model sees it), so it never describes another batch.
        records: the ``RoutingRecord`` of each MoE layer in the last forward, by layer index.
    """

    vision_token_ids: tuple[int, ...] = ()
    aux_scale: float = 1.0
    disable_native_aux_loss: bool = False
    token_mask: Tensor | None = None
    vision_mask: Tensor | None = None
    category_ids: Tensor | None = None
    records: dict[int, RoutingRecord] = field(default_factory=dict)

    def begin(
        self,
        input_ids: Tensor | None,
        attention_mask: Tensor | None,
        seq_len: int | None,
        category_ids: Tensor | None = None,
    ) -> None:
        """Set the masks for a new forward (input_ids (B, T); attention_mask (B, T_past + T);
        category_ids (B, T) integer or None)."""
        self.records = {}
        if input_ids is not None:
            seq_len = input_ids.shape[-1]
        if category_ids is not None:
            if (
                not isinstance(category_ids, Tensor)
                or category_ids.is_floating_point()
                or category_ids.dtype == torch.bool
                or category_ids.dim() != 2
            ):
                raise ValueError(f"category_ids must be an integer (B, T) tensor, got {category_ids!r}")
            expected = tuple(input_ids.shape) if input_ids is not None else (category_ids.shape[0], seq_len)
            if tuple(category_ids.shape) != expected:
                raise ValueError(
                    f"category_ids must have the input's shape {expected}, got {tuple(category_ids.shape)}"
                )
        self.category_ids = category_ids
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2 and seq_len is not None:
            token_mask = attention_mask[:, -seq_len:].bool()
        vision = None
        if input_ids is not None and self.vision_token_ids:
            ids = torch.tensor(self.vision_token_ids, dtype=input_ids.dtype, device=input_ids.device)
            vision = torch.isin(input_ids, ids)
            if token_mask is not None:
                vision = vision & token_mask
        self.token_mask, self.vision_mask = token_mask, vision

    def masks_for(self, batch_shape: torch.Size) -> tuple[Tensor | None, Tensor | None]:
        """The masks when they describe hidden states of this (B, T); otherwise all-real text."""
        tok, vis = self.token_mask, self.vision_mask
        tok = tok if tok is not None and tok.shape == batch_shape else None
        vis = vis if vis is not None and vis.shape == batch_shape else None
        return tok, vis


class HFMoEBlock(MoEFeedForward):
    """``MoEFeedForward`` in the place of a Hugging Face decoder MLP: (B, T, D) -> (B, T, D)."""

    def __init__(
        self,
        *,
        router: TopKRouter,
        experts: GroupedExperts,
        layer_index: int,
        context: RoutingContext,
        shared_experts: nn.Module | None = None,
        shared_gate: nn.Linear | None = None,
        stgc: STGCConfig | None = None,
        stgc_scale: float = 1.0,
    ) -> None:
        super().__init__(
            router=router,
            experts=experts,
            shared_experts=shared_experts,
            shared_gate=shared_gate,
            stgc=stgc,
            stgc_scale=stgc_scale,
        )
        self.layer_index = layer_index
        self.context = context  # the model's, shared by its MoE blocks (attach)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:  # type: ignore[override]
        token_mask, vision_mask = self.context.masks_for(hidden_states.shape[:-1])
        out, record = super().forward(hidden_states, token_mask=token_mask, vision_mask=vision_mask)
        # NOTE: setdefault, so that a gradient-checkpointing recompute (during backward) does not
        # replace the record whose STGC statistics that backward fills.
        self.context.records.setdefault(self.layer_index, record)
        return out

    def router_parameters(self) -> list[nn.Parameter]:
        """The parameters that compute the routing logits (stage 3's ``routers`` part)."""
        return list(self.router.parameters())


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list (of a CausalLM or a LLaVA-family wrapper), found by structure."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    decoder = decoder if decoder is not None else model
    for _, module in decoder.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(hasattr(m, "mlp") for m in module):
            return module
    raise ValueError(
        f"found no decoder layer list in {type(model).__name__} (looked for an nn.ModuleList "
        "whose layers all have an `mlp` attribute, under model.get_decoder())"
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
        **semantics,
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


def _begin_forward(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    seq_len = embeds.shape[1] if embeds is not None else None
    if not isinstance(input_ids, Tensor):
        input_ids = None
    context = moe_state(module).context
    changed = "category_ids" in kwargs
    category_ids = kwargs.pop("category_ids", None)  # for the statistics only, not the model
    context.begin(input_ids, kwargs.get("attention_mask"), seq_len, category_ids)
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


def moe_blocks(model: nn.Module) -> list[HFMoEBlock]:
    """The moevl MoE layers of a model (upcycled or adopted), in layer order."""
    return [m for m in model.modules() if isinstance(m, HFMoEBlock)]


def freeze_all_but_moe(model: nn.Module) -> None:
    """Train only the MoE layers' parameters (routers, experts, shared experts): MoE-LLaVA stage 3."""
    trainable = {id(p) for block in moe_blocks(model) for p in block.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
