"""Exact-match accuracy of generated answers, per question family."""

from __future__ import annotations

from collections import Counter, defaultdict

import torch
from transformers import PreTrainedTokenizerFast

from moevl.data.dataset import Benchmark, VQADataset
from moevl.vlm.model import greedy_generate


def majority_baseline(bench: Benchmark, split: str) -> dict[str, float]:
    """Accuracy of always answering a family's most common *train* answer: the chance level."""
    common = {}
    for f in bench.families:
        answers = Counter(ex.question.answer for ex in bench.questions["train"] if ex.question.family == f)
        common[f] = answers.most_common(1)[0][0] if answers else ""
    hits, totals = Counter(), Counter()
    for ex in bench.questions[split]:
        totals[ex.question.family] += 1
        hits[ex.question.family] += ex.question.answer == common[ex.question.family]
    return {f: hits[f] / totals[f] for f in bench.families if totals[f]}


def evaluate(
    model: torch.nn.Module,
    bench: Benchmark,
    tokenizer: PreTrainedTokenizerFast,
    *,
    num_image_tokens: int,
    split: str = "test",
    batch_size: int = 256,
    max_new_tokens: int = 3,
    limit: int | None = None,
) -> dict:
    """{"accuracy": {family: acc}, "overall": acc, "count": {family: n}, "chance": {family: acc},
    "examples": first few (question, answer, prediction)}."""
    dataset = VQADataset(bench, tokenizer, split=split, num_image_tokens=num_image_tokens)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    was_training = model.training
    model.eval()
    hits: dict[str, int] = defaultdict(int)
    totals: dict[str, int] = defaultdict(int)
    examples = []
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        generated = greedy_generate(
            model,
            [it["prompt_ids"] for it in items],
            torch.stack([it["pixel_values"] for it in items]),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for it, ids in zip(items, generated, strict=True):
            prediction = tokenizer.decode(ids, skip_special_tokens=True).strip()
            totals[it["family"]] += 1
            hits[it["family"]] += prediction == it["answer"]
            if len(examples) < 10:
                question = tokenizer.decode(it["prompt_ids"], skip_special_tokens=True).strip()
                examples.append({"question": question, "answer": it["answer"], "prediction": prediction})
    model.train(was_training)
    families = [f for f in bench.families if totals[f]]
    return {
        "split": split,
        "accuracy": {f: hits[f] / totals[f] for f in families},
        "overall": sum(hits.values()) / max(1, sum(totals.values())),
        "count": {f: totals[f] for f in families},
        "chance": majority_baseline(bench, split),
        "examples": examples,
    }
