"""``moevl detect``: train, distill and evaluate the digit detectors; run the BCKD comparison.

Every option and output path is checked before any work starts; a user error ends in one line,
``error: <option or file>: expected ..., got ...`` (``moevl.cli_errors.fail``), never a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console

from moevl.atomic import atomic_write_json, check_writable
from moevl.cli_errors import fail
from moevl.config import ConfigError
from moevl.detection.checks import DISTILL_METHODS, ROLES, SPLITS, check_number

if TYPE_CHECKING:
    from moevl.detection.model import GFLDetector

# NOTE: torch, the detector and the recipes are imported inside the commands: `moevl --help` and a wrong
# option answer without loading them.

app = typer.Typer(
    help="Dense object detection: GFL-style detectors on digit scenes and BCKD distillation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
MAX_SEEDS = 1000  # --seeds N runs seeds 0..N-1; a typo must not build a list of a billion
T = TypeVar("T")


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise fail(f"{option}: expected one of {', '.join(choices)}, got {value!r}")


def _from_options(make: Callable[..., T], **options: Any) -> T:
    """``make(**options)``; a config's ``"field: expected ..."`` error becomes ``--field: expected ...``
    (every option passed here has the name of its field)."""
    try:
        return make(**options)
    except ValueError as error:
        name, _, rest = str(error).partition(":")
        raise fail(f"--{name.replace('_', '-')}:{rest}") from None


def _check_output(option: str, path: Path, *, directory: bool = False) -> None:
    try:
        check_writable(path, directory=directory)
    except ValueError as error:
        raise fail(f"{option}: {error}") from None


def _check_checkpoint_output(path: Path) -> None:
    """The checkpoint and its JSON sidecar can both be written (checked before training)."""
    from moevl.detection.train import checkpoint_sidecar

    _check_output("--output", path)
    _check_output("--output", checkpoint_sidecar(path))


def _load_checkpoint(option: str, path: Path) -> tuple[GFLDetector, dict]:
    from moevl.detection.train import load_checkpoint

    if not path.is_file():
        raise fail(f"{option}: expected an existing checkpoint file, got {str(path)!r}")
    try:
        return load_checkpoint(path)
    except ValueError as error:
        raise fail(f"{option}: {str(error).removeprefix('checkpoint: ')}") from None


def _save_checkpoint(path: Path, model: GFLDetector, extra: dict) -> None:
    from moevl.detection.train import save_checkpoint

    try:
        save_checkpoint(path, model, extra=extra)
    except OSError as error:  # the disk filled up or the folder vanished during training
        raise fail(f"--output: could not write {str(path)!r} ({error})") from None


def _print_metrics(title: str, metrics: dict) -> None:
    from rich.table import Table

    table = Table(title=title)
    for key in ("mAP", "AP50", "AP75"):
        table.add_column(key)
    table.add_row(*(f"{100 * metrics[k]:.1f}" for k in ("mAP", "AP50", "AP75")))
    console.print(table)


@app.command()
def train(
    role: str = typer.Option("student", help="Model size: teacher or student."),
    output: Path = typer.Option(Path("runs/detection/model.safetensors"), help="Checkpoint to write."),
    steps: int = typer.Option(1000, help="Optimizer steps (>= 1)."),
    batch_size: int = typer.Option(32, help="Scenes per step (>= 1)."),
    lr: float = typer.Option(3e-3, help="Peak learning rate (> 0)."),
    seed: int = typer.Option(0, help="Seed of the initialisation and the batch order (>= 0)."),
    train_scenes: int = typer.Option(2000, help="Training scenes (>= 1)."),
    test_scenes: int = typer.Option(300, help="Test scenes (>= 1)."),
) -> None:
    """Train a teacher or a student alone (GFL loss), save it and evaluate it on the test scenes."""
    _check_choice("--role", role, ROLES)
    import torch

    from moevl.detection.evaluation import evaluate_detector
    from moevl.detection.model import GFLDetector
    from moevl.detection.recipe import STUDENT, TEACHER, DetectionDataConfig, load_scenes
    from moevl.detection.train import TrainConfig, train_detector

    config = _from_options(TrainConfig, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    data = _from_options(DetectionDataConfig, train_scenes=train_scenes, test_scenes=test_scenes)
    _check_checkpoint_output(output)
    train_set, test_set = load_scenes(data)
    torch.manual_seed(seed)
    model = GFLDetector({"teacher": TEACHER, "student": STUDENT}[role])
    result = train_detector(model, train_set, config=config, description=role)
    metrics = evaluate_detector(model, test_set)
    extra = {"role": role, "steps": steps, "seed": seed, "train_seconds": result.seconds, **metrics}
    _save_checkpoint(output, model, extra)
    _print_metrics(f"{role} ({result.seconds:.0f}s) -> {output}", metrics)


@app.command()
def distill(
    teacher: Path = typer.Option(..., help="Teacher checkpoint (.safetensors) written by `train`."),
    method: str = typer.Option("bckd", help=f"Distillation method: {', '.join(DISTILL_METHODS)}."),
    output: Path = typer.Option(Path("runs/detection/student.safetensors"), help="Checkpoint to write."),
    steps: int = typer.Option(1000, help="Optimizer steps (>= 1)."),
    batch_size: int = typer.Option(32, help="Scenes per step (>= 1)."),
    lr: float = typer.Option(3e-3, help="Peak learning rate (> 0)."),
    seed: int = typer.Option(0, help="Seed of the initialisation and the batch order (>= 0)."),
    train_scenes: int = typer.Option(2000, help="Training scenes (>= 1)."),
    test_scenes: int = typer.Option(300, help="Test scenes (>= 1)."),
) -> None:
    """Train the student with a distillation method from a frozen teacher checkpoint."""
    _check_choice("--method", method, DISTILL_METHODS)
    import torch

    from moevl.detection.evaluation import evaluate_detector
    from moevl.detection.model import GFLDetector
    from moevl.detection.recipe import STUDENT, DetectionDataConfig, load_scenes
    from moevl.detection.train import (
        DistillConfig,
        TrainConfig,
        check_teacher,
        teacher_outputs,
        train_detector,
    )

    config = _from_options(TrainConfig, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    data = _from_options(DetectionDataConfig, train_scenes=train_scenes, test_scenes=test_scenes)
    teacher_model, _ = _load_checkpoint("--teacher", teacher)
    try:
        check_teacher(teacher_model.config, STUDENT)
    except ValueError as error:
        raise fail(f"--teacher: {error}") from None
    _check_checkpoint_output(output)
    train_set, test_set = load_scenes(data)
    cached = teacher_outputs(teacher_model, train_set.images)
    torch.manual_seed(seed)
    model = GFLDetector(STUDENT)
    result = train_detector(
        model,
        train_set,
        config=config,
        distill=DistillConfig(method=method),  # type: ignore[arg-type]
        teacher=cached,
        description=f"distill {method}",
    )
    metrics = evaluate_detector(model, test_set)
    _save_checkpoint(output, model, {"role": "student", "method": method, "teacher": str(teacher), **metrics})
    _print_metrics(f"student + {method} ({result.seconds:.0f}s) -> {output}", metrics)


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Argument(..., help="Checkpoint (.safetensors) to evaluate."),
    split: str = typer.Option("test", help=f"Scene split: {', '.join(SPLITS)}."),
    scenes: int = typer.Option(300, help="Number of scenes (>= 1)."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the metrics to this JSON file."),
) -> None:
    """COCO mAP / AP50 / AP75 of a checkpoint on digit scenes."""
    _check_choice("--split", split, SPLITS)
    from moevl.detection.data import make_digit_scenes
    from moevl.detection.evaluation import evaluate_detector

    _from_options(check_number, name="scenes", value=scenes, minimum=1, integer=True)
    if json_out is not None:
        _check_output("--json", json_out)
    model, _ = _load_checkpoint("checkpoint", checkpoint)
    metrics = evaluate_detector(model, make_digit_scenes(split, scenes))
    _print_metrics(f"{checkpoint} on {split} ({scenes} scenes)", metrics)
    if json_out is not None:
        try:
            atomic_write_json(json_out, metrics)
        except OSError as error:
            raise fail(f"--json: could not write {str(json_out)!r} ({error})") from None


@app.command()
def compare(
    out_dir: Path = typer.Option(Path("runs/detection/compare"), help="Where the report files go."),
    seeds: int | None = typer.Option(None, help="Student seeds per method, 0..N-1 (default: the recipe's)."),
    teacher_steps: int | None = typer.Option(None, help="Teacher steps (default: the recipe's)."),
    student_steps: int | None = typer.Option(None, help="Student steps (default: the recipe's)."),
    train_scenes: int | None = typer.Option(None, help="Training scenes (default: the recipe's)."),
    test_scenes: int | None = typer.Option(None, help="Test scenes (default: the recipe's)."),
    checkpoint_dir: Path | None = typer.Option(Path("runs/detection"), help="Where to keep the checkpoints."),
    teacher: Path | None = typer.Option(None, help="Reuse this teacher checkpoint instead of training one."),
    config_file: Path | None = typer.Option(
        None, "--config", help="YAML recipe (configs/detection.yaml); the built-in defaults when omitted."
    ),
    set_: list[str] | None = typer.Option(None, "--set", help="Override a recipe key, e.g. --set lr=1e-3."),
    threads: int = typer.Option(1, help="torch CPU threads (>= 1)."),
    prefix: str = typer.Option("bckd", help="File name prefix of the report."),
) -> None:
    """Teacher + student with none / kl / ld / bckd over seeds; writes JSON, markdown and plots.

    The step, scene and seed options override the recipe (``--config`` or the defaults).
    """
    import torch

    from moevl.detection.recipe import load_detection_config, run_comparison
    from moevl.detection.report import write_detection_report
    from moevl.detection.train import check_teacher

    options = {
        "seeds": seeds,
        "teacher_steps": teacher_steps,
        "student_steps": student_steps,
        "train_scenes": train_scenes,
        "test_scenes": test_scenes,
        "threads": threads,
    }
    for name, value in options.items():
        if value is not None:
            _from_options(check_number, name=name, value=value, minimum=1, integer=True)
    if seeds is not None and seeds > MAX_SEEDS:
        raise fail(f"--seeds: expected an integer <= {MAX_SEEDS}, got {seeds}")
    from_options = {
        "teacher_steps": teacher_steps,
        "student_steps": student_steps,
        "data.train_scenes": train_scenes,
        "data.test_scenes": test_scenes,
        "seeds": None if seeds is None else list(range(seeds)),
    }
    overrides = [*(set_ or []), *(f"{k}={v}" for k, v in from_options.items() if v is not None)]
    if config_file is not None and not config_file.is_file():
        raise fail(f"--config: expected an existing YAML file, got {str(config_file)!r}")
    try:
        config = load_detection_config(config_file, overrides)
    except ConfigError as error:
        raise fail(str(error)) from None
    if not prefix or Path(prefix).name != prefix:
        raise fail(f"--prefix: expected a file name prefix without '/', got {prefix!r}")
    if teacher is not None:
        teacher_model, _ = _load_checkpoint("--teacher", teacher)
        try:
            check_teacher(teacher_model.config, config.student)
        except ValueError as error:
            raise fail(f"--teacher: {error}") from None
    _check_output("--out-dir", out_dir, directory=True)
    if checkpoint_dir is not None:
        _check_output("--checkpoint-dir", checkpoint_dir, directory=True)
    torch.set_num_threads(threads)
    try:
        result = run_comparison(
            config, checkpoint_dir=checkpoint_dir, teacher_checkpoint=teacher, log=console.print
        )
    except OSError as error:  # the disk filled up or a folder vanished during the run
        raise fail(f"--checkpoint-dir: could not write a checkpoint ({error})") from None
    try:
        paths = write_detection_report(result, out_dir, prefix=prefix)
    except OSError as error:
        raise fail(f"--out-dir: could not write the report into {str(out_dir)!r} ({error})") from None
    console.print(Path(paths["md"]).read_text())


if __name__ == "__main__":
    app()
