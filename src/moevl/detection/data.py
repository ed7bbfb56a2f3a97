"""Embedded detection data: scenes of real handwritten digits (scikit-learn's ``load_digits``).

Each scene is a square grey canvas with a few digits at random scales and positions; the box of a
digit is the tight box of its ink. The 1797 digit images are split once, deterministically, into
disjoint train / validation / test pools, so no test digit image is ever seen in training.

Axis legend: ``M`` scenes, ``S`` canvas side, ``G`` digits of a scene, ``A`` anchors.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from moevl.checks import check_choice, check_int
from moevl.data.images import load_digits_source
from moevl.detection.assigner import atss_assign
from moevl.detection.box_ops import box_iou
from moevl.detection.model import Anchors
from moevl.detection.names import SPLITS

__all__ = ["SPLITS", "DigitScenes", "assign_targets", "digit_pool", "digit_pool_indices", "make_digit_scenes"]

_SPLIT_FRACTIONS = {"train": (0.0, 0.6), "validation": (0.6, 0.7), "test": (0.7, 1.0)}
_SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}
NUM_CLASSES = 10


@dataclass(frozen=True)
class DigitScenes:
    images: Tensor  # (M, 1, S, S) float in [0, 1]
    boxes: list[Tensor]  # M x (G, 4) (x1, y1, x2, y2)
    labels: list[Tensor]  # M x (G,) long in [0, 10)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def subset(self, indices: list[int]) -> DigitScenes:
        return DigitScenes(
            self.images[indices], [self.boxes[i] for i in indices], [self.labels[i] for i in indices]
        )


@lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The digit images ``(1797, 8, 8)`` in ``[0, 1]`` and labels, from moevl's one digit loader."""
    source = load_digits_source()
    return source.images, source.labels


def digit_pool_indices(split: str) -> np.ndarray:
    """Indices into ``load_digits()`` of a split's digit images; the three splits are disjoint."""
    check_choice("split", split, SPLITS)
    count = len(_load_digits()[0])
    order = np.random.default_rng(0).permutation(count)
    lo, hi = _SPLIT_FRACTIONS[split]
    return order[int(lo * count) : int(hi * count)]


def digit_pool(split: str) -> tuple[Tensor, Tensor]:
    """The digit images ``(K, 8, 8)`` and labels ``(K,)`` of a split."""
    images, targets = _load_digits()
    idx = digit_pool_indices(split)
    return torch.from_numpy(images[idx]), torch.from_numpy(targets[idx])


def make_digit_scenes(
    split: str,
    num_scenes: int,
    *,
    image_size: int = 48,
    min_digits: int = 1,
    max_digits: int = 4,
    min_digit_size: int = 12,
    max_digit_size: int = 24,
    max_overlap: float = 0.2,
    noise: float = 0.05,
) -> DigitScenes:
    """Deterministic scenes for ``split`` (the same arguments always give the same scenes).

    Digits are resized (bilinear) to a random side in ``[min_digit_size, max_digit_size]``, pasted
    with ``max`` at positions whose boxes overlap any earlier box by IoU at most ``max_overlap``;
    Gaussian pixel noise of std ``noise`` is added.
    """
    check_int("num_scenes", num_scenes, minimum=1)
    if not 4 <= min_digit_size <= max_digit_size <= image_size:
        raise ValueError(
            f"min_digit_size and max_digit_size must be 4 <= min <= max <= image_size={image_size}, "
            f"got {min_digit_size} and {max_digit_size}"
        )
    pool_images, pool_labels = digit_pool(split)
    rng = np.random.default_rng(_SPLIT_SEEDS[split] * 1_000_003 + num_scenes)
    canvas = torch.zeros(num_scenes, 1, image_size, image_size)
    all_boxes, all_labels = [], []
    for m in range(num_scenes):
        boxes: list[list[float]] = []
        labels: list[int] = []
        for _ in range(int(rng.integers(min_digits, max_digits + 1))):
            k = int(rng.integers(len(pool_images)))
            side = int(rng.integers(min_digit_size, max_digit_size + 1))
            patch = F.interpolate(
                pool_images[k][None, None], size=(side, side), mode="bilinear", align_corners=False
            )
            patch = patch[0, 0].clamp(0, 1)  # (side, side)
            ink_rows = (patch > 0.1).any(dim=1).nonzero()[:, 0]
            ink_cols = (patch > 0.1).any(dim=0).nonzero()[:, 0]
            for _attempt in range(20):
                x0 = int(rng.integers(0, image_size - side + 1))
                y0 = int(rng.integers(0, image_size - side + 1))
                box = [
                    float(x0 + ink_cols.min()),
                    float(y0 + ink_rows.min()),
                    float(x0 + ink_cols.max() + 1),
                    float(y0 + ink_rows.max() + 1),
                ]
                if not boxes or box_iou(torch.tensor([box]), torch.tensor(boxes)).max() <= max_overlap:
                    region = canvas[m, 0, y0 : y0 + side, x0 : x0 + side]
                    canvas[m, 0, y0 : y0 + side, x0 : x0 + side] = torch.maximum(region, patch)
                    boxes.append(box)
                    labels.append(int(pool_labels[k]))
                    break
        all_boxes.append(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        all_labels.append(torch.tensor(labels, dtype=torch.long))
    if noise > 0:
        generator = torch.Generator().manual_seed(_SPLIT_SEEDS[split])
        canvas = (canvas + noise * torch.randn(canvas.shape, generator=generator)).clamp(0, 1)
    return DigitScenes(canvas, all_boxes, all_labels)


def assign_targets(
    scenes: DigitScenes, anchors: Anchors, *, num_classes: int = NUM_CLASSES
) -> tuple[Tensor, Tensor]:
    """ATSS targets for every scene, computed once (they depend only on the gts and the anchors).

    Returns:
        labels ``(M, A)`` long (``num_classes`` = background) and box targets ``(M, A, 4)``.
    """
    num_anchors = anchors.points.shape[0]
    labels = torch.full((len(scenes), num_anchors), num_classes, dtype=torch.long)
    targets = torch.zeros(len(scenes), num_anchors, 4)
    for m, (boxes, classes) in enumerate(zip(scenes.boxes, scenes.labels, strict=True)):
        assigned = atss_assign(anchors.boxes, anchors.num_level_anchors, boxes)
        pos = assigned >= 0
        labels[m, pos] = classes[assigned[pos]]
        targets[m, pos] = boxes[assigned[pos]]
    return labels, targets
