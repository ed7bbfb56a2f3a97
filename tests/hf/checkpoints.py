"""Tiny vision-language checkpoint directories built offline with the real model and processor classes,
saved with ``save_pretrained`` and loaded back with the Auto classes: LLaVA-1.5 and LLaVA-NeXT. The
tokenizers are word-level (``tokenizers``) with LLaVA-1.5's chat-template layout."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

from moevl.vlm.checkpoint import word_tokenizer

WORDS = (
    *[
        "what",
        "is",
        "in",
        "the",
        "image",
        "a",
        "cat",
        "dog",
        "red",
        "blue",
        "yes",
        "no",
        "one",
        "two",
        "three",
        "how",
        "many",
        "and",
        "describe",
        "it",
    ],
    "USER:",
    "ASSISTANT:",
)

#: LLaVA-1.5's conversation layout (llava-hf's template): "USER: <image>\n... ASSISTANT: ...</s>".
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% for p in message['content'] %}{{ p['text'] }} {% endfor %}"
    "{% elif message['role'] == 'user' %}USER: "
    "{% for p in message['content'] %}{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for p in message['content'] %}{{ p['text'] }}{% endfor %}{{ eos_token }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# NOTE: Qwen2-VL and Qwen2.5-VL are not here: with transformers 5.23 their processors cannot be built
# without torchvision (ProcessorMixin checks the video processor's class through a mapping that is a
# placeholder without torchvision, even for video_processor=None), and torchvision's only build here is a
# CUDA one that does not import with CPU torch. moevl has no per-family code for them either way.
FAMILIES = ("llava", "llava_next")


def _llama_text(vocab_size: int, **ids) -> tf.LlamaConfig:
    return tf.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **ids,
    )


def _clip(image_size: int) -> tf.CLIPVisionConfig:
    return tf.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
        num_channels=3,
    )


def _llava(out: Path, *, next_: bool) -> None:
    tok = word_tokenizer(WORDS, LLAVA_TEMPLATE)
    ids = {
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    image_token_id = tok.convert_tokens_to_ids("<image>")
    ip_kwargs = dict(
        size={"shortest_edge": 16},
        crop_size={"height": 16, "width": 16},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    common = dict(
        text_config=_llama_text(len(tok), **ids),
        image_token_id=image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    if next_:
        config = tf.LlavaNextConfig(
            vision_config=_clip(16), image_grid_pinpoints=[[16, 16], [16, 32], [32, 16]], **common
        )
        model = tf.LlavaNextForConditionalGeneration(config)
        ip = tf.LlavaNextImageProcessorPil(image_grid_pinpoints=[[16, 16], [16, 32], [32, 16]], **ip_kwargs)
        processor = tf.LlavaNextProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=LLAVA_TEMPLATE,
        )
    else:
        model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(vision_config=_clip(16), **common))
        processor = tf.LlavaProcessor(
            image_processor=tf.CLIPImageProcessorPil(**ip_kwargs),
            tokenizer=tok,
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=LLAVA_TEMPLATE,
        )
    for k, v in ids.items():
        setattr(model.generation_config, k, v)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_checkpoint(family: str, out: str | Path, seed: int = 0) -> Path:
    """Writes a tiny checkpoint of ``family`` (one of ``FAMILIES``) to ``out``."""
    out = Path(out)
    torch.manual_seed(seed)
    if family == "llava":
        _llava(out, next_=False)
    elif family == "llava_next":
        _llava(out, next_=True)
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return out
