"""MoE layer forward+backward: moevl against transformers' experts and against dense matmuls.

Same weights, same routing (softmax top-k, renormalised), side by side in one interleaved run:
moevl's ``MoEFeedForward`` (router + grouped experts with the hand-written backward + balancing
loss) vs transformers' OLMoE sparse block with each ``experts_implementation``, and the *dense
rate*: the same matmul FLOPs as plain ``torch.mm`` calls over all ``T·k`` rows, i.e. for each of
the two expert linear layers its forward ``X W`` and backward ``dY Wᵀ``, ``Xᵀ dY`` (issue 13).
``dense ratio = dense time / moevl time`` (1.0 = as fast as one big matmul per call).

CPU (default): fp32 and bf16, at each ``--threads`` count, and for each host allocator setting
(``--allocators``: ``retain``, moevl's default, ``moevl.allocator.retain_freed_memory``; ``system``, glibc's
default), each in its own process since the setting is process-wide; writes bench/results/moe_layer.{json,md}.
GPU: ``--device cuda`` runs bf16 on the GPU shapes (the two CPU shapes and T=8192 D=2048 H=768
E=128 k=8) against transformers' ``grouped_mm``, ``batched_mm`` (where its per-pair weight copies
fit) and the kernel backends ``deepgemm`` / ``sonicmoe`` (where they load), and reports TFLOP/s
and the fraction of the dense bf16 rate measured in the same run; writes
bench/results/moe_layer_cuda.{json,md}.

    python -m bench.bench_moe_layer [--quick] [--threads 1,2] [--dtypes float32,bfloat16] [--allocators retain,system]
                                    [--competing none,busy]
    python -m bench.bench_moe_layer --device cuda
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from transformers import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

from bench.common import load_average, saved_activation_bytes, time_interleaved, write
from moevl.moe import GroupedExperts, MoEFeedForward, TopKRouter

CPU_SHAPES = [dict(T=2048, D=512, H=1024, E=8, k=2), dict(T=2048, D=512, H=256, E=64, k=8)]
GPU_SHAPES = [*CPU_SHAPES, dict(T=8192, D=2048, H=768, E=128, k=8)]
CPU_HF_IMPLS = ["grouped_mm", "batched_mm", "eager"]
# deepgemm / sonicmoe load their kernels through the `kernels` package (Hub download); an
# implementation that cannot run here is reported as unavailable, with the error, and left out.
GPU_HF_IMPLS = ["grouped_mm", "batched_mm", "deepgemm", "sonicmoe"]
BATCHED_MM_MAX_BYTES = 16 * 2**30  # batched_mm gathers one weight copy per (token, expert) pair


def build(shape, dtype, device, hf_impls):
    torch.manual_seed(0)
    moe = MoEFeedForward(
        router=TopKRouter(hidden_size=shape["D"], num_experts=shape["E"], top_k=shape["k"]),
        experts=GroupedExperts(num_experts=shape["E"], hidden_size=shape["D"], intermediate_size=shape["H"]),
    ).to(device)
    hf = {}
    for impl in hf_impls:
        # one config per block: the experts read their implementation from it at every call
        cfg = OlmoeConfig(
            hidden_size=shape["D"],
            intermediate_size=shape["H"],
            num_experts=shape["E"],
            num_experts_per_tok=shape["k"],
            norm_topk_prob=True,
        )
        cfg._experts_implementation = impl
        block = OlmoeSparseMoeBlock(cfg).to(device)
        with torch.no_grad():
            block.gate.weight.copy_(moe.router.weight)
            block.experts.gate_up_proj.copy_(moe.experts.gate_up_proj)
            block.experts.down_proj.copy_(moe.experts.down_proj)
        hf[impl] = block.to(dtype)
    # NOTE: moevl keeps the router in fp32 (MoE-LLaVA); OLMoE's router runs in the model dtype.
    moe.experts.to(dtype)
    return moe, hf


def step_fn(module, x, is_moevl, layout="auto"):
    def run():
        module.zero_grad(set_to_none=True)
        xx = x.detach().requires_grad_()
        if is_moevl:
            module.experts.layout = layout
            out, rec = module(xx)
            loss = out.float().square().mean() + 0.01 * rec.balance_loss
            loss.backward()
        else:
            loss = module(xx).float().square().mean()
            loss.backward()
        return loss

    return run


def dense_fn(shape, dtype, device):
    """The experts' matmul FLOPs as six dense ``torch.mm`` over all ``P = T·k`` rows."""
    p, d, h = shape["T"] * shape["k"], shape["D"], shape["H"]
    g = torch.Generator(device=device).manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g, device=device, dtype=dtype)

    x, a, hid, dy = r(p, d), r(p, 2 * h), r(p, h), r(p, d)
    w_in, w_out = r(2 * h, d), r(d, h)  # nn.Linear layout, as the experts' weights

    def run():
        torch.mm(x, w_in.t())  # gate_up forward
        torch.mm(hid, w_out.t())  # down forward
        torch.mm(dy, w_out)  # down: input grad
        torch.mm(dy.t(), hid)  # down: weight grad
        torch.mm(a, w_in)  # gate_up: input grad
        torch.mm(a.t(), x)  # gate_up: weight grad

    return run


def expert_flops(shape):
    """Forward+backward matmul FLOPs of the experts: 3 passes x 2 linear layers."""
    p, d, h = shape["T"] * shape["k"], shape["D"], shape["H"]
    return 3 * (2 * p * d * 2 * h + 2 * p * h * d)


def measure(shape, dtype, device, hf_impls, repeats):
    unavailable = {}
    p, d, h = shape["T"] * shape["k"], shape["D"], shape["H"]
    if "batched_mm" in hf_impls and p * 3 * h * d * dtype.itemsize > BATCHED_MM_MAX_BYTES:
        unavailable["batched_mm"] = "per-pair weight copies do not fit"
    moe, hf = build(shape, dtype, device, [k for k in hf_impls if k not in unavailable])
    x = torch.randn(1, shape["T"], shape["D"], dtype=dtype, device=device)
    err = {}
    with torch.no_grad():
        ref = moe(x)[0].float()
        for k, b in list(hf.items()):
            try:
                err[k] = float((b(x).float() - ref).abs().max())
            except Exception as exc:  # a kernel backend that does not load or run here
                unavailable[k] = f"{type(exc).__name__}: {exc}"[:200]
                del hf[k]
    fns = {"moevl": step_fn(moe, x, True), "dense": dense_fn(shape, dtype, device)}
    if device == "cpu":  # the experts' rows as torch's grouped_mm takes them, one mm per expert (issue 24)
        fns["moevl_sorted"] = step_fn(moe, x, True, layout="sorted")
    fns |= {f"hf_{k}": step_fn(b, x, False) for k, b in hf.items()}
    sync = torch.cuda.synchronize if device == "cuda" else None
    times, ratios = time_interleaved(fns, repeats=repeats, warmup=2, sync=sync, ratio_to="dense")
    mem = {} if device == "cuda" else {n: saved_activation_bytes(f) for n, f in fns.items() if n != "dense"}
    best_hf = min((v, k) for k, v in times.items() if k.startswith("hf_"))
    return {
        "shape": shape,
        "dtype": str(dtype).replace("torch.", ""),
        "device": device,
        "threads": torch.get_num_threads(),
        "seconds": times,
        "dense_ratio": {k: 1 / v for k, v in ratios.items() if k != "dense"},
        "tflops": {k: expert_flops(shape) / v / 1e12 for k, v in times.items()},
        "saved_activation_bytes": mem,
        "max_abs_output_diff_vs_moevl": err,
        "hf_unavailable": unavailable,
        "best_hf": best_hf[1],
        "speedup_vs_best_hf": best_hf[0] / times["moevl"],
    }


def shape_name(s):
    return f"T={s['T']} D={s['D']} H={s['H']} E={s['E']} k={s['k']}"


def run_rows(args, allocator: str | None) -> tuple[list[dict], list[list]]:
    """This process's measurements (``allocator``: the host allocator setting it runs under, CPU only)."""
    repeats = args.repeats or (3 if args.quick else 7)
    records, rows = [], []
    if args.device == "cuda":
        runs = [(None, s, torch.bfloat16) for s in GPU_SHAPES]
        hf_impls = GPU_HF_IMPLS
    else:
        threads = [int(t) for t in args.threads.split(",")]
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
        runs = [(t, s, dt) for t in threads for s in CPU_SHAPES for dt in dtypes]
        hf_impls = args.hf.split(",")
    for t, shape, dtype in runs:
        if t is not None:
            torch.set_num_threads(t)
        rec = measure(shape, dtype, args.device, hf_impls, repeats) | {"allocator": allocator}
        records.append(rec)
        sec = rec["seconds"]
        row = [shape_name(shape), rec["dtype"], rec["threads"], sec["moevl"] * 1e3]
        row += [] if args.device == "cuda" else [sec["moevl_sorted"] * 1e3]
        row += [sec["dense"] * 1e3]
        row += [sec[f"hf_{k}"] * 1e3 if f"hf_{k}" in sec else "n/a" for k in hf_impls]
        row += [rec["dense_ratio"]["moevl"]]
        row += [] if args.device == "cuda" else [rec["dense_ratio"]["moevl_sorted"]]
        row += [rec["dense_ratio"][rec["best_hf"]], rec["speedup_vs_best_hf"]]
        row += [rec["tflops"]["moevl"], rec["tflops"]["dense"]]
        rows.append(row if allocator is None else [allocator, *row])
        print(rows[-1], file=sys.stderr, flush=True)
    return records, rows


def _run_beside(cmd: list[str], *, busy: bool) -> str:
    """``cmd``'s stdout; with ``busy``, while a second process spins on one core (pure Python, no threads of
    its own): what a shared machine does to a bench whose threads must all arrive at each parallel region."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--repeats", type=int, default=0, help="timed rounds per row (default 7, --quick 3)")
    parser.add_argument(
        "--hf", default=",".join(CPU_HF_IMPLS), help="CPU: transformers implementations to time"
    )
    parser.add_argument("--out", default="", help="results name (default moe_layer, moe_layer_cuda on GPU)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", default="1,2", help="CPU thread counts, comma-separated")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="CPU dtypes, comma-separated")
    parser.add_argument(
        "--allocators",
        default="retain,system",
        help="CPU host allocator settings, comma-separated (module doc)",
    )
    parser.add_argument(
        "--competing",
        default="none",
        help="CPU: comma-separated subset of none,busy: 'busy' measures each allocator setting again with one "
        "competing process spinning on a core beside the bench (issue 24's contended row)",
    )
    parser.add_argument("--worker", choices=["retain", "system"], help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    if args.worker is not None:  # measure under one allocator setting, records and rows as JSON on stdout
        if args.worker == "retain":
            from moevl.allocator import retain_freed_memory

            if not retain_freed_memory():
                raise SystemExit(
                    "--allocators retain: the C library is not glibc; run with --allocators system"
                )
        print(json.dumps(run_rows(args, args.worker)))
        return
    load_start = load_average()
    cpu = args.device == "cpu"
    hf_impls = GPU_HF_IMPLS if args.device == "cuda" else args.hf.split(",")
    header = ["shape", "dtype", "threads", "moevl ms", *(["moevl sorted ms"] if cpu else []), "dense mm ms"]
    header += [f"HF {k} ms" for k in hf_impls]
    header += ["moevl / dense rate", *(["moevl sorted / dense rate"] if cpu else [])]
    header += ["best HF / dense rate", "speedup vs best HF (x)"]
    header += ["moevl TFLOP/s", "dense TFLOP/s"]
    if args.device == "cuda":
        records, rows = run_rows(args, None)
    else:
        allocators = args.allocators.split(",")
        if not allocators or any(a not in ("retain", "system") for a in allocators):
            parser.error(
                f"--allocators must be a comma-separated subset of retain,system, got {args.allocators!r}"
            )
        competing = args.competing.split(",")
        if not competing or any(c not in ("none", "busy") for c in competing):
            parser.error(f"--competing must be a comma-separated subset of none,busy, got {args.competing!r}")
        header = ["competing process", "host allocator", *header]
        records, rows = [], []
        passed = ["--threads", args.threads, "--dtypes", args.dtypes, "--hf", args.hf]
        passed += ["--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
        for load in competing:
            for allocator in allocators:
                cmd = [sys.executable, "-m", "bench.bench_moe_layer", "--worker", allocator, *passed]
                recs, rws = json.loads(_run_beside(cmd, busy=load == "busy"))
                records += [r | {"competing": load} for r in recs]
                rows += [[load, *r] for r in rws]
    notes = (
        "Forward+backward of one MoE layer (router + experts + balancing loss), same weights and routing.\n"
        "Every row: its functions run interleaved (warmup 2, median of per-round times); `x / dense rate` is\n"
        "the median over rounds of dense time / x time, the dense side being the experts' matmul FLOPs as\n"
        "six plain torch.mm over all T·k rows. TFLOP/s count the experts' matmul FLOPs only.\n"
        "CPU numbers come from a 2-core machine shared with other jobs: absolute times are noisy; the\n"
        "interleaved ratios much less so. HF batched_mm is n/a where its per-(token, expert) weight copies\n"
        "would exceed 16 GiB. Host allocator (CPU): each setting's rows come from their own process;\n"
        "`retain` (moevl's commands' default, moevl.allocator) keeps freed buffers for reuse, `system` is\n"
        "glibc's default; it applies to every column of a row alike (the dense side and HF too).\n"
        "Competing process: `busy` rows ran with a second process spinning on one core beside the bench\n"
        "(the contended case of issue 24); `none`, without.\n"
        "`moevl` runs the experts' default layout (`auto`: on CPU with 2+ threads, every expert padded to the\n"
        "largest group and one torch.bmm per projection, while that adds at most 25% rows);\n"
        "`moevl sorted` forces the sorted layout, torch's grouped_mm (one mm per expert on CPU)."
    )
    load = {"start": load_start, "end": load_average()}
    notes += f"\nLoad average (1, 5, 15 min) of the machine at the start: {load['start']}, at the end: {load['end']}."
    name = args.out or ("moe_layer" if args.device == "cpu" else "moe_layer_cuda")
    write(name, {"results": records, "load_average": load}, header, rows, notes)


if __name__ == "__main__":
    main()
