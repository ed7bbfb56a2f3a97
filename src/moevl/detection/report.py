"""Write the comparison report: JSON, a markdown table, a bar plot of mAP per method and a picture of
predictions drawn on test images.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from moevl.analysis.display import format_mean_std, mean_std, method_color
from moevl.atomic import atomic_savefig, atomic_write_json, atomic_write_text
from moevl.detection.evaluation import predict
from moevl.detection.recipe import ComparisonResult
from moevl.detection.train import DistillConfig

__all__ = ["summarize", "write_detection_report"]

_METRICS = ("mAP", "AP50", "AP75")


def summarize(result: ComparisonResult) -> dict:
    """Mean and (sample) std over seeds of every metric, per method."""
    summary = {}
    for method in result.config.methods:
        rows = [r for r in result.runs if r["method"] == method]
        entry = {"seeds": [r["seed"] for r in rows], "seconds": sum(r["seconds"] for r in rows)}
        for metric in _METRICS:
            values = [r[metric] for r in rows]
            stat = mean_std(values)
            entry[metric] = {"mean": stat.mean, "std": stat.std, "values": values}
        summary[method] = entry
    return summary


def _markdown(result: ComparisonResult, summary: dict, prefix: str, notes: list[str]) -> str:
    cfg = result.config
    t = result.teacher
    lines = [
        "# BCKD on embedded digit detection",
        "",
        f"GFL-style detectors on {cfg.data.image_size}px scenes of scikit-learn handwritten digits "
        f"({cfg.data.train_scenes} training scenes, {cfg.data.test_scenes} test scenes made from disjoint digit "
        f"images). Teacher: {t['params']:,} parameters, {t['source']}, one seed. Students: "
        f"{result.runs[0]['params']:,} parameters, {cfg.student_steps} steps, batch {cfg.batch_size}, "
        f"seeds {list(cfg.seeds)}; for a seed every method starts from the same initialisation and sees "
        "the same batches. COCO metrics (pycocotools) on the test scenes, "
        + ("mean ± std over seeds." if len(cfg.seeds) > 1 else "one seed."),
        "",
        "| model | mAP | AP50 | AP75 | train time (s) |",
        "|---|---|---|---|---|",
        f"| teacher | {100 * t['mAP']:.1f} | {100 * t['AP50']:.1f} | {100 * t['AP75']:.1f} | {t['seconds']:.0f} |",
    ]
    for method, entry in summary.items():
        cells = " | ".join(format_mean_std(mean_std(entry[m]["values"]), scale=100.0) for m in _METRICS)
        lines.append(f"| student + {method} | {cells} | {entry['seconds']:.0f} (all seeds) |")
    d = DistillConfig()
    lines += [
        "",
        "Methods (all on top of the GFL loss: QFL + 2.0 GIoU + 0.25 DFL, ATSS targets; teacher outputs are "
        "fixed, eval mode):",
        "",
        "- `none`: GFL loss only.",
        f"- `kl`: {d.kl_weight} × softmax-KL of the class scores over every anchor, temperature "
        f"{d.kl_temperature} (× T²), divided by the number of positives.",
        f"- `ld`: {d.ld_weight} × LD, KL of the box-side distributions on positive anchors, temperature "
        f"{d.ld_temperature} (× T²), weighted by the student's max score and divided by the sum of those weights.",
        f"- `bckd`: {d.bckd_cls_weight} × BCKD L_cls + {d.bckd_loc_weight} × BCKD L_loc ({d.bckd_iou}), "
        "every anchor, divided by the number of positives (RESEARCH.md §3).",
        "",
    ]
    lines += notes
    lines += [
        "",
        "Per seed (mAP × 100):",
        "",
        "| method | " + " | ".join(f"seed {s}" for s in cfg.seeds) + " |",
    ]
    lines.append("|---|" + "---|" * len(cfg.seeds))
    for method, entry in summary.items():
        lines.append(f"| {method} | " + " | ".join(f"{100 * v:.1f}" for v in entry["mAP"]["values"]) + " |")
    best = max(summary, key=lambda m: summary[m]["mAP"]["mean"])
    others = {m: summary[m]["mAP"]["mean"] for m in summary if m != "bckd"}
    lines += ["", "## Verdict", ""]
    if "bckd" in summary and others:
        bckd = summary["bckd"]["mAP"]["mean"]
        wins = [m for m, v in others.items() if bckd > v]
        paired = {
            m: sum(
                b > o
                for b, o in zip(summary["bckd"]["mAP"]["values"], summary[m]["mAP"]["values"], strict=True)
            )
            for m in others
        }
        lines.append(
            f"Best student method by mean mAP: **{best}**. BCKD mean mAP {100 * bckd:.1f} vs "
            + ", ".join(f"{m} {100 * v:.1f}" for m, v in others.items())
            + f". BCKD beats {len(wins)} of {len(others)} alternatives on the mean; paired by seed it wins "
            + ", ".join(f"{paired[m]}/{len(cfg.seeds)} vs {m}" for m in others)
            + "."
        )
    lines += [
        "",
        f"Total wall time: {result.total_seconds:.0f} s ({result.total_seconds / 60:.1f} min) on "
        f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, shared machine.",
        "",
        f"Plots: `{prefix}_map.png` (mAP per method), `{prefix}_predictions.png` (test predictions, score > 0.3).",
        "",
    ]
    return "\n".join(lines)


def _plot_map(result: ComparisonResult, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    means = [100 * summary[m]["mAP"]["mean"] for m in names]
    stds = [100 * summary[m]["mAP"]["std"] for m in names]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.bar(
        [f"student\n+{m}" for m in names],
        means,
        yerr=stds,
        capsize=4,
        color=[method_color(m) for m in names],
    )
    for i, m in enumerate(names):
        ax.scatter(
            [i] * len(summary[m]["mAP"]["values"]),
            [100 * v for v in summary[m]["mAP"]["values"]],
            color="k",
            s=8,
            zorder=3,
        )
    ax.axhline(100 * result.teacher["mAP"], color=method_color("teacher"), linestyle="--", label="teacher")
    ax.set_ylabel("COCO mAP (test, %)")
    several = len(result.config.seeds) > 1
    ax.set_title("Student distillation, " + ("mean ± std over seeds" if several else "one seed"))
    ax.legend(loc="lower right")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120, format="png")
    plt.close(fig)


def _plot_predictions(
    result: ComparisonResult, path: Path, *, num_images: int = 4, threshold: float = 0.3
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenes = result.test_scenes
    num_images = min(num_images, len(scenes))  # a recipe may have fewer test scenes than columns
    images = scenes.images[:num_images]
    rows = [("ground truth", None)] + [(name, model) for name, model in result.models.items()]
    fig, axes = plt.subplots(
        len(rows), num_images, figsize=(2.0 * num_images, 2.1 * len(rows)), squeeze=False
    )
    for r, (name, model) in enumerate(rows):
        dets = predict(model, images) if model is not None else None
        for c in range(num_images):
            ax = axes[r][c]
            ax.imshow(images[c, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name if name in ("ground truth", "teacher") else f"student+{name}", fontsize=8)
            if dets is None:
                boxes, labels, scores = scenes.boxes[c], scenes.labels[c], torch.ones(len(scenes.labels[c]))
                color = "#55a868"
            else:
                keep = dets[c].scores > threshold
                boxes, labels, scores = dets[c].boxes[keep], dets[c].labels[keep], dets[c].scores[keep]
                color = "#dd8452"
            for (x1, y1, x2, y2), label, score in zip(
                boxes.tolist(), labels.tolist(), scores.tolist(), strict=True
            ):
                ax.add_patch(
                    plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1)
                )
                text = f"{label}" if dets is None else f"{label}:{score:.2f}"
                ax.text(x1, y1, text, color=color, fontsize=6, va="bottom")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110, format="png")
    plt.close(fig)


def write_detection_report(
    result: ComparisonResult, out_dir: str | Path, *, prefix: str = "bckd", notes: list[str] | None = None
) -> dict[str, Path]:
    """Write ``{prefix}.json``, ``{prefix}.md``, ``{prefix}_map.png``, ``{prefix}_predictions.png``.

    ``notes`` are extra markdown lines placed after the description of the methods.
    """
    notes = list(notes or [])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(result)
    payload = {
        "config": result.config.to_dict(),
        "teacher": result.teacher,
        "students": summary,
        "runs": result.runs,
        "total_seconds": result.total_seconds,
        "notes": notes,
        "torch_threads": torch.get_num_threads(),
    }
    paths = {
        "json": out / f"{prefix}.json",
        "md": out / f"{prefix}.md",
        "map": out / f"{prefix}_map.png",
        "predictions": out / f"{prefix}_predictions.png",
    }
    atomic_write_json(paths["json"], payload)
    atomic_write_text(paths["md"], _markdown(result, summary, prefix, notes))
    _plot_map(result, summary, paths["map"])
    _plot_predictions(result, paths["predictions"])
    return paths
