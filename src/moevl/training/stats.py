"""Routing, LTDR and STGC statistics of an upcycled model's last forward (and backward)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moevl import observability as metrics
from moevl.hf.runtime import RoutingContext, find_moe_state
from moevl.training.routing_health import (
    contingency_table,
    mutual_information,
    normalized_entropy,
    normalized_mutual_information,
)


def routing_statistics(model: nn.Module) -> tuple[dict[str, float], dict[int, dict[str, list[float]]]]:
    """Scalars of the last step, averaged over MoE layers, and per-layer expert loads.

    Router health (always, over the real tokens of the last forward; issue 11):

    - ``router/entropy_normalized``: mean over tokens of ``H(p_t) / ln E`` (1 = uniform routing).
    - ``router/top1_prob``: mean over tokens of ``max_e p_{t,e}``.
    - ``router/logit_std``: mean over tokens of the population standard deviation of the
      token's router logits over the experts (pre-activation scores for sigmoid routers).
    - ``router/mi_modality``: mutual information in nats between X, the token's first-choice
      expert (slot 0 of the record's indices; tokens without one left out), and M, its modality
      (vision / text), from the empirical joint of X and M over the layer's real tokens
      (``moevl.training.routing_health.mutual_information``). ``router/mi_modality_normalized`` is
      ``I(X; M) / H(M)`` in [0, 1] (0 when H(M) = 0). Only for records with a vision mask.
    - ``router/mi_category``, ``router/mi_category_normalized``: the same with the category ids
      of the context (``RoutingContext.category_ids``, ``-1`` positions left out) instead of M,
      when the forward had them.

    Returns:
        (scalars, loads). Scalars: the router health above, ``moe/balance_loss``, ``moe/z_loss``,
        ``moe/experts_per_token``, with LTDR ``ltdr/tail_share`` (tail tokens / vision tokens), and
        once backward has run with STGC ``stgc/conflict_ratio``, ``stgc/cosine_mean``,
        ``stgc/cosine_std``, ``stgc/cel``; plus per-layer keys ``.../L{i}``. Loads:
        ``{layer: {"vision": [E], "text": [E]}}`` token counts.
    """
    state = find_moe_state(model)
    context: RoutingContext | None = None if state is None else state.context
    if context is None or not context.records:
        return {}, {}
    per_key: dict[str, list[float]] = {}
    loads: dict[int, dict[str, list[float]]] = {}

    def put(key: str, layer: int, value: float) -> None:
        per_key.setdefault(key, []).append(value)
        per_key.setdefault(metrics.per_layer(key, layer), []).append(value)

    for layer, rec in sorted(context.records.items()):
        valid = rec.token_mask
        put(metrics.BALANCE_LOSS, layer, float(rec.balance_loss.detach()))
        put(metrics.Z_LOSS, layer, float(rec.z_loss.detach()))
        n_exp = rec.experts_per_token[valid].float()
        put(metrics.EXPERTS_PER_TOKEN, layer, float(n_exp.mean()) if n_exp.numel() else 0.0)
        vision = rec.vision_mask & valid if rec.vision_mask is not None else torch.zeros_like(valid)
        e = rec.probs.shape[1]
        loads[layer] = {}
        for name, m in (("vision", vision), ("text", valid & ~vision)):
            idx = rec.indices[m]
            loads[layer][name] = torch.bincount(idx[idx >= 0], minlength=e).float().tolist()
        for key, value in _router_health(rec, vision, context.category_ids).items():
            put(key, layer, value)
        if rec.tail_mask is not None and vision.any():
            put(metrics.TAIL_SHARE, layer, float(rec.tail_mask[vision].float().mean()))
        if rec.stgc is not None and rec.stgc.ready:
            for k, v in rec.stgc.summary().items():
                put(metrics.stgc(k), layer, v)
            for j, v in enumerate(rec.stgc.conflict_ratio_per_expert.tolist()):
                per_key.setdefault(metrics.per_expert(metrics.CONFLICT_RATIO, layer, j), []).append(v)
    return {k: sum(v) / len(v) for k, v in per_key.items()}, loads


def _router_health(rec, vision: Tensor, category_ids: Tensor | None) -> dict[str, float]:
    """The ``router/...`` scalars of one layer's record (``routing_statistics``)."""
    valid = rec.token_mask
    out: dict[str, float] = {}
    if not bool(valid.any()):
        return out
    probs = rec.probs.detach()[valid]  # (M, E)
    out[metrics.ROUTER_ENTROPY] = float(normalized_entropy(probs).mean())
    out[metrics.ROUTER_TOP1] = float(probs.max(-1).values.float().mean())
    out[metrics.ROUTER_LOGIT_STD] = float(rec.logits.detach()[valid].float().std(-1, unbiased=False).mean())
    num_experts = rec.probs.shape[1]
    first = rec.indices[:, 0]  # (N,) first-choice expert, -1 if none
    chosen = valid & (first >= 0)
    labels: dict[str, tuple[Tensor, Tensor]] = {}
    if rec.vision_mask is not None:
        labels["modality"] = (vision.long(), chosen)
    if category_ids is not None and category_ids.numel() == first.shape[0]:
        cats = category_ids.reshape(-1).to(first.device).long()
        labels["category"] = (cats, chosen & (cats >= 0))
    for name, (lab, keep) in labels.items():
        if not bool(keep.any()):
            continue
        table = contingency_table(
            first[keep], lab[keep], num_a=num_experts, num_b=max(2, int(lab[keep].max()) + 1)
        )
        out[metrics.router_mi(name)] = float(mutual_information(table))
        out[metrics.router_mi(name, normalized=True)] = float(normalized_mutual_information(table))
    return out
