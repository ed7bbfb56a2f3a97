"""A few real records through the collator and the model's forward before anything trains.

A family or a chat template moevl cannot handle then fails in seconds, with one line naming the record, the
family (``config.model_type``) and what differs, instead of at the first step of a long job (or silently, with
labels that miss the answer or a length count that lets over-long records through).
"""

from __future__ import annotations

from typing import Any

import torch

from moevl.data.conversations import DataError
from moevl.data.processing import ConversationCollator, ConversationDataset

#: Above this many parameters a model still on the CPU (the Trainer has not placed it yet, or ZeRO-3 / FSDP
#: will shard it) skips the dry run's forward; the collator's checks still run.
CPU_FORWARD_LIMIT = 2_000_000_000


def dry_run_indices(lengths: list[int], with_images: list[bool] | None = None) -> list[int]:
    """The records a dry run takes: the first two, the longest, and (given ``with_images``, whether each record
    has images) the first record with images and the first without, each once: a processor may take only one
    kind (PaliGemma's needs an image in every sample)."""
    picked = list(range(min(2, len(lengths))))
    if lengths:
        picked.append(max(range(len(lengths)), key=lengths.__getitem__))
    for kind in (True, False):
        first = next((i for i, has in enumerate(with_images or ()) if has == kind), None)
        if first is not None:
            picked.append(first)
    return list(dict.fromkeys(picked))


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def dry_run(
    model: torch.nn.Module,
    dataset: ConversationDataset,
    *,
    collator: ConversationCollator | None = None,
    indices: list[int] | None = None,
) -> None:
    """Collates each picked record (``dry_run_indices``) alone, then all of them as one batch, and runs the
    model's forward on each batch (``torch.no_grad``, every module in eval mode, restored after; the random
    state is kept; skipped for a model on the CPU above ``CPU_FORWARD_LIMIT`` parameters). ``DataError`` naming the record id, the model type and what differs when:

    * the collator or the forward raises;
    * the processor's row is not as long as the dataset counted (``data.max_length`` would be wrong);
    * no token of a record is learnt (the assistant replies were not found in the processor's tokens);
    * the loss is not finite.
    """
    if len(dataset) == 0:
        return
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None) or type(model).__name__
    collator = collator or ConversationCollator(dataset.processor)
    with_images = [bool(e.images) for e in dataset.examples]
    picked = dry_run_indices(dataset.lengths, with_images) if indices is None else indices
    # a record whose images do not decode is skipped (with on_bad="skip") for the next one: check that one
    fetched = dict(dataset.fetch(i) for i in picked)
    picked, examples = list(fetched), list(fetched.values())
    batches = [([i], [e]) for i, e in zip(picked, examples, strict=True)]
    if len(examples) > 1:
        batches.append((picked, examples))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for where, batch in batches:
                _check(model, collator, dataset, family, where, batch)
    finally:
        for module, training in modes:
            module.training = training


def _check(model, collator, dataset, family: str, where: list[int], batch: list) -> None:
    ids = ", ".join(repr(e.id) for e in batch)
    what = f"dry run ({family}): record{'s' if len(batch) > 1 else ''} {ids}"
    try:
        inputs = collator(batch)
    except Exception as e:
        raise DataError(f"{what}: the collator failed: {_one_line(e)}") from e
    rows = inputs["attention_mask"].sum(1).tolist()
    for i, e, n in zip(where, batch, rows, strict=True):
        if dataset.lengths[i] != n:
            raise DataError(
                f"dry run ({family}): record {e.id!r}: measured {dataset.lengths[i]} tokens but the processor made {n}: "
                "data.max_length would be applied to the wrong length"
            )
    learnt = (inputs["labels"] != -100).sum(1).tolist()
    for e, n in zip(batch, learnt, strict=True):
        if n == 0:
            raise DataError(
                f"dry run ({family}): record {e.id!r}: no token is learnt (its assistant replies were not found)"
            )
    device = _device_of(model)
    if device.type == "cpu" and sum(p.numel() for p in model.parameters()) > CPU_FORWARD_LIMIT:
        return  # the collator's checks only: a big model's forward on the CPU would take minutes
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    try:
        out = model(**inputs)
    except Exception as e:
        raise DataError(f"{what}: the model's forward failed: {_one_line(e)}") from e
    loss = getattr(out, "loss", None)
    if loss is None or not torch.isfinite(loss).all():
        raise DataError(
            f"{what}: the model's loss is {None if loss is None else float(loss)}, not a finite number"
        )


def _device_of(model: Any) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
