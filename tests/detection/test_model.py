"""Detector: shapes, decoding, losses wiring, overfitting a handful of images, checkpoints."""

from __future__ import annotations

import pytest
import torch

from moevl.detection.data import make_digit_scenes
from moevl.detection.evaluation import coco_evaluate, evaluate_detector, predict
from moevl.detection.model import (
    Detections,
    DetectorConfig,
    DetectorOutput,
    GFLDetector,
    decode_boxes,
    detection_loss,
    make_anchors,
)
from moevl.detection.train import (
    DistillConfig,
    TrainConfig,
    distillation_loss,
    load_checkpoint,
    save_checkpoint,
    teacher_outputs,
    train_detector,
)

TINY = DetectorConfig(stage_widths=(8, 16, 32), stage_depth=1, neck_width=16, head_convs=1, reg_max=6)


def test_output_shapes_match_anchors():
    model = GFLDetector(TINY)
    anchors = make_anchors(TINY, 48)
    out = model(torch.zeros(2, 1, 48, 48))
    num = anchors.points.shape[0]
    assert num == 12 * 12 + 6 * 6 + 3 * 3 == sum(anchors.num_level_anchors)
    assert out.cls_logits.shape == (2, num, 10)
    assert out.reg_logits.shape == (2, num, 4, 7)
    with pytest.raises(ValueError, match="images"):
        model(torch.zeros(2, 3, 48, 48))


def test_anchor_order_matches_head_layout():
    """Anchor a of level l must be the head output at the same (row, col): check with a one-hot feature."""
    anchors = make_anchors(TINY, 48)
    # level 0 is 12x12, row-major: anchor 12 * r + c sits at x = (c + .5) * 4, y = (r + .5) * 4
    r, c = 3, 7
    assert anchors.points[12 * r + c].tolist() == [(c + 0.5) * 4, (r + 0.5) * 4]
    assert anchors.strides[144].item() == 8.0 and anchors.strides[-1].item() == 16.0


def test_decode_one_hot_distributions():
    anchors = make_anchors(TINY, 48)
    num = anchors.points.shape[0]
    reg = torch.full((num, 4, 7), -1e4)
    reg[:, :, 2] = 1e4  # all mass on distance 2 (in stride units)
    boxes = decode_boxes(reg, anchors)
    expected = torch.cat(
        [anchors.points - 2 * anchors.strides[:, None], anchors.points + 2 * anchors.strides[:, None]], 1
    )
    torch.testing.assert_close(boxes, expected)


def test_distillation_terms_vanish_when_student_is_teacher():
    torch.manual_seed(0)
    model = GFLDetector(TINY)
    scenes = make_digit_scenes("validation", 3)
    anchors = make_anchors(TINY, 48)
    from moevl.detection.data import assign_targets

    labels, _ = assign_targets(scenes, anchors)
    out = model(scenes.images)
    frozen = DetectorOutput(out.cls_logits.detach(), out.reg_logits.detach())
    for method in ("kl", "ld", "bckd"):
        loss = distillation_loss(out, frozen, labels, anchors, DistillConfig(method=method))
        assert abs(loss.item()) < 1e-6, method
    with pytest.raises(ValueError, match="method"):
        DistillConfig(method="fitnet")


def test_detection_loss_ignores_ignored_anchors():
    torch.manual_seed(0)
    model = GFLDetector(TINY)
    scenes = make_digit_scenes("validation", 2)
    anchors = make_anchors(TINY, 48)
    from moevl.detection.data import assign_targets

    labels, targets = assign_targets(scenes, anchors)
    out = model(scenes.images)
    base = detection_loss(out, labels, targets, anchors, reg_max=TINY.reg_max)
    ignored = labels.clone()
    ignored[:, :10] = -1  # only background anchors in the top-left corner
    assert (labels[:, :10] == 10).all()
    cls_logits = out.cls_logits.clone()
    cls_logits[:, :10] = 50.0  # would be a huge QFL loss if counted
    loss = detection_loss(
        DetectorOutput(cls_logits, out.reg_logits), ignored, targets, anchors, reg_max=TINY.reg_max
    )
    direct = (
        base.cls
        - detection_loss(
            DetectorOutput(out.cls_logits[:, 10:], out.reg_logits[:, 10:]),
            labels[:, 10:],
            targets[:, 10:],
            anchors._replace(points=anchors.points[10:], strides=anchors.strides[10:]),
            reg_max=TINY.reg_max,
        ).cls
    )
    assert loss.cls.item() == pytest.approx(base.cls.item() - direct.item(), rel=1e-5)


def test_overfits_a_handful_of_images():
    torch.manual_seed(0)
    scenes = make_digit_scenes("train", 4)
    model = GFLDetector(TINY)
    result = train_detector(
        model, scenes, config=TrainConfig(steps=150, batch_size=4, lr=1e-2, warmup_steps=10), progress=False
    )
    first = sum(h["loss"] for h in result.history[:10]) / 10
    last = sum(h["loss"] for h in result.history[-10:]) / 10
    assert last < 0.3 * first
    assert evaluate_detector(model, scenes)["mAP"] > 0.9  # COCO mAP@[.5:.95] on the training images


def test_coco_evaluate_perfect_and_empty():
    scenes = make_digit_scenes("test", 3)
    perfect = [
        Detections(b, torch.ones(len(b)), lab) for b, lab in zip(scenes.boxes, scenes.labels, strict=True)
    ]
    metrics = coco_evaluate(perfect, scenes)
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    wrong = [
        Detections(b, torch.ones(len(b)), (lab + 1) % 10)
        for b, lab in zip(scenes.boxes, scenes.labels, strict=True)
    ]
    assert coco_evaluate(wrong, scenes)["mAP"] == 0.0
    empty = [Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))] * 3
    assert coco_evaluate(empty, scenes)["mAP"] == 0.0


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = GFLDetector(TINY)
    path = save_checkpoint(tmp_path / "m.safetensors", model, extra={"role": "student"})
    loaded, info = load_checkpoint(path)
    assert info["role"] == "student" and loaded.config == TINY
    images = torch.rand(2, 1, 48, 48)
    model.eval()
    torch.testing.assert_close(loaded(images).cls_logits, model(images).cls_logits)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_teacher_outputs_equal_direct_forward():
    torch.manual_seed(0)
    model = GFLDetector(TINY).eval()
    images = torch.rand(5, 1, 48, 48)
    cached = teacher_outputs(model, images, batch_size=2)
    torch.testing.assert_close(cached.cls_logits, model(images).cls_logits)
    assert len(predict(model, images)) == 5


def test_bckd_wiring_uses_every_anchor_paper_weights_and_num_pos():
    """distillation_loss('bckd') == 1.0 * L_cls + 4.0 * L_loc over all anchors / num_pos (RESEARCH.md §3)."""
    import torch.nn.functional as F

    from moevl.detection.box_ops import box_iou
    from moevl.detection.data import assign_targets

    torch.manual_seed(0)
    student, teacher = GFLDetector(TINY), GFLDetector(TINY)
    scenes = make_digit_scenes("validation", 2)
    anchors = make_anchors(TINY, 48)
    labels, _ = assign_targets(scenes, anchors)
    s_out, t_out = student(scenes.images), teacher(scenes.images)
    got = distillation_loss(s_out, t_out, labels, anchors, DistillConfig(method="bckd"))

    num_pos = (labels < 10).sum().item()
    s, t = s_out.cls_logits.flatten(0, 1), t_out.cls_logits.flatten(0, 1)
    ps, pt = s.sigmoid(), t.sigmoid()
    cls = (F.binary_cross_entropy(ps, pt, reduction="none") * (pt - ps).abs()).sum() / num_pos
    sb = decode_boxes(s_out.reg_logits, anchors).flatten(0, 1)
    tb = decode_boxes(t_out.reg_logits, anchors).flatten(0, 1)
    loc = ((pt - ps).abs().max(1).values * (1 - box_iou(sb, tb, mode="giou", aligned=True))).sum() / num_pos
    torch.testing.assert_close(got, 1.0 * cls + 4.0 * loc, rtol=1e-4, atol=1e-5)
