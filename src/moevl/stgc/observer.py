"""STGC inside the experts' backward: conflict masks, the CEL gradient, per-step statistics.

``STGCConfig`` is what a user passes to ``MoEFeedForward(stgc=...)`` or ``moevl.hf.upcycle(stgc=...)``.
For each training forward the layer asks it for an ``STGCObserver``; the experts' backward hands
the observer every expert linear layer's inputs, output gradients and weight gradients, and the
observer returns ``weight · scale · s · ∂L_cel/∂logits`` for the router logits, where ``s`` is the
gradient that reached the layer's zero-valued anchor (1 for a plain ``loss.backward()``; the
accumulation, loss-scaling or DeepSpeed factor otherwise), so STGC keeps its weight relative to
the task loss under every engine. With ``weight_mode="relative"`` the CEL gradient is instead
added where the router logits' gradient is complete (the guard's backward), scaled to ``weight``
times the norm of everything else the logits receive. One backward, no ``retain_graph``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from moevl.checks import check_bool, check_choice, check_float, check_int
from moevl.moe.expert_function import ExpertGrads
from moevl.stgc.cosine import grouped_token_gradient_cosine
from moevl.stgc.loss import CEL_FORMS, CELForm, conflict_elimination_grad

Scope = Literal["all", "last", "delta"]
ThresholdMode = Literal["absolute", "relative"]
WeightMode = Literal["absolute", "relative"]
SCOPES: tuple[str, ...] = ("all", "last", "delta")
THRESHOLD_MODES: tuple[str, ...] = ("absolute", "relative")
WEIGHT_MODES: tuple[str, ...] = ("absolute", "relative")


@dataclass(frozen=True)
class STGCConfig:
    """Solving Token Gradient Conflict (Yang et al., ICLR 2025), RESEARCH.md §1.

    Attributes:
        threshold: τ of ``threshold_mode="absolute"``; a (token, expert) pair conflicts when its
            gradient cosine is below it. Must stay 0.0 (unused) with ``"relative"``.
        weight: with ``weight_mode="relative"`` (the default), ρ: the CEL's gradient on each
            layer's router logits is ``weight`` times the norm of the gradient they get from
            everything else. With ``"absolute"``, β, the paper's coefficient (``L = L_task +
            α L_balance + β L_cel``; public re-implementations used 0.25–1.2).
        weight_mode: ``"relative"`` [our choice, the default] or ``"absolute"`` (the paper's
            ``β L_cel``). With β the CEL's push is several times the task's gradient on the router
            (``stgc/cel_grad_ratio``: 2.9 at β = 0.5 in the demo); relative, it is bounded by ρ
            whatever the loss scale, schedule or model.
        scope: ``all`` (every linear layer of the expert, exact), ``last`` (the output projection,
            exact for it), ``delta`` (cosine of the output gradient against its expert mean: cheap).
        min_tokens: experts with fewer tokens than this in the micro-batch have no conflicts.
        threshold_mode: ``"absolute"`` (``cos < threshold``, the paper's rule) or ``"relative"``
            [our choice; the paper is silent]: per expert, ``cos < mean_e − c · std_e`` with the
            mean and population standard deviation of that expert's cosines in the micro-batch
            (this rank's tokens). It flags the expert's outliers whatever the cosines' level: under
            a normal spread about ``Φ(−c)`` of them (16% for ``c = 1``), so its conflict ratio is
            nearly constant by construction; an expert whose cosines are all equal has none.
        relative_c: ``c`` of the relative rule (finite, >= 0). Must stay 1.0 with ``"absolute"``.
        cel: the CEL form (``moevl.stgc.loss``): ``"neg_softmax"`` (``−log softmax(−z)_e``, the
            default), ``"one_minus_p"`` (``−log(1 − p_e)``) or ``"next_best"`` (mass moves only to
            the token's next-best experts) [the latter two our choice].
        centered: [our choice, the default] weigh every dispatched pair by ``f − r_e`` (1 for a
            conflict, minus the conflict rate of its expert in the micro-batch) instead of counting
            the conflicts: conflicting tokens are pushed out as before and the expert's other
            tokens pulled in by as much, so flags that carry no information no longer flatten the
            router (``moevl.stgc.loss``). ``False``: the paper's CEL.

    The defaults (relative ρ = 0.3, centered) were chosen on the digit benchmark's validation split
    (bench/results/stgc_study): the paper's setting (``STGCConfig.paper()``) lowers the conflict
    ratio but ends with uniform routers (normalised entropy 0.999); relative weighting alone does
    too (0.996 at ρ = 0.1); centering alone sharpens the router past what the balance loss holds.
    """

    threshold: float = 0.0
    weight: float = 0.3
    weight_mode: WeightMode = "relative"
    scope: Scope = "all"
    min_tokens: int = 2
    threshold_mode: ThresholdMode = "absolute"
    relative_c: float = 1.0
    cel: CELForm = "neg_softmax"
    centered: bool = True

    @classmethod
    def paper(cls, **changes) -> STGCConfig:
        """STGC as its paper writes it: ``β L_cel`` with β = 0.5 over the conflicting pairs (τ = 0)."""
        return cls(**{"weight": 0.5, "weight_mode": "absolute", "centered": False, **changes})

    def __post_init__(self) -> None:
        # NOTE: the field names carry the "stgc." prefix of MoESettings, where users meet them.
        check_float("stgc.threshold", self.threshold, minimum=-1.0, maximum=1.0)
        check_float("stgc.weight", self.weight, minimum=0.0)
        check_choice("stgc.weight_mode", self.weight_mode, WEIGHT_MODES)
        check_choice("stgc.scope", self.scope, SCOPES)
        check_int("stgc.min_tokens", self.min_tokens, minimum=1)
        check_choice("stgc.threshold_mode", self.threshold_mode, THRESHOLD_MODES)
        check_float("stgc.relative_c", self.relative_c, minimum=0.0)
        check_choice("stgc.cel", self.cel, CEL_FORMS)
        check_bool("stgc.centered", self.centered)
        # a field the chosen rule does not read is refused rather than silently ignored
        if self.threshold_mode == "relative" and self.threshold != 0.0:
            raise ValueError(
                "stgc.threshold must be 0.0 with threshold_mode='relative', which does not use it (set "
                f"relative_c instead), got {self.threshold!r}"
            )
        if self.threshold_mode == "absolute" and self.relative_c != 1.0:
            raise ValueError(
                "stgc.relative_c must be 1.0 with threshold_mode='absolute' (only 'relative' uses it), "
                f"got {self.relative_c!r}"
            )

    def conflicts(self, cosine: Tensor, expert_ids: Tensor, counts: Tensor) -> Tensor:
        """(P,) bool, the conflicting pairs among the dispatched pairs.

        Args:
            cosine: (P,) gradient cosine of each dispatched (token, expert) pair.
            expert_ids: (P,) long, the pair's expert.
            counts: (E,) long, pairs per expert.
        """
        eligible = counts[expert_ids] >= self.min_tokens
        if self.threshold_mode == "absolute":
            return eligible & (cosine < self.threshold)
        n = counts.clamp_min(1).to(cosine.dtype)  # (E,)
        mean = cosine.new_zeros(n.shape).index_add_(0, expert_ids, cosine) / n
        dev2 = (cosine - mean[expert_ids]).square()
        std = (cosine.new_zeros(n.shape).index_add_(0, expert_ids, dev2) / n).sqrt()  # population
        return eligible & (cosine < (mean - self.relative_c * std)[expert_ids])

    def new_observer(self, *, scale: float = 1.0) -> STGCObserver:
        return STGCObserver(self, scale)

    def guard_logits(self, logits: Tensor, observer: STGCObserver) -> Tensor:
        return _ReadyGuard.apply(logits, observer)


@dataclass
class STGCStats:
    """STGC statistics of one MoE layer for one step, filled during backward.

    Attributes (tensors, valid once ``ready``):
        cosine: (P,) gradient cosine of each dispatched (token, expert) pair.
        expert_ids, token_ids: (P,) the pair's expert and token.
        conflicts: (P,) bool, the flagged pairs.
        tokens_per_expert: (E,) long.
        cel: scalar, the CEL value (before ``weight``).
        cel_logit_grad: (E,) ``Σ_t ∂L_cel/∂z_{t,e}`` (before ``weight``): > 0 where the CEL pushes
            the expert's logits down on balance, < 0 where it pulls them up.
        cel_grad_ratio: scalar, the norm of the CEL gradient added to the router logits over the
            norm of the rest of their gradient (0 where the rest is 0).
    """

    num_experts: int
    ready: bool = False
    cosine: Tensor = field(default_factory=lambda: torch.zeros(0))
    expert_ids: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    token_ids: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    conflicts: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    tokens_per_expert: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    cel: Tensor = field(default_factory=lambda: torch.zeros(()))
    cel_logit_grad: Tensor = field(default_factory=lambda: torch.zeros(0))
    cel_grad_ratio: Tensor = field(default_factory=lambda: torch.zeros(()))

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
        conflicts = self.conflicts.float()
        num = conflicts.new_zeros(self.num_experts).index_add_(
            0, self.expert_ids.to(conflicts.device), conflicts
        )
        return num / self.tokens_per_expert.to(conflicts.device).clamp_min(1)

    @property
    def cosine_mean(self) -> float:
        self._require_ready()
        return float(self.cosine.mean()) if self.cosine.numel() else 0.0

    @property
    def cosine_std(self) -> float:
        self._require_ready()
        return float(self.cosine.std(unbiased=False)) if self.cosine.numel() else 0.0

    def summary_tensors(self) -> dict[str, Tensor]:
        """The ``summary`` scalars as 0-d float tensors on the statistics' device: no host synchronisation."""
        self._require_ready()
        cos, conflicts = self.cosine.float(), self.conflicts.float()
        zero = cos.new_zeros(())
        return {
            "conflict_ratio": conflicts.mean() if conflicts.numel() else zero,
            "cosine_mean": cos.mean() if cos.numel() else zero,
            "cosine_std": cos.std(unbiased=False) if cos.numel() else zero,
            "cel": self.cel.detach().float().to(cos.device),
            "num_conflicts": conflicts.sum(),
            "cel_grad_ratio": self.cel_grad_ratio.detach().float().to(cos.device),
            # share of pairs with a negative cosine: the conflict ratio at tau = 0 whatever the run's threshold,
            # so that runs with different thresholds compare
            "negative_share": (cos < 0).float().mean() if cos.numel() else zero,
        }

    def summary(self) -> dict[str, float]:
        """Scalars for logging (``summary_tensors`` read on the host)."""
        tensors = self.summary_tensors()
        return dict(zip(tensors, torch.stack(list(tensors.values())).tolist(), strict=True))


class STGCObserver:
    """Computes one layer's conflicts and CEL gradient inside the experts' backward."""

    def __init__(self, config: STGCConfig, scale: float) -> None:
        self.config = config
        self.scale = scale
        self.stats = STGCStats(num_experts=0)  # E is known in backward
        # "absolute": the weighted CEL gradient the experts' backward returned; "relative": the
        # unweighted one, added by the guard's backward
        self.cel_grad: Tensor | None = None

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
        conflict = cfg.conflicts(cos, grads.expert_ids, grads.counts)  # (P,)
        mask = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        # each (token, expert) pair is dispatched once: write every pair's flag (no boolean index, no sync)
        mask.index_put_((grads.token_ids, grads.expert_ids), conflict)
        dispatched = None
        if cfg.cel == "next_best" or cfg.centered:
            dispatched = torch.zeros_like(mask)
            dispatched[grads.token_ids, grads.expert_ids] = True
        cel, grad = conflict_elimination_grad(
            logits, mask, form=cfg.cel, dispatched=dispatched, centered=cfg.centered, check_values=False
        )
        s = self.stats
        s.num_experts = logits.shape[1]
        s.cosine, s.expert_ids, s.token_ids = cos.detach(), grads.expert_ids, grads.token_ids
        s.conflicts, s.tokens_per_expert, s.cel = conflict, grads.counts, cel.detach()
        s.cel_logit_grad = grad.float().sum(0)
        s.ready = True
        if cfg.weight_mode == "relative":
            self.cel_grad = grad
            return torch.zeros_like(grad)
        self.cel_grad = grad * (cfg.weight * self.scale * grads.anchor_grad.to(grad.dtype))
        return self.cel_grad

    def complete(self, grad: Tensor) -> Tensor:
        """The router logits' whole gradient from ``grad``, their gradient at the guard (the CEL
        gradient of ``"absolute"`` included, that of ``"relative"`` not yet); fills ``cel_grad_ratio``."""
        cel, self.cel_grad = self.cel_grad, None
        assert cel is not None
        if self.config.weight_mode == "relative":
            rest = grad.float().norm()
            norm = cel.float().norm()
            # no host synchronisation: a zero CEL gradient (no conflicts) stays zero
            factor = torch.where(norm > 0, self.config.weight * rest / norm.clamp_min(1e-30), 0.0)
            cel = cel * factor.to(cel.dtype)
            grad = grad + cel
        else:
            rest = (grad - cel).float().norm()
        self.stats.cel_grad_ratio = torch.where(
            rest > 0, cel.float().norm() / rest.clamp_min(1e-30), 0.0
        ).detach()
        return grad


class _ReadyGuard(torch.autograd.Function):
    """Identity on the router logits. Its backward fails if the STGC statistics are not ready, and completes
    the logits' gradient (``STGCObserver.complete``)."""

    @staticmethod
    def forward(ctx, logits: Tensor, observer: STGCObserver) -> Tensor:  # type: ignore[override]
        ctx.observer = observer
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if not ctx.observer.stats.ready:
            raise RuntimeError(
                "STGC: the router's backward ran before the experts' backward computed the token "
                "gradient conflicts (the experts' output is not part of the loss, or the graph was "
                "cut). STGC cannot add its loss; refusing to skip it silently."
            )
        return ctx.observer.complete(grad), None
