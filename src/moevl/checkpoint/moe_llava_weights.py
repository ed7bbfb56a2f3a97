"""The weights of a released MoE-LLaVA checkpoint (``moevl.checkpoint.moe_llava``): read (safetensors or
``.bin`` shards), mapped to transformers' LLaVA with moevl MoE layers (DeepSpeed's ``deepspeed_moe`` gate and
per-expert ``fc1``/``fc2`` stacked into moevl's experts, the CLIP tower's keys) and loaded strictly."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_DEEPSPEED_MOE = re.compile(r"model\.layers\.(\d+)\.mlp\.deepspeed_moe\.")
_EXPERT = re.compile(
    r"model\.layers\.(\d+)\.mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(\w+)\.(weight|bias)"
)
_TOWER_PREFIX = "model.image_tower.image_tower.vision_model."


# --- weights --------------------------------------------------------------------------------------


def read_state_dict(root: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of a checkpoint folder: ``*.safetensors`` shards, else ``pytorch_model*.bin``
    (``torch.load(weights_only=True)``); every shard file is read."""
    from safetensors.torch import load_file

    root = Path(root)
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(root.glob(pattern))
        if not files:
            continue
        state: dict[str, Tensor] = {}
        for file in files:
            part = load_file(file) if file.suffix == ".safetensors" else _load_bin(file)
            duplicate = sorted(set(part) & set(state))
            if duplicate:
                raise ValueError(
                    f"load_moe_llava: keys {duplicate[:5]} appear in more than one file of {root}"
                )
            state.update(part)
        return state
    raise FileNotFoundError(f"load_moe_llava: no *.safetensors or pytorch_model*.bin weights in {root}")


def _load_bin(file: Path) -> dict[str, Tensor]:
    return torch.load(file, map_location="cpu", weights_only=True)


def vision_tower_state(
    state: dict[str, Tensor], vision_tower: str | os.PathLike | None
) -> tuple[dict[str, Tensor], str]:
    """The CLIP tower's tensors (keys of a transformers 5 ``CLIPVisionModel``) and their source."""
    inside = {k[len(_TOWER_PREFIX) :]: v for k, v in state.items() if k.startswith(_TOWER_PREFIX)}
    if inside:
        if vision_tower is not None:
            raise ValueError(
                f"load_moe_llava: the checkpoint holds the image tower's weights; vision_tower={vision_tower!r} "
                "would be ignored, pass None"
            )
        return inside, "the checkpoint"
    if vision_tower is None:
        raise ValueError(
            f"load_moe_llava: the checkpoint has no image tower weights ({_TOWER_PREFIX}*); pass "
            "vision_tower= a local folder of the CLIP tower (CLIPVisionModel.save_pretrained)"
        )
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(vision_tower, local_files_only=True)
    return {k: v.detach() for k, v in tower.state_dict().items()}, str(vision_tower)


def vision_tower_config(
    config: Mapping[str, Any],
    vision_config: Any | None,
    vision_state: Mapping[str, Tensor],
    vision_tower: str | os.PathLike | None,
) -> Any:
    from transformers import CLIPVisionConfig

    if vision_config is not None:
        if isinstance(vision_config, Mapping):
            return CLIPVisionConfig(**vision_config)
        if not isinstance(vision_config, CLIPVisionConfig):
            raise ValueError(
                f"load_moe_llava: vision_config must be a CLIPVisionConfig or a dict, got {type(vision_config).__name__}"
            )
        return vision_config
    if vision_tower is not None:
        return CLIPVisionConfig.from_pretrained(vision_tower, local_files_only=True)
    # Inferred from the weights: every size but the head count is a shape; OpenAI and LAION CLIP
    # ViTs all use 64-dim heads.
    try:
        patch = vision_state["embeddings.patch_embedding.weight"]  # (D, C, P, P)
        positions = vision_state["embeddings.position_embedding.weight"].shape[0]  # grid² + 1
        fc1 = vision_state["encoder.layers.0.mlp.fc1.weight"]  # (H, D)
    except KeyError as err:
        raise ValueError(
            f"load_moe_llava: the image tower's weights lack {err.args[0]!r} ({_TOWER_PREFIX}*)"
        ) from None
    hidden, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]
    grid = round((positions - 1) ** 0.5)
    layers = {int(m.group(1)) for k in vision_state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    if hidden % 64 != 0 or grid * grid != positions - 1:
        raise ValueError(
            f"load_moe_llava: cannot infer the CLIP config (hidden {hidden}, {positions} positions); "
            "pass vision_config"
        )
    tower = str(config.get("mm_image_tower", ""))
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=fc1.shape[0],
        num_hidden_layers=max(layers) + 1,
        num_attention_heads=hidden // 64,
        num_channels=channels,
        patch_size=patch_size,
        image_size=grid * patch_size,
        hidden_act="quick_gelu" if tower.startswith("openai/") else "gelu",
        layer_norm_eps=1e-5,
    )


def read_tokenizer(root: Path) -> Any | None:
    if not any(
        (root / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(root, local_files_only=True)


def map_state_dict(
    state: Mapping[str, Tensor],
    *,
    backbone: str,
    moe_layers: tuple[int, ...],
    vision_state: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """MoE-LLaVA keys -> the keys of the upcycled ``LlavaForConditionalGeneration``.

    The experts of each MoE layer are stacked into ``GroupedExperts``' native layout: gated
    (StableLM) ``gate_up_proj`` (E, 2H, D) = ``[gate_proj; up_proj]`` per expert and ``down_proj``
    (E, D, H); Phi's fc1/fc2 experts ``up_proj`` (E, H, D), ``down_proj`` (E, D, H) and the biases.
    Raises ``ValueError`` for keys it cannot place and for MoE layers whose experts are incomplete.
    """
    text = "model.language_model."
    out: dict[str, Tensor] = {f"model.vision_tower.{k}": v for k, v in vision_state.items()}
    experts: dict[int, dict[str, dict[int, Tensor]]] = {}
    unplaced: list[str] = []
    for key, value in state.items():
        if key.startswith(_TOWER_PREFIX):
            continue
        if m := _EXPERT.fullmatch(key):
            layer, e, lin, kind = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            experts.setdefault(layer, {}).setdefault(f"{lin}.{kind}", {})[e] = value
        elif m := re.fullmatch(r"model\.layers\.(\d+)\.mlp\.deepspeed_moe\.gate\.wg\.weight", key):
            out[f"{text}layers.{m.group(1)}.mlp.router.weight"] = value
        elif _DEEPSPEED_MOE.match(key) or re.match(r"model\.layers\.\d+\.mlp\.(mlp|coefficient)\.", key):
            unplaced.append(key)
        elif m := re.fullmatch(r"model\.mm_projector\.(?:image_spatial_proj\.)?([02])\.(weight|bias)", key):
            out[f"model.multi_modal_projector.linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"] = value
        elif key.startswith("model.mm_projector."):
            unplaced.append(key)
        elif key.startswith("model."):
            out[text + key[len("model.") :]] = value
        elif key.startswith("lm_head."):
            out[key] = value
        else:
            unplaced.append(key)
    if unplaced:
        raise ValueError(
            f"load_moe_llava: unexpected checkpoint keys {sorted(unplaced)[:8]} ({len(unplaced)} in all)"
        )
    missing_layers = sorted(set(moe_layers) - set(experts))
    extra_layers = sorted(set(experts) - set(moe_layers))
    if missing_layers or extra_layers:
        raise ValueError(
            f"load_moe_llava: the config's moe_layers_idx {list(moe_layers)} disagree with the layers holding "
            f"DeepSpeed experts in the weights {sorted(experts)}"
        )
    gated = backbone == "stablelm"
    for layer, params in experts.items():
        prefix = f"{text}layers.{layer}.mlp.experts."
        out.update(_stack_experts(layer, params, gated=gated, prefix=prefix))
    return out


def _stack_experts(
    layer: int, params: dict[str, dict[int, Tensor]], *, gated: bool, prefix: str
) -> dict[str, Tensor]:
    names = (
        {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
        if gated
        else {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    )
    if set(params) != names:
        raise ValueError(
            f"load_moe_llava: layer {layer}'s experts have parameters {sorted(params)}, expected {sorted(names)}"
        )
    count = max(len(by_expert) for by_expert in params.values())
    for name, by_expert in params.items():
        if sorted(by_expert) != list(range(count)):
            missing = sorted(set(range(count)) - set(by_expert))
            raise ValueError(f"load_moe_llava: layer {layer} lacks experts {missing} of {name}")

    def stack(name: str) -> Tensor:
        return torch.stack([params[name][e] for e in range(count)])

    if gated:  # gate rows first, then up rows (GroupedExperts' native layout)
        return {
            prefix + "gate_up_proj": torch.cat([stack("gate_proj.weight"), stack("up_proj.weight")], dim=1),
            prefix + "down_proj": stack("down_proj.weight"),
        }
    return {
        prefix + "up_proj": stack("fc1.weight"),  # (E, H, D)
        prefix + "up_proj_bias": stack("fc1.bias"),  # (E, H)
        prefix + "down_proj": stack("fc2.weight"),  # (E, D, H)
        prefix + "down_proj_bias": stack("fc2.bias"),  # (E, D)
    }


def load_strict(model: Any, mapped: dict[str, Tensor], root: Path, tower_source: str) -> None:
    own = model.state_dict()
    tied = "lm_head.weight" if model.config.tie_word_embeddings else None
    missing = sorted(k for k in own if k not in mapped and k != tied)
    unexpected = sorted(k for k in mapped if k not in own)
    if missing or unexpected:
        raise ValueError(
            f"load_moe_llava: the weights in {root} (image tower from {tower_source}) do not match the "
            f"model: missing {missing[:8]} ({len(missing)} in all), unexpected {unexpected[:8]} "
            f"({len(unexpected)} in all)"
        )
    shapes = [
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if v.shape != own[k].shape
    ]
    if shapes:
        raise ValueError(f"load_moe_llava: weights of the wrong shape (checkpoint vs model): {shapes[:8]}")
    with torch.no_grad():
        for key, value in mapped.items():
            own[key].copy_(value)
