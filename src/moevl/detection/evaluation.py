"""COCO-style evaluation (mAP@[.5:.95], AP50, AP75) with pycocotools."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from torch import Tensor

from moevl.detection.data import DigitScenes
from moevl.detection.model import Anchors, Detections, GFLDetector, make_anchors, postprocess

__all__ = ["coco_evaluate", "evaluate_detector", "predict"]


def coco_evaluate(
    detections: list[Detections], scenes: DigitScenes, *, num_classes: int = 10
) -> dict[str, float]:
    """COCO bbox metrics of ``detections`` (one per scene) against the scenes' boxes."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(detections) != len(scenes):
        raise ValueError(f"detections must have {len(scenes)} entries (one per scene), got {len(detections)}")
    size = scenes.image_size
    images, annotations, results = [], [], []
    for image_id, (boxes, labels) in enumerate(zip(scenes.boxes, scenes.labels, strict=True)):
        images.append({"id": image_id, "width": size, "height": size})
        for box, label in zip(boxes.tolist(), labels.tolist(), strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        det = detections[image_id]
        for box, score, label in zip(
            det.boxes.tolist(), det.scores.tolist(), det.labels.tolist(), strict=True
        ):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "score": score,
                }
            )
    if not results:
        return {"mAP": 0.0, "AP50": 0.0, "AP75": 0.0}
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": str(c)} for c in range(num_classes)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = np.maximum(evaluator.stats[:3], 0.0)  # -1 means "no gt"; report 0
    return {"mAP": float(stats[0]), "AP50": float(stats[1]), "AP75": float(stats[2])}


@torch.no_grad()
def predict(
    model: GFLDetector, images: Tensor, *, anchors: Anchors | None = None, batch_size: int = 64
) -> list[Detections]:
    """Run ``model`` in eval mode over ``images`` ``(M, 1, S, S)`` and post-process."""
    was_training = model.training
    model.eval()
    size = images.shape[-1]
    anchors = anchors if anchors is not None else make_anchors(model.config, size)
    detections: list[Detections] = []
    for start in range(0, images.shape[0], batch_size):
        detections += postprocess(model(images[start : start + batch_size]), anchors, image_size=size)
    model.train(was_training)
    return detections


def evaluate_detector(model: GFLDetector, scenes: DigitScenes) -> dict[str, float]:
    """COCO metrics of ``model`` on ``scenes``."""
    return coco_evaluate(predict(model, scenes.images), scenes, num_classes=model.config.num_classes)
