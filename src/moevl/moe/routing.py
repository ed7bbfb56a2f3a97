"""Top-k routing, the Switch/GShard balancing loss, the ST-MoE router z-loss, optional capacity.

Axis legend used throughout ``moevl.moe``: ``N`` tokens, ``E`` experts, ``K`` expert slots per
token (``top_k``, or LTDR's ``tail_top_k``), ``D`` model dim, ``H`` expert hidden dim.

A routing decision is a pair ``indices (N, K)`` / ``weights (N, K)``. A slot whose index is ``-1``
is unused (padding token, token dropped over capacity, LTDR head token beyond its ``k``); its
weight is 0. Experts skip such slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moevl.checks import check_bool, check_choice, check_float, check_int

BalanceFrom = Literal["top1", "topk"]
Scoring = Literal["softmax", "sigmoid"]
GroupScore = Literal["max", "top2_sum"]


@dataclass
class RoutingRecord:
    """What one MoE layer decided for one forward pass (explicit result, no module state).

    Attributes:
        logits: (N, E) router logits, in the router dtype (fp32 by default).
        probs: (N, E) routing probabilities: the softmax of the logits, or for sigmoid routers
            [our choice] the sigmoid scores normalised to sum to 1 (``routing_probs``).
        indices: (N, K) chosen experts, ``-1`` for unused slots.
        weights: (N, K) combine weights, 0 for unused slots.
        token_mask: (N,) bool, True for real tokens (False: padding, excluded everywhere).
        vision_mask: (N,) bool or None, True for vision tokens (LTDR, statistics).
        balance_loss: scalar balancing loss (unweighted), ``E · Σ_i f_i P_i``.
        z_loss: scalar router z-loss (unweighted), mean ``logsumexp(z)²``.
        tail_mask: (N,) bool or None, LTDR vision tail tokens (routed to ``tail_top_k`` experts).
        stgc: per-step STGC statistics, filled during backward (``moevl.stgc.STGCStats``) or None.
        cel_anchor: scalar with value 0 whose gradient carries the STGC term's weight, or None.
            Add it to the loss (``aux_loss`` does): see ``moevl.stgc``.
    """

    logits: Tensor
    probs: Tensor
    indices: Tensor
    weights: Tensor
    token_mask: Tensor
    vision_mask: Tensor | None
    balance_loss: Tensor
    z_loss: Tensor
    tail_mask: Tensor | None = None
    stgc: object | None = None
    cel_anchor: Tensor | None = None

    def aux_loss(self, balance_coef: float = 0.01, z_loss_coef: float = 0.0) -> Tensor:
        """The auxiliary loss of this layer to add to the task loss (STGC anchor included)."""
        loss = balance_coef * self.balance_loss + z_loss_coef * self.z_loss
        if self.cel_anchor is not None:
            loss = loss + self.cel_anchor
        return loss

    @property
    def experts_per_token(self) -> Tensor:
        """(N,) number of experts each token used (0 for padding)."""
        return (self.indices >= 0).sum(-1)


def balance_loss(
    probs: Tensor,
    indices: Tensor,
    mask: Tensor | None = None,
    *,
    balance_from: BalanceFrom = "top1",
) -> Tensor:
    """Switch/GShard load-balancing loss ``E · Σ_i f_i · P_i`` over the tokens in ``mask``.

    Switch Transformer (Fedus et al. 2021) eq. 4; the form MoE-LLaVA uses through DeepSpeed's
    ``top2gating`` (``balance_from="top1"``: ``f_i`` is the fraction of tokens whose first choice is
    ``i``). ``balance_from="topk"`` counts every selection, so ``f`` sums to ``k``; this equals
    transformers' ``load_balancing_loss_func`` (Mixtral).

    Args:
        probs: (N, E) routing probabilities.
        indices: (N, K) chosen experts, slot 0 the first choice; ``-1`` slots are not counted.
        mask: (N,) bool, tokens that count; None means all.
    Returns:
        Scalar; 0 when no token counts.
    """
    num_experts = probs.shape[-1]
    if mask is None:
        mask = torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
    # no branch on the count (a host sync): with no token counting, f and p are 0 and so is the loss
    count = mask.sum().clamp_min(1)
    m = mask.to(probs.dtype)
    chosen = indices[:, :1] if balance_from == "top1" else indices
    # selections per expert, -1 slots shifted into an extra column 0 that is dropped
    slot_weight = m[:, None].expand(chosen.shape).reshape(-1)  # (N·K,)
    f = (
        probs.new_zeros(num_experts + 1).index_add_(0, chosen.reshape(-1) + 1, slot_weight)[1:] / count
    )  # (E,)
    p = (probs * m[:, None]).sum(0) / count  # (E,)
    return num_experts * (f * p).sum()


@torch.no_grad()
def update_choice_bias_(bias: Tensor, load: Tensor, rate: float) -> Tensor:
    """Auxiliary-loss-free balancing, one update, in place (Wang et al. 2024, arXiv 2408.15664, Algorithm 1;
    DeepSeek-V3 §2.1.2): ``b_i += u · sign(c̄ − c_i)`` with ``c_i = load[i]`` the tokens routed to expert ``i``
    over the step's batch and ``c̄`` their mean: an overloaded expert's bias goes down by ``u``, an
    underloaded one's up. ``bias`` (E,) is the choice bias top-k selection adds to the scores; returns it.
    No host synchronisation."""
    load = load.to(bias.device, torch.float32)
    return bias.add_((rate * torch.sign(load.mean() - load)).to(bias.dtype))


def router_z_loss(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of ``logsumexp(z)²``."""
    z = torch.logsumexp(logits.float(), dim=-1) ** 2
    if mask is None:
        return z.mean()
    return (z * mask).sum() / mask.sum().clamp_min(1)


def apply_capacity(
    indices: Tensor, weights: Tensor, *, num_experts: int, capacity_factor: float, renormalize: bool
) -> tuple[Tensor, Tensor]:
    """Drop selections over each expert's capacity ``ceil(cf · N_valid · K / E)``.

    Priority is slot-major, as DeepSpeed's ``top2gating``: every token's first choice is placed
    before any second choice; inside a slot, earlier tokens first. Dropped slots get index -1.
    """
    n, k = indices.shape
    num_valid = int((indices[:, 0] >= 0).sum())
    capacity = max(1, math.ceil(capacity_factor * num_valid * k / num_experts))
    flat = indices.t().reshape(-1)  # slot-major (K*N,)
    valid = flat >= 0
    onehot = F.one_hot(flat.clamp_min(0), num_experts) * valid[:, None]
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # rank of the selection inside its expert
    keep = (valid & (position < capacity)).reshape(k, n).t()
    new_indices = torch.where(keep, indices, torch.full_like(indices, -1))
    new_weights = weights * keep
    if renormalize:
        new_weights = new_weights / new_weights.sum(-1, keepdim=True).clamp_min(
            torch.finfo(weights.dtype).tiny
        )
    return new_indices, new_weights


def routing_scores(logits: Tensor, scoring: Scoring) -> Tensor:
    """(N, E) fp32 expert scores from router logits (N, E).

    ``softmax`` (Switch, Mixtral, Qwen-MoE, OLMoE, DeepSeek-V2: ``softmax(z.float())``) or
    ``sigmoid`` (DeepSeek-V3: ``sigmoid(z)`` on fp32 logits), the same ops as transformers.
    """
    z = logits.float()
    return z.softmax(dim=-1) if scoring == "softmax" else z.sigmoid()


def routing_probs(scores: Tensor, scoring: Scoring) -> Tensor:
    """(N, E) routing probabilities for balancing, statistics and LTDR's RPV.

    The softmax scores themselves; for sigmoid scoring [our choice] the scores normalised to sum
    to 1 per token (DeepSeek-V3 itself balances with a bias, not a loss on probabilities).
    """
    if scoring == "softmax":
        return scores
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def limit_to_groups(choice: Tensor, *, num_groups: int, topk_groups: int, group_score: GroupScore) -> Tensor:
    """Group-limited routing (DeepSeek-V2 ``group_limited_greedy``, DeepSeek-V3): the E experts
    form ``num_groups`` equal groups; each token may only choose experts of its ``topk_groups``
    best groups, a group scored by its best expert (``max``, V2) or the sum of its best two
    (``top2_sum``, V3). Other experts' choice scores become ``-inf``.

    NOTE: transformers' V2 masks with 0.0 instead of -inf; the chosen experts are the same whenever
    ``k <= topk_groups · E / num_groups`` (the routers check it), up to experts whose softmax score
    underflowed to exactly 0, which get weight 0 either way.

    Args:
        choice: (N, E) scores the choice is made on.
    Returns:
        (N, E) the masked choice scores.
    """
    n, e = choice.shape
    grouped = choice.view(n, num_groups, e // num_groups)  # (N, G, E/G)
    if group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # (N, G)
    # sorted=False as transformers: only the set of groups matters (and its tie-breaking is theirs)
    group_idx = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False)[1]  # (N, topk_groups)
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
    expert_mask = group_mask.unsqueeze(-1).expand(n, num_groups, e // num_groups).reshape(n, e)
    return choice.masked_fill(~expert_mask.bool(), float("-inf"))


def select_experts(choice: Tensor, num_selected: Tensor | int, max_k: int) -> Tensor:
    """The top-``num_selected`` experts of each token by ``choice``, in (N, max_k) slots.

    Slots are sorted by choice score, best first (transformers' DeepSeek routers leave them
    unsorted: the same set; the weighted sum does not depend on the order). Ties are broken as
    ``torch.topk`` breaks them. Slots beyond a token's ``num_selected`` hold -1.

    Args:
        choice: (N, E) choice scores (``-inf`` for experts a token may not choose).
        num_selected: int or (N,) long, experts for each token (0 for padding).
        max_k: slots per token, ``>= num_selected``.
    Returns:
        (N, max_k) long indices.
    """
    indices = choice.topk(max_k, dim=-1).indices  # (N, max_k), sorted descending
    slot = torch.arange(max_k, device=choice.device)
    if isinstance(num_selected, int):
        used = (slot < num_selected).expand_as(indices)
    else:
        used = slot[None, :] < num_selected[:, None]
    return torch.where(used, indices, torch.full_like(indices, -1))


def combine_weights(scores: Tensor, indices: Tensor, *, normalize: bool) -> Tensor:
    """(N, K) combine weights: the scores of the chosen experts, renormalised to sum to 1 when
    ``normalize`` (``w / Σ w`` as transformers; a token with no expert gets zeros); 0 for unused slots.

    NOTE: DeepSeek-V3 divides by ``Σ w + 1e-20``; in fp32 that equals ``Σ w`` unless the sum is
    below ~1e-13, i.e. unless every chosen sigmoid score is (numerically) zero.
    """
    weights = scores.gather(1, indices.clamp_min(0)) * (indices >= 0)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    return weights


class TopKRouter(nn.Module):
    """Linear router with top-k gating, balancing loss, z-loss and optional capacity.

    The decision, with the options of transformers' native MoE routers (same ops, same order):

    1. scores ``s = softmax(z)`` or ``sigmoid(z)`` of the logits ``z`` (fp32);
    2. choice scores ``s + b`` with a score-correction bias ``b`` (DeepSeek-V3's
       ``e_score_correction_bias``, used for the choice only), then group-limited (DeepSeek);
    3. the top-k experts by choice score; weights ``s`` of the chosen experts, renormalised to
       sum to 1 when ``normalize_weights``, then times ``routed_scaling_factor``.

    MoE-LLaVA stage 3 uses softmax, ``top_k=2`` with renormalised weights, a balancing
    coefficient of 0.01 and a router computed in fp32 (the defaults). Native families:
    Mixtral, Qwen3-VL-MoE (softmax, renormalised); Qwen2-MoE, Qwen3-MoE, OLMoE (softmax,
    renormalised iff ``norm_topk_prob``); DeepSeek-V2 (softmax, not renormalised, optionally groups
    scored by their best expert, scaling factor); DeepSeek-V3 (sigmoid, bias, groups scored by their
    best two experts, renormalised iff ``norm_topk_prob``, scaling factor).

    moevl is dropless (``capacity_factor=None``) and deterministic at inference by default;
    ``jitter`` (Switch's multiplicative input noise) acts in training only.

    Args:
        hidden_size: D.
        num_experts: E.
        top_k: experts per token, at most the experts a token may choose
            (``topk_groups · E / num_groups``).
        scoring: ``softmax`` or ``sigmoid``.
        normalize_weights: renormalise the chosen experts' weights to sum to 1.
        score_bias: keep a bias buffer ``e_score_correction_bias`` (E,), zeros, added to the scores
            for the choice only (DeepSeek-V3's name, so state dicts match).
        bias_on: what the choice bias is added to: the ``scores`` (DeepSeek-V3) or the raw
            ``logits`` (Kolibri: ``topk(z + b)``, weights still from the scores).
        num_groups: expert groups for group-limited routing (must divide E); 1: no groups.
        topk_groups: groups a token may choose from (default: all, no limit).
        group_score: how a group is scored: ``max`` (DeepSeek-V2) or ``top2_sum`` (DeepSeek-V3).
        routed_scaling_factor: factor on the final weights (DeepSeek).
        balance_from: ``top1`` or ``topk`` expert fractions in the balancing loss.
        capacity_factor: None (dropless) or the capacity factor.
        jitter: multiplicative router input noise in training, in ``[0, 1)``.
        dtype: the router's compute dtype (fp32).
        own_weight: False for a router whose logits another module computes (``moevl.hf.adopt``
            keeps a transformers router for them): no weight, no bias buffer (the bias is passed to
            ``route``), ``compute_logits`` refuses; the owner calls ``route(logits)``.
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        scoring: Scoring = "softmax",
        normalize_weights: bool = True,
        score_bias: bool = False,
        bias_on: str = "scores",
        num_groups: int = 1,
        topk_groups: int | None = None,
        group_score: GroupScore = "top2_sum",
        routed_scaling_factor: float = 1.0,
        balance_from: BalanceFrom = "top1",
        capacity_factor: float | None = None,
        jitter: float = 0.0,
        dtype: torch.dtype = torch.float32,
        own_weight: bool = True,
    ) -> None:
        super().__init__()
        check_int("hidden_size", hidden_size, minimum=1)
        check_int("num_experts", num_experts, minimum=1)
        check_choice("scoring", scoring, ("softmax", "sigmoid"))
        check_bool("normalize_weights", normalize_weights)
        check_bool("score_bias", score_bias)
        check_choice("bias_on", bias_on, ("scores", "logits"))
        check_int("num_groups", num_groups, minimum=1, maximum=num_experts)
        if num_experts % num_groups:
            raise ValueError(f"num_groups must divide num_experts={num_experts}, got {num_groups}")
        topk_groups = num_groups if topk_groups is None else topk_groups
        check_int("topk_groups", topk_groups, minimum=1, maximum=num_groups)
        check_choice("group_score", group_score, ("max", "top2_sum"))
        if group_score == "top2_sum" and topk_groups < num_groups and num_experts // num_groups < 2:
            raise ValueError(
                f"group_score='top2_sum' needs at least 2 experts per group, got {num_experts // num_groups}"
            )
        max_choosable = topk_groups * (num_experts // num_groups)
        check_int("top_k", top_k, minimum=1, maximum=max_choosable)
        check_float("routed_scaling_factor", routed_scaling_factor, minimum=0.0, exclusive_minimum=True)
        check_choice("balance_from", balance_from, ("top1", "topk"))
        if capacity_factor is not None:
            check_float("capacity_factor", capacity_factor, minimum=0.0, exclusive_minimum=True)
        check_float("jitter", jitter, minimum=0.0, maximum=1.0, exclusive_maximum=True)
        check_bool("own_weight", own_weight)
        if not own_weight and jitter > 0:
            raise ValueError(
                f"jitter acts on the router's own input; a router with own_weight=False has none (jitter={jitter})"
            )
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.scoring: Scoring = scoring
        self.normalize_weights = normalize_weights
        self.uses_score_bias = score_bias
        self.bias_on = bias_on
        self.num_groups = num_groups
        self.topk_groups = topk_groups
        self.group_score: GroupScore = group_score
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.balance_from: BalanceFrom = balance_from
        self.capacity_factor = capacity_factor
        self.jitter = jitter
        self.router_dtype = dtype
        self.own_weight = own_weight
        self.lora: nn.Module | None = None  # a moevl.moe.lora.RouterLoRA: s · B A x added to the logits
        if own_weight:
            self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
            nn.init.normal_(self.weight, std=0.02)
            if score_bias:
                self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))

    @property
    def max_choosable(self) -> int:
        """Experts a token may choose from: ``topk_groups · E / num_groups``."""
        return self.topk_groups * (self.num_experts // self.num_groups)

    @property
    def max_experts_per_token(self) -> int:
        return self.top_k

    def extra_repr(self) -> str:
        parts = [f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}"]
        if self.scoring != "softmax":
            parts.append(f"scoring={self.scoring}")
        if not self.normalize_weights:
            parts.append("normalize_weights=False")
        if self.uses_score_bias:
            parts.append("score_bias=True" + (", bias_on=logits" if self.bias_on == "logits" else ""))
        if self.topk_groups < self.num_groups:
            parts.append(f"groups={self.topk_groups}/{self.num_groups} by {self.group_score}")
        if self.routed_scaling_factor != 1.0:
            parts.append(f"routed_scaling_factor={self.routed_scaling_factor}")
        if not self.own_weight:
            parts.append("own_weight=False")
        return ", ".join(parts)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """(N, D) -> (N, E) logits in the router dtype."""
        if not self.own_weight:
            raise RuntimeError(
                "this router has no weight of its own (own_weight=False): its owner computes the logits"
            )
        if self.training and self.jitter > 0:
            noise = torch.empty_like(hidden).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            hidden = hidden * noise
        logits = F.linear(hidden.to(self.router_dtype), self.weight.to(self.router_dtype))
        if self.lora is not None:
            logits = logits + self.lora(hidden).to(self.router_dtype)
        return logits

    def forward(
        self, hidden: Tensor, *, token_mask: Tensor | None = None, vision_mask: Tensor | None = None
    ) -> RoutingRecord:
        """Route ``hidden`` (N, D). ``token_mask`` (N,) bool marks real tokens (None: all)."""
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise ValueError(f"hidden must be (N, {self.hidden_size}), got shape {tuple(hidden.shape)}")
        return self.route(self.compute_logits(hidden), token_mask=token_mask, vision_mask=vision_mask)

    def route(
        self,
        logits: Tensor,
        *,
        token_mask: Tensor | None = None,
        vision_mask: Tensor | None = None,
        score_bias: Tensor | None = None,
    ) -> RoutingRecord:
        """Top-k decision from router logits (N, E).

        ``score_bias`` (E,): the choice bias when it lives elsewhere (an adopted DeepSeek-V3
        router's ``e_score_correction_bias``); None: the router's own buffer.
        """
        token_mask = _check_masks(logits, token_mask, vision_mask)
        scores = routing_scores(logits, self.scoring)  # (N, E) fp32
        indices = select_experts(
            self.choice_scores(self.choice_input(logits, scores), score_bias),
            token_mask.long() * self.top_k,
            self.top_k,
        )
        weights = combine_weights(scores, indices, normalize=self.normalize_weights)
        probs = routing_probs(scores, self.scoring)
        return self._finish(logits, probs, indices, weights, token_mask, vision_mask, balance_mask=token_mask)

    def choice_input(self, logits: Tensor, scores: Tensor) -> Tensor:
        """(N, E) what the choice is made on before bias and groups: the scores, or the fp32 logits
        (``bias_on="logits"``; the same order as the scores without a bias)."""
        return logits.float() if self.uses_score_bias and self.bias_on == "logits" else scores

    def choice_scores(self, scores: Tensor, score_bias: Tensor | None = None) -> Tensor:
        """(N, E) the scores the top-k choice is made on: bias added, group limit applied."""
        if score_bias is None and self.uses_score_bias:
            if not self.own_weight:
                raise ValueError(
                    "this router uses a score bias that lives elsewhere: pass score_bias to route()"
                )
            score_bias = self.e_score_correction_bias
        elif score_bias is not None:
            if not self.uses_score_bias:
                raise ValueError("score_bias was given to a router built with score_bias=False")
            if score_bias.shape != (self.num_experts,):
                raise ValueError(
                    f"score_bias must have shape ({self.num_experts},), got {tuple(score_bias.shape)}"
                )
        choice = scores if score_bias is None else scores + score_bias
        if self.topk_groups < self.num_groups:
            choice = limit_to_groups(
                choice, num_groups=self.num_groups, topk_groups=self.topk_groups, group_score=self.group_score
            )
        return choice

    def _finish(
        self,
        logits: Tensor,
        probs: Tensor,
        indices: Tensor,
        weights: Tensor,
        token_mask: Tensor,
        vision_mask: Tensor | None,
        *,
        balance_mask: Tensor,
        tail_mask: Tensor | None = None,
    ) -> RoutingRecord:
        bal = balance_loss(probs, indices, balance_mask, balance_from=self.balance_from)
        z = router_z_loss(logits, token_mask)
        if self.capacity_factor is not None:
            indices, weights = apply_capacity(
                indices,
                weights,
                num_experts=self.num_experts,
                capacity_factor=self.capacity_factor,
                renormalize=self.normalize_weights,
            )
        if self.routed_scaling_factor != 1.0:  # after renormalisation, as DeepSeek
            weights = weights * self.routed_scaling_factor
        return RoutingRecord(
            logits=logits,
            probs=probs,
            indices=indices,
            weights=weights,
            token_mask=token_mask,
            vision_mask=vision_mask,
            balance_loss=bal,
            z_loss=z,
            tail_mask=tail_mask,
        )


def _check_masks(logits: Tensor, token_mask: Tensor | None, vision_mask: Tensor | None) -> Tensor:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, E), got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    for name, m in (("token_mask", token_mask), ("vision_mask", vision_mask)):
        if m is not None and (m.shape != (n,) or m.dtype != torch.bool):
            raise ValueError(f"{name} must be a bool tensor of shape ({n},), got {m.dtype} {tuple(m.shape)}")
    if token_mask is None:
        token_mask = torch.ones(n, dtype=torch.bool, device=logits.device)
    return token_mask
