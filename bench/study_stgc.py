"""The STGC / LTDR study on the embedded digit benchmark, through the same path as ``moevl compare``.

The dense stages 1-2 are trained once (or reused from ``--dense``); every arm is a stage-3 run (``train_stage``)
from that model with the arm's recipe overrides, for each seed; each run is scored on the validation and the
test split (``evaluate``). Reported per arm: accuracy, router health (normalised router entropy, top-1
probability, logit spread: mean over MoE layers and over the last quarter of training) and the conflict
ratio, as mean and 95% interval over seeds, and the per-seed paired difference to ``baseline``.

    python -m bench.study_stgc --seeds 5 --out runs/study            # results under bench/results/stgc_study/

Not a test: it trains for minutes per run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from moevl import observability as metrics
from moevl.atomic import atomic_write_json, atomic_write_text
from moevl.vlm.compare import demo_config

RESULTS = Path(__file__).resolve().parent / "results" / "stgc_study"
ROW_FILE = "study_row.json"  # a finished run's row, beside its model: an interrupted study resumes after it

#: STGC as the paper writes it, whatever moevl's default is: beta * L_cel over the conflicting pairs, beta 0.5
PAPER = ["moe.stgc.weight_mode=absolute", "moe.stgc.weight=0.5", "moe.stgc.centered=false"]


def _paper(*changes: str) -> tuple[str, list[str]]:
    return "stgc", [*PAPER, *changes]


def _relative(rho: float, *changes: str) -> tuple[str, list[str]]:
    """The CEL gradient at rho times the norm of the router logits' own gradient (weight_mode=relative)."""
    return "stgc", [*PAPER, "moe.stgc.weight_mode=relative", f"moe.stgc.weight={rho}", *changes]


CENTERED = (
    "moe.stgc.centered=true"  # each dispatched pair weighted by (conflict - its expert's conflict rate)
)

#: arm -> (method, recipe overrides), later overrides winning. The STGC options are the ones issue 11 asks
#: to compare; "stgc" is moevl's default, whatever it is when the study runs.
ARMS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("baseline", []),
    "stgc": ("stgc", []),
    "ltdr": ("ltdr", []),
    "stgc_paper": _paper(),  # the paper's setting by the name issue 23's schema uses (= stgc_beta0.5)
    "stgc+ltdr": ("stgc+ltdr", []),
    "stgc_beta0.5": _paper(),
    "stgc_beta0.1": _paper("moe.stgc.weight=0.1"),
    "stgc_beta0.02": _paper("moe.stgc.weight=0.02"),
    "stgc_tau-0.1": _paper("moe.stgc.threshold=-0.1"),
    "stgc_one_minus_p": _paper("moe.stgc.cel=one_minus_p"),
    "stgc_next_best": _paper("moe.stgc.cel=next_best"),
    "stgc_next_best_beta0.1": _paper("moe.stgc.cel=next_best", "moe.stgc.weight=0.1"),
    "stgc_next_best_beta0.02": _paper("moe.stgc.cel=next_best", "moe.stgc.weight=0.02"),
    "stgc_rel0.1": _relative(0.1),
    "stgc_rel0.3": _relative(0.3),
    "stgc_rel1": _relative(1.0),
    "stgc_next_best_rel0.3": _relative(0.3, "moe.stgc.cel=next_best"),
    "stgc_centered": _paper(CENTERED),
    "stgc_centered_beta1": _paper(CENTERED, "moe.stgc.weight=1.0"),
    "stgc_centered_next_best": _paper(CENTERED, "moe.stgc.cel=next_best"),
    "stgc_centered_rel0.1": _relative(0.1, CENTERED),
    "stgc_centered_rel0.3": _relative(0.3, CENTERED),
    "stgc_centered_rel1": _relative(1.0, CENTERED),
    # LTDR's ablations (its paper's kind): each part alone, a fixed tail share against the adaptive rule, a
    "ltdr_msdar_only": ("ltdr", ["moe.ltdr.vision_tail=false"]),
    "ltdr_vsdea_only": ("ltdr", ["moe.ltdr.language_only_balance=false"]),
    "ltdr_tail0.1": ("ltdr", ["moe.ltdr.tail_ratio=0.1"]),
    "ltdr_tail0.2": ("ltdr", ["moe.ltdr.tail_ratio=0.2"]),
    "ltdr_a3": ("ltdr", ["moe.ltdr.tail_top_k=3"]),  # "ltdr" is a = 4 (every expert, E = 4)
}
HEALTH = {
    "router_entropy_normalized": metrics.ROUTER_ENTROPY,
    "router_top1_prob": metrics.ROUTER_TOP1,
    "router_logit_std": metrics.ROUTER_LOGIT_STD,
    "conflict_ratio": metrics.CONFLICT_RATIO,
    "negative_cosine_share": metrics.NEGATIVE_SHARE,
    "experts_per_token": metrics.EXPERTS_PER_TOKEN,
    "cel_grad_ratio": metrics.CEL_GRAD_RATIO,
    "balance_loss": metrics.BALANCE_LOSS,
}
# two-sided 95% Student t quantiles by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def interval(values: list[float]) -> dict[str, float | None]:
    """Mean and the half-width of its 95% t interval (None with one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": None, "n": len(values)}
    t = _T95.get(len(values) - 1, 1.96)
    return {"mean": mean, "ci95": t * statistics.stdev(values) / math.sqrt(len(values)), "n": len(values)}


def last_quarter(history: list[dict], key: str) -> float | None:
    values = [h[key] for h in history if key in h]
    if not values:
        return None
    return statistics.fmean(values[-max(1, len(values) // 4) :])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from moevl.data import read_records
    from moevl.vlm.compare import _evaluation, run_compare
    from moevl.vlm.io import MODEL_DIR
    from moevl.vlm.train import train_stage

    out = Path(args.out)
    # dense stages 1-2 (reused when done): run_compare with no method trains them and evaluates them
    dense_cfg = demo_config(None, [*args.set, "compare.methods=[baseline]", "compare.seeds=1"])
    if not (out / "dense" / "stage2" / MODEL_DIR / "moevl.json").is_file():
        run_compare(dense_cfg, out, progress=False)
    dense = out / "dense" / "stage2" / MODEL_DIR
    data = out / "data"
    if args.stage3_set:  # stage 3 meets data the dense stages never saw (written once, the same vocabulary)
        from moevl.data.digits import write_digit_benchmark

        data = out / "data_stage3"
        stage3_cfg = demo_config(None, [*args.set, *args.stage3_set])
        write_digit_benchmark(data, stage3_cfg.demo.benchmark)
    records = {
        split: read_records(data / f"{split}.json", image_folder=data).records
        for split in ("validation", "test")
    }
    train_records = read_records(data / "instruct.json", image_folder=data).records
    results: dict[str, Any] = {
        "config": {
            "seeds": args.seeds,
            "arms": {a: ARMS[a] for a in args.arms},
            "title": args.title,
            "set": args.set,
            "stage3_set": args.stage3_set,
        },
        "arms": {},
    }
    start = time.perf_counter()
    for seed in range(args.seeds):  # seed-major: partial results hold every arm, paired by seed
        for arm in args.arms:
            method, overrides = ARMS[arm]
            cfg = demo_config(None, [*args.set, *args.stage3_set, *overrides])
            d = out / "study" / arm / f"seed{seed}"
            done = d / ROW_FILE
            if done.is_file():  # finished in an earlier (interrupted) invocation: resume after it
                row = json.loads(done.read_text())
            else:
                print(f"{arm} seed {seed} -> {d}", flush=True)
                r = train_stage(
                    cfg, stage=3, model=dense, output_dir=d, data=data / "instruct.json", image_folder=data,
                    method=method, seed=seed, overwrite=True, progress=False, log=lambda *_: None,
                )  # fmt: skip
                history = json.loads((d / "moe_stats.json").read_text())["history"]
                row = {"seed": seed, "train_time_s": r.train_time_s}
                for name, key in HEALTH.items():
                    row[name] = last_quarter(history, key)
                for split, recs in records.items():
                    ev = _evaluation(r.model_dir, recs, train_records, cfg, progress=False)
                    row[f"{split}_accuracy"] = ev["overall"]
                    row[f"{split}_per_category"] = ev["accuracy"]
                atomic_write_json(done, row)
            results["arms"].setdefault(arm, {"runs": []})["runs"].append(row)
            if args.partial:
                results["wall_time_s"] = time.perf_counter() - start
                summarize(results)
                _write(Path(args.results), results, quiet=True)
    results["wall_time_s"] = time.perf_counter() - start
    summarize(results)
    return results


def summarize(results: dict[str, Any]) -> None:
    base_runs = {r["seed"]: r for r in results["arms"].get("baseline", {}).get("runs", [])}
    for arm, entry in results["arms"].items():
        runs = entry["runs"]
        summary = {}
        for key in ("validation_accuracy", "test_accuracy", *HEALTH):
            values = [r[key] for r in runs if r.get(key) is not None]
            summary[key] = interval(values) if values else None
        paired = {}
        if arm != "baseline" and base_runs:
            for key in (
                "validation_accuracy",
                "test_accuracy",
                "router_entropy_normalized",
                "conflict_ratio",
            ):
                diffs = [
                    r[key] - base_runs[r["seed"]][key]
                    for r in runs
                    if r["seed"] in base_runs
                    and r.get(key) is not None
                    and base_runs[r["seed"]].get(key) is not None
                ]
                if diffs:
                    paired[key] = interval(diffs)
        entry["summary"] = summary
        entry["paired_vs_baseline"] = paired
        # the two numbers issue 11 asks for, at the top level of each arm
        entry["router_entropy_normalized"] = (
            summary["router_entropy_normalized"]["mean"] if summary["router_entropy_normalized"] else None
        )
        entry["conflict_ratio"] = summary["conflict_ratio"]["mean"] if summary["conflict_ratio"] else None


#: the constraints of the default STGC setting (issue 11): routing clearly non-uniform, load kept balanced
MAX_ENTROPY, MAX_BALANCE = 0.95, 1.05


def choose_default(results: dict[str, Any]) -> str | None:
    """The STGC arm the default is taken from: among the arms whose conflict ratio is lower than baseline's
    (paired 95% interval below 0), whose router entropy is <= MAX_ENTROPY and balance loss <= MAX_BALANCE,
    the highest mean validation accuracy. None when no arm qualifies."""
    best, best_acc = None, -1.0
    for arm, e in results["arms"].items():
        s, p = e["summary"], e["paired_vs_baseline"]
        if not arm.startswith("stgc") or not s.get("validation_accuracy"):
            continue
        if not verdict(p, "conflict_ratio", "lower").startswith("lower"):
            continue
        balance = s.get("balance_loss")
        if e["router_entropy_normalized"] > MAX_ENTROPY or (balance and balance["mean"] > MAX_BALANCE):
            continue
        if s["validation_accuracy"]["mean"] > best_acc:
            best, best_acc = arm, s["validation_accuracy"]["mean"]
    return best


def verdict(paired: dict[str, Any] | None, key: str, better: str) -> str:
    """ "lower"/"higher" when the 95% interval of the paired difference excludes 0 in that direction."""
    if not paired or key not in paired or paired[key]["ci95"] is None:
        return "n/a"
    m, h = paired[key]["mean"], paired[key]["ci95"]
    if m + h < 0:
        return "lower" + (" (as claimed)" if better == "lower" else "")
    if m - h > 0:
        return "higher" + (" (as claimed)" if better == "higher" else "")
    return "no difference at this scale"


def _fmt(x: dict | None, pct: bool = False) -> str:
    if not x:
        return "n/a"
    scale = 100 if pct else 1
    digits = 1 if pct else 3
    if x["ci95"] is None:
        return f"{scale * x['mean']:.{digits}f}"
    return f"{scale * x['mean']:.{digits}f} ± {scale * x['ci95']:.{digits}f}"


def report(results: dict[str, Any]) -> str:
    lines = [
        f"# STGC / LTDR study ({results['config'].get('title', 'embedded digit benchmark')})",
        "",
        f"Seeds per arm: {results['config']['seeds']}; mean ± 95% interval (t). Router statistics: mean over "
        "MoE layers and the last quarter of stage 3. Accuracy: exact match after VQAv2 normalisation, %.",
        "",
        "| arm | validation acc | test acc | router entropy (norm.) | top-1 prob | logit std | conflict ratio | cos < 0 share | experts/token | CEL / router grad | balance loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, e in results["arms"].items():
        s = e["summary"]
        lines.append(
            f"| {arm} | {_fmt(s['validation_accuracy'], True)} | {_fmt(s['test_accuracy'], True)} | "
            f"{_fmt(s['router_entropy_normalized'])} | {_fmt(s['router_top1_prob'])} | {_fmt(s['router_logit_std'])} | "
            f"{_fmt(s['conflict_ratio'])} | {_fmt(s['negative_cosine_share'])} | {_fmt(s['experts_per_token'])} | "
            f"{_fmt(s.get('cel_grad_ratio'))} | {_fmt(s.get('balance_loss'))} |"
        )
    lines += [
        "",
        "## Paired with baseline (same seed), difference and verdict",
        "",
        "| arm | Δ test acc (pp) | verdict: accuracy | Δ conflict ratio | verdict: conflicts | Δ router entropy | verdict: routing | uniform? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, e in results["arms"].items():
        if arm == "baseline":
            continue
        p = e["paired_vs_baseline"]
        flat = e["router_entropy_normalized"] is not None and e["router_entropy_normalized"] > 0.95
        lines.append(
            f"| {arm} | {_fmt(p.get('test_accuracy'), True)} | {verdict(p, 'test_accuracy', 'higher')} | "
            f"{_fmt(p.get('conflict_ratio'))} | "
            f"{verdict(p, 'conflict_ratio', 'lower')} | {_fmt(p.get('router_entropy_normalized'))} | "
            f"{verdict(p, 'router_entropy_normalized', 'lower')} | {'yes (> 0.95)' if flat else 'no'} |"
        )
    chosen = choose_default(results)
    lines += [
        "",
        f"Default chosen on validation: **{chosen}** (the STGC arm of highest validation accuracy among those "
        f"that lower the conflict ratio, paired 95% interval, with router entropy <= {MAX_ENTROPY} and balance "
        f"loss <= {MAX_BALANCE}).",
        "",
        f"Run time: {results.get('wall_time_s', 0):.0f} s (summed over the studies combined, if any).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {list(ARMS)}")
    parser.add_argument("--out", default="runs/study", help="run directory (models, logs)")
    parser.add_argument("--results", default=str(RESULTS), help="where results.json and report.md go")
    parser.add_argument("--set", action="append", default=[], help="recipe override for every arm")
    parser.add_argument(
        "--stage3-set",
        action="append",
        default=[],
        help="benchmark override for stage 3 and its evaluation only: the dense stages train on the data "
        "without it (a task MoE-tuning meets first, e.g. demo.benchmark.negated_share=0.3)",
    )
    parser.add_argument("--title", default="embedded digit benchmark", help="what the report's title names")
    parser.add_argument(
        "--merge", action="store_true", help="add these arms to the results already in --results"
    )
    parser.add_argument(
        "--partial", action="store_true", help="rewrite --results after every finished run (a long study)"
    )
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="DIR",
        help="run nothing: combine the results.json of these directories (studies run side by side, one per "
        "core, on the same --out) into --results, the router statistics read again from --out's logs",
    )
    args = parser.parse_args()
    if args.combine:
        parts = [json.loads((Path(d) / "results.json").read_text()) for d in args.combine]
        results = {
            "config": {"seeds": parts[0]["config"]["seeds"], "arms": {}, "title": args.title},
            "arms": {},
            "wall_time_s": sum(p.get("wall_time_s", 0.0) for p in parts),  # process time, side by side or not
        }
        for part in parts:
            results["config"]["arms"].update(part["config"]["arms"])
            results["arms"].update(part["arms"])
        for arm, entry in results["arms"].items():  # router statistics again from the runs' logs, when kept
            for row in entry["runs"]:
                stats = Path(args.out) / "study" / arm / f"seed{row['seed']}" / "moe_stats.json"
                if stats.is_file():
                    history = json.loads(stats.read_text())["history"]
                    row.update({name: last_quarter(history, key) for name, key in HEALTH.items()})
        summarize(results)
        _write(Path(args.results), results)
        return
    args.arms = [a.strip() for a in args.arms.split(",")]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown {unknown}; expected some of {list(ARMS)}")
    if args.seeds < 1:
        parser.error(f"--seeds must be an integer >= 1, got {args.seeds}")
    results = run(args)
    dest = Path(args.results)
    if args.merge and (dest / "results.json").is_file():
        old = json.loads((dest / "results.json").read_text())
        results["arms"] = {**old["arms"], **results["arms"]}
        results["config"]["arms"] = {**old["config"]["arms"], **results["config"]["arms"]}
        results["wall_time_s"] += old.get("wall_time_s", 0.0)
        summarize(results)
    _write(dest, results)


def plot_paired(results: dict[str, Any], path: Path) -> None:
    """Per arm, the paired difference to baseline (mean and 95% interval) of test accuracy, conflict ratio and
    router entropy: one panel each, 0 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moevl.atomic import atomic_write_to

    arms = [a for a in results["arms"] if a != "baseline" and results["arms"][a]["paired_vs_baseline"]]
    if not arms:
        return
    panels = [("test_accuracy", "test accuracy (pp)", 100), ("conflict_ratio", "conflict ratio", 1),
              ("router_entropy_normalized", "router entropy", 1)]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 0.5 * len(arms) + 1.5), sharey=True)
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        for i, arm in enumerate(arms):
            d = results["arms"][arm]["paired_vs_baseline"].get(key)
            if d:
                ax.errorbar(
                    scale * d["mean"], i, xerr=scale * (d["ci95"] or 0), fmt="o", color="k", capsize=3
                )
        ax.axvline(0, color="#c44", lw=0.8)
        ax.set_title(f"Δ {label} vs baseline", fontsize=9)
    axes[0].set_yticks(range(len(arms)), arms)
    axes[0].invert_yaxis()
    fig.tight_layout()
    atomic_write_to(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def _write(dest: Path, results: dict[str, Any], quiet: bool = False) -> None:
    atomic_write_json(dest / "results.json", results)
    atomic_write_text(dest / "report.md", report(results))
    plot_paired(results, dest / "paired.png")
    if not quiet:
        print(report(results))


if __name__ == "__main__":
    main()
