"""One training stage of MoE-LLaVA on any Hugging Face vision-language checkpoint, with the HF Trainer.

1. projector pre-training (``stage1.trainable``: the projector), usually on caption data;
2. instruction tuning (projector and language model; the vision tower stays frozen);
3. MoE-tuning: a dense model is upcycled (``moevl.hf.upcycle``: MoE-LLaVA's alternate layers, E=4, top-2,
   balancing 0.01), a natively sparse model is adopted (``moevl.hf.adopt``), a model moevl already made
   sparse keeps its experts and takes the method's settings; only experts and routers train.

The stage writes to its output directory: ``checkpoint-N/`` (Trainer checkpoints, resumable), ``runs/``
(TensorBoard), ``model/`` (the final model, its processor and ``moevl.json``), and for MoE models
``moe_stats.json`` (written by ``MoETrainer``). ``torchrun``, ``accelerate launch`` and ``deepspeed``
launch the same command: the recipe's ``training:`` section is passed to ``TrainingArguments`` as it is.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments, set_seed

from moevl.atomic import atomic_write_json
from moevl.checkpoint.load import is_sparse_checkpoint
from moevl.checks import check
from moevl.config import ConfigError, to_plain
from moevl.vlm.config import RunConfig
from moevl.vlm.io import (
    META_FILE,
    MODEL_DIR,
    RUN_FILE,
    SKIPPED_FILE,
    CheckpointError,
    OutputDirError,
    check_model_dir,
    check_run_identity,
    check_writable_target,
    clear_previous_run,
    ensure_writable,
    load_model,
    previous_run,
    read_meta,
    resolve_model_dir,
    save_final_model,
)
from moevl.vlm.parts import set_trainable
from moevl.vlm.resume import checkpoint_damage, last_checkpoint

__all__ = [
    "CheckpointError",
    "OutputDirError",
    "StageResult",
    "TrainingInterrupted",
    "checkpoint_damage",
    "last_checkpoint",
    "train_stage",
]


class TrainingInterrupted(RuntimeError):
    """Ctrl-C stopped training after saving a checkpoint; ``checkpoint`` resumes it."""

    def __init__(self, checkpoint: Path | None) -> None:
        self.checkpoint = checkpoint
        where = f"checkpoint saved at {checkpoint}" if checkpoint else "no checkpoint was saved yet"
        super().__init__(f"training interrupted; {where}; run again with --resume to continue")


@dataclass(frozen=True)
class StageResult:
    stage: int
    method: str | None
    output_dir: Path
    model_dir: Path
    train_time_s: float
    global_step: int
    train_loss: float | None
    num_records: int
    dropped_too_long: int
    skipped_bad: int


class GracefulInterrupt(TrainerCallback):
    """First Ctrl-C: finish the current step, save a checkpoint, stop. Second Ctrl-C: stop at once.

    Checkpoints are never cut short by the first Ctrl-C, so the last one stays resumable.
    """

    def __init__(self) -> None:
        self.interrupted = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        if is_main_process():
            print(
                "\nInterrupted: saving a checkpoint after this step (Ctrl-C again to stop at once).",
                flush=True,
            )

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def training_arguments(
    cfg: RunConfig,
    stage: int,
    output_dir: Path,
    *,
    seed: int,
    progress: bool,
    max_steps: int | None = None,
) -> TrainingArguments:
    """``TrainingArguments`` from the recipe's ``training`` (+ ``stage{n}.training``) as it is, plus what moevl
    decides: the output directory, the seed, no column pruning (vision inputs vary by family), CPU/gloo when
    there is no GPU."""
    kwargs = cfg.training_arguments(stage)
    if max_steps is not None:
        kwargs["max_steps"] = max_steps
    cpu = not torch.cuda.is_available()
    if cpu and not kwargs.get("deepspeed"):
        # accelerate imports DeepSpeed when it is installed, and DeepSpeed warns on every run that it "set the
        # accelerator to CPU" when it finds no GPU; a recipe without DeepSpeed never uses that choice.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    kwargs.setdefault("use_cpu", cpu)
    if cpu and _world_size() > 1:
        kwargs.setdefault("ddp_backend", "gloo")
    kwargs.setdefault("log_level", "warning")
    try:
        return TrainingArguments(
            output_dir=str(output_dir),
            seed=seed,
            data_seed=seed,
            remove_unused_columns=False,
            disable_tqdm=not progress,
            **kwargs,
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config section 'training' (stage {stage}): {e}") from None


def _apply_threads(cfg: RunConfig) -> None:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)


# MoESettings fields a stage-3 run may change on a model moevl already made sparse (the rest is fixed by
# its weights: experts, top-k, layers).
def explicit_moe_keys(moe) -> set[str]:
    """The structural ``moe.*`` keys of a recipe that differ from the built-in defaults, i.e. that the user gave.
    (The recipe's defaults for them, MoE-LLaVA's E=4, top-2, alternate layers, are upcycling defaults: a sparse
    model keeps its own.)

    NOTE: a key given with its default value cannot be told from the default; it then counts as not given.
    """
    from moevl.hf.settings import STRUCTURAL_FIELDS

    default = RunConfig().moe
    return {name for name in STRUCTURAL_FIELDS if getattr(moe, name) != getattr(default, name)}


def check_structure(model: torch.nn.Module, requested, explicit: set[str]) -> None:
    """``ConfigError`` naming the first structural key of ``explicit`` whose ``requested`` value differs from
    what the sparse ``model`` has (``MoESettings.reconfigure``: fixed by its weights)."""
    from moevl.hf.runtime import decoder_layers, moe_state
    from moevl.hf.settings import FixedSettingError

    own = moe_state(model).settings
    changes = {name: getattr(requested, name) for name in sorted(explicit) if name != "lora"}
    try:
        own.reconfigure(changes, num_layers=len(decoder_layers(model)))
    except FixedSettingError as err:
        name, (given, theirs) = next(iter(err.fixed.items()))
        given = list(given) if isinstance(given, tuple) else given
        theirs = list(theirs) if isinstance(theirs, tuple) else theirs
        raise ConfigError(
            f"config key 'moe.{name}': {given!r}, but the model is sparse with {name}={theirs!r}, fixed by "
            f"its weights (leave 'moe.{name}' out)"
        ) from None


def prepare_moe(model: torch.nn.Module, settings) -> str:
    """Makes a dense or natively sparse ``model`` sparse for stage 3 and returns how: ``upcycled`` (dense, with
    ``settings``), ``adopted`` (natively sparse: Mixtral, Qwen-MoE, DeepSeek, OLMoE, ...: every sparse block,
    with the model's own experts and top-k; ``settings``' structural fields do not apply). ``ConfigError`` when
    the model cannot take ``settings``."""
    import dataclasses

    from moevl.hf import adopt, upcycle
    from moevl.hf.adopt import is_native_moe

    try:
        if is_native_moe(model):
            adopt(model, dataclasses.replace(settings, num_experts=None, top_k=None, layers=None))
            return "adopted"
        upcycle(model, settings)
        return "upcycled"
    except ValueError as e:  # a setting the model cannot take, or a block moevl does not know: one line
        raise ConfigError(f"stage 3: {e}") from None


def _reconcile_lora(model: torch.nn.Module, lora) -> None:
    """A sparse checkpoint keeps its LoRA adapters (a recipe without ``moe.lora`` trains them on); one without
    adapters takes the recipe's ``moe.lora``.
    ``ConfigError`` when the recipe asks for other adapters than the checkpoint has."""
    from moevl.hf import moe_state

    own = moe_state(model).settings.lora
    if own is None and lora is not None:
        from moevl.hf.lora import apply_lora

        apply_lora(model, lora)
    elif lora is not None and own != lora:
        have = to_plain(own)
        raise ConfigError(
            f"config key 'moe.lora': {to_plain(lora)!r}, but the model's adapters are {have!r}, fixed by its weights "
            "(give the same moe.lora, or merge them first with `moevl export`)"
        )


def describe_moe(model: torch.nn.Module, how: str) -> str:
    """One line naming the MoE layers of ``model`` and how stage 3 got them, e.g.
    ``adopted 2 MoE layers [0, 1] (E=8, top-2) of Qwen3MoeSparseMoeBlock``."""
    from moevl.hf import moe_blocks, moe_state

    s = moe_state(model).settings
    n = len(s.layers)
    line = f"{how} {n} MoE layer{'s' if n != 1 else ''} {list(s.layers)} (E={s.num_experts}, top-{s.top_k})"
    native = {block.native_class_name for block in moe_blocks(model)} - {None}
    if native:
        line += f" of {', '.join(sorted(native))}"
    if how == "reconfigured":
        line += ": experts and routers kept, the method's options applied"
    if s.lora is not None:
        line += f"; LoRA r={s.lora.r} alpha={s.lora.alpha:g} on {', '.join(s.lora.targets)}"
    return line


def _effective_recipe(
    cfg: RunConfig, *, model: Any, data: Any, image_folder: Any, seed: int
) -> dict[str, Any]:
    """The recipe as the run used it (the command line's model, data, image folder and seed filled in), so that
    ``moevl.json`` alone tells how a model was made."""
    plain = to_plain(cfg)
    plain.update(model=str(model), seed=seed)
    plain["data"].update(train=str(data), image_folder=None if image_folder is None else str(image_folder))
    return plain


def is_main_process() -> bool:
    """Rank 0 of a distributed job (``torchrun``, ``accelerate launch`` and ``deepspeed`` set ``RANK``), or the
    only process: the one that talks (the other ranks say nothing but their own errors) and writes run files."""
    return int(os.environ.get("RANK", "0")) == 0


def _silent(*args: Any, **kwargs: Any) -> None:
    return None


def _check_output_dir(
    output_dir: Path, identity: dict[str, Any], *, resume: bool, overwrite: bool, log: Any = print
) -> Path | None:
    """The checkpoint to resume from (None: a fresh run); the errors of an ``output_dir`` that holds an earlier
    run (``train_stage``'s doc)."""
    if resume and overwrite:
        raise ConfigError(
            "--resume and --overwrite exclude each other: continue the run in --out, or start over"
        )
    if not resume:
        earlier = previous_run(output_dir)
        if earlier is not None and not overwrite and (output_dir / MODEL_DIR / META_FILE).is_file():
            raise OutputDirError(
                f"--out {output_dir} already holds a finished run ({earlier}): --overwrite trains it again "
                "(deleting its checkpoints and model), or choose another --out"
            )
        if earlier is not None and not overwrite:
            raise OutputDirError(
                f"--out {output_dir} already holds a run ({earlier}): --resume continues it, --overwrite starts "
                "over (deleting its checkpoints and model), or choose another --out"
            )
        return None
    if (output_dir / MODEL_DIR / META_FILE).is_file():
        raise CheckpointError(
            f"--resume: the run in {output_dir} has finished ({MODEL_DIR}/ is saved); nothing to resume "
            "(--overwrite trains it again)"
        )
    damaged: list[tuple[Path, str]] = []
    checkpoint = last_checkpoint(output_dir, damaged=damaged)
    if checkpoint is None:
        found = "".join(f"; {p.name}: {why}" for p, why in damaged)
        raise CheckpointError(f"--resume: no complete checkpoint-N directory in {output_dir}{found}")
    check_run_identity(output_dir, identity)
    for path, why in damaged:
        log(
            f"--resume: {path.name} is damaged ({why}); resuming from {checkpoint.name}, the newest complete "
            f"checkpoint ({path.name} is written again when the run reaches its step)"
        )
    return checkpoint


#: The ``TrainingArguments`` keys the learning-rate schedule is made from. ``--resume`` refuses a change to one:
#: the Trainer restores the scheduler's step, not its length, so the rate would jump to a point of another
#: schedule (or, for the rate itself, the change would be silently ignored: the saved base rate comes back).
SCHEDULE_KEYS = ("max_steps", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps")


def _schedule(cfg: RunConfig, stage: int, max_steps: int | None) -> dict[str, Any]:
    """What fixes a stage's learning-rate schedule (``SCHEDULE_KEYS``, and ``num_train_epochs`` when there is no
    ``max_steps``), as the run's identity keys ``training.<key>``, defaults filled in."""
    kwargs = cfg.training_arguments(stage)
    if max_steps is not None:
        kwargs["max_steps"] = max_steps
    fields = TrainingArguments.__dataclass_fields__
    values = {k: kwargs.get(k, fields[k].default) for k in SCHEDULE_KEYS}
    if values["max_steps"] is None or values["max_steps"] <= 0:
        values["max_steps"] = None
        values["num_train_epochs"] = kwargs.get("num_train_epochs", fields["num_train_epochs"].default)
    return {f"training.{k}": to_plain(v) for k, v in values.items()}


def _categories(records: list) -> dict[str, int] | None:
    """Category name -> id when records carry categories (routing statistics per category), else None."""
    names = sorted({r.category for r in records if r.category is not None})
    return {name: i for i, name in enumerate(names)} if names else None


def train_stage(
    cfg: RunConfig,
    *,
    stage: int,
    model: str | os.PathLike | None = None,
    output_dir: str | os.PathLike,
    data: str | os.PathLike | None = None,
    image_folder: str | os.PathLike | None = None,
    method: str | None = None,
    seed: int | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: list[TrainerCallback] | None = None,
    log: Any = print,
) -> StageResult:
    """Runs one stage and saves its model to ``output_dir/model``.

    ``model``: a checkpoint directory (a stage's output directory works too); default ``cfg.model``.
    ``data``: the training file; default ``cfg.stage{n}.data`` then ``cfg.data.train``. ``method``: the stage 3
    preset (default ``cfg.method``); refused for stages 1-2. ``output_dir`` holding an earlier run is refused
    unless ``resume`` (continue it from its newest whole checkpoint, a damaged newer one named through ``log``:
    same stage, model, method, MoE structure and learning-rate schedule) or ``overwrite`` (its checkpoints and
    model are deleted once every input checked out). Every input is checked before anything is created or
    trained: ``CheckpointError`` (missing model, nothing to resume), ``OutputDirError``, ``ConfigError``,
    ``moevl.data.DataError``; ``TrainingInterrupted`` after Ctrl-C (the saved checkpoint resumes the run). An
    image that fails to decode during training is a ``DataError`` naming its record (or, with
    ``data.skip_bad_records``, a skipped record listed in ``SKIPPED_FILE``). Under ``torchrun`` only rank 0 calls
    ``log``, except for what a rank alone knows (a record it skipped).
    """
    from moevl.data import DataError, read_records
    from moevl.data.dryrun import dry_run
    from moevl.data.processing import ConversationCollator, ConversationDataset
    from moevl.hf import moe_state
    from moevl.hf.settings import RECONFIGURABLE_FIELDS
    from moevl.training import MoETrainer

    if stage not in (1, 2, 3):
        raise ConfigError(f"stage must be 1, 2 or 3, got {stage!r}")
    if method is not None and stage != 3:
        raise ConfigError(
            f"method: only stage 3 (MoE-tuning) takes a method, got {method!r} for stage {stage}"
        )
    report = log  # what this rank alone knows (a record it skipped)
    if not is_main_process():  # one voice under torchrun: rank 0 reports, the others only raise their errors
        log, progress_bars = _silent, False
    else:
        progress_bars = progress
    method = method or cfg.method
    seed = cfg.seed if seed is None else seed
    check(seed >= 0, "seed", "an integer >= 0", seed, error=ConfigError)
    check(max_steps is None or max_steps >= 1, "max_steps", "an integer >= 1", max_steps, error=ConfigError)
    model_path = model if model is not None else cfg.model
    if model_path is None:
        raise CheckpointError("no model: give --model (a checkpoint directory) or `model:` in the recipe")
    model_dir = check_model_dir(model_path)
    data_path = data if data is not None else (cfg.stage(stage).data or cfg.data.train)
    if data_path is None:
        raise DataError(f"no training data for stage {stage}: give --data or `data.train` in the recipe")
    image_folder = image_folder if image_folder is not None else cfg.data.image_folder
    chat_template = None
    if cfg.data.chat_template is not None:
        template_file = Path(cfg.data.chat_template)
        if not template_file.is_file():
            raise ConfigError(f"config key 'data.chat_template': file not found: {template_file}")
        chat_template = template_file.read_text()
    output_dir = check_writable_target(output_dir)
    identity = {
        "stage": stage,
        "model": str(resolve_model_dir(model_dir)),
        "method": method if stage == 3 else None,
    }
    if stage == 3:
        identity |= {
            f"moe.{k}": to_plain(getattr(cfg.moe, k)) for k in ("num_experts", "top_k", "layers", "lora")
        }
    identity |= _schedule(cfg, stage, max_steps)
    resume_from = _check_output_dir(output_dir, identity, resume=resume, overwrite=overwrite, log=log)
    on_bad = "skip" if cfg.data.skip_bad_records else "error"
    records = read_records(data_path, image_folder=image_folder, on_bad=on_bad)
    if records.skipped:
        ids = ", ".join(repr(rid) for rid, _, _ in records.skipped[:10])
        more = f" and {len(records.skipped) - 10} more" if len(records.skipped) > 10 else ""
        log(
            f"skipped {len(records.skipped)} bad record(s) of {data_path} (data.skip_bad_records): {ids}{more}"
        )
    _apply_threads(cfg)
    set_seed(seed)
    settings = cfg.moe_settings(method) if stage == 3 else None
    sparse_already = is_sparse_checkpoint(model_dir)
    overrides = None
    if settings is not None and sparse_already:
        overrides = {name: getattr(settings, name) for name in RECONFIGURABLE_FIELDS}
    net, processor = load_model(model_dir, chat_template=chat_template, moe_overrides=overrides)
    meta: dict[str, Any] = {"stage": stage, "method": method if stage == 3 else None, "seed": seed}
    meta["init"] = str(resolve_model_dir(model_dir))
    meta["init_meta"] = read_meta(model_dir)
    if settings is not None:
        if sparse_already:
            meta["moe"] = "reconfigured"  # keeps its experts and routers, takes the method's options
            _reconcile_lora(net, settings.lora)
        else:
            set_seed(seed)  # the routers' initialisation depends on the seed, not on what ran before
            meta["moe"] = prepare_moe(net, settings)
        if meta["moe"] != "upcycled":
            check_structure(net, settings, explicit_moe_keys(cfg.moe))
        log(describe_moe(net, meta["moe"]))
        meta["moe_settings"] = moe_state(net).settings.to_dict()
    meta["trainable_parameters"] = set_trainable(net, cfg.stage(stage).trainable)

    dataset = ConversationDataset(
        records.records,
        processor,
        max_length=cfg.data.max_length,
        progress=progress_bars,
        on_bad=on_bad,
        report=report,
    )
    if dataset.turn_end.appended is not None:
        log(
            f"the chat template writes no end-of-turn token after an answer: appending "
            f"{dataset.turn_end.appended} to each assistant turn, learnt, so that the model learns to stop"
        )
    if dataset.dropped_too_long:
        log(f"dropped {dataset.dropped_too_long} record(s) longer than {dataset.max_length} tokens")
    if len(dataset) == 0:
        raise DataError(f"{data_path}: no usable record left (all were dropped or skipped)")
    dry_run(net, dataset)  # a few real records through the collator and the forward; nothing written yet
    args = training_arguments(cfg, stage, output_dir, seed=seed, progress=progress, max_steps=max_steps)
    output_dir = ensure_writable(output_dir)
    if is_main_process():
        if overwrite:
            clear_previous_run(output_dir)
        atomic_write_json(output_dir / RUN_FILE, identity)
    dataset.skip_log = output_dir / SKIPPED_FILE  # from here on: the dry run writes nothing to --out
    interrupt = GracefulInterrupt()
    trainer = MoETrainer(
        model=net,
        args=args,
        train_dataset=dataset,
        data_collator=ConversationCollator(
            processor, categories=_categories(records.records) if stage == 3 else None
        ),
        processing_class=processor,
        callbacks=[interrupt, *(callbacks or [])],
    )
    start = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except DataError as e:  # a record whose image stopped decoding (data.skip_bad_records was off)
        raise DataError(_stopped_by(e, trainer.state.global_step, last_checkpoint(output_dir))) from None
    elapsed = time.perf_counter() - start
    if interrupt.interrupted:
        raise TrainingInterrupted(last_checkpoint(output_dir))
    skipped_in_training = _skipped_in_training(output_dir / SKIPPED_FILE, dataset)
    if skipped_in_training:
        log(
            f"skipped {skipped_in_training} record(s) during training whose images did not decode "
            f"(data.skip_bad_records): listed in {output_dir / SKIPPED_FILE}"
        )
    meta.update(
        train_time_s=elapsed,
        global_step=trainer.state.global_step,
        config=_effective_recipe(cfg, model=model_path, data=data_path, image_folder=image_folder, seed=seed),
        data=str(data_path),
        records=len(dataset),
    )
    final_dir = output_dir / MODEL_DIR
    save_final_model(trainer, final_dir, meta)
    return StageResult(
        stage=stage,
        method=meta["method"],
        output_dir=output_dir,
        model_dir=final_dir,
        train_time_s=elapsed,
        global_step=trainer.state.global_step,
        train_loss=getattr(output, "training_loss", None),
        num_records=len(dataset),
        dropped_too_long=dataset.dropped_too_long,
        skipped_bad=len(records.skipped) + skipped_in_training,
    )


def _stopped_by(error: Exception, step: int, checkpoint: Path | None) -> str:
    """One line for a ``DataError`` that stopped training, with where the run can continue.

    NOTE: an error raised in a DataLoader worker comes back from torch as the same type whose message is
    "Caught DataError in DataLoader worker process N." and the worker's traceback; its last line holds the
    original message."""
    message = str(error)
    if message.startswith("Caught "):
        message = message.rstrip().splitlines()[-1].partition("DataError: ")[2] or message
    if checkpoint is None:
        return (
            f"{message}; training stopped after step {step}, before its first checkpoint: --skip-bad-records "
            "skips such records"
        )
    return (
        f"{message}; training stopped after step {step}: --resume --skip-bad-records continues from "
        f"{checkpoint.name}, skipping such records"
    )


def _skipped_in_training(path: Path, dataset: Any) -> int:
    """How many records were skipped during training: the ids ``path`` lists (every worker and rank appends to
    it; a resumed run's earlier ones included) and those this process skipped before it existed (the dry run)."""
    ids = {dataset.examples[j].id for j in dataset.bad}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                ids.add(json.loads(line)["id"])
            except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                continue
    return len(ids)
