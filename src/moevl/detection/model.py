"""A small dense one-stage detector in the style of GFL (Li et al., "Generalized Focal Loss",
NeurIPS 2020): backbone -> FPN neck -> shared head with a sigmoid classification branch and a
distribution (DFL) box branch. Depth and width come from :class:`DetectorConfig`, so the teacher and
the student are the same code.

Axis legend: ``B`` images, ``A`` anchors of one image (all levels concatenated, row-major per level),
``C`` classes, ``R = reg_max + 1`` distance bins, ``N`` anchors of a batch (``B * A``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moevl.checks import check, check_float, check_int
from moevl.config import build
from moevl.detection.box_ops import batched_nms, box_iou, distance2bbox
from moevl.detection.losses import distribution_focal_loss, giou_loss, quality_focal_loss

__all__ = [
    "Anchors",
    "DetectionLosses",
    "Detections",
    "DetectorConfig",
    "DetectorOutput",
    "GFLDetector",
    "decode_boxes",
    "detection_loss",
    "make_anchors",
    "postprocess",
]


@dataclass(frozen=True)
class DetectorConfig:
    """Sizes of a :class:`GFLDetector`. Level ``i`` has stride ``2 ** (i + 2)``."""

    num_classes: int = 10
    in_channels: int = 1
    stage_widths: tuple[int, ...] = (16, 32, 64)
    stage_depth: int = 1
    neck_width: int = 32
    head_convs: int = 2
    reg_max: int = 8
    anchor_scale: float = 3.0  # ATSS anchor side = anchor_scale * stride

    def __post_init__(self) -> None:
        for name in ("num_classes", "in_channels", "stage_depth", "neck_width", "reg_max"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("head_convs", self.head_convs, minimum=0)
        check_float("anchor_scale", self.anchor_scale, minimum=0.0, exclusive_minimum=True)
        widths = self.stage_widths
        check(
            isinstance(widths, tuple) and bool(widths),
            "stage_widths",
            "a non-empty tuple of integers >= 1",
            widths,
        )
        for i, width in enumerate(widths):
            check_int(f"stage_widths[{i}]", width, minimum=1)

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(2 ** (i + 2) for i in range(len(self.stage_widths)))

    def to_dict(self) -> dict:
        return {**asdict(self), "stage_widths": list(self.stage_widths)}

    @classmethod
    def from_dict(cls, data: dict) -> DetectorConfig:
        """Inverse of :meth:`to_dict` through ``moevl.config.build`` (``ConfigError`` on bad data)."""
        return build(cls, data)


class DetectorOutput(NamedTuple):
    cls_logits: Tensor  # (B, A, C)
    reg_logits: Tensor  # (B, A, 4, R)


class Anchors(NamedTuple):
    """Anchor geometry of one image size (identical for every image)."""

    points: Tensor  # (A, 2) anchor centres (x, y) in pixels
    strides: Tensor  # (A,) stride of each anchor's level
    boxes: Tensor  # (A, 4) square ATSS anchor boxes
    num_level_anchors: list[int]


class Detections(NamedTuple):
    boxes: Tensor  # (K, 4)
    scores: Tensor  # (K,)
    labels: Tensor  # (K,)


class DetectionLosses(NamedTuple):
    cls: Tensor
    bbox: Tensor
    dfl: Tensor
    num_pos: Tensor

    @property
    def total(self) -> Tensor:
        return self.cls + self.bbox + self.dfl


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class ConvNormAct(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            # NOTE: GroupNorm, not BatchNorm: train and eval behave the same, which matters for tiny
            # batches and for the overfit test.
            nn.GroupNorm(_groups(out_channels), out_channels),
            nn.ReLU(inplace=True),
        )


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(channels, channels)
        self.conv2 = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.GroupNorm(_groups(channels), channels)
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.conv2(self.conv1(x)))


class Backbone(nn.Module):
    """Stem (stride 2) then one stride-2 stage per level; returns features at strides 4, 8, 16, ..."""

    def __init__(self, *, in_channels: int, stage_widths: tuple[int, ...], stage_depth: int) -> None:
        super().__init__()
        stem_width = max(stage_widths[0] // 2, 4)
        self.stem = ConvNormAct(in_channels, stem_width, stride=2)
        stages = []
        previous = stem_width
        for width in stage_widths:
            blocks = [ConvNormAct(previous, width, stride=2)]
            blocks += [ResidualBlock(width) for _ in range(stage_depth)]
            stages.append(nn.Sequential(*blocks))
            previous = width
        self.stages = nn.ModuleList(stages)

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.stem(images)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class FPN(nn.Module):
    """Feature pyramid (Lin et al., CVPR 2017): lateral 1x1, top-down sum, 3x3 output conv."""

    def __init__(self, *, in_widths: tuple[int, ...], width: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(w, width, 1) for w in in_widths)
        self.output = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in in_widths)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral, features, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:])
        return [conv(x) for conv, x in zip(self.output, laterals, strict=True)]


class GFLHead(nn.Module):
    """Head shared by all levels: a classification tower and a box tower (GFL / ATSS head)."""

    def __init__(
        self, *, width: int, num_convs: int, num_classes: int, reg_max: int, num_levels: int
    ) -> None:
        super().__init__()
        self.cls_tower = nn.Sequential(*[ConvNormAct(width, width) for _ in range(num_convs)])
        self.reg_tower = nn.Sequential(*[ConvNormAct(width, width) for _ in range(num_convs)])
        self.cls_out = nn.Conv2d(width, num_classes, 3, padding=1)
        self.reg_out = nn.Conv2d(width, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.Parameter(torch.ones(num_levels))  # per-level scale of the box logits
        self.reg_bins = reg_max + 1
        nn.init.normal_(self.cls_out.weight, std=0.01)
        nn.init.normal_(self.reg_out.weight, std=0.01)
        nn.init.zeros_(self.reg_out.bias)
        # Focal-loss prior: every class starts at probability 0.01 (RetinaNet, Lin et al. 2017, §4.1).
        nn.init.constant_(self.cls_out.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, features: list[Tensor]) -> DetectorOutput:
        cls_all, reg_all = [], []
        for level, x in enumerate(features):
            batch = x.shape[0]
            cls = self.cls_out(self.cls_tower(x))  # (B, C, H, W)
            reg = self.reg_out(self.reg_tower(x)) * self.scales[level]  # (B, 4R, H, W)
            cls_all.append(cls.flatten(2).transpose(1, 2))  # (B, HW, C)
            reg_all.append(
                reg.flatten(2).transpose(1, 2).reshape(batch, -1, 4, self.reg_bins)
            )  # (B, HW, 4, R)
        return DetectorOutput(torch.cat(cls_all, dim=1), torch.cat(reg_all, dim=1))


class GFLDetector(nn.Module):
    """Backbone + FPN + GFL head. ``forward(images (B, in_channels, H, W)) -> DetectorOutput``."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(
            in_channels=config.in_channels, stage_widths=config.stage_widths, stage_depth=config.stage_depth
        )
        self.neck = FPN(in_widths=config.stage_widths, width=config.neck_width)
        self.head = GFLHead(
            width=config.neck_width,
            num_convs=config.head_convs,
            num_classes=config.num_classes,
            reg_max=config.reg_max,
            num_levels=len(config.stage_widths),
        )

    def forward(self, images: Tensor) -> DetectorOutput:
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"images must be (B, {self.config.in_channels}, H, W), got shape {tuple(images.shape)}"
            )
        return self.head(self.neck(self.backbone(images)))


def make_anchors(config: DetectorConfig, image_size: int) -> Anchors:
    """Anchor points, strides and ATSS boxes for square ``image_size`` inputs."""
    points, strides, boxes, counts = [], [], [], []
    size = image_size
    size = (size + 1) // 2  # stem
    for stride in config.strides:
        size = (size + 1) // 2  # conv, stride 2, padding 1
        coords = (torch.arange(size, dtype=torch.float32) + 0.5) * stride
        ys, xs = torch.meshgrid(coords, coords, indexing="ij")
        level_points = torch.stack([xs.flatten(), ys.flatten()], dim=1)  # (HW, 2) row-major like the head
        half = config.anchor_scale * stride / 2
        points.append(level_points)
        strides.append(torch.full((level_points.shape[0],), float(stride)))
        boxes.append(torch.cat([level_points - half, level_points + half], dim=1))
        counts.append(level_points.shape[0])
    return Anchors(torch.cat(points), torch.cat(strides), torch.cat(boxes), counts)


def decode_boxes(reg_logits: Tensor, anchors: Anchors) -> Tensor:
    """Expected distance under each side's distribution ([GFL] Integral) -> boxes.

    ``reg_logits`` ``(..., A, 4, R)`` -> boxes ``(..., A, 4)`` in pixels.
    """
    bins = torch.arange(reg_logits.shape[-1], dtype=reg_logits.dtype, device=reg_logits.device)
    distances = reg_logits.softmax(dim=-1) @ bins  # (..., A, 4) in stride units
    return distance2bbox(anchors.points, distances * anchors.strides[:, None])


def detection_loss(
    output: DetectorOutput,
    labels: Tensor,
    box_targets: Tensor,
    anchors: Anchors,
    *,
    reg_max: int,
    bbox_weight: float = 2.0,
    dfl_weight: float = 0.25,
) -> DetectionLosses:
    """GFL training loss: QFL (all anchors) + GIoU + DFL (positives, weighted by the predicted score).

    Args:
        output: the detector output for ``B`` images.
        labels: ``(B, A)`` long; ``[0, C)`` positives, ``C`` background, ``-1`` ignored.
        box_targets: ``(B, A, 4)`` assigned gt boxes (anything for non-positives).
        anchors: the anchor geometry.
        reg_max: largest distance bin.
    """
    cls_logits = output.cls_logits.flatten(0, 1)  # (N, C)
    reg_logits = output.reg_logits.flatten(0, 1)  # (N, 4, R)
    num_classes = cls_logits.shape[1]
    flat_labels = labels.flatten()
    batch = labels.shape[0]
    points = anchors.points.repeat(batch, 1)  # (N, 2)
    strides = anchors.strides.repeat(batch)  # (N,)
    pos = (flat_labels >= 0) & (flat_labels < num_classes)
    valid = (flat_labels >= 0).to(cls_logits.dtype)
    num_pos = pos.sum().clamp(min=1).to(cls_logits.dtype)

    pos_idx = pos.nonzero(as_tuple=True)[0]
    pos_reg = reg_logits[pos_idx]  # (P, 4, R)
    pos_points, pos_strides = points[pos_idx], strides[pos_idx]
    bins = torch.arange(pos_reg.shape[-1], dtype=pos_reg.dtype, device=pos_reg.device)
    pos_dist = pos_reg.softmax(-1) @ bins  # (P, 4) stride units
    pos_boxes = distance2bbox(pos_points, pos_dist * pos_strides[:, None])
    pos_targets = box_targets.flatten(0, 1)[pos_idx]
    scores = torch.zeros_like(flat_labels, dtype=cls_logits.dtype)
    if pos_idx.numel():
        scores[pos_idx] = box_iou(pos_boxes.detach(), pos_targets, aligned=True).clamp(min=0)
    loss_cls = quality_focal_loss(cls_logits, flat_labels, scores, weight=valid, avg_factor=num_pos)

    weight_targets = cls_logits[pos_idx].detach().sigmoid().max(dim=1).values  # (P,)
    avg = weight_targets.sum().clamp(min=1e-6)
    loss_bbox = giou_loss(pos_boxes, pos_targets, weight=weight_targets, avg_factor=avg) * bbox_weight
    target_dist = (
        torch.stack(
            [
                pos_points[:, 0] - pos_targets[:, 0],
                pos_points[:, 1] - pos_targets[:, 1],
                pos_targets[:, 2] - pos_points[:, 0],
                pos_targets[:, 3] - pos_points[:, 1],
            ],
            dim=1,
        )
        / pos_strides[:, None]
    ).clamp(min=0, max=reg_max - 0.01)
    loss_dfl = (
        distribution_focal_loss(pos_reg, target_dist, weight=weight_targets, avg_factor=avg) * dfl_weight
    )
    return DetectionLosses(loss_cls, loss_bbox, loss_dfl, num_pos)


@torch.no_grad()
def postprocess(
    output: DetectorOutput,
    anchors: Anchors,
    *,
    image_size: int,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.6,
    max_detections: int = 100,
    pre_nms: int = 1000,
) -> list[Detections]:
    """Sigmoid scores, score threshold, class-wise NMS; one :class:`Detections` per image."""
    boxes_all = decode_boxes(output.reg_logits, anchors).clamp(0, image_size)  # (B, A, 4)
    scores_all = output.cls_logits.sigmoid()  # (B, A, C)
    num_classes = scores_all.shape[-1]
    results = []
    for boxes, scores in zip(boxes_all, scores_all, strict=True):
        flat = scores.flatten()  # (A * C,)
        keep = (flat > score_threshold).nonzero(as_tuple=True)[0]
        if keep.numel() > pre_nms:
            keep = keep[flat[keep].topk(pre_nms).indices]
        anchor_idx, labels = keep // num_classes, keep % num_classes
        cand_boxes, cand_scores = boxes[anchor_idx], flat[keep]
        kept = batched_nms(cand_boxes, cand_scores, labels, iou_threshold)[:max_detections]
        results.append(Detections(cand_boxes[kept], cand_scores[kept], labels[kept]))
    return results
