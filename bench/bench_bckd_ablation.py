"""Where does BCKD's effect come from here? Ablation on the same data, teacher and seeds as
``bench_bckd.py``: BCKD's classification term alone, its localization term alone, IoU instead of GIoU,
and a 2x longer student schedule for ``none`` vs ``bckd``. Writes ``bench/results/bckd_ablation.{json,md}``.

    python bench/bench_bckd_ablation.py --teacher runs/detection/teacher_1500.safetensors
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from moevl.atomic import atomic_write_json, atomic_write_text
from moevl.detection.evaluation import evaluate_detector
from moevl.detection.model import GFLDetector
from moevl.detection.recipe import DetectionCompareConfig, load_scenes
from moevl.detection.train import DistillConfig, TrainConfig, load_checkpoint, teacher_outputs, train_detector

VARIANTS = {
    "bckd cls only (1.0 L_cls)": (DistillConfig(method="bckd", bckd_loc_weight=0.0), 1),
    "bckd loc only (4.0 L_loc)": (DistillConfig(method="bckd", bckd_cls_weight=0.0), 1),
    "bckd, IoU instead of GIoU": (DistillConfig(method="bckd", bckd_iou="iou"), 1),
    "none, 2x steps": (DistillConfig(method="none"), 2),
    "bckd, 2x steps": (DistillConfig(method="bckd"), 2),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint (from bench_bckd.py)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not args.teacher.is_file():
        parser.error(f"--teacher must be an existing checkpoint file, got {str(args.teacher)!r}")
    torch.set_num_threads(1)
    config = DetectionCompareConfig()
    start = time.perf_counter()
    train, test = load_scenes(config.data)
    teacher, _ = load_checkpoint(args.teacher)
    cached = teacher_outputs(teacher, train.images)
    rows = {}
    for name, (distill, factor) in VARIANTS.items():
        values = []
        for seed in config.seeds:
            torch.manual_seed(seed)
            student = GFLDetector(config.student)
            schedule = TrainConfig(
                steps=factor * config.student_steps, batch_size=config.batch_size, lr=config.lr, seed=seed
            )
            train_detector(student, train, config=schedule, distill=distill, teacher=cached, description=name)
            values.append(evaluate_detector(student, test)["mAP"])
            print(f"{name} seed {seed}: mAP {100 * values[-1]:.1f}", flush=True)
        rows[name] = {"mAP": values, "mean": statistics.fmean(values), "std": statistics.stdev(values)}
    seconds = time.perf_counter() - start
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out_dir / "bckd_ablation.json", {"rows": rows, "seconds": seconds})
    lines = [
        "# BCKD ablation (test split, same teacher, seeds and schedule as bckd.md unless noted)",
        "",
        "| variant | mAP (mean ± std) | per seed |",
        "|---|---|---|",
    ]
    for name, row in rows.items():
        per_seed = ", ".join(f"{100 * v:.1f}" for v in row["mAP"])
        lines.append(f"| {name} | {100 * row['mean']:.1f} ± {100 * row['std']:.1f} | {per_seed} |")
    lines += ["", f"Wall time: {seconds:.0f} s.", ""]
    atomic_write_text(args.out_dir / "bckd_ablation.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
