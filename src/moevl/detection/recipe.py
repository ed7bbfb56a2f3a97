"""The comparison recipe: one teacher, then the same student trained alone and with KL, LD and BCKD,
over several seeds, evaluated with COCO metrics on held-out scenes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moevl.detection.data import DigitScenes, make_digit_scenes
from moevl.detection.evaluation import evaluate_detector
from moevl.detection.model import DetectorConfig, GFLDetector
from moevl.detection.train import (
    METHODS,
    DistillConfig,
    TrainConfig,
    load_checkpoint,
    save_checkpoint,
    teacher_outputs,
    train_detector,
)

__all__ = ["STUDENT", "TEACHER", "CompareConfig", "DataConfig", "load_scenes", "run_comparison"]

# Same code, different depth and width (about 20x parameters between them).
TEACHER = DetectorConfig(stage_widths=(32, 64, 128), stage_depth=2, neck_width=64, head_convs=2)
STUDENT = DetectorConfig(stage_widths=(8, 16, 32), stage_depth=1, neck_width=16, head_convs=1)


@dataclass(frozen=True)
class DataConfig:
    train_scenes: int = 2000
    test_scenes: int = 300
    image_size: int = 48


@dataclass(frozen=True)
class CompareConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: DetectorConfig = TEACHER
    student: DetectorConfig = STUDENT
    teacher_steps: int = 1500
    student_steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS

    @classmethod
    def from_dict(cls, data: dict) -> CompareConfig:
        """Build from a plain mapping (e.g. ``configs/detection.yaml``); missing keys keep defaults."""
        known = {
            "data",
            "teacher",
            "student",
            "teacher_steps",
            "student_steps",
            "batch_size",
            "lr",
            "seeds",
            "methods",
        }
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"config: expected keys among {sorted(known)}, got unknown {sorted(unknown)}")
        kwargs = dict(data)
        if "data" in kwargs:
            kwargs["data"] = DataConfig(**kwargs["data"])
        for role, default in (("teacher", TEACHER), ("student", STUDENT)):
            if role in kwargs:
                kwargs[role] = DetectorConfig.from_dict({**default.to_dict(), **kwargs[role]})
        for key in ("seeds", "methods"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        for method in kwargs.get("methods", ()):
            if method not in METHODS:
                raise ValueError(f"config.methods: expected entries among {METHODS}, got {method!r}")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["teacher"], out["student"] = self.teacher.to_dict(), self.student.to_dict()
        out["seeds"], out["methods"] = list(self.seeds), list(self.methods)
        return out


def load_scenes(data: DataConfig) -> tuple[DigitScenes, DigitScenes]:
    """Training and test scenes (test scenes use digit images never seen in training)."""
    return (
        make_digit_scenes("train", data.train_scenes, image_size=data.image_size),
        make_digit_scenes("test", data.test_scenes, image_size=data.image_size),
    )


@dataclass
class ComparisonResult:
    config: CompareConfig
    teacher: dict
    runs: list[dict]  # one per (method, seed): metrics, seconds
    total_seconds: float
    models: dict[str, GFLDetector]  # "teacher" and "<method>" (first seed), for pictures
    test_scenes: DigitScenes


def run_comparison(
    config: CompareConfig,
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
    start = time.perf_counter()
    train, test = load_scenes(config.data)
    if teacher_checkpoint is not None:
        teacher, info = load_checkpoint(teacher_checkpoint)
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
