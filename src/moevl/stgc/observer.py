"""STGC inside the experts' backward: conflict masks, the CEL gradient, per-step statistics.

``STGCConfig`` is what a user passes to ``MoEFeedForward(stgc=...)`` or ``moevl.hf.upcycle(stgc=...)``.
For each training forward the layer asks it for an ``STGCObserver``; the experts' backward hands
the observer every expert linear layer's inputs, output gradients and weight gradients, and the
observer returns ``weight · scale · s · ∂L_cel/∂logits`` for the router logits, where ``s`` is the
gradient that reached the layer's zero-valued anchor (1 for a plain ``loss.backward()``; the
accumulation, loss-scaling or DeepSpeed factor otherwise), so STGC keeps its weight relative to
the task loss under every engine. One backward, no ``retain_graph``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from moevl.moe.expert_function import ExpertGrads
from moevl.stgc.cosine import grouped_token_gradient_cosine
from moevl.stgc.loss import conflict_elimination_grad

Scope = Literal["all", "last", "delta"]


@dataclass(frozen=True)
class STGCConfig:
    """Solving Token Gradient Conflict (Yang et al., ICLR 2025), RESEARCH.md §1.

    Attributes:
        threshold: τ; a (token, expert) pair conflicts when its gradient cosine is below it.
        weight: β, the CEL coefficient (``L = L_task + α L_balance + β L_cel``). Default 0.5
            [our choice; public re-implementations found 0.25–1.2 useful].
        scope: ``all`` (every linear layer of the expert, exact), ``last`` (the output projection,
            exact for it), ``delta`` (cosine of the output gradient against its expert mean: cheap).
        min_tokens: experts with fewer tokens than this in the micro-batch have no conflicts.
    """

    threshold: float = 0.0
    weight: float = 0.5
    scope: Scope = "all"
    min_tokens: int = 2

    def __post_init__(self) -> None:
        if self.scope not in ("all", "last", "delta"):
            raise ValueError(f"scope must be 'all', 'last' or 'delta', got {self.scope!r}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine in [-1, 1], got {self.threshold}")
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {self.min_tokens}")

    def new_observer(self, *, scale: float = 1.0) -> STGCObserver:
        return STGCObserver(self, scale)

    def guard_logits(self, logits: Tensor, observer: STGCObserver) -> Tensor:
        return _ReadyGuard.apply(logits, observer.stats)


@dataclass
class STGCStats:
    """STGC statistics of one MoE layer for one step, filled during backward.

    Attributes (tensors, valid once ``ready``):
        cosine: (P,) gradient cosine of each dispatched (token, expert) pair.
        expert_ids, token_ids: (P,) the pair's expert and token.
        conflicts: (P,) bool, the flagged pairs.
        tokens_per_expert: (E,) long.
        cel: scalar, the CEL value (before ``weight``).
    """

    num_experts: int
    ready: bool = False
    cosine: Tensor = field(default_factory=lambda: torch.zeros(0))
    expert_ids: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    token_ids: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    conflicts: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    tokens_per_expert: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    cel: Tensor = field(default_factory=lambda: torch.zeros(()))

    def _require_ready(self) -> None:
        if not self.ready:
            raise RuntimeError("STGC statistics are filled by backward(); run loss.backward() first")

    @property
    def conflict_ratio(self) -> float:
        """Share of dispatched (token, expert) pairs that conflict."""
        self._require_ready()
        return float(self.conflicts.float().mean()) if self.conflicts.numel() else 0.0

    @property
    def conflict_ratio_per_expert(self) -> Tensor:
        """(E,) share of each expert's tokens that conflict (0 for an empty expert)."""
        self._require_ready()
        num = torch.zeros(self.num_experts).index_add_(0, self.expert_ids.cpu(), self.conflicts.float().cpu())
        return num / self.tokens_per_expert.cpu().clamp_min(1)

    @property
    def cosine_mean(self) -> float:
        self._require_ready()
        return float(self.cosine.mean()) if self.cosine.numel() else 0.0

    @property
    def cosine_std(self) -> float:
        self._require_ready()
        return float(self.cosine.std(unbiased=False)) if self.cosine.numel() else 0.0

    def summary(self) -> dict[str, float]:
        """Scalars for logging."""
        return {
            "conflict_ratio": self.conflict_ratio,
            "cosine_mean": self.cosine_mean,
            "cosine_std": self.cosine_std,
            "cel": float(self.cel),
            "num_conflicts": float(self.conflicts.sum()),
        }


class STGCObserver:
    """Computes one layer's conflicts and CEL gradient inside the experts' backward."""

    def __init__(self, config: STGCConfig, scale: float) -> None:
        self.config = config
        self.scale = scale
        self.stats = STGCStats(num_experts=0)  # E is known in backward

    def backward(self, grads: ExpertGrads) -> Tensor:
        if grads.observed is None:
            raise RuntimeError("STGC needs the router logits as the experts' observed tensor")
        if grads.anchor_grad is None:
            raise RuntimeError(
                "STGC: this MoE layer's CEL anchor (record.cel_anchor) is not part of the loss, so the "
                "conflict elimination loss has no weight. Add record.aux_loss() (moevl.hf models do it) "
                "to the loss you call backward() on."
            )
        cfg = self.config
        logits = grads.observed  # (N, E)
        cos = grouped_token_gradient_cosine(grads, cfg.scope)  # (P,)
        eligible = grads.counts[grads.expert_ids] >= cfg.min_tokens
        conflict = eligible & (cos < cfg.threshold)
        mask = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        mask[grads.token_ids[conflict], grads.expert_ids[conflict]] = True
        cel, grad = conflict_elimination_grad(logits, mask)
        s = self.stats
        s.num_experts = logits.shape[1]
        s.cosine, s.expert_ids, s.token_ids = cos.detach(), grads.expert_ids, grads.token_ids
        s.conflicts, s.tokens_per_expert, s.cel = conflict, grads.counts, cel.detach()
        s.ready = True
        return grad * (cfg.weight * self.scale * grads.anchor_grad.to(grad.dtype))


class _ReadyGuard(torch.autograd.Function):
    """Identity on the router logits; its backward fails if the STGC statistics are not ready."""

    @staticmethod
    def forward(ctx, logits: Tensor, stats: STGCStats) -> Tensor:  # type: ignore[override]
        ctx.stats = stats
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if not ctx.stats.ready:
            raise RuntimeError(
                "STGC: the router's backward ran before the experts' backward computed the token "
                "gradient conflicts (the experts' output is not part of the loss, or the graph was "
                "cut). STGC cannot add its loss; refusing to skip it silently."
            )
        return grad, None
