"""Diagnostics of STGC's conflict flags over training steps on a fixed probe batch (issue 11).

If the flags are signal, a token that conflicts with its expert at one step mostly still does at
the next (unless the CEL has routed it away); if they are noise (cosines near 0, a threshold at
0), a flagged pair is flagged again about as often as any pair is. ``flag_persistence`` gives both
numbers; ``cosine_histogram`` the distribution the threshold cuts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moevl.checks import check_int
from moevl.stgc.observer import STGCStats


@dataclass(frozen=True)
class FlagPersistence:
    """How the flagged (token, expert) pairs of one step carry over to the next.

    With ``F_t`` the flagged pairs and ``D_t`` the dispatched pairs of step t (same probe tokens):

    Attributes:
        persistence: ``Σ_t |F_t ∩ F_{t+1}| / Σ_t |F_t|``, the share of flags still flagged one
            step later; None when no step before the last has a flag.
        chance: the same share if the flags of t+1 fell at random on its dispatched pairs with its
            conflict ratio ``r_{t+1} = |F_{t+1}| / |D_{t+1}|``: ``Σ_t |F_t ∩ D_{t+1}| r_{t+1} /
            Σ_t |F_t|``. ``persistence`` near ``chance`` means the flags are noise.
        still_dispatched: ``Σ_t |F_t ∩ D_{t+1}| / Σ_t |F_t|``, the share of flagged pairs whose
            token still goes to that expert (the CEL's aim is to lower it).
        per_step: ``|F_t ∩ F_{t+1}| / |F_t|`` for each consecutive pair of steps (None: no flag at t).
        flagged: ``|F_t|`` of every step.
    """

    persistence: float | None
    chance: float | None
    still_dispatched: float | None
    per_step: list[float | None]
    flagged: list[int]


@dataclass(frozen=True)
class CosineHistogram:
    """Counts of token-gradient cosines over equal bins of [-1, 1].

    Attributes:
        edges: (bins + 1,) bin edges from -1 to 1.
        counts: (bins,) long, all dispatched pairs of all steps.
        flagged_counts: (bins,) long, the flagged pairs among them.
    """

    edges: Tensor
    counts: Tensor
    flagged_counts: Tensor


def _pair_keys(stats: STGCStats, mask: Tensor | None = None) -> Tensor:
    """(P,) long key ``token · E + expert`` of the pairs (selected by ``mask``)."""
    keys = stats.token_ids.cpu().long() * stats.num_experts + stats.expert_ids.cpu().long()
    return keys if mask is None else keys[mask.cpu()]


def _check_ready(stats: Sequence[STGCStats], minimum: int) -> None:
    if len(stats) < minimum:
        raise ValueError(f"stats must hold at least {minimum} STGCStats, got {len(stats)}")
    for i, s in enumerate(stats):
        if not isinstance(s, STGCStats) or not s.ready:
            raise ValueError(f"stats[{i}] must be STGCStats filled by a backward (ready), got {s!r}")


def flag_persistence(stats: Sequence[STGCStats]) -> FlagPersistence:
    """Persistence of the conflict flags of one MoE layer over consecutive steps.

    Args:
        stats: the layer's ``STGCStats`` (``record.stgc``) of at least two steps, in order, each
            from a forward and backward on the same probe batch (token ids must mean the same
            tokens at every step).
    """
    _check_ready(stats, 2)
    experts = {s.num_experts for s in stats}
    if len(experts) != 1:
        raise ValueError(f"stats must come from one layer (one number of experts), got {sorted(experts)}")
    flagged = [_pair_keys(s, s.conflicts) for s in stats]
    dispatched = [_pair_keys(s) for s in stats]
    kept = redispatched = expected = total = 0.0
    per_step: list[float | None] = []
    for t in range(len(stats) - 1):
        now, nxt = flagged[t], flagged[t + 1]
        again = int(torch.isin(now, nxt).sum())
        still = int(torch.isin(now, dispatched[t + 1]).sum())
        rate = nxt.numel() / max(dispatched[t + 1].numel(), 1)
        per_step.append(again / now.numel() if now.numel() else None)
        kept += again
        redispatched += still
        expected += still * rate
        total += now.numel()

    def share(x: float) -> float | None:
        return x / total if total else None

    return FlagPersistence(
        persistence=share(kept),
        chance=share(expected),
        still_dispatched=share(redispatched),
        per_step=per_step,
        flagged=[f.numel() for f in flagged],
    )


def cosine_histogram(stats: Sequence[STGCStats], *, bins: int = 40) -> CosineHistogram:
    """Histogram of the cosines of every dispatched pair of ``stats`` (steps and/or layers), and of
    the flagged ones, over ``bins`` equal bins of [-1, 1] (the last bin includes 1)."""
    _check_ready(stats, 1)
    check_int("bins", bins, minimum=1)
    cos = torch.cat([s.cosine.detach().float().cpu() for s in stats])  # (P_all,)
    flags = torch.cat([s.conflicts.cpu() for s in stats])
    edges = torch.linspace(-1.0, 1.0, bins + 1)
    # NOTE: fp rounding can leave a cosine a hair outside [-1, 1]; it belongs to the edge bin
    index = ((cos.clamp(-1.0, 1.0) + 1.0) * (bins / 2.0)).long().clamp_max(bins - 1)
    counts = torch.bincount(index, minlength=bins)
    flagged_counts = torch.bincount(index[flags], minlength=bins)
    return CosineHistogram(edges=edges, counts=counts, flagged_counts=flagged_counts)
