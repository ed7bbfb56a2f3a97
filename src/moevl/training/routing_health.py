"""Router health: how far routing is from uniform, and how much the choice says about the token.

Pure functions on tensors (entropy, mutual information from a contingency table) and
``UniformRoutingMonitor``, which turns the per-layer statistics of ``routing_statistics`` into a
one-time warning per layer whose router has stopped routing (issue 11: with STGC's default
settings the routers of the demo went flat, normalised entropy 1.0, and nobody noticed).

All in nats (natural logarithms); ``0 · log 0 = 0``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from moevl.checks import check_float, check_int


def entropy(probs: Tensor) -> Tensor:
    """(N,) Shannon entropy ``H(p_t) = −Σ_e p_{t,e} log p_{t,e}`` of each row of probs (N, E)."""
    if probs.dim() != 2:
        raise ValueError(f"probs must be (N, E), got shape {tuple(probs.shape)}")
    p = probs.double()
    return -torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p)).sum(-1)


def normalized_entropy(probs: Tensor) -> Tensor:
    """(N,) ``H(p_t) / ln E`` of probs (N, E): 1 for uniform routing, 0 for a one-hot choice.

    ``E = 1`` gives 0 [our choice]: there is no choice to make, so nothing is "uniform".
    """
    num_experts = probs.shape[-1] if probs.dim() == 2 else 0
    h = entropy(probs)
    return h / math.log(num_experts) if num_experts > 1 else torch.zeros_like(h)


def contingency_table(a: Tensor, b: Tensor, *, num_a: int, num_b: int) -> Tensor:
    """(num_a, num_b) float64 counts of the pairs ``(a_i, b_i)``.

    Args:
        a, b: (M,) integer labels in ``[0, num_a)`` and ``[0, num_b)``.
    """
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(
            f"a and b must be (M,) of the same length, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    for name, x, n in (("a", a, num_a), ("b", b, num_b)):
        if x.is_floating_point() or x.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer labels, got dtype {x.dtype}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= n):
            raise ValueError(
                f"{name} must be labels in [0, {n}), got values in [{int(x.min())}, {int(x.max())}]"
            )
    flat = a.long() * num_b + b.long()
    return torch.bincount(flat, minlength=num_a * num_b).double().reshape(num_a, num_b)


def mutual_information(joint: Tensor) -> Tensor:
    """Mutual information ``I(A; B) = Σ_{a,b} p(a,b) log(p(a,b) / (p(a) p(b)))`` in nats.

    The plug-in estimate from a contingency table: its bias is about ``(|A|−1)(|B|−1) / (2M)``
    nats for M samples (Miller 1955), negligible for the token counts of a batch.

    Args:
        joint: (A, B) non-negative counts or probabilities (normalised here).
    Returns:
        float64 scalar >= 0; 0 for an empty table.
    """
    if joint.dim() != 2:
        raise ValueError(f"joint must be an (A, B) table, got shape {tuple(joint.shape)}")
    j = joint.double()
    if not bool(torch.isfinite(j).all()) or bool((j < 0).any()):
        raise ValueError("joint must hold finite non-negative counts or probabilities")
    total = j.sum()
    if total <= 0:
        return j.new_zeros(())
    p = j / total
    outer = p.sum(1, keepdim=True) * p.sum(0, keepdim=True)  # (A, B) p(a) p(b)
    terms = torch.where(p > 0, p * (p / outer.clamp_min(1e-300)).log(), torch.zeros_like(p))
    return terms.sum().clamp_min(0.0)  # rounding can leave -1e-17 for independent tables


def label_entropy(counts: Tensor) -> Tensor:
    """float64 scalar, entropy in nats of the distribution of counts (K,); 0 when empty."""
    total = counts.double().sum()
    if total <= 0:
        return counts.new_zeros((), dtype=torch.float64)
    return entropy((counts.double() / total)[None])[0]


def normalized_mutual_information(joint: Tensor) -> Tensor:
    """``I(A; B) / H(B)``, the share of B's entropy that A explains (Theil's uncertainty
    coefficient U(B|A)), in [0, 1]; 0 when ``H(B) = 0``. B is the table's columns."""
    h_b = label_entropy(joint.double().sum(0))
    mi = mutual_information(joint)
    return (mi / h_b).clamp(0.0, 1.0) if h_b > 0 else h_b.new_zeros(())


_LAYER_KEY = re.compile(r"^router/entropy_normalized/L(\d+)$")


class UniformRoutingMonitor:
    """Warns once per MoE layer whose router stays within ``tolerance`` of uniform.

    ``update(stats)`` takes the scalars of ``moevl.training.routing_statistics`` (it reads the
    per-layer keys ``router/entropy_normalized/L{i}``). A layer whose normalised entropy is
    ``>= 1 − tolerance`` for ``patience`` consecutive updates is reported once; a lower value
    resets its count. Updates without a layer's key leave its count unchanged.

    NOTE: an upcycled router starts near uniform; give ``patience`` enough updates for routing
    to form before it counts as a failure (the default is [our choice]).
    """

    def __init__(self, *, tolerance: float = 0.02, patience: int = 100) -> None:
        self.tolerance = check_float("tolerance", tolerance, minimum=0.0, maximum=1.0, exclusive_maximum=True)
        self.patience = check_int("patience", patience, minimum=1)
        self.streak: dict[int, int] = {}
        self.warned: set[int] = set()

    def update(self, stats: Mapping[str, float]) -> list[str]:
        """The warnings of this update (usually none), one string per newly flat layer."""
        warnings = []
        for key, value in stats.items():
            match = _LAYER_KEY.match(key)
            if match is None:
                continue
            layer = int(match.group(1))
            flat = value >= 1.0 - self.tolerance
            self.streak[layer] = self.streak.get(layer, 0) + 1 if flat else 0
            if flat and self.streak[layer] >= self.patience and layer not in self.warned:
                self.warned.add(layer)
                warnings.append(
                    f"MoE layer {layer}: the router's normalised entropy has stayed >= "
                    f"{1.0 - self.tolerance:.3f} (within {self.tolerance:.0%} of uniform) for "
                    f"{self.streak[layer]} consecutive updates (now {value:.4f}): it no longer routes. "
                    "With STGC, check its weight, threshold and cel form (issue 11)."
                )
        return warnings
