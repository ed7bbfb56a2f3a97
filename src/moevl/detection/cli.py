"""``moevl detect``: train, distill and evaluate the digit detectors; run the BCKD comparison."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer
import yaml
from rich.console import Console
from rich.table import Table

from moevl.detection.data import SPLITS, make_digit_scenes
from moevl.detection.evaluation import evaluate_detector
from moevl.detection.model import GFLDetector
from moevl.detection.recipe import STUDENT, TEACHER, CompareConfig, DataConfig, load_scenes, run_comparison
from moevl.detection.train import (
    METHODS,
    DistillConfig,
    TrainConfig,
    load_checkpoint,
    save_checkpoint,
    teacher_outputs,
    train_detector,
)

app = typer.Typer(
    help="Dense object detection: GFL-style detectors on digit scenes and BCKD distillation.",
    no_args_is_help=True,
)
console = Console()
ROLES = {"teacher": TEACHER, "student": STUDENT}


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", soft_wrap=True)  # unwrapped: paths stay copyable
    raise typer.Exit(code=2)


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        _fail(f"{name}: expected one of {', '.join(choices)}, got {value!r}")


def _print_metrics(title: str, metrics: dict) -> None:
    table = Table(title=title)
    for key in ("mAP", "AP50", "AP75"):
        table.add_column(key)
    table.add_row(*(f"{100 * metrics[k]:.1f}" for k in ("mAP", "AP50", "AP75")))
    console.print(table)


@app.command()
def train(
    role: str = typer.Option("student", help="Model size: teacher or student."),
    output: Path = typer.Option(Path("runs/detection/model.safetensors"), help="Checkpoint to write."),
    steps: int = typer.Option(1000, min=1),
    batch_size: int = typer.Option(32, min=1),
    lr: float = typer.Option(3e-3),
    seed: int = typer.Option(0),
    train_scenes: int = typer.Option(2000, min=1),
    test_scenes: int = typer.Option(300, min=1),
) -> None:
    """Train a teacher or a student alone (GFL loss), save it and evaluate it on the test scenes."""
    _check_choice("role", role, tuple(ROLES))
    data = DataConfig(train_scenes=train_scenes, test_scenes=test_scenes)
    train_set, test_set = load_scenes(data)
    torch.manual_seed(seed)
    model = GFLDetector(ROLES[role])
    result = train_detector(
        model,
        train_set,
        config=TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed),
        description=role,
    )
    metrics = evaluate_detector(model, test_set)
    save_checkpoint(
        output,
        model,
        extra={"role": role, "steps": steps, "seed": seed, "train_seconds": result.seconds, **metrics},
    )
    _print_metrics(f"{role} ({result.seconds:.0f}s) -> {output}", metrics)


@app.command()
def distill(
    teacher: Path = typer.Option(..., help="Teacher checkpoint (.safetensors) written by `train`."),
    method: str = typer.Option("bckd", help="Distillation method: none, kl, ld or bckd."),
    output: Path = typer.Option(Path("runs/detection/student.safetensors"), help="Checkpoint to write."),
    steps: int = typer.Option(1000, min=1),
    batch_size: int = typer.Option(32, min=1),
    lr: float = typer.Option(3e-3),
    seed: int = typer.Option(0),
    train_scenes: int = typer.Option(2000, min=1),
    test_scenes: int = typer.Option(300, min=1),
) -> None:
    """Train the student with a distillation method from a frozen teacher checkpoint."""
    _check_choice("method", method, METHODS)
    if not teacher.is_file():
        _fail(f"teacher: expected an existing checkpoint file, got {str(teacher)!r}")
    try:
        teacher_model, _ = load_checkpoint(teacher)
    except ValueError as error:
        _fail(str(error))
    data = DataConfig(train_scenes=train_scenes, test_scenes=test_scenes)
    train_set, test_set = load_scenes(data)
    cached = teacher_outputs(teacher_model, train_set.images)
    torch.manual_seed(seed)
    model = GFLDetector(STUDENT)
    result = train_detector(
        model,
        train_set,
        config=TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed),
        distill=DistillConfig(method=method),
        teacher=cached,
        description=f"distill {method}",
    )
    metrics = evaluate_detector(model, test_set)
    save_checkpoint(
        output, model, extra={"role": "student", "method": method, "teacher": str(teacher), **metrics}
    )
    _print_metrics(f"student + {method} ({result.seconds:.0f}s) -> {output}", metrics)


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Argument(..., help="Checkpoint (.safetensors) to evaluate."),
    split: str = typer.Option("test", help="Scene split: train, val or test."),
    scenes: int = typer.Option(300, min=1, help="Number of scenes."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the metrics to this JSON file."),
) -> None:
    """COCO mAP / AP50 / AP75 of a checkpoint on digit scenes."""
    _check_choice("split", split, SPLITS)
    if not checkpoint.is_file():
        _fail(f"checkpoint: expected an existing checkpoint file, got {str(checkpoint)!r}")
    try:
        model, _ = load_checkpoint(checkpoint)
    except ValueError as error:
        _fail(str(error))
    metrics = evaluate_detector(model, make_digit_scenes(split, scenes))
    _print_metrics(f"{checkpoint} on {split} ({scenes} scenes)", metrics)
    if json_out is not None:
        json_out.write_text(json.dumps(metrics, indent=2))


@app.command()
def compare(
    out_dir: Path = typer.Option(Path("bench/results"), help="Where the report files go."),
    seeds: int = typer.Option(3, min=1, help="Student seeds per method."),
    teacher_steps: int = typer.Option(CompareConfig.teacher_steps, min=1),
    student_steps: int = typer.Option(CompareConfig.student_steps, min=1),
    train_scenes: int = typer.Option(DataConfig.train_scenes, min=1),
    test_scenes: int = typer.Option(DataConfig.test_scenes, min=1),
    checkpoint_dir: Path | None = typer.Option(Path("runs/detection"), help="Where to keep the checkpoints."),
    teacher: Path | None = typer.Option(None, help="Reuse this teacher checkpoint instead of training one."),
    config_file: Path | None = typer.Option(
        None,
        "--config",
        help="YAML recipe (configs/detection.yaml); the step/scene/seed options then are ignored.",
    ),
    threads: int = typer.Option(1, min=1, help="torch CPU threads."),
    prefix: str = typer.Option("bckd", help="File name prefix of the report."),
) -> None:
    """Teacher + student with none / kl / ld / bckd over seeds; writes JSON, markdown and plots."""
    from moevl.detection.report import write_report

    if teacher is not None and not teacher.is_file():
        _fail(f"teacher: expected an existing checkpoint file, got {str(teacher)!r}")
    torch.set_num_threads(threads)
    if config_file is not None:
        if not config_file.is_file():
            _fail(f"config: expected an existing YAML file, got {str(config_file)!r}")
        try:
            config = CompareConfig.from_dict(yaml.safe_load(config_file.read_text()) or {})
        except (ValueError, TypeError) as error:
            _fail(str(error))
    else:
        config = CompareConfig(
            data=DataConfig(train_scenes=train_scenes, test_scenes=test_scenes),
            teacher_steps=teacher_steps,
            student_steps=student_steps,
            seeds=tuple(range(seeds)),
        )
    result = run_comparison(
        config, checkpoint_dir=checkpoint_dir, teacher_checkpoint=teacher, log=console.print
    )
    paths = write_report(result, out_dir, prefix=prefix)
    console.print(Path(paths["md"]).read_text())


if __name__ == "__main__":
    app()
