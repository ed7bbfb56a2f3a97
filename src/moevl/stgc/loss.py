"""The conflict elimination loss (CEL) of STGC (RESEARCH.md §1), in three switchable forms.

For the conflicting (token, expert) pairs ``C`` (a constant mask) and router logits ``z`` (N, E):

    L_cel = (1 / max(1, |C|)) Σ_{(t,e) ∈ C} ℓ(z_t, e)

with ``ℓ`` one of (``CELForm``):

``neg_softmax`` (the default, STGC's form as we read it)
    ``ℓ = −log softmax(−z_t)_e``. Gradient ``onehot_e − softmax(−z_t)``: the conflicting logit
    goes down and the *least* likely experts gain the most, so on near-zero cosines (random
    flags) it pushes every router toward uniform routing.
``one_minus_p`` [our choice]
    ``ℓ = −log(1 − p_{t,e})``, ``p = softmax(z_t)``. Gradient ``p_t − r_t``, where ``r_t`` is the
    softmax of ``z_t`` over the experts other than ``e`` (``r_e = 0``): e's mass goes to the other
    experts in proportion to their own probability, so their order is kept.
``next_best`` [our choice]
    Moves mass only among the token's next-best experts ``B_t(e)``: the token's other dispatched
    experts plus its highest-logit expert that was not dispatched (the experts it would use if
    ``e`` were taken away). With ``S = B ∪ {e}``,
    ``ℓ = −log(Σ_{j∈B} p_j / Σ_{j∈S} p_j) = logsumexp_S(z_t) − logsumexp_B(z_t)``,
    i.e. ``one_minus_p`` of the softmax restricted to ``S``. Gradient ``softmax_S(z_t) −
    softmax_B(z_t)`` (each zero outside its set): experts outside ``S`` get no gradient.

Every form is 0 for a token whose conflicting expert has nowhere to send its mass (``E = 1``, or
no other expert in ``B``) [our choice]; each pair's gradient is bounded by 1 in each entry.

``centered=True`` [our choice] weighs every *dispatched* pair (t, e) by ``f_te − r_e`` instead of
counting the conflicting ones: ``f_te`` is 1 for a conflict, ``r_e`` the conflict rate of expert e
in the micro-batch. Conflicting tokens are pushed out of their expert as before, the expert's other
tokens are pulled in by the same total amount:

    L_cel = (1 / max(1, |C|)) Σ_{(t,e) dispatched} (f_te − r_e) ℓ(z_t, e)

Under flags that carry no information (cosines near 0) the push and the pull cancel on average, so
the loss no longer drifts every router toward uniform routing; with tokens that do conflict, the
router's weights move away from them and toward the expert's consistent tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from moevl.checks import check_choice

CELForm = Literal["neg_softmax", "one_minus_p", "next_best"]
CEL_FORMS: tuple[str, ...] = ("neg_softmax", "one_minus_p", "next_best")


def _check(
    logits: Tensor,
    conflicts: Tensor,
    form: str,
    dispatched: Tensor | None,
    centered: bool,
    values: bool = True,
) -> None:
    """The arguments' shapes and types; with ``values`` also that every conflict is a dispatched pair (a read of
    the tensors' values: a host synchronisation on an accelerator)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, E), got shape {tuple(logits.shape)}")
    if conflicts.shape != logits.shape or conflicts.dtype != torch.bool:
        raise ValueError(
            f"conflicts must be a bool tensor of shape {tuple(logits.shape)}, got {conflicts.dtype} "
            f"{tuple(conflicts.shape)}"
        )
    check_choice("form", form, CEL_FORMS)
    if form == "next_best" or centered:
        if dispatched is None:
            needs = "form='next_best'" if form == "next_best" else "centered=True"
            raise ValueError(f"{needs} needs dispatched, the (N, E) bool mask of dispatched pairs")
        if dispatched.shape != logits.shape or dispatched.dtype != torch.bool:
            raise ValueError(
                f"dispatched must be a bool tensor of shape {tuple(logits.shape)}, got "
                f"{dispatched.dtype} {tuple(dispatched.shape)}"
            )
        if values and bool((conflicts & ~dispatched).any()):
            raise ValueError("conflicts must be dispatched pairs: found a conflict outside dispatched")


def _pair_weights(conflicts: Tensor, dispatched: Tensor | None, centered: bool) -> tuple[Tensor, Tensor]:
    """The pairs the loss sums over, (N, E) bool, and their weights, (N, E) float (0 elsewhere)."""
    w = conflicts.float()
    if not centered:
        return conflicts, w
    assert dispatched is not None
    rate = w.sum(0) / dispatched.sum(0).clamp_min(1)  # (E,) conflict rate of each expert
    return dispatched, (w - rate) * dispatched


def _pair_sets(
    z: Tensor, pairs: Tensor, form: str, dispatched: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For the pairs i = (t, e) whose mass can move: the token t, the expert e, the set S_i and
    the set B_i = S_i \\ {e}, as (P_m, E) bool masks.

    ``one_minus_p``: S is every expert. ``next_best``: e, the token's other dispatched experts and
    its best undispatched expert. Pairs with an empty B (nowhere to move) are left out (ℓ = 0).
    """
    tok, exp = pairs.nonzero(as_tuple=True)  # (P_c,)
    if form == "one_minus_p":
        support = torch.ones(tok.shape[0], z.shape[1], dtype=torch.bool, device=z.device)
    else:
        assert dispatched is not None
        free = ~dispatched  # (N, E)
        best_free = z.masked_fill(dispatched, -torch.inf).argmax(-1)  # (N,); arbitrary when none is free
        has_free = free.any(-1)
        extra = torch.zeros_like(free)
        extra[has_free, best_free[has_free]] = True
        support = (dispatched | extra)[tok]  # (P_c, E)
    rest = support.clone()
    rest[torch.arange(tok.shape[0], device=z.device), exp] = False
    movable = rest.any(-1)  # (P_c,)
    return tok[movable], exp[movable], support[movable], rest[movable]


def conflict_elimination_grad(
    logits: Tensor,
    conflicts: Tensor,
    *,
    form: CELForm = "neg_softmax",
    dispatched: Tensor | None = None,
    centered: bool = False,
    check_values: bool = True,
) -> tuple[Tensor, Tensor]:
    """Value and gradient of ``conflict_elimination_loss`` w.r.t. the logits, in closed form.

    ``check_values=False`` skips the check that every conflict is dispatched (STGC's observer builds them
    from dispatched pairs; the check reads the device on the host).

    The STGC backward adds this gradient to the router logits' gradient without building a graph.
    ``neg_softmax``: ``∂ℓ/∂z = onehot_e − softmax(−z)``; the other forms: ``softmax_S − softmax_B``
    (module docstring).

    Args:
        logits: (N, E) router logits.
        conflicts: (N, E) bool, the conflicting pairs.
        form: the CEL form (``CELForm``).
        dispatched: (N, E) bool, the dispatched pairs (``next_best`` and ``centered`` need it;
            it must contain every conflict).
        centered: weigh each dispatched pair by ``f_te − r_e`` (module docstring).
    Returns:
        (loss scalar fp32, grad (N, E) in the logits' dtype).
    """
    _check(logits, conflicts, form, dispatched, centered, check_values)
    z = logits.detach().float()
    num = conflicts.sum().clamp_min(1)
    pairs, w = _pair_weights(conflicts, dispatched, centered)
    if form == "neg_softmax":
        q = torch.softmax(-z, dim=-1)
        per_token = w.sum(-1, keepdim=True)  # (N, 1) summed weight of each token's pairs
        grad = (w - per_token * q) / num
        loss = ((-torch.log_softmax(-z, dim=-1)) * w).sum() / num
        return loss, grad.to(logits.dtype)
    tok, exp, support, rest = _pair_sets(z, pairs, form, dispatched)
    rows, wp = z[tok], w[tok, exp]  # (P_m, E), (P_m,)
    on_s, on_b = rows.masked_fill(~support, -torch.inf), rows.masked_fill(~rest, -torch.inf)
    loss = (wp * (on_s.logsumexp(-1) - on_b.logsumexp(-1))).sum() / num
    g_pairs = torch.softmax(on_s, -1) - torch.softmax(on_b, -1)  # (P_m, E), 0 outside S
    grad = torch.zeros_like(z).index_add_(0, tok, wp[:, None] * g_pairs) / num
    return loss, grad.to(logits.dtype)


def conflict_elimination_loss(
    logits: Tensor,
    conflicts: Tensor,
    *,
    form: CELForm = "neg_softmax",
    dispatched: Tensor | None = None,
    centered: bool = False,
) -> Tensor:
    """CEL, the mean over conflicting (token, expert) pairs of ``ℓ(z_t, e)`` (module docstring).

    Differentiable with plain autograd (the reference of ``conflict_elimination_grad``).

    Args:
        logits: (N, E) router logits.
        conflicts: (N, E) bool, the conflicting pairs (no gradient flows through it).
        form: the CEL form (``CELForm``); default STGC's ``−log softmax(−z)_e``.
        dispatched: (N, E) bool dispatched pairs, for ``next_best`` and ``centered``.
        centered: weigh each dispatched pair by ``f_te − r_e`` (module docstring).
    Returns:
        Scalar; exactly 0, with a zero gradient, when there is no conflict.
    """
    _check(logits, conflicts, form, dispatched, centered)
    num = conflicts.sum().clamp_min(1)
    z = logits.float()
    pairs, w = _pair_weights(conflicts, dispatched, centered)
    if form == "neg_softmax":
        nll = -torch.log_softmax(-z, dim=-1)  # (N, E)
        return (nll * w).sum() / num
    tok, exp, support, rest = _pair_sets(z.detach(), pairs, form, dispatched)
    rows = z[tok]  # (P_m, E)
    on_s, on_b = rows.masked_fill(~support, -torch.inf), rows.masked_fill(~rest, -torch.inf)
    return (w[tok, exp] * (on_s.logsumexp(-1) - on_b.logsumexp(-1))).sum() / num
