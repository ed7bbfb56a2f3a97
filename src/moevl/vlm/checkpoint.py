"""Build a small LLaVA checkpoint directory from configs: model, processor and chat template, nothing
downloaded. The demo starts from one (``moevl compare``); so can anyone who wants a from-scratch LLaVA.

The checkpoint is an ordinary Hugging Face one: ``LlavaForConditionalGeneration`` (CLIP-style vision tower,
MLP projector, Llama-style decoder) saved with ``save_pretrained``, and a ``LlavaProcessor`` (a
``CLIPImageProcessor`` and a word-level ``tokenizers`` tokenizer with a chat template), so that
``AutoModelForImageTextToText`` / ``AutoProcessor`` load it and ``moevl train`` / ``eval`` treat it like any
user checkpoint.

The chat template renders a turn as its parts separated by spaces, the assistant's followed by ``</s>``::

    <s><image> what digit is at the top left 3 </s>

so the sequence the model learns is ``<s> <image>*P question words answer words </s>`` with the loss on
``answer words </s>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from moevl.atomic import atomic_directory
from moevl.checks import check_float, check_int

#: Renders each message's parts separated by spaces; an assistant turn ends with the end-of-sequence
#: token. Prefixes render as prefixes (moevl.data.processing locates the assistant tokens that way).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image> ' }}{% else %}{{ part['text'] }} {% endif %}"
    "{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }} {% endif %}"
    "{% endfor %}"
)

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"


@dataclass(frozen=True)
class TinyModelConfig:
    """Sizes of the small LLaVA. Every field is a YAML key under ``demo.model:``."""

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
    # untied embeddings) "count" and "exists" stayed at the answer prior (moevl.data.digits).
    initializer_range: float = 0.08
    # Input embeddings shared with the output layer: a question's class word is then the vector the
    # answers' class words are read out with, which the captions and "position" align with the image.
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        check_int("patch_size", self.patch_size, minimum=1)
        for prefix in ("vision", "text"):
            hidden, heads = getattr(self, f"{prefix}_hidden_size"), getattr(self, f"{prefix}_heads")
            if heads < 1 or hidden < 1 or hidden % heads:
                raise ValueError(
                    f"{prefix}_hidden_size must be a positive multiple of {prefix}_heads ({heads}), got {hidden}"
                )
            check_int(f"{prefix}_layers", getattr(self, f"{prefix}_layers"), minimum=1)
        check_float("initializer_range", self.initializer_range, minimum=0.0, exclusive_minimum=True)


def word_tokenizer(words: list[str] | tuple[str, ...], chat_template: str = CHAT_TEMPLATE):
    """A word-level ``PreTrainedTokenizerFast``: ids 0..4 are pad, unk, bos, eos, image, then ``words``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((PAD, UNK, BOS, EOS, IMAGE))}
    for w in words:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE},
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_llava_checkpoint(
    out_dir: str | os.PathLike,
    config: TinyModelConfig,
    *,
    words: list[str] | tuple[str, ...],
    image_size: int,
    seed: int = 0,
    chat_template: str = CHAT_TEMPLATE,
) -> Path:
    """Writes a freshly initialised LLaVA for ``image_size`` x ``image_size`` images, with its processor, to
    ``out_dir`` (atomically). One vision patch is one image token (CLIP's CLS is dropped)."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    if image_size % config.patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({config.patch_size})")
    tokenizer = word_tokenizer(words, chat_template)
    ids = {
        name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (("pad", PAD), ("bos", BOS), ("eos", EOS))
    }
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
    patches = (image_size // config.patch_size) ** 2
    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden_size,
        intermediate_size=config.vision_intermediate_size,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        num_channels=3,
        image_size=image_size,
        patch_size=config.patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden_size,
        intermediate_size=config.text_intermediate_size,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_heads,
        max_position_embeddings=config.max_position_embeddings,
        pad_token_id=ids["pad"],
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.initializer_range,
    )
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=patches,
        # CLIP adds a CLS token: "default" drops it, so image tokens = patches. The last layer's output is
        # used (no pretrained tower whose penultimate layer would be the better feature).
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava)
    for key, value in ids.items():
        setattr(model.generation_config, f"{key}_token_id", value)
    # the PIL backend, named: the same pixels with or without torchvision (the default backend, where installed)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        image_mean=[0.5, 0.5, 0.5],  # pixels in [0, 1] map to [-1, 1]
        image_std=[0.5, 0.5, 0.5],
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS
        chat_template=chat_template,
    )
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
    return out_dir
