"""A word-level tokenizer (``tokenizers`` WordLevel, whitespace split) for the benchmark's vocabulary."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMAGE)


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Ids 0..4 are the special tokens (pad, unk, bos, eos, image), then ``words`` in the given order.

    Returned as a ``PreTrainedTokenizerFast`` so that ``save_pretrained``/``from_pretrained`` store it
    beside the model (``tokenizer.json``).
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        if w not in vocab:
            vocab[w] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[IMAGE],
    )


def encode_words(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Ids of ``text`` without special tokens; raises on a word outside the vocabulary."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.unk_token_id in ids:
        unknown = [w for w, i in zip(text.split(), ids, strict=True) if i == tokenizer.unk_token_id]
        raise ValueError(f"words outside the tokenizer's vocabulary: {unknown}")
    return ids
