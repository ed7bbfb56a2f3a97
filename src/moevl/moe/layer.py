"""MoEFeedForward: a router and a set of experts; returns the output and a RoutingRecord."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from moevl.moe.expert_function import ExpertGradientObserver
from moevl.moe.experts import GroupedExperts
from moevl.moe.routing import RoutingRecord, TopKRouter


class MoEOutput(NamedTuple):
    output: Tensor
    record: RoutingRecord


class GradientObserverFactory(Protocol):
    """Something that watches the experts' backward of one forward pass (``moevl.stgc.STGCConfig``)."""

    def new_observer(self, *, scale: float) -> ExpertGradientObserver:
        """A fresh observer for one forward pass; it has a ``stats`` attribute."""
        ...

    def guard_logits(self, logits: Tensor, observer: ExpertGradientObserver) -> Tensor:
        """Identity on the router logits whose backward checks the observer has run."""
        ...


class MoEFeedForward(nn.Module):
    """Sparse MoE feed-forward block: ``y_t = Σ_{e ∈ topk(t)} w_{t,e} · expert_e(x_t) (+ s_t)``.

    ``s_t`` is the optional shared-expert output every token gets: ``shared_experts(x_t)``
    (DeepSeek-V2/V3, DeepSeekMoE's shared expert isolation) or, with a shared gate,
    ``sigmoid(shared_gate(x_t)) · shared_experts(x_t)`` (Qwen2-MoE).

    Args:
        router: a ``TopKRouter`` (or ``LTDRRouter``).
        experts: the ``GroupedExperts``.
        shared_experts: a module (..., D) -> (..., D) every token goes through, or None.
        shared_gate: an ``nn.Linear(D, 1)`` whose sigmoid scales the shared output, or None.
        stgc: an STGC configuration (``moevl.stgc.STGCConfig``) or None. When set and the module is
            training with grad enabled, the experts' backward computes token-gradient conflicts
            and adds the conflict elimination loss gradient to the router logits.
        stgc_scale: factor on the STGC loss of this layer (``moevl.hf.upcycle`` sets ``1 / L`` so
            that the loss is averaged over the ``L`` MoE layers).
    """

    def __init__(
        self,
        *,
        router: TopKRouter,
        experts: GroupedExperts,
        shared_experts: nn.Module | None = None,
        shared_gate: nn.Linear | None = None,
        stgc: GradientObserverFactory | None = None,
        stgc_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if router.num_experts != experts.num_experts:
            raise ValueError(
                f"router.num_experts ({router.num_experts}) != experts.num_experts ({experts.num_experts})"
            )
        if router.hidden_size != experts.hidden_size:
            raise ValueError(
                f"router.hidden_size ({router.hidden_size}) != experts.hidden_size ({experts.hidden_size})"
            )
        if shared_gate is not None and shared_experts is None:
            raise ValueError("shared_gate was given without shared_experts")
        if shared_gate is not None and (
            not isinstance(shared_gate, nn.Linear)
            or (shared_gate.in_features, shared_gate.out_features) != (experts.hidden_size, 1)
        ):
            raise ValueError(
                f"shared_gate must be an nn.Linear({experts.hidden_size}, 1), got {shared_gate!r}"
            )
        self.router = router
        self.experts = experts
        self.shared_experts = shared_experts
        self.shared_gate = shared_gate
        self.stgc = stgc
        self.stgc_scale = stgc_scale

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def forward(
        self, hidden: Tensor, *, token_mask: Tensor | None = None, vision_mask: Tensor | None = None
    ) -> MoEOutput:
        """Route and combine.

        Args:
            hidden: (..., D) tokens, e.g. (B, T, D).
            token_mask: (...) bool, real tokens; padding (False) goes to no expert, its output is
                0 and it is excluded from every loss and statistic. None: all tokens are real.
            vision_mask: (...) bool, vision tokens (used by LTDR and the statistics).
        Returns:
            ``MoEOutput(output (..., D), record)``.
        """
        if hidden.dim() < 1 or hidden.shape[-1] != self.experts.hidden_size:
            raise ValueError(
                f"hidden must be (..., {self.experts.hidden_size}) (the experts' hidden size), got shape "
                f"{tuple(hidden.shape)}"
            )
        lead = hidden.shape[:-1]
        x = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
        flat_tok = None if token_mask is None else _flat_mask(token_mask, lead, "token_mask")
        flat_vis = None if vision_mask is None else _flat_mask(vision_mask, lead, "vision_mask")

        def run(
            indices: Tensor, weights: Tensor, observer: ExpertGradientObserver | None, observed: Tensor | None
        ):
            return self.experts(x, indices, weights, observer=observer, observed=observed)

        y, record = route_and_run(
            self.router,
            self.router.compute_logits(x),  # (N, E)
            run,
            token_mask=flat_tok,
            vision_mask=flat_vis,
            stgc=self.stgc if self.training else None,
            stgc_scale=self.stgc_scale,
        )
        shared = self.shared_output(x)
        if shared is not None:
            if flat_tok is not None:  # padding gets no output from any expert, shared ones included
                shared = shared * flat_tok[:, None].to(shared.dtype)
            y = y + shared
        return MoEOutput(y.reshape(*lead, y.shape[-1]), record)  # not -1: lead may hold a 0

    def shared_output(self, x: Tensor) -> Tensor | None:
        """(N, D) shared-expert output of x (N, D), or None without shared experts."""
        if self.shared_experts is None:
            return None
        out = self.shared_experts(x)
        if self.shared_gate is not None:
            out = torch.sigmoid(self.shared_gate(x)) * out
        return out


#: ``run(indices (N, K), weights (N, K), observer or None, observed (N, E) or None) -> (y (N, D), anchor or None)``
ExpertsCall = Callable[
    [Tensor, Tensor, ExpertGradientObserver | None, Tensor | None], tuple[Tensor, Tensor | None]
]


def route_and_run(
    router: TopKRouter,
    logits: Tensor,
    run: ExpertsCall,
    *,
    token_mask: Tensor | None,
    vision_mask: Tensor | None,
    score_bias: Tensor | None = None,
    stgc: GradientObserverFactory | None = None,
    stgc_scale: float = 1.0,
) -> tuple[Tensor, RoutingRecord]:
    """The routing step every moevl MoE block shares: ``router.route`` on ``logits`` (N, E), the experts on
    its decision (``run``), and STGC's wiring when ``stgc`` is set and grad is enabled (pass None outside
    training). Returns the experts' output (N, D) and the record (written once, the STGC statistics and
    anchor in it).

    With STGC, every use of the logits goes through the observer's guard, so that its backward (just
    before the router's) fails loudly if the experts' backward did not run the observer; the experts also
    take the logits as an input and return their STGC gradient: a real data dependency, so autograd always
    runs the experts' backward first.
    """
    observer = None
    if stgc is not None and torch.is_grad_enabled():
        observer = stgc.new_observer(scale=stgc_scale)
        logits = stgc.guard_logits(logits, observer)
    record = router.route(logits, token_mask=token_mask, vision_mask=vision_mask, score_bias=score_bias)
    y, anchor = run(record.indices, record.weights, observer, None if observer is None else logits)
    if observer is not None:
        record = dataclasses.replace(record, stgc=observer.stats, cel_anchor=anchor)
    return y, record


def _flat_mask(mask: Tensor, lead: torch.Size, name: str) -> Tensor:
    if mask.shape != lead or mask.dtype != torch.bool:
        raise ValueError(
            f"{name} must be a bool tensor of shape {tuple(lead)}, got {mask.dtype} {tuple(mask.shape)}"
        )
    return mask.reshape(-1)
