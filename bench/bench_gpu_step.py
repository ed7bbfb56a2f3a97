"""A stage-3 training step of an upcycled decoder, side by side: STGC off / on, ``torch.compile`` off / on.

Per arm: the median step time (forward + backward + AdamW on the experts and routers, MoE-LLaVA's stage 3),
tokens per second, the step time relative to the baseline arm, and the peak accelerator memory. Also whether
the forward synchronises with the host (``torch.cuda.set_sync_debug_mode("error")`` around one forward:
a ``.item()``, a data-dependent shape or a host copy raises there, naming the call).

    python -m bench.bench_gpu_step --device cuda           # ~1B-shaped: hidden 2048, 16 layers, E=4 top-2, bf16
    python -m bench.bench_gpu_step --device cpu --quick    # a tiny model: the smoke test the tests run

Writes ``<results>/gpu_step.{json,md}`` (``--results``, default bench/results; ``gpu_step_cpu`` on the CPU).
``bench/gpu.sh`` runs this with the kernel comparison of ``bench.bench_moe_layer``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moevl.hf import upcycle
from moevl.stgc import STGCConfig

#: model sizes and batch per device: "cuda" is a ~1B-shaped decoder (1.1B parameters dense; the upcycled
#: experts add 3 x its MLPs in the alternate layers), "cpu" a tiny one for the smoke test
SHAPES = {
    "cuda": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000, batch=4, seq=2048),
    "cpu": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, batch=2, seq=64),
}  # fmt: skip


def build(device: str, dtype: torch.dtype, stgc: bool) -> tuple[torch.nn.Module, dict]:
    shape = dict(SHAPES[device])
    batch, seq = shape.pop("batch"), shape.pop("seq")
    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=seq, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    upcycle(
        model,
        num_experts=4,
        top_k=2,
        layers="alternate",
        stgc=STGCConfig() if stgc else None,
        freeze_dense=True,
    )
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), device=device)
    return model, {"input_ids": ids, "labels": ids}


def host_syncs_in_forward(model: torch.nn.Module, batch: dict) -> str:
    """ "none" when one forward runs under ``set_sync_debug_mode("error")``, else the error's first line."""
    if not torch.cuda.is_available() or next(model.parameters()).device.type != "cuda":
        return "n/a (not on a CUDA device)"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(**batch)
        return "none"
    except RuntimeError as e:
        return str(e).splitlines()[0][:300]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def measure(device: str, dtype: torch.dtype, stgc: bool, compiled: bool, steps: int, backend: str) -> dict:
    model, batch = build(device, dtype, stgc)
    syncs = host_syncs_in_forward(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    run = torch.compile(model, backend=backend) if compiled else model
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step() -> None:
        loss = run(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(2):  # warm-up (and compilation)
        step()
    sync()
    warmup_s = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    tokens = batch["input_ids"].numel()
    return {
        "stgc": stgc,
        "compile": compiled,
        "step_s": median,
        "tokens_per_s": tokens / median,
        "warmup_s": warmup_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "trainable_parameters": sum(p.numel() for p in params),
        "parameters": sum(p.numel() for p in model.parameters()),
        "host_syncs_in_forward": syncs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="3 timed steps instead of 10")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile arms")
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile's backend (the CPU smoke test: eager)"
    )
    parser.add_argument("--results", default=str(Path(__file__).parent / "results"), help="output folder")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; run with --device cpu for the smoke test")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    steps = 3 if args.quick else 10
    arms = [(s, c) for c in ([False] if args.no_compile else [False, True]) for s in (False, True)]
    rows = [measure(args.device, dtype, s, c, steps, args.compile_backend) for s, c in arms]
    base = {c: r["step_s"] for r in rows for c in [r["compile"]] if not r["stgc"]}
    for r in rows:
        r["step_vs_baseline"] = r["step_s"] / rows[0]["step_s"]  # eager, no STGC
        r["stgc_overhead"] = r["step_s"] / base[r["compile"]] if r["stgc"] else None
    name = "gpu_step" if args.device == "cuda" else "gpu_step_cpu"
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "shape": SHAPES[args.device],
        "torch": torch.__version__,
        "compile_backend": args.compile_backend,
        "rows": rows,
    }
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    lines = [
        f"# {name}: a stage-3 step of an upcycled decoder ({payload['device']}, {payload['dtype']})",
        "",
        f"Shape: {SHAPES[args.device]}; E=4, top-2, alternate layers; experts and routers train (AdamW); "
        f"torch.compile backend {args.compile_backend}.",
        "",
        "| STGC | compile | step (s) | tokens/s | x eager baseline | STGC overhead (x) | peak GiB | host syncs in forward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        overhead = "" if r["stgc_overhead"] is None else f"{r['stgc_overhead']:.3f}"
        lines.append(
            f"| {'on' if r['stgc'] else 'off'} | {'on' if r['compile'] else 'off'} | {r['step_s']:.3g} | "
            f"{r['tokens_per_s']:.4g} | {r['step_vs_baseline']:.3f} | {overhead} | {peak} | {r['host_syncs_in_forward']} |"
        )
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
