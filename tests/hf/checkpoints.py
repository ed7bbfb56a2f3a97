"""Tiny vision-language checkpoint directories built offline with the real model and processor classes,
saved with ``save_pretrained`` and loaded back with the Auto classes (``load_processor``): LLaVA-1.5,
LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL. The tokenizers are word-level (``tokenizers``) with each family's
chat-template layout (roles, image placeholders, end-of-turn marker)."""

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

FAMILIES = (
    "llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "gemma3", "idefics3", "aria", "paligemma", "llava_onevision",
    "smolvlm",
)  # fmt: skip
#: families whose processor needs torchvision's video processor to be built (``load_processor``)
VIDEO_PROCESSOR = ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "smolvlm")
#: families whose processor needs an image in every record (PaliGemma's raises without one)
IMAGES_REQUIRED = ("paligemma",)

#: The token each family's template writes after an assistant reply (what the labels must end each turn with).
END_OF_TURN = {
    "llava": "</s>",
    "llava_next": "</s>",
    "qwen2_vl": "<|im_end|>",
    "qwen2_5_vl": "<|im_end|>",
    "gemma3": "<end_of_turn>",
    "llava_onevision": "<|im_end|>",
    "smolvlm": "<end_of_utterance>",
    "paligemma": "<eos>",
    "idefics3": "<end_of_utterance>",
    "aria": "<|im_end|>",
}

#: Aria's layout (rhymes-ai/Aria): ChatML, each image as "<fim_prefix><|img|><fim_suffix>".
ARIA_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% for p in m.content %}"
    "{% if p.type == 'image' %}<fim_prefix><|img|><fim_suffix>{% else %}{{ p.text }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ARIA_SPECIALS = (
    "<pad>",
    "<unk>",
    "<s>",
    "<|im_start|>",
    "<|im_end|>",
    "<fim_prefix>",
    "<fim_suffix>",
    "<|img|>",
)

#: Gemma 3's layout (google/gemma-3-*-it): "<start_of_turn>user\n<start_of_image>...<end_of_turn>\n", the assistant
#: as "model", each text part trimmed.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
    "{% for p in m.content %}{% if p.type == 'image' %}<start_of_image>{% else %}{{ p.text | trim }}{% endif %}"
    "{% endfor %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GEMMA3_SPECIALS = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
    "<image_soft_token>",
)  # fmt: skip

#: PaliGemma's prefix-LM layout ("<image>...<bos>prompt\n" then the answer, as big_vision writes it): the
#: checkpoints ship no chat template; the user gives one like this, and the processor inserts the BOS after the
#: images and the "\n" after the text itself. The template ends no turn: moevl appends the EOS.
PALIGEMMA_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'assistant' %}{{ '\\n' }}{% endif %}"
    "{% for p in m.content %}{% if p.type == 'image' %}<image>{% else %}{{ p.text | trim }}{% endif %}"
    "{% endfor %}{% endfor %}"
)
PALIGEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<image>")

#: Idefics3's layout (HuggingFaceM4/Idefics3-8B-Llama3): "<|begin_of_text|>User:<image>...<end_of_utterance>\n
#: Assistant: ...<end_of_utterance>\n".
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for m in messages %}{{ m.role | capitalize }}"
    "{% if m.content[0].type == 'image' %}:{% else %}: {% endif %}"
    "{% for p in m.content %}{% if p.type == 'text' %}{{ p.text }}{% elif p.type == 'image' %}<image>{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
IDEFICS3_SPECIALS = (
    "<|end_of_text|>", "<|begin_of_text|>", "<unk>", "<fake_token_around_image>", "<image>", "<end_of_utterance>",
    "<global-img>", *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)  # fmt: skip

# Qwen2-VL's template (images only), with its default system turn.
QWEN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first and m.role != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m.role }}\n"
    "{% for p in m.content %}{% if p.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ p.text }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIALS = (
    "<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip


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
    if next_:  # a SentencePiece-like BPE, as Vicuna's (LLaVA-NeXT's decoder)
        specials = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
        core = bpe_tokenizer(specials, "metaspace", (*WORDS, "USER:", "ASSISTANT:"))
        tok = tf.PreTrainedTokenizerFast(
            tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
            extra_special_tokens={"image_token": "<image>"},
        )  # fmt: skip
        tok.chat_template = LLAVA_TEMPLATE
    else:
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


def bpe_tokenizer(specials: tuple[str, ...], scheme: str, words: tuple[str, ...] = WORDS):
    """A small BPE trained on ``words``: ``scheme="byte"`` is byte-level like Qwen's ("Ġthree"), ``"metaspace"``
    SentencePiece-like as Llama/Vicuna's ("▁three"). Merges make tokens that carry the space before a word:
    the case the character-span labelling must get right."""
    from itertools import pairwise

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if scheme == "byte":
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        core = Tokenizer(models.BPE(unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        core.decoder = decoders.Metaspace(prepend_scheme="first")
        alphabet = [*(chr(c) for c in range(32, 127)), "\n", "▁"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials), initial_alphabet=alphabet)
    corpus = [" ".join(words)] * 4 + [f"{a} {b}" for a, b in pairwise(words)]
    core.train_from_iterator(corpus, trainer=trainer)
    return core


def _siglip(image_size: int, patch_size: int, config_cls=tf.SiglipVisionConfig):
    return config_cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )


def _save(out: Path, model, processor) -> None:
    tok = processor.tokenizer
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, k, getattr(tok, k))
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _gemma3(out: Path) -> None:
    """Gemma 3: a SigLIP tower whose 4x4 patches are pooled to 2x2 = 4 image tokens, each image written as
    ``\n\n<start_of_image><image_soft_token>*4<end_of_image>\n\n`` by the processor."""
    core = bpe_tokenizer(GEMMA3_SPECIALS, "metaspace", (*WORDS, "user", "model"))
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        extra_special_tokens={
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
        },
    )  # fmt: skip
    tok.chat_template = GEMMA3_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA3_SPECIALS}
    text = tf.Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=64, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    config = tf.Gemma3Config(
        text_config=text,
        vision_config=_siglip(16, 4),
        mm_tokens_per_image=4,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    ip = tf.Gemma3ImageProcessorPil(
        size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = tf.Gemma3Processor(
        image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=GEMMA3_TEMPLATE
    )
    _save(out, tf.Gemma3ForConditionalGeneration(config), processor)


def _idefics3_parts(config_cls, vision_cls, image_processor_cls):
    """The tokenizer, config and image processor of Idefics3's layout (SmolVLM's too): each image split into up
    to 2x2 tiles of 16 px plus the whole image, each 4 image tokens, written as ``<fake_token_around_image>
    <row_1_col_1><image>*4...\n\n<fake_token_around_image><global-img><image>*4<fake_token_around_image>``."""
    core = bpe_tokenizer(IDEFICS3_SPECIALS, "byte", (*WORDS, "User:", "Assistant:"))
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|end_of_text|>", eos_token="<|end_of_text|>",
        bos_token="<|begin_of_text|>", unk_token="<unk>",
        additional_special_tokens=[t for t in IDEFICS3_SPECIALS if t.startswith(("<row", "<global", "<fake", "<image", "<end_of_u"))],
    )  # fmt: skip
    tok.chat_template = IDEFICS3_TEMPLATE
    text = _llama_text(
        len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
    )
    config = config_cls(
        text_config=text,
        vision_config=_siglip(16, 4, vision_cls),
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    ip = image_processor_cls(
        size={"longest_edge": 32},
        max_image_size={"longest_edge": 16},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    return tok, config, ip


def _idefics3(out: Path) -> None:
    tok, config, ip = _idefics3_parts(
        tf.Idefics3Config, tf.Idefics3VisionConfig, tf.Idefics3ImageProcessorPil
    )
    processor = tf.Idefics3Processor(
        image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE
    )
    _save(out, tf.Idefics3ForConditionalGeneration(config), processor)


def _aria(out: Path) -> None:
    """Aria: a natively sparse decoder (4 experts, top-2, 1 shared). NOTE: ``AriaProcessor``'s own default
    ``max_image_size=980`` overrides its image processor's, so images are 980 px, in 14x14 patches of 70 px
    (kept cheap by the 32-wide tower), pooled to 4 image tokens."""
    core = bpe_tokenizer(ARIA_SPECIALS, "metaspace", (*WORDS, "user", "assistant"))
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
        extra_special_tokens={"image_token": "<|img|>"},
        additional_special_tokens=["<|im_start|>", "<fim_prefix>", "<fim_suffix>"],
    )  # fmt: skip
    tok.chat_template = ARIA_TEMPLATE
    text = tf.AriaTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    config = tf.AriaConfig(
        vision_config=_siglip(980, 70, tf.Idefics3VisionConfig),
        text_config=text,
        projector_patch_to_query_dict={196: 4},
        image_token_index=tok.image_token_id,
    )
    ip = tf.AriaImageProcessorPil(max_image_size=980, split_image=False)
    processor = tf.AriaProcessor(
        image_processor=ip, tokenizer=tok, chat_template=ARIA_TEMPLATE, size_conversion={980: 4}
    )
    _save(out, tf.AriaForConditionalGeneration(config), processor)


def _paligemma(out: Path) -> None:
    """PaliGemma: a SigLIP tower of 16 px images in 8 px patches (4 image tokens) and a Gemma decoder; its
    processor adds 1152 location/segmentation tokens to the tokenizer."""
    from tokenizers import decoders, pre_tokenizers

    core = bpe_tokenizer(PALIGEMMA_SPECIALS, "metaspace")
    core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # Gemma adds no leading "▁"
    core.decoder = decoders.Metaspace(prepend_scheme="never")
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip
    ip = tf.SiglipImageProcessorPil(
        size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    ip.image_seq_length = 4
    processor = tf.PaliGemmaProcessor(image_processor=ip, tokenizer=tok, chat_template=PALIGEMMA_TEMPLATE)
    text = tf.GemmaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    vision = _siglip(16, 8)
    vision.vision_use_head = False
    config = tf.PaliGemmaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.image_token_id, projection_dim=32,
        hidden_size=32, vocab_size=len(tok),
    )  # fmt: skip
    _save(out, tf.PaliGemmaForConditionalGeneration(config), processor)


def _qwen_tokenizer():
    words = (*WORDS, "system", "user", "assistant", "You", "are", "a", "helpful", ".")
    core = bpe_tokenizer(QWEN_SPECIALS, "byte", words)
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=[
            t for t in QWEN_SPECIALS if t not in ("<|endoftext|>", "<unk>", "<|im_end|>")
        ],
    )
    tok.chat_template = QWEN_TEMPLATE
    return tok


def _qwen(out: Path, *, v2_5: bool) -> None:
    """Qwen2-VL / Qwen2.5-VL; the processor needs torchvision's video processor (``load_processor``)."""
    tok = _qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    if v2_5:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                      window_size=8, fullatt_block_indexes=[1])  # fmt: skip
        config_cls, model_cls = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration
    else:
        vision = dict(depth=2, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=4)
        config_cls, model_cls = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration
    config = config_cls(
        text_config=text,
        vision_config=dict(
            in_channels=3, patch_size=2, spatial_merge_size=2, temporal_patch_size=2, **vision
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = model_cls(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    ip = tf.Qwen2VLImageProcessorPil(
        patch_size=2, temporal_patch_size=2, merge_size=2, min_pixels=4 * 4, max_pixels=16 * 16,
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )  # fmt: skip
    cls = tf.Qwen2_5_VLProcessor if v2_5 else tf.Qwen2VLProcessor
    save_without_video_processor(out, cls, tok, ip)


#: LLaVA-OneVision's layout (Qwen2's chat format with "<image>" placeholders)
ONEVISION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% for p in m.content %}{% if p.type == 'image' %}<image>\n{% else %}{{ p.text }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _llava_onevision(out: Path) -> None:
    """LLaVA-OneVision (SigLIP + Qwen2): 16 px images in 8 px patches, one 16x16 grid cell plus the base image
    (``image_grid_pinpoints=[[16, 16]]``); its processor needs torchvision's video processor (``load_processor``)."""
    core = bpe_tokenizer((*QWEN_SPECIALS, "<image>", "<video>"), "byte", (*WORDS, "user", "assistant"))
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|endoftext|>", unk_token="<unk>", eos_token="<|im_end|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        additional_special_tokens=["<|im_start|>"],
    )  # fmt: skip
    tok.chat_template = ONEVISION_TEMPLATE
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   image_size=16, patch_size=8)  # fmt: skip
    text = tf.Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    config = tf.LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tok.image_token_id,
        video_token_index=tok.video_token_id, image_grid_pinpoints=[[16, 16]], vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )  # fmt: skip
    ip = tf.LlavaOnevisionImageProcessorPil(
        size={"height": 16, "width": 16}, crop_size={"height": 16, "width": 16}, image_grid_pinpoints=[[16, 16]],
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )  # fmt: skip
    model = tf.LlavaOnevisionForConditionalGeneration(config)
    for k in ("pad_token_id", "eos_token_id"):
        setattr(model.generation_config, k, getattr(tok, k))
    model.save_pretrained(out)
    save_without_video_processor(
        out, tf.LlavaOnevisionProcessor, tok, ip, num_image_tokens=4, vision_feature_select_strategy="full"
    )


def _smolvlm(out: Path) -> None:
    """SmolVLM: Idefics3's layout with its own classes; its processor needs torchvision's video processor
    (``load_processor``) and ``num2words``."""
    tok, config, ip = _idefics3_parts(tf.SmolVLMConfig, tf.SmolVLMVisionConfig, tf.SmolVLMImageProcessorPil)
    model = tf.SmolVLMForConditionalGeneration(config)
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, k, getattr(tok, k))
    model.save_pretrained(out)
    save_without_video_processor(out, tf.SmolVLMProcessor, tok, ip, image_seq_len=4)


#: the file beside a checkpoint naming its processor class and init arguments, where the processor cannot be
#: saved here (``save_without_video_processor``)
PARTS = "processor_parts.json"


def _no_video_check():
    """``ProcessorMixin.__init__`` checks the class of every declared part, ``video_processor`` included even
    when it is None, against a mapping that is a placeholder raising when torchvision is missing (the video
    processors of Qwen2-VL, LLaVA-OneVision and SmolVLM are torchvision-only; torchvision's only build here is a
    CUDA one that does not import with CPU torch). Only that check of a None video processor is skipped."""
    from unittest import mock

    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class

    def check_unless_no_video(self, name, arg):
        return None if name == "video_processor" and arg is None else check(self, name, arg)

    return mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", check_unless_no_video)


def save_without_video_processor(out: Path, cls, tok, image_processor, **kwargs) -> None:
    """Saves the parts of a ``cls`` processor (tokenizer, image processor, init arguments) for ``load_processor``."""
    import json

    tok.save_pretrained(out)
    image_processor.save_pretrained(out)
    (out / PARTS).write_text(json.dumps({"class": cls.__name__, "kwargs": kwargs}))


def load_processor(path: str | Path):
    """``AutoProcessor.from_pretrained(path)``; for the families whose processor needs torchvision's video
    processor (``VIDEO_PROCESSOR``), the same processor class built from its saved parts with no video
    processor (``_no_video_check``): everything the processor does with images is its own code. (A real
    checkpoint of these families holds its whole processor, which ``moevl train`` loads with ``AutoProcessor``
    where torchvision is installed.)"""
    import json

    parts = Path(path) / PARTS
    if not parts.exists():
        return tf.AutoProcessor.from_pretrained(path)
    spec = json.loads(parts.read_text())
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    with _no_video_check():
        return getattr(tf, spec["class"])(
            image_processor=tf.AutoImageProcessor.from_pretrained(path),
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=tokenizer.chat_template,
            **spec["kwargs"],
        )


def build_checkpoint(family: str, out: str | Path, seed: int = 0) -> Path:
    """Writes a tiny checkpoint of ``family`` (one of ``FAMILIES``) to ``out``."""
    out = Path(out)
    torch.manual_seed(seed)
    builders = {
        "llava": lambda: _llava(out, next_=False),
        "llava_next": lambda: _llava(out, next_=True),
        "qwen2_vl": lambda: _qwen(out, v2_5=False),
        "qwen2_5_vl": lambda: _qwen(out, v2_5=True),
        "gemma3": lambda: _gemma3(out),
        "idefics3": lambda: _idefics3(out),
        "aria": lambda: _aria(out),
        "paligemma": lambda: _paligemma(out),
        "llava_onevision": lambda: _llava_onevision(out),
        "smolvlm": lambda: _smolvlm(out),
    }
    if family not in builders:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    builders[family]()
    return out
