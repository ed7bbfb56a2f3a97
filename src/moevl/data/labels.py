"""The labels of a batch row: which tokens are the assistant's (learnt), found from the tokenizer's character
offsets on the unexpanded text aligned with the processor's row, where a run of image (or video) tokens stands
for one placeholder (``moevl.data.processing.ConversationCollator``); a mismatch raises, never guesses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def expand_placeholders(text: str, placeholder: str, replacements: list[str]) -> str:
    """``text`` with its i-th ``placeholder`` replaced by ``replacements[i]`` (as many as there are)."""
    pieces = text.split(placeholder)
    return pieces[0] + "".join(r + p for r, p in zip(replacements, pieces[1:], strict=True))


def _learnt(text: str, a: int, b: int, spans: tuple[tuple[int, int], ...]) -> bool:
    """Whether the characters ``text[a:b]`` share a non-whitespace character with an assistant span."""
    return any(text[max(a, s) : min(b, e)].strip() for s, e in spans if max(a, s) < min(b, e))


def label_mask_by_offsets(
    row: list[int],
    length: int,
    text: str,
    replacements: list[dict],
    spans: tuple[tuple[int, int], ...],
    tokenizer: Any,
) -> list[bool] | None:
    """The assistant-token mask of a processor row from the processor's own placeholder replacements: the text
    it tokenized is ``text`` with each replacement in place; if the tokenizer gives exactly the row's tokens for
    it, each token's characters are mapped back to ``text`` (tokens touching a replacement are the
    placeholder's, never learnt). None when the replacements do not describe the row (the processor changed
    the text otherwise, e.g. PaliGemma's inserted BOS)."""
    pieces, start, moved = [], 0, []  # moved: (new_start, new_end, shift after it)
    shift = 0
    for r in sorted(replacements, key=lambda r: r["span"][0]):
        a, b = r["span"]
        if a < start or text[a:b] != r["text"]:
            return None
        pieces += [text[start:a], r["replacement"]]
        new_start = a + shift
        shift += len(r["replacement"]) - (b - a)
        moved.append((new_start, new_start + len(r["replacement"]), shift))
        start = b
    expanded = "".join(pieces) + text[start:]
    enc = tokenizer(expanded, add_special_tokens=False, return_offsets_mapping=True)
    if enc["input_ids"] != row[:length]:
        return None
    mask = [False] * len(row)
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        back = 0
        for new_start, new_end, after in moved:
            if a < new_end and b > new_start:  # touches the replacement: the placeholder's
                break
            if new_end <= a:
                back = after
        else:
            mask[i] = _learnt(text, a - back, b - back, spans)
    return mask


def label_mask(
    row: list[int],
    length: int,
    text: str,
    ids: list[int],
    offsets: list[tuple[int, int]],
    spans: tuple[tuple[int, int], ...],
    vision: set[int],
    blank: Callable[[list[int]], bool] = lambda tokens: not tokens,
) -> list[bool]:
    """Which of the first ``length`` tokens of a processor row are assistant tokens, from the unexpanded
    ``text``'s token ``ids`` and character ``offsets``: the fallback of ``label_mask_by_offsets``.

    Between placeholders (runs of ``vision`` tokens in ``ids``) the text must tokenize identically in the row;
    whatever the processor writes where a placeholder stood (image tokens, Idefics3's
    ``<fake_token_around_image>`` and ``<row_i_col_j>``, PaliGemma's BOS, ...) belongs to the placeholder: each
    text segment after a placeholder is found in the row at its first exact match. The last one ends the row,
    or is followed only by tokens ``blank`` accepts (PaliGemma's processor writes a "\n" after the text:
    ``blank`` of the collator accepts whitespace), never learnt.

    A token is learnt when it shares a non-whitespace character with an assistant span: a token that carries
    the space before a reply ("▁three" / "Ġthree" after "ASSISTANT:") is learnt whether or not its offsets
    include that space, and a newline after the end-of-turn marker is not.
    """
    mask = [False] * len(row)
    i = j = 0
    while i < length and j < len(ids):
        if ids[j] in vision:
            while j < len(ids) and ids[j] in vision:
                j += 1
            k = j
            while k < len(ids) and ids[k] not in vision:
                k += 1
            segment = ids[j:k]
            last = k == len(ids)  # the last segment ends the row, or only blank tokens follow it
            found = False
            for p in range(i, length - len(segment) + 1):
                if row[p : p + len(segment)] == segment and (
                    not last or blank(row[p + len(segment) : length])
                ):
                    found = True
                    break
            if not found or p == i:  # a placeholder the processor did not expand
                break
            i = p
            continue
        if row[i] != ids[j]:
            break
        mask[i] = _learnt(text, *offsets[j], spans)
        i += 1
        j += 1
    if j == len(ids) and blank(row[i:length]):
        i = length
    if i != length or j != len(ids):
        raise ValueError(
            f"the processor's tokens differ from the tokenizer's at token {i} of the batch row (expected "
            f"{ids[j] if j < len(ids) else 'the end'}, got {row[i] if i < length else 'the end'}): the processor "
            "changes the text beyond expanding image/video placeholders, so the assistant tokens cannot be "
            "located exactly"
        )
    return mask
