"""`moevl detect` commands end to end at toy sizes, and their errors on bad input: one line naming the
option or file, exit 2, no traceback, and nothing trained when an output path is bad (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from moevl.detection import cli
from moevl.detection.cli import app
from moevl.detection.data import make_digit_scenes
from moevl.detection.model import DetectorConfig, GFLDetector
from moevl.detection.recipe import STUDENT, DetectionCompareConfig, DetectionDataConfig, load_detection_config
from moevl.detection.train import save_checkpoint

runner = CliRunner()
TOY = ["--steps", "2", "--batch-size", "4", "--train-scenes", "8", "--test-scenes", "4"]
# A comparison in seconds: tiny teacher, one step each, one seed, two methods.
TOY_COMPARE = [
    "--teacher-steps", "1", "--student-steps", "1", "--seeds", "1", "--train-scenes", "4",
    "--test-scenes", "2", "--set", "batch_size=2", "--set", "methods=[none, bckd]",
    "--set", "teacher.stage_widths=[8, 16, 32]", "--set", "teacher.stage_depth=1",
]  # fmt: skip


def _one_line_error(result, *needles: str) -> str:
    """The command failed with exit 2 and one ``error:`` line on stderr naming every needle."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if a command starts training (or the teacher's outputs) after all."""
    calls = []

    def record(*args, **kwargs):
        calls.append(args)
        raise AssertionError("training started although the command should have failed first")

    # the commands import these when they run (so that --help and option errors never load torch)
    monkeypatch.setattr("moevl.detection.train.train_detector", record)
    monkeypatch.setattr("moevl.detection.recipe.run_comparison", record)
    return calls


@pytest.fixture
def student_checkpoint(tmp_path):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "teacher.safetensors", GFLDetector(STUDENT), extra={"role": "student"})


def test_train_eval_distill(tmp_path):
    ckpt = tmp_path / "s.safetensors"
    result = runner.invoke(app, ["train", "--role", "student", "--output", str(ckpt), *TOY])
    assert result.exit_code == 0, result.output
    assert ckpt.is_file() and json.loads((tmp_path / "s.safetensors.json").read_text())["role"] == "student"
    metrics = tmp_path / "sub" / "m.json"
    result = runner.invoke(
        app, ["eval", str(ckpt), "--split", "validation", "--scenes", "4", "--json", str(metrics)]
    )
    assert result.exit_code == 0, result.output
    assert set(json.loads(metrics.read_text())) == {"mAP", "AP50", "AP75"}
    out = tmp_path / "d.safetensors"
    result = runner.invoke(
        app, ["distill", "--teacher", str(ckpt), "--method", "bckd", "--output", str(out), *TOY]
    )
    assert result.exit_code == 0, result.output
    assert out.is_file()
    assert not list(tmp_path.rglob("*.tmp"))


def test_bad_inputs_name_argument(tmp_path):
    result = runner.invoke(
        app, ["distill", "--teacher", str(tmp_path / "none.safetensors"), "--method", "fitnet"]
    )
    _one_line_error(result, "--method", "fitnet")
    result = runner.invoke(app, ["distill", "--teacher", str(tmp_path / "none.safetensors")])
    _one_line_error(result, "--teacher", "none.safetensors")
    result = runner.invoke(app, ["eval", str(tmp_path / "missing.safetensors")])
    _one_line_error(result, "checkpoint", "missing.safetensors")
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    _one_line_error(runner.invoke(app, ["eval", str(bogus)]), "checkpoint", "bogus.safetensors")
    _one_line_error(runner.invoke(app, ["train", "--role", "giant"]), "--role", "giant")


def test_split_vocabulary_is_validation(student_checkpoint):
    line = _one_line_error(runner.invoke(app, ["eval", str(student_checkpoint), "--split", "val"]), "--split")
    assert "validation" in line


def test_corrupt_checkpoint_metadata_is_one_line(tmp_path):
    path = tmp_path / "corrupt.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"moevl": "{not json"})
    _one_line_error(runner.invoke(app, ["eval", str(path)]), "checkpoint", "corrupt.safetensors")
    path2 = tmp_path / "wrong.safetensors"
    save_file({"w": torch.zeros(1)}, str(path2), metadata={"moevl": json.dumps({"detector_config": {}})})
    _one_line_error(runner.invoke(app, ["eval", str(path2)]), "checkpoint", "wrong.safetensors")


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        ("train", "--lr", "-1"),
        ("train", "--lr", "0"),
        ("train", "--lr", "nan"),
        ("train", "--lr", "inf"),
        ("train", "--steps", "0"),
        ("train", "--batch-size", "-3"),
        ("train", "--seed", "-1"),
        ("train", "--train-scenes", "0"),
        ("distill", "--lr", "-inf"),
        ("distill", "--test-scenes", "0"),
        ("compare", "--seeds", "0"),
        ("compare", "--seeds", "100000000"),
        ("compare", "--threads", "0"),
        ("compare", "--teacher-steps", "-5"),
    ],
)
def test_bad_numbers_name_the_option(command, option, value, no_training, student_checkpoint, tmp_path):
    extra = ["--teacher", str(student_checkpoint)] if command == "distill" else []
    extra += ["--out-dir", str(tmp_path / "report")] if command == "compare" else []
    result = runner.invoke(app, [command, *extra, option, value])
    _one_line_error(result, option, value)
    assert not no_training


def test_eval_bad_scenes_and_unwritable_json(student_checkpoint, tmp_path, monkeypatch):
    _one_line_error(runner.invoke(app, ["eval", str(student_checkpoint), "--scenes", "0"]), "--scenes")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    evaluated = []
    monkeypatch.setattr("moevl.detection.evaluation.evaluate_detector", lambda *a: evaluated.append(a) or {})
    for target in (blocker / "m.json", tmp_path):  # under a file; an existing directory
        result = runner.invoke(app, ["eval", str(student_checkpoint), "--scenes", "2", "--json", str(target)])
        _one_line_error(result, "--json", str(target))
    assert not evaluated  # checked before the evaluation, not after it


@pytest.mark.parametrize("command", ["train", "distill"])
def test_bad_output_fails_before_training(command, no_training, student_checkpoint, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    extra = ["--teacher", str(student_checkpoint)] if command == "distill" else []
    for output in (blocker / "m.safetensors", tmp_path):  # under a file; an existing directory
        result = runner.invoke(app, [command, *extra, "--output", str(output), *TOY])
        _one_line_error(result, "--output", str(output))
    # The JSON sidecar's path is an output too.
    (tmp_path / "m.safetensors.json").mkdir()
    result = runner.invoke(app, [command, *extra, "--output", str(tmp_path / "m.safetensors"), *TOY])
    _one_line_error(result, "--output", "m.safetensors.json")
    assert not no_training


def test_distill_refuses_a_teacher_with_other_anchors(no_training, tmp_path):
    path = save_checkpoint(tmp_path / "t.safetensors", GFLDetector(DetectorConfig(stage_widths=(8, 16))))
    result = runner.invoke(
        app, ["distill", "--teacher", str(path), "--output", str(tmp_path / "s.safetensors")]
    )
    _one_line_error(result, "--teacher", "strides")
    assert not no_training


def test_compare_checks_outputs_and_recipe_before_training(no_training, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = runner.invoke(app, ["compare", "--out-dir", str(blocker)])
    _one_line_error(result, "--out-dir", str(blocker))
    result = runner.invoke(
        app, ["compare", "--out-dir", str(tmp_path), "--checkpoint-dir", str(blocker / "c")]
    )
    _one_line_error(result, "--checkpoint-dir")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 0.1\nlr: 0.2\n")
    _one_line_error(runner.invoke(app, ["compare", "--config", str(recipe)]), "duplicate key 'lr'")
    _one_line_error(runner.invoke(app, ["compare", "--set", "lr=.nan"]), "lr")
    _one_line_error(runner.invoke(app, ["compare", "--set", "methods=[bckd, bckd]"]), "methods")
    _one_line_error(runner.invoke(app, ["compare", "--set", "epochs=3"]), "epochs")
    assert not no_training


def test_compare_default_output_is_under_runs(tmp_path, monkeypatch):
    """Defect 5: the default report folder is under runs/, never the committed bench/results/."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["compare", *TOY_COMPARE])
    assert result.exit_code == 0, result.output
    report = tmp_path / "runs" / "detection" / "compare"
    assert {p.name for p in report.iterdir()} == {
        "bckd.json",
        "bckd.md",
        "bckd_map.png",
        "bckd_predictions.png",
    }
    assert not (tmp_path / "bench").exists()
    assert (tmp_path / "runs" / "detection" / "teacher.safetensors").is_file()
    saved = json.loads((report / "bckd.json").read_text())
    assert saved["config"]["methods"] == ["none", "bckd"] and saved["config"]["seeds"] == [0]
    # One seed: the values alone, no "± 0.0".
    assert "±" not in (report / "bckd.md").read_text().split("Methods")[0]


def test_yaml_recipe_matches_defaults():
    path = Path(__file__).parents[2] / "configs" / "detection.yaml"
    assert load_detection_config(path) == DetectionCompareConfig()
    assert DetectionCompareConfig.from_dict(DetectionCompareConfig().to_dict()) == DetectionCompareConfig()
    with pytest.raises(ValueError, match="epochs"):
        DetectionCompareConfig.from_dict({"epochs": 3})
    with pytest.raises(ValueError, match="methods"):
        DetectionCompareConfig.from_dict({"methods": ["bckd", "fitnet"]})
    # Only the keys written change; a section merges onto its default (the teacher keeps its depth).
    config = load_detection_config(None, ["teacher.neck_width=8", "data.image_size=32"])
    assert config.teacher.neck_width == 8 and config.teacher.stage_depth == 2 and config.data.image_size == 32


class _Seen(Exception):
    """Raised by a stand-in once it has recorded what the command passed it."""


def test_defaults_are_the_recipes(monkeypatch, student_checkpoint, tmp_path):
    """Options left out take the comparison recipe's values (configs/detection.yaml): change the recipe and
    every command follows, so the commands' defaults and the recipe cannot drift apart."""
    assert cli._recipe() == load_detection_config(Path(__file__).parents[2] / "configs" / "detection.yaml")
    data = DetectionDataConfig(train_scenes=11, test_scenes=13, image_size=32)
    recipe = DetectionCompareConfig(data=data, teacher_steps=9, student_steps=7, batch_size=5, lr=0.01)
    monkeypatch.setattr(cli, "_recipe", lambda: recipe)
    seen: list = []
    tiny = make_digit_scenes("train", 2, image_size=32)

    def load_scenes(data):
        seen.append(data)
        return tiny, tiny

    def train_detector(model, scenes, *, config, **kwargs):
        seen.append(config)
        raise _Seen

    def make_scenes(split, num_scenes, *, image_size):
        seen.append((num_scenes, image_size))
        raise _Seen

    monkeypatch.setattr("moevl.detection.recipe.load_scenes", load_scenes)
    monkeypatch.setattr("moevl.detection.train.train_detector", train_detector)
    monkeypatch.setattr("moevl.detection.data.make_digit_scenes", make_scenes)
    out = ["--output", str(tmp_path / "m.safetensors")]
    commands = {
        "teacher": ["train", "--role", "teacher", *out],
        "student": ["train", "--role", "student", *out],
        "distill": ["distill", "--teacher", str(student_checkpoint), *out],
        "given": ["train", "--steps", "3", "--lr", "0.5", "--test-scenes", "4", *out],
    }
    schedules = {}
    for name, args in commands.items():
        seen.clear()
        assert isinstance(runner.invoke(app, args).exception, _Seen), name
        (scenes, schedules[name]) = seen
        expected = (
            data if name != "given" else DetectionDataConfig(train_scenes=11, test_scenes=4, image_size=32)
        )
        assert scenes == expected, name
    assert [schedules[n].steps for n in commands] == [9, 7, 7, 3]
    assert [schedules[n].batch_size for n in commands] == [5, 5, 5, 5]
    assert [schedules[n].lr for n in commands] == [0.01, 0.01, 0.01, 0.5]
    seen.clear()
    assert isinstance(runner.invoke(app, ["eval", str(student_checkpoint)]).exception, _Seen)
    assert seen == [(13, 32)]
