"""Box ops against hand-computed values and a naive NMS."""

from __future__ import annotations

import pytest
import torch

from moevl.detection.box_ops import batched_nms, bbox2distance, box_area, box_iou, distance2bbox, nms


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize(
    ("a", "b", "iou", "giou"),
    [
        # overlap 1x1, union 4 + 4 - 1 = 7, enclosing 3x3 = 9
        ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7, 1 / 7 - 2 / 9),
        # identical
        ([1, 2, 4, 6], [1, 2, 4, 6], 1.0, 1.0),
        # disjoint: union 2, enclosing 3x1 -> GIoU = -1/3
        ([0, 0, 1, 1], [2, 0, 3, 1], 0.0, -1 / 3),
        # containment: 1 / 4, enclosing = outer box
        ([0, 0, 2, 2], [0, 0, 1, 1], 0.25, 0.25),
        # touching edges: intersection has zero width
        ([0, 0, 1, 1], [1, 0, 2, 1], 0.0, 0.0),
        # degenerate: a point inside a box (zero area) -> IoU 0, GIoU 0 (enclosing = union)
        ([1, 1, 1, 1], [0, 0, 2, 2], 0.0, 0.0),
        # degenerate: two identical points; union and enclosing are clamped, no NaN
        ([1, 1, 1, 1], [1, 1, 1, 1], 0.0, 0.0),
        # degenerate: a line segment of zero height against a unit box, enclosing 1x2
        ([0, 3, 1, 3], [0, 0, 1, 1], 0.0, -(3 - 1) / 3),
        # inverted box has zero area; enclosing = [min x1s, min y1s, max x2s, max y2s] = [0, 0, 1, 1]
        # equals the union, so GIoU = 0
        ([2, 2, 0, 0], [0, 0, 1, 1], 0.0, 0.0),
    ],
)
def test_iou_giou_hand_computed(a, b, iou, giou):
    got_iou = box_iou(_t([a]), _t([b]))[0, 0].item()
    got_giou = box_iou(_t([a]), _t([b]), mode="giou")[0, 0].item()
    assert got_iou == pytest.approx(iou, abs=1e-6)
    assert got_giou == pytest.approx(giou, abs=1e-6)


def test_aligned_is_diagonal_of_pairwise_and_symmetric():
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(9, 2, generator=gen) * 10
    a = torch.cat([xy, xy + torch.rand(9, 2, generator=gen) * 5], 1)
    xy = torch.rand(9, 2, generator=gen) * 10
    b = torch.cat([xy, xy + torch.rand(9, 2, generator=gen) * 5], 1)
    for mode in ("iou", "giou"):
        pair = box_iou(a, b, mode=mode)
        torch.testing.assert_close(box_iou(a, b, mode=mode, aligned=True), pair.diagonal())
        torch.testing.assert_close(pair, box_iou(b, a, mode=mode).T)
        assert (pair <= 1).all() and (pair >= -1).all()


def test_box_area():
    assert box_area(_t([[0, 0, 2, 3], [2, 2, 1, 5]])).tolist() == [6.0, 0.0]


def test_distance_coding_round_trip():
    points = _t([[5, 5], [10, 2]])
    boxes = _t([[1, 2, 8, 9], [7, 0, 15, 3]])
    dist = bbox2distance(points, boxes)
    assert dist.tolist() == [[4, 3, 3, 4], [3, 2, 5, 1]]
    torch.testing.assert_close(distance2bbox(points, dist), boxes)
    assert bbox2distance(points, boxes, max_distance=4).max().item() == pytest.approx(3.99)
    clipped = distance2bbox(points, _t([[10, 10, 10, 10], [1, 1, 1, 1]]), max_shape=(12, 14))
    assert clipped.tolist() == [[0, 0, 14, 12], [9, 1, 11, 3]]


def _naive_nms(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep = []
    for i in order:
        if all(box_iou(boxes[i : i + 1], boxes[j : j + 1])[0, 0] <= thr for j in keep):
            keep.append(i)
    return keep


def test_nms_matches_naive():
    gen = torch.Generator().manual_seed(1)
    xy = torch.rand(40, 2, generator=gen) * 20
    boxes = torch.cat([xy, xy + 3 + torch.rand(40, 2, generator=gen) * 6], 1)
    scores = torch.rand(40, generator=gen)
    for thr in (0.1, 0.5, 0.8):
        assert nms(boxes, scores, thr).tolist() == _naive_nms(boxes, scores, thr)


def test_nms_hand_example_and_batched():
    boxes = _t([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
    scores = _t([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    # different classes never suppress each other
    assert sorted(batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist()) == [0, 1, 2]
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


def test_bad_boxes_raise():
    with pytest.raises(ValueError, match="boxes1"):
        box_iou(torch.zeros(3, 5), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="mode"):
        box_iou(torch.zeros(3, 4), torch.zeros(3, 4), mode="diou")
    with pytest.raises(ValueError, match="boxes2"):
        box_iou(torch.zeros(3, 4), torch.zeros(2, 4), aligned=True)
    with pytest.raises(ValueError, match="scores"):
        nms(torch.zeros(3, 4), torch.zeros(2), 0.5)
