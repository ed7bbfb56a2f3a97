"""`moevl detect` commands end to end at toy sizes, and their errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from moevl.detection.cli import app
from moevl.detection.recipe import CompareConfig

runner = CliRunner()
TOY = ["--steps", "2", "--batch-size", "4", "--train-scenes", "8", "--test-scenes", "4"]


def test_train_eval_distill(tmp_path):
    ckpt = tmp_path / "s.safetensors"
    result = runner.invoke(app, ["train", "--role", "student", "--output", str(ckpt), *TOY])
    assert result.exit_code == 0, result.output
    assert ckpt.is_file() and json.loads((tmp_path / "s.safetensors.json").read_text())["role"] == "student"
    metrics = tmp_path / "m.json"
    result = runner.invoke(
        app, ["eval", str(ckpt), "--split", "val", "--scenes", "4", "--json", str(metrics)]
    )
    assert result.exit_code == 0, result.output
    assert set(json.loads(metrics.read_text())) == {"mAP", "AP50", "AP75"}
    out = tmp_path / "d.safetensors"
    result = runner.invoke(
        app, ["distill", "--teacher", str(ckpt), "--method", "bckd", "--output", str(out), *TOY]
    )
    assert result.exit_code == 0, result.output
    assert out.is_file()


def test_bad_inputs_name_argument(tmp_path):
    result = runner.invoke(
        app, ["distill", "--teacher", str(tmp_path / "none.safetensors"), "--method", "fitnet"]
    )
    assert result.exit_code == 2 and "method" in result.output and "fitnet" in result.output
    result = runner.invoke(app, ["distill", "--teacher", str(tmp_path / "none.safetensors")])
    assert result.exit_code == 2 and "teacher" in result.output and "none.safetensors" in result.output
    result = runner.invoke(app, ["eval", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 2 and "checkpoint" in result.output
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["eval", str(bogus)])
    assert result.exit_code == 2 and "checkpoint" in result.output
    result = runner.invoke(app, ["train", "--role", "giant"])
    assert result.exit_code == 2 and "role" in result.output


def test_yaml_recipe_matches_defaults():
    path = Path(__file__).parents[2] / "configs" / "detection.yaml"
    assert CompareConfig.from_dict(yaml.safe_load(path.read_text())) == CompareConfig()
    with pytest.raises(ValueError, match="config"):
        CompareConfig.from_dict({"epochs": 3})
    with pytest.raises(ValueError, match="methods"):
        CompareConfig.from_dict({"methods": ["bckd", "fitnet"]})
