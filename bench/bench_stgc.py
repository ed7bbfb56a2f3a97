"""STGC cost and fidelity, side by side in one run. Writes bench/results/stgc.{json,md}.

1. Step-time and saved-activation overhead of each scope (all / last / delta) against the same MoE
   training step without STGC: a standalone MoE layer and a small upcycled Llama.
2. The exact cosine (outer-product identity, inside the backward) against torch.func per-sample
   gradients at N = 256, 2048, 8192 tokens: speed ratio and max |difference|.
3. Agreement of ``last`` and ``delta`` with ``all`` on a trained upcycled model: Pearson
   correlation of the pair cosines and IoU of the flagged sets.

    python -m bench.bench_stgc [--quick]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.func import grad, vmap
from transformers import LlamaConfig, LlamaForCausalLM

import moevl.stgc.observer as stgc_observer
from bench.common import load_average, saved_activation_bytes, time_interleaved, write
from moevl.hf import moe_blocks, moe_state, upcycle
from moevl.moe import GroupedExperts, MoEFeedForward, TopKRouter
from moevl.moe.grouped_mm import grouped_matmul
from moevl.stgc import STGCConfig, token_gradient_cosine
from moevl.stgc.cosine import grouped_token_gradient_cosine

SCOPES = ["all", "last", "delta"]


def layer_overhead(repeats):
    torch.manual_seed(0)
    d, h, e, k, t = 512, 1024, 8, 2, 2048
    layer = MoEFeedForward(
        router=TopKRouter(hidden_size=d, num_experts=e, top_k=k),
        experts=GroupedExperts(num_experts=e, hidden_size=d, intermediate_size=h),
    )
    x = torch.randn(t, d)
    target = torch.randn(t, d)
    configs = {"none": None} | {s: STGCConfig(scope=s) for s in SCOPES}

    def make(cfg):
        def run():
            layer.stgc = cfg
            layer.zero_grad(set_to_none=True)
            out, rec = layer(x)
            loss = F.mse_loss(out, target) + rec.aux_loss()
            loss.backward()
            return loss

        return run

    fns = {name: make(cfg) for name, cfg in configs.items()}
    times = time_interleaved(fns, repeats=repeats)
    mem = {}
    for name, cfg in configs.items():
        layer.stgc = cfg
        mem[name] = saved_activation_bytes(lambda cfg=cfg: layer(x)[0])
    return {"shape": dict(T=t, D=d, H=h, E=e, k=k), "seconds": times, "saved_bytes": mem}


def small_model(stgc=None, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    return upcycle(
        LlamaForCausalLM(cfg), num_experts=4, top_k=2, layers="alternate", stgc=stgc, freeze_dense=True
    )


def model_overhead(repeats):
    model = small_model().train()
    ids = torch.randint(0, 512, (8, 256), generator=torch.Generator().manual_seed(0))
    configs = {"none": None} | {s: STGCConfig(scope=s) for s in SCOPES}

    def make(cfg):
        def run():
            for b in moe_blocks(model):
                b.stgc = cfg
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss

        return run

    # the floor of `all`: what the backward hands the cosine (captured from one step), and the cosine's
    # extra grouped matmuls alone (one per linear layer: x_t against the weight gradient)
    captured = []

    def capture(grads, scope):
        captured.append(grads)
        return grouped_token_gradient_cosine(grads, scope)

    stgc_observer.grouped_token_gradient_cosine = capture
    try:
        make(STGCConfig(scope="all"))()
    finally:
        stgc_observer.grouped_token_gradient_cosine = grouped_token_gradient_cosine

    def cosine_only():
        for grads in captured:
            grouped_token_gradient_cosine(grads, "all")

    def extra_gemms_only():
        for grads in captured:
            for layer in grads.layers:
                x, d, w = layer.inputs, layer.out_grads, layer.weight_grad
                if x.shape[1] <= d.shape[1]:
                    grouped_matmul(d, w, grads.offsets)
                else:
                    grouped_matmul(x, w.transpose(1, 2), grads.offsets)

    fns = {n: make(c) for n, c in configs.items()}
    fns |= {"cosine_only": cosine_only, "extra_gemms_only": extra_gemms_only}
    times = time_interleaved(fns, repeats=repeats)
    return {
        "shape": "Llama 4 layers, D=256, H=512, 2 MoE layers E=4 k=2, batch 8x256 (dense frozen)",
        "seconds": times,
    }


def exact_vs_per_sample(ns, repeats=3):
    """One SwiGLU expert, D=128, H=256; per-token loss <c_t, mlp(x_t)>.

    Both sides start from what an ordinary backward already has (each layer's inputs and output
    gradients, and the mean gradient); timed is only what each needs on top to get the cosines.
    """
    d, h = 128, 256
    torch.manual_seed(0)
    params = {
        "gate": torch.randn(h, d) / d**0.5,
        "up": torch.randn(h, d) / d**0.5,
        "down": torch.randn(d, h) / h**0.5,
    }

    def mlp(p, x):
        return (F.silu(x @ p["gate"].t()) * (x @ p["up"].t())) @ p["down"].t()

    def token_loss(p, x, c):
        return (mlp(p, x) * c).sum()

    out = []
    for n in ns:
        x, c = torch.randn(n, d), torch.randn(n, d)
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        a_g = (x @ p["gate"].t()).detach().requires_grad_()
        a_u = (x @ p["up"].t()).detach().requires_grad_()
        hid = F.silu(a_g) * a_u
        hid.retain_grad()
        (hid @ p["down"].t() * c).sum().backward()
        layers = [(x, a_g.grad), (x, a_u.grad), (hid.detach(), c)]
        mean = torch.cat([(g.t() @ i / n).reshape(-1) for i, g in layers])

        def exact(layers=layers):
            return token_gradient_cosine(layers)

        def per_sample(x=x, c=c, mean=mean, n=n):
            cos = []
            for s in range(0, n, 512):  # chunks: (512, 98k) per-sample gradients at a time
                g = vmap(grad(token_loss), in_dims=(None, 0, 0))(params, x[s : s + 512], c[s : s + 512])
                flat = torch.cat([g[k].reshape(g[k].shape[0], -1) for k in ("gate", "up", "down")], 1)
                cos.append(flat @ mean / (flat.norm(dim=1) * mean.norm()))
            return torch.cat(cos)

        times = time_interleaved({"exact": exact, "per_sample": per_sample}, repeats=repeats)
        diff = float((exact() - per_sample()).abs().max())
        out.append(
            {
                "N": n,
                "exact_s": times["exact"],
                "per_sample_s": times["per_sample"],
                "speedup": times["per_sample"] / times["exact"],
                "max_abs_diff": diff,
            }
        )
        print(out[-1], flush=True)
    return out


def pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def agreement(train_steps):
    """Train the small upcycled model with STGC(all), then compare scopes on held-out batches."""
    model = small_model(stgc=STGCConfig(scope="all")).train()
    g = torch.Generator().manual_seed(1)

    # a learnable synthetic language: next token = (3 * token + 7) mod 512 with noise tokens
    def batch():
        start = torch.randint(0, 512, (8, 1), generator=g)
        seq = [start]
        for _ in range(127):
            seq.append((3 * seq[-1] + 7) % 512)
        ids = torch.cat(seq, 1)
        noise = torch.rand(ids.shape, generator=g) < 0.1
        return torch.where(noise, torch.randint(0, 512, ids.shape, generator=g), ids)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(train_steps):
        ids = batch()
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    per_scope = {s: [] for s in SCOPES}
    flagged = {s: [] for s in SCOPES}
    for _ in range(3):
        ids = batch()
        for s in SCOPES:
            for b in moe_blocks(model):
                b.stgc = STGCConfig(scope=s)
            model.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            recs = [moe_state(model).context.records[i] for i in sorted(moe_state(model).context.records)]
            per_scope[s].append(torch.cat([r.stgc.cosine for r in recs]))
            flagged[s].append(torch.cat([r.stgc.conflicts for r in recs]))
    cos = {s: torch.cat(v) for s, v in per_scope.items()}
    conf = {s: torch.cat(v) for s, v in flagged.items()}
    res = {
        "train_steps": train_steps,
        "final_loss": float(loss.detach()),
        "pairs": int(cos["all"].numel()),
        "conflict_ratio": {s: float(conf[s].float().mean()) for s in SCOPES},
    }
    for s in ("last", "delta"):
        inter = int((conf[s] & conf["all"]).sum())
        union = int((conf[s] | conf["all"]).sum())
        res[s] = {"pearson_vs_all": pearson(cos[s], cos["all"]), "flagged_iou_vs_all": inter / max(union, 1)}
    return res


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=0, help="timed steps (default 7, --quick 3)")
    args = parser.parse_args()
    load_start = load_average()
    repeats = args.repeats or (3 if args.quick else 7)
    layer = layer_overhead(repeats)
    print(layer, flush=True)
    model = model_overhead(repeats)
    print(model, flush=True)
    exact = exact_vs_per_sample([256, 2048, 8192])
    agree = agreement(30 if args.quick else 100)
    print(agree, flush=True)
    rows = []
    for where, res in (("MoE layer T=2048 D=512 H=1024 E=8 k=2", layer), ("small upcycled Llama", model)):
        base = res["seconds"]["none"]
        for s in SCOPES:
            mem = res.get("saved_bytes", {})
            mem_ratio = mem[s] / mem["none"] if mem else "-"
            rows.append([where, s, res["seconds"][s] / base, mem_ratio])
    sec = model["seconds"]
    rows.append(
        [
            "small upcycled Llama",
            "floor of all: no-STGC + the cosine alone",
            1 + sec["cosine_only"] / sec["none"],
            "-",
        ]
    )
    rows.append(
        [
            "small upcycled Llama",
            "floor of all: no-STGC + its extra matmuls alone",
            1 + sec["extra_gemms_only"] / sec["none"],
            "-",
        ]
    )
    rows2 = [
        [r["N"], r["exact_s"] * 1e3, r["per_sample_s"] * 1e3, r["speedup"], r["max_abs_diff"]] for r in exact
    ]
    rows3 = [
        [s, agree[s]["pearson_vs_all"], agree[s]["flagged_iou_vs_all"], agree["conflict_ratio"][s]]
        for s in ("last", "delta")
    ] + [["all", 1.0, 1.0, agree["conflict_ratio"]["all"]]]
    payload = {
        "overhead_layer": layer,
        "overhead_model": model,
        "exact_vs_per_sample": exact,
        "agreement": agree,
        "load_average": {"start": load_start, "end": load_average()},
    }
    notes = (
        f"Step time and saved-activation memory relative to the same step without STGC (ratios; median of\n"
        f"{repeats} interleaved steps on a 2-core CPU, which varies by about ±10%: `delta` below 1 is that noise).\n"
        "The floor rows time, interleaved with the steps, the cosine of `all` alone on the gradients one step\n"
        "handed it, and only its extra grouped matmuls (one per expert linear layer), added to the no-STGC step.\n"
        f"Load average (1, 5, 15 min) at the start: {load_start}, at the end: {payload['load_average']['end']}."
    )
    header = ["where", "scope", "step time (x no-STGC)", "saved activations (x no-STGC)"]
    write("stgc", payload, header, rows, notes)
    # two more tables appended to the same markdown file
    path = __import__("bench.common", fromlist=["RESULTS"]).RESULTS / "stgc.md"
    extra = [
        "",
        "## Exact cosine vs torch.func per-sample gradients (one SwiGLU expert, D=128, H=256; both sides start",
        "from one ordinary backward: each layer's inputs and output gradients, and the mean gradient)",
        "",
        "| N | exact ms | per-sample ms | speedup (x) | max abs diff |",
        "|---|---|---|---|---|",
    ]
    extra += [
        "| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in r) + " |" for r in rows2
    ]
    extra += [
        "",
        f"## Agreement with `all` after {agree['train_steps']} training steps ({agree['pairs']} pairs)",
        "",
        "| scope | Pearson r of cosines | IoU of flagged sets | conflict ratio |",
        "|---|---|---|---|",
    ]
    extra += [
        "| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in r) + " |" for r in rows3
    ]
    path.write_text(path.read_text() + "\n".join(extra) + "\n")
    print("\n".join(extra))


if __name__ == "__main__":
    main()
