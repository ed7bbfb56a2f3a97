"""Generation inputs for evaluation: each conversation up to its last assistant turn with the generation
prompt, left-padded, and the reference answers (``GenerationCollator``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moevl.data.conversations import Record, last_assistant_text, open_images, prompt_messages
from moevl.data.processing import ChatRenderer, ProcessorCall, chat_template_of, turn_end, vision_token_ids


@dataclass
class GenerationBatch:
    inputs: dict[str, torch.Tensor]
    ids: list[str]
    categories: list[str | None]
    prompts: list[str]  # the last user turn's text
    answers: list[str]  # the last assistant turn's text


class GenerationCollator:
    """Records -> left-padded generation inputs (the conversation up to its last assistant turn, with the
    generation prompt) and their reference answers. ``turn_end.token_ids``: where generation should stop."""

    def __init__(self, processor: Any, *, chat_template: str | None = None) -> None:
        self.processor = processor
        self.render = ChatRenderer(processor, chat_template_of(processor, chat_template))
        self.turn_end = turn_end(self.render, set(vision_token_ids(processor)))
        self.call = ProcessorCall(processor)

    def __call__(self, records: list[Record]) -> GenerationBatch:
        texts, images, prompts = [], [], []
        for r in records:
            messages = prompt_messages(r)
            n_images = sum(1 for m in messages for p in m["content"] if p["type"] == "image")
            texts.append(self.render(messages, generation_prompt=True))
            images.append(open_images(r.id, r.source, r.images[:n_images]))
            last_user = messages[-1]
            prompts.append("".join(p["text"] for p in last_user["content"] if p["type"] == "text").strip())
        inputs = self.call(texts, images, padding_side="left")
        inputs.pop("text_replacement_offsets", None)
        return GenerationBatch(
            inputs=inputs,
            ids=[r.id for r in records],
            categories=[r.category for r in records],
            prompts=prompts,
            answers=[last_assistant_text(r) for r in records],
        )
