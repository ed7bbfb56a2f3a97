"""The ``moevl`` command: ``train`` (one stage), ``eval``, ``export``, ``compare`` (the main job) and
``detect``. Thin: the work happens in ``moevl.vlm``; this file turns options into calls and errors into
one-line messages (``fail``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from moevl.cli_errors import fail
from moevl.detection.cli import app as detect_app

# Plain click help (no rich boxes): rich cuts option help to fit its table when the output is not a terminal.
app = typer.Typer(
    help="Sparse MoE vision-language models with better routing (STGC, LTDR).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},
)
app.add_typer(detect_app, name="detect")

CONFIG_HELP = "YAML recipe (configs/*.yaml); the built-in defaults (configs/train.yaml) when omitted."
SET_HELP = "Override a recipe key, e.g. --set stage3.training.learning_rate=1e-4 (repeatable)."
METHODS_HELP = "baseline, stgc, ltdr or stgc+ltdr"


@app.callback()
def _root(
    system_malloc: bool = typer.Option(
        False,
        "--system-malloc",
        help="Keep glibc's default malloc settings (by default freed host memory is kept for reuse: "
        "faster CPU steps, peak memory kept; see moevl.allocator).",
    ),
) -> None:
    if not system_malloc:
        from moevl.allocator import retain_freed_memory

        retain_freed_memory()


@contextmanager
def user_errors() -> Iterator[None]:
    """Turns the errors a user can cause (bad recipe, data, paths, checkpoints, NaNs, Ctrl-C) into ``fail``."""
    from moevl.config import ConfigError
    from moevl.data import DataError
    from moevl.training.trainer import NonFiniteTrainingError
    from moevl.vlm.io import CheckpointError, OutputDirError
    from moevl.vlm.train import TrainingInterrupted

    try:
        yield
    except (ConfigError, DataError, CheckpointError, OutputDirError, NonFiniteTrainingError) as e:
        raise fail(str(e)) from None
    except TrainingInterrupted as e:
        from moevl.vlm.train import is_main_process

        if not is_main_process():  # every rank stopped with the same checkpoint: rank 0 says so
            raise typer.Exit(130) from None
        raise fail(str(e), code=130) from None


def _config(config: Path | None, overrides: list[str] | None, extra: list[str] | None = None):
    from moevl.vlm.config import load_config

    return load_config(config, [*(overrides or []), *(extra or [])])


def _set_progress(enabled: bool) -> bool:
    """Whether to show progress bars: not with ``--no-progress``, nor when stderr is not a terminal (a piped or
    redirected log gets one line per logging step instead of bars and their escape codes). Without bars,
    transformers', datasets' and the hub's loading and saving bars are silenced too."""
    if enabled and sys.stderr.isatty():
        return True
    import datasets
    import huggingface_hub
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    return False


def _check_paths(
    *, model: Path | None, data: Path | None, image_folder: Path | None, out: Path | None, config: Path | None
) -> None:
    """The paths a command was given, checked before torch and transformers load (a second each): the same
    checks ``train_stage`` makes again, with its messages."""
    from moevl.vlm.io import CheckpointError, OutputDirError, check_model_dir, check_writable_target

    if config is not None and not config.is_file():
        raise fail(f"config file not found: {config}")
    if data is not None and not data.exists():
        raise fail(f"data file not found: {data}")
    if image_folder is not None and not image_folder.is_dir():
        raise fail(f"image folder not found: {image_folder}")
    try:
        if model is not None:
            check_model_dir(model)
        if out is not None:
            check_writable_target(out)
    except (CheckpointError, OutputDirError) as e:
        raise fail(str(e)) from None


def _progress_option() -> Any:
    return typer.Option(
        True, "--progress/--no-progress", help="Progress bars (--no-progress silences all; off when piped)."
    )


@app.command()
def train(
    stage: int = typer.Option(
        ..., min=1, max=3, help="1: projector pre-training, 2: instruction tuning, 3: MoE-tuning."
    ),
    out: Path = typer.Option(..., help="Output directory (checkpoints, TensorBoard logs, model/)."),
    model: Path | None = typer.Option(
        None, help="Checkpoint directory to start from (a previous stage's --out works too)."
    ),
    data: Path | None = typer.Option(
        None, help="Training data: LLaVA JSON/JSONL or messages json/jsonl/parquet."
    ),
    image_folder: Path | None = typer.Option(None, help="Root of the records' relative image paths."),
    method: str | None = typer.Option(None, help=f"Stage 3 method: {METHODS_HELP} (default: the recipe's)."),
    max_steps: int | None = typer.Option(None, help="Stop after this many optimizer steps."),
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
    set_: list[str] | None = typer.Option(None, "--set", metavar="KEY=VALUE", help=SET_HELP),
    chat_template: Path | None = typer.Option(
        None, help="Jinja chat template file (checkpoints without one)."
    ),
    skip_bad_records: bool = typer.Option(False, help="Skip and count bad records instead of stopping."),
    seed: int | None = typer.Option(None, help="Seed (default: the recipe's)."),
    resume: bool = typer.Option(False, help="Resume from the last complete checkpoint in --out."),
    overwrite: bool = typer.Option(
        False, help="Start over in an --out that holds an earlier run (deletes its checkpoints and model)."
    ),
    progress: bool = _progress_option(),
) -> None:
    """Train one stage with the Hugging Face Trainer; torchrun / accelerate / deepspeed launch it as is."""
    _check_paths(model=model, data=data, image_folder=image_folder, out=out, config=config)
    from moevl.vlm.train import is_main_process, train_stage

    extra = []
    if chat_template is not None:
        extra.append(f"data.chat_template={str(chat_template)!r}")
    if skip_bad_records:
        extra.append("data.skip_bad_records=true")
    progress = _set_progress(progress)
    with user_errors():
        cfg = _config(config, set_, extra)
        result = train_stage(
            cfg,
            stage=stage,
            model=model,
            output_dir=out,
            data=data,
            image_folder=image_folder,
            method=method,
            seed=seed,
            max_steps=max_steps,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            log=typer.echo,
        )
    if not is_main_process():
        return
    typer.echo(
        f"stage {stage} done in {result.train_time_s:.1f} s ({result.global_step} steps, "
        f"{result.num_records} records); model: {result.model_dir}"
    )


@app.command("eval")
def eval_(
    model: Path = typer.Option(..., help="A model directory (or a stage's --out)."),
    data: Path | None = typer.Option(None, help="Evaluation data (default: the recipe's eval.data)."),
    image_folder: Path | None = typer.Option(None, help="Root of the records' relative image paths."),
    out: Path | None = typer.Option(
        None, help="Write the results as JSON here; the predictions go beside it as <name>.predictions.jsonl."
    ),
    batch_size: int | None = typer.Option(None, help="Records per generation batch."),
    max_new_tokens: int | None = typer.Option(None, help="Longest answer in tokens."),
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
    set_: list[str] | None = typer.Option(None, "--set", metavar="KEY=VALUE", help=SET_HELP),
    progress: bool = _progress_option(),
) -> None:
    """Greedy answers, VQAv2-normalised exact match, accuracy per category."""
    from moevl.vlm.evaluate import run_eval

    extra = []
    if batch_size is not None:
        extra.append(f"eval.batch_size={batch_size}")
    if max_new_tokens is not None:
        extra.append(f"eval.max_new_tokens={max_new_tokens}")
    progress = _set_progress(progress)
    with user_errors():
        cfg = _config(config, set_, extra)
        result = run_eval(cfg, model=model, data=data, image_folder=image_folder, out=out, progress=progress)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model} · {result.count} records")
    for col in ("category", "accuracy %", "n"):
        table.add_column(col)
    for c, acc in result.per_category.items():
        table.add_row(c, f"{100 * acc:.1f}", str(result.category_count[c]))
    table.add_row("overall", f"{100 * result.overall:.1f}", str(result.count))
    Console().print(table)


@app.command()
def export(
    model: Path = typer.Option(..., help="A model directory written by moevl (or a stage's --out)."),
    out: Path = typer.Option(..., help="Where to write the exported checkpoint."),
    require_native: bool = typer.Option(
        False,
        help="Fail (with the reason) instead of writing the moevl format when no native class is exact.",
    ),
    lora: str = typer.Option(
        "merge",
        help="A model with LoRA adapters: 'merge' folds them into the weights; 'adapter' writes the base model "
        "(native) and the adapters alone in PEFT's format in OUT/adapter.",
    ),
    progress: bool = _progress_option(),
) -> None:
    """Write a checkpoint plain transformers loads (native MoE class) where one exists exactly; otherwise
    the moevl format, which only moevl loads (never silently wrong). LoRA adapters are merged (or, with
    --lora adapter, written in PEFT's format beside the base)."""
    from moevl.checkpoint import export as export_model
    from moevl.hf import moe_state
    from moevl.hf.runtime import find_moe_state
    from moevl.vlm.io import check_writable_target, load_model

    _set_progress(progress)
    with user_errors():
        check_writable_target(out)
        net, processor = load_model(model)
        if find_moe_state(net) is None:
            raise fail(f"--model {model}: a dense model; export is for MoE models (save it as it is)")
        try:
            if lora not in ("merge", "adapter"):
                raise fail(f"--lora must be 'merge' or 'adapter', got {lora!r}")
            if lora == "adapter" and moe_state(net).settings.lora is None:
                raise fail(
                    f"--lora adapter: the model in {model} has no LoRA adapters (moe.lora was not set)"
                )
            result = export_model(net, out, processor=processor, require_native=require_native, lora=lora)
        except ValueError as e:
            raise fail(str(e)) from None
    typer.echo(f"{result.format}: {out} ({result.reason})")
    for note in result.notes:
        typer.echo(f"note: {note}")
    if result.how_to_load:
        typer.echo(result.how_to_load)


@app.command()
def diagnose(
    model: Path = typer.Option(..., help="A checkpoint directory (dense: upcycled in memory; or sparse)."),
    data: Path = typer.Option(
        ..., help="LLaVA JSON/JSONL or messages data; the first --batch-size records probe."
    ),
    image_folder: Path | None = typer.Option(None, help="Root of the records' relative image paths."),
    steps: int = typer.Option(
        10, min=2, help="Training steps measured (in memory; the checkpoint is unchanged)."
    ),
    batch_size: int = typer.Option(16, min=1, help="Records in the fixed probe batch."),
    out: Path = typer.Option(Path("runs/diagnose"), help="Where diagnosis.json and cosines.png go."),
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
    set_: list[str] | None = typer.Option(None, "--set", metavar="KEY=VALUE", help=SET_HELP),
    progress: bool = _progress_option(),
) -> None:
    """Does STGC's premise hold for this model and data? Token-gradient cosines, conflict ratio, flag
    persistence and router health per MoE layer, and a plain verdict."""
    from moevl.vlm.diagnose import diagnose as run_diagnosis

    progress = _set_progress(progress)
    with user_errors():
        cfg = _config(config, set_)
        result = run_diagnosis(
            cfg, model=model, data=data, image_folder=image_folder, steps=steps, batch_size=batch_size, out=out,
            progress=progress,
        )  # fmt: skip
    for d in [*result["layers"], result["overall"]]:
        persistence = (
            "n/a" if d["persistence"] is None else f"{d['persistence']:.3f} (chance {d['chance']:.3f})"
        )
        typer.echo(
            f"layer {d['layer']}: conflict ratio {d['conflict_ratio']:.3f} (vision {_num(d['vision_conflict_ratio'])}, "
            f"text {_num(d['text_conflict_ratio'])}) · cosine {d['cosine_mean']:.3f} ± "
            f"{d['cosine_std']:.3f} · below -0.1 {d['clear_conflict_share']:.3f} · persistence {persistence}"
        )
    typer.echo(result["premise"]["verdict"])
    for line in result["premise"]["conditions"]:
        typer.echo(f"  {line}")
    typer.echo(f"written: {out / 'diagnosis.json'}, {out / 'cosines.png'}")


@app.command()
def compare(
    out: Path = typer.Option(Path("runs/demo"), help="Run directory (report.md, results.json, plots)."),
    config: Path | None = typer.Option(
        None, help="YAML recipe; the built-in demo recipe (configs/demo.yaml)."
    ),
    seeds: int | None = typer.Option(None, help="Seeds per method (default: the recipe's compare.seeds)."),
    methods: str | None = typer.Option(None, help=f"Comma-separated subset of {METHODS_HELP}."),
    set_: list[str] | None = typer.Option(None, "--set", metavar="KEY=VALUE", help=SET_HELP),
    progress: bool = _progress_option(),
) -> None:
    """The main job on the embedded digit benchmark: write it as LLaVA data, build the tiny checkpoint, run
    stages 1-3 with `moevl train`'s code for every method and seed, evaluate with `moevl eval`'s code, report."""
    from moevl.vlm.compare import demo_config, run_compare

    extra = []
    if seeds is not None:
        extra.append(f"compare.seeds={seeds}")
    if methods is not None:
        extra.append("compare.methods=[" + ",".join(f'"{m.strip()}"' for m in methods.split(",")) + "]")
    progress = _set_progress(progress)
    with user_errors():
        cfg = demo_config(config, [*(set_ or []), *extra])
        run_compare(cfg, out, log=_cyan, progress=progress)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _cyan(message: str) -> None:
    typer.secho(message, fg=typer.colors.CYAN)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
