"""Box operations in pure PyTorch: IoU / GIoU, distance-to-box coding, NMS.

Boxes are ``(x1, y1, x2, y2)`` in pixels. Axis legend: ``N``, ``M`` boxes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moevl.checks import check_choice

__all__ = [
    "batched_nms",
    "bbox2distance",
    "box_area",
    "box_iou",
    "distance2bbox",
    "nms",
]

_EPS = 1e-6


def _check_boxes(name: str, boxes: Tensor) -> None:
    if not isinstance(boxes, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (N, 4), got {type(boxes).__name__}")
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must be (N, 4), got shape {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype, got {boxes.dtype}")


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``(..., 4)`` boxes; inverted (degenerate) boxes have area 0."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(boxes1: Tensor, boxes2: Tensor, *, mode: str = "iou", aligned: bool = False) -> Tensor:
    """IoU or GIoU (Rezatofighi et al., CVPR 2019, Alg. 1) between boxes.

    Args:
        boxes1: ``(N, 4)``.
        boxes2: ``(M, 4)``; ``M == N`` when ``aligned``.
        mode: ``"iou"`` or ``"giou"``.
        aligned: if True, compare row ``i`` with row ``i`` and return ``(N,)``; otherwise ``(N, M)``.

    NOTE: union and enclosing areas are clamped to ``1e-6`` so that degenerate (zero-area)
    boxes give IoU 0 and a finite GIoU instead of NaN (same convention as mmdet's
    ``bbox_overlaps``).
    """
    _check_boxes("boxes1", boxes1)
    _check_boxes("boxes2", boxes2)
    check_choice("mode", mode, ("iou", "giou"))
    if aligned and boxes1.shape[0] != boxes2.shape[0]:
        raise ValueError(
            f"boxes2 must have {boxes1.shape[0]} rows (those of boxes1) when aligned, got {boxes2.shape[0]}"
        )
    if aligned:
        a, b = boxes1, boxes2  # (N, 4) each
    else:
        a, b = boxes1[:, None, :], boxes2[None, :, :]  # (N, 1, 4), (1, M, 4)
    area_a, area_b = box_area(a), box_area(b)
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = (area_a + area_b - inter).clamp(min=_EPS)
    iou = inter / union
    if mode == "iou":
        return iou
    enc_lt = torch.minimum(a[..., :2], b[..., :2])
    enc_rb = torch.maximum(a[..., 2:], b[..., 2:])
    enc_wh = (enc_rb - enc_lt).clamp(min=0)
    enclose = (enc_wh[..., 0] * enc_wh[..., 1]).clamp(min=_EPS)
    return iou - (enclose - union) / enclose


def distance2bbox(points: Tensor, distance: Tensor, max_shape: tuple[int, int] | None = None) -> Tensor:
    """Decode ``(left, top, right, bottom)`` distances from points into boxes (GFL / FCOS coding).

    Args:
        points: ``(N, 2)`` as ``(x, y)``.
        distance: ``(N, 4)`` non-negative distances.
        max_shape: optional ``(height, width)`` to clip the boxes to.
    """
    x1 = points[..., 0] - distance[..., 0]
    y1 = points[..., 1] - distance[..., 1]
    x2 = points[..., 0] + distance[..., 2]
    y2 = points[..., 1] + distance[..., 3]
    boxes = torch.stack([x1, y1, x2, y2], dim=-1)
    if max_shape is not None:
        height, width = max_shape
        boxes = torch.stack(
            [
                boxes[..., 0].clamp(0, width),
                boxes[..., 1].clamp(0, height),
                boxes[..., 2].clamp(0, width),
                boxes[..., 3].clamp(0, height),
            ],
            dim=-1,
        )
    return boxes


def bbox2distance(
    points: Tensor, boxes: Tensor, max_distance: float | None = None, eps: float = 0.01
) -> Tensor:
    """Inverse of :func:`distance2bbox`: ``(N, 2)`` points and ``(N, 4)`` boxes -> ``(N, 4)`` distances.

    Distances are clamped to ``[0, max_distance - eps]`` when ``max_distance`` is given, so the
    DFL target always has a right neighbour bin (GFL, Li et al. 2020, Eq. 6).
    """
    left = points[..., 0] - boxes[..., 0]
    top = points[..., 1] - boxes[..., 1]
    right = boxes[..., 2] - points[..., 0]
    bottom = boxes[..., 3] - points[..., 1]
    dist = torch.stack([left, top, right, bottom], dim=-1)
    if max_distance is not None:
        dist = dist.clamp(min=0, max=max_distance - eps)
    return dist


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression.

    Args:
        boxes: ``(N, 4)``.
        scores: ``(N,)``.
        iou_threshold: a box is dropped when its IoU with a kept, higher-scoring box exceeds this.

    Returns:
        ``(K,)`` long indices of kept boxes, by decreasing score.
    """
    _check_boxes("boxes", boxes)
    if scores.ndim != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores must be ({boxes.shape[0]},), got shape {tuple(scores.shape)}")
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    iou = box_iou(boxes[order], boxes[order])  # (N, N) in score order
    suppressed = torch.zeros(order.shape[0], dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(order.shape[0]):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Class-wise NMS: boxes of different ``labels`` never suppress each other.

    Uses the coordinate-offset trick: each class is shifted by more than the extent of all boxes.
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    offset = labels.to(boxes.dtype) * (boxes.max() - boxes.min() + 1)
    return nms(boxes + offset[:, None], scores, iou_threshold)
