"""Adopt transformers' native sparse MoE models: keep their weights and routing, add moevl's.

``adopt`` takes a model whose decoder already has transformers' native sparse blocks (Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2, DeepSeek-V3, Qwen3-VL-MoE's text decoder) and replaces each
block by an ``AdoptedMoEBlock`` that computes exactly what the native block did (the same logits,
up to float summation order) while adding STGC, LTDR, routing statistics and moevl's balancing
options.

How exactness is kept:

* the native router module is kept as is (``mlp.gate``) and called for the logits, so its dtype
  rules and transformers' ``OutputRecorder`` hooks (``output_router_logits``, the model's own
  auxiliary loss) see exactly what they saw before;
* the decision is ``moevl.moe.TopKRouter.route`` with the family's semantics read from the router
  (``FAMILIES``: a small explicit table of the known router classes; tested bit-equal to the native
  routers); a router class not in the table is refused, never approximated;
* the experts are a ``GroupedExperts`` holding the native ``gate_up_proj`` / ``down_proj``
  parameters themselves (no copy), and shared experts keep their native modules.

Every module keeps its native attribute name, so ``state_dict()`` keys equal the native model's
(``mlp.gate.weight``, ``mlp.gate.e_score_correction_bias``, ``mlp.experts.gate_up_proj``,
``mlp.shared_expert.*``, ...) and the native class loads what an adopted model saves.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moevl.hf.runtime import (
    HFMoEBlock,
    RoutingContext,
    attach,
    decoder_layers,
    freeze_all_but_moe,
    make_router,
    vision_token_ids,
)
from moevl.hf.settings import MoESettings, select_layers, settings_from
from moevl.moe import GroupedExperts, TopKRouter
from moevl.stgc import STGCConfig


@dataclass(frozen=True)
class NativeFamily:
    """What moevl knows of one transformers router class.

    Attributes:
        block: the class name of the sparse block the router is known in (checked).
        semantics: router module -> ``TopKRouter`` options reproducing its decision.
        shared_experts: attribute name of the block's shared expert(s), or None.
        shared_gate: attribute name of the shared expert's sigmoid gate, or None.
        input_jitter: block attribute holding a multiplicative noise on the block input in
            training (Mixtral's ``jitter_noise``: router and experts see it), or None.
    """

    block: str
    semantics: Callable[[nn.Module], dict[str, Any]]
    shared_experts: str | None = None
    shared_gate: str | None = None
    input_jitter: str | None = None


def _softmax_topk(normalize: bool | None = None) -> Callable[[nn.Module], dict[str, Any]]:
    """softmax -> top-k -> renormalise (always, or as the router's ``norm_topk_prob`` says)."""

    def semantics(router: nn.Module) -> dict[str, Any]:
        return {"normalize_weights": bool(router.norm_topk_prob) if normalize is None else normalize}

    return semantics


def _deepseek_v2(router: nn.Module) -> dict[str, Any]:
    options: dict[str, Any] = {
        "normalize_weights": False,
        "routed_scaling_factor": float(router.routed_scaling_factor),
    }
    if router.topk_method == "group_limited_greedy":
        options.update(num_groups=router.num_group, topk_groups=router.topk_group, group_score="max")
    elif router.topk_method != "greedy":
        raise ValueError(
            f"adopt: DeepseekV2TopkRouter with topk_method={router.topk_method!r} is not known to moevl "
            "(known: 'greedy', 'group_limited_greedy')"
        )
    return options


def _deepseek_v3(router: nn.Module) -> dict[str, Any]:
    return {
        "scoring": "sigmoid",
        "score_bias": True,
        "num_groups": router.num_group,
        "topk_groups": router.topk_group,
        "group_score": "top2_sum",
        "normalize_weights": bool(router.norm_topk_prob),
        "routed_scaling_factor": float(router.routed_scaling_factor),
    }


#: Router class name -> family, read from transformers 5's modeling files (``*TopKRouter.forward``).
FAMILIES: dict[str, NativeFamily] = {
    "MixtralTopKRouter": NativeFamily(
        "MixtralSparseMoeBlock", _softmax_topk(True), input_jitter="jitter_noise"
    ),
    "Qwen2MoeTopKRouter": NativeFamily(
        "Qwen2MoeSparseMoeBlock",
        _softmax_topk(),
        shared_experts="shared_expert",
        shared_gate="shared_expert_gate",
    ),
    "Qwen3MoeTopKRouter": NativeFamily("Qwen3MoeSparseMoeBlock", _softmax_topk()),
    "OlmoeTopKRouter": NativeFamily("OlmoeSparseMoeBlock", _softmax_topk()),
    "Qwen3VLMoeTextTopKRouter": NativeFamily("Qwen3VLMoeTextSparseMoeBlock", _softmax_topk(True)),
    "DeepseekV2TopkRouter": NativeFamily("DeepseekV2Moe", _deepseek_v2, shared_experts="shared_experts"),
    "DeepseekV3TopkRouter": NativeFamily("DeepseekV3MoE", _deepseek_v3, shared_experts="shared_experts"),
}


class AdoptedMoEBlock(HFMoEBlock):
    """An ``HFMoEBlock`` in place of a transformers-native sparse block, under the native names.

    Children: ``gate`` (the native router module, computing the logits), ``experts``
    (``GroupedExperts`` on the native parameters), the native shared expert(s) and shared gate
    under their native names, and ``router`` (moevl's decision: no parameters, no buffers).
    """

    def __init__(
        self,
        *,
        gate: nn.Module,
        router: TopKRouter,
        experts: GroupedExperts,
        layer_index: int,
        context: RoutingContext,
        shared: dict[str, nn.Module],
        shared_names: tuple[str | None, str | None],
        input_jitter: float = 0.0,
        stgc: STGCConfig | None = None,
        stgc_scale: float = 1.0,
    ) -> None:
        super().__init__(
            router=router,
            experts=experts,
            layer_index=layer_index,
            context=context,
            stgc=stgc,
            stgc_scale=stgc_scale,
        )
        self.gate = gate
        for name, module in shared.items():
            setattr(self, name, module)
        self.shared_names = shared_names
        self.input_jitter = input_jitter

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:  # type: ignore[override]
        if self.training and self.input_jitter > 0:  # Mixtral: router and experts see the noise
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.input_jitter, 1.0 + self.input_jitter)
            hidden_states = hidden_states * noise
        return super().forward(hidden_states, *args, **kwargs)

    @property
    def native_class_name(self) -> str:
        """The class name of the transformers block this one replaced (``Qwen3MoeSparseMoeBlock``, ...)."""
        return FAMILIES[type(self.gate).__name__].block

    def router_parameters(self) -> list[nn.Parameter]:
        # moevl's decision has no parameters: the native router module computes the logits.
        return list(self.gate.parameters())

    def routing_inputs(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        # The native router computes the logits (its dtype rules; transformers' hooks record them
        # for output_router_logits); its own weights/indices are not used: moevl decides.
        logits = self.gate(x)[0].float()  # (N, E)
        bias = self.gate.e_score_correction_bias if self.router.uses_score_bias else None
        return logits, bias

    def shared_output(self, x: Tensor) -> Tensor | None:
        experts_name, gate_name = self.shared_names
        if experts_name is None:
            return None
        out = getattr(self, experts_name)(x)
        if gate_name is not None:
            out = torch.sigmoid(getattr(self, gate_name)(x)) * out
        return out


def is_native_sparse_block(module: nn.Module) -> bool:
    """A transformers-style sparse block by structure: a router ``gate`` with a 2-D ``weight`` and
    an ``experts`` module with 3-D ``gate_up_proj`` and ``down_proj`` (not one moevl built)."""
    if isinstance(module, HFMoEBlock):
        return False
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    if not isinstance(gate, nn.Module) or not isinstance(experts, nn.Module):
        return False
    weight = getattr(gate, "weight", None)
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    return (
        isinstance(weight, Tensor)
        and weight.dim() == 2
        and isinstance(gate_up, Tensor)
        and gate_up.dim() == 3
        and isinstance(down, Tensor)
        and down.dim() == 3
    )


def _native_layers(model: nn.Module) -> tuple[nn.ModuleList, list[int]]:
    layers = decoder_layers(model)
    return layers, [i for i, layer in enumerate(layers) if is_native_sparse_block(layer.mlp)]


def is_native_moe(model: nn.Module) -> bool:
    """Whether ``model``'s decoder has transformers-native sparse MoE blocks moevl has not adopted
    (then ``adopt`` it; a dense model is ``upcycle``d)."""
    try:
        _, sparse = _native_layers(model)
    except ValueError:
        return False
    return bool(sparse)


def family_of(block: nn.Module) -> NativeFamily:
    """The ``NativeFamily`` of a native sparse block; ``ValueError`` naming an unknown router class."""
    router_cls = type(block.gate)
    family = FAMILIES.get(router_cls.__name__)
    if family is None or not router_cls.__module__.startswith("transformers."):
        raise ValueError(
            f"adopt: the router class {router_cls.__module__}.{router_cls.__qualname__} (in "
            f"{type(block).__name__}) is not one whose routing moevl knows, so it cannot keep the "
            f"model's semantics exactly; known router classes: {sorted(FAMILIES)}"
        )
    if type(block).__name__ != family.block:  # a known router inside a block of another design
        raise ValueError(
            f"adopt: {router_cls.__name__} is known inside {family.block}, but this block is "
            f"{type(block).__module__}.{type(block).__qualname__}; moevl does not know its combine rule"
        )
    return family


def _experts_from_native(native: nn.Module, *, activation: Any, implementation: str) -> GroupedExperts:
    """A ``GroupedExperts`` whose parameters ARE the native experts' (shared, not copied)."""
    if getattr(native, "is_transposed", False):
        raise ValueError(f"adopt: {type(native).__name__} stores transposed expert weights; not supported")
    gate_up, down = native.gate_up_proj, native.down_proj
    num_experts, two_h, hidden = gate_up.shape
    gate_up_bias = getattr(native, "gate_up_proj_bias", None)
    down_bias = getattr(native, "down_proj_bias", None)
    with torch.device("meta"):  # no throwaway allocation: every tensor is replaced below
        experts = GroupedExperts(
            num_experts=num_experts,
            hidden_size=hidden,
            intermediate_size=two_h // 2,
            gated=True,
            activation=activation,
            bias=gate_up_bias is not None,
            implementation=implementation,  # type: ignore[arg-type]
        )
    experts.gate_up_proj = gate_up
    experts.down_proj = down
    if gate_up_bias is not None:
        experts.gate_up_proj_bias = gate_up_bias
        experts.down_proj_bias = down_bias
    left = [n for n, t in [*experts.named_parameters(), *experts.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"adopt: {type(native).__name__} has no native tensor for {left}")
    return experts


#: transformers activation names whose ACT2FN function is exactly moevl's function of that name.
_SAME_ACTIVATIONS = ("silu", "swish", "gelu", "relu", "gelu_pytorch_tanh")


def _activation(native_experts: nn.Module, config: Any) -> Any:
    """The experts' activation: its name when moevl computes the very same function (its fast
    path), else the native activation module itself."""
    from transformers.activations import ACT2FN

    name = getattr(config, "hidden_act", None)
    if name in _SAME_ACTIVATIONS and type(native_experts.act_fn) is type(ACT2FN[name]):
        return name
    return native_experts.act_fn


def adopt(
    model: nn.Module,
    settings: MoESettings | None = None,
    *,
    freeze_dense: bool = False,
    implementation: str = "auto",
    **kwargs: Any,
) -> nn.Module:
    """Bring a transformers-native sparse MoE model into moevl, in place, keeping its semantics.

    The adopted model computes the same logits as before (same router logits, same decision, same
    expert weights), and adds STGC, LTDR (tail rule and language-only balancing; image and video
    tokens are vision tokens), routing statistics and moevl's balancing options. Its training loss
    keeps the model's own auxiliary loss unless ``balance_coef`` asks for moevl's.

    Args:
        model: a transformers model whose decoder has native sparse blocks (``is_native_moe``).
        settings: a ``MoESettings``, or None and the same fields as keyword arguments (``router``,
            ``ltdr``, ``stgc``, ``balance_coef``, ...; not both). ``num_experts``/``top_k`` None:
            the model's (a different value is refused); ``layers`` None: every sparse block
            (indices or a rule must name sparse layers only); ``balance_coef`` None: the model's own
            auxiliary loss (``output_router_logits``/``router_aux_loss_coef``), a number: moevl's
            balancing instead (the model is then called with ``output_router_logits=False``).
        freeze_dense: train only the MoE blocks (routers, experts, shared experts).
        implementation: experts implementation (``auto``, ``grouped``, ``loop``).
    Returns:
        The same model object with ``model.moe_context`` and ``model.moe_settings`` (resolved).
    """
    if getattr(model, "moe_context", None) is not None:
        raise ValueError("adopt: this model is already upcycled or adopted (it has moevl MoE layers)")
    settings = settings_from(settings, kwargs, caller="adopt")
    layers, sparse = _native_layers(model)
    if not sparse:
        raise ValueError(
            f"adopt: {type(model).__name__} has no transformers-native sparse MoE block in its decoder "
            "(a router `gate` and 3-D `experts.gate_up_proj`/`down_proj`); a dense model is upcycled"
        )
    families = {i: family_of(layers[i].mlp) for i in sparse}
    num_experts = {layers[i].mlp.experts.gate_up_proj.shape[0] for i in sparse}
    top_k = {int(layers[i].mlp.gate.top_k) for i in sparse}
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
    if settings.layers is None:
        chosen = sparse
    else:
        chosen = select_layers(settings.layers, len(layers))
        dense = [i for i in chosen if i not in sparse]
        if dense:
            raise ValueError(
                f"adopt: layers {dense} are not sparse MoE layers of the model (sparse: {sparse})"
            )
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
    settings = dataclasses.replace(settings, num_experts=model_e, top_k=model_k, layers=tuple(chosen))
    takes_flag = "output_router_logits" in inspect.signature(model.forward).parameters
    context = RoutingContext(
        vision_token_ids=vision_token_ids(getattr(model, "config", None)),
        disable_native_aux_loss=settings.balance_coef is not None and takes_flag,
    )
    text_config = model.config.get_text_config() if hasattr(model, "config") else None
    for i in chosen:
        native, family = layers[i].mlp, families[i]
        router = make_router(
            settings,
            hidden_size=native.gate.weight.shape[1],
            own_weight=False,
            **family.semantics(native.gate),
        )
        experts = _experts_from_native(
            native.experts, activation=_activation(native.experts, text_config), implementation=implementation
        )
        shared = {n: getattr(native, n) for n in (family.shared_experts, family.shared_gate) if n is not None}
        layers[i].mlp = AdoptedMoEBlock(
            gate=native.gate,
            router=router,
            experts=experts,
            layer_index=i,
            context=context,
            shared=shared,
            shared_names=(family.shared_experts, family.shared_gate),
            input_jitter=float(getattr(native, family.input_jitter) or 0.0) if family.input_jitter else 0.0,
            stgc=settings.stgc,
            stgc_scale=1.0 / len(chosen),
        ).train(native.training)  # the mode of the block it replaces
    if freeze_dense:
        freeze_all_but_moe(model)
    attach(model, settings=settings, context=context)
    return model
