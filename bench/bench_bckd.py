"""BCKD comparison on the embedded digit-detection data (RESEARCH.md §3, issue 6).

Trains (or loads) the GFL teacher, then the same student alone and with softmax-KL, LD and BCKD
distillation over 3 seeds, and writes ``bench/results/bckd.{json,md}``, ``bckd_map.png`` and
``bckd_predictions.png``. Same as ``moevl detect compare``.

    python bench/bench_bckd.py                     # trains the teacher too
    python bench/bench_bckd.py --teacher runs/detection/teacher.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from moevl.detection.recipe import DetectionCompareConfig, run_comparison
from moevl.detection.report import write_detection_report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", type=Path, default=None, help="reuse a teacher checkpoint")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("runs/detection"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.teacher is not None and not args.teacher.is_file():
        parser.error(f"--teacher must be an existing checkpoint file, got {str(args.teacher)!r}")
    torch.set_num_threads(args.threads)
    result = run_comparison(
        DetectionCompareConfig(), checkpoint_dir=args.checkpoint_dir, teacher_checkpoint=args.teacher
    )
    notes = [
        "Hyperparameters: BCKD uses the paper's weights (1.0, 4.0) untouched. The KL weight (1.0, T = 2) "
        "was set once, not tuned. The LD weight 0.25 (the official LD config's value) was chosen on the "
        "*validation* split (seed 0, same schedule) among 0.25 / 1 / 4: validation mAP 45.9 / 45.6 / 40.3; a first "
        "version of LD that summed (instead of averaged) the KL over the distance bins, with weight 1, "
        "gave 32.2 test mAP on seed 0 and was replaced by the official per-bin mean.",
    ]
    paths = write_detection_report(result, args.out_dir, notes=notes)
    print(paths["md"].read_text())


if __name__ == "__main__":
    main()
