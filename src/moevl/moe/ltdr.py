"""LTDR: the Long-Tailed Distribution-aware Router (Cai, Yang et al., arXiv 2507.01351).

Two parts, each switchable so the paper's ablations can be run:

* MsDaR (modality-specific balancing): the balancing loss sees language tokens only.
* VsDEA (vision-specific dynamic expert allocation): a vision token whose routing-probability
  variance ``RPV_t = Var(p_t)`` is above the mean RPV of the batch's vision tokens is a *tail*
  token and uses its top-``a`` experts; every other token keeps top-``k``. The paper's ablation
  against a fixed share of tail tokens is ``tail_ratio``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moevl.checks import check_bool, check_float, check_int
from moevl.moe.routing import (
    RoutingRecord,
    TopKRouter,
    _check_masks,
    combine_weights,
    routing_probs,
    routing_scores,
    select_experts,
)


@dataclass(frozen=True)
class LTDRConfig:
    """LTDR options.

    Attributes:
        tail_top_k: ``a``, experts for vision tail tokens (``k <= a <= E``; None means every
            expert a token may choose: ``E`` without group limits).
            ``a == k`` is allowed and turns VsDEA off in effect.
        language_only_balance: MsDaR, the balancing loss over language tokens only.
        vision_tail: VsDEA, tail vision tokens get ``tail_top_k`` experts.
        tail_ratio: None (the paper's adaptive rule: RPV above the vision tokens' mean RPV) or a
            fixed share in (0, 1] of each batch's vision tokens, those of highest RPV (the
            paper's ablation of the rule).
    """

    tail_top_k: int | None = None
    language_only_balance: bool = True
    vision_tail: bool = True
    tail_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.tail_top_k is not None:
            check_int("tail_top_k", self.tail_top_k, minimum=1)
        check_bool("language_only_balance", self.language_only_balance)
        check_bool("vision_tail", self.vision_tail)
        if self.tail_ratio is not None:
            _check_ratio(self.tail_ratio)


def _check_ratio(ratio: float) -> float:
    check_float("ltdr.tail_ratio", ratio, minimum=0.0, maximum=1.0)
    if ratio == 0.0:
        raise ValueError("ltdr.tail_ratio must be in (0, 1] (or null for the adaptive rule), got 0.0")
    return ratio


def ltdr_tail_mask(probs: Tensor, vision: Tensor, *, tail_ratio: float | None = None) -> Tensor:
    """Vision tail tokens: RPV above the mean RPV of the vision tokens (LTDR, VsDEA), or with
    ``tail_ratio``, the ``round(tail_ratio · #vision)`` vision tokens of highest RPV (ties: the
    earlier token).

    ``RPV_t`` is the (population) variance of token ``t``'s E routing probabilities.

    Args:
        probs: (N, E) routing probabilities.
        vision: (N,) bool, vision tokens to consider (the caller excludes padding).
        tail_ratio: None, or the fixed share in (0, 1] of vision tokens that are tail.
    Returns:
        (N,) bool; all False when there is no vision token.
    """
    if probs.dim() != 2:
        raise ValueError(f"probs must be (N, E), got shape {tuple(probs.shape)}")
    if vision.shape != probs.shape[:1] or vision.dtype != torch.bool:
        raise ValueError(
            f"vision must be a bool tensor of shape ({probs.shape[0]},), got {vision.dtype} {tuple(vision.shape)}"
        )
    rpv = probs.detach().float().var(dim=-1, unbiased=False)  # (N,)
    count = vision.sum()
    if tail_ratio is not None:  # no host synchronisation: ranks instead of a data-dependent top-k
        order = rpv.masked_fill(~vision, -torch.inf).argsort(descending=True, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        return vision & (rank < torch.round(_check_ratio(tail_ratio) * count))
    mean_rpv = (rpv * vision).sum() / count.clamp_min(1)  # no vision token: vision is all False
    return vision & (rpv > mean_rpv)


class LTDRRouter(TopKRouter):
    """Top-k router with LTDR's modality-aware balancing and tail-token expert allocation.

    With ``tail_top_k == top_k`` and ``language_only_balance=False`` it equals ``TopKRouter``.
    The allocation rule is the same at training and at inference. A tail token takes its top-``a``
    experts under the router's own rule (scoring, score bias, group limit, renormalisation,
    scaling: ``TopKRouter``), so LTDR combines with every native router's semantics.

    Args:
        tail_top_k: ``a``, experts of a vision tail token, in ``[top_k, max_choosable]``; None:
            every expert a token may choose (E without group limits).
        language_only_balance: MsDaR, the balancing loss over language tokens only.
        vision_tail: VsDEA, tail vision tokens get ``tail_top_k`` experts.
        tail_ratio: None (adaptive tail rule) or a fixed share of vision tokens (``LTDRConfig``).
        router_options: ``TopKRouter``'s keyword arguments (sizes, scoring, groups, ...).
    """

    def __init__(
        self,
        *,
        tail_top_k: int | None = None,
        language_only_balance: bool = True,
        vision_tail: bool = True,
        tail_ratio: float | None = None,
        **router_options: Any,
    ) -> None:
        super().__init__(**router_options)
        tail_top_k = self.max_choosable if tail_top_k is None else tail_top_k
        check_int("tail_top_k", tail_top_k, minimum=self.top_k, maximum=self.max_choosable)
        self.tail_top_k = tail_top_k
        self.language_only_balance = check_bool("language_only_balance", language_only_balance)
        self.vision_tail = check_bool("vision_tail", vision_tail)
        self.tail_ratio = None if tail_ratio is None else _check_ratio(tail_ratio)

    @property
    def max_experts_per_token(self) -> int:
        return self.tail_top_k if self.vision_tail else self.top_k

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, tail_top_k={self.tail_top_k}, "
            f"language_only_balance={self.language_only_balance}, vision_tail={self.vision_tail}"
            + ("" if self.tail_ratio is None else f", tail_ratio={self.tail_ratio}")
        )

    def route(
        self,
        logits: Tensor,
        *,
        token_mask: Tensor | None = None,
        vision_mask: Tensor | None = None,
        score_bias: Tensor | None = None,
    ) -> RoutingRecord:
        """LTDR decision from router logits (N, E); ``vision_mask`` (N,) bool marks vision tokens
        (None: every token is text). ``score_bias`` as ``TopKRouter.route``."""
        token_mask = _check_masks(logits, token_mask, vision_mask)
        vision = torch.zeros_like(token_mask) if vision_mask is None else vision_mask & token_mask
        scores = routing_scores(logits, self.scoring)  # (N, E) fp32
        probs = routing_probs(scores, self.scoring)
        if self.vision_tail:
            tail = ltdr_tail_mask(probs, vision, tail_ratio=self.tail_ratio)
        else:
            tail = torch.zeros_like(token_mask)
        num_selected = torch.where(tail, self.tail_top_k, self.top_k) * token_mask
        choice = self.choice_scores(self.choice_input(logits, scores), score_bias)
        indices = select_experts(choice, num_selected, self.max_experts_per_token)
        weights = combine_weights(scores, indices, normalize=self.normalize_weights)
        balance_mask = token_mask & ~vision if self.language_only_balance else token_mask
        return self._finish(
            logits,
            probs,
            indices,
            weights,
            token_mask,
            vision_mask,
            balance_mask=balance_mask,
            tail_mask=tail,
        )
