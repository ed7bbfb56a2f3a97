"""Model directories: unreadable checkpoints are one clear error naming the directory."""

import json
import re
import shutil

import pytest

from moevl.vlm.io import CheckpointError, load_model


def test_truncated_or_corrupt_checkpoints_are_named(demo, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(demo.init, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=re.escape(f"{broken}: cannot load the model")):
        load_model(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        load_model(broken)
    (broken / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (broken / "moevl.json").write_text("[")
    with pytest.raises(CheckpointError, match=r"moevl\.json is not valid JSON"):
        load_model(broken)
