"""Synthetic MoE-LLaVA checkpoints in the original layout, and a hand-written reference forward.

``write_checkpoint`` writes what MoE-LLaVA's Trainer saves (``config.json`` with the ``moe`` dict
and the original ``model_type``/``architectures``; safetensors with the original keys, see
``moevl/checkpoint/moe_llava.py``) for tiny Phi-2 and StableLM-2 backbones with random weights.
``reference_logits`` computes MoE-LLaVA's forward from the raw tensors with plain torch ops only
(no transformers, no moevl): the CLIP tower, ``mm_projector``, the splice of the image features at
``IMAGE_TOKEN_INDEX``, the decoder with the DeepSpeed MoE computed per token (softmax gate, top-2
without noise or capacity, renormalised weights), the final norm and ``lm_head``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

IMAGE_TOKEN_INDEX = -200
VOCAB = 64
IMAGE_TOKEN_ID = 63  # the LLaVA model's placeholder id (any id < VOCAB works)
TEXT = dict(hidden=32, heads=4, inter=48, layers=4)
VISION = dict(hidden=128, heads=2, inter=96, layers=3, image=8, patch=4)  # 2 heads of 64: inferable
NUM_PATCHES = (VISION["image"] // VISION["patch"]) ** 2
MOE_LAYERS = [0, 2]
NUM_EXPERTS = 4

_MOE = dict(
    moe_enable=True,
    moe_mode="sparse",
    moe_layers_idx=MOE_LAYERS,
    ep_size=1,
    top_k_experts=2,
    capacity_factor=1.5,
    eval_capacity_factor=2.0,
    min_capacity=0,
    use_residual=False,
    router_aux_loss_coef=0.01,
    train_modules=["fc1", "fc2", "wg", "gate_proj", "up_proj", "down_proj"],
    num_experts=[NUM_EXPERTS] * len(MOE_LAYERS),
)
_VISION_FIELDS = dict(
    mm_image_tower="openai/clip-vit-large-patch14-336",
    mm_hidden_size=VISION["hidden"],
    mm_vision_select_layer=-2,
    mm_vision_select_feature="patch",
    image_projector_type="mlp2x_gelu",
    mm_video_tower=None,
    mm_use_im_start_end=False,
    mm_use_im_patch_token=False,
    use_mm_proj=True,
    tokenizer_padding_side="right",
)


def config_dict(backbone: str) -> dict:
    """config.json as MoELLaVAPhiConfig / MoELLaVAStablelmConfig write it (tiny sizes)."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=TEXT["hidden"],
        intermediate_size=TEXT["inter"],
        num_hidden_layers=TEXT["layers"],
        num_attention_heads=TEXT["heads"],
        num_key_value_heads=TEXT["heads"],
        max_position_embeddings=64,
        initializer_range=0.02,
        use_cache=True,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
        moe=dict(_MOE),
        **_VISION_FIELDS,
    )
    if backbone == "phi":
        return dict(
            common,
            model_type="moe_llava_phi",
            architectures=["MoELLaVAPhiForCausalLM"],
            hidden_act="gelu_new",
            layer_norm_eps=1e-5,
            partial_rotary_factor=0.5,
            rope_theta=10000.0,
            rope_scaling=None,
            qk_layernorm=False,
            resid_pdrop=0.1,
            embd_pdrop=0.0,
            attention_dropout=0.0,
        )
    return dict(
        common,
        model_type="moe_llava_stablelm",
        architectures=["MoELLaVAStablelmForCausalLM"],
        hidden_act="silu",
        rope_pct=0.25,
        rope_theta=10000.0,
        norm_eps=1e-5,
        use_qkv_bias=True,
    )


def state_dict(backbone: str, seed: int = 0) -> dict[str, Tensor]:
    """Random tensors under MoE-LLaVA's keys (norms near 1, routers spread over the experts)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.2) -> Tensor:
        return torch.randn(*shape, generator=g) * std

    d, h, v = TEXT["hidden"], TEXT["inter"], VOCAB
    sd: dict[str, Tensor] = {"model.embed_tokens.weight": rand(v, d, std=1.0), "lm_head.weight": rand(v, d)}

    def norm(name: str, dim: int) -> None:
        sd[name + ".weight"] = 1.0 + rand(dim, std=0.1)
        sd[name + ".bias"] = rand(dim, std=0.1)

    def linear(name: str, out: int, inp: int, bias: bool) -> None:
        sd[name + ".weight"] = rand(out, inp, std=inp**-0.5)
        if bias:
            sd[name + ".bias"] = rand(out, std=0.1)

    phi = backbone == "phi"
    for i in range(TEXT["layers"]):
        p = f"model.layers.{i}"
        norm(f"{p}.input_layernorm", d)
        if not phi:
            norm(f"{p}.post_attention_layernorm", d)
        for name in ("q_proj", "k_proj", "v_proj"):
            linear(f"{p}.self_attn.{name}", d, d, bias=True)
        linear(f"{p}.self_attn.{'dense' if phi else 'o_proj'}", d, d, bias=phi)
        mlps = [f"{p}.mlp"]
        if i in MOE_LAYERS:
            sd[f"{p}.mlp.deepspeed_moe.gate.wg.weight"] = rand(NUM_EXPERTS, d, std=1.0)
            mlps = [f"{p}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}" for e in range(NUM_EXPERTS)]
        for m in mlps:
            if phi:
                linear(f"{m}.fc1", h, d, bias=True)
                linear(f"{m}.fc2", d, h, bias=True)
            else:
                linear(f"{m}.gate_proj", h, d, bias=False)
                linear(f"{m}.up_proj", h, d, bias=False)
                linear(f"{m}.down_proj", d, h, bias=False)
    norm("model.final_layernorm" if phi else "model.norm", d)

    vd, vh, patch = VISION["hidden"], VISION["inter"], VISION["patch"]
    t = "model.image_tower.image_tower.vision_model"
    sd[f"{t}.embeddings.class_embedding"] = rand(vd, std=0.5)
    sd[f"{t}.embeddings.patch_embedding.weight"] = rand(vd, 3, patch, patch, std=0.3)
    sd[f"{t}.embeddings.position_embedding.weight"] = rand(NUM_PATCHES + 1, vd, std=0.5)
    norm(f"{t}.pre_layrnorm", vd)
    norm(f"{t}.post_layernorm", vd)
    for i in range(VISION["layers"]):
        p = f"{t}.encoder.layers.{i}"
        norm(f"{p}.layer_norm1", vd)
        norm(f"{p}.layer_norm2", vd)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(f"{p}.self_attn.{name}", vd, vd, bias=True)
        linear(f"{p}.mlp.fc1", vh, vd, bias=True)
        linear(f"{p}.mlp.fc2", vd, vh, bias=True)
    linear("model.mm_projector.image_spatial_proj.0", d, vd, bias=True)
    linear("model.mm_projector.image_spatial_proj.2", d, d, bias=True)
    return sd


def write_checkpoint(
    directory: Path, backbone: str, *, seed: int = 0, config: dict | None = None, state: dict | None = None
) -> tuple[dict, dict[str, Tensor]]:
    """Write config.json and two safetensors shards (with their index) as MoE-LLaVA does."""
    config = config_dict(backbone) if config is None else config
    state = state_dict(backbone, seed) if state is None else state
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, part in shards.items():
        save_file({k: state[k].contiguous() for k in part}, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return config, state


# --- the reference forward ------------------------------------------------------------------------


def _ln(x: Tensor, sd: dict, name: str, eps: float = 1e-5) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _lin(x: Tensor, sd: dict, name: str) -> Tensor:
    return x @ sd[name + ".weight"].T + sd.get(name + ".bias", 0.0)


def _rope(x: Tensor, rot: int, theta: float) -> Tensor:
    """Rotary embedding on the first ``rot`` dims of x (h, T, hd), rotate-half convention."""
    pos = torch.arange(x.shape[1], dtype=torch.float32)
    inv = 1.0 / theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    ang = torch.outer(pos, inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    xr, xp = x[..., :rot], x[..., rot:]
    x1, x2 = xr.chunk(2, dim=-1)
    return torch.cat([xr * cos + torch.cat([-x2, x1], -1) * sin, xp], dim=-1)


def _attention(
    x: Tensor, sd: dict, p: str, out: str, *, heads: int, causal: bool, rot: int = 0, theta: float = 1e4
) -> Tensor:
    """Multi-head attention of one sequence x (T, D)."""
    t, d = x.shape
    hd = d // heads
    q, k, v = (
        _lin(x, sd, f"{p}.{n}").view(t, heads, hd).transpose(0, 1) for n in ("q_proj", "k_proj", "v_proj")
    )
    if rot:
        q, k = _rope(q, rot, theta), _rope(k, rot, theta)
    scores = q @ k.transpose(1, 2) / math.sqrt(hd)  # (h, T, T)
    if causal:
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(0, 1).reshape(t, d)
    return _lin(y, sd, f"{p}.{out}")


def _mlp(x: Tensor, sd: dict, p: str, phi: bool) -> Tensor:
    if phi:
        return _lin(F.gelu(_lin(x, sd, f"{p}.fc1"), approximate="tanh"), sd, f"{p}.fc2")  # gelu_new
    return _lin(F.silu(_lin(x, sd, f"{p}.gate_proj")) * _lin(x, sd, f"{p}.up_proj"), sd, f"{p}.down_proj")


def _moe(x: Tensor, sd: dict, p: str, phi: bool, choices: list) -> Tensor:
    """DeepSpeed top-2 MoE token by token: softmax gate, best two experts, renormalised weights."""
    probs = (x @ sd[f"{p}.deepspeed_moe.gate.wg.weight"].T).softmax(-1)  # (T, E)
    rows = []
    for t in range(x.shape[0]):
        first = int(probs[t].argmax())
        second = int(probs[t].masked_fill(torch.arange(probs.shape[1]) == first, -1.0).argmax())
        w1, w2 = probs[t, first], probs[t, second]
        choices.append((first, second))
        experts = f"{p}.deepspeed_moe.experts.deepspeed_experts"
        y = (
            w1 * _mlp(x[t], sd, f"{experts}.{first}", phi) + w2 * _mlp(x[t], sd, f"{experts}.{second}", phi)
        ) / (w1 + w2)
        rows.append(y)
    return torch.stack(rows)


def image_features(config: dict, sd: dict, pixel: Tensor) -> Tensor:
    """CLIP tower + mm_projector of one image (3, S, S) -> (NUM_PATCHES, D)."""
    t = "model.image_tower.image_tower.vision_model"
    patches = F.conv2d(pixel[None], sd[f"{t}.embeddings.patch_embedding.weight"], stride=VISION["patch"])
    x = torch.cat([sd[f"{t}.embeddings.class_embedding"][None], patches.flatten(2)[0].T])  # (1 + N, Dv)
    x = _ln(x + sd[f"{t}.embeddings.position_embedding.weight"], sd, f"{t}.pre_layrnorm")
    hidden = [x]
    for i in range(VISION["layers"]):
        p = f"{t}.encoder.layers.{i}"
        x = x + _attention(
            _ln(x, sd, f"{p}.layer_norm1"),
            sd,
            f"{p}.self_attn",
            "out_proj",
            heads=VISION["heads"],
            causal=False,
        )
        h = _lin(_ln(x, sd, f"{p}.layer_norm2"), sd, f"{p}.mlp.fc1")
        x = x + _lin(h * torch.sigmoid(1.702 * h), sd, f"{p}.mlp.fc2")  # quick_gelu
        hidden.append(x)
    feats = hidden[config["mm_vision_select_layer"]][1:]  # "patch": CLS dropped
    proj = "model.mm_projector.image_spatial_proj"
    return _lin(F.gelu(_lin(feats, sd, f"{proj}.0")), sd, f"{proj}.2")


def reference_logits(
    config: dict, sd: dict, ids: list[int], images: list[Tensor] = (), choices: list | None = None
) -> Tensor:
    """MoE-LLaVA's logits of one sequence whose ids hold ``IMAGE_TOKEN_INDEX`` per image: (L, V)."""
    phi = config["model_type"] == "moe_llava_phi"
    emb, pieces, images = sd["model.embed_tokens.weight"], [], list(images)
    for token in ids:
        pieces.append(
            image_features(config, sd, images.pop(0)) if token == IMAGE_TOKEN_INDEX else emb[token][None]
        )
    x = torch.cat(pieces)  # (L, D): text embeddings with image features spliced in
    heads, hd = config["num_attention_heads"], config["hidden_size"] // config["num_attention_heads"]
    rot = int(hd * (config["partial_rotary_factor"] if phi else config["rope_pct"]))
    choices = [] if choices is None else choices
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"

        def ffn(h: Tensor, p: str = p, i: int = i) -> Tensor:
            return _moe(h, sd, f"{p}.mlp", phi, choices) if i in MOE_LAYERS else _mlp(h, sd, f"{p}.mlp", phi)

        attn = dict(heads=heads, causal=True, rot=rot, theta=config["rope_theta"])
        if phi:  # parallel attention and MLP on one layer norm
            h = _ln(x, sd, f"{p}.input_layernorm")
            x = x + _attention(h, sd, f"{p}.self_attn", "dense", **attn) + ffn(h)
        else:
            x = x + _attention(_ln(x, sd, f"{p}.input_layernorm"), sd, f"{p}.self_attn", "o_proj", **attn)
            x = x + ffn(_ln(x, sd, f"{p}.post_attention_layernorm"))
    x = _ln(x, sd, "model.final_layernorm" if phi else "model.norm")
    return x @ sd["lm_head.weight"].T
