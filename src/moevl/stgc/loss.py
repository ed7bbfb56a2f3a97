"""The conflict elimination loss (CEL) of STGC (RESEARCH.md §1).

    L_cel = (1 / max(1, |C|)) Σ_{(t,e) ∈ C} −log softmax(−z_t)_e

The conflict mask is a constant. ``∂/∂z_{t,e} > 0`` for the conflicting expert, so its logit
goes down and the routing mass moves to the other experts.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(logits: Tensor, conflicts: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, E), got shape {tuple(logits.shape)}")
    if conflicts.shape != logits.shape or conflicts.dtype != torch.bool:
        raise ValueError(
            f"conflicts must be a bool tensor of shape {tuple(logits.shape)}, got {conflicts.dtype} "
            f"{tuple(conflicts.shape)}"
        )


def conflict_elimination_loss(logits: Tensor, conflicts: Tensor) -> Tensor:
    """CEL, the mean over conflicting (token, expert) pairs of ``−log softmax(−z_t)_e``.

    Args:
        logits: (N, E) router logits.
        conflicts: (N, E) bool, the conflicting pairs (no gradient flows through it).
    Returns:
        Scalar; exactly 0, with a zero gradient, when there is no conflict.
    """
    _check(logits, conflicts)
    nll = -torch.log_softmax(-logits.float(), dim=-1)  # (N, E)
    total = (nll * conflicts).sum()
    return total / conflicts.sum().clamp_min(1)


def conflict_elimination_grad(logits: Tensor, conflicts: Tensor) -> tuple[Tensor, Tensor]:
    """Value and gradient of ``conflict_elimination_loss`` w.r.t. the logits, in closed form.

    ``∂(−log q_e)/∂z = onehot_e − q`` with ``q = softmax(−z)``; the STGC backward adds this to the
    router logits' gradient without building a graph.

    Returns:
        (loss scalar, grad (N, E) in the logits' dtype).
    """
    _check(logits, conflicts)
    z = logits.detach().float()
    q = torch.softmax(-z, dim=-1)
    num = conflicts.sum().clamp_min(1)
    per_token = conflicts.sum(-1, keepdim=True).float()  # (N, 1) conflicts of each token
    grad = (conflicts.float() - per_token * q) / num
    loss = ((-torch.log_softmax(-z, dim=-1)) * conflicts).sum() / num
    return loss, grad.to(logits.dtype)
