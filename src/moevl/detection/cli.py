"""``moevl detect``: train, distill and evaluate the digit detectors; run the BCKD comparison.

Every option and output path is checked before any work starts; a user error ends in one line,
``error: <option or file> must be ..., got ...`` (``moevl.cli_errors.fail``), never a traceback. The
defaults of the schedule and the data are the comparison recipe's (``DetectionCompareConfig``, the values
of ``configs/detection.yaml``), so the commands and the recipe cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import typer
from rich.console import Console
from typer.core import TyperCommand

from moevl.atomic import atomic_write_json, check_writable
from moevl.checks import check_choice, check_int
from moevl.cli_errors import fail
from moevl.config import ConfigError
from moevl.detection.names import DISTILL_METHODS, ROLES, SPLITS

if TYPE_CHECKING:
    from moevl.detection.model import DetectorConfig, GFLDetector
    from moevl.detection.recipe import DetectionCompareConfig, DetectionDataConfig
    from moevl.detection.train import TrainConfig

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


def _checked(check: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``check(*args, **kwargs)``; its ``ValueError`` (a message naming the option) becomes the error."""
    try:
        return check(*args, **kwargs)
    except ValueError as error:
        raise fail(str(error)) from None


def _renamed(error: ValueError, name: str, option: str) -> str:
    """A message about ``name`` (``"teacher must be ..."``) as one about ``option`` (``"--teacher must be"``)."""
    message = str(error)
    return option + message.removeprefix(name) if message.startswith(f"{name} ") else f"{option}: {message}"


def _from_options(make: Callable[..., T], **options: Any) -> T:
    """``make(**options)``; a config's ``"batch_size must be ..."`` error becomes ``"--batch-size must be
    ..."`` (every option passed here has the name of its field)."""
    try:
        return make(**options)
    except ValueError as error:
        name = str(error).partition(" ")[0]
        raise fail(_renamed(error, name, f"--{name.replace('_', '-')}")) from None


def _recipe() -> DetectionCompareConfig:
    """The comparison recipe's defaults: the one place the commands' schedule and data sizes come from."""
    from moevl.detection.recipe import DetectionCompareConfig

    return DetectionCompareConfig()


def _schedule(
    role: str, steps: int | None, batch_size: int | None, lr: float | None, seed: int
) -> TrainConfig:
    """The ``TrainConfig`` of ``train`` / ``distill``: the options given, the recipe's values for the rest
    (its ``teacher_steps`` for a teacher, its ``student_steps`` for a student)."""
    from moevl.detection.train import TrainConfig

    recipe = _recipe()
    if steps is None:
        steps = recipe.teacher_steps if role == "teacher" else recipe.student_steps
    batch_size = recipe.batch_size if batch_size is None else batch_size
    lr = recipe.lr if lr is None else lr
    return _from_options(TrainConfig, steps=steps, batch_size=batch_size, lr=lr, seed=seed)


def _data(train_scenes: int | None, test_scenes: int | None) -> DetectionDataConfig:
    """The ``DetectionDataConfig`` of ``train`` / ``distill``: the options given, the recipe's for the rest."""
    from moevl.detection.recipe import DetectionDataConfig

    given = {"train_scenes": train_scenes, "test_scenes": test_scenes}
    options = {**dataclasses.asdict(_recipe().data), **{k: v for k, v in given.items() if v is not None}}
    return _from_options(DetectionDataConfig, **options)


def _check_output(option: str, path: Path, *, directory: bool = False) -> None:
    _checked(check_writable, path, directory=directory, name=option)


def _check_checkpoint_output(path: Path) -> None:
    """The checkpoint and its JSON sidecar can both be written (checked before training)."""
    from moevl.detection.train import checkpoint_sidecar

    _check_output("--output", path)
    _check_output("--output", checkpoint_sidecar(path))


def _load_checkpoint(option: str, path: Path) -> tuple[GFLDetector, dict]:
    from moevl.detection.train import load_checkpoint

    if not path.is_file():
        raise fail(f"{option} must be an existing checkpoint file, got {str(path)!r}")
    try:
        return load_checkpoint(path)
    except ValueError as error:
        raise fail(_renamed(error, "checkpoint", option)) from None


def _check_teacher(teacher: GFLDetector, student: DetectorConfig) -> None:
    from moevl.detection.train import check_teacher

    try:
        check_teacher(teacher.config, student)
    except ValueError as error:
        raise fail(_renamed(error, "teacher", "--teacher")) from None


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
    steps: int | None = typer.Option(
        None, help="Optimizer steps (>= 1; default: the recipe's teacher_steps or student_steps)."
    ),
    batch_size: int | None = typer.Option(None, help="Scenes per step (>= 1; default: the recipe's)."),
    lr: float | None = typer.Option(None, help="Peak learning rate (> 0; default: the recipe's)."),
    seed: int = typer.Option(0, help="Seed of the initialisation and the batch order (>= 0)."),
    train_scenes: int | None = typer.Option(None, help="Training scenes (>= 1; default: the recipe's)."),
    test_scenes: int | None = typer.Option(None, help="Test scenes (>= 1; default: the recipe's)."),
) -> None:
    """Train a teacher or a student alone (GFL loss), save it and evaluate it on the test scenes.

    The schedule and the data sizes not given are the comparison recipe's (configs/detection.yaml)."""
    _checked(check_choice, "--role", role, ROLES)
    import torch

    from moevl.detection.evaluation import evaluate_detector
    from moevl.detection.model import GFLDetector
    from moevl.detection.recipe import load_scenes
    from moevl.detection.train import train_detector

    config = _schedule(role, steps, batch_size, lr, seed)
    data = _data(train_scenes, test_scenes)
    _check_checkpoint_output(output)
    train_set, test_set = load_scenes(data)
    torch.manual_seed(seed)
    model = GFLDetector(getattr(_recipe(), role))
    result = train_detector(model, train_set, config=config, description=role)
    metrics = evaluate_detector(model, test_set)
    extra = {"role": role, "steps": config.steps, "seed": seed, "train_seconds": result.seconds, **metrics}
    _save_checkpoint(output, model, extra)
    _print_metrics(f"{role} ({result.seconds:.0f}s) -> {output}", metrics)


@app.command()
def distill(
    teacher: Path = typer.Option(..., help="Teacher checkpoint (.safetensors) written by `train`."),
    method: str = typer.Option("bckd", help=f"Distillation method: {', '.join(DISTILL_METHODS)}."),
    output: Path = typer.Option(Path("runs/detection/student.safetensors"), help="Checkpoint to write."),
    steps: int | None = typer.Option(
        None, help="Optimizer steps (>= 1; default: the recipe's student_steps)."
    ),
    batch_size: int | None = typer.Option(None, help="Scenes per step (>= 1; default: the recipe's)."),
    lr: float | None = typer.Option(None, help="Peak learning rate (> 0; default: the recipe's)."),
    seed: int = typer.Option(0, help="Seed of the initialisation and the batch order (>= 0)."),
    train_scenes: int | None = typer.Option(None, help="Training scenes (>= 1; default: the recipe's)."),
    test_scenes: int | None = typer.Option(None, help="Test scenes (>= 1; default: the recipe's)."),
) -> None:
    """Train the student with a distillation method from a frozen teacher checkpoint.

    The schedule and the data sizes not given are the comparison recipe's (configs/detection.yaml)."""
    _checked(check_choice, "--method", method, DISTILL_METHODS)
    import torch

    from moevl.detection.evaluation import evaluate_detector
    from moevl.detection.model import GFLDetector
    from moevl.detection.recipe import load_scenes
    from moevl.detection.train import DistillConfig, teacher_outputs, train_detector

    config = _schedule("student", steps, batch_size, lr, seed)
    data = _data(train_scenes, test_scenes)
    student = _recipe().student
    teacher_model, _ = _load_checkpoint("--teacher", teacher)
    _check_teacher(teacher_model, student)
    _check_checkpoint_output(output)
    train_set, test_set = load_scenes(data)
    cached = teacher_outputs(teacher_model, train_set.images)
    torch.manual_seed(seed)
    model = GFLDetector(student)
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


class _PlainUsage(TyperCommand):
    """The usage line as click writes it, ``moevl detect eval [OPTIONS] CHECKPOINT`` (typer writes a required
    argument in braces, ``{CHECKPOINT}``, which reads as a set of choices)."""

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]


@app.command("eval", cls=_PlainUsage)
def evaluate(
    checkpoint: Path = typer.Argument(
        ..., metavar="CHECKPOINT", help="Checkpoint (.safetensors) to evaluate."
    ),
    split: str = typer.Option("test", help=f"Scene split: {', '.join(SPLITS)}."),
    scenes: int | None = typer.Option(
        None, help="Number of scenes (>= 1; default: the recipe's test_scenes)."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the metrics to this JSON file."),
) -> None:
    """COCO mAP / AP50 / AP75 of a checkpoint on digit scenes (of the recipe's image size)."""
    _checked(check_choice, "--split", split, SPLITS)
    from moevl.detection.data import make_digit_scenes
    from moevl.detection.evaluation import evaluate_detector

    data = _recipe().data
    scenes = data.test_scenes if scenes is None else _checked(check_int, "--scenes", scenes, minimum=1)
    if json_out is not None:
        _check_output("--json", json_out)
    model, _ = _load_checkpoint("checkpoint", checkpoint)
    metrics = evaluate_detector(model, make_digit_scenes(split, scenes, image_size=data.image_size))
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
    set_: list[str] | None = typer.Option(
        None, "--set", metavar="KEY=VALUE", help="Override a recipe key, e.g. --set lr=1e-3."
    ),
    threads: int = typer.Option(1, help="torch CPU threads (>= 1)."),
    prefix: str = typer.Option("bckd", help="File name prefix of the report."),
) -> None:
    """Teacher + student with none / kl / ld / bckd over seeds; writes JSON, markdown and plots.

    The step, scene and seed options override the recipe (``--config`` or the defaults).
    """
    import torch

    from moevl.detection.recipe import load_detection_config, run_comparison
    from moevl.detection.report import write_detection_report

    options = {
        "--seeds": seeds,
        "--teacher-steps": teacher_steps,
        "--student-steps": student_steps,
        "--train-scenes": train_scenes,
        "--test-scenes": test_scenes,
        "--threads": threads,
    }
    for option, value in options.items():
        if value is not None:
            maximum = MAX_SEEDS if option == "--seeds" else None
            _checked(check_int, option, value, minimum=1, maximum=maximum)
    from_options = {
        "teacher_steps": teacher_steps,
        "student_steps": student_steps,
        "data.train_scenes": train_scenes,
        "data.test_scenes": test_scenes,
        "seeds": None if seeds is None else list(range(seeds)),
    }
    overrides = [*(set_ or []), *(f"{k}={v}" for k, v in from_options.items() if v is not None)]
    if config_file is not None and not config_file.is_file():
        raise fail(f"--config must be an existing YAML file, got {str(config_file)!r}")
    try:
        config = load_detection_config(config_file, overrides)
    except ConfigError as error:
        raise fail(str(error)) from None
    if not prefix or Path(prefix).name != prefix:
        raise fail(f"--prefix must be a file name prefix without '/', got {prefix!r}")
    if teacher is not None:
        teacher_model, _ = _load_checkpoint("--teacher", teacher)
        _check_teacher(teacher_model, config.student)
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
