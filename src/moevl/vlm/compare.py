"""``moevl compare``, the main job, on the embedded digit benchmark, through the same path a user's model and
data take: the benchmark is written out as LLaVA-format JSON + PNG files, the tiny model is a real Hugging
Face checkpoint directory with its processor and chat template, and every stage is ``moevl train``'s
``train_stage``, every score ``moevl eval``'s ``evaluate``.

Layout of ``out``::

    data/                      the benchmark (captions.json, instruct.json, validation.json, test.json, images/)
    dense/init/                the untrained tiny checkpoint
    dense/stage1/, stage2/     stages 1-2 (reused when their recipe is unchanged)
    moe/<method>/seed<N>/      stage 3 per method and seed
    results.json, report.md, *.png
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from moevl.atomic import atomic_write_json
from moevl.config import ConfigError, read_yaml, to_plain
from moevl.vlm.config import RunConfig, config_from_dict
from moevl.vlm.io import META_FILE, MODEL_DIR, ensure_writable

#: The demo recipe over ``moevl train``'s defaults (``configs/demo.yaml`` writes it out): the tiny model
#: starts from random weights, so stages 1-2 train every dense part; short schedules at a high rate.
DEMO_DEFAULTS: dict[str, Any] = {
    # NOTE: one thread: these models are tiny, and on a shared 2-core machine two spinning threads ran
    # 5-50x slower than one.
    "threads": 1,
    "training": {
        "per_device_train_batch_size": 32,
        "warmup_steps": 10,
        "logging_steps": 10,
        "save_steps": 100000,  # the final model is saved by the stage; no intermediate checkpoints
        "save_total_limit": 1,
        # one worker process prepares the next batch (images, processor) while the main thread trains
        "dataloader_num_workers": 1,
        "dataloader_persistent_workers": True,
    },
    "stage1": {
        "trainable": ["vision_tower", "projector", "language_model"],
        "training": {"max_steps": 400, "learning_rate": 1e-3},
    },
    "stage2": {
        "trainable": ["vision_tower", "projector", "language_model"],
        "training": {"max_steps": 2500, "learning_rate": 1e-3},
    },
    "stage3": {"training": {"max_steps": 400, "learning_rate": 1e-3}},
    "eval": {"batch_size": 256, "max_new_tokens": 3},
}


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def demo_config(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """The demo's recipe: ``DEMO_DEFAULTS`` over the built-in defaults, then the YAML file, then overrides."""
    data = read_yaml(path) if path is not None else {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the config's top level must be a mapping, got {type(data).__name__}")
    return config_from_dict(_merge(DEMO_DEFAULTS, data), overrides)


def _reusable(stage_dir: Path, cfg: RunConfig, keys: tuple[str, ...]) -> bool:
    """A finished stage whose recipe (``keys`` of it) matches is reused, not retrained."""
    meta = stage_dir / MODEL_DIR / META_FILE
    if not meta.is_file():
        return False
    try:
        old = json.loads(meta.read_text()).get("config", {})
    except json.JSONDecodeError:
        return False
    new = to_plain(cfg)
    if "data" in old:  # the files a stage trained on are the benchmark's own, filled in by train_stage
        old["data"] = {**old["data"], "train": None, "image_folder": None}
    return all(old.get(k) == new[k] for k in keys)


def _evaluation(model_dir: Path, records: list, train_records: list, cfg: RunConfig, progress: bool) -> dict:
    from moevl.vlm.evaluate import chance_accuracy, evaluate
    from moevl.vlm.io import load_model

    model, processor = load_model(model_dir)
    result = evaluate(
        model,
        processor,
        records,
        batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
        progress=progress,
    )
    return {
        "accuracy": result.per_category,
        "overall": result.overall,
        "count": result.count,
        "chance": chance_accuracy(train_records, records),
        "examples": [
            {"question": p.prompt, "answer": p.answer, "prediction": p.prediction}
            for p in result.predictions[:8]
        ],
    }


def run_compare(cfg: RunConfig, out: str | os.PathLike, *, log: Any = print, progress: bool = True) -> dict:
    """Runs the comparison into ``out`` and returns the results (also written as results.json)."""
    from moevl.analysis.report import write_report
    from moevl.data import read_records
    from moevl.data.digits import write_digit_benchmark
    from moevl.data.images import CELL
    from moevl.vlm.checkpoint import build_llava_checkpoint
    from moevl.vlm.train import train_stage

    out = ensure_writable(out)
    start = time.perf_counter()
    files = write_digit_benchmark(out / "data", cfg.demo.benchmark)
    init = out / "dense" / "init"
    if not _reusable(init, cfg, ("seed", "demo")):
        log(f"building the tiny checkpoint -> {init / MODEL_DIR}")
        size = cfg.demo.benchmark.grid * CELL
        build_llava_checkpoint(
            init / MODEL_DIR, cfg.demo.model, words=files.vocabulary, image_size=size, seed=cfg.seed
        )
        atomic_write_json(init / MODEL_DIR / META_FILE, {"stage": 0, "config": to_plain(cfg)})
    results: dict[str, Any] = {"config": to_plain(cfg), "dense": {}, "methods": {}}
    stage_data = {1: files.captions, 2: files.instruct}
    shared = ("seed", "threads", "demo", "data", "training")
    model = init / MODEL_DIR
    for stage in (1, 2):
        d = out / "dense" / f"stage{stage}"
        keys = (*shared, *(f"stage{s}" for s in range(1, stage + 1)))
        if _reusable(d, cfg, keys):
            log(f"stage {stage}: reusing {d / MODEL_DIR}")
            meta = json.loads((d / MODEL_DIR / META_FILE).read_text())
            results["dense"][f"stage{stage}_time_s"] = meta.get("train_time_s")
        else:
            log(f"stage {stage} -> {d}")
            r = train_stage(
                cfg,
                stage=stage,
                model=model,
                output_dir=d,
                data=stage_data[stage],
                image_folder=files.image_folder,
                overwrite=True,  # compare decides what to reuse
                progress=progress,
                log=log,
            )
            results["dense"][f"stage{stage}_time_s"] = r.train_time_s
        model = d / MODEL_DIR
    split_file = files.test if cfg.compare.split == "test" else files.validation
    eval_records = read_records(split_file, image_folder=files.image_folder).records
    train_records = read_records(files.instruct, image_folder=files.image_folder).records
    log(f"evaluating the dense model on {cfg.compare.split}")
    results["dense"]["eval"] = _evaluation(model, eval_records, train_records, cfg, progress)
    for method in cfg.compare.methods:
        runs = {}
        for seed in (cfg.seed + i for i in range(cfg.compare.seeds)):
            d = out / "moe" / method.replace("+", "_") / f"seed{seed}"
            log(f"stage 3: {method}, seed {seed} -> {d}")
            r = train_stage(
                cfg,
                stage=3,
                model=model,
                output_dir=d,
                data=files.instruct,
                image_folder=files.image_folder,
                method=method,
                seed=seed,
                overwrite=True,  # compare decides what to reuse
                progress=progress,
                log=log,
            )
            stats_file = d / "moe_stats.json"
            runs[str(seed)] = {
                "train_time_s": r.train_time_s,
                "train_loss": r.train_loss,
                "eval": _evaluation(r.model_dir, eval_records, train_records, cfg, progress),
                "moe_stats": json.loads(stats_file.read_text()) if stats_file.is_file() else {},
            }
        results["methods"][method] = {"runs": runs}
    results["wall_time_s"] = time.perf_counter() - start
    report = write_report(results, out)
    log(f"report: {report}")
    return results
