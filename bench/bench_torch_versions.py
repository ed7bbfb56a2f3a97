"""``bench_moe_layer`` under two (or more) torch installs, interleaved row by row, side by side (issue 35).

Each row of ``bench/bench_moe_layer.py`` (``measure``: one shape, dtype and thread count; host allocator
``retain``, moevl's default) runs in its own process under each interpreter (``--python``, e.g. a venv with
torch 2.13.0 and one with torch 2.14.1) on this worktree's code (``PYTHONPATH=src:.``), the installs one after
the other for the same row, their order reversed every time (A B, B A, ...), so that a change of the machine's
load hits both alike within seconds. Each row's ``x / dense rate`` is the ratio measured in its own process
(interleaved with the dense matmuls there); this script reports, per torch install, the median over rounds.
Writes bench/results/<out>.{json,md}.

    python -m bench.bench_torch_versions --python /work/main/.venv/bin/python --python .venv/bin/python \\
        [--rounds 2] [--threads 2] [--dtypes float32,bfloat16] [--hf grouped_mm] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import load_average, write

ROOT = Path(__file__).resolve().parents[1]
#: what each interpreter reports of itself: torch (and its build), transformers, the CPU backends
PROBE = (
    "import json, torch, transformers; print(json.dumps({'torch': torch.__version__, "
    "'cuda_build': torch.version.cuda, 'cuda_available': torch.cuda.is_available(), "
    "'transformers': transformers.__version__, "
    "'blas': torch.backends.mkl.is_available() and 'MKL' or 'other', "
    "'parallel': [l.strip() for l in torch.__config__.parallel_info().splitlines() if l.strip()][:6]}))"
)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}


def probe(python: str) -> dict:
    out = subprocess.run([python, "-c", PROBE], check=True, stdout=subprocess.PIPE, text=True, env=_env())
    return json.loads(out.stdout)


#: one row in its own process: bench_moe_layer's ``measure``, as its ``--worker retain`` process runs it
ROW = (
    "import json, sys, torch; from moevl.allocator import retain_freed_memory; "
    "from bench.bench_moe_layer import measure; assert retain_freed_memory(); a = json.loads(sys.argv[1]); "
    "torch.set_num_threads(a['threads']); "
    "print(json.dumps(measure(a['shape'], getattr(torch, a['dtype']), 'cpu', a['hf'], a['repeats'])))"
)


def run_row(python: str, row: dict) -> tuple[dict, float]:
    t0 = time.perf_counter()
    out = subprocess.run(
        [python, "-c", ROW, json.dumps(row)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1]), time.perf_counter() - t0


def key(rec: dict) -> tuple:
    s = rec["shape"]
    return (f"T={s['T']} D={s['D']} H={s['H']} E={s['E']} k={s['k']}", rec["dtype"], rec["threads"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--python", action="append", required=True, help="an interpreter (give two or more)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="worker runs per interpreter (order alternating)"
    )
    parser.add_argument("--threads", default="2", help="CPU thread counts, comma-separated")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="CPU dtypes, comma-separated")
    parser.add_argument("--hf", default="grouped_mm", help="transformers implementations to time")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per row in each worker")
    parser.add_argument("--out", default="torch_versions", help="results name")
    args = parser.parse_args()
    if len(args.python) < 2 or args.rounds < 1:
        parser.error("give --python at least twice and --rounds >= 1")
    installs = {py: probe(py) for py in args.python}
    names = {py: f"torch {info['torch']}" for py, info in installs.items()}
    from bench.bench_moe_layer import CPU_SHAPES

    plan = [
        {"shape": shape, "dtype": dtype, "threads": int(t), "hf": args.hf.split(","), "repeats": args.repeats}
        for t in args.threads.split(",")
        for shape in CPU_SHAPES
        for dtype in args.dtypes.split(",")
    ]
    load_start = load_average()
    runs = []  # one per (round, row, python)
    flip = False
    for r in range(args.rounds):
        for row in plan:
            for py in args.python[::-1] if flip else args.python:
                rec, seconds = run_row(py, row)
                runs.append({"round": r, "python": py, "torch": installs[py]["torch"], "seconds": seconds,
                             "load_after": load_average(), "records": [rec]})  # fmt: skip
                print(f"round {r} {key(rec)} {names[py]}: {seconds:.0f} s, moevl/dense "
                      f"{rec['dense_ratio']['moevl']:.3f}, load {load_average()}", file=sys.stderr, flush=True)  # fmt: skip
            flip = not flip
    load = {"start": load_start, "end": load_average()}

    rows, summary = [], []
    keys = list(dict.fromkeys(key(rec) for run in runs for rec in run["records"]))
    for k in keys:
        row_by_install = {}
        for py in args.python:
            recs = [rec for run in runs if run["python"] == py for rec in run["records"] if key(rec) == k]
            ratios = {
                n: statistics.median(rec["dense_ratio"][n] for rec in recs) for n in recs[0]["dense_ratio"]
            }
            ms = {n: 1e3 * statistics.median(rec["seconds"][n] for rec in recs) for n in recs[0]["seconds"]}
            best_hf = max((v, n) for n, v in ratios.items() if n.startswith("hf_"))
            row_by_install[py] = {"ratios": ratios, "ms": ms, "best_hf": best_hf[1], "rounds": len(recs)}
            rows.append([*k, names[py], ms["moevl"], ms["dense"], ratios["moevl"], ratios["moevl_sorted"],
                         best_hf[0], [round(rec["dense_ratio"]["moevl"], 3) for rec in recs]])  # fmt: skip
        summary.append({"shape": k[0], "dtype": k[1], "threads": k[2],
                        "by_torch": {installs[py]["torch"]: v for py, v in row_by_install.items()}})  # fmt: skip
    header = ["shape", "dtype", "threads", "torch", "moevl ms", "dense mm ms", "moevl / dense rate",
              "moevl sorted / dense rate", "best HF / dense rate", "moevl / dense rate per round"]  # fmt: skip
    lines = [
        "`bench/bench_moe_layer.py`'s rows (forward+backward of one MoE layer; `x / dense rate` = dense time / x",
        "time, measured interleaved in one process) under each torch install: each row in its own process, the",
        f"installs back to back for the same row, their order reversed every time ({args.rounds} rounds; host",
        f"allocator `retain`; `--repeats {args.repeats}`; HF `{args.hf}`). Each cell is the median over rounds;",
        "the last column lists each round's moevl ratio.",
        "Installs:",
        *(f"* {names[py]} ({py}): {json.dumps(info)}" for py, info in installs.items()),
        f"Load average (1, 5, 15 min) at the start: {load['start']}, at the end: {load['end']} (this bench's own"
        " threads count in it); the 1-minute load after each process: "
        + ", ".join(f"{r['load_after'][0]}" for r in runs if r["load_after"])
        + ".",
    ]
    write(
        args.out,
        {"installs": installs, "load_average": load, "summary": summary, "runs": runs, "args": vars(args)},
        header,
        rows,
        "\n".join(lines),
    )


if __name__ == "__main__":
    main()
