"""The export plan: which native transformers class computes exactly what a moevl MoE model computes at
inference (the conversion table, the config it takes, the key renames and the notes), and the native model
built from a plan (``build_native``). ``moevl.checkpoint.export`` writes what the plan says."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moevl.hf.block import MoEBlock
from moevl.hf.runtime import decoder_layers, find_moe_state, moe_state
from moevl.hf.settings import FIELD_KINDS, MoESettings
from moevl.moe import LTDRRouter


@dataclass(frozen=True)
class ExportPlan:
    """The decision of ``plan_export``, before anything is written.

    Attributes:
        native_class: the transformers class to save as, or None (moevl format).
        config: that class's config (None for the moevl format).
        renamed: model state-dict key -> native key, for the keys whose names differ.
        reason: why (see ``ExportResult.reason``).
        notes: see ``ExportResult.notes``.
    """

    native_class: type | None
    config: Any
    renamed: dict[str, str]
    reason: str
    notes: tuple[str, ...] = ()


class NotExact(Exception):
    """Raised inside planning with the reason a native class would not be exact."""


@dataclass(frozen=True)
class Conversion:
    """A dense transformers family whose upcycled models a native MoE family computes exactly.

    Attributes:
        source_prefix, target_prefix: class-name prefixes (``Qwen3ForCausalLM`` ->
            ``Qwen3MoeForCausalLM``: the rest of the name is kept).
        target_model_type: the native MoE ``model_type``.
        dense_layers: the target can keep some layers dense (``mlp_only_layers``).
        always_renormalizes: the target's router always renormalises the top-k weights (else it
            follows ``norm_topk_prob``).
        source_only: fields of the source config that the target config lacks -> a check
            returning None (the field has no effect the target misses) or the reason it does.
        carried: source fields the target's modelling reads although its config class does not
            declare them (``getattr(config, "head_dim", ...)``): passed as extra attributes.
        moe_fields: the target fields that describe the MoE layers, from ``MoEFacts``.
    """

    source_prefix: str
    target_prefix: str
    target_model_type: str
    dense_layers: bool
    always_renormalizes: bool
    source_only: dict[str, Callable[[Any], str | None]]
    carried: tuple[str, ...]
    moe_fields: Callable[[MoEFacts], dict[str, Any]]


@dataclass(frozen=True)
class MoEFacts:
    """What the upcycled MoE layers are (read from the modules, checked uniform)."""

    num_experts: int
    top_k: int
    intermediate_size: int
    normalize: bool
    moe_layers: tuple[int, ...]
    dense_layers: tuple[int, ...]
    aux_loss_coef: float


def _must_be(field: str, value: Any, why: str) -> Callable[[Any], str | None]:
    def check(config: Any) -> str | None:
        got = getattr(config, field, value)
        return None if got == value else f"{field}={got!r}: {why}"

    return check


def _ignored(config: Any) -> str | None:
    return None


def _qwen3_layer_types(config: Any) -> str | None:
    # Qwen3 slides per layer (layer_types); Qwen3-MoE slides every layer iff sliding_window is set.
    types = set(config.layer_types or ["full_attention"])
    if config.sliding_window is None and types == {"full_attention"}:
        return None
    if config.sliding_window is not None and types == {"sliding_attention"}:
        return None
    return (
        f"layer_types={config.layer_types} with sliding_window={config.sliding_window}: Qwen3-MoE applies "
        "one attention window to every layer"
    )


CONVERSIONS: dict[str, Conversion] = {
    "qwen3": Conversion(
        source_prefix="Qwen3",
        target_prefix="Qwen3Moe",
        target_model_type="qwen3_moe",
        dense_layers=True,
        always_renormalizes=False,
        source_only={"layer_types": _qwen3_layer_types, "max_window_layers": _ignored, "head_dim": _ignored},
        carried=("head_dim",),
        moe_fields=lambda f: dict(
            num_experts=f.num_experts,
            num_experts_per_tok=f.top_k,
            moe_intermediate_size=f.intermediate_size,
            norm_topk_prob=f.normalize,
            decoder_sparse_step=1,
            mlp_only_layers=list(f.dense_layers),
            output_router_logits=False,
            router_aux_loss_coef=f.aux_loss_coef,
        ),
    ),
    "llama": Conversion(
        source_prefix="Llama",
        target_prefix="Mixtral",
        target_model_type="mixtral",
        dense_layers=False,
        always_renormalizes=True,
        source_only={
            "attention_bias": _must_be("attention_bias", False, "Mixtral's attention has no biases"),
            "mlp_bias": _must_be("mlp_bias", False, "Mixtral's experts have no biases"),
            "pretraining_tp": _ignored,  # not read by transformers 5's Llama
        },
        carried=(),
        moe_fields=lambda f: dict(
            num_local_experts=f.num_experts,
            num_experts_per_tok=f.top_k,
            output_router_logits=False,
            router_aux_loss_coef=f.aux_loss_coef,
            router_jitter_noise=0.0,
            sliding_window=None,  # Llama has no attention window
        ),
    ),
    "mistral": Conversion(
        source_prefix="Mistral",
        target_prefix="Mixtral",
        target_model_type="mixtral",
        dense_layers=False,
        always_renormalizes=True,
        source_only={},
        carried=(),
        moe_fields=lambda f: dict(
            num_local_experts=f.num_experts,
            num_experts_per_tok=f.top_k,
            output_router_logits=False,
            router_aux_loss_coef=f.aux_loss_coef,
            router_jitter_noise=0.0,
        ),
    ),
}


#: config keys that name the model, not what it computes
_IDENTITY_KEYS = (
    "model_type",
    "architectures",
    "transformers_version",
    "_name_or_path",
    "moevl",
    "transformers_weights",
)


def plan_export(model: nn.Module) -> ExportPlan:
    """Decide how ``export`` saves ``model`` (native class or moevl format, and why); writes nothing."""
    blocks = named_blocks(model)
    try:
        _check_inference_rules(model, blocks)
        methods = {b.method for _, b in blocks}
        if methods == {"adopt"}:
            return _plan_adopted(model, blocks)
        if len(methods) > 1:
            raise NotExact("the model mixes adopted and upcycled MoE layers")
        return _plan_upcycled(model, blocks)
    except NotExact as err:
        return ExportPlan(None, None, {}, str(err), _adopted_ltdr_notes(model, blocks))


def build_native(model: nn.Module, plan: ExportPlan) -> nn.Module:
    """The native model of ``plan`` holding ``model``'s tensors (shared, not copied; router
    weights cast to the model dtype). Built on the meta device, then every tensor assigned:
    a missing, unexpected or mis-shaped key raises ``ValueError`` (never a random init)."""
    if plan.native_class is None:
        raise ValueError(f"no native class: {plan.reason}")
    with torch.device("meta"):
        native = plan.native_class(copy.deepcopy(plan.config))
    target = native.state_dict()
    state = {plan.renamed.get(k, k): v for k, v in model.state_dict().items()}
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    shapes = sorted(k for k in set(target) & set(state) if target[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(
            f"export: {plan.native_class.__name__} does not hold the model's tensors: missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}, shape-mismatched {shapes[:6]}"
        )
    for key in plan.renamed.values():  # the native routers hold (and compute in) the experts' dtype
        experts_dtype = state[key.removesuffix("gate.weight") + "experts.down_proj"].dtype
        state[key] = state[key].to(experts_dtype)
    native.load_state_dict(state, strict=True, assign=True)
    native.tie_weights()
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        native.generation_config = copy.deepcopy(generation_config)
    return native.eval()


def named_blocks(model: nn.Module) -> list[tuple[str, MoEBlock]]:
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, MoEBlock)]
    if not blocks or find_moe_state(model) is None:
        raise ValueError(
            f"export: {type(model).__name__} has no moevl MoE layers (not upcycled or adopted); "
            "a dense model is saved with save_pretrained"
        )
    return blocks


def _check_inference_rules(model: nn.Module, blocks: list[tuple[str, MoEBlock]]) -> None:
    """Routing options that change inference and that no native class has."""
    context = moe_state(model).context
    for name, block in blocks:
        router = block.router
        if block.method == "upcycle" and block.choice_bias() is not None:
            raise NotExact(
                f"the aux-loss-free choice bias ({name}: bias_update_rate) changes top-k selection at inference; "
                "no native class of an upcycled model has one"
            )
        if router.capacity_factor is not None:
            raise NotExact(
                f"capacity_factor={router.capacity_factor} drops tokens over capacity at inference ({name}); "
                "no native class does"
            )
        if (
            isinstance(router, LTDRRouter)
            and router.vision_tail
            and router.tail_top_k > router.top_k
            and context.vision_token_ids
        ):
            raise NotExact(
                f"LTDR's tail rule routes vision tail tokens to tail_top_k={router.tail_top_k} experts instead of "
                f"top_k={router.top_k} at inference ({name}); no native class has it"
            )


def _plan_adopted(model: nn.Module, blocks: list[tuple[str, MoEBlock]]) -> ExportPlan:
    config = copy.deepcopy(model.config)
    _drop_moevl(config)
    notes = _training_only_notes(model)
    return _verified(
        ExportPlan(
            type(model),
            config,
            {},
            f"adopted {type(model).__name__}: saved as itself, with its own config and key names",
            notes,
        ),
        model,
    )


def _plan_upcycled(model: nn.Module, blocks: list[tuple[str, MoEBlock]]) -> ExportPlan:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    wrapper = text is not config
    conversion = CONVERSIONS.get(text.model_type)
    if conversion is None:
        known = ", ".join(f"{k} -> {c.target_model_type}" for k, c in CONVERSIONS.items())
        raise NotExact(f"upcycled {text.model_type} models have no native MoE class (known: {known})")
    facts = _moe_facts(model, blocks, text, conversion)
    target_text = _target_config(text, conversion, facts)
    if wrapper:
        target_config = copy.deepcopy(config)
        _drop_moevl(target_config)
        target_config.text_config = target_text
        native_class = type(model)
        what = f"{native_class.__name__} with a {type(target_text).__name__} text_config"
    else:
        target_config = target_text
        name = type(model).__name__
        if not name.startswith(conversion.source_prefix):
            raise NotExact(f"{name} is not a {conversion.source_prefix}* class")
        import transformers

        native_class = getattr(
            transformers, conversion.target_prefix + name[len(conversion.source_prefix) :], None
        )
        if native_class is None:
            raise NotExact(
                f"transformers has no {conversion.target_prefix}{name[len(conversion.source_prefix) :]}"
            )
        what = native_class.__name__
    target_config.architectures = [native_class.__name__]
    dense = f", dense layers {list(facts.dense_layers)} in mlp_only_layers" if facts.dense_layers else ""
    renamed = {f"{name}.router.weight": f"{name}.gate.weight" for name, _ in blocks}
    notes = _training_only_notes(model) + _dtype_notes(model, blocks)
    plan = ExportPlan(
        native_class,
        target_config,
        renamed,
        f"upcycled {text.model_type} -> {what}{dense}",
        notes,
    )
    return _verified(plan, model)


def _verified(plan: ExportPlan, model: nn.Module) -> ExportPlan:
    """Build the native class on the meta device: its MoE layers must be native sparse blocks where
    the model's are, and its tensors exactly the model's (names and shapes)."""
    try:
        with torch.device("meta"):
            native = plan.native_class(copy.deepcopy(plan.config))
    except Exception as err:  # a config the class rejects
        raise NotExact(f"{plan.native_class.__name__} rejects the converted config: {err}") from None
    target = {k: tuple(v.shape) for k, v in native.state_dict().items()}
    ours = {plan.renamed.get(k, k): tuple(v.shape) for k, v in model.state_dict().items()}
    if target != ours:
        diff = sorted(set(target) ^ set(ours)) or sorted(k for k in target if target[k] != ours[k])
        raise NotExact(f"{plan.native_class.__name__}'s tensors differ from the model's: {diff[:6]}")
    return plan


def _moe_facts(
    model: nn.Module, blocks: list[tuple[str, MoEBlock]], text: Any, conversion: Conversion
) -> MoEFacts:
    from transformers.activations import ACT2FN

    layers = decoder_layers(model)
    moe = tuple(i for i, layer in enumerate(layers) if isinstance(layer.mlp, MoEBlock))
    dense = tuple(i for i in range(len(layers)) if i not in moe)
    if dense and not conversion.dense_layers:
        raise NotExact(
            f"{conversion.target_prefix} has no dense layers, but layers {list(dense)} of this "
            f"{text.model_type} model are dense (only MoE layers {list(moe)})"
        )
    values: dict[str, set] = {k: set() for k in ("num_experts", "top_k", "intermediate_size", "normalize")}
    probe = torch.linspace(-8.0, 8.0, 257)
    reference = ACT2FN[text.hidden_act](probe)
    for name, block in blocks:
        router, experts = block.router, block.experts
        for label, ok in (
            ("a shared expert", block.shared_experts is None),
            ("non-gated experts", experts.gated),
            ("expert biases", experts.in_proj_bias is None and experts.down_proj_bias is None),
            ("sigmoid scoring", router.scoring == "softmax"),
            ("a score-correction bias", not router.uses_score_bias),
            ("group-limited routing", router.topk_groups == router.num_groups),
            ("a routed scaling factor", router.routed_scaling_factor == 1.0),
            ("a router without its own weight", router.own_weight),
        ):
            if not ok:
                raise NotExact(f"{name} has {label}, which {conversion.target_prefix} does not")
        if conversion.always_renormalizes and not router.normalize_weights:
            raise NotExact(
                f"{name} does not renormalise its top-k weights; {conversion.target_prefix} always does"
            )
        if not torch.allclose(experts.activation(probe), reference, rtol=1e-6, atol=1e-7):
            raise NotExact(
                f"{name}'s experts use {experts.activation.name}, not the config's {text.hidden_act!r}"
            )
        values["num_experts"].add(experts.num_experts)
        values["top_k"].add(router.top_k)
        values["intermediate_size"].add(experts.intermediate_size)
        values["normalize"].add(router.normalize_weights)
    for key, seen in values.items():
        if len(seen) != 1:
            raise NotExact(f"the MoE layers differ in {key} ({sorted(seen)}); native classes use one value")
    balance = moe_state(model).settings.balance_coef
    return MoEFacts(
        num_experts=values["num_experts"].pop(),
        top_k=values["top_k"].pop(),
        intermediate_size=values["intermediate_size"].pop(),
        normalize=values["normalize"].pop(),
        moe_layers=moe,
        dense_layers=dense,
        aux_loss_coef=0.0 if balance is None else float(balance),
    )


def _fields(config_class: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)}


def _target_config(text: Any, conversion: Conversion, facts: MoEFacts) -> Any:
    """The native MoE config of the dense ``text`` config: every field both declare copied and
    checked equal after construction; source-only fields checked by the table; target-only
    fields all set from the MoE layers (a field moevl does not know blocks the export)."""
    from transformers import CONFIG_MAPPING

    target_class = CONFIG_MAPPING[conversion.target_model_type]
    source_fields, target_fields = _fields(type(text)), _fields(target_class)
    moe = conversion.moe_fields(facts)
    unknown_target = sorted(target_fields - source_fields - set(moe))
    if unknown_target:
        raise NotExact(
            f"{target_class.__name__} has fields {unknown_target} that moevl does not know how to set"
        )
    for field in sorted(source_fields - target_fields):
        check = conversion.source_only.get(field)
        if check is None:
            raise NotExact(
                f"{type(text).__name__}.{field}={getattr(text, field, None)!r} has no counterpart in "
                f"{target_class.__name__} that moevl knows"
            )
        reason = check(text)
        if reason is not None:
            raise NotExact(reason)
    source = text.to_dict()
    kwargs = {
        k: v
        for k, v in source.items()
        if k not in _IDENTITY_KEYS and (k in target_fields or k not in source_fields)
    }
    kwargs.update({k: source[k] for k in conversion.carried if k in source})
    overlap = {k: v for k, v in moe.items() if k in kwargs and kwargs[k] != v}
    if overlap:  # e.g. Mistral's sliding_window set where the table sets another value
        raise NotExact(
            f"{type(text).__name__} has {overlap}, which {target_class.__name__} sets from the MoE layers"
        )
    kwargs.update(moe)
    try:
        target = target_class(**kwargs)
    except Exception as err:
        raise NotExact(f"{target_class.__name__} rejects the converted config: {err}") from None
    differ = {
        k: (getattr(text, k), getattr(target, k, None))
        for k in sorted((source_fields & target_fields) | set(conversion.carried))
        if k not in moe and k not in _IDENTITY_KEYS and getattr(text, k) != getattr(target, k, None)
    }
    if differ:
        raise NotExact(f"{target_class.__name__} changes {differ} (dense -> native)")
    # Mixtral's experts are config.intermediate_size wide
    if not conversion.dense_layers and target.intermediate_size != facts.intermediate_size:
        raise NotExact(
            f"the experts' intermediate size {facts.intermediate_size} is not the config's {target.intermediate_size}"
        )
    return target


def _drop_moevl(config: Any) -> None:
    for c in (config, getattr(config, "text_config", None)):
        if c is not None and hasattr(c, "moevl"):
            delattr(c, "moevl")


def _adopted_ltdr_notes(model: nn.Module, blocks: list[tuple[str, MoEBlock]]) -> tuple[str, ...]:
    """An adopted model whose LTDR tail rule acts at inference no longer computes the original's logits."""
    routers = [b.router for _, b in blocks if b.method == "adopt"]
    acting = [r for r in routers if isinstance(r, LTDRRouter) and r.vision_tail and r.tail_top_k > r.top_k]
    if not acting or not moe_state(model).context.vision_token_ids:
        return ()
    r = acting[0]
    return (
        f"LTDR changes inference: vision tail tokens get tail_top_k={r.tail_top_k} experts instead of "
        f"top_k={r.top_k}, so the logits equal the original {type(model).__name__}'s only without LTDR "
        "(adopt with another router, or LTDRConfig(vision_tail=False), for the original's logits)",
    )


def _training_only_notes(model: nn.Module) -> tuple[str, ...]:
    """The training fields (``FIELD_KINDS``) set away from their defaults: no native checkpoint carries them
    (``balance_coef`` does: it is the native config's ``router_aux_loss_coef``)."""
    s = moe_state(model).settings
    left_out = [
        name
        for name, kind in FIELD_KINDS.items()
        if kind == "training" and name != "balance_coef" and getattr(s, name) != _DEFAULTS[name]
    ]
    notes = [f"training-only settings, not part of the checkpoint: {', '.join(left_out)}"] if left_out else []
    if s.ltdr is not None:
        notes.append(
            "LTDR's balancing is training-only and its tail rule cannot act here (no vision tokens or a == k)"
        )
    return tuple(notes)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MoESettings)}


def _dtype_notes(model: nn.Module, blocks: list[tuple[str, MoEBlock]]) -> tuple[str, ...]:
    dtype = blocks[0][1].experts.down_proj.dtype
    if dtype == torch.float32:
        return ()
    return (
        f"router weights cast from float32 to {dtype}: the native router computes its logits in the model "
        "dtype, so a token whose top-k scores are within that dtype's rounding may choose another expert",
    )
