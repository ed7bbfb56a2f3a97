"""Training loops (detector alone, or distilled from a teacher) and checkpoints.

The distillation methods compared (same student, same teacher, same schedule):

* ``none`` — GFL loss only.
* ``kl``   — + softmax-KL distillation of the class scores over all valid anchors ([KD]).
* ``ld``   — + LD, KL distillation of the box-side distributions on positives ([LD]).
* ``bckd`` — + BCKD: ``1.0 * L_cls + 4.0 * L_loc`` ([BCKD], RESEARCH.md §3).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from moevl.atomic import atomic_write_json, atomic_write_to
from moevl.checks import check_choice, check_float, check_int, check_seed
from moevl.detection.data import DigitScenes, assign_targets
from moevl.detection.losses import (
    bckd_classification_loss,
    bckd_localization_loss,
    kl_distillation_loss,
    localization_distillation_loss,
)
from moevl.detection.model import (
    Anchors,
    DetectorConfig,
    DetectorOutput,
    GFLDetector,
    decode_boxes,
    detection_loss,
    make_anchors,
)
from moevl.detection.names import DISTILL_METHODS, DistillMethod

__all__ = [
    "DISTILL_METHODS",
    "DistillConfig",
    "TrainConfig",
    "TrainResult",
    "check_teacher",
    "checkpoint_sidecar",
    "distillation_loss",
    "load_checkpoint",
    "save_checkpoint",
    "teacher_outputs",
    "train_detector",
]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("steps", self.steps, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_float("lr", self.lr, minimum=0.0, exclusive_minimum=True)
        check_float("weight_decay", self.weight_decay, minimum=0.0)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_seed("seed", self.seed)


@dataclass(frozen=True)
class DistillConfig:
    """Which distillation term to add and its weights (defaults from each paper)."""

    method: DistillMethod = "bckd"
    bckd_cls_weight: float = 1.0  # RESEARCH.md §3
    bckd_loc_weight: float = 4.0  # RESEARCH.md §3
    bckd_iou: Literal["iou", "giou"] = "giou"
    kl_weight: float = 1.0
    kl_temperature: float = 2.0
    ld_weight: float = 0.25  # official LD config; also the best on the validation split of 0.25 / 1 / 4
    ld_temperature: float = 10.0  # LD paper

    def __post_init__(self) -> None:
        check_choice("method", self.method, DISTILL_METHODS)
        check_choice("bckd_iou", self.bckd_iou, ("iou", "giou"))
        for name in ("bckd_cls_weight", "bckd_loc_weight", "kl_weight", "ld_weight"):
            check_float(name, getattr(self, name), minimum=0.0)
        for name in ("kl_temperature", "ld_temperature"):
            check_float(name, getattr(self, name), minimum=0.0, exclusive_minimum=True)


def check_teacher(teacher: DetectorConfig, student: DetectorConfig) -> None:
    """``ValueError`` unless ``teacher``'s outputs line up with ``student``'s anchor for anchor: same
    levels (strides), classes and distance bins (the distillation losses compare them elementwise)."""
    got = (teacher.strides, teacher.num_classes, teacher.reg_max)
    expected = (student.strides, student.num_classes, student.reg_max)
    if got != expected:
        raise ValueError(
            f"teacher must be a detector with the student's strides, num_classes and reg_max {expected}, got {got}"
        )


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    seconds: float


def distillation_loss(
    student: DetectorOutput,
    teacher: DetectorOutput,
    labels: Tensor,
    anchors: Anchors,
    config: DistillConfig,
) -> Tensor:
    """The distillation term of ``config.method`` for one batch (weights included).

    Args:
        student, teacher: outputs for the same ``B`` images; teacher outputs are constants.
        labels: ``(B, A)`` assigned labels (``C`` background, ``-1`` ignored); sets the valid mask
            and ``num_pos``, the normaliser of every term.
    """
    if config.method == "none":
        return student.cls_logits.new_zeros(())
    num_classes = student.cls_logits.shape[-1]
    flat_labels = labels.flatten()
    valid = (flat_labels >= 0).to(student.cls_logits.dtype)
    pos = (flat_labels >= 0) & (flat_labels < num_classes)
    num_pos = float(max(int(pos.sum()), 1))
    s_cls, t_cls = student.cls_logits.flatten(0, 1), teacher.cls_logits.flatten(0, 1).detach()
    if config.method == "kl":
        return config.kl_weight * kl_distillation_loss(
            s_cls, t_cls, temperature=config.kl_temperature, weight=valid, avg_factor=num_pos
        )
    if config.method == "ld":
        # LD on the main distillation region (positives), weighted by the student's max score as the
        # GFL box losses are; normalised by the sum of those weights.
        pos_idx = pos.nonzero(as_tuple=True)[0]
        weights = s_cls[pos_idx].detach().sigmoid().max(dim=1).values
        return config.ld_weight * localization_distillation_loss(
            student.reg_logits.flatten(0, 1)[pos_idx],
            teacher.reg_logits.flatten(0, 1)[pos_idx].detach(),
            temperature=config.ld_temperature,
            weight=weights,
            avg_factor=weights.sum().clamp(min=1e-6),
        )
    # bckd: every valid anchor, both terms normalised by the number of positives.
    s_boxes = decode_boxes(student.reg_logits, anchors).flatten(0, 1)
    with torch.no_grad():
        t_boxes = decode_boxes(teacher.reg_logits, anchors).flatten(0, 1)
    loss_cls = bckd_classification_loss(s_cls, t_cls, weight=valid, avg_factor=num_pos)
    loss_loc = bckd_localization_loss(
        s_cls, t_cls, s_boxes, t_boxes, weight=valid, avg_factor=num_pos, iou=config.bckd_iou
    )
    return config.bckd_cls_weight * loss_cls + config.bckd_loc_weight * loss_loc


@torch.no_grad()
def teacher_outputs(teacher: GFLDetector, images: Tensor, *, batch_size: int = 128) -> DetectorOutput:
    """Teacher outputs for every training image, computed once in eval mode.

    NOTE: exact, not an approximation — the training data has no augmentation and the teacher is
    frozen in eval mode, so its output on an image never changes during distillation.
    """
    teacher.eval()
    cls, reg = [], []
    for start in range(0, images.shape[0], batch_size):
        out = teacher(images[start : start + batch_size])
        cls.append(out.cls_logits)
        reg.append(out.reg_logits)
    return DetectorOutput(torch.cat(cls), torch.cat(reg))


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * progress))


def train_detector(
    model: GFLDetector,
    scenes: DigitScenes,
    *,
    config: TrainConfig,
    distill: DistillConfig | None = None,
    teacher: DetectorOutput | None = None,
    progress: bool = True,
    description: str = "train",
) -> TrainResult:
    """Train ``model`` on ``scenes`` (AdamW, warm-up + cosine), optionally distilling from ``teacher``.

    Args:
        model: the detector to train (updated in place).
        scenes: training scenes.
        config: schedule.
        distill: distillation method; ``None`` or method ``"none"`` trains the detector alone.
        teacher: precomputed teacher outputs for all of ``scenes`` (see :func:`teacher_outputs`);
            required when distilling.
    """
    distill = distill or DistillConfig(method="none")
    if distill.method != "none":
        if teacher is None:
            raise ValueError(
                f"teacher must be precomputed teacher outputs for method {distill.method!r}, got None"
            )
        if teacher.cls_logits.shape[0] != len(scenes):
            raise ValueError(
                f"teacher must be the outputs of {len(scenes)} scenes, got {teacher.cls_logits.shape[0]}"
            )
    anchors = make_anchors(model.config, scenes.image_size)
    labels, box_targets = assign_targets(scenes, anchors, num_classes=model.config.num_classes)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    model.train()
    history: list[dict[str, float]] = []
    start_time = time.perf_counter()
    order = torch.randperm(len(scenes), generator=generator)
    cursor = 0
    bar = tqdm(range(config.steps), desc=description, disable=not progress, leave=False)
    for step in bar:
        if cursor + config.batch_size > len(scenes):
            order, cursor = torch.randperm(len(scenes), generator=generator), 0
        idx = order[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        output = model(scenes.images[idx])
        losses = detection_loss(output, labels[idx], box_targets[idx], anchors, reg_max=model.config.reg_max)
        loss_distill = output.cls_logits.new_zeros(())
        if distill.method != "none":
            assert teacher is not None
            loss_distill = distillation_loss(
                output,
                DetectorOutput(teacher.cls_logits[idx], teacher.reg_logits[idx]),
                labels[idx],
                anchors,
                distill,
            )
        loss = losses.total + loss_distill
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        scheduler.step()
        record = {
            "step": step,
            "loss": float(loss.detach()),
            "cls": float(losses.cls.detach()),
            "bbox": float(losses.bbox.detach()),
            "dfl": float(losses.dfl.detach()),
            "distill": float(loss_distill.detach()),
        }
        history.append(record)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{record['loss']:.3f}", distill=f"{record['distill']:.3f}")
    return TrainResult(history, time.perf_counter() - start_time)


def save_checkpoint(path: str | os.PathLike, model: GFLDetector, *, extra: dict | None = None) -> Path:
    """Write ``model`` to ``path`` (safetensors, the config in its metadata) plus ``path.json``.

    Both files are written to a temporary file in the same folder and renamed, so a reader never
    sees a half-written checkpoint.
    """
    path = Path(path)
    info = {"detector_config": model.config.to_dict(), **(extra or {})}
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # The JSON sidecar first: the safetensors file (whose metadata is the source of truth) appears last.
    atomic_write_json(checkpoint_sidecar(path), info)
    atomic_write_to(path, lambda tmp: save_file(tensors, tmp, metadata={"moevl": json.dumps(info)}))
    return path


def checkpoint_sidecar(path: str | os.PathLike) -> Path:
    """The JSON file written beside a checkpoint (``model.safetensors`` -> ``model.safetensors.json``)."""
    path = Path(path)
    return path.with_suffix(path.suffix + ".json")


def load_checkpoint(path: str | os.PathLike) -> tuple[GFLDetector, dict]:
    """Load a checkpoint written by :func:`save_checkpoint`; returns the model (eval mode) and its info."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"checkpoint must be an existing .safetensors file written by moevl, got {str(path)!r}"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error type for corrupt files
        raise ValueError(
            f"checkpoint must be a readable .safetensors file, got {str(path)!r} ({error})"
        ) from error
    if "moevl" not in metadata:
        raise ValueError(
            f"checkpoint must hold moevl metadata (detector_config), got {str(path)!r} with keys {list(metadata)}"
        )
    try:
        info = json.loads(metadata["moevl"])
        model = GFLDetector(DetectorConfig.from_dict(info["detector_config"]))
        state = load_file(str(path))
        missing = sorted(set(model.state_dict()) - set(state))
        unexpected = sorted(set(state) - set(model.state_dict()))
        if missing or unexpected:
            raise ValueError(
                f"weights do not match its detector_config: {len(missing)} missing (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
            )
        model.load_state_dict(state)
    except (ValueError, TypeError, KeyError, RuntimeError) as error:  # corrupt metadata or weights
        reason = " ".join(str(error).split())  # one line: torch's shape errors span several
        raise ValueError(
            f"checkpoint must be a valid moevl detector checkpoint, got {str(path)!r} ({reason})"
        ) from None
    model.eval()
    return model, info
