"""Routing, LTDR and STGC statistics of an upcycled model's last forward (and backward)."""

from __future__ import annotations

import torch
from torch import nn

from moevl.hf.runtime import RoutingContext


def routing_statistics(model: nn.Module) -> tuple[dict[str, float], dict[int, dict[str, list[float]]]]:
    """Scalars of the last step, averaged over MoE layers, and per-layer expert loads.

    Returns:
        (scalars, loads). Scalars: ``moe/balance_loss``, ``moe/z_loss``, ``moe/experts_per_token``,
        with LTDR ``ltdr/tail_share`` (tail tokens / vision tokens), and once backward has run with
        STGC ``stgc/conflict_ratio``, ``stgc/cosine_mean``, ``stgc/cosine_std``, ``stgc/cel``; plus
        per-layer keys ``.../L{i}``. Loads: ``{layer: {"vision": [E], "text": [E]}}`` token counts.
    """
    context: RoutingContext | None = getattr(model, "moe_context", None)
    if context is None or not context.records:
        return {}, {}
    per_key: dict[str, list[float]] = {}
    loads: dict[int, dict[str, list[float]]] = {}

    def put(key: str, layer: int, value: float) -> None:
        per_key.setdefault(key, []).append(value)
        per_key.setdefault(f"{key}/L{layer}", []).append(value)

    for layer, rec in sorted(context.records.items()):
        valid = rec.token_mask
        put("moe/balance_loss", layer, float(rec.balance_loss.detach()))
        put("moe/z_loss", layer, float(rec.z_loss.detach()))
        n_exp = rec.experts_per_token[valid].float()
        put("moe/experts_per_token", layer, float(n_exp.mean()) if n_exp.numel() else 0.0)
        vision = rec.vision_mask & valid if rec.vision_mask is not None else torch.zeros_like(valid)
        e = rec.probs.shape[1]
        loads[layer] = {}
        for name, m in (("vision", vision), ("text", valid & ~vision)):
            idx = rec.indices[m]
            loads[layer][name] = torch.bincount(idx[idx >= 0], minlength=e).float().tolist()
        if rec.tail_mask is not None and vision.any():
            put("ltdr/tail_share", layer, float(rec.tail_mask[vision].float().mean()))
        if rec.stgc is not None and rec.stgc.ready:
            for k, v in rec.stgc.summary().items():
                put(f"stgc/{k}", layer, v)
            for j, v in enumerate(rec.stgc.conflict_ratio_per_expert.tolist()):
                per_key.setdefault(f"stgc/conflict_ratio/L{layer}/e{j}", []).append(v)
    return {k: sum(v) / len(v) for k, v in per_key.items()}, loads
