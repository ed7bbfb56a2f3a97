"""``export``: a Hugging Face checkpoint out of a moevl MoE model — native where exact, else moevl's.

A native checkpoint loads with plain transformers (``from_pretrained`` of the native class or the
Auto classes, no moevl) and computes the same logits as the moevl model. It is written only when a
transformers class computes exactly what the model computes at inference:

* Qwen3 upcycled (any layer set) -> ``Qwen3Moe*`` (dense layers in ``mlp_only_layers``);
* Llama or Mistral upcycled with every layer MoE -> ``Mixtral*``;
* a LLaVA-family wrapper whose language model converts -> the same wrapper, MoE ``text_config``;
* an adopted native MoE model -> its own class, its own config and key names.

Everything else is written in the moevl format (``moevl.checkpoint.format``), which plain transformers refuses
to load, and ``ExportResult.reason`` says why. Inference-relevant settings are checked one by one;
training-only ones (STGC, balancing and z-loss coefficients, ``balance_from``, router jitter,
LTDR's language-only balancing) never block an export.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from moevl.checkpoint.format import save_moe_model, staged_directory
from moevl.hf.block import MoEBlock
from moevl.hf.runtime import decoder_layers, find_moe_state, moe_state
from moevl.hf.settings import FIELD_KINDS, MoESettings
from moevl.moe import LTDRRouter


@dataclass(frozen=True)
class ExportResult:
    """What ``export`` wrote.

    Attributes:
        format: ``"native"`` (plain transformers loads it) or ``"moevl"`` (``moevl.checkpoint.format``).
        directory: the checkpoint folder.
        model_class: the class that loads it: the native class, or for the moevl format the
            model's own class (rebuilt by ``load_moe_model``, or by the Auto classes after
            ``register_auto_classes()``).
        reason: why this format (which native class, or what has none).
        notes: facts worth knowing about the export (e.g. a router weight cast to the model dtype).
    """

    format: Literal["native", "moevl"]
    directory: Path
    model_class: str
    reason: str
    notes: tuple[str, ...] = ()
    how_to_load: str = ""  # one line: the call that loads it (the moevl format: after register_auto_classes)


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


# --- the conversion table -------------------------------------------------------------------------


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


# --- planning -------------------------------------------------------------------------------------


def plan_export(model: nn.Module) -> ExportPlan:
    """Decide how ``export`` saves ``model`` (native class or moevl format, and why); writes nothing."""
    blocks = _blocks(model)
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


def export(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    processor: Any | None = None,
    require_native: bool = False,
    max_shard_size: int | str = "5GB",
    lora: Literal["merge", "adapter"] = "merge",
) -> ExportResult:
    """Write ``model`` as a native transformers checkpoint when a class computes exactly what it
    computes, else in the moevl format (module doc); atomically (``moevl.checkpoint.format.staged_directory``).
    LoRA adapters (``moevl.hf.lora``) are merged into the weights of a copy first.

    Args:
        model: an upcycled or adopted model.
        directory: the checkpoint folder (an existing file is refused).
        processor: a tokenizer or processor to save beside the weights.
        require_native: raise ``ValueError`` with the reason instead of writing the moevl format.
        max_shard_size: shard the weights above this size.
        lora: for a model with LoRA adapters: ``"merge"`` folds them into the weights; ``"adapter"`` writes
            the base model without them (native: required) and the adapters alone in PEFT's format in
            ``directory/adapter`` (``peft.PeftModel.from_pretrained(base, directory / "adapter")`` and
            serving engines that load LoRA adapters: ``export_adapter``).
    Returns:
        ``ExportResult``: the format, the class that loads it, and why.
    """
    if lora not in ("merge", "adapter"):
        raise ValueError(f"export: lora must be 'merge' or 'adapter', got {lora!r}")
    if lora == "adapter":
        return export_adapter(model, directory, processor=processor, max_shard_size=max_shard_size)
    state = find_moe_state(model)
    adapters = None if state is None else state.settings.lora
    if adapters is not None:  # the adapters are folded into a copy: the caller's model keeps them
        from moevl.hf.lora import merge_lora

        model = merge_lora(copy.deepcopy(model))
    plan = plan_export(model)
    if adapters is not None:
        merged = (
            f"LoRA adapters (r={adapters.r}, alpha={adapters.alpha:g}, on {', '.join(adapters.targets)}) "
            "merged into the weights"
        )
        plan = dataclasses.replace(plan, notes=(merged, *plan.notes))
    directory = Path(directory)
    if plan.native_class is None:
        if require_native:
            raise ValueError(f"export: no exact native class: {plan.reason}")
        reason = f"{plan.reason}; saved in the moevl format"
        auto = _auto_class(model)
        how = (
            f"load it with moevl installed: moevl.checkpoint.register_auto_classes(), then "
            f"{auto}.from_pretrained({str(directory)!r}) (plain transformers does not know model_type 'moevl'; "
            f"{directory / MOEVL_README} says more)"
        )
        readme = _moevl_readme(directory, auto, plan.reason, plan.notes)
        save_moe_model(
            model,
            directory,
            processor=processor,
            max_shard_size=max_shard_size,
            extra_files={MOEVL_README: readme},
        )
        return ExportResult("moevl", directory, type(model).__name__, reason, plan.notes, how)
    native = build_native(model, plan)
    with staged_directory(directory) as tmp:
        native.save_pretrained(tmp, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(str(tmp))
    return ExportResult("native", directory, plan.native_class.__name__, plan.reason, plan.notes)


#: The file in a moevl-format export that says how to load it.
MOEVL_README = "README.md"


def _auto_class(model: nn.Module) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    image_text = type(model).__name__ in set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values())
    return "AutoModelForImageTextToText" if image_text else "AutoModelForCausalLM"


def _moevl_readme(directory: Path, auto: str, reason: str, notes: tuple[str, ...]) -> str:
    """The README of a moevl-format export: what it is, why not a native class, how to load it."""
    lines = [
        "# A moevl MoE checkpoint",
        "",
        'This folder is in the moevl format (`config.json` has `model_type: "moevl"`), which plain transformers',
        "does not know: loaded without moevl it fails with an unknown model type. Why not a native transformers",
        f"class: {reason}.",
        "",
        "Load it where moevl is installed (nothing downloads):",
        "",
        "```python",
        "import moevl.checkpoint",
        f"from transformers import AutoProcessor, {auto}",
        "",
        'moevl.checkpoint.register_auto_classes()  # the Auto classes learn model_type "moevl"',
        f"model = {auto}.from_pretrained({str(directory)!r})",
        f"processor = AutoProcessor.from_pretrained({str(directory)!r})",
        "```",
        "",
        f"or `moevl.checkpoint.load_moe_model({str(directory)!r})`; `moevl eval --model {directory} --data ...`",
        "evaluates it.",
    ]
    if notes:
        lines += ["", "Notes:", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


#: Where ``export_adapter`` writes the adapter, inside the exported base model's folder.
ADAPTER_DIR = "adapter"


def export_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    processor: Any | None = None,
    max_shard_size: int | str = "5GB",
) -> ExportResult:
    """Write the base model (the adapters left out, not merged) as a native checkpoint in ``directory`` and
    the LoRA adapters alone in PEFT's format in ``directory/adapter``: the experts' factors as PEFT's
    ``target_parameters`` adapters of the stacked ``gate_up_proj`` / ``down_proj`` (``lora_A`` (E·r, in),
    ``lora_B`` (out, r·E)), the routers' as ``target_parameters`` of the router weight, the attention's as
    PEFT's own. ``ValueError`` when the model has no adapters or no exact native class (PEFT adapters load
    into a transformers class). The exported adapter has ``lora_dropout`` 0 (PEFT's parameter adapters refuse
    dropout; inference uses none)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from moevl.hf.lora import _attention_linears, unload_lora

    state = find_moe_state(model)
    config = None if state is None else state.settings.lora
    if config is None:
        raise ValueError("export_adapter: the model has no LoRA adapters (moe_settings.lora is None)")
    base = unload_lora(copy.deepcopy(model))
    plan = plan_export(base)
    if plan.native_class is None:
        raise ValueError(f"export_adapter: PEFT adapters need a native class to load into, and {plan.reason}")
    blocks = dict(_blocks(model))
    renamed_modules = {
        v.rsplit(".", 1)[0]: k.rsplit(".", 1)[0] for k, v in plan.renamed.items()
    }  # native -> ours
    native = build_native(base, plan)
    targets = []
    for name, block in blocks.items():
        if "experts" in config.targets:
            problem = block.peft_layout_problem()
            if problem is not None:
                raise ValueError(f"export_adapter: {name}: {problem}")
            experts = f"{name}.{block.experts_name}"
            first = "gate_up_proj" if block.experts.gated else "up_proj"
            targets += [f"{experts}.{first}", f"{experts}.down_proj"]
        if "routers" in config.targets:
            ours = f"{name}.{block.router_name}"
            native_router = {o: n for n, o in renamed_modules.items()}.get(ours, ours)
            targets.append(f"{native_router}.weight")
    peft_config = PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=0.0,
        target_modules=_attention_linears(native) if "attention" in config.targets else None,
        target_parameters=targets or None,
        bias="none",
    )
    directory = Path(directory)
    with staged_directory(directory) as tmp:
        native.save_pretrained(tmp, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(str(tmp))
        peft_model = get_peft_model(native, peft_config)
        _copy_adapters(model, peft_model.base_model.model, renamed_modules)
        peft_model.peft_config["default"].base_model_name_or_path = str(tmp)  # PEFT reads the base's config
        peft_model.save_pretrained(str(tmp / ADAPTER_DIR))
        adapter_config = tmp / ADAPTER_DIR / "adapter_config.json"
        data = json.loads(adapter_config.read_text())
        data["base_model_name_or_path"] = str(directory.resolve())  # where the base is once committed
        adapter_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    reason = f"{plan.reason}; LoRA adapters (r={config.r}) in PEFT's format in {ADAPTER_DIR}/"
    return ExportResult("native", directory, plan.native_class.__name__, reason, plan.notes)


def _copy_adapters(model: nn.Module, native: nn.Module, renamed_modules: dict[str, str]) -> None:
    """Set every PEFT LoRA layer of ``native`` (PEFT-injected) from ``model``'s adapters (module doc of
    ``export_adapter``: PEFT's layouts)."""
    from peft.tuners.lora import LoraLayer

    for name, module in native.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        path = name.replace(".base_layer", "")
        a_out, b_out = module.lora_A["default"].weight, module.lora_B["default"].weight
        param = getattr(module, "parameter_name", None)
        if param is None:  # attention: PEFT on both sides, the same layout
            ours = model.get_submodule(path)
            a, b = ours.lora_A["default"].weight, ours.lora_B["default"].weight
        elif param == "weight":  # a router: RouterLoRA's (r, D) and (E, r)
            router = model.get_submodule(renamed_modules.get(path, path))
            a, b = router.lora.lora_A, router.lora.lora_B
        else:  # stacked experts: ours (E, r, in) and (E, out, r)
            experts = model.get_submodule(path)
            a_e, b_e = getattr(experts, f"{param}_lora_A"), getattr(experts, f"{param}_lora_B")
            a = a_e.reshape(-1, a_e.shape[-1])  # (E·r, in): row e·r + j
            b = b_e.permute(1, 2, 0).reshape(b_e.shape[1], -1)  # (out, r·E): column j·E + e
        if a.shape != a_out.shape or b.shape != b_out.shape:
            raise ValueError(
                f"export_adapter: {name}: PEFT's adapter is {tuple(a_out.shape)}, {tuple(b_out.shape)}, "
                f"moevl's {tuple(a.shape)}, {tuple(b.shape)}"
            )
        with torch.no_grad():
            a_out.copy_(a)
            b_out.copy_(b)


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


def _blocks(model: nn.Module) -> list[tuple[str, MoEBlock]]:
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
