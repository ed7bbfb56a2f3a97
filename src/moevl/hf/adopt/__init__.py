"""Adopt transformers' native sparse MoE models: keep their weights and routing, add moevl's.

``adopt`` takes a model whose decoder has sparse blocks built on transformers' experts interface
(``use_experts_implementation``: an experts module with stacked 3-D ``gate_up_proj`` / ``up_proj``
and ``down_proj``, called as ``experts(hidden (N, D), top_k_index (N, K), top_k_weights (N, K))``)
and puts an ``AdoptedMoEBlock`` in place of each block. The adopted block computes what the native
block did (the same logits, up to float summation order) while adding STGC, LTDR, routing
statistics and moevl's balancing options.

No table of families: the routing rule of a block is derived from its behaviour.

* The native block's forward still runs, as written, over the very same modules, parameters and
  buffers (its shared experts and their gates, input jitter, post-norms, output scaling, ...): the
  native block object is kept as the *forward engine*, and its module, parameter and buffer dicts
  are the adopted block's own (one dict each). Only the experts module is replaced, by an
  ``AdoptedExperts`` holding the native experts' tensors under their native names.
* When the native block hands its tokens to the experts, moevl decides instead: the router
  module's logits (read by a forward hook on the native router) go through
  ``moevl.moe.TopKRouter.route`` (or LTDR's rule), and moevl's experts function runs on the
  decision (its hand-written backward carries STGC).
* The ``TopKRouter`` options that reproduce the native decision are *searched* (``rule``): candidates built
  from the router's and the block's attributes (top-k from the native decision itself; softmax or
  sigmoid scoring; renormalised or not; a score-correction bias found on the router or the block;
  group-limited top-k; a routed scaling factor) are checked against the native block's own
  decisions on random probe inputs, with the router's tensors perturbed so that a rule cannot pass
  by accident (a zero-initialised router makes every rule look alike). The block is then checked end
  to end: the adopted block's output must equal the native block's on every probe (max
  ``|Δ| <= PROBE_TOLERANCE`` in float32). Nothing else is accepted: a block that no rule reproduces
  is refused with its class, the closest rule and by how much it differs (``check``).
* What the search found (an ``Adoption`` per block: the rule, the experts spec) is saved with a
  checkpoint; loading passes it back (``adopt(..., adoptions=...)``): no search, no probe, the weights
  untouched.

The package: ``discovery`` (finding the native blocks), ``experts_spec`` (how moevl sees native
experts), ``rule`` (the search), ``check`` (the end-to-end check), ``modules`` (the adopted modules).

Every module keeps its native attribute name, so ``state_dict()`` keys equal the native model's
(``mlp.gate.weight``, ``mlp.gate.e_score_correction_bias``, ``mlp.experts.gate_up_proj``,
``mlp.shared_expert.*``, ...) and the native class loads what an adopted model saves.

NOTE: why not register moevl in transformers' ``ExpertsInterface``: that registry is selected by a
string on the (shared, saved) config for every experts module of the model at once, and the
experts function it calls sees only ``(hidden, top_k_index, top_k_weights)``: not the router
logits that moevl's decision, LTDR and STGC's gradient need. Replacing the experts module inside the
adopted block keeps the choice per block and the logits at hand.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from moevl.checks import check_choice
from moevl.hf.adopt.check import check_end_to_end, native_outputs
from moevl.hf.adopt.discovery import is_native_moe, is_native_sparse_block, native_layers
from moevl.hf.adopt.experts_spec import PROBE_TOLERANCE, ExpertsSpec, to_moevl_layout, to_native_layout
from moevl.hf.adopt.modules import AdoptedExperts, AdoptedMoEBlock
from moevl.hf.adopt.rule import (
    Adoption,
    NotReproduced,
    RoutedPart,
    RoutingRule,
    derive_rule,
    perturbed,
    restore,
)
from moevl.hf.lora import apply_lora
from moevl.hf.runtime import (
    RoutingContext,
    attach,
    find_moe_state,
    freeze_all_but_moe,
    make_router,
    vision_token_ids,
)
from moevl.hf.settings import MoESettings, select_layers, settings_from

__all__ = [
    "PROBE_TOLERANCE",
    "AdoptedExperts",
    "AdoptedMoEBlock",
    "Adoption",
    "ExpertsSpec",
    "NotReproduced",
    "RoutingRule",
    "adopt",
    "derive_rule",
    "is_native_moe",
    "is_native_sparse_block",
    "to_moevl_layout",
    "to_native_layout",
]


def adopt(
    model: nn.Module,
    settings: MoESettings | None = None,
    *,
    freeze_dense: bool = False,
    implementation: str = "auto",
    adoptions: Mapping[int, Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Bring a transformers-native sparse MoE model into moevl, in place, keeping its semantics.

    The adopted model computes the same logits as before (same router logits, same decision, same
    expert weights), and adds STGC, LTDR (tail rule and language-only balancing; image and video
    tokens are vision tokens), routing statistics and moevl's balancing options. Its training loss
    keeps the model's own auxiliary loss unless ``balance_coef`` asks for moevl's. Each block's
    routing rule is derived and checked on probes (module doc); a block no rule reproduces is
    refused with ``ValueError`` naming its class and the closest rule.

    Args:
        model: a transformers model whose decoder has native sparse blocks (``is_native_moe``).
        settings: a ``MoESettings``, or None and the same fields as keyword arguments (``router``,
            ``ltdr``, ``stgc``, ``balance_coef``, ...; not both). ``num_experts``/``top_k`` None:
            the model's (a different value is refused); ``layers`` None: every sparse block
            (indices or a rule must name sparse layers only); ``balance_coef`` None: the model's own
            auxiliary loss (``output_router_logits``/``router_aux_loss_coef``), a number: moevl's
            balancing instead (the model is then called with ``output_router_logits=False``).
        freeze_dense: train only the MoE blocks (routers, experts, shared experts).
        implementation: experts implementation (``auto``, ``grouped``, ``loop``: the native
            experts' own eager loop, no STGC).
        adoptions: by layer index, the records (``Adoption.to_record``, what a checkpoint saves:
            ``MoEBlock.rule_record``) of an earlier adoption of the same model: no search, no probe, the
            weights untouched. None: derive and check each block.
    Returns:
        The same model object, with its ``MoEState`` (``moe_state(model)``: the resolved settings).
    """
    if find_moe_state(model) is not None:
        raise ValueError("adopt: this model is already upcycled or adopted (it has moevl MoE layers)")
    settings = settings_from(settings, kwargs, caller="adopt")
    check_choice("implementation", implementation, ("auto", "grouped", "loop"))
    layers, sparse = native_layers(model)
    chosen = _chosen_layers(model, settings, len(layers), sparse)
    _check_settings(settings)
    # a layer that holds its experts itself is adopted whole (its forward keeps running), probed through
    # its router and experts alone
    owned = {i for i in chosen if not sparse[i][1]}
    sparse = {i: (layers, str(i)) if i in owned else owner for i, owner in sparse.items()}
    natives = {i: getattr(*sparse[i]) for i in chosen}
    if adoptions is None:
        found = _derive(model, natives, owned)
    else:
        found = _from_records(adoptions, natives, chosen)
    settings = _resolved(settings, found, natives, implementation)
    takes_flag = "output_router_logits" in inspect.signature(model.forward).parameters
    context = RoutingContext(
        vision_token_ids=vision_token_ids(getattr(model, "config", None)),
        disable_native_aux_loss=settings.balance_coef is not None and takes_flag,
    )
    blocks: dict[int, AdoptedMoEBlock] = {}
    try:
        for i in chosen:
            reference = None if adoptions is not None else _Reference(natives[i], found[i], i in owned)
            blocks[i] = _adopted_block(natives[i], found[i], i, settings, context, implementation)
            if reference is not None:
                reference.check(blocks[i])
    except Exception:
        for block in blocks.values():
            block.release()
        raise
    for i, block in blocks.items():
        setattr(*sparse[i], block)
    if freeze_dense:
        freeze_all_but_moe(model)
    attach(model, settings=settings, context=context)
    if settings.lora is not None:
        apply_lora(model, settings.lora)
    return model


def _chosen_layers(
    model: nn.Module, settings: MoESettings, num_layers: int, sparse: dict[int, tuple[nn.Module, str]]
) -> list[int]:
    if not sparse:
        raise ValueError(
            f"adopt: {type(model).__name__} has no transformers-native sparse MoE block in its decoder "
            "(a module owning experts with 3-D `gate_up_proj`/`down_proj`); a dense model is upcycled"
        )
    if settings.layers is None:
        return sorted(sparse)
    chosen = select_layers(settings.layers, num_layers)
    dense = [i for i in chosen if i not in sparse]
    if dense:
        raise ValueError(
            f"adopt: layers {dense} are not sparse MoE layers of the model (sparse: {sorted(sparse)})"
        )
    return chosen


def _check_settings(settings: MoESettings) -> None:
    if settings.jitter != 0:
        raise ValueError(
            f"adopt: jitter={settings.jitter} is moevl's router jitter for upcycled routers; an adopted "
            "model keeps its own (e.g. Mixtral's router_jitter_noise)"
        )
    if settings.ltdr is not None and settings.ltdr.language_only_balance and settings.balance_coef is None:
        raise ValueError(
            "adopt: LTDR's language-only balancing is moevl's balancing loss, but balance_coef=None keeps the "
            "model's own auxiliary loss over all tokens; pass balance_coef (e.g. the model's "
            "router_aux_loss_coef) or LTDRConfig(language_only_balance=False)"
        )


def _derive(model: nn.Module, natives: dict[int, nn.Module], owned: set[int]) -> dict[int, Adoption]:
    text_config = model.config.get_text_config() if hasattr(model, "config") else None
    found = {}
    for i, native in natives.items():
        try:
            found[i] = derive_rule(RoutedPart.of(native) if i in owned else native, config=text_config)
        except NotReproduced as err:
            raise ValueError(f"adopt: layer {i}: {err}") from None
    return found


def _from_records(
    adoptions: Mapping[int, Mapping[str, Any]], natives: dict[int, nn.Module], chosen: list[int]
) -> dict[int, Adoption]:
    records = {int(i): r for i, r in adoptions.items()}
    if sorted(records) != sorted(chosen):
        raise ValueError(
            f"adopt: the saved adoption covers layers {sorted(records)}, but the settings choose layers {chosen}"
        )
    found = {}
    for i in chosen:
        try:
            found[i] = Adoption.from_record(dict(records[i]), natives[i])
        except ValueError as err:
            raise ValueError(f"adopt: layer {i}: {err}") from None
    return found


def _resolved(
    settings: MoESettings, found: dict[int, Adoption], natives: dict[int, nn.Module], implementation: str
) -> MoESettings:
    """``settings`` with the model's ``num_experts``, ``top_k`` and layers; ``ValueError`` for settings the
    blocks cannot take."""
    num_experts = {int(natives[i].get_submodule(a.experts_name).down_proj.shape[0]) for i, a in found.items()}
    top_k = {a.top_k for a in found.values()}
    if len(num_experts) != 1 or len(top_k) != 1:
        raise ValueError(f"adopt: sparse blocks differ in num_experts {num_experts} or top_k {top_k}")
    (model_e,), (model_k,) = num_experts, top_k
    for name, ours, theirs in (
        ("num_experts", settings.num_experts, model_e),
        ("top_k", settings.top_k, model_k),
    ):
        if ours is not None and ours != theirs:
            raise ValueError(
                f"adopt: {name}={ours} but the model's blocks have {theirs}; adopt keeps the model's"
            )
    if settings.bias_update_rate is not None:
        without = sorted(i for i, a in found.items() if a.rule.bias_at is None)
        if without:
            raise ValueError(
                f"adopt: bias_update_rate={settings.bias_update_rate} updates the model's own choice bias, but the "
                f"routers of layers {without} have none (DeepSeek-V3's e_score_correction_bias is one); leave "
                "bias_update_rate out"
            )
    needs_own = [("STGC", "adopt without stgc")] if settings.stgc is not None else []
    if settings.lora is not None and "experts" in settings.lora.targets:
        needs_own.append(("LoRA on the experts", "leave 'experts' out of lora.targets"))
    for what, instead in needs_own:  # both run inside moevl's experts function
        for i, adoption in found.items():
            if not adoption.spec.own_function or implementation == "loop":
                why = adoption.spec.reason or "implementation='loop' is the native eager loop"
                raise ValueError(
                    f"adopt: {what} needs moevl's experts function, but {why} (layer {i}); {instead}"
                )
    return dataclasses.replace(settings, num_experts=model_e, top_k=model_k, layers=tuple(sorted(found)))


def _adopted_block(
    native: nn.Module,
    adoption: Adoption,
    layer_index: int,
    settings: MoESettings,
    context: RoutingContext,
    implementation: str,
) -> AdoptedMoEBlock:
    experts = native.get_submodule(adoption.experts_name)
    hidden_size = int(experts.down_proj.shape[1 if not adoption.spec.transposed else 2])
    router = make_router(settings, hidden_size=hidden_size, own_weight=False, **dict(adoption.rule.options))
    return AdoptedMoEBlock(
        native=native,
        adoption=adoption,
        router=router,
        layer_index=layer_index,
        context=context,
        implementation=implementation,
        stgc=settings.stgc,
        stgc_scale=1.0 / len(settings.layers),
    )


class _Reference:
    """The native block's outputs on the end-to-end check's probes (taken before the adopted block takes its
    experts over), on a router perturbed as in the search (one that tells rules apart); ``check`` runs the
    adopted block on the same probes. The router's tensors are restored bit-identical after each."""

    def __init__(self, native: nn.Module, adoption: Adoption, owned: bool) -> None:
        self.native, self.adoption, self.owned = native, adoption, owned
        rule = adoption.rule
        at = [a for a in (rule.bias_at, rule.expert_scale_at) if a is not None]
        self.biases = [getattr(native.get_submodule(path), name) for path, name in at]
        saved = perturbed(native, adoption.router_name, self.biases)
        try:
            self.outputs = native_outputs(self._routed_part() or native)
        finally:
            restore(saved)

    def _routed_part(self) -> RoutedPart | None:
        if not self.owned:
            return None
        return RoutedPart(self.native, self.adoption.router_name, self.adoption.experts_name)

    def check(self, block: AdoptedMoEBlock) -> None:
        saved = perturbed(self.native, self.adoption.router_name, self.biases)
        try:
            diff = check_end_to_end(block, self.outputs, self._routed_part())  # in units of the tolerance
        finally:
            restore(saved)
        if not diff <= 1.0:
            raise ValueError(
                f"adopt: layer {block.layer_index}: the adopted {type(self.native).__name__} differs from the "
                f"native block by {diff:.3g} times the tolerance (rule: {self.adoption.rule.describe()}; "
                f"experts: {'moevl' if self.adoption.spec.own_function else 'native'})"
            )
