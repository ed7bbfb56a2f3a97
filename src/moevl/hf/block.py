"""The one interface of moevl's MoE blocks, and the per-forward routing context they read.

A moevl MoE model has ``MoEBlock`` layers of one of two kinds: ``UpcycledMoEBlock`` (a dense MLP upcycled
into experts: moevl's own router and ``GroupedExperts``) and ``AdoptedMoEBlock`` (``moevl.hf.adopt``: a
transformers-native sparse block kept as it is, moevl deciding its routing). Everything outside the blocks
(LoRA, export, the checkpoint format, the stages) goes through this interface, never through the kind:

* ``router``: moevl's decision (a ``TopKRouter`` or ``LTDRRouter``); ``router_module()``: the module
  holding the router weight (where router LoRA goes), the child ``router_name``;
* ``experts``: the child ``experts_name``, seen in moevl's layout (``moevl.moe.experts.Experts``: the
  linear weights, ``add_lora`` / ``merge_lora``), whatever its tensors' own layout;
* the export view: ``method`` (``"upcycle"`` / ``"adopt"``, a checkpoint's ``method``), ``experts_name`` /
  ``router_name`` (the state-dict names under the block), ``peft_layout_problem()``;
* ``rule_record()``: what a checkpoint stores so that loading rebuilds the block without searching.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from moevl.moe import GroupedExperts, MoEFeedForward, TopKRouter
from moevl.moe.experts import Experts
from moevl.moe.lora import RouterLoRA
from moevl.moe.routing import RoutingRecord
from moevl.stgc import STGCConfig


@dataclass
class RoutingContext:
    """Per-forward routing inputs shared by the MoE layers of one model, and their records.

    Set by the model's forward pre-hook (``moevl.hf.runtime``); read by every ``MoEBlock``. The masks stay
    until the next forward of the model, so that gradient checkpointing recomputes the same routing.

    Attributes:
        vision_token_ids: token ids whose positions are vision features (image and video tokens).
        aux_scale: factor on the auxiliary losses added to ``outputs.loss``, set per forward from the model
            call's ``moe_aux_scale`` keyword (1.0 without it): ``MoETrainer`` passes
            ``1 / gradient_accumulation_steps`` when the task loss is normalised over the whole accumulated
            batch, so the aux terms keep their per-micro-batch weight; no forward inherits another's.
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
        *,
        aux_scale: float = 1.0,
    ) -> None:
        """Set the routing inputs of a new forward (input_ids (B, T); attention_mask (B, T_past + T);
        category_ids (B, T) integer or None; the aux-loss factor)."""
        if not isinstance(aux_scale, int | float) or isinstance(aux_scale, bool) or not aux_scale >= 0:
            raise ValueError(f"moe_aux_scale must be a number >= 0, got {aux_scale!r}")
        self.records = {}
        self.aux_scale = float(aux_scale)
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

    def keep_record(self, layer_index: int, record: RoutingRecord) -> None:
        """Keep the first record of a layer in this forward. NOTE: the first, so that a gradient-checkpointing
        recompute (during backward) does not replace the record whose STGC statistics that backward fills."""
        self.records.setdefault(layer_index, record)


class MoEBlock(nn.Module):
    """The interface of a moevl MoE block (module doc); ``UpcycledMoEBlock`` and ``AdoptedMoEBlock``.

    Attributes every block has:
        router: moevl's routing decision (a ``TopKRouter`` or ``LTDRRouter``).
        experts: the experts, in moevl's layout (``moevl.moe.experts.Experts``).
        layer_index: its decoder layer.
        context: the model's ``RoutingContext``.
        experts_name, router_name: its experts and router-weight children (their state-dict names).
    """

    #: what built the block: ``"upcycle"`` or ``"adopt"`` (saved as a checkpoint's ``method``)
    method: ClassVar[str]
    router: TopKRouter
    experts: Experts
    layer_index: int
    context: RoutingContext
    experts_name: str
    router_name: str

    @property
    def native_class_name(self) -> str | None:
        """The class of the transformers block this one keeps (adopted), or None (moevl built it)."""
        return None

    def router_module(self) -> nn.Module:
        """The module that holds the router weight (E, D): where router LoRA goes. (The child, not
        ``self.router``: an adopted block's native router may be named ``router`` too.)"""
        return self._modules[self.router_name]

    def router_parameters(self) -> list[nn.Parameter]:
        """The parameters that compute the routing logits (stage 3's ``routers`` part)."""
        return list(self.router_module().parameters())

    def add_router_lora(self, lora: RouterLoRA) -> None:
        """``lora`` as the router module's ``lora`` child: its update ``s · B A x`` joins the logits moevl routes on."""
        self.router_module().lora = lora

    def remove_router_lora(self) -> RouterLoRA | None:
        """Take the router's adapter off (returns it; None if it had none)."""
        module = self.router_module()
        lora = module._modules.get("lora")
        if lora is not None:
            module.lora = None
        return lora

    def choice_bias(self) -> Tensor | None:
        """The (E,) bias top-k selection adds to the scores (a view of the tensor that holds it), or None."""
        return getattr(self.router, "e_score_correction_bias", None) if self.router.uses_score_bias else None

    def peft_layout_problem(self) -> str | None:
        """Why the experts' adapters have no PEFT ``target_parameters`` layout on the native tensors, or None."""
        return None

    def rule_record(self) -> dict[str, Any] | None:
        """What a checkpoint must store to rebuild this block without a search (None: the settings suffice)."""
        return None


class UpcycledMoEBlock(MoEBlock, MoEFeedForward):
    """``MoEFeedForward`` in the place of a Hugging Face decoder MLP: (B, T, D) -> (B, T, D)."""

    method = "upcycle"
    experts_name = "experts"
    router_name = "router"

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
        MoEFeedForward.__init__(
            self,
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
        out, record = MoEFeedForward.forward(
            self, hidden_states, token_mask=token_mask, vision_mask=vision_mask
        )
        self.context.keep_record(self.layer_index, record)
        return out
