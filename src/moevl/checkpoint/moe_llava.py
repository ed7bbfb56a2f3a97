"""Load released MoE-LLaVA checkpoints (PKU-YuanGroup/MoE-LLaVA) without DeepSpeed.

``load_moe_llava(path)`` builds the matching transformers ``LlavaForConditionalGeneration``
(CLIP tower, ``multi_modal_projector``, Phi / StableLM language model), upcycles it with
``moevl.hf.upcycle`` at the checkpoint's MoE layers and copies every tensor in, strictly: a missing
or unexpected key is an error, never a random weight. The model can then be evaluated and tuned
with STGC / LTDR like any upcycled moevl model (``moevl.training.MoETrainer``, ``save_moe_model``).

The layout of a MoE-LLaVA checkpoint (read from github.com/PKU-YuanGroup/MoE-LLaVA at 6cb5f66):

* ``config.json``: ``model_type`` ``moe_llava_phi`` / ``moe_llava_stablelm`` (and
  ``moe_llava_{llama,qwen,qwen1_5,mistral,minicpm}``, not supported here), ``architectures``
  ``[MoELLaVAPhiForCausalLM]`` / ``[EvalMoE...]``. The backbone's own fields are at the top level:
  Phi as transformers 4.36's ``PhiConfig`` (``moellava/model/language_model/phi/configuration_phi.py``:
  ``partial_rotary_factor``, ``rope_theta``, ``layer_norm_eps``, ``qk_layernorm``, ``hidden_act``);
  StableLM as ``StableLMEpochConfig`` (``stablelm/configuration_stablelm_epoch.py``: ``rope_pct``,
  ``norm_eps``, ``use_qkv_bias``; its MLP hard-codes SiLU, ``modeling_stablelm_epoch.py:165``).
  The ``moe`` dict (``llava_phi_moe.py:48``, ``initialize_moe_modules`` at line 428): ``moe_enable``,
  ``moe_mode``, ``moe_layers_idx`` (resolved layer indices), ``num_experts`` (a list, one per MoE
  layer), ``top_k_experts``, ``capacity_factor``, ``eval_capacity_factor``, ``min_capacity``,
  ``use_residual``, ``router_aux_loss_coef``, ``ep_size``, ``train_modules``. Vision fields
  (``llava_arch.py``, ``initialize_vision_modules``): ``mm_image_tower`` (a hub name such as
  ``openai/clip-vit-large-patch14-336``), ``mm_hidden_size``, ``mm_vision_select_layer`` (-2),
  ``mm_vision_select_feature`` (``"patch"``: drop CLS; ``"cls_patch"``: keep it),
  ``image_projector_type`` (``mlp2x_gelu``), ``mm_video_tower`` (null for image models).
* weights (the Trainer saves the whole ``state_dict``, ``train/train.py:251``): language model
  ``model.embed_tokens``, ``model.layers.{i}.*``, ``model.final_layernorm`` (Phi) / ``model.norm``
  (StableLM), ``lm_head.weight`` (no bias: ``MoELLaVAPhiForCausalLM`` rebuilds ``lm_head`` with
  ``bias=False``, ``llava_phi_moe.py:303``). A MoE layer's MLP is a DeepSpeed ``MoE``:
  ``model.layers.{i}.mlp.deepspeed_moe.gate.wg.weight`` (E, D) and
  ``model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{fc1,fc2}.{weight,bias}``
  (Phi) or ``...{e}.{gate_proj,up_proj,down_proj}.weight`` (StableLM); with ``use_residual`` also
  ``mlp.mlp.*`` and ``mlp.coefficient.*`` (PR-MoE, refused here). Projector
  (``multimodal_projector/builder.py``, ``build_projector``):
  ``model.mm_projector.image_spatial_proj.{0,2}.{weight,bias}`` (Linear-GELU-Linear; LLaVA's own
  layout ``model.mm_projector.{0,2}.*`` is read too). CLIP tower (``clip_encoder.py``):
  ``model.image_tower.image_tower.vision_model.*`` (a ``CLIPVisionModel``).
* images (``llava_arch.py``, ``prepare_inputs_labels_for_multimodal``): ``IMAGE_TOKEN_INDEX =
  -200`` in the input ids (``constants.py``) is replaced by the image's projected patch features
  (``hidden_states[mm_vision_select_layer]``, CLS dropped); positions are ``0..L-1`` of the spliced
  sequence. transformers' LLaVA does the same with one ``image_token_id`` per feature in the ids
  (``expand_image_tokens`` turns MoE-LLaVA ids into those).

Routing difference. DeepSpeed's ``top2gating`` (``deepspeed/moe/sharded_moe.py``) takes the first
expert by argmax of ``softmax(x·wg)``, the second by argmax of the logits *plus Gumbel noise* (in
deepspeed 0.9.5, which MoE-LLaVA's ``pyproject.toml`` pins, also at evaluation: the noise has no
training switch there), renormalises the two gate values, and
drops tokens over the capacity ``max(min_capacity, ceil(2·cf·N/E))`` (``eval_capacity_factor`` at
evaluation). moevl routes deterministically to the two best experts (the noise-free top-2),
renormalised, dropless by default: what DeepSpeed would compute without noise and without drops.
``capacity_factor=`` mimics DeepSpeed's capacity (moevl's ``ceil(cf·N·k/E)``, first choices
before second choices, no ``min_capacity``); the Gumbel sampling is not reproduced.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from moevl.checkpoint.moe_llava_weights import (
    load_strict,
    map_state_dict,
    read_state_dict,
    read_tokenizer,
    vision_tower_config,
    vision_tower_state,
)
from moevl.hf.settings import FixedSettingError, MoESettings
from moevl.hf.upcycle import upcycle

#: MoE-LLaVA's image placeholder in input ids (``moellava/constants.py``).
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
#: ``model_type`` of the supported MoE-LLaVA checkpoints -> backbone name.
SUPPORTED_MODEL_TYPES = {"moe_llava_phi": "phi", "moe_llava_stablelm": "stablelm"}


class LoadedMoELLaVA(NamedTuple):
    """What ``load_moe_llava`` returns (unpacks as ``model, tokenizer``)."""

    model: Any  #: ``LlavaForConditionalGeneration`` with moevl MoE layers (``upcycle``d), eval mode
    tokenizer: Any | None  #: the checkpoint's tokenizer with ``<image>`` added, or None


def load_moe_llava(
    path: str | os.PathLike,
    *,
    vision_config: Any | None = None,
    vision_tower: str | os.PathLike | None = None,
    image_token_id: int | None = None,
    load_tokenizer: bool = True,
    dtype: torch.dtype = torch.float32,
    implementation: str = "auto",
    freeze_dense: bool = False,
    settings: MoESettings | None = None,
    **overrides: Any,
) -> LoadedMoELLaVA:
    """Load a MoE-LLaVA checkpoint folder as ``LlavaForConditionalGeneration`` with moevl MoE layers.

    Args:
        path: a local MoE-LLaVA checkpoint folder (``config.json`` with the ``moe`` dict, and
            ``*.safetensors`` or ``pytorch_model*.bin`` weights in MoE-LLaVA's key layout).
        vision_config: the CLIP tower's ``CLIPVisionConfig`` (or a dict of its fields). None: read
            from ``vision_tower``'s ``config.json`` when given, else inferred from the tower's weight
            shapes (head dim 64 as in every OpenAI/LAION CLIP ViT, ``quick_gelu`` for ``openai/*``
            towers, ``gelu`` otherwise).
        vision_tower: a local folder of the CLIP tower (``CLIPVisionModel`` / ``CLIPModel``
            ``save_pretrained`` output), used when the checkpoint holds no tower weights.
        image_token_id: the id of the image placeholder in the LLaVA model's input ids. None: the
            id of ``<image>`` in the checkpoint's tokenizer (added if absent; the embeddings are
            resized only when the tokenizer outgrows them). Required when there is no tokenizer.
        load_tokenizer: load the checkpoint's tokenizer (``AutoTokenizer``) when it has one.
        dtype: parameter dtype of the built model (the routers stay fp32, as DeepSpeed's gate).
        implementation: experts implementation (``auto``, ``grouped``, ``loop``; see ``upcycle``).
        freeze_dense: train only the experts and routers (MoE-LLaVA stage 3).
        settings: a ``MoESettings`` for the MoE layers, or None and its fields as keyword
            ``overrides`` (``stgc``, ``ltdr``/``router``, ``capacity_factor``, ``balance_coef``,
            ``z_loss_coef``, ``jitter``, ``balance_from``). ``num_experts``, ``top_k`` and
            ``layers`` come from the checkpoint; a settings object must agree with them. The
            default ``balance_coef`` is the checkpoint's ``router_aux_loss_coef``.
    Returns:
        ``LoadedMoELLaVA(model, tokenizer)``; the model is in eval mode.
    Raises:
        ValueError: an unsupported backbone, residual MoE, differing expert counts per layer,
            video towers, unknown projector types, or missing / unexpected / misshapen weights.
        FileNotFoundError: no ``config.json`` or no weights in ``path``.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    root = Path(path)
    config = _read_config(root)
    backbone = _backbone(config)
    moe = _moe_fields(config, root)
    _check_vision_fields(config)
    state = read_state_dict(root)
    vision_state, tower_source = vision_tower_state(state, vision_tower)
    vision = vision_tower_config(config, vision_config, vision_state, vision_tower)
    tokenizer = read_tokenizer(root) if load_tokenizer else None
    if image_token_id is None:
        if tokenizer is None:
            raise ValueError(
                f"load_moe_llava: image_token_id is needed: {root} has no tokenizer to add "
                f"{DEFAULT_IMAGE_TOKEN!r} to (load_tokenizer={load_tokenizer})"
            )
        if DEFAULT_IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens([DEFAULT_IMAGE_TOKEN], special_tokens=True)
        image_token_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    vocab_size = int(config["vocab_size"])
    num_tokens = max(vocab_size, len(tokenizer)) if tokenizer is not None else vocab_size
    if (
        not isinstance(image_token_id, int)
        or isinstance(image_token_id, bool)
        or not 0 <= image_token_id < num_tokens
    ):
        raise ValueError(
            f"load_moe_llava: image_token_id must be an int in [0, {num_tokens}) (the embedding rows), "
            f"got {image_token_id!r}"
        )

    resolved = _settings(settings, overrides, moe, int(config["num_hidden_layers"]))
    select = config.get("mm_vision_select_feature", "patch")
    strategies = {"patch": "default", "cls_patch": "full"}
    if select not in strategies:
        raise ValueError(
            f"load_moe_llava: mm_vision_select_feature must be one of {sorted(strategies)}, got {select!r}"
        )
    llava_config = LlavaConfig(
        text_config=_text_config(backbone, config),
        vision_config=vision,
        image_token_id=image_token_id,
        vision_feature_layer=int(config.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=strategies[select],
        projector_hidden_act="gelu",  # nn.GELU() of mlp2x_gelu
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
    # No random initialisation (of the dense model, then of the experts and routers): every
    # parameter is overwritten by the strict load below.
    with no_init_weights():
        model = LlavaForConditionalGeneration._from_config(llava_config, dtype=dtype)
        model.tie_weights()
        upcycle(model, resolved, implementation=implementation, freeze_dense=freeze_dense)
    mapped = map_state_dict(state, backbone=backbone, moe_layers=moe.layers, vision_state=vision_state)
    load_strict(model, mapped, root, tower_source)
    if tokenizer is not None and len(tokenizer) > vocab_size:
        model.resize_token_embeddings(len(tokenizer))
    return LoadedMoELLaVA(model.eval(), tokenizer)


class _MoEFields(NamedTuple):
    layers: tuple[int, ...]
    num_experts: int
    top_k: int
    balance_coef: float


def _read_config(root: Path) -> dict[str, Any]:
    file = root / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"load_moe_llava: no config.json in {root}")
    with open(file) as f:
        return json.load(f)


def _backbone(config: Mapping[str, Any]) -> str:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"load_moe_llava: unsupported MoE-LLaVA backbone model_type={model_type!r} "
            f"(architectures {config.get('architectures')}); supported: {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    return SUPPORTED_MODEL_TYPES[model_type]


def _moe_fields(config: Mapping[str, Any], root: Path) -> _MoEFields:
    moe = config.get("moe")
    if not isinstance(moe, Mapping):
        raise ValueError(f"load_moe_llava: {root}/config.json has no `moe` dict: not a MoE-LLaVA checkpoint")
    if not moe.get("moe_enable", False):
        raise ValueError(
            "load_moe_llava: moe.moe_enable is false: a dense LLaVA checkpoint, not a MoE-LLaVA one"
        )
    if moe.get("use_residual", False):
        raise ValueError(
            "load_moe_llava: moe.use_residual=true (residual PR-MoE: a dense MLP mixed in by a learned "
            "coefficient) is not supported"
        )
    num_layers = int(config["num_hidden_layers"])
    layers = moe.get("moe_layers_idx")
    if layers is None:  # MoE-LLaVA's moe_mode rules (initialize_moe_modules)
        modes = {
            "first_half": list(range(num_layers // 2)),
            "second_half": list(range(num_layers // 2, num_layers)),
            "sparse": list(range(0, num_layers, 2)),
            "dense": list(range(num_layers)),
        }
        mode = moe.get("moe_mode")
        if mode not in modes:
            raise ValueError(f"load_moe_llava: moe.moe_mode must be one of {sorted(modes)}, got {mode!r}")
        layers = modes[mode]
    if not isinstance(layers, list) or not layers or any(not 0 <= int(i) < num_layers for i in layers):
        raise ValueError(
            f"load_moe_llava: moe.moe_layers_idx must be a non-empty list of layer indices in "
            f"[0, {num_layers}), got {layers!r}"
        )
    counts = moe.get("num_experts")
    counts = [counts] if isinstance(counts, int) else counts
    if not isinstance(counts, list) or not counts:
        raise ValueError(f"load_moe_llava: moe.num_experts must be a list of ints, got {counts!r}")
    if len(counts) == 1:
        counts = counts * len(layers)
    if len(counts) != len(layers):
        raise ValueError(
            f"load_moe_llava: moe.num_experts has {len(counts)} entries for {len(layers)} MoE layers"
        )
    if len(set(counts)) != 1:
        raise ValueError(
            f"load_moe_llava: MoE layers with different expert counts ({counts}) are not supported"
        )
    return _MoEFields(
        layers=tuple(sorted(int(i) for i in layers)),
        num_experts=int(counts[0]),
        top_k=int(moe.get("top_k_experts", 2)),
        balance_coef=float(moe.get("router_aux_loss_coef", 0.01)),
    )


def _settings(
    settings: MoESettings | None, overrides: dict[str, Any], moe: _MoEFields, num_layers: int
) -> MoESettings:
    """The checkpoint's settings (its experts, top-k and layers; its balancing coefficient) reconfigured by
    ``settings`` (every field; ``balance_coef`` None keeps the checkpoint's) or by the keyword ``overrides``."""
    stored = MoESettings(
        num_experts=moe.num_experts, top_k=moe.top_k, layers=moe.layers, balance_coef=moe.balance_coef
    )
    if settings is not None:
        if overrides:
            raise ValueError(
                f"load_moe_llava: pass either settings or keyword overrides, not both (got {sorted(overrides)})"
            )
        if not isinstance(settings, MoESettings):
            raise ValueError(f"load_moe_llava: settings must be a MoESettings, got {type(settings).__name__}")
        overrides = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
        if settings.balance_coef is None:
            del overrides["balance_coef"]
    try:
        return stored.reconfigure(overrides, num_layers=num_layers, holder="the checkpoint")
    except FixedSettingError as err:
        raise ValueError(f"load_moe_llava: {err}") from None


def _text_config(backbone: str, config: Mapping[str, Any]) -> Any:
    from transformers import PhiConfig, StableLmConfig

    common = {
        name: config[name]
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "initializer_range",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "tie_word_embeddings",
        )
        if config.get(name) is not None
    }
    common["num_key_value_heads"] = config.get("num_key_value_heads") or config["num_attention_heads"]
    common["rope_theta"] = float(config.get("rope_theta", 10000.0))
    if config.get("rope_scaling") is not None:
        raise ValueError(f"load_moe_llava: rope_scaling={config['rope_scaling']!r} is not supported")
    if backbone == "phi":
        return PhiConfig(
            **common,
            hidden_act=config.get("hidden_act", "gelu_new"),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
            partial_rotary_factor=float(config.get("partial_rotary_factor", 0.5)),
            qk_layernorm=bool(config.get("qk_layernorm", False)),
            resid_pdrop=float(config.get("resid_pdrop", 0.0)),
            embd_pdrop=float(config.get("embd_pdrop", 0.0)),
            attention_dropout=float(config.get("attention_dropout", 0.0)),
        )
    # StableLM-2 "epoch" config names (rope_pct, norm_eps); transformers' names accepted too.
    return StableLmConfig(
        **common,
        hidden_act="silu",  # StableLMEpoch's MLP is nn.SiLU() whatever hidden_act says
        layer_norm_eps=float(config.get("norm_eps", config.get("layer_norm_eps", 1e-5))),
        partial_rotary_factor=float(config.get("rope_pct", config.get("partial_rotary_factor", 0.25))),
        use_qkv_bias=bool(config.get("use_qkv_bias", True)),
        qk_layernorm=False,
        use_parallel_residual=False,
    )


def _check_vision_fields(config: Mapping[str, Any]) -> None:
    kind = config.get("image_projector_type", config.get("mm_projector_type", "linear"))
    if kind != "mlp2x_gelu":
        raise ValueError(
            f"load_moe_llava: image_projector_type must be 'mlp2x_gelu' (transformers' LLaVA projector is "
            f"Linear-GELU-Linear), got {kind!r}"
        )
    if config.get("mm_video_tower") is not None:
        raise ValueError(
            f"load_moe_llava: video towers are not supported (mm_video_tower={config['mm_video_tower']!r})"
        )
    tower = config.get("mm_image_tower")
    # MoE-LLaVA builds a CLIP tower for exactly these names (multimodal_encoder/builder.py).
    if not isinstance(tower, str) or not tower.startswith(("openai/", "laion/")):
        raise ValueError(
            f"load_moe_llava: only CLIP image towers (mm_image_tower 'openai/...' or 'laion/...') are "
            f"supported, got {tower!r}"
        )


def expand_image_tokens(
    input_ids: Tensor | Sequence[Sequence[int]],
    *,
    image_token_id: int,
    num_image_tokens: int,
    pad_token_id: int = 0,
) -> tuple[Tensor, Tensor]:
    """MoE-LLaVA ids (one ``IMAGE_TOKEN_INDEX`` = -200 per image) -> LLaVA ids and attention mask.

    Each -200 becomes ``num_image_tokens`` copies of ``image_token_id`` (the LLaVA model puts one
    projected patch feature at each); rows are right-padded with ``pad_token_id`` to one length.

    Args:
        input_ids: (B, T) long tensor, or a list of rows of different lengths (no padding).
    Returns:
        input_ids (B, T') and attention_mask (B, T') for the LLaVA model.
    """
    if isinstance(input_ids, Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        input_ids = input_ids.tolist()
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    rows = []
    for row in input_ids:
        out: list[int] = []
        for token in row:
            out.extend([image_token_id] * num_image_tokens if token == IMAGE_TOKEN_INDEX else [int(token)])
        rows.append(out)
    if not rows or not all(rows):
        raise ValueError("input_ids must hold at least one non-empty row")
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask
