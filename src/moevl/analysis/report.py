"""The comparison report: results.json, report.md and PNG plots, from the results of ``run_compare``.

``write_report`` never changes its input; every file goes through ``moevl.atomic``. With one seed the
tables show values alone (no "± 0.0"); a method has one colour in every figure; accuracy is in % in
figures and tables alike; a panel with no data (e.g. LTDR's tail share when no LTDR method ran) is left
out, not drawn empty.

``results`` layout::

    {"config": {...}, "wall_time_s": float,
     "dense": {"stage1_time_s", "stage2_time_s", "eval": {"accuracy": {family: acc}, "overall", "chance"}},
     "methods": {method: {"runs": {seed: {"train_time_s", "eval": {...}, "moe_stats": moe_stats.json}}}}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from moevl import observability as metrics
from moevl.analysis.display import MeanStd, format_mean_std, mean_std, method_color
from moevl.atomic import atomic_savefig, atomic_write_json, atomic_write_text

__all__ = [
    "HISTORY_KEYS",
    "mean_std",
    "plot_accuracy",
    "plot_curves",
    "plot_expert_load",
    "summarize",
    "write_report",
]

HISTORY_KEYS = {
    "conflict_ratio": metrics.CONFLICT_RATIO,
    "cosine_mean": metrics.COSINE_MEAN,
    "cel": metrics.CEL,
    "tail_share": metrics.TAIL_SHARE,
    "experts_per_token": metrics.EXPERTS_PER_TOKEN,
    "balance_loss": metrics.BALANCE_LOSS,
    "max_vio": metrics.MAX_VIO,
    "router_entropy": metrics.ROUTER_ENTROPY,
    "router_top1": metrics.ROUTER_TOP1,
    "router_logit_std": metrics.ROUTER_LOGIT_STD,
    "router_mi_modality": metrics.ROUTER_MI_MODALITY,
}
#: curve figures of the report: (file stem, [(panel title, HISTORY_KEYS name)], figure title)
CURVE_PLOTS = (
    (
        "conflicts",
        [("conflict ratio", "conflict_ratio"), ("mean token-gradient cosine", "cosine_mean")],
        "Token gradient conflicts during MoE-tuning",
    ),
    (
        "tail_share",
        [("vision tail-token share", "tail_share"), ("experts per token", "experts_per_token")],
        "LTDR: tail tokens and experts per token",
    ),
    (
        "router_health",
        [("normalised router entropy", "router_entropy"), ("router top-1 probability", "router_top1")],
        "Router health during MoE-tuning (1 = uniform routing)",
    ),
)


def _panels(panels: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(label, HISTORY_KEYS[name]) for label, name in panels]


#: normalised router entropy above this reads as "the router no longer routes" (issue 11's bar)
FLAT_ROUTING = 0.95


def _history(stats: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [(h["step"], h[key]) for h in stats.get("history", []) if key in h and h[key] is not None]
    if not rows:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*rows, strict=True)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def summarize(results: dict) -> dict:
    """Per method: accuracy per family (``MeanStd`` over seeds), training time, final routing statistics
    (``None`` where the method does not produce one). Reads ``results`` only."""
    summary: dict[str, Any] = {}
    for method, entry in results.get("methods", {}).items():
        runs = list(entry["runs"].values())
        families = sorted({f for r in runs for f in r["eval"]["accuracy"]})
        s: dict[str, Any] = {
            "seeds": len(runs),
            "accuracy": {
                f: mean_std([r["eval"]["accuracy"][f] for r in runs if f in r["eval"]["accuracy"]])
                for f in families
            },
            "overall": mean_std([r["eval"]["overall"] for r in runs]),
            "train_time_s": mean_std([r["train_time_s"] for r in runs]),
        }
        for name, key in HISTORY_KEYS.items():
            finals = []
            for r in runs:
                _, v = _history(r.get("moe_stats", {}), key)
                if len(v):
                    finals.append(float(v[-max(1, len(v) // 4) :].mean()))  # mean of the last quarter
            s[name] = mean_std(finals) if finals else None
        summary[method] = s
    return summary


def _fmt(stat: MeanStd | None, pct: bool = False, digits: int = 3) -> str:
    return format_mean_std(stat, scale=100.0, digits=1) if pct else format_mean_std(stat, digits=digits)


def plot_accuracy(results: dict, summary: dict, path: Path) -> None:
    """Bars per question family and overall, one colour per method, in % (like the tables)."""
    dense = results["dense"]["eval"]
    families = list(dense["accuracy"])
    names = ["dense", *summary]
    width = 0.8 / len(names)
    x = np.arange(len(families) + 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(x)), 4.2))
    for i, name in enumerate(names):
        if name == "dense":
            means = [dense["accuracy"][f] for f in families] + [dense["overall"]]
            stds = [0.0] * len(means)
        else:
            acc = summary[name]["accuracy"]
            means = [acc[f].mean if f in acc else np.nan for f in families] + [summary[name]["overall"].mean]
            stds = [acc[f].std if f in acc else 0.0 for f in families] + [summary[name]["overall"].std]
        ax.bar(
            x - 0.4 + width * (i + 0.5),
            100 * np.asarray(means, dtype=float),
            width,
            yerr=100 * np.asarray(stds, dtype=float),
            capsize=2,
            label=name,
            color=method_color(name),
        )
    chance = [100 * dense["chance"].get(f, np.nan) for f in families]
    ax.scatter(x[:-1], chance, marker="_", s=900, color="black", zorder=5, label="majority answer (chance)")
    ax.set_xticks(x, [*families, "overall"])
    ax.set_ylim(0, 105)
    ax.set_ylabel("exact-match accuracy (test, %)")
    seeds = max((s["seeds"] for s in summary.values()), default=1)
    ax.set_title(
        "Accuracy per question family" + (" (mean ± std over seeds)" if seeds > 1 else " (one seed)")
    )
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def _curves(results: dict, key: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per method with data for ``key``: steps and values ``(seeds, steps)`` at the common steps."""
    out = {}
    for method, entry in results["methods"].items():
        curves = [_history(r.get("moe_stats", {}), key) for r in entry["runs"].values()]
        curves = [c for c in curves if len(c[0])]
        if curves:
            n = min(len(c[0]) for c in curves)
            out[method] = (curves[0][0][:n], np.stack([c[1][:n] for c in curves]))
    return out


def plot_curves(results: dict, keys: list[tuple[str, str]], path: Path, title: str) -> bool:
    """One panel per key with data, one line per method (mean over seeds at common steps, min-max band).

    Keys no method produced get no panel; with none at all nothing is written and this returns False.
    """
    panels = [(label, data) for label, key in keys if (data := _curves(results, key))]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (label, data) in zip(axes[0], panels, strict=True):
        for method, (steps, values) in data.items():
            color = method_color(method)
            ax.plot(steps, values.mean(0), label=method, color=color)
            if len(values) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), alpha=0.2, color=color)
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return True


def plot_expert_load(results: dict, path: Path) -> bool:
    """Rows: methods; columns: MoE layers; bars: share of vision vs text tokens per expert (first seed)."""
    methods = [
        m
        for m, e in results["methods"].items()
        if next(iter(e["runs"].values())).get("moe_stats", {}).get("expert_load")
    ]
    if not methods:
        return False
    layers = sorted(
        {
            int(k)
            for m in methods
            for k in next(iter(results["methods"][m]["runs"].values()))["moe_stats"]["expert_load"]
        }
    )
    fig, axes = plt.subplots(
        len(methods), len(layers), figsize=(3.6 * len(layers), 2.4 * len(methods)), squeeze=False
    )
    for i, m in enumerate(methods):
        load = next(iter(results["methods"][m]["runs"].values()))["moe_stats"]["expert_load"]
        for j, layer in enumerate(layers):
            ax = axes[i][j]
            entry = load.get(str(layer))
            if entry is None:
                ax.axis("off")
                continue
            for k, (mod, color) in enumerate((("vision", "tab:orange"), ("text", "tab:blue"))):
                counts = np.asarray(entry.get(mod, []), dtype=float)
                if counts.size == 0:
                    continue
                share = counts / max(counts.sum(), 1.0)
                ax.bar(np.arange(len(share)) + (k - 0.5) * 0.4, share, 0.4, color=color, label=mod)
            ax.set_title(f"{m} · layer {layer}", fontsize=9)
            ax.set_xlabel("expert", fontsize=8)
            ax.set_ylim(0, 1)
            if j == 0:
                ax.set_ylabel("share of tokens", fontsize=8)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle("Expert load during MoE-tuning: vision vs text tokens (first seed)")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return True


def write_report(results: dict, out: str | Path) -> Path:
    """Writes results.json (``results`` with each method's summary and the plots), the plots and
    report.md into ``out``; returns the report's path. ``results`` itself is not changed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    plots = {}
    if results.get("methods"):
        plot_accuracy(results, summary, out / "accuracy.png")
        plots["accuracy"] = "accuracy.png"
        for name, panels, title in CURVE_PLOTS[:1]:
            if plot_curves(results, _panels(panels), out / f"{name}.png", title):
                plots[name] = f"{name}.png"
        if plot_expert_load(results, out / "expert_load.png"):
            plots["expert_load"] = "expert_load.png"
        for name, panels, title in CURVE_PLOTS[1:]:
            if plot_curves(results, _panels(panels), out / f"{name}.png", title):
                plots[name] = f"{name}.png"
    saved = {
        **results,
        "methods": {m: {**e, "summary": summary[m]} for m, e in results.get("methods", {}).items()},
        "plots": plots,
    }
    atomic_write_json(out / "results.json", saved)

    dense = results["dense"].get("eval", {})
    families = list(dense.get("accuracy", {}))
    lines = ["# moevl compare", ""]
    if "wall_time_s" in results:
        lines.append(f"Wall time: {results['wall_time_s']:.0f} s.")
    seeds = results.get("config", {}).get("compare", {}).get("seeds", 1)
    spread = (
        "mean ± std over seeds" if max((s["seeds"] for s in summary.values()), default=1) > 1 else "one seed"
    )
    lines += [
        f"Seeds: {seeds}. Accuracy: exact match of the generated answer, test split, % ({spread}).",
        "",
        "A run repeats bit for bit on one machine, but float differences between CPUs grow over the stages' "
        "thousands of steps: on another machine the same command moved every accuracy by several points "
        "(dense 69.0% on one, 62.7% on another). Compare methods within one report, and seeds "
        "(`--seeds`) for their spread.",
        "",
    ]
    lines += ["## Dense model (stages 1-2)", ""]
    lines += ["| | " + " | ".join(families) + " | overall |", "|---" * (len(families) + 2) + "|"]
    lines.append(
        "| dense | "
        + " | ".join(f"{100 * dense['accuracy'][f]:.1f}" for f in families)
        + f" | {100 * dense.get('overall', 0):.1f} |"
    )
    lines.append(
        "| chance (majority answer) | "
        + " | ".join(f"{100 * dense['chance'].get(f, 0):.1f}" for f in families)
        + " | |"
    )
    t1, t2 = results["dense"].get("stage1_time_s"), results["dense"].get("stage2_time_s")
    if t1 is not None and t2 is not None:
        lines += ["", f"Training time: stage 1 {t1:.0f} s, stage 2 {t2:.0f} s."]
    if summary:
        lines += ["", "## MoE-tuning (stage 3), per method", ""]
        lines += [
            "| method | " + " | ".join(families) + " | overall | train time (s) |",
            "|---" * (len(families) + 3) + "|",
        ]
        for m, s in summary.items():
            cells = [_fmt(s["accuracy"].get(f), pct=True) for f in families]
            lines.append(
                f"| {m} | "
                + " | ".join(cells)
                + f" | {_fmt(s['overall'], pct=True)} | {_fmt(s['train_time_s'], digits=1)} |"
            )
        lines += ["", "## Routing statistics (mean of the last quarter of training)", ""]
        lines += [
            "| method | conflict ratio | token-gradient cosine | CEL | tail share | experts/token | balance loss |"
        ]
        lines += ["|---|---|---|---|---|---|---|"]
        for m, s in summary.items():
            lines.append(
                f"| {m} | {_fmt(s['conflict_ratio'])} | {_fmt(s['cosine_mean'])} | {_fmt(s['cel'])} | "
                f"{_fmt(s['tail_share'])} | {_fmt(s['experts_per_token'])} | {_fmt(s['balance_loss'], digits=4)} |"
            )
        lines += ["", "n/a: the method does not produce this statistic."]
        lines += [
            "",
            "## Router health (mean of the last quarter of training, averaged over MoE layers)",
            "",
            "| method | normalised entropy (1 = uniform) | top-1 probability | logit std | MI(expert; modality) / H(modality) | MaxVio (0 = balanced) |",
            "|---|---|---|---|---|---|",
        ]
        flat = []
        for m, s in summary.items():
            lines.append(
                f"| {m} | {_fmt(s['router_entropy'])} | {_fmt(s['router_top1'])} | {_fmt(s['router_logit_std'])} | "
                f"{_fmt(s['router_mi_modality'])} | {_fmt(s['max_vio'])} |"
            )
            if s["router_entropy"] is not None and s["router_entropy"][0] > FLAT_ROUTING:
                flat.append(m)
        if flat:
            lines += [
                "",
                f"**Warning:** the routers of {', '.join(flat)} are close to uniform (normalised entropy > "
                f"{FLAT_ROUTING}): top-k choice there is nearly noise.",
            ]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()]
    examples = dense.get("examples", [])
    if examples:
        lines += [
            "",
            "## Dense model, first test questions",
            "",
            "| question | answer | prediction |",
            "|---|---|---|",
        ]
        lines += [f"| {e['question']} | {e['answer']} | {e['prediction']} |" for e in examples[:6]]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
