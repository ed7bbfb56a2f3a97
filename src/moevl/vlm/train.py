"""MoE-LLaVA's three training stages on the embedded benchmark, run by the Hugging Face Trainer.

1. projector pre-training on captions;
2. dense instruction tuning on the questions;
3. MoE-tuning: every other decoder MLP is upcycled to 4 experts, top-2 (``moevl.hf.upcycle``,
   balancing 0.01, ``freeze_dense``) and only experts and routers train (``stage3.trainable``;
   a dense part listed there trains too).

NOTE: MoE-LLaVA starts from a pretrained CLIP and LLM and trains only the projector in stage 1.
Nothing here is pretrained (nothing may download), so by default stage 1 trains every part on the
captions; ``stage1.trainable`` restores the paper's choice.

Each stage writes to its output directory: ``checkpoint-N/`` (Trainer checkpoints, safetensors,
resumable), ``runs/`` (TensorBoard), ``model/`` (the final model with its tokenizer and
``moevl.json``), and for stage 3 ``moe_stats.json`` (written by ``MoETrainer``).
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
from transformers import (
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from moevl.data.dataset import Benchmark, VQACollator, VQADataset, benchmark_tokenizer, build_benchmark
from moevl.hf import MoETrainer, load_upcycled, save_upcycled, upcycle
from moevl.vlm.config import METHODS, RunConfig, config_to_dict
from moevl.vlm.model import build_model, num_image_tokens, set_trainable

META_FILE = "moevl.json"
MODEL_DIR = "model"


class CheckpointError(FileNotFoundError):
    """A model or checkpoint directory that is missing or incomplete."""


class OutputDirError(OSError):
    """An output directory that cannot be created or written."""


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


# --- directories ---------------------------------------------------------------------------------


def ensure_writable(path: str | os.PathLike) -> Path:
    """Creates ``path`` and checks a file can be written in it; ``OutputDirError`` otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".moevl-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"output directory {path} is not writable: {e.strerror or e}") from e
    return path


def is_complete_checkpoint(path: Path) -> bool:
    # The Trainer writes trainer_state.json last, so a checkpoint without it was cut short.
    return (path / "trainer_state.json").is_file() and any(path.glob("*.safetensors"))


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``output_dir``, or None."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = []
    for p in output_dir.glob("checkpoint-*"):
        suffix = p.name.split("-", 1)[1]
        if suffix.isdigit() and is_complete_checkpoint(p):
            found.append((int(suffix), p))
    return max(found)[1] if found else None


def read_meta(model_dir: str | os.PathLike) -> dict:
    """``moevl.json`` of a model directory; ``CheckpointError`` when it is missing or incomplete."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory not found: {model_dir}")
    if (model_dir / MODEL_DIR / META_FILE).is_file():  # a stage's output directory was given
        model_dir = model_dir / MODEL_DIR
    meta = model_dir / META_FILE
    if not meta.is_file() or not any(model_dir.glob("*.safetensors")):
        raise CheckpointError(
            f"{model_dir} is not a moevl model (expected {META_FILE} and *.safetensors; "
            "give the 'model' directory a training stage wrote)"
        )
    data = json.loads(meta.read_text())
    data["path"] = str(model_dir)
    return data


def load_model(model_dir: str | os.PathLike) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, dict]:
    """A model a stage saved (dense or upcycled), its tokenizer and its metadata."""
    meta = read_meta(model_dir)
    path = meta["path"]
    if meta.get("upcycled"):
        model = load_upcycled(path, LlavaForConditionalGeneration)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    return model, tokenizer, meta


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, path: Path, meta: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if meta.get("upcycled"):
        save_upcycled(model, str(path))  # the model's own key names (moevl.hf.io)
    else:
        model.save_pretrained(path)  # safetensors
    tokenizer.save_pretrained(path)
    (path / META_FILE).write_text(json.dumps(meta, indent=2))


# --- Ctrl-C ----------------------------------------------------------------------------------------


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
        print(
            "\nInterrupted: saving a checkpoint after this step (Ctrl-C again to stop at once).", flush=True
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


# --- the stages ------------------------------------------------------------------------------------


_BENCH_CACHE: dict[Any, tuple[Benchmark, PreTrainedTokenizerFast]] = {}


def prepare_data(cfg: RunConfig) -> tuple[Benchmark, PreTrainedTokenizerFast]:
    """The benchmark and its tokenizer (built once per data config in a process)."""
    if cfg.data not in _BENCH_CACHE:
        bench = build_benchmark(cfg.data)
        _BENCH_CACHE[cfg.data] = (bench, benchmark_tokenizer(bench))
    return _BENCH_CACHE[cfg.data]


def new_model(cfg: RunConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration:
    return build_model(
        cfg.model,
        grid=cfg.data.grid,
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def method_options(cfg: RunConfig, method: str) -> dict[str, Any]:
    """Keyword arguments of ``moevl.hf.upcycle`` for one method of the comparison."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    from moevl.moe import LTDRConfig
    from moevl.stgc import STGCConfig

    moe = cfg.moe
    use_stgc, use_ltdr = "stgc" in method, "ltdr" in method
    stgc = None
    if use_stgc or moe.monitor_conflicts:
        stgc = STGCConfig(
            threshold=moe.stgc_threshold, weight=moe.stgc_weight if use_stgc else 0.0, scope=moe.stgc_scope
        )
    ltdr = None
    if use_ltdr:
        ltdr = LTDRConfig(
            tail_top_k=moe.ltdr_tail_top_k,
            language_only_balance=moe.ltdr_language_only_balance,
            vision_tail=moe.ltdr_vision_tail,
        )
    return {
        "num_experts": moe.num_experts,
        "top_k": moe.top_k,
        "layers": moe.layers,
        "router": "ltdr" if use_ltdr else "topk",
        "ltdr": ltdr,
        "stgc": stgc,
        "balance_coef": moe.balance_coef,
        "freeze_dense": True,
    }


def apply_threads(cfg: RunConfig) -> None:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def training_arguments(
    cfg: RunConfig, stage: int, output_dir: Path, seed: int, progress: bool
) -> TrainingArguments:
    s = cfg.stage(stage)
    cpu = not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=s.max_steps,
        per_device_train_batch_size=s.batch_size,
        learning_rate=s.learning_rate,
        warmup_steps=s.warmup_steps,
        weight_decay=s.weight_decay,
        lr_scheduler_type=s.lr_scheduler,
        logging_steps=s.logging_steps,
        save_strategy="steps",
        save_steps=s.save_steps,
        save_total_limit=s.save_total_limit,
        report_to=["tensorboard"],
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=cpu,
        ddp_backend="gloo" if cpu and _world_size() > 1 else None,
        disable_tqdm=not progress,
        log_level="warning",
    )


def train_stage(
    cfg: RunConfig,
    *,
    stage: int,
    output_dir: str | os.PathLike,
    init: str | os.PathLike | None = None,
    method: str = "baseline",
    seed: int | None = None,
    resume: bool = False,
    progress: bool = True,
    callbacks: list[TrainerCallback] | None = None,
) -> StageResult:
    """Runs one stage. ``init``: the model directory of the previous stage (required for stage 3;
    for stage 2 None starts from scratch, for stage 1 it is ignored). ``method`` matters for stage 3.

    Raises ``CheckpointError`` (missing ``init`` or nothing to resume), ``OutputDirError``,
    ``TrainingInterrupted`` (Ctrl-C; the checkpoint it saved resumes the run).
    """
    if stage not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    seed = cfg.seed if seed is None else seed
    apply_threads(cfg)
    output_dir = ensure_writable(output_dir)
    resume_from = None
    if resume:
        resume_from = last_checkpoint(output_dir)
        if resume_from is None:
            raise CheckpointError(f"--resume: no complete checkpoint-N directory in {output_dir}")
    if stage == 3 and init is None:
        raise CheckpointError("stage 3 (MoE-tuning) needs --init, the model directory of stage 2")
    bench, tokenizer = prepare_data(cfg)

    set_seed(seed)
    meta: dict[str, Any] = {"stage": stage, "method": method if stage == 3 else None, "seed": seed}
    if init is not None and stage > 1:
        model, tokenizer, init_meta = load_model(init)
        if init_meta.get("upcycled"):
            raise CheckpointError(f"--init {init} is already upcycled; give the dense model of stage 2")
        meta["init"] = init_meta["path"]
    else:
        model = new_model(cfg, tokenizer)
    if stage == 3:
        set_seed(seed)  # the routers' initialisation depends on the seed, not on what ran before
        model = upcycle(model, **method_options(cfg, method))  # freeze_dense: experts+routers train
        meta["upcycled"] = True
    meta["trainable_parameters"] = set_trainable(model, cfg.stage(stage).trainable)
    meta["config"] = config_to_dict(cfg)

    P = num_image_tokens(cfg.model, cfg.data.grid)
    captions = VQADataset(bench, tokenizer, split="train", kind="caption", num_image_tokens=P)
    dataset: torch.utils.data.Dataset = captions
    if stage > 1:
        # NOTE: captions stay in the mix after stage 1 (as LLaVA-1.5's instruction data keeps
        # captioning): without them the small decoder fell back to the answer prior.
        questions = VQADataset(bench, tokenizer, split="train", kind="vqa", num_image_tokens=P)
        dataset = torch.utils.data.ConcatDataset([questions, captions])
    interrupt = GracefulInterrupt()
    # MoETrainer for every stage: for a dense model it is the Trainer, and its checkpoints keep the
    # model's key names so that --resume restores every weight (see moevl.hf.trainer).
    trainer = MoETrainer(
        model=model,
        args=training_arguments(cfg, stage, output_dir, seed, progress),
        train_dataset=dataset,
        data_collator=VQACollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[interrupt, *(callbacks or [])],
    )
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    elapsed = time.perf_counter() - start
    if interrupt.interrupted:
        raise TrainingInterrupted(last_checkpoint(output_dir))
    model_dir = output_dir / MODEL_DIR
    meta["train_time_s"] = elapsed
    meta["global_step"] = trainer.state.global_step
    if trainer.is_world_process_zero():
        save_model(trainer.model, tokenizer, model_dir, meta)
    return StageResult(
        stage=stage,
        method=meta["method"],
        output_dir=output_dir,
        model_dir=model_dir,
        train_time_s=elapsed,
        global_step=trainer.state.global_step,
        train_loss=getattr(output, "training_loss", None),
    )
