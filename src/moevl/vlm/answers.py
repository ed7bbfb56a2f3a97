"""Answer normalisation and scoring as the VQAv2 evaluation does it (Antol et al. 2015; the official
``vqaEval.py``): lower case, punctuation, number words to digits, articles dropped, contractions restored.

``vqa_accuracy`` is the VQAv2 metric for records with several human answers (``min(1, matches / 3)``);
with one reference it is exact match after normalisation.
"""

from __future__ import annotations

import re

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# The official script's contraction table, written as "without apostrophe" -> "with apostrophe".
_CONTRACTIONS = {
    c.replace("'", ""): c
    for c in [
        "ain't",
        "aren't",
        "can't",
        "could've",
        "couldn't",
        "couldn't've",
        "didn't",
        "doesn't",
        "don't",
        "hadn't",
        "hadn't've",
        "hasn't",
        "haven't",
        "he'd",
        "he'd've",
        "he's",
        "how'd",
        "how'll",
        "how's",
        "I'd",
        "I'd've",
        "I'm",
        "I've",
        "isn't",
        "it'd",
        "it'd've",
        "it'll",
        "let's",
        "ma'am",
        "mightn't",
        "mightn't've",
        "might've",
        "mustn't",
        "must've",
        "needn't",
        "not've",
        "o'clock",
        "oughtn't",
        "'ow's'at",
        "shan't",
        "she'd've",
        "she's",
        "should've",
        "shouldn't",
        "shouldn't've",
        "somebody'd",
        "somebody'd've",
        "somebody'll",
        "somebody's",
        "someone'd",
        "someone'd've",
        "someone'll",
        "someone's",
        "something'd",
        "something'd've",
        "something'll",
        "that's",
        "there'd",
        "there'd've",
        "there're",
        "there's",
        "they'd",
        "they'd've",
        "they'll",
        "they're",
        "they've",
        "'twas",
        "wasn't",
        "we'd've",
        "we've",
        "weren't",
        "what'll",
        "what're",
        "what's",
        "what've",
        "when's",
        "where'd",
        "where's",
        "where've",
        "who'd",
        "who'd've",
        "who'll",
        "who's",
        "who've",
        "why'll",
        "why're",
        "why's",
        "won't",
        "would've",
        "wouldn't",
        "wouldn't've",
        "y'all",
        "y'all'll",
        "y'all'd've",
        "you'd",
        "you'd've",
        "you'll",
        "you're",
        "you've",
    ]
}
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # the official list: no apostrophe
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_IN_NUMBER = re.compile(r"(?<!\d)(\.)(?!\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATION:
        # As the official script: a mark next to a space (or a comma inside a number) is deleted,
        # any other is replaced by a space ("yes/no" -> "yes no").
        if (p + " " in text or " " + p in text) or _COMMA_BETWEEN_DIGITS.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_IN_NUMBER.sub("", out)


def normalize_answer(text: str) -> str:
    """The VQAv2 normal form of an answer: ``"Two dogs."`` -> ``"2 dogs"``, ``"the Cat"`` -> ``"cat"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _punctuation(text)
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 accuracy of one prediction: ``min(1, #matching human answers / 3)`` after normalisation;
    with a single reference answer this is exact match (1.0 or 0.0)."""
    if not answers:
        raise ValueError("answers must hold at least one reference answer, got none")
    pred = normalize_answer(prediction)
    matches = sum(normalize_answer(a) == pred for a in answers)
    if len(answers) == 1:
        return float(matches)
    return min(1.0, matches / 3.0)
