"""The comparison recipe: one teacher, then the same student trained alone and with KL, LD and BCKD,
over several seeds, evaluated with COCO metrics on held-out scenes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moevl.atomic import check_writable
from moevl.checks import check, check_choice, check_float, check_int, check_seed
from moevl.config import ConfigError, apply_overrides, build, read_yaml, to_plain
from moevl.detection.data import DigitScenes, make_digit_scenes
from moevl.detection.evaluation import evaluate_detector
from moevl.detection.model import DetectorConfig, GFLDetector
from moevl.detection.train import (
    DISTILL_METHODS,
    DistillConfig,
    DistillMethod,
    TrainConfig,
    check_teacher,
    load_checkpoint,
    save_checkpoint,
    teacher_outputs,
    train_detector,
)

__all__ = [
    "STUDENT",
    "TEACHER",
    "ComparisonResult",
    "DetectionCompareConfig",
    "DetectionDataConfig",
    "load_detection_config",
    "load_scenes",
    "run_comparison",
]

# Same code, different depth and width (about 20x parameters between them).
TEACHER = DetectorConfig(stage_widths=(32, 64, 128), stage_depth=2, neck_width=64, head_convs=2)
STUDENT = DetectorConfig(stage_widths=(8, 16, 32), stage_depth=1, neck_width=16, head_convs=1)
MIN_IMAGE_SIZE = 24  # the largest pasted digit (make_digit_scenes' max_digit_size) must fit


@dataclass(frozen=True)
class DetectionDataConfig:
    train_scenes: int = 2000
    test_scenes: int = 300
    image_size: int = 48

    def __post_init__(self) -> None:
        check_int("train_scenes", self.train_scenes, minimum=1)
        check_int("test_scenes", self.test_scenes, minimum=1)
        check_int("image_size", self.image_size, minimum=MIN_IMAGE_SIZE)


@dataclass(frozen=True)
class DetectionCompareConfig:
    """The comparison recipe (``configs/detection.yaml``); build it with :func:`load_detection_config`."""

    data: DetectionDataConfig = field(default_factory=DetectionDataConfig)
    teacher: DetectorConfig = TEACHER
    student: DetectorConfig = STUDENT
    teacher_steps: int = 1500
    student_steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[DistillMethod, ...] = DISTILL_METHODS  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for name in ("teacher_steps", "student_steps", "batch_size"):
            check_int(name, getattr(self, name), minimum=1)
        check_float("lr", self.lr, minimum=0.0, exclusive_minimum=True)
        for role in ("teacher", "student"):
            detector = getattr(self, role)
            # The digit scenes are grey images of ten classes.
            if (detector.num_classes, detector.in_channels) != (10, 1):
                raise ValueError(
                    f"{role} must have num_classes 10 and in_channels 1 (grey digit scenes), "
                    f"got {detector.num_classes} and {detector.in_channels}"
                )
        for name in ("seeds", "methods"):
            values = getattr(self, name)
            check(
                bool(values) and len(set(values)) == len(values),
                name,
                "a non-empty list without repeats",
                list(values),
            )
        for i, seed in enumerate(self.seeds):
            check_seed(f"seeds[{i}]", seed)
        for i, method in enumerate(self.methods):
            check_choice(f"methods[{i}]", method, DISTILL_METHODS)

    @classmethod
    def from_dict(cls, data: Any) -> DetectionCompareConfig:
        """Build from plain data (a parsed YAML file); missing keys keep the defaults. ``ConfigError``
        (a ``ValueError``) names the key of any unknown key, wrong type, non-finite or impossible value."""
        if data is None:  # an empty YAML file
            data = {}
        return build(cls, data)

    def to_dict(self) -> dict:
        return to_plain(self)


def load_detection_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> DetectionCompareConfig:
    """The recipe in ``path`` (YAML; the defaults when ``None``) with ``key.sub=value`` overrides."""
    data = read_yaml(path) if path is not None else {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping at the top level, got {type(data).__name__}")
    return DetectionCompareConfig.from_dict(apply_overrides(data, overrides))


def load_scenes(data: DetectionDataConfig) -> tuple[DigitScenes, DigitScenes]:
    """Training and test scenes (test scenes use digit images never seen in training)."""
    return (
        make_digit_scenes("train", data.train_scenes, image_size=data.image_size),
        make_digit_scenes("test", data.test_scenes, image_size=data.image_size),
    )


@dataclass
class ComparisonResult:
    config: DetectionCompareConfig
    teacher: dict
    runs: list[dict]  # one per (method, seed): metrics, seconds
    total_seconds: float
    models: dict[str, GFLDetector]  # "teacher" and "<method>" (first seed), for pictures
    test_scenes: DigitScenes


def run_comparison(
    config: DetectionCompareConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    teacher_checkpoint: str | Path | None = None,
    progress: bool = True,
    log=print,
) -> ComparisonResult:
    """Train the teacher once, then every (method, seed) student on the same data and schedule.

    For a given seed every method starts from the same student initialisation and sees the same
    batches, so method differences are paired. With ``teacher_checkpoint`` the teacher is loaded
    instead of trained (its recorded ``train_seconds`` is reported, and not counted in the total).
    """
    if checkpoint_dir is not None:
        check_writable(checkpoint_dir, directory=True, name="checkpoint_dir")  # before any training
    start = time.perf_counter()
    train, test = load_scenes(config.data)
    if teacher_checkpoint is not None:
        teacher, info = load_checkpoint(teacher_checkpoint)
        check_teacher(teacher.config, config.student)
        teacher_seconds = float(info.get("train_seconds", float("nan")))
        teacher_source = f"loaded from {teacher_checkpoint} (trained {info.get('steps', '?')} steps)"
    else:
        torch.manual_seed(0)
        teacher = GFLDetector(config.teacher)
        t_result = train_detector(
            teacher,
            train,
            config=TrainConfig(
                steps=config.teacher_steps, batch_size=config.batch_size, lr=config.lr, seed=0
            ),
            progress=progress,
            description="teacher",
        )
        teacher_seconds = t_result.seconds
        teacher_source = f"trained here ({config.teacher_steps} steps)"
        if checkpoint_dir is not None:
            save_checkpoint(
                Path(checkpoint_dir) / "teacher.safetensors",
                teacher,
                extra={"role": "teacher", "steps": config.teacher_steps, "train_seconds": teacher_seconds},
            )
    teacher_metrics = evaluate_detector(teacher, test)
    teacher_record = {
        **teacher_metrics,
        "seconds": teacher_seconds,
        "params": _count(teacher),
        "source": teacher_source,
        "config": teacher.config.to_dict(),
    }
    log(f"teacher: {teacher_metrics} ({teacher_source}, {teacher_seconds:.0f}s)")
    cached = teacher_outputs(teacher, train.images)
    models: dict[str, GFLDetector] = {"teacher": teacher}
    runs = []
    for seed in config.seeds:
        for method in config.methods:
            torch.manual_seed(seed)
            student = GFLDetector(config.student)
            result = train_detector(
                student,
                train,
                config=TrainConfig(
                    steps=config.student_steps, batch_size=config.batch_size, lr=config.lr, seed=seed
                ),
                distill=DistillConfig(method=method),
                teacher=cached,
                progress=progress,
                description=f"student {method} seed {seed}",
            )
            metrics = evaluate_detector(student, test)
            runs.append(
                {
                    "method": method,
                    "seed": seed,
                    **metrics,
                    "seconds": result.seconds,
                    "params": _count(student),
                }
            )
            log(f"student {method:>4} seed {seed}: {metrics} ({result.seconds:.0f}s)")
            if seed == config.seeds[0]:
                models[method] = student
            if checkpoint_dir is not None:
                save_checkpoint(
                    Path(checkpoint_dir) / f"student_{method}_seed{seed}.safetensors",
                    student,
                    extra={"role": "student", "method": method, "seed": seed, **metrics},
                )
    return ComparisonResult(config, teacher_record, runs, time.perf_counter() - start, models, test)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
