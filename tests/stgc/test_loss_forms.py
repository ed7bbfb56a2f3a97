"""The CEL forms, the relative threshold and STGCConfig's checks, each against a plain reference."""

import math
import statistics

import pytest
import torch

from moevl.hf import MoESettings
from moevl.moe import GroupedExperts, MoEFeedForward, TopKRouter
from moevl.stgc import STGCConfig, conflict_elimination_loss
from moevl.stgc.loss import conflict_elimination_grad
from tests.fixtures.reference import per_token_gradient_cosines

FORMS = ["neg_softmax", "one_minus_p", "next_best"]


def _pair_loss(z, t, e, dispatched, form):
    """ℓ(z_t, e) written out with explicit sums (float64, autograd-able)."""
    e_count = z.shape[1]
    if form == "neg_softmax":
        den = sum(torch.exp(-z[t, j]) for j in range(e_count))
        return -torch.log(torch.exp(-z[t, e]) / den)
    if form == "one_minus_p":
        others = [j for j in range(e_count) if j != e]
    else:  # next_best: the other dispatched experts and the best undispatched one
        others = [j for j in range(e_count) if dispatched[t, j] and j != e]
        free = [j for j in range(e_count) if not dispatched[t, j]]
        if free:
            others.append(max(free, key=lambda j: float(z[t, j].detach())))
    if not others:
        return z.sum() * 0.0  # nowhere to move the mass: 0
    m = z[t].max()
    mass = {j: torch.exp(z[t, j] - m) for j in [*others, e]}
    kept = sum(mass[j] for j in others)
    return -torch.log(kept / (kept + mass[e]))


def _reference_loss(z, conflicts, dispatched, form, centered=False):
    """The CEL pair by pair with explicit loops: the mean of ℓ over the conflicts, or (centered) the sum over
    the dispatched pairs of (conflict − the expert's conflict rate) · ℓ over the number of conflicts."""
    n, e_count = z.shape
    num_conflicts = int(conflicts.sum())
    total = z.sum() * 0.0
    for e in range(e_count):
        rate = 0.0
        if centered:
            rows = [t for t in range(n) if dispatched[t, e]]
            rate = sum(bool(conflicts[t, e]) for t in rows) / max(1, len(rows))
        for t in range(n):
            weight = (
                float(conflicts[t, e]) - rate if centered and dispatched[t, e] else float(conflicts[t, e])
            )
            if weight != 0.0:
                total = total + weight * _pair_loss(z, t, e, dispatched, form)
    return total / max(1, num_conflicts)


def _case(n=37, e=5, k=2, seed=0, scale=2.0):
    """Random logits, top-k dispatch (some rows k+1, some 1), conflicts among the dispatched pairs
    with rows of several conflicts, rows of none, and a row whose experts all conflict."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, e, generator=g, dtype=torch.float64) * scale
    top = z.topk(min(k + 1, e), dim=-1).indices
    dispatched = torch.zeros(n, e, dtype=torch.bool)
    dispatched.scatter_(1, top[:, :k], True)
    dispatched[::4].scatter_(1, top[::4], True)  # LTDR-like tail tokens use one more expert
    dispatched[1::7] = False
    dispatched[1::7, 0] = True  # a few tokens with one expert, not their best
    conflicts = dispatched & (torch.rand(n, e, generator=g, dtype=torch.float64) < 0.5)
    conflicts[0] = dispatched[0]  # every dispatched expert of a (tail) token conflicts
    conflicts[3] = False
    return z, conflicts, dispatched


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("n,e,k,scale", [(37, 5, 2, 2.0), (9, 3, 1, 1.0), (23, 7, 3, 6.0), (5, 2, 2, 1.0)])
def test_closed_form_grad_equals_autograd_of_the_loop_reference(form, n, e, k, scale):
    z, conflicts, dispatched = _case(n, e, k, seed=n + e, scale=scale)
    assert (conflicts.sum(-1) >= 2).any() and (conflicts.sum(-1) == 0).any()
    zz = z.clone().requires_grad_()
    ref = _reference_loss(zz, conflicts, dispatched, form)
    ref.backward()
    value, grad = conflict_elimination_grad(z.float(), conflicts, form=form, dispatched=dispatched)
    torch.testing.assert_close(value.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), zz.grad, atol=1e-6, rtol=1e-5)
    assert grad.dtype == torch.float32
    # the autograd-able library loss is the same function
    zl = z.float().clone().requires_grad_()
    loss = conflict_elimination_loss(zl, conflicts, form=form, dispatched=dispatched)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zl.grad.double(), zz.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("n,e,k,scale", [(37, 5, 2, 2.0), (9, 3, 1, 1.0), (23, 7, 3, 6.0)])
def test_centered_closed_form_grad_equals_autograd_of_the_loop_reference(form, n, e, k, scale):
    z, conflicts, dispatched = _case(n, e, k, seed=n + e, scale=scale)
    zz = z.clone().requires_grad_()
    ref = _reference_loss(zz, conflicts, dispatched, form, centered=True)
    ref.backward()
    value, grad = conflict_elimination_grad(
        z.float(), conflicts, form=form, dispatched=dispatched, centered=True
    )
    torch.testing.assert_close(value.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), zz.grad, atol=1e-6, rtol=1e-5)
    zl = z.float().clone().requires_grad_()
    loss = conflict_elimination_loss(zl, conflicts, form=form, dispatched=dispatched, centered=True)
    loss.backward()
    torch.testing.assert_close(zl.grad.double(), zz.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_centered_cel_has_no_drift_when_the_flags_say_nothing(form):
    """Identical tokens, flags at random: the centered CEL's gradients cancel over the tokens (no push of the
    router in any direction), while the plain CEL pushes every token's dispatched logits down."""
    n, e = 40, 4
    z = torch.tensor([[1.0, 0.5, -0.2, -1.0]]).repeat(n, 1)
    dispatched = torch.zeros(n, e, dtype=torch.bool)
    dispatched[:, :2] = True  # top-2
    conflicts = dispatched & (torch.rand(n, e, generator=torch.Generator().manual_seed(0)) < 0.4)
    assert 0 < conflicts.sum() < dispatched.sum()
    _, centered = conflict_elimination_grad(z, conflicts, form=form, dispatched=dispatched, centered=True)
    torch.testing.assert_close(centered.sum(0), torch.zeros(e), atol=1e-6, rtol=0)
    _, plain = conflict_elimination_grad(z, conflicts, form=form, dispatched=dispatched)

    def entropy(logits):
        return float(-(logits.softmax(-1) * logits.log_softmax(-1)).sum())

    # a small step of the shared logits along the plain CEL makes the routing more uniform
    assert entropy(z[0] - 0.1 * plain.sum(0)) > entropy(z[0]) + 1e-3


def test_centered_needs_the_dispatched_pairs():
    z, conflicts, _ = _case()
    with pytest.raises(ValueError, match="centered=True needs dispatched"):
        conflict_elimination_grad(z, conflicts, centered=True)


@pytest.mark.parametrize("form", FORMS)
def test_no_conflict_gives_zero_loss_and_zero_grad(form):
    z, _, dispatched = _case()
    none = torch.zeros_like(dispatched)
    value, grad = conflict_elimination_grad(z.float(), none, form=form, dispatched=dispatched)
    assert float(value) == 0.0 and torch.count_nonzero(grad) == 0
    zl = z.float().requires_grad_()
    conflict_elimination_loss(zl, none, form=form, dispatched=dispatched).backward()
    assert torch.count_nonzero(zl.grad) == 0


@pytest.mark.parametrize("form", FORMS)
def test_a_single_expert_has_nowhere_to_send_mass(form):
    z = torch.randn(6, 1)
    conflicts = torch.ones(6, 1, dtype=torch.bool)
    value, grad = conflict_elimination_grad(z, conflicts, form=form, dispatched=conflicts)
    assert float(value) == 0.0 and torch.count_nonzero(grad) == 0


def test_forms_are_finite_and_exact_on_saturated_logits():
    # p_e = 1 - 3e^-40 rounds to 1 in fp32; -log(1 - p_e) = 40 - log 3 must still come out
    z = torch.tensor([[40.0, 0.0, 0.0, 0.0]])
    conflicts = torch.tensor([[True, False, False, False]])
    value, grad = conflict_elimination_grad(z, conflicts, form="one_minus_p")
    assert float(value) == pytest.approx(40.0 - math.log(3.0), rel=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[1.0, -1 / 3, -1 / 3, -1 / 3]]))
    dispatched = torch.tensor([[True, False, False, False]])
    value, grad = conflict_elimination_grad(z, conflicts, form="next_best", dispatched=dispatched)
    assert float(value) == pytest.approx(40.0, rel=1e-6)  # S = {0, one of the zeros}
    assert float(grad[0, 0]) == pytest.approx(1.0) and float(grad[0, 1:].sum()) == pytest.approx(-1.0)


def test_next_best_moves_mass_only_inside_the_next_best_set():
    z = torch.tensor([[3.0, 2.0, 1.0, 0.5, -1.0]])
    dispatched = torch.tensor([[True, True, False, False, False]])
    conflicts = torch.tensor([[True, False, False, False, False]])
    _, grad = conflict_elimination_grad(z, conflicts, form="next_best", dispatched=dispatched)
    assert grad[0, 0] > 0 and grad[0, 1] < 0 and grad[0, 2] < 0  # e down; B = {1, 2} up
    assert grad[0, 3] == 0 and grad[0, 4] == 0  # experts outside S untouched
    _, grad = conflict_elimination_grad(z, conflicts, form="one_minus_p")
    assert (grad[0, 1:] < 0).all()
    # one_minus_p keeps the order of the others: their gains are proportional to their p
    p = torch.softmax(z[0], -1)
    torch.testing.assert_close(grad[0, 1:] / p[1:], (grad[0, 1] / p[1]).expand(4))


def test_loss_forms_refuse_bad_input():
    z, conflicts, dispatched = _case()
    with pytest.raises(ValueError, match="form must be one of"):
        conflict_elimination_grad(z, conflicts, form="entropy")
    with pytest.raises(ValueError, match="needs dispatched"):
        conflict_elimination_loss(z, conflicts, form="next_best")
    with pytest.raises(ValueError, match="dispatched must be a bool tensor of shape"):
        conflict_elimination_grad(z, conflicts, form="next_best", dispatched=dispatched[:, :2])
    with pytest.raises(ValueError, match="conflicts must be dispatched pairs"):
        conflict_elimination_grad(z, conflicts | ~dispatched, form="next_best", dispatched=dispatched)


# ---- STGCConfig ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field, expected",
    [
        ({"threshold": math.nan}, "stgc.threshold", ">= -1.0 and <= 1.0"),
        ({"threshold": -math.inf}, "stgc.threshold", ">= -1.0 and <= 1.0"),
        ({"threshold": 1.5}, "stgc.threshold", ">= -1.0 and <= 1.0"),
        ({"weight": math.nan}, "stgc.weight", ">= 0.0"),
        ({"weight": math.inf}, "stgc.weight", ">= 0.0"),
        ({"weight": -0.1}, "stgc.weight", ">= 0.0"),
        ({"min_tokens": 0}, "stgc.min_tokens", ">= 1"),
        ({"min_tokens": True}, "stgc.min_tokens", ">= 1"),
        ({"scope": "first"}, "stgc.scope", "'all', 'last', 'delta'"),
        ({"threshold_mode": "quantile"}, "stgc.threshold_mode", "'absolute', 'relative'"),
        ({"threshold_mode": "relative", "relative_c": math.nan}, "stgc.relative_c", ">= 0.0"),
        ({"threshold_mode": "relative", "relative_c": math.inf}, "stgc.relative_c", ">= 0.0"),
        ({"threshold_mode": "relative", "relative_c": -1.0}, "stgc.relative_c", ">= 0.0"),
        ({"cel": "entropy"}, "stgc.cel", "'neg_softmax', 'one_minus_p', 'next_best'"),
        ({"threshold_mode": "relative", "threshold": -0.1}, "stgc.threshold", "must be 0.0"),
        ({"relative_c": 2.0}, "stgc.relative_c", "must be 1.0"),
    ],
)
def test_config_names_the_field_the_expected_and_the_given_value(kwargs, field, expected):
    with pytest.raises(ValueError) as err:
        STGCConfig(**kwargs)
    message = str(err.value)
    given = next(v for k, v in kwargs.items() if f"stgc.{k}" == field)
    assert field in message and expected in message and repr(given) in message, message


def test_config_round_trips_through_moe_settings():
    cfg = STGCConfig(weight=0.2, threshold_mode="relative", relative_c=0.5, cel="next_best", scope="last")
    settings = MoESettings(num_experts=4, top_k=2, stgc=cfg)
    d = settings.to_dict()
    assert d["stgc"]["threshold_mode"] == "relative" and d["stgc"]["cel"] == "next_best"
    assert MoESettings.from_dict(d) == settings
    old = {"threshold": 0.0, "weight": 0.5, "scope": "all", "min_tokens": 2}  # before the options
    # a checkpoint saved before weight_mode / centered keeps the CEL it was trained with: the paper's
    assert MoESettings.from_dict({**d, "stgc": old}).stgc == STGCConfig.paper()
    assert STGCConfig.paper() == STGCConfig(weight=0.5, weight_mode="absolute", centered=False)
    assert STGCConfig().weight_mode == "relative" and STGCConfig().centered
    with pytest.raises(ValueError, match=r"stgc\.relative_c"):
        MoESettings.from_dict({**d, "stgc": {**d["stgc"], "relative_c": math.nan}})


# ---- the observer, end to end --------------------------------------------------------------------


def _layer(stgc, *, d=16, h=40, e=4, k=2, seed=0):
    torch.manual_seed(seed)
    router = TopKRouter(hidden_size=d, num_experts=e, top_k=k)
    torch.nn.init.normal_(router.weight, std=0.5)
    experts = GroupedExperts(num_experts=e, hidden_size=d, intermediate_size=h)
    return MoEFeedForward(router=router, experts=experts, stgc=stgc)


def _step(layer, x, target, loss_scale=1.0):
    layer.zero_grad()
    out, rec = layer(x)
    (loss_scale * (((out - target) ** 2).sum() + rec.aux_loss())).backward()
    return rec


@pytest.mark.parametrize("c", [0.0, 0.5, 1.0])
def test_relative_threshold_flags_what_a_hand_computation_flags(c):
    cfg = STGCConfig(threshold_mode="relative", relative_c=c, min_tokens=3)
    layer = _layer(cfg)
    torch.manual_seed(1)
    x, target = torch.randn(45, 16), torch.randn(45, 16)
    rec = _step(layer, x, target)
    # cosines from per-token autograd gradients (tests/fixtures/reference.py), thresholds by hand
    grad_out = 2 * (layer.experts(x, rec.indices, rec.weights)[0] - target).detach()
    cos = per_token_gradient_cosines(layer.experts, x, rec.indices, rec.weights, grad_out, scope="all")
    expected = set()
    for e in range(4):
        values = [v for (t, ee), v in cos.items() if ee == e]
        if len(values) < cfg.min_tokens:
            continue
        cut = statistics.fmean(values) - c * statistics.pstdev(values)
        expected |= {(t, ee) for (t, ee), v in cos.items() if ee == e and v < cut - 1e-6}
        assert not any(abs(v - cut) < 1e-6 for v in values)  # no pair on the edge
    s = rec.stgc
    flagged = {(int(t), int(e)) for t, e, f in zip(s.token_ids, s.expert_ids, s.conflicts, strict=True) if f}
    assert flagged == expected
    assert 0 < len(flagged) < len(cos)


def test_an_expert_with_equal_cosines_has_no_relative_conflict():
    cfg = STGCConfig(threshold_mode="relative", relative_c=0.0)
    cos = torch.tensor([0.3, 0.3, 0.3, -0.5, 0.1])
    experts = torch.tensor([0, 0, 0, 1, 1])
    assert cfg.conflicts(cos, experts, torch.tensor([3, 2])).tolist() == [False, False, False, True, False]


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("form", FORMS)
def test_router_gradient_of_each_form_is_the_task_gradient_plus_the_cel_gradient(form, centered):
    cfg = STGCConfig(threshold=0.3, weight=0.7, weight_mode="absolute", cel=form, centered=centered)
    layer = _layer(cfg, e=5, k=2, seed=3)
    torch.manual_seed(4)
    x, target = torch.randn(33, 16), torch.randn(33, 16)
    rec = _step(layer, x, target)
    s = rec.stgc
    conflicts = torch.zeros(33, 5, dtype=torch.bool)
    conflicts[s.token_ids[s.conflicts], s.expert_ids[s.conflicts]] = True
    dispatched = torch.zeros_like(conflicts)
    dispatched[s.token_ids, s.expert_ids] = True
    assert conflicts.any() and (conflicts.sum(-1) >= 2).any()
    # reference: a plain layer, task backward, then autograd of the CEL with the same masks
    plain = _layer(None, e=5, k=2, seed=3)
    plain.load_state_dict(layer.state_dict())
    out, prec = plain(x)
    loss = ((out - target) ** 2).sum() + prec.aux_loss()
    loss = loss + cfg.weight * conflict_elimination_loss(
        prec.logits, conflicts, form=form, dispatched=dispatched, centered=centered
    )
    loss.backward()
    torch.testing.assert_close(layer.router.weight.grad, plain.router.weight.grad, atol=1e-5, rtol=1e-5)
    cel_ref = conflict_elimination_loss(
        prec.logits.detach(), conflicts, form=form, dispatched=dispatched, centered=centered
    )
    assert float(s.cel) == pytest.approx(float(cel_ref), rel=1e-5)
    _, g = conflict_elimination_grad(
        prec.logits.detach(), conflicts, form=form, dispatched=dispatched, centered=centered
    )
    torch.testing.assert_close(s.cel_logit_grad, g.sum(0))
