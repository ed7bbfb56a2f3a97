"""ATSS label assignment (S. Zhang et al., "Bridging the Gap Between Anchor-based and Anchor-free
Detection via Adaptive Training Sample Selection", CVPR 2020, Alg. 1).

Axis legend: ``A`` anchors of one image (all levels concatenated), ``G`` ground-truth boxes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moevl.detection.box_ops import box_iou

__all__ = ["atss_assign"]


def atss_assign(
    anchors: Tensor,
    num_level_anchors: list[int],
    gt_boxes: Tensor,
    *,
    topk: int = 9,
) -> Tensor:
    """Assign each anchor to at most one ground-truth box.

    For each gt, take on every level the ``topk`` anchors whose centres are closest to the gt centre;
    the IoU threshold is ``mean + std`` of those candidates' IoUs; a candidate is positive when its
    IoU reaches the threshold and its centre lies inside the gt. An anchor positive for several gts
    goes to the one with the highest IoU.

    Args:
        anchors: ``(A, 4)`` anchor boxes, levels concatenated in order.
        num_level_anchors: anchors per level; sums to ``A``.
        gt_boxes: ``(G, 4)`` ground-truth boxes.
        topk: candidates per level and gt.

    Returns:
        ``(A,)`` long: index of the assigned gt, or ``-1`` for background.
    """
    if anchors.ndim != 2 or anchors.shape[1] != 4:
        raise ValueError(f"anchors must be (A, 4), got shape {tuple(anchors.shape)}")
    if sum(num_level_anchors) != anchors.shape[0]:
        raise ValueError(
            f"num_level_anchors must be counts summing to {anchors.shape[0]}, got {num_level_anchors} "
            f"(sum {sum(num_level_anchors)})"
        )
    if gt_boxes.ndim != 2 or gt_boxes.shape[1] != 4:
        raise ValueError(f"gt_boxes must be (G, 4), got shape {tuple(gt_boxes.shape)}")
    num_anchors, num_gts = anchors.shape[0], gt_boxes.shape[0]
    assigned = torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
    if num_gts == 0:
        return assigned

    ious = box_iou(anchors, gt_boxes)  # (A, G)
    anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2  # (A, 2)
    gt_centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # (G, 2)
    distances = torch.cdist(anchor_centres, gt_centres)  # (A, G)

    candidates = []
    start = 0
    for count in num_level_anchors:
        k = min(topk, count)
        _, idx = distances[start : start + count].topk(k, dim=0, largest=False)  # (k, G)
        candidates.append(idx + start)
        start += count
    candidates = torch.cat(candidates, dim=0)  # (K, G)
    gt_index = torch.arange(num_gts, device=anchors.device)[None, :].expand_as(candidates)
    candidate_ious = ious[candidates, gt_index]  # (K, G)
    # NOTE: torch.std is the unbiased estimate, as in the reference implementation.
    threshold = candidate_ious.mean(0) + candidate_ious.std(0)  # (G,)
    is_pos = candidate_ious >= threshold[None, :]

    cand_centres = anchor_centres[candidates]  # (K, G, 2)
    inside = (
        (cand_centres[..., 0] > gt_boxes[None, :, 0])
        & (cand_centres[..., 1] > gt_boxes[None, :, 1])
        & (cand_centres[..., 0] < gt_boxes[None, :, 2])
        & (cand_centres[..., 1] < gt_boxes[None, :, 3])
    )
    is_pos &= inside

    # Keep the IoU only where (anchor, gt) is a positive pair; pick the max-IoU gt per anchor.
    pos_ious = torch.full_like(ious, -1.0)  # (A, G)
    pos_ious[candidates[is_pos], gt_index[is_pos]] = ious[candidates[is_pos], gt_index[is_pos]]
    best_iou, best_gt = pos_ious.max(dim=1)
    assigned[best_iou >= 0] = best_gt[best_iou >= 0]
    return assigned
