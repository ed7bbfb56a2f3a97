"""The ``moevl`` command: ``train`` (one stage), ``eval``, ``compare`` (the main job). Thin: the work
happens in ``moevl.vlm``; this file turns options into calls and errors into messages."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from moevl.detection.cli import app as detect_app
from moevl.vlm.config import METHODS, ConfigError, load_config

app = typer.Typer(
    help="Sparse MoE vision-language models with better routing (STGC, LTDR).", no_args_is_help=True
)
app.add_typer(detect_app, name="detect")

CONFIG_HELP = "YAML recipe (configs/*.yaml); built-in defaults (configs/compare.yaml) when omitted."
SET_HELP = "Override a config key, e.g. --set stage2.max_steps=50 (repeatable)."


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _config(config: Path | None, overrides: list[str] | None):
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        raise _fail(str(e)) from None


@app.command()
def train(
    stage: int = typer.Option(..., help="1: projector pre-training, 2: instruction tuning, 3: MoE-tuning."),
    out: Path = typer.Option(..., help="Output directory (checkpoints, TensorBoard logs, model/)."),
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
    init: Path | None = typer.Option(
        None, help="Model directory of the previous stage (required for stage 3)."
    ),
    method: str = typer.Option("baseline", help=f"Stage 3 method: {', '.join(METHODS)}."),
    seed: int | None = typer.Option(None, help="Seed (default: the config's)."),
    resume: bool = typer.Option(False, help="Resume from the last complete checkpoint in --out."),
    set_: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
    progress: bool = typer.Option(True, help="Progress bars."),
) -> None:
    """Train one stage (one method for stage 3) with the Hugging Face Trainer; torchrun-compatible."""
    from moevl.vlm.train import CheckpointError, OutputDirError, TrainingInterrupted, train_stage

    cfg = _config(config, set_)
    if stage not in (1, 2, 3):
        raise _fail(f"--stage: expected 1, 2 or 3, got {stage}")
    if method not in METHODS:
        raise _fail(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
    try:
        result = train_stage(
            cfg,
            stage=stage,
            output_dir=out,
            init=init,
            method=method,
            seed=seed,
            resume=resume,
            progress=progress,
        )
    except (CheckpointError, OutputDirError) as e:
        raise _fail(str(e)) from None
    except TrainingInterrupted as e:
        raise _fail(str(e), code=130) from None
    typer.echo(
        f"stage {stage} done in {result.train_time_s:.1f} s ({result.global_step} steps); model: {result.model_dir}"
    )


@app.command("eval")
def eval_(
    model: Path = typer.Option(..., help="A model directory written by a stage (or the stage's --out)."),
    config: Path | None = typer.Option(
        None, help="Recipe for the data (default: the one saved with the model)."
    ),
    split: str | None = typer.Option(
        None, help="train, validation or test (default: the config's eval.split)."
    ),
    out: Path | None = typer.Option(None, help="Write the results as JSON here."),
    set_: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Accuracy per question family: exact match of the generated answer."""
    from moevl.vlm.config import config_from_dict
    from moevl.vlm.evaluate import evaluate
    from moevl.vlm.model import num_image_tokens
    from moevl.vlm.train import CheckpointError, apply_threads, load_model, prepare_data, read_meta

    try:
        meta = read_meta(model)
    except CheckpointError as e:
        raise _fail(str(e)) from None
    try:
        cfg = load_config(config, set_ or []) if config else config_from_dict(meta["config"], set_ or [])
    except ConfigError as e:
        raise _fail(str(e)) from None
    apply_threads(cfg)
    net, tokenizer, _ = load_model(meta["path"])
    bench, _ = prepare_data(cfg)
    result = evaluate(
        net,
        bench,
        tokenizer,
        num_image_tokens=num_image_tokens(cfg.model, cfg.data.grid),
        split=split or cfg.eval.split,
        batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
    )
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{meta['path']} · {result['split']}")
    for col in ("family", "accuracy %", "chance %", "n"):
        table.add_column(col)
    for f, acc in result["accuracy"].items():
        table.add_row(
            f, f"{100 * acc:.1f}", f"{100 * result['chance'].get(f, 0):.1f}", str(result["count"][f])
        )
    table.add_row("overall", f"{100 * result['overall']:.1f}", "", str(sum(result["count"].values())))
    Console().print(table)
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2))
        except OSError as e:
            raise _fail(f"cannot write {out}: {e.strerror or e}") from None


@app.command()
def compare(
    out: Path = typer.Option(Path("runs/compare"), help="Run directory (report.md, results.json, plots)."),
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
    seeds: int | None = typer.Option(None, help="Seeds per method (default 1; 3 for the full study)."),
    methods: str | None = typer.Option(None, help=f"Comma-separated subset of {', '.join(METHODS)}."),
    set_: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
    progress: bool = typer.Option(True, help="Progress bars."),
) -> None:
    """The main job: dense stages once, MoE-tuning per method and seed, evaluation, report."""
    from moevl.vlm.compare import run_compare
    from moevl.vlm.train import CheckpointError, OutputDirError, TrainingInterrupted

    overrides = list(set_ or [])
    if seeds is not None:
        overrides.append(f"compare.seeds={seeds}")
    if methods is not None:
        overrides.append("compare.methods=[" + ",".join(f'"{m.strip()}"' for m in methods.split(",")) + "]")
    cfg = _config(config, overrides)
    try:
        run_compare(cfg, out, log=lambda msg: typer.secho(msg, fg=typer.colors.CYAN), progress=progress)
    except (CheckpointError, OutputDirError) as e:
        raise _fail(str(e)) from None
    except TrainingInterrupted as e:
        raise _fail(str(e), code=130) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
