"""Dense object detection and BCKD distillation (RESEARCH.md §3).

``box_ops`` IoU/GIoU, distance coding, NMS; ``assigner`` ATSS; ``model`` the GFL-style detector and
its loss; ``losses`` detection and distillation losses as pure functions; ``data`` digit scenes;
``evaluation`` COCO metrics; ``train`` training loops and checkpoints; ``recipe`` / ``report`` the
comparison; ``cli`` the ``moevl detect`` commands.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moevl.detection.losses import bckd_classification_loss, bckd_localization_loss
    from moevl.detection.model import DetectorConfig, GFLDetector

# Where each public name lives. NOTE: loaded on first use, so that `moevl --help` and `moevl detect` option
# errors (the CLI imports moevl.detection.cli) do not pay torch's import.
_EXPORTS = {
    "DetectorConfig": "moevl.detection.model",
    "GFLDetector": "moevl.detection.model",
    "bckd_classification_loss": "moevl.detection.losses",
    "bckd_localization_loss": "moevl.detection.losses",
}

__all__ = ["DetectorConfig", "GFLDetector", "bckd_classification_loss", "bckd_localization_loss"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
