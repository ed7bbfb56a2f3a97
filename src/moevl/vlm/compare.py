"""The main job: dense stages once, MoE-tuning per method and seed, evaluation, the report."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from moevl.vlm.config import RunConfig, config_to_dict
from moevl.vlm.evaluate import evaluate
from moevl.vlm.model import num_image_tokens
from moevl.vlm.train import (
    META_FILE,
    MODEL_DIR,
    StageResult,
    ensure_writable,
    load_model,
    prepare_data,
    train_stage,
)


def _reuse(stage_dir: Path, cfg: RunConfig) -> bool:
    """A finished stage whose recipe (data, model, stages 1-2, seed) matches is reused, not retrained."""
    meta = stage_dir / MODEL_DIR / META_FILE
    if not meta.is_file():
        return False
    old = json.loads(meta.read_text()).get("config", {})
    new = config_to_dict(cfg)
    return all(old.get(k) == new[k] for k in ("seed", "data", "model", "stage1", "stage2"))


def _evaluate_dir(cfg: RunConfig, model_dir: Path) -> dict:
    model, tokenizer, _ = load_model(model_dir)
    bench, _ = prepare_data(cfg)
    return evaluate(
        model,
        bench,
        tokenizer,
        num_image_tokens=num_image_tokens(cfg.model, cfg.data.grid),
        split=cfg.eval.split,
        batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
    )


def run_compare(
    cfg: RunConfig,
    out: str | os.PathLike,
    *,
    log: Any = print,
    progress: bool = True,
) -> dict:
    """Runs the comparison into ``out`` and returns the results (also written as results.json)."""
    from moevl.analysis.report import write_report

    out = ensure_writable(out)
    start = time.perf_counter()
    results: dict[str, Any] = {"config": config_to_dict(cfg), "dense": {}, "methods": {}}
    dense_dirs = {1: out / "dense" / "stage1", 2: out / "dense" / "stage2"}
    init = None
    for stage in (1, 2):
        d = dense_dirs[stage]
        if _reuse(d, cfg):
            log(f"stage {stage}: reusing {d / MODEL_DIR}")
            meta = json.loads((d / MODEL_DIR / META_FILE).read_text())
            results["dense"][f"stage{stage}_time_s"] = meta.get("train_time_s")
        else:
            log(f"stage {stage}: training ({cfg.stage(stage).max_steps} steps) -> {d}")
            r: StageResult = train_stage(cfg, stage=stage, output_dir=d, init=init, progress=progress)
            results["dense"][f"stage{stage}_time_s"] = r.train_time_s
        init = d / MODEL_DIR
    log("evaluating the dense model")
    results["dense"]["eval"] = _evaluate_dir(cfg, dense_dirs[2] / MODEL_DIR)
    seeds = [cfg.seed + i for i in range(cfg.compare.seeds)]
    for method in cfg.compare.methods:
        runs = {}
        for seed in seeds:
            d = out / "moe" / method.replace("+", "_") / f"seed{seed}"
            log(f"stage 3: {method}, seed {seed} ({cfg.stage3.max_steps} steps) -> {d}")
            r = train_stage(
                cfg, stage=3, output_dir=d, init=init, method=method, seed=seed, progress=progress
            )
            stats_file = d / "moe_stats.json"
            stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
            runs[str(seed)] = {
                "train_time_s": r.train_time_s,
                "train_loss": r.train_loss,
                "eval": _evaluate_dir(cfg, r.model_dir),
                "moe_stats": stats,
            }
        results["methods"][method] = {"runs": runs}
    results["wall_time_s"] = time.perf_counter() - start
    write_report(results, out)
    log(f"report: {out / 'report.md'}")
    return results
