"""Tiny Hugging Face models built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    StableLmConfig,
    StableLmForCausalLM,
)

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=128,
)

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=None)),
    "phi3": (Phi3Config, Phi3ForCausalLM, dict(num_key_value_heads=2, pad_token_id=0)),
    "stablelm": (StableLmConfig, StableLmForCausalLM, dict(num_key_value_heads=2)),
    "gemma": (GemmaConfig, GemmaForCausalLM, dict(num_key_value_heads=2, head_dim=8)),
    "phi": (PhiConfig, PhiForCausalLM, dict()),
}

IMAGE_TOKEN = 95
NUM_PATCHES = 4  # 8x8 image, 4x4 patches, CLS dropped by the "default" feature strategy


def causal_lm(arch: str, seed: int = 0):
    cfg_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    return model_cls(cfg_cls(**COMMON, **extra)).eval()


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    text = LlamaConfig(**COMMON, num_key_value_heads=2)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=8,
        patch_size=4,
        num_channels=3,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(cfg).eval()


def llava_batch(num_images_per_row=(1, 2), pad_side="right", seed=0):
    """input_ids with image tokens expanded (NUM_PATCHES per image), padded to one length."""
    g = torch.Generator().manual_seed(seed)
    rows, pixel = [], []
    for i, n_img in enumerate(num_images_per_row):
        ids = []
        for _ in range(n_img):
            ids += torch.randint(1, 90, (2,), generator=g).tolist() + [IMAGE_TOKEN] * NUM_PATCHES
            pixel.append(torch.randn(3, 8, 8, generator=g))
        ids += torch.randint(1, 90, (3 + 2 * i,), generator=g).tolist()
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if pad_side == "right" else slice(length - len(r), length)
        input_ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": torch.stack(pixel)}


# Transformers' native sparse MoE families (tiny: hidden 32, E 4-8, 2-4 layers).
MOE_COMMON = dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=128
)
_DEEPSEEK_ATTENTION = dict(
    kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8
)

MOE_FAMILIES = {
    # name: (config class name, model class name, config kwargs)
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_key_value_heads=2,
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            mlp_only_layers=[1],
            norm_topk_prob=False,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_key_value_heads=2,
            head_dim=8,
            num_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=24,
            norm_topk_prob=True,
        ),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(
            num_key_value_heads=2,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            pad_token_id=1,
            eos_token_id=2,
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            **_DEEPSEEK_ATTENTION,
            num_key_value_heads=4,
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            n_shared_experts=1,
            first_k_dense_replace=1,
            topk_method="greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            **_DEEPSEEK_ATTENTION,
            num_key_value_heads=4,
            n_routed_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=24,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        ),
    ),
}


def moe_config(family: str, **overrides):
    import transformers

    cfg_name, _, extra = MOE_FAMILIES[family]
    kwargs = {**MOE_COMMON, "num_hidden_layers": 3, **extra, **overrides}
    return getattr(transformers, cfg_name)(**kwargs)


def native_moe(family: str, seed: int = 0, **overrides):
    """A tiny native MoE CausalLM with random weights (routers spread, DeepSeek biases nonzero)."""
    import transformers

    _, model_name, _ = MOE_FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(moe_config(family, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):  # several native routers start at zero
                p.normal_(0.0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model


# Qwen3-VL-MoE: a vision tower of one block, patches 4x4, 2x2 merge (4 patches -> 1 token).
QWEN3VL_IMAGE, QWEN3VL_VIDEO, QWEN3VL_START, QWEN3VL_END = 90, 91, 92, 93


def tiny_qwen3_vl_moe(seed: int = 0):
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    text = dict(
        **MOE_COMMON,
        num_hidden_layers=3,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    )
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        patch_size=4,
        temporal_patch_size=2,
        spatial_merge_size=2,
        out_hidden_size=32,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0],
    )
    cfg = Qwen3VLMoeConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=QWEN3VL_IMAGE,
        video_token_id=QWEN3VL_VIDEO,
        vision_start_token_id=QWEN3VL_START,
        vision_end_token_id=QWEN3VL_END,
    )
    torch.manual_seed(seed)
    model = Qwen3VLMoeForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    return model


def qwen3_vl_batch(seed: int = 0):
    """Two left-padded rows: row 0 has an image (8x8 px: 4 tokens) and a 2-frame video (4 tokens a
    frame, each frame in its own vision_start/end with a text timestamp); row 1 has one image."""
    g = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(1, 80, (n,), generator=g).tolist()

    def vision(token):
        return [QWEN3VL_START] + [token] * 4 + [QWEN3VL_END]

    rows = [
        text(2)
        + vision(QWEN3VL_IMAGE)
        + text(1)
        + vision(QWEN3VL_VIDEO)
        + text(1)
        + vision(QWEN3VL_VIDEO)
        + text(3),
        text(3) + vision(QWEN3VL_IMAGE) + text(4),
    ]
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, length - len(r) :] = torch.tensor(r)
        mask[i, length - len(r) :] = 1
    types = torch.zeros_like(input_ids)
    types[input_ids == QWEN3VL_IMAGE] = 1
    types[input_ids == QWEN3VL_VIDEO] = 2
    patch = 3 * 2 * 4 * 4  # channels * temporal patch * patch * patch
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "mm_token_type_ids": types,
        "pixel_values": torch.randn(2 * 16, patch, generator=g),  # two images, 4x4 patches each
        "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 4]]),
        "pixel_values_videos": torch.randn(2 * 16, patch, generator=g),  # one video, 2 x 4x4 patches
        "video_grid_thw": torch.tensor([[2, 4, 4]]),
    }
