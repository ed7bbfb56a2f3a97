"""Flag persistence and the cosine histogram against set and loop references."""

import itertools

import pytest
import torch

from moevl.moe import GroupedExperts, MoEFeedForward, TopKRouter
from moevl.stgc import STGCConfig, flag_persistence
from moevl.stgc.diagnostics import cosine_histogram
from moevl.stgc.observer import STGCStats


def _stats(pairs, flags, cosines=None, num_experts=3):
    """STGCStats of (token, expert) pairs, their flags and cosines."""
    tok = torch.tensor([t for t, _ in pairs])
    exp = torch.tensor([e for _, e in pairs])
    cos = torch.tensor(cosines if cosines is not None else [0.0] * len(pairs))
    return STGCStats(
        num_experts=num_experts,
        ready=True,
        cosine=cos,
        expert_ids=exp,
        token_ids=tok,
        conflicts=torch.tensor(flags),
        tokens_per_expert=torch.bincount(exp, minlength=num_experts),
    )


def _reference(steps):
    """The FlagPersistence numbers with Python sets, from [(pairs, flags), ...]."""
    kept = still = expected = total = 0.0
    per_step = []
    for (p0, f0), (p1, f1) in itertools.pairwise(steps):
        now = {p for p, f in zip(p0, f0, strict=True) if f}
        nxt = {p for p, f in zip(p1, f1, strict=True) if f}
        kept += len(now & nxt)
        still += len(now & set(p1))
        expected += len(now & set(p1)) * len(nxt) / len(p1)
        total += len(now)
        per_step.append(len(now & nxt) / len(now) if now else None)
    return kept / total, expected / total, still / total, per_step


def test_flag_persistence_equals_the_set_reference():
    steps = [
        ([(0, 0), (0, 1), (1, 2), (2, 0), (3, 1)], [True, True, False, True, False]),
        ([(0, 0), (0, 2), (1, 2), (2, 0), (3, 1)], [True, False, True, False, False]),  # (0,1) rerouted
        ([(0, 0), (0, 1), (1, 2), (2, 1), (3, 1)], [False, False, False, False, False]),
        ([(0, 0), (0, 1), (1, 2), (2, 1), (3, 1)], [True, True, True, True, True]),
    ]
    result = flag_persistence([_stats(p, f) for p, f in steps])
    persistence, chance, still, per_step = _reference(steps)
    assert result.persistence == pytest.approx(persistence) and result.chance == pytest.approx(chance)
    assert result.still_dispatched == pytest.approx(still)
    assert result.per_step[:2] == pytest.approx(per_step[:2]) and result.per_step[2] is None
    assert result.flagged == [3, 2, 0, 5]
    # by hand: step 0 -> 1 keeps (0,0) of 3 flags; step 1 -> 2 keeps none of 2
    assert result.per_step[0] == pytest.approx(1 / 3) and result.persistence == pytest.approx(1 / 5)


def test_identical_flags_persist_fully_and_no_flags_give_none():
    pairs = [(0, 0), (1, 1), (2, 2), (3, 0)]
    same = [_stats(pairs, [True, False, True, False]) for _ in range(3)]
    result = flag_persistence(same)
    assert result.persistence == 1.0 and result.still_dispatched == 1.0 and result.chance == 0.5
    none = flag_persistence([_stats(pairs, [False] * 4), _stats(pairs, [True] * 4)])
    assert none.persistence is None and none.chance is None and none.per_step == [None]


def test_histogram_counts_equal_a_loop_over_bins():
    cos = [-1.0, -0.95, -0.5, 0.0, 0.0, 0.2, 0.49, 0.5, 0.99, 1.0, 1.0000001]
    flags = [True, True, True, False, False, True, False, False, False, False, False]
    pairs = [(i, i % 3) for i in range(len(cos))]
    hist = cosine_histogram([_stats(pairs, flags, cos), _stats(pairs[:3], flags[:3], cos[:3])], bins=4)
    assert hist.edges.tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    counts, flagged = [0] * 4, [0] * 4
    for c, f in [*zip(cos, flags, strict=True), *zip(cos[:3], flags[:3], strict=True)]:
        b = min(int((min(max(c, -1.0), 1.0) + 1.0) / 0.5), 3)  # [lo, hi) bins, 1 in the last
        counts[b] += 1
        flagged[b] += f
    assert hist.counts.tolist() == counts == [4, 2, 4, 4]  # -0.5 opens bin 1; 0.0 opens bin 2
    assert hist.flagged_counts.tolist() == flagged


def test_diagnostics_refuse_unready_or_mixed_stats():
    ok = _stats([(0, 0)], [True])
    with pytest.raises(ValueError, match="at least 2 STGCStats, got 1"):
        flag_persistence([ok])
    with pytest.raises(ValueError, match=r"stats\[1\] must be STGCStats filled by a backward"):
        flag_persistence([ok, STGCStats(num_experts=3)])
    with pytest.raises(ValueError, match="one number of experts"):
        flag_persistence([ok, _stats([(0, 0)], [True], num_experts=4)])
    with pytest.raises(ValueError, match="bins must be an integer >= 1, got 0"):
        cosine_histogram([ok], bins=0)


def test_flag_persistence_of_a_real_layer_on_a_fixed_probe_batch():
    torch.manual_seed(0)
    router = TopKRouter(hidden_size=12, num_experts=4, top_k=2)
    torch.nn.init.normal_(router.weight, std=0.5)
    layer = MoEFeedForward(
        router=router,
        experts=GroupedExperts(num_experts=4, hidden_size=12, intermediate_size=24),
        stgc=STGCConfig(threshold=0.1),
    )
    x, target = torch.randn(30, 12), torch.randn(30, 12)
    stats = []
    for _ in range(3):  # no update between steps: the same flags, persistence 1
        out, rec = layer(x)
        (((out - target) ** 2).sum() + rec.aux_loss()).backward()
        stats.append(rec.stgc)
    result = flag_persistence(stats)
    assert result.flagged[0] > 0 and result.persistence == 1.0
    assert result.chance == pytest.approx(result.flagged[0] / stats[0].cosine.numel())
    hist = cosine_histogram(stats, bins=10)
    assert int(hist.counts.sum()) == 3 * stats[0].cosine.numel()
    assert int(hist.flagged_counts.sum()) == 3 * result.flagged[0]
    assert int(hist.flagged_counts[6:].sum()) == 0  # flags are cosines below 0.1 < 0.2
