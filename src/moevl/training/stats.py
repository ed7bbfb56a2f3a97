"""Routing, LTDR and STGC statistics of a MoE model's last forward (and backward).

Computed in two halves so that a training step never waits for the device: ``collect`` builds them as
tensors on the records' device (no host synchronisation: masked sums, no boolean indexing, no ``float()``),
``read`` brings any number of steps to the host in one transfer. ``routing_statistics`` is both at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moevl import observability as metrics
from moevl.hf.runtime import find_moe_state
from moevl.training.routing_health import normalized_entropy


@dataclass(frozen=True)
class StepStatistics:
    """One step's statistics as tensors on the device (``collect``).

    Attributes:
        values: ``(metric key, layer) -> 0-d`` float tensor; NaN where the step had nothing to measure (no
            real token, no vision token, ...): such a key is left out of that step (``read``).
        per_expert: ``(metric key, layer) -> (E,)`` per-expert values (the STGC conflict ratio).
        loads: ``{layer: {"vision": (E,), "text": (E,)}}`` token counts per expert.
    """

    values: dict[tuple[str, int], Tensor]
    per_expert: dict[tuple[str, int], Tensor]
    loads: dict[int, dict[str, Tensor]]


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
        ``moe/experts_per_token``, ``moe/maxvio`` (``moevl.observability.MAX_VIO``: the most loaded expert's
        excess over the mean load, over the mean load, of the layer's real tokens), with LTDR ``ltdr/tail_share`` (tail tokens / vision tokens), and
        once backward has run with STGC ``stgc/conflict_ratio``, ``stgc/cosine_mean``,
        ``stgc/cosine_std``, ``stgc/cel``; plus per-layer keys ``.../L{i}``. Loads:
        ``{layer: {"vision": [E], "text": [E]}}`` token counts.
    """
    step = collect(model)
    if step is None:
        return {}, {}
    (scalars,), loads = read([step])
    return scalars, loads


def collect(model: nn.Module) -> StepStatistics | None:
    """The statistics of ``model``'s last forward (and backward) as tensors on the device, without a host
    synchronisation; None for a model without MoE layers or records."""
    state = find_moe_state(model)
    context = None if state is None else state.context
    if context is None or not context.records:
        return None
    values: dict[tuple[str, int], Tensor] = {}
    per_expert: dict[tuple[str, int], Tensor] = {}
    loads: dict[int, dict[str, Tensor]] = {}
    for layer, rec in sorted(context.records.items()):
        valid = rec.token_mask
        vision = rec.vision_mask & valid if rec.vision_mask is not None else torch.zeros_like(valid)
        values[(metrics.BALANCE_LOSS, layer)] = rec.balance_loss.detach().float()
        values[(metrics.Z_LOSS, layer)] = rec.z_loss.detach().float()
        n_exp = rec.experts_per_token.float()
        values[(metrics.EXPERTS_PER_TOKEN, layer)] = _masked_mean(n_exp, valid, empty=0.0)
        e = rec.probs.shape[1]
        loads[layer] = {
            name: _counts(rec.indices, m, e) for name, m in (("vision", vision), ("text", valid & ~vision))
        }
        values[(metrics.MAX_VIO, layer)] = _max_violation(loads[layer]["vision"] + loads[layer]["text"])
        for key, value in _router_health(rec, vision, context.category_ids).items():
            values[(key, layer)] = value
        if rec.tail_mask is not None:
            values[(metrics.TAIL_SHARE, layer)] = _masked_mean(rec.tail_mask.float(), vision)
        if rec.stgc is not None and rec.stgc.ready:
            for k, v in rec.stgc.summary_tensors().items():
                values[(metrics.stgc(k), layer)] = v
            per_expert[(metrics.CONFLICT_RATIO, layer)] = rec.stgc.conflict_ratio_per_expert.float()
    return StepStatistics(values, per_expert, loads)


def read(
    steps: list[StepStatistics],
) -> tuple[list[dict[str, float]], dict[int, dict[str, list[float]]]]:
    """Each step's scalars (as ``routing_statistics`` gives them) and the loads summed over the steps, read
    from the device in one transfer (one host synchronisation for any number of steps)."""
    flat: list[Tensor] = []
    for step in steps:
        flat += [v.reshape(1).float() for v in step.values.values()]
        flat += [v.reshape(-1).float() for v in step.per_expert.values()]
    summed: dict[int, dict[str, Tensor]] = {}
    for step in steps:
        for layer, by_mod in step.loads.items():
            acc = summed.setdefault(layer, {})
            for mod, counts in by_mod.items():
                acc[mod] = counts if mod not in acc else acc[mod] + counts
    load_parts = [c.float() for by_mod in summed.values() for c in by_mod.values()]
    if not flat and not load_parts:
        return [{} for _ in steps], {}
    device = (flat or load_parts)[0].device
    host = torch.cat([t.to(device) for t in flat + load_parts]).tolist()
    at = 0
    scalars: list[dict[str, float]] = []
    for step in steps:
        per_key: dict[str, list[float]] = {}
        for key, layer in step.values:
            value, at = host[at], at + 1
            if math.isnan(value):
                continue
            per_key.setdefault(key, []).append(value)
            per_key.setdefault(metrics.per_layer(key, layer), []).append(value)
        for (key, layer), v in step.per_expert.items():
            for j in range(v.numel()):
                per_key.setdefault(metrics.per_expert(key, layer, j), []).append(host[at + j])
            at += v.numel()
        scalars.append({k: sum(v) / len(v) for k, v in per_key.items()})
    loads: dict[int, dict[str, list[float]]] = {}
    for layer, by_mod in summed.items():
        loads[layer] = {}
        for mod, counts in by_mod.items():
            loads[layer][mod], at = host[at : at + counts.numel()], at + counts.numel()
    return scalars, loads


def _masked_mean(values: Tensor, mask: Tensor, *, empty: float = math.nan) -> Tensor:
    """Mean of ``values`` (N,) over ``mask`` (N,) bool, ``empty`` where the mask is all False (no sync)."""
    count = mask.sum()
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, empty))


def _counts(indices: Tensor, mask: Tensor, num_experts: int) -> Tensor:
    """(E,) how many slots of the tokens in ``mask`` chose each expert (unused slots left out)."""
    keep = (indices >= 0) & mask[:, None]
    slots = torch.where(keep, indices, num_experts).reshape(-1)  # the extra bin E takes the rest
    # index_add, not bincount: bincount reads its output size from the device
    return torch.zeros(num_experts + 1, device=indices.device).index_add_(0, slots, keep.reshape(-1).float())[
        :num_experts
    ]


def _max_violation(load: Tensor) -> Tensor:
    """MaxVio of a layer's load (E,): ``(max_i load_i − mean load) / mean load``; NaN without any load."""
    mean = load.mean()
    return torch.where(mean > 0, (load.max() - mean) / mean.clamp_min(1e-30), torch.full_like(mean, math.nan))


def _dense_ranks(labels: Tensor) -> Tensor:
    """``labels`` (N,) integers as dense ranks in ``[0, N)`` (equal labels, equal ranks), without a host
    synchronisation."""
    order = torch.argsort(labels, stable=True)
    ordered = labels[order]
    new = torch.ones_like(ordered, dtype=torch.long)
    new[1:] = (ordered[1:] != ordered[:-1]).long()
    return torch.empty_like(new).scatter_(0, order, torch.cumsum(new, 0) - 1)


def _mutual_information(a: Tensor, b: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """``(I(A; B), I(A; B) / H(B))`` in nats over the positions in ``keep`` of the integer labels a, b (N,):
    the plug-in estimate of ``moevl.training.routing_health.mutual_information`` on their contingency table,
    computed per position instead of per cell (memory O(N) whatever the number of labels, no host sync):
    ``I = Σ_i (1/M) log(n_ab(i) M / (n_a(i) n_b(i)))`` over the M kept positions, each carrying the counts of
    its own pair and labels; ``H(B) = −Σ_i (1/M) log(n_b(i) / M)``."""
    n = a.shape[0]
    w = keep.double()
    ra, rb = _dense_ranks(torch.where(keep, a, -1)), _dense_ranks(torch.where(keep, b, -1))
    rab = _dense_ranks(ra * n + rb)

    def count(ranks: Tensor) -> Tensor:  # (N,) the kept positions sharing each position's rank
        return torch.zeros(n, dtype=torch.float64, device=a.device).index_add_(0, ranks, w)[ranks]

    m = w.sum().clamp_min(1.0)
    n_a, n_b, n_ab = count(ra).clamp_min(1.0), count(rb).clamp_min(1.0), count(rab).clamp_min(1.0)
    mi = (w * (n_ab * m / (n_a * n_b)).log()).sum().div(m).clamp_min(0.0)
    h_b = -(w * (n_b / m).log()).sum().div(m)
    nmi = torch.where(h_b > 0, (mi / h_b.clamp_min(1e-300)).clamp(0.0, 1.0), torch.zeros_like(h_b))
    return mi, nmi


def _router_health(rec, vision: Tensor, category_ids: Tensor | None) -> dict[str, Tensor]:
    """The ``router/...`` values of one layer's record (``routing_statistics``); NaN without real tokens."""
    valid = rec.token_mask
    nan = torch.full((), math.nan, device=valid.device)
    probs = rec.probs.detach()
    out = {
        metrics.ROUTER_ENTROPY: _masked_mean(normalized_entropy(probs).float(), valid),
        metrics.ROUTER_TOP1: _masked_mean(probs.max(-1).values.float(), valid),
        metrics.ROUTER_LOGIT_STD: _masked_mean(rec.logits.detach().float().std(-1, unbiased=False), valid),
    }
    first = rec.indices[:, 0]  # (N,) first-choice expert, -1 if none
    chosen = valid & (first >= 0)
    labels: dict[str, tuple[Tensor, Tensor]] = {}
    if rec.vision_mask is not None:
        labels["modality"] = (vision.long(), chosen)
    if category_ids is not None and category_ids.numel() == first.shape[0]:
        cats = category_ids.reshape(-1).to(first.device).long()
        labels["category"] = (cats, chosen & (cats >= 0))
    for name, (lab, keep) in labels.items():
        mi, nmi = _mutual_information(first.long(), lab, keep)
        any_kept = keep.any()
        out[metrics.router_mi(name)] = torch.where(any_kept, mi.float(), nan)
        out[metrics.router_mi(name, normalized=True)] = torch.where(any_kept, nmi.float(), nan)
    return {k: torch.where(valid.any(), v, nan) for k, v in out.items()}
