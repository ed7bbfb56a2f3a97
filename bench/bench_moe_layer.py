"""MoE layer forward+backward: moevl against Hugging Face transformers' own experts.

Same weights, same routing (softmax top-k, renormalised), side by side in one run: moevl's
``MoEFeedForward`` (grouped matmul, hand-written backward) vs transformers' OLMoE sparse block with
``experts_implementation`` = ``grouped_mm``, ``batched_mm`` and ``eager``. Writes
bench/results/moe_layer.{json,md}.

    python bench/bench_moe_layer.py [--quick]
"""

from __future__ import annotations

import argparse

import torch
from transformers import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

from bench.common import saved_activation_bytes, time_interleaved, write
from moevl.moe import GroupedExperts, MoEFeedForward, TopKRouter

SHAPES = [dict(T=2048, D=512, H=1024, E=8, k=2), dict(T=2048, D=512, H=256, E=64, k=8)]
HF_IMPLS = ["grouped_mm", "batched_mm", "eager"]


def build(shape, dtype):
    torch.manual_seed(0)
    moe = MoEFeedForward(
        router=TopKRouter(hidden_size=shape["D"], num_experts=shape["E"], top_k=shape["k"]),
        experts=GroupedExperts(num_experts=shape["E"], hidden_size=shape["D"], intermediate_size=shape["H"]),
    )
    cfg = OlmoeConfig(
        hidden_size=shape["D"],
        intermediate_size=shape["H"],
        num_experts=shape["E"],
        num_experts_per_tok=shape["k"],
        norm_topk_prob=True,
    )
    hf = {}
    for impl in HF_IMPLS:
        cfg._experts_implementation = impl
        block = OlmoeSparseMoeBlock(cfg)
        with torch.no_grad():
            block.gate.weight.copy_(moe.router.weight)
            block.experts.gate_up_proj.copy_(moe.experts.gate_up_proj)
            block.experts.down_proj.copy_(moe.experts.down_proj)
        hf[impl] = block.to(dtype)
    # NOTE: moevl keeps the router in fp32 (MoE-LLaVA); OLMoE's router runs in the model dtype.
    moe.experts.to(dtype)
    return moe, hf


def step_fn(module, x, is_moevl):
    def run():
        module.zero_grad(set_to_none=True)
        xx = x.detach().requires_grad_()
        if is_moevl:
            out, rec = module(xx)
            loss = out.float().square().mean() + 0.01 * rec.balance_loss
        else:
            loss = module(xx).float().square().mean()
        loss.backward()
        return loss

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    rows, records = [], []
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            moe, hf = build(shape, dtype)
            x = torch.randn(1, shape["T"], shape["D"], dtype=dtype)
            with torch.no_grad():
                ref = moe(x)[0].float()
                err = {k: float((b(x).float() - ref).abs().max()) for k, b in hf.items()}
            fns = {"moevl": step_fn(moe, x, True)} | {f"hf_{k}": step_fn(b, x, False) for k, b in hf.items()}
            times = time_interleaved(fns, repeats=repeats)
            mem = {name: saved_activation_bytes(fn) for name, fn in fns.items()}
            best_hf = min((v, k) for k, v in times.items() if k != "moevl")
            name = f"T={shape['T']} D={shape['D']} H={shape['H']} E={shape['E']} k={shape['k']}"
            dt = str(dtype).replace("torch.", "")
            rec = {
                "shape": shape,
                "dtype": dt,
                "seconds": times,
                "saved_activation_bytes": mem,
                "max_abs_output_diff_vs_moevl": err,
                "best_hf": best_hf[1],
                "speedup_vs_best_hf": best_hf[0] / times["moevl"],
            }
            records.append(rec)
            rows.append(
                [name, dt, times["moevl"] * 1e3]
                + [times[f"hf_{k}"] * 1e3 for k in HF_IMPLS]
                + [best_hf[0] / times["moevl"], mem["moevl"] / 2**20, mem[f"hf_{best_hf[1][3:]}"] / 2**20]
            )
            print(rows[-1], flush=True)
    header = (
        ["shape", "dtype", "moevl ms"]
        + [f"HF {k} ms" for k in HF_IMPLS]
        + ["speedup vs best HF (x)", "moevl saved MiB", "best HF saved MiB"]
    )
    notes = (
        "Forward+backward of one MoE layer (router + experts + balancing loss), median of interleaved runs, "
        "same weights and routing. 'saved MiB' = distinct tensors autograd keeps for backward."
    )
    write("moe_layer", {"results": records}, header, rows, notes)


if __name__ == "__main__":
    main()
