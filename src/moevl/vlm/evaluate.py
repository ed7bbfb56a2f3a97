"""Evaluation by generation: batched greedy decoding with the model's chat template, VQAv2-normalised
exact match, per-category accuracy, predictions written as JSONL.

Each record is asked its conversation up to the last assistant turn; the last assistant turn is the
reference answer. Records with a ``category`` field are also scored per category.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moevl.atomic import atomic_write_json, atomic_write_jsonl
from moevl.checks import check
from moevl.vlm.answers import normalize_answer, vqa_accuracy
from moevl.vlm.config import RunConfig
from moevl.vlm.io import OutputDirError, check_writable_target


@dataclass
class Prediction:
    id: str
    category: str | None
    prompt: str
    answer: str
    prediction: str
    correct: float


@dataclass
class EvalResult:
    """Accuracies in [0, 1]; ``per_category`` only for records that have a category."""

    overall: float
    count: int
    per_category: dict[str, float] = field(default_factory=dict)
    category_count: dict[str, int] = field(default_factory=dict)
    predictions: list[Prediction] = field(default_factory=list)

    def to_dict(self, with_predictions: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_predictions:
            d.pop("predictions")
        return d


def majority_answers(records: list) -> dict[str, str]:
    """The most common reference answer of each category (normalised): the "always answer X" baseline."""
    from moevl.data.conversations import last_assistant_text

    by_cat: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        if r.category is not None:
            by_cat[r.category][normalize_answer(last_assistant_text(r))] += 1
    return {c: counts.most_common(1)[0][0] for c, counts in by_cat.items()}


def chance_accuracy(train_records: list, eval_records: list) -> dict[str, float]:
    """Per category, the accuracy of always giving the category's most common *training* answer."""
    from moevl.data.conversations import last_assistant_text

    common = majority_answers(train_records)
    hits, totals = Counter(), Counter()
    for r in eval_records:
        if r.category in common:
            totals[r.category] += 1
            hits[r.category] += normalize_answer(last_assistant_text(r)) == common[r.category]
    return {c: hits[c] / totals[c] for c in totals}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    processor: Any,
    records: list,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    progress: bool = True,
) -> EvalResult:
    """Greedy answers of ``model`` to ``records`` (``moevl.data.Record``), scored against the last assistant
    turn. Generation never emits an image or video placeholder and stops at the end-of-sequence token or the
    chat template's end-of-turn token (``moevl.data.processing.turn_end``)."""
    from moevl.data.generation import GenerationCollator
    from moevl.data.processing import vision_token_ids

    check(batch_size >= 1, "batch_size", "an integer >= 1", batch_size)
    check(max_new_tokens >= 1, "max_new_tokens", "an integer >= 1", max_new_tokens)
    collate = GenerationCollator(processor)
    tokenizer = getattr(processor, "tokenizer", processor)
    suppress = vision_token_ids(processor, model.config)
    stop = stop_token_ids(
        model.generation_config.eos_token_id, tokenizer.eos_token_id, collate.turn_end.token_ids
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predictions: list[Prediction] = []
    bar = tqdm(total=len(records), desc="evaluating", unit="record", disable=not progress)
    try:
        for start in range(0, len(records), batch_size):
            batch = collate(records[start : start + batch_size])
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.inputs.items()}
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                suppress_tokens=suppress or None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop or None,
            )
            new_tokens = out[:, inputs["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i, text in enumerate(texts):
                text = text.strip()
                predictions.append(
                    Prediction(
                        id=batch.ids[i],
                        category=batch.categories[i],
                        prompt=batch.prompts[i],
                        answer=batch.answers[i],
                        prediction=text,
                        correct=vqa_accuracy(text, [batch.answers[i]]),
                    )
                )
            bar.update(len(texts))
    finally:
        bar.close()
        model.train(was_training)
    hits: dict[str, float] = defaultdict(float)
    totals: dict[str, int] = defaultdict(int)
    for p in predictions:
        if p.category is not None:
            hits[p.category] += p.correct
            totals[p.category] += 1
    n = len(predictions)
    return EvalResult(
        overall=sum(p.correct for p in predictions) / max(1, n),
        count=n,
        per_category={c: hits[c] / totals[c] for c in sorted(totals)},
        category_count={c: totals[c] for c in sorted(totals)},
        predictions=predictions,
    )


def stop_token_ids(*sources: int | list[int] | tuple[int, ...] | None) -> list[int]:
    """The token ids generation stops at: every id of every source (an id, a list of ids or None), once."""
    ids: list[int] = []
    for source in sources:
        for i in [source] if isinstance(source, int) else source or ():
            if i not in ids:
                ids.append(int(i))
    return ids


def predictions_path(results_path: str | os.PathLike) -> Path:
    """``results.json`` -> ``results.predictions.jsonl`` beside it."""
    p = Path(results_path)
    return p.with_name(f"{p.stem}.predictions.jsonl")


def run_eval(
    cfg: RunConfig,
    *,
    model: str | os.PathLike,
    data: str | os.PathLike | None = None,
    image_folder: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> EvalResult:
    """``moevl eval``: load, read, generate, score; results JSON and predictions JSONL written atomically to
    ``out`` (checked for writability before any work)."""
    from moevl.data import DataError, read_records
    from moevl.vlm.io import check_model_dir, load_model

    data = data if data is not None else cfg.eval.data
    if data is None:
        raise DataError("no evaluation data: give --data or `eval.data` in the recipe")
    model_dir = check_model_dir(model)
    if out is not None:
        out = Path(out)
        if out.is_dir():
            raise OutputDirError(f"--out must be a JSON file path, got {str(out)!r} which is a directory")
        check_writable_target(out.parent)
    records = read_records(data, image_folder=image_folder or cfg.data.image_folder, on_bad="error")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    net, processor = load_model(model_dir)
    result = evaluate(
        net,
        processor,
        records.records,
        batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
        progress=progress,
    )
    if out is not None:
        payload = {"model": str(model_dir), "data": str(data), **result.to_dict()}
        atomic_write_json(out, payload)
        atomic_write_jsonl(predictions_path(out), [asdict(p) for p in result.predictions])
    return result
