"""ATSS assigner on a hand-made example and against a loop reference."""

from __future__ import annotations

import statistics

import torch

from moevl.detection.assigner import atss_assign
from moevl.detection.box_ops import box_iou


def _grid_anchors(cells, stride, side):
    centres = [(x * stride + stride / 2, y * stride + stride / 2) for y in range(cells) for x in range(cells)]
    return torch.tensor([[cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2] for cx, cy in centres])


def test_hand_example():
    # One level, 4x4 anchors of side 8 on stride 8 (centres 4, 12, 20, 28); gt = [0, 0, 16, 16].
    # The 9 nearest centres: 4 at distance sqrt(32) with IoU 64/256 = 0.25, and 5 further ones with
    # IoU 0. Threshold = mean + std = 1/9 + 0.1318 = 0.243, so exactly the 4 inner anchors are positive.
    anchors = _grid_anchors(4, 8, 8)
    assigned = atss_assign(anchors, [16], torch.tensor([[0.0, 0.0, 16.0, 16.0]]), topk=9)
    expected = torch.full((16,), -1)
    expected[[0, 1, 4, 5]] = 0
    assert assigned.tolist() == expected.tolist()


def test_centre_outside_gt_is_not_positive():
    # gt [0, 0, 12, 3]: the nearest anchors have high IoU ranks but centres at y = 4 > 3 fall outside.
    anchors = _grid_anchors(4, 8, 8)
    assigned = atss_assign(anchors, [16], torch.tensor([[0.0, 0.0, 12.0, 3.0]]), topk=4)
    assert (assigned == -1).all()


def test_no_gt_gives_background():
    anchors = _grid_anchors(3, 8, 8)
    assert (atss_assign(anchors, [9], torch.zeros(0, 4)) == -1).all()


def _reference_atss(anchors, counts, gts, topk):
    """Alg. 1 of the ATSS paper, one gt and one anchor at a time."""
    ious = box_iou(anchors, gts)
    centres = ((anchors[:, :2] + anchors[:, 2:]) / 2).tolist()
    best = [(-1.0, -1)] * len(anchors)
    for g, gt in enumerate(gts.tolist()):
        gc = ((gt[0] + gt[2]) / 2, (gt[1] + gt[3]) / 2)
        candidates, start = [], 0
        for count in counts:
            level = list(range(start, start + count))
            level.sort(key=lambda a: ((centres[a][0] - gc[0]) ** 2 + (centres[a][1] - gc[1]) ** 2, a))
            candidates += level[:topk]
            start += count
        values = [float(ious[a, g]) for a in candidates]
        threshold = statistics.mean(values) + statistics.stdev(values)
        for a in candidates:
            x, y = centres[a]
            inside = gt[0] < x < gt[2] and gt[1] < y < gt[3]
            if float(ious[a, g]) >= threshold and inside and float(ious[a, g]) > best[a][0]:
                best[a] = (float(ious[a, g]), g)
    return [g for _, g in best]


def test_matches_loop_reference_on_two_levels():
    gen = torch.Generator().manual_seed(0)
    anchors = torch.cat([_grid_anchors(8, 4, 12), _grid_anchors(4, 8, 24)])
    counts = [64, 16]
    for _ in range(5):
        xy = torch.rand(3, 2, generator=gen) * 20
        gts = torch.cat([xy, xy + 6 + torch.rand(3, 2, generator=gen) * 8], 1)
        got = atss_assign(anchors, counts, gts, topk=5).tolist()
        assert got == _reference_atss(anchors, counts, gts, 5)
        assert any(g >= 0 for g in got)
