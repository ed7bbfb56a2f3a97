"""Records -> model inputs through the checkpoint's own processor and chat template, for any family.

* ``ConversationDataset`` renders each record with the chat template, finds the character spans of the
  assistant turns, and measures each record's length (text tokens + the processor's image tokens) without
  decoding pixels, dropping (and counting) records longer than ``max_length``: a record is never cut, so
  image tokens are never truncated.
* ``ConversationCollator`` calls the processor ONCE per batch (each family's own batching of vision inputs:
  ``pixel_values``, ``image_sizes``, ``image_grid_thw``, ...) and builds ``labels``: the assistant's tokens
  (its reply and the end-of-turn the template writes), -100 elsewhere (prompt, image tokens, padding).
  Where the template writes no end-of-turn token after a reply (llava-1.5-hf's stock template), the
  tokenizer's EOS is appended to each assistant turn and learnt (``turn_end``): a model must learn to stop.
  The mask comes from the tokenizer's character offsets on the *unexpanded* text, aligned with the
  processor's row, where a run of image (or video) tokens stands for one placeholder; if the other tokens
  do not match exactly the collator raises, never guesses.
* ``GenerationCollator`` builds left-padded generation inputs: the conversation up to its last assistant
  turn with the generation prompt, and the reference answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from moevl.data.conversations import DataError, Record, last_assistant_text, prompt_messages

IGNORE_INDEX = -100


def tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def chat_template_of(processor: Any, override: str | None = None) -> str:
    """The chat template to render with: ``override``, the processor's, or its tokenizer's."""
    if override is not None:
        return override
    for owner in (processor, tokenizer_of(processor)):
        template = getattr(owner, "chat_template", None)
        if isinstance(template, str) and template:
            return template
    raise DataError(
        "the checkpoint has no chat template (processor or tokenizer); give one with --chat-template FILE "
        "(data.chat_template in the recipe)"
    )


def vision_token_ids(processor: Any, config: Any = None) -> tuple[int, ...]:
    """The image and video placeholder token ids of a checkpoint, from its config and its processor."""
    from moevl.hf.runtime import vision_token_ids as from_config

    ids = set(from_config(config)) if config is not None else set()
    tokenizer = tokenizer_of(processor)
    for owner in (processor, tokenizer):
        for attr in ("image_token", "video_token"):
            token = getattr(owner, attr, None)
            if isinstance(token, str):
                tid = tokenizer.convert_tokens_to_ids(token)
                if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                    ids.add(tid)
        for attr in ("image_token_id", "video_token_id"):
            tid = getattr(owner, attr, None)
            if isinstance(tid, int) and tid >= 0:
                ids.add(tid)
    return tuple(sorted(ids))


class ChatRenderer:
    """Renders conversations with a chat template exactly as ``tokenizer.apply_chat_template(...,
    tokenize=False)`` does for plain messages, several times faster: the template is compiled once and
    called directly with the tokenizer's special tokens (``apply_chat_template`` copies every message
    into template data on each call, which dominated the pre-pass over large files).

    NOTE: uses transformers' ``_compile_jinja_template`` (the compiled template ``apply_chat_template``
    itself uses); if it goes away this falls back to ``apply_chat_template``. Tested equal to it.
    """

    def __init__(self, processor: Any, template: str) -> None:
        self.tokenizer = tokenizer_of(processor)
        self.template = template
        import jinja2

        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template
        except ImportError:  # pragma: no cover - depends on the transformers version
            self.compiled = None
        else:
            try:
                self.compiled = _compile_jinja_template(template)
            except jinja2.TemplateError as e:
                raise DataError(f"the chat template is not valid Jinja: {e}") from None
        self.special = {
            k: v for k, v in self.tokenizer.special_tokens_map.items() if isinstance(v, str | list)
        }

    def __call__(self, messages: list[dict], *, generation_prompt: bool) -> str:
        import jinja2

        try:
            if self.compiled is None:
                return self.tokenizer.apply_chat_template(
                    messages,
                    chat_template=self.template,
                    tokenize=False,
                    add_generation_prompt=generation_prompt,
                )
            return self.compiled.render(
                messages=messages, add_generation_prompt=generation_prompt, **self.special
            )
        except jinja2.TemplateError as e:
            raise DataError(f"the chat template failed to render a conversation: {e}") from None


@dataclass(frozen=True)
class TurnEnd:
    """How a chat template ends an assistant turn (``turn_end``).

    ``token_ids``: the end-of-turn tokens the template writes after a reply (EOS, ``<|im_end|>``,
    ``<end_of_turn>``, ...), or moevl's appended one; generation stops at any of them. ``appended``: the token
    text moevl appends after each reply because the template writes none (None: the template ends turns).
    """

    token_ids: tuple[int, ...]
    appended: str | None


#: A two-turn conversation rendered to see what a template writes after a reply.
_PROBE_REPLIES = ("first reply", "second reply")
_PROBE = [
    {"role": "user", "content": [{"type": "text", "text": "first question"}]},
    {"role": "assistant", "content": [{"type": "text", "text": _PROBE_REPLIES[0]}]},
    {"role": "user", "content": [{"type": "text", "text": "second question"}]},
    {"role": "assistant", "content": [{"type": "text", "text": _PROBE_REPLIES[1]}]},
]


def turn_end(render: ChatRenderer, vision: set[int] | frozenset[int] = frozenset()) -> TurnEnd:
    """Whether ``render``'s template writes an end-of-turn token after each assistant reply, found by
    rendering a two-turn probe: the characters of each assistant span after its reply must hold a special
    token of the tokenizer (not padding, BOS, unknown or a ``vision`` placeholder). Where they do not, the
    tokenizer's EOS is appended to each turn (LLaVA's own training supervises ``</s>`` after every answer);
    a tokenizer without an EOS token is a ``DataError`` (the model could never learn to stop).
    """
    tok = render.tokenizer
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    special -= {tok.pad_token_id, tok.bos_token_id, tok.unk_token_id} - {tok.eos_token_id}
    special -= set(vision)
    text, spans = _spans(render, _PROBE, "the chat template's probe conversation")
    found: list[int] = []
    for (a, b), reply in zip(spans, _PROBE_REPLIES, strict=True):
        span = text[a:b]
        at = span.rfind(reply)
        tail = span[at + len(reply) :] if at >= 0 else ""
        ends = [i for i in tok(tail, add_special_tokens=False)["input_ids"] if i in special]
        if not ends:
            break
        found += ends
    else:
        return TurnEnd(tuple(sorted(set(found))), None)
    if tok.eos_token is None or tok.eos_token_id is None:
        raise DataError(
            "the chat template writes no end-of-turn token after an assistant reply and the tokenizer has no "
            "EOS token to append: a model trained on it could not learn to stop; give a template that ends "
            "assistant turns (--chat-template FILE) or a tokenizer with an eos_token"
        )
    return TurnEnd((tok.eos_token_id,), tok.eos_token)


def assistant_spans(
    render: ChatRenderer, record: Record, append: str | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered record and the character spans of its assistant turns (reply + end-of-turn marker).

    Each span runs from the end of the conversation rendered up to the turn with the generation prompt to
    the end of the conversation rendered through the turn; the template must render prefixes as prefixes
    (all chat templates we know do), else ``DataError``. ``append`` (``TurnEnd.appended``) is inserted after
    each span and belongs to it.
    """
    text, spans = _spans(render, record.messages, f"record {record.id!r} ({record.source})")
    if append is None:
        return text, spans
    pieces, moved, start = [], [], 0
    for i, (a, b) in enumerate(spans):
        pieces += [text[start:b], append]
        moved.append((a + i * len(append), b + (i + 1) * len(append)))
        start = b
    return "".join(pieces) + text[start:], moved


def _spans(render: ChatRenderer, messages: list[dict], what: str) -> tuple[str, list[tuple[int, int]]]:
    text = render(messages, generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], generation_prompt=True)
        last = i == len(messages) - 1
        through = text if last else render(messages[: i + 1], generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError(
                f"{what}: the chat template does not render a conversation's prefix as a prefix of the whole, "
                "so the assistant tokens cannot be located"
            )
        spans.append((len(before), max(len(before), len(through.rstrip()))))
    return text, spans


@dataclass(frozen=True)
class Example:
    """One rendered record (what ``ConversationDataset`` yields)."""

    id: str
    text: str
    spans: tuple[tuple[int, int], ...]
    images: tuple[Any, ...]  # ImageRef, opened by the collator
    category: str | None


class ConversationDataset(Dataset):
    """Rendered records, with over-long ones dropped and counted (``dropped_too_long``)."""

    def __init__(
        self,
        records: list[Record],
        processor: Any,
        *,
        max_length: int | None = None,
        chat_template: str | None = None,
        progress: bool = True,
    ) -> None:
        from tqdm.auto import tqdm

        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be None or >= 1, got {max_length}")
        self.processor = processor
        self.template = chat_template_of(processor, chat_template)
        self.max_length = max_length
        self.examples: list[Example] = []
        self.lengths: list[int] = []
        self.dropped_too_long = 0
        counter = _TokenCounter(processor)
        render = ChatRenderer(processor, self.template)
        self.turn_end = turn_end(render, set(vision_token_ids(processor)))
        bar = tqdm(
            total=len(records),
            desc="reading records",
            unit="record",
            disable=not progress or len(records) < 2000,
        )
        chunk = (
            1024  # tokenized together: the fast tokenizer's batch call is far cheaper than one call a text
        )
        for start in range(0, len(records), chunk):
            part = records[start : start + chunk]
            rendered = [assistant_spans(render, r, self.turn_end.appended) for r in part]
            lengths = counter.count([text for text, _ in rendered], [r.images for r in part])
            for r, (text, spans), n in zip(part, rendered, lengths, strict=True):
                if max_length is not None and n > max_length:
                    self.dropped_too_long += 1
                    continue
                self.examples.append(Example(r.id, text, tuple(spans), r.images, r.category))
                self.lengths.append(n)
            bar.update(len(part))
        bar.close()

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


class _TokenCounter:
    """Token length of a rendered record: its text tokens plus, per image, the processor's image tokens
    minus the placeholder (from ``_get_num_multimodal_tokens`` when the processor has it, else by
    processing one image of that size once)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = tokenizer_of(processor)
        self.per_size: dict[tuple[int, int], int] = {}

    def count(self, texts: list[str], images: list[tuple]) -> list[int]:
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        out = []
        for row, refs in zip(ids, images, strict=True):
            n = len(row)
            for ref in refs:
                w, h = ref.size()
                n += self._image_tokens(h, w) - 1
            out.append(n)
        return out

    def _image_tokens(self, h: int, w: int) -> int:
        if (h, w) not in self.per_size:
            counted = None
            fn = getattr(self.processor, "_get_num_multimodal_tokens", None)
            if fn is not None:
                try:
                    counted = fn(image_sizes=[(h, w)])["num_image_tokens"][0]
                except (KeyError, TypeError, NotImplementedError, AttributeError):
                    counted = None
            if counted is None:
                from PIL import Image

                token = getattr(self.processor, "image_token", "<image>")
                out = self.processor(text=[token], images=[Image.new("RGB", (w, h))], return_tensors="pt")
                counted = (
                    int(out["input_ids"].shape[1])
                    - len(self.tokenizer(token, add_special_tokens=False)["input_ids"])
                    + 1
                )
            self.per_size[(h, w)] = int(counted)
        return self.per_size[(h, w)]


def _process(processor: Any, texts: list[str], images: list, padding_side: str) -> dict:
    tokenizer = tokenizer_of(processor)
    old = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        kwargs: dict[str, Any] = {
            "text": texts,
            "padding": True,
            "return_tensors": "pt",
            "add_special_tokens": False,
        }
        if any(images):
            kwargs["images"] = [img for row in images for img in row]
        return dict(processor(**kwargs))
    finally:
        tokenizer.padding_side = old


def label_mask(
    row: list[int],
    length: int,
    text: str,
    ids: list[int],
    offsets: list[tuple[int, int]],
    spans: tuple[tuple[int, int], ...],
    vision: set[int],
) -> list[bool]:
    """Which of the first ``length`` tokens of a processor row are assistant tokens (module doc), from the
    unexpanded ``text``'s token ``ids`` and character ``offsets``.

    A token is learnt when it shares a non-whitespace character with an assistant span: a token that carries
    the space before a reply ("▁three" / "Ġthree" after "ASSISTANT:") is learnt whether or not its offsets
    include that space, and a newline after the end-of-turn marker is not.
    """
    mask = [False] * len(row)
    i = j = 0
    while i < length and j < len(ids):
        if ids[j] in vision:
            if row[i] not in vision:
                break
            while j < len(ids) and ids[j] in vision:
                j += 1
            while i < length and row[i] in vision:
                i += 1
            continue
        if row[i] != ids[j]:
            break
        a, b = offsets[j]
        mask[i] = any(text[max(a, s) : min(b, e)].strip() for s, e in spans if max(a, s) < min(b, e))
        i += 1
        j += 1
    if i != length or j != len(ids):
        raise ValueError(
            f"the processor's tokens differ from the tokenizer's at token {i} of the batch row (expected "
            f"{ids[j] if j < len(ids) else 'the end'}, got {row[i] if i < length else 'the end'}): the processor "
            "changes the text beyond expanding image/video placeholders, so the assistant tokens cannot be "
            "located exactly"
        )
    return mask


class ConversationCollator:
    """A batch of ``Example``s -> the processor's inputs + ``labels`` (assistant tokens only), right padded.

    With ``categories`` (category name -> id) the batch also carries ``category_ids`` (B, T): each token gets
    its record's category id (-1 for padding and records without one), which a moevl MoE model reads for
    the mutual information between expert choice and category (``moevl.hf.routing_statistics``).
    """

    def __init__(
        self, processor: Any, *, ignore_index: int = IGNORE_INDEX, categories: dict[str, int] | None = None
    ) -> None:
        self.processor = processor
        self.tokenizer = tokenizer_of(processor)
        self.ignore_index = ignore_index
        self.vision = set(vision_token_ids(processor))
        self.categories = categories

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        texts = [e.text for e in examples]
        images = [[ref.open() for ref in e.images] for e in examples]
        batch = _process(self.processor, texts, images, "right")
        ids, attention = batch["input_ids"], batch["attention_mask"]
        labels = torch.full_like(ids, self.ignore_index)
        plain = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        lengths = attention.sum(1).tolist()
        for b, e in enumerate(examples):
            row = ids[b].tolist()
            mask = label_mask(
                row,
                lengths[b],
                e.text,
                plain["input_ids"][b],
                plain["offset_mapping"][b],
                e.spans,
                self.vision,
            )
            keep = torch.tensor(mask, dtype=torch.bool)
            labels[b, keep] = ids[b, keep]
        batch["labels"] = labels
        if self.categories is not None:
            ids_of = torch.tensor([self.categories.get(e.category, -1) for e in examples])  # (B,)
            batch["category_ids"] = torch.where(attention.bool(), ids_of[:, None], -1)
        return batch


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

    def __call__(self, records: list[Record]) -> GenerationBatch:
        texts, images, prompts = [], [], []
        for r in records:
            messages = prompt_messages(r)
            n_images = sum(1 for m in messages for p in m["content"] if p["type"] == "image")
            texts.append(self.render(messages, generation_prompt=True))
            images.append([ref.open() for ref in r.images[:n_images]])
            last_user = messages[-1]
            prompts.append("".join(p["text"] for p in last_user["content"] if p["type"] == "text").strip())
        inputs = _process(self.processor, texts, images, "left")
        return GenerationBatch(
            inputs=inputs,
            ids=[r.id for r in records],
            categories=[r.category for r in records],
            prompts=prompts,
            answers=[last_assistant_text(r) for r in records],
        )
