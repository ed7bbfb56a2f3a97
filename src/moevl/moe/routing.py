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

BalanceFrom = Literal["top1", "topk"]


@dataclass
class RoutingRecord:
    """What one MoE layer decided for one forward pass (explicit result, no module state).

    Attributes:
        logits: (N, E) router logits, in the router dtype (fp32 by default).
        probs: (N, E) softmax of the logits.
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
    count = mask.sum()
    if count == 0:
        return probs.sum() * 0.0
    m = mask.to(probs.dtype)
    chosen = indices[:, :1] if balance_from == "top1" else indices
    # one_hot of -1 is not allowed: shift by one and drop the "unused" column.
    onehot = F.one_hot(chosen.clamp_min(-1) + 1, num_experts + 1)[..., 1:].to(probs.dtype)  # (N, K, E)
    f = (onehot.sum(1) * m[:, None]).sum(0) / count  # (E,)
    p = (probs * m[:, None]).sum(0) / count  # (E,)
    return num_experts * (f * p).sum()


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


def select_experts(
    probs: Tensor, num_selected: Tensor | int, max_k: int, *, normalize: bool
) -> tuple[Tensor, Tensor]:
    """Top-``num_selected`` experts per token, in (N, max_k) slots (extra slots unused).

    Args:
        probs: (N, E) routing probabilities.
        num_selected: int or (N,) long, experts for each token (0 for padding).
        max_k: slots per token, ``>= num_selected``.
        normalize: renormalise the selected weights to sum to 1 (MoE-LLaVA).
    """
    weights, indices = probs.topk(max_k, dim=-1)  # (N, max_k), sorted descending
    slot = torch.arange(max_k, device=probs.device)
    if isinstance(num_selected, int):
        used = (slot < num_selected).expand_as(indices)
    else:
        used = slot[None, :] < num_selected[:, None]
    weights = weights * used
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    indices = torch.where(used, indices, torch.full_like(indices, -1))
    return indices, weights


class TopKRouter(nn.Module):
    """Linear router with softmax top-k gating, balancing loss, z-loss and optional capacity.

    MoE-LLaVA stage 3 uses ``top_k=2`` with renormalised top-2 weights, a balancing coefficient
    of 0.01 and a router computed in fp32. moevl is dropless (``capacity_factor=None``) and
    deterministic at inference by default; ``jitter`` (Switch's multiplicative input noise) acts in
    training only.
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        normalize_weights: bool = True,
        balance_from: BalanceFrom = "top1",
        capacity_factor: float | None = None,
        jitter: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if balance_from not in ("top1", "topk"):
            raise ValueError(f"balance_from must be 'top1' or 'topk', got {balance_from!r}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize_weights = normalize_weights
        self.balance_from: BalanceFrom = balance_from
        self.capacity_factor = capacity_factor
        self.jitter = jitter
        self.router_dtype = dtype
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    @property
    def max_experts_per_token(self) -> int:
        return self.top_k

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}"

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """(N, D) -> (N, E) logits in the router dtype."""
        if self.training and self.jitter > 0:
            noise = torch.empty_like(hidden).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            hidden = hidden * noise
        return F.linear(hidden.to(self.router_dtype), self.weight.to(self.router_dtype))

    def forward(
        self, hidden: Tensor, *, token_mask: Tensor | None = None, vision_mask: Tensor | None = None
    ) -> RoutingRecord:
        """Route ``hidden`` (N, D). ``token_mask`` (N,) bool marks real tokens (None: all)."""
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise ValueError(f"hidden must be (N, {self.hidden_size}), got shape {tuple(hidden.shape)}")
        return self.route(self.compute_logits(hidden), token_mask=token_mask, vision_mask=vision_mask)

    def route(
        self, logits: Tensor, *, token_mask: Tensor | None = None, vision_mask: Tensor | None = None
    ) -> RoutingRecord:
        """Top-k decision from router logits (N, E)."""
        token_mask = _check_masks(logits, token_mask, vision_mask)
        probs = logits.softmax(-1)
        num_selected = token_mask.long() * self.top_k
        indices, weights = select_experts(probs, num_selected, self.top_k, normalize=self.normalize_weights)
        return self._finish(logits, probs, indices, weights, token_mask, vision_mask, balance_mask=token_mask)

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
