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
