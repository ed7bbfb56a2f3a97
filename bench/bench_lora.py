"""Full tuning against LoRA on a small upcycled model: trainable parameters, peak memory, step time.

The model: a Llama decoder (D=512, H=1536, 4 layers, vocabulary 4096) upcycled with every layer MoE,
E=8, top-2 (moevl.hf.upcycle), random weights (no download). One training step is forward, backward
and an AdamW step on a batch of 4 x 128 tokens, as stage 3 runs it. Arms:

* ``full``: experts and routers train (MoE-LLaVA's stage 3);
* ``lora_r8``: ``moe.lora: {r: 8, targets: [experts]}``; expert adapters and the routers train;
* ``lora_r16_attn``: ``{r: 16, targets: [experts, attention]}``; adapters and routers train.

Each arm runs in its own process (a fresh heap). Peak memory is the process's resident set high-water
mark (``ru_maxrss``) minus its resident set just before the first step: what the steps add on top of
the weights (gradients, optimizer state, activations, allocator caching), measured by the OS, not by
torch; ``state MiB`` is the exact size of the gradients and AdamW's two moments of the trainable
parameters (12 bytes each in fp32). Step time is the median over the measured steps after two warm-up
steps; the ratio is each arm's median over ``full``'s.

    python -m bench.bench_lora [--steps 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from bench.common import write

ARMS = {
    "full": None,
    "lora_r8": {"r": 8, "alpha": 16.0, "targets": ("experts",)},
    "lora_r16_attn": {"r": 16, "alpha": 32.0, "targets": ("experts", "attention")},
}
SHAPE = dict(
    hidden_size=512, intermediate_size=1536, layers=4, vocab=4096, experts=8, top_k=2, batch=4, seq=128
)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_arm(name: str, steps: int, threads: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from moevl.hf import upcycle
    from moevl.moe.lora import LoRAConfig
    from moevl.vlm.parts import set_trainable

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    s = SHAPE
    config = LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["layers"], num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
    )  # fmt: skip
    lora = None if ARMS[name] is None else LoRAConfig(**ARMS[name])
    model = upcycle(
        LlamaForCausalLM(config), num_experts=s["experts"], top_k=s["top_k"], layers="all", lora=lora
    )
    model.train()
    trainable = set_trainable(model, ("experts", "routers"))
    total = sum(p.numel() for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=g)
    before = _rss_mib()
    times, backward_times = [], []
    for step in range(steps + 2):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        t1 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # the gradients stay allocated, as between Trainer steps
        if step >= 2:
            times.append(time.perf_counter() - t0)
            backward_times.append(t1 - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "arm": name,
        "lora": ARMS[name],
        "trainable_parameters": trainable,
        "total_parameters": total,
        "state_mib": trainable * 12 / 2**20,
        "peak_added_mib": peak - before,
        "rss_before_steps_mib": before,
        "step_s": statistics.median(times),
        "forward_backward_s": statistics.median(backward_times),
        "step_s_all": times,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # the child process's arm
    args = ap.parse_args()
    if args.arm is not None:
        print(json.dumps(run_arm(args.arm, args.steps, args.threads)))
        return
    results = []
    for arm in ARMS:
        cmd = [sys.executable, "-m", "bench.bench_lora", "--arm", arm, "--steps", str(args.steps),
               "--threads", str(args.threads)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(arm, results[-1]["step_s"], file=sys.stderr)
    full = results[0]
    for r in results:
        r["step_time_ratio_to_full"] = r["step_s"] / full["step_s"]
        r["trainable_ratio_to_full"] = r["trainable_parameters"] / full["trainable_parameters"]
    rows = [
        [r["arm"], f"{r['trainable_parameters']:,}", f"{100 * r['trainable_ratio_to_full']:.2f}%",
         f"{r['state_mib']:.1f}", f"{r['peak_added_mib']:.0f}", f"{r['step_s']:.2f}",
         f"{r['forward_backward_s']:.2f}", f"{r['step_time_ratio_to_full']:.2f}"]
        for r in results
    ]  # fmt: skip
    notes = (
        f"Llama D={SHAPE['hidden_size']} H={SHAPE['intermediate_size']} x{SHAPE['layers']} layers, every layer "
        f"upcycled to E={SHAPE['experts']} top-{SHAPE['top_k']} ({full['total_parameters']:,} parameters), batch "
        f"{SHAPE['batch']}x{SHAPE['seq']} tokens, fp32, CPU, {args.threads} threads, median of {args.steps} "
        "steps (forward + backward + AdamW; fwd+bwd alone beside it). peak added MiB: resident-set high-water mark (ru_maxrss) minus "
        "the resident set before the first step, one process per arm. state MiB: gradients + AdamW moments of "
        "the trainable parameters (exact)."
    )
    write(
        "lora",
        {"shape": SHAPE, "threads": args.threads, "steps": args.steps, "arms": results},
        [
            "arm",
            "trainable params",
            "of full",
            "state MiB",
            "peak added MiB",
            "step s",
            "of which fwd+bwd s",
            "step time / full",
        ],
        rows,
        notes,
    )


if __name__ == "__main__":
    main()
