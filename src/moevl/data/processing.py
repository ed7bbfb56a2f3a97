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
  A prefix-LM processor (PaliGemma's, which takes the answer as a ``suffix``) gets ``token_type_ids`` 0 on the
  prompt (attended both ways) and 1 from the first learnt token on (causal), as its own suffix call makes them.
* ``moevl.data.generation.GenerationCollator`` builds left-padded generation inputs: the conversation up to its last assistant
  turn with the generation prompt, and the reference answers.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from moevl import vision_tokens
from moevl.atomic import append_line
from moevl.checks import check, check_choice
from moevl.data.conversations import DataError, Record, open_images
from moevl.data.labels import expand_placeholders, label_mask, label_mask_by_offsets

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
    ids = set(vision_tokens.vision_token_ids(config)) if config is not None else set()
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
    images: tuple[Any, ...]  # ImageRef (in ``examples``), decoded images (what indexing the dataset returns)
    category: str | None
    source: str = ""  # the file and line or index of the record


class ConversationDataset(Dataset):
    """Rendered records, with over-long ones dropped and counted (``dropped_too_long``). Indexing it decodes the
    example's images (``fetch``).

    A record whose images fail to decode there (``read_records`` checks headers and whole files, not every
    byte) raises ``DataError`` naming it; with ``on_bad="skip"`` it is skipped instead: ``report`` gets one line
    naming it, ``skip_log`` (a JSONL file) a row ``{"id", "source", "reason"}``, and the next record takes its
    place in the batch. ``skip_log`` is the count that holds across DataLoader workers and ranks; ``bad`` holds
    only this process's.
    """

    def __init__(
        self,
        records: list[Record],
        processor: Any,
        *,
        max_length: int | None = None,
        chat_template: str | None = None,
        progress: bool = True,
        on_bad: Literal["error", "skip"] = "error",
        skip_log: str | os.PathLike | None = None,
        report: Callable[[str], None] | None = print,
    ) -> None:
        from tqdm.auto import tqdm

        check(max_length is None or max_length >= 1, "max_length", "None or an integer >= 1", max_length)
        check_choice("on_bad", on_bad, ("error", "skip"))
        self.on_bad = on_bad
        self.skip_log = None if skip_log is None else Path(skip_log)
        self.report = report
        self.bad: set[int] = set()  # indices whose images did not decode in this process
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
                self.examples.append(Example(r.id, text, tuple(spans), r.images, r.category, r.source))
                self.lengths.append(n)
            bar.update(len(part))
        bar.close()

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.fetch(i)[1]

    def fetch(self, i: int) -> tuple[int, Example]:
        """``(j, example j with its images decoded)``: j is ``i``, or with ``on_bad="skip"``, when record ``i``'s
        images do not decode, the next record whose images do (class doc)."""
        n = len(self.examples)
        for j in (k % n for k in range(i, i + n)):
            if j in self.bad:
                continue
            e = self.examples[j]
            try:
                return j, dataclasses.replace(e, images=tuple(open_images(e.id, e.source, e.images)))
            except DataError as err:
                if self.on_bad == "error":
                    raise
                self._skip(j, err)
        raise DataError("no record left whose images decode: every one was skipped (data.skip_bad_records)")

    def _skip(self, j: int, err: DataError) -> None:
        self.bad.add(j)
        e = self.examples[j]
        if self.skip_log is not None:
            append_line(self.skip_log, json.dumps({"id": e.id, "source": e.source, "reason": str(err)}))
        if self.report is not None:
            self.report(f"skipped a bad record (data.skip_bad_records): {err}")


class ProcessorCall:
    """Calls a checkpoint's processor on a batch of rendered texts and their images (a list per sample).

    Images go to the processor grouped per sample (``[[img, img], [img], []]``), the layout Gemma 3, Idefics3
    and PaliGemma require and every other processor we know also takes; a processor that refuses the nested
    list is given the flat list instead, and keeps that layout (``nested``): the choice follows what the
    processor does, not a table of classes. The processor is asked for its placeholder replacements
    (``return_text_replacement_offsets``: the exact text it tokenized, ``label_mask_by_offsets``) unless it
    cannot return them (Idefics3's cannot put them beside tensors for some batches: ``offsets`` turns False).
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = tokenizer_of(processor)
        self.nested: bool | None = None  # None: not known yet
        self.offsets: bool | None = None  # False: the processor failed when asked for them
        # a prefix-LM processor (PaliGemma's) takes the answer as a ``suffix`` and marks it in token_type_ids
        self.prefix_lm = "suffix" in inspect.signature(processor.__call__).parameters

    def __call__(self, texts: list[str], images: list[list], *, padding_side: str = "right") -> dict:
        """The processor's batch (tensors), plus ``text_replacement_offsets`` when the processor gives them
        (per sample: dicts with ``span``, ``new_span``, ``text``, ``replacement``). ``labels`` a processor makes
        (PaliGemma's) are dropped: moevl builds its own."""
        has_images = any(images)
        layouts = [self.nested] if self.nested is not None or not has_images else [True, False]
        asks = [False] if self.offsets is False else [True, False]
        old = self.tokenizer.padding_side
        self.tokenizer.padding_side = padding_side
        first_error: Exception | None = None
        try:
            for nested in layouts:
                for ask in asks:
                    kwargs: dict[str, Any] = {
                        "text": list(texts),
                        "padding": True,
                        "return_tensors": "pt",
                        "add_special_tokens": False,
                    }
                    if ask:
                        kwargs["return_text_replacement_offsets"] = True
                    if has_images:
                        flat = [img for row in images for img in row]
                        kwargs["images"] = [list(row) for row in images] if nested else flat
                    try:
                        out = self.processor(**kwargs)
                    except (ValueError, TypeError, IndexError) as e:
                        first_error = first_error or e
                        continue
                    if has_images:
                        self.nested = nested
                    if not ask:
                        self.offsets = False
                    return self._clean(out)
            assert first_error is not None
            raise first_error
        finally:
            self.tokenizer.padding_side = old

    @staticmethod
    def _clean(out: Any) -> dict:
        out = dict(out)
        out.pop("labels", None)
        if not isinstance(out.get("text_replacement_offsets"), list):
            out.pop("text_replacement_offsets", None)
        return out


def _is_special_edge(tokenizer: Any, text: str) -> bool:
    """Whether ``text`` starts and ends with an added (special) token: then the tokens around it are the same
    whatever it is replaced with."""
    added = [t for t in tokenizer.get_added_vocab() if t]
    return any(text.startswith(t) for t in added) and any(text.endswith(t) for t in added)


FAST_CHECKS = 3  # distinct image sizes run through the processor before its closed-form count is trusted


class _TokenCounter:
    """Token length of a rendered record as the processor makes it, without decoding the record's images.

    The processor itself is run once per distinct image size on a blank image of that size (cached): the
    replacement it writes for the placeholder (``ProcessorCall``) is the record's expansion. Where that
    replacement starts and ends with special tokens the count is additive (text tokens + replacement tokens -
    placeholder tokens); otherwise (Gemma 3's ``\n\n<start_of_image>...<end_of_image>\n\n`` can merge with the
    newlines around it) the record's expanded text is tokenized. Tokens the processor writes once per sample
    beside its replacement (PaliGemma's BOS after the images and "\n" after the text) are counted once per record
    with images. A processor that gives no replacements is counted additively from the length of its row for
    the placeholder alone. A record with several images is counted from one processor run on blank images of
    its sizes together (cached per tuple of sizes).
    """

    def __init__(self, processor: Any, call: ProcessorCall | None = None) -> None:
        self.processor = processor
        self.tokenizer = tokenizer_of(processor)
        self.call = call or ProcessorCall(processor)
        self.placeholder = getattr(processor, "image_token", None) or "<image>"
        self.fast_ok: bool | None = None  # None: not checked yet (``_fast_agrees``)
        self.per_sample = 0  # tokens the processor writes once per sample with images, beside the images
        self.together: dict[tuple[tuple[int, int], ...], int] = {}  # images of a sample -> extra tokens
        self.per_size: dict[
            tuple[int, int], tuple[int, str | None]
        ] = {}  # (w, h) -> (extra tokens, replacement)

    def _tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _probe(self, w: int, h: int) -> tuple[int, str | None]:
        if (w, h) not in self.per_size and self._fast_agrees():
            self.per_size[(w, h)] = (self._fast(w, h), None)
        if (w, h) not in self.per_size:
            from PIL import Image

            out = self.call([self.placeholder], [[Image.new("RGB", (w, h))]])
            row = int(out["attention_mask"][0].sum())
            replacement, per_sample = None, 0
            offsets = out.get("text_replacement_offsets")
            if offsets and len(offsets[0]) == 1 and offsets[0][0].get("span") == (0, len(self.placeholder)):
                candidate = offsets[0][0]["replacement"]
                n = self._tokens(candidate)
                if n == row:  # the processor tokenized exactly the replacement
                    replacement = candidate
                elif n < row:  # and wrote tokens of its own once a sample (PaliGemma's BOS and "\n")
                    per_sample = row - n
            self.per_sample = max(self.per_sample, per_sample)
            extra = row - per_sample - self._tokens(self.placeholder)
            self.per_size[(w, h)] = (extra, replacement)
        return self.per_size[(w, h)]

    def _fast(self, w: int, h: int) -> int | None:
        """Extra tokens of an image from the processor's closed-form count (``_get_num_multimodal_tokens``),
        or None where it has none."""
        fn = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if fn is None:
            return None
        try:
            n = fn(image_sizes=[(h, w)])["num_image_tokens"][0]
        except (KeyError, TypeError, NotImplementedError, AttributeError, ValueError):
            return None
        return int(n) - self._tokens(self.placeholder)

    def _fast_agrees(self) -> bool:
        """Whether the closed-form count may replace running the processor: it agreed with the processor's own
        expansion on the first ``FAST_CHECKS`` distinct image sizes, each additive (not Gemma 3's kind). A
        dataset with many image sizes (LLaVA-665k) then needs a handful of processor runs, not one a size."""
        if self.fast_ok is None and len(self.per_size) >= FAST_CHECKS:
            self.fast_ok = all(
                self._fast(w, h) == extra and (r is None or _is_special_edge(self.tokenizer, r))
                for (w, h), (extra, r) in self.per_size.items()
            )
        return bool(self.fast_ok)

    def _together(self, sizes: tuple[tuple[int, int], ...]) -> int:
        """Extra tokens of a sample holding images of ``sizes`` together: the processor run on them (cached).
        A processor may expand an image differently beside others (LLaVA-OneVision drops the high-resolution
        crops of an image that is not alone)."""
        if sizes not in self.together:
            from PIL import Image

            text = self.placeholder * len(sizes)
            out = self.call([text], [[Image.new("RGB", size) for size in sizes]])
            self.together[sizes] = int(out["attention_mask"][0].sum()) - self._tokens(text)
        return self.together[sizes]

    def count(self, texts: list[str], images: list[tuple]) -> list[int]:
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        out = []
        for text, row, refs in zip(texts, ids, images, strict=True):
            probes = [self._probe(*ref.size()) for ref in refs]
            if all(r is None or _is_special_edge(self.tokenizer, r) for _, r in probes) or (
                text.count(self.placeholder) != len(refs)
            ):
                if len(refs) > 1:
                    extra = self._together(tuple(ref.size() for ref in refs))
                else:
                    extra = sum(extra for extra, _ in probes) + (self.per_sample if refs else 0)
                out.append(len(row) + extra)
                continue
            out.append(self._tokens(expand_placeholders(text, self.placeholder, [r for _, r in probes])))
        return out


class ConversationCollator:
    """A batch of ``Example``s -> the processor's inputs + ``labels`` (assistant tokens only), right padded.

    With ``categories`` (category name -> id) the batch also carries ``category_ids`` (B, T): each token gets
    its record's category id (-1 for padding and records without one), which a moevl MoE model reads for
    the mutual information between expert choice and category (``moevl.training.routing_statistics``).
    """

    def __init__(
        self, processor: Any, *, ignore_index: int = IGNORE_INDEX, categories: dict[str, int] | None = None
    ) -> None:
        self.processor = processor
        self.tokenizer = tokenizer_of(processor)
        self.ignore_index = ignore_index
        self.vision = set(vision_token_ids(processor))
        self.categories = categories
        self.call = ProcessorCall(processor)

    def _blank(self, tokens: list[int]) -> bool:
        """Whether ``tokens`` (what a processor wrote after the text) are whitespace only."""
        return not self.tokenizer.decode(tokens, skip_special_tokens=False).strip()

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        texts = [e.text for e in examples]
        images = [open_images(e.id, e.source, e.images) for e in examples]
        batch = self.call(texts, images, padding_side="right")
        replacements = batch.pop("text_replacement_offsets", None)
        ids, attention = batch["input_ids"], batch["attention_mask"]
        labels = torch.full_like(ids, self.ignore_index)
        lengths = attention.sum(1).tolist()
        plain = None
        for b, e in enumerate(examples):
            row = ids[b].tolist()
            mask = None
            if replacements is not None:
                mask = label_mask_by_offsets(
                    row, lengths[b], e.text, replacements[b], e.spans, self.tokenizer
                )
            if mask is None:
                if plain is None:
                    plain = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
                try:
                    mask = label_mask(
                        row,
                        lengths[b],
                        e.text,
                        plain["input_ids"][b],
                        plain["offset_mapping"][b],
                        e.spans,
                        self.vision,
                        self._blank,
                    )
                except ValueError as err:
                    raise DataError(f"record {e.id!r}: {err}") from None
            keep = torch.tensor(mask, dtype=torch.bool)
            labels[b, keep] = ids[b, keep]
        if self.call.prefix_lm and "token_type_ids" in batch:
            # the processor marks no answer in a text it got whole: all 0 would let the prompt and the
            # answer attend to each other both ways. The prefix is what comes before the first learnt token.
            first = torch.where(labels != self.ignore_index, torch.arange(ids.shape[1]), ids.shape[1]).amin(1)
            batch["token_type_ids"] = (torch.arange(ids.shape[1]) >= first[:, None]).to(ids.dtype)
        batch["labels"] = labels
        if self.categories is not None:
            ids_of = torch.tensor([self.categories.get(e.category, -1) for e in examples])  # (B,)
            batch["category_ids"] = torch.where(attention.bool(), ids_of[:, None], -1)
        return batch
