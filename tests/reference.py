"""Slow, obviously-correct references shared by the tests (plain autograd, loops)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moevl.moe import GroupedExperts


def expert_forward(experts: GroupedExperts, e: int, x: Tensor) -> Tensor:
    """Expert ``e`` on x (M, D), written out from its weights (native layout: the gate is rows
    [0:H] of ``gate_up_proj``, the up projection rows [H:2H])."""

    def lin(name: str, inp: Tensor) -> Tensor:
        w = getattr(experts, name)[e]
        b = getattr(experts, f"{name}_bias")
        out = inp @ w.t()
        if experts.lora is not None:  # W x + (alpha / r) B A x, written out
            a_, b_ = getattr(experts, f"{name}_lora_A")[e], getattr(experts, f"{name}_lora_B")[e]
            out = out + experts.lora.alpha / experts.lora.r * (inp @ a_.t() @ b_.t())
        return out if b is None else out + b[e]

    if experts.gated:
        h = experts.intermediate_size
        gate_up = lin("gate_up_proj", x)
        return lin("down_proj", experts.activation(gate_up[:, :h]) * gate_up[:, h:])
    return lin("down_proj", experts.activation(lin("up_proj", x)))


def per_token_moe(experts: GroupedExperts, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """y_t = Σ_s w_ts · expert_{i_ts}(x_t), one token and one slot at a time."""
    rows = []
    for t in range(x.shape[0]):
        y = x.new_zeros(x.shape[1])
        for s in range(indices.shape[1]):
            e = int(indices[t, s])
            if e >= 0:
                y = y + weights[t, s] * expert_forward(experts, e, x[t : t + 1])[0]
        rows.append(y)
    return torch.stack(rows)


def per_token_gradient_cosines(
    experts: GroupedExperts, x: Tensor, indices: Tensor, weights: Tensor, grad_out: Tensor, scope: str = "all"
) -> dict[tuple[int, int], float]:
    """For every (token, expert) pair, the cosine between the token's own gradient on the expert's
    parameters and the mean over the expert's tokens, from explicit per-token autograd gradients.

    The loss is linear in the MoE output with upstream gradient ``grad_out`` (N, D), so token t's
    gradient through expert e is grad of ``<grad_out_t, w_te · expert_e(x_t)>``.
    """
    names = ["gate_up_proj" if experts.gated else "up_proj", "down_proj"]
    if scope == "last":
        names = names[-1:]
    params = [getattr(experts, n) for n in names]
    params += [getattr(experts, f"{n}_bias") for n in names if getattr(experts, f"{n}_bias") is not None]
    per_expert: dict[int, list[tuple[int, Tensor]]] = {}
    for t in range(x.shape[0]):
        for s in range(indices.shape[1]):
            e = int(indices[t, s])
            if e < 0:
                continue
            y = weights[t, s].detach() * expert_forward(experts, e, x[t : t + 1].detach())[0]
            grads = torch.autograd.grad((y * grad_out[t]).sum(), params, allow_unused=True)
            flat = torch.cat([g[e].reshape(-1) for g in grads])
            per_expert.setdefault(e, []).append((t, flat.double()))
    out = {}
    for e, items in per_expert.items():
        mean = torch.stack([g for _, g in items]).mean(0)
        for t, g in items:
            denom = g.norm() * mean.norm()
            out[(t, e)] = float(g @ mean / denom) if denom > 0 else 0.0
    return out


def mean_delta_cosines(experts, x, indices, weights, grad_out) -> dict[tuple[int, int], float]:
    """``delta`` scope reference: cosine of w_te · grad_out_t against its expert mean."""
    per_expert: dict[int, list[tuple[int, Tensor]]] = {}
    for t in range(x.shape[0]):
        for s in range(indices.shape[1]):
            e = int(indices[t, s])
            if e >= 0:
                per_expert.setdefault(e, []).append((t, (weights[t, s] * grad_out[t]).double()))
    out = {}
    for e, items in per_expert.items():
        mean = torch.stack([d for _, d in items]).mean(0)
        for t, d in items:
            out[(t, e)] = float(F.cosine_similarity(d, mean, dim=0, eps=1e-30))
    return out
