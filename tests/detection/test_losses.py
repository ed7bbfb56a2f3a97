"""Losses against naive per-anchor, per-class loop references (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from moevl.detection.losses import (
    bckd_classification_loss,
    bckd_localization_loss,
    distribution_focal_loss,
    giou_loss,
    kl_distillation_loss,
    localization_distillation_loss,
    quality_focal_loss,
)


@pytest.fixture(autouse=True)
def _float64():
    """Loop references are compared in float64; restore the default afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


def _bce(p, target):
    return -(target * torch.log(p) + (1 - target) * torch.log(1 - p))


def _giou_scalar(a, b, mode="giou"):
    """GIoU of two boxes from their coordinates, one scalar at a time."""
    area_a = max(a[2] - a[0], 0) * max(a[3] - a[1], 0)
    area_b = max(b[2] - b[0], 0) * max(b[3] - b[1], 0)
    iw = torch.clamp(torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0]), min=0)
    ih = torch.clamp(torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1]), min=0)
    inter = iw * ih
    union = torch.clamp(area_a + area_b - inter, min=1e-6)
    iou = inter / union
    if mode == "iou":
        return iou
    ew = torch.maximum(a[2], b[2]) - torch.minimum(a[0], b[0])
    eh = torch.maximum(a[3], b[3]) - torch.minimum(a[1], b[1])
    enclose = torch.clamp(ew * eh, min=1e-6)
    return iou - (enclose - union) / enclose


def ref_bckd_cls(s, t, weight, avg, detach_weight=False):
    total = s.new_zeros(())
    for i in range(s.shape[0]):
        for c in range(s.shape[1]):
            pt = _sigmoid(t[i, c]).detach()
            ps = _sigmoid(s[i, c])
            gap = (pt - ps).abs()
            if detach_weight:
                gap = gap.detach()
            total = total + weight[i] * _bce(ps, pt) * gap
    return total / avg


def ref_bckd_loc(s, t, sb, tb, weight, avg, mode="giou"):
    total = s.new_zeros(())
    for i in range(s.shape[0]):
        w = max(abs(float(_sigmoid(t[i, c]) - _sigmoid(s[i, c].detach()))) for c in range(s.shape[1]))
        total = total + weight[i] * w * (1 - _giou_scalar(sb[i], tb[i].detach(), mode))
    return total / avg


def _random_boxes(n, gen):
    xy = torch.rand(n, 2, generator=gen) * 20
    wh = torch.rand(n, 2, generator=gen) * 10 + 0.5
    return torch.cat([xy, xy + wh], dim=1)


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(0)
    n, c = 7, 3  # awkward sizes on purpose
    s = (torch.randn(n, c, generator=gen) * 2).requires_grad_()
    t = torch.randn(n, c, generator=gen) * 2
    sb = (_random_boxes(n, gen)).requires_grad_()
    tb = _random_boxes(n, gen)
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 1.0, 0.0])
    return s, t, sb, tb, weight


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def test_bckd_classification_matches_loop(inputs):
    s, t, _, _, weight = inputs
    fast = bckd_classification_loss(s, t, weight=weight, avg_factor=3.0)
    ref = ref_bckd_cls(s, t, weight, 3.0)
    torch.testing.assert_close(fast, ref)
    torch.testing.assert_close(_grads(fast, [s])[0], _grads(ref, [s])[0])


@pytest.mark.parametrize("mode", ["giou", "iou"])
def test_bckd_localization_matches_loop(inputs, mode):
    s, t, sb, tb, weight = inputs
    fast = bckd_localization_loss(s, t, sb, tb, weight=weight, avg_factor=2.5, iou=mode)
    ref = ref_bckd_loc(s, t, sb, tb, weight, 2.5, mode)
    torch.testing.assert_close(fast, ref)
    g_fast, g_ref = _grads(fast, [sb])[0], _grads(ref, [sb])[0]
    torch.testing.assert_close(g_fast, g_ref)
    # The score-gap weight is detached: no gradient reaches the student logits.
    assert _grads(bckd_localization_loss(s, t, sb, tb, iou=mode), [s])[0] is None


def test_iou_and_giou_options_differ(inputs):
    s, t, sb, tb, _ = inputs
    assert not torch.allclose(
        bckd_localization_loss(s, t, sb, tb, iou="iou"), bckd_localization_loss(s, t, sb, tb, iou="giou")
    )


def test_student_equals_teacher_gives_zero_loss_and_gradient(inputs):
    _, t, _, tb, _ = inputs
    s = t.clone().requires_grad_()
    sb = tb.clone().requires_grad_()
    cls = bckd_classification_loss(s, t, avg_factor=4.0)
    loc = bckd_localization_loss(s, t, sb, tb, avg_factor=4.0)
    assert cls.item() == 0.0 and loc.item() == 0.0
    g_cls = _grads(cls, [s])[0]
    g_loc = _grads(loc, [sb])[0]
    assert torch.count_nonzero(g_cls) == 0
    assert torch.count_nonzero(g_loc) == 0


def test_classification_weight_is_not_detached(inputs):
    """Official behaviour: gradient flows through |p_t - p_s|; the detached variant differs."""
    s, t, _, _, weight = inputs
    official = _grads(bckd_classification_loss(s, t, weight=weight, avg_factor=3.0), [s])[0]
    detached = _grads(ref_bckd_cls(s, t, weight, 3.0, detach_weight=True), [s])[0]
    assert not torch.allclose(official, detached)
    # Same loss value either way: only the gradient differs.
    torch.testing.assert_close(
        bckd_classification_loss(s, t, weight=weight, avg_factor=3.0),
        ref_bckd_cls(s, t, weight, 3.0, detach_weight=True),
    )


def test_masked_anchors_contribute_nothing(inputs):
    s, t, sb, tb, _ = inputs
    keep = torch.tensor([True, False, True, True, False, True, True])
    weight = keep.double()
    # Garbage (even non-finite) on ignored anchors must not change the loss or leak gradients.
    s_bad = s.detach().clone()
    s_bad[~keep] = float("nan")
    s_bad.requires_grad_()
    sb_bad = sb.detach().clone()
    sb_bad[~keep] = torch.tensor([5.0, 5.0, -3.0, float("inf")])
    sb_bad.requires_grad_()
    cls = bckd_classification_loss(s_bad, t, weight=weight, avg_factor=2.0)
    cls_ref = bckd_classification_loss(s[keep], t[keep], avg_factor=2.0)
    torch.testing.assert_close(cls, cls_ref)
    loc = bckd_localization_loss(s_bad, t, sb_bad, tb, weight=weight, avg_factor=2.0)
    loc_ref = bckd_localization_loss(s[keep], t[keep], sb[keep], tb[keep], avg_factor=2.0)
    torch.testing.assert_close(loc, loc_ref)
    g_cls = _grads(cls, [s_bad])[0]
    g_loc = _grads(loc, [sb_bad])[0]
    assert torch.count_nonzero(g_cls[~keep]) == 0
    assert torch.count_nonzero(g_loc[~keep]) == 0
    assert torch.isfinite(g_cls).all() and torch.isfinite(g_loc).all()


def test_avg_factor_none_means_sum(inputs):
    s, t, sb, tb, weight = inputs
    torch.testing.assert_close(
        bckd_classification_loss(s, t, weight=weight),
        bckd_classification_loss(s, t, weight=weight, avg_factor=1.0),
    )
    torch.testing.assert_close(
        bckd_localization_loss(s, t, sb, tb) * 0.5, bckd_localization_loss(s, t, sb, tb, avg_factor=2.0)
    )


def test_kl_distillation_matches_loop(inputs):
    s, t, _, _, weight = inputs
    temp = 2.0
    ref = s.new_zeros(())
    for i in range(s.shape[0]):
        zt = [math.exp(float(t[i, c]) / temp) for c in range(s.shape[1])]
        zs = torch.stack([torch.exp(s[i, c] / temp) for c in range(s.shape[1])])
        for c in range(s.shape[1]):
            pt = zt[c] / sum(zt)
            ps = zs[c] / zs.sum()
            ref = ref + weight[i] * temp**2 * pt * (math.log(pt) - torch.log(ps))
    fast = kl_distillation_loss(s, t, temperature=temp, weight=weight, avg_factor=3.0)
    torch.testing.assert_close(fast, ref / 3.0)
    torch.testing.assert_close(_grads(fast, [s])[0], _grads(ref / 3.0, [s])[0])
    same = kl_distillation_loss(t, t, temperature=temp)
    assert abs(same.item()) < 1e-12


def test_ld_matches_loop():
    gen = torch.Generator().manual_seed(1)
    n, r, temp = 5, 6, 10.0
    s = torch.randn(n, 4, r, generator=gen).requires_grad_()
    t = torch.randn(n, 4, r, generator=gen)
    weight = torch.tensor([1.0, 0.0, 0.3, 1.0, 2.0])
    ref = s.new_zeros(())
    for i in range(n):
        for side in range(4):
            pt = torch.softmax(t[i, side] / temp, 0)
            log_ps = torch.log_softmax(s[i, side] / temp, 0)
            kl = sum(pt[k] * (torch.log(pt[k]) - log_ps[k]) for k in range(r))
            ref = ref + weight[i] * temp**2 * (kl / r) / 4  # mean over bins, then over sides
    fast = localization_distillation_loss(s, t, temperature=temp, weight=weight, avg_factor=2.0)
    torch.testing.assert_close(fast, ref / 2.0)
    torch.testing.assert_close(_grads(fast, [s])[0], _grads(ref / 2.0, [s])[0])


def test_quality_focal_loss_matches_loop():
    gen = torch.Generator().manual_seed(2)
    n, c = 6, 4
    logits = torch.randn(n, c, generator=gen).requires_grad_()
    labels = torch.tensor([0, 4, 2, 4, 3, 1])  # 4 = background
    scores = torch.rand(n, generator=gen)
    ref = logits.new_zeros(())
    for i in range(n):
        for k in range(c):
            y = float(scores[i]) if labels[i] == k else 0.0
            p = _sigmoid(logits[i, k])
            ref = ref + _bce(p, torch.tensor(y)) * (y - p).abs() ** 2
    fast = quality_focal_loss(logits, labels, scores, avg_factor=4.0)
    torch.testing.assert_close(fast, ref / 4.0)
    torch.testing.assert_close(_grads(fast, [logits])[0], _grads(ref / 4.0, [logits])[0])


def test_distribution_focal_loss_matches_loop():
    gen = torch.Generator().manual_seed(3)
    n, r = 4, 5
    dist = torch.randn(n, 4, r, generator=gen).requires_grad_()
    target = torch.rand(n, 4, generator=gen) * (r - 1.01)
    ref = dist.new_zeros(())
    for i in range(n):
        for side in range(4):
            y = float(target[i, side])
            left = math.floor(y)
            log_p = torch.log_softmax(dist[i, side], 0)
            ref = ref - ((left + 1 - y) * log_p[left] + (y - left) * log_p[left + 1]) / 4
    fast = distribution_focal_loss(dist, target)
    torch.testing.assert_close(fast, ref)
    torch.testing.assert_close(_grads(fast, [dist])[0], _grads(ref, [dist])[0])


def test_giou_loss_matches_loop(inputs):
    _, _, sb, tb, weight = inputs
    ref = sum(weight[i] * (1 - _giou_scalar(sb[i], tb[i])) for i in range(sb.shape[0]))
    torch.testing.assert_close(giou_loss(sb, tb, weight=weight), ref)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"student_logits": torch.zeros(3), "teacher_logits": torch.zeros(3)}, "student_logits"),
        ({"student_logits": torch.zeros(3, 2), "teacher_logits": torch.zeros(3, 4)}, "teacher_logits"),
        (
            {"student_logits": torch.zeros(3, 2, dtype=torch.long), "teacher_logits": torch.zeros(3, 2)},
            "dtype",
        ),
        (
            {
                "student_logits": torch.zeros(3, 2),
                "teacher_logits": torch.zeros(3, 2),
                "weight": torch.ones(4),
            },
            "weight",
        ),
        (
            {"student_logits": torch.zeros(3, 2), "teacher_logits": torch.zeros(3, 2), "avg_factor": 0.0},
            "avg_factor",
        ),
    ],
)
def test_classification_bad_input_names_argument(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        bckd_classification_loss(kwargs.pop("student_logits"), kwargs.pop("teacher_logits"), **kwargs)


def test_localization_bad_input_names_argument():
    s, t = torch.zeros(3, 2), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="student_boxes"):
        bckd_localization_loss(s, t, torch.zeros(3, 5), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="teacher_boxes"):
        bckd_localization_loss(s, t, torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="iou"):
        bckd_localization_loss(s, t, torch.zeros(3, 4), torch.zeros(3, 4), iou="diou")
