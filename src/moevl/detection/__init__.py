"""Dense object detection and BCKD distillation (RESEARCH.md §3).

``box_ops`` IoU/GIoU, distance coding, NMS; ``assigner`` ATSS; ``model`` the GFL-style detector and
its loss; ``losses`` detection and distillation losses as pure functions; ``data`` digit scenes;
``evaluation`` COCO metrics; ``train`` training loops and checkpoints; ``recipe`` / ``report`` the
comparison; ``cli`` the ``moevl detect`` commands.
"""

from moevl.detection.losses import (
    bckd_classification_loss,
    bckd_localization_loss,
    kl_distillation_loss,
    localization_distillation_loss,
)
from moevl.detection.model import DetectorConfig, GFLDetector

__all__ = [
    "DetectorConfig",
    "GFLDetector",
    "bckd_classification_loss",
    "bckd_localization_loss",
    "kl_distillation_loss",
    "localization_distillation_loss",
]
