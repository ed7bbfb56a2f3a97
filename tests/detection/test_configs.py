"""Detection settings refuse impossible values (NaN, infinities, negatives, bools for ints, seeds torch
cannot take) with a ValueError that starts with the field's name (the CLI turns it into the option)."""

from __future__ import annotations

import math

import pytest

from moevl.detection.model import DetectorConfig
from moevl.detection.recipe import DetectionCompareConfig, DetectionDataConfig
from moevl.detection.train import DistillConfig, TrainConfig


@pytest.mark.parametrize(
    ("make", "field", "value"),
    [
        (TrainConfig, "lr", math.nan),
        (TrainConfig, "lr", math.inf),
        (TrainConfig, "lr", 0.0),
        (TrainConfig, "weight_decay", -1e-4),
        (TrainConfig, "steps", 0),
        (TrainConfig, "steps", 2.5),
        (TrainConfig, "batch_size", True),
        (TrainConfig, "seed", -1),
        (TrainConfig, "seed", 2**64),
        (DistillConfig, "kl_weight", math.nan),
        (DistillConfig, "bckd_loc_weight", -4.0),
        (DistillConfig, "ld_temperature", 0.0),
        (DistillConfig, "kl_temperature", -math.inf),
        (DistillConfig, "method", "fitnet"),
        (DistillConfig, "bckd_iou", "diou"),
        (DetectorConfig, "anchor_scale", math.inf),
        (DetectorConfig, "neck_width", 0),
        (DetectorConfig, "stage_widths", ()),
        (DetectorConfig, "stage_widths", (8, -1)),
        (DetectionDataConfig, "image_size", 16),
        (DetectionDataConfig, "train_scenes", 0),
        (DetectionCompareConfig, "lr", -3e-3),
        (DetectionCompareConfig, "seeds", (0, 0)),
        (DetectionCompareConfig, "seeds", (-1,)),
        (DetectionCompareConfig, "methods", ()),
        (DetectionCompareConfig, "teacher", DetectorConfig(num_classes=3)),
    ],
)
def test_bad_values_are_refused_naming_the_field(make, field, value):
    with pytest.raises(ValueError) as error:
        make(**{field: value})
    assert str(error.value).startswith(field), str(error.value)


def test_defaults_are_valid():
    for make in (TrainConfig, DistillConfig, DetectorConfig, DetectionDataConfig, DetectionCompareConfig):
        make()
    assert TrainConfig(seed=2**64 - 1).seed == 2**64 - 1  # torch's largest seed
