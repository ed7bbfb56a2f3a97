"""A tiny LLaVA checkpoint with a full processor (word-level tokenizer, chat template) and a 5-record
LLaVA-format VQA file with images of different sizes; no downloads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tests.hf.tiny import IMAGE_TOKEN, tiny_llava

PAD, BOS, EOS = 0, 1, 2  # LlamaConfig's bos/eos ids
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() + ':' }} "
    "{% if m['content'] is string %}{{ m['content'] }} {% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}</s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)
QUESTIONS = ["w10 w11 w12", "w13 w14", "w15 w16 w17 w18", "w19", "w20 w21 w22"]


def tiny_vqa_processor():
    """LLaVA processor for ``tiny_llava``: ``<pad> <s> </s> USER: ASSISTANT: w5..w94 <image>`` (ids 0..95)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "USER:", "ASSISTANT:"] + [f"w{i}" for i in range(5, IMAGE_TOKEN)]
    vocab = {w: i for i, w in enumerate(words)} | {"<image>": IMAGE_TOKEN}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w5"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="w5",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    return LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}),
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_vqa_model(seed: int = 0):
    model = tiny_llava(seed)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    return model


def write_images(folder: Path) -> list[str]:
    """Five random RGB PNGs of different sizes (the processor resizes and crops them to 8x8)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(len(QUESTIONS)):
        name = f"img{i}.png"
        pixels = rng.integers(0, 256, (8 + 4 * i, 12 + 2 * i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
        names.append(name)
    return names


def write_llava_json(path: Path, image_names: list[str], answers: list[str]) -> Path:
    records = [
        {
            "id": f"q{i}",
            "image": name,
            "conversations": [
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": answer},
            ],
        }
        for i, (name, question, answer) in enumerate(zip(image_names, QUESTIONS, answers, strict=True))
    ]
    path.write_text(json.dumps(records))
    return path


@torch.no_grad()
def reference_answer(model, processor, image, question: str, max_new_tokens: int) -> str:
    """Greedy decoding by hand, one record, no cache and no padding: each step runs the whole sequence and
    takes the arg-max of the last position's logits (the image token excluded), until ``</s>``."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    ids = inputs["input_ids"]
    new = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0, -1].clone()
        logits[IMAGE_TOKEN] = -float("inf")
        token = int(logits.argmax())
        if token == EOS:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()
