"""lmms-eval model ``moevl``: any model directory a moevl stage writes, answered by greedy generation.

The directory is loaded by ``moevl.vlm.io.load_model``, the loader ``moevl train`` / ``moevl eval`` use, from
local files only: a plain Hugging Face checkpoint as transformers loads it, a moevl-format MoE checkpoint
exactly (``moevl.checkpoint.load_moe_model``), a released MoE-LLaVA checkpoint; the processor and its chat
template come from the same directory. Nothing downloads.

lmms-eval finds the class through the ``lmms_eval.models`` entry point that ``pyproject.toml`` declares
(``model_manifest``), so ``lmms-eval --model moevl --model_args pretrained=DIR`` works once moevl is
installed; ``simple_evaluate(model=MoevlLMM(pretrained=DIR), ...)`` needs no entry point.

Each request's text is the task's ``doc_to_text``; its ``<image>`` placeholders mark where the request's
images go (images without a placeholder go first, as in LLaVA's ``"<image>\\n{question}"``). The text and
images become one user turn of the model's chat template. Generation is greedy, never emits an image or
video placeholder token and stops at the end-of-sequence token or a task's ``until`` string, as
``moevl eval`` generates.

Needs ``pip install moevl[lmms]``. Only ``generate_until`` tasks: loglikelihood (multiple-choice by
likelihood) and multi-round requests raise ``NotImplementedError``; one process (no data parallelism).
"""

from __future__ import annotations

from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from moevl.checks import check_int

MODEL_NAME = "moevl"
IMAGE_PLACEHOLDER = "<image>"
#: generation keys a task may set; anything else is refused rather than silently ignored
_GENERATION_KEYS = frozenset({"max_new_tokens", "until", "temperature", "do_sample", "num_beams", "top_p"})


def model_manifest() -> Any:
    """The ``lmms_eval.models`` entry point's payload: ``--model moevl`` is ``MoevlLMM``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.MoevlLMM")


class MoevlLMM(lmms):
    """An lmms-eval model over a local moevl (or plain Hugging Face) vision-language model directory.

    Args:
        pretrained: the model directory (or a stage's output directory holding ``model/``).
        device: torch device to run on.
        batch_size: requests per ``generate`` call (left-padded).
        max_new_tokens: the budget when a task sets none.
        chat_template: Jinja text replacing the processor's chat template.
        max_batch_size: lmms-eval passes it when ``--max_batch_size`` is given; automatic batch sizes are
            not supported, so it must be None.
    A tokenizer without a padding token pads with its end-of-sequence token (left padding and the
    attention mask make the padding's content irrelevant).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str = "cpu",
        batch_size: int | str = 1,
        max_new_tokens: int = 16,
        chat_template: str | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        batch_size = int(batch_size) if str(batch_size).isdigit() else batch_size
        check_int("batch_size", batch_size, minimum=1)
        check_int("max_new_tokens", max_new_tokens, minimum=1)
        if max_batch_size is not None:
            raise ValueError(
                f"max_batch_size: automatic batch sizes are not supported, got {max_batch_size!r}"
            )
        from moevl.vlm.io import CheckpointError, load_model

        try:  # the loader moevl train/eval use: any HF, moevl-format or MoE-LLaVA directory (or a stage's out)
            model, processor = load_model(pretrained, chat_template=chat_template)
        except CheckpointError as e:
            raise ValueError(f"pretrained: {e}") from None
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None or getattr(processor, "chat_template", None) is None:
            raise ValueError(
                f"pretrained: {pretrained} needs a processor with a tokenizer and a chat template "
                "(save one beside the model or pass chat_template=...)"
            )
        self._device = torch.device(device)
        self.model = model.to(self._device).eval()
        self.processor = processor
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"  # generation continues every row from its last position
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(
                    f"pretrained: the tokenizer of {pretrained} has neither a padding nor an eos token"
                )
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        config = self.model.config
        self._suppress = sorted(
            {
                getattr(config, name)
                for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
                if isinstance(getattr(config, name, None), int)
            }
        )
        # EOS and the chat template's end-of-turn token (moevl.data.processing.turn_end), as `moevl eval`
        from moevl.data.processing import ChatRenderer, chat_template_of, turn_end, vision_token_ids
        from moevl.vlm.evaluate import stop_token_ids

        render = ChatRenderer(self.processor, chat_template_of(self.processor))
        ends = turn_end(render, set(vision_token_ids(self.processor, config))).token_ids
        self._eos = stop_token_ids(
            self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id, ends
        )

    @property
    def device(self) -> torch.device:
        return self._device

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, in the order of ``requests``; ``args`` = (text, generation kwargs, doc_to_visual,
        doc_id, task, split)."""
        answers: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = [r.args for r in requests[start : start + self.batch_size]]
            budgets, stops = zip(*(self._generation_options(args[1]) for args in chunk), strict=True)
            prompts, images = [], []
            for text, _, doc_to_visual, doc_id, task, split in chunk:
                visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
                prompts.append(self._prompt(text, len(visuals or [])))
                images.extend(visuals or [])
            inputs = self.processor(
                text=prompts, images=images or None, padding=True, return_tensors="pt"
            ).to(self._device)
            with torch.no_grad():
                out = self.model.generate(
                    **inputs,
                    max_new_tokens=max(budgets),
                    do_sample=False,
                    num_beams=1,
                    suppress_tokens=self._suppress or None,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self._eos or None,
                )
            new_tokens = out[:, inputs["input_ids"].shape[1] :]
            for row, budget, until in zip(new_tokens, budgets, stops, strict=True):
                # a row asked for fewer tokens than the batch's longest budget keeps only its own
                answers.append(_cut(self.tokenizer.decode(row[:budget], skip_special_tokens=True), until))
        return answers

    def _prompt(self, text: str, num_images: int) -> str:
        """One user turn through the chat template, images where ``text`` has ``<image>``."""
        pieces = text.split(IMAGE_PLACEHOLDER)
        placed = len(pieces) - 1
        if placed not in (0, num_images):
            raise ValueError(
                f"request text has {placed} {IMAGE_PLACEHOLDER} placeholders but the task gives "
                f"{num_images} images: {text!r}"
            )
        content: list[dict[str, str]] = []
        if placed == 0:
            content += [{"type": "image"}] * num_images
            pieces = [text]
        for i, piece in enumerate(pieces):
            if i > 0:
                content.append({"type": "image"})
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _generation_options(self, kwargs: dict[str, Any] | None) -> tuple[int, list[str]]:
        """``(max_new_tokens, until)`` of a task's generation kwargs; sampling or beams raise ValueError."""
        kwargs = dict(kwargs or {})
        unknown = sorted(set(kwargs) - _GENERATION_KEYS)
        if unknown:
            raise ValueError(
                f"generation_kwargs: {unknown} not supported by the moevl model "
                f"(supported: {sorted(_GENERATION_KEYS)})"
            )
        if (
            kwargs.get("do_sample")
            or (kwargs.get("temperature") or 0) > 0
            or (kwargs.get("num_beams") or 1) != 1
        ):
            raise ValueError(
                "generation_kwargs must be greedy (the moevl model decodes greedily): do_sample false, "
                f"temperature 0 and num_beams 1, got {kwargs}"
            )
        budget = kwargs.get("max_new_tokens", self.max_new_tokens)
        check_int("generation_kwargs['max_new_tokens']", budget, minimum=1)
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        return budget, until

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("the moevl lmms-eval model answers generate_until tasks only")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the moevl lmms-eval model answers generate_until tasks only")


def _cut(text: str, until: list[str]) -> str:
    """``text`` up to the first stop string, stripped."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()
