"""The small LLaVA of the main job: a CLIP-style vision tower, an MLP projector and a Llama-style decoder.

Built from configs only (``transformers.LlavaForConditionalGeneration``), so nothing downloads.
One vision patch is one image token: with 8x8 digit cells and ``patch_size=8`` each cell is a token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from moevl.data.images import CELL

PARTS = ("vision_tower", "projector", "language_model")
MOE_PARTS = ("experts", "routers")  # of an upcycled model (stage 3)


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the small LLaVA. Every field is a YAML key under ``model:``."""

    patch_size: int = 8
    vision_hidden_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate_size: int = 128
    text_hidden_size: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate_size: int = 256
    max_position_embeddings: int = 128
    # Std of the decoder's and projector's initial weights. Hugging Face's 0.02 suits widths of
    # thousands; at width 128 it leaves attention logits and head outputs near zero. With 0.02 (or
    # untied embeddings) "count" and "exists" stayed at the answer prior (see moevl.data.dataset).
    initializer_range: float = 0.08
    # Input embeddings shared with the output layer: a question's class word is then the vector the
    # answers' class words are read out with, which the captions and "position" align with the image.
    tie_word_embeddings: bool = True


def num_image_tokens(model: ModelConfig, grid: int) -> int:
    return (grid * CELL // model.patch_size) ** 2


def build_model(
    config: ModelConfig,
    *,
    grid: int,
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int,
    bos_token_id: int,
    eos_token_id: int,
) -> LlavaForConditionalGeneration:
    """A freshly initialised LLaVA for ``grid x grid`` canvases of 8x8 gray cells."""
    image_size = grid * CELL
    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden_size,
        intermediate_size=config.vision_intermediate_size,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        num_channels=1,
        image_size=image_size,
        patch_size=config.patch_size,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.text_hidden_size,
        intermediate_size=config.text_intermediate_size,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_heads,
        max_position_embeddings=config.max_position_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.initializer_range,
    )
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=num_image_tokens(config, grid),
        # CLIP adds a CLS token: "default" drops it, so image tokens = patches. The last layer's
        # output is used (no pretrained tower whose penultimate layer would be the better feature).
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    llava.tie_word_embeddings = config.tie_word_embeddings
    llava.pad_token_id = pad_token_id
    llava.bos_token_id = bos_token_id
    llava.eos_token_id = eos_token_id
    model = LlavaForConditionalGeneration(llava)
    model.generation_config.pad_token_id = pad_token_id
    model.generation_config.bos_token_id = bos_token_id
    model.generation_config.eos_token_id = eos_token_id
    return model


def part_modules(model: LlavaForConditionalGeneration) -> dict[str, list[torch.nn.Module]]:
    inner = model.model
    return {
        "vision_tower": [inner.vision_tower],
        "projector": [inner.multi_modal_projector],
        "language_model": [inner.language_model, model.lm_head],
    }


def set_trainable(model: LlavaForConditionalGeneration, parts: tuple[str, ...] | list[str]) -> int:
    """Train only ``parts`` (names from ``PARTS``, and for an upcycled model ``MOE_PARTS``: the
    experts and routers of its MoE layers); returns the number of trainable parameters."""
    unknown = set(parts) - set(PARTS) - set(MOE_PARTS)
    if unknown:
        raise ValueError(f"unknown model parts {sorted(unknown)}; expected some of {PARTS + MOE_PARTS}")
    for name, modules in part_modules(model).items():
        for m in modules:
            m.requires_grad_(name in parts)
    moe_parts = {"experts": ".experts.", "routers": ".router."}
    wanted = [key for part, key in moe_parts.items() if part in parts]
    if wanted:
        for name, p in model.named_parameters():
            if any(key in f".{name}" for key in wanted):
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    prompts: list[torch.Tensor],
    pixel_values: torch.Tensor,
    *,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int,
) -> list[list[int]]:
    """Greedy decoding without a KV cache (sequences here are ~30 tokens).

    prompts: B prompts of ids (L_i,); pixel_values (B, C, H, W). Left-pads, with position ids from
    the attention mask, so every prompt sees the positions it was trained with. Returns the generated
    ids of each prompt, cut before the first eos.
    """
    B = len(prompts)
    length = max(len(p) for p in prompts)
    ids = torch.full((B, length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = p
        mask[i, length - len(p) :] = 1
    pixel_values = pixel_values.to(next(model.parameters()).device)
    ids, mask = ids.to(pixel_values.device), mask.to(pixel_values.device)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    out: list[list[int]] = [[] for _ in range(B)]
    for _ in range(max_new_tokens):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=ids, attention_mask=mask, pixel_values=pixel_values, position_ids=position_ids
        ).logits[:, -1]  # (B, V)
        nxt = logits.argmax(-1)
        for i in range(B):
            if not done[i]:
                if nxt[i].item() == eos_token_id:
                    done[i] = True
                else:
                    out[i].append(int(nxt[i]))
        if bool(done.all()):
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return out
