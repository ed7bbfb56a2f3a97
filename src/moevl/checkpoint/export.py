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
LTDR's language-only balancing) never block an export. The decision is ``moevl.checkpoint.plan``'s.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from moevl.checkpoint.format import save_moe_model, staged_directory
from moevl.checkpoint.plan import build_native, named_blocks, plan_export
from moevl.hf.runtime import find_moe_state


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
        raise ValueError("export_adapter: the model has no LoRA adapters (its settings' lora is None)")
    base = unload_lora(copy.deepcopy(model))
    plan = plan_export(base)
    if plan.native_class is None:
        raise ValueError(f"export_adapter: PEFT adapters need a native class to load into, and {plan.reason}")
    blocks = dict(named_blocks(model))
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
