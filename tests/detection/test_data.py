"""Embedded digit-scene data: deterministic, disjoint splits, boxes that hold the ink."""

from __future__ import annotations

import pytest
import torch

from moevl.detection.data import assign_targets, digit_pool, digit_pool_indices, make_digit_scenes
from moevl.detection.model import DetectorConfig, make_anchors


def test_pools_are_disjoint_and_cover_every_class():
    indices = {split: set(digit_pool_indices(split).tolist()) for split in ("train", "validation", "test")}
    assert not indices["train"] & indices["validation"]
    assert not indices["train"] & indices["test"]
    assert not indices["validation"] & indices["test"]
    assert set.union(*indices.values()) == set(range(1797))
    for split in ("train", "validation", "test"):
        _, labels = digit_pool(split)
        assert set(labels.tolist()) == set(range(10))


def test_scenes_are_deterministic_and_valid():
    a = make_digit_scenes("test", 6, noise=0.0)
    b = make_digit_scenes("test", 6, noise=0.0)
    assert torch.equal(a.images, b.images)
    assert all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes, strict=True))
    assert a.images.shape == (6, 1, 48, 48)
    for image, boxes, labels in zip(a.images, a.boxes, a.labels, strict=True):
        assert 1 <= len(boxes) <= 4 and len(boxes) == len(labels)
        assert ((labels >= 0) & (labels < 10)).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 48).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 2).all()
        ink = torch.zeros(48, 48, dtype=torch.bool)
        for x1, y1, x2, y2 in boxes.long().tolist():
            ink[y1:y2, x1:x2] = True
        # Without noise, every bright pixel lies in some box.
        assert not ((image[0] > 0.1) & ~ink).any()


def test_train_and_test_scenes_differ():
    assert not torch.equal(make_digit_scenes("train", 3).images, make_digit_scenes("test", 3).images)


def test_assign_targets_marks_positives_with_their_label():
    scenes = make_digit_scenes("validation", 4)
    anchors = make_anchors(DetectorConfig(), scenes.image_size)
    labels, targets = assign_targets(scenes, anchors)
    assert labels.shape == (4, anchors.points.shape[0])
    for m in range(4):
        pos = labels[m] < 10
        assert pos.any()
        # each positive's target is one of the scene's boxes, with the matching label
        for a in pos.nonzero()[:, 0].tolist():
            match = (scenes.boxes[m] == targets[m, a]).all(dim=1)
            assert match.any() and scenes.labels[m][match][0] == labels[m, a]


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        digit_pool("holdout")
    with pytest.raises(ValueError, match="num_scenes"):
        make_digit_scenes("train", 0)
