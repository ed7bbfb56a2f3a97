"""The command line as a user meets it: help, one-line errors, and the main job end to end (tiny)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moevl.cli import app

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "eval", "export", "compare", "detect"):
        assert command in result.output


def test_bad_recipe_and_bad_paths_are_one_line_errors(tmp_path):
    result = runner.invoke(
        app, ["train", "--stage", "1", "--config", TINY, "--out", str(tmp_path / "o"), "--set", "moe.top_k=9"]
    )
    assert result.exit_code == 2 and "top_k" in result.output and "got 9" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()
    result = runner.invoke(
        app, ["train", "--stage", "1", "--out", str(tmp_path / "o"), "--set", "moe.stgc.weight=.inf"]
    )
    assert result.exit_code == 2 and "'moe.stgc.weight' must be a finite number" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1:\n  batchsize: 3\n")
    result = runner.invoke(app, ["compare", "--config", str(bad), "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "unknown config key 'stage1.batchsize'" in result.output
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "nothing"), "--data", str(bad)])
    assert result.exit_code == 2 and "model directory not found" in result.output
    result = runner.invoke(
        app, ["train", "--stage", "2", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]
    )
    assert (
        result.exit_code == 2
        and "model directory not found" in result.output
        and not (tmp_path / "x").exists()
    )
    result = runner.invoke(app, ["train", "--stage", "1", "--method", "stgc", "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "only stage 3" in result.output


@pytest.mark.slow
def test_compare_then_eval_and_export_end_to_end(tmp_path):
    out = tmp_path / "run"
    args = [
        "compare",
        "--config",
        TINY,
        "--out",
        str(out),
        "--methods",
        "baseline,stgc+ltdr",
        "--no-progress",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("report.md", "results.json", "accuracy.png", "expert_load.png", "conflicts.png"):
        assert (out / name).is_file(), name
    for name in ("captions.json", "instruct.json", "validation.json", "test.json"):
        assert (out / "data" / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"baseline", "stgc+ltdr"}
    stgc_ltdr = out / "moe" / "stgc_ltdr" / "seed0"
    evaluation = tmp_path / "eval.json"
    result = runner.invoke(
        app,
        ["eval", "--model", str(stgc_ltdr), "--data", str(out / "data" / "validation.json"),
         "--image-folder", str(out / "data"), "--out", str(evaluation), "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "overall" in result.output
    payload = json.loads(evaluation.read_text())
    predictions = (tmp_path / "eval.predictions.jsonl").read_text().splitlines()
    assert payload["count"] == len(predictions) > 0
    hits = sum(json.loads(line)["correct"] for line in predictions)
    assert abs(payload["overall"] - hits / len(predictions)) < 1e-9
    # an LTDR model has no exact native class: the moevl format, with the reason
    result = runner.invoke(app, ["export", "--model", str(stgc_ltdr), "--out", str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("moevl:")
    result = runner.invoke(
        app, ["export", "--model", str(stgc_ltdr), "--out", str(tmp_path / "e2"), "--require-native"]
    )
    assert result.exit_code == 2 and "no exact native class" in result.output
    # a second compare reuses the written data and the dense stages
    result = runner.invoke(app, [*args[:-3], "--methods", "baseline", "--no-progress"])
    assert (
        result.exit_code == 0 and "stage 1: reusing" in result.output and "stage 2: reusing" in result.output
    )


def test_help_and_argument_errors_answer_before_torch_loads():
    """`moevl --help` and wrong arguments answer at once: nothing heavy is imported before they are checked."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from moevl.cli import app\n"
        "runs = [['--help'], ['train', '--help'], ['train', '--stage', '7', '--out', 'x'],\n"
        "        ['train', '--stage', '2', '--out', 'x', '--model', '/nonexistent/ckpt'],\n"
        "        ['detect', 'train', '--role', 'king']]\n"
        "print([CliRunner().invoke(app, args).exit_code for args in runs], 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.split("\n")[0] == "[0, 0, 2, 2, 2] False", done.stdout + done.stderr


def test_help_names_what_an_option_takes_in_words():
    """It showed ``--set <list[str]>`` and ``moevl detect eval [OPTIONS] {checkpoint}``."""
    for command in (["train"], ["eval"], ["diagnose"], ["compare"], ["detect", "compare"]):
        result = CliRunner().invoke(app, [*command, "--help"])
        assert "--set KEY=VALUE" in result.output and "list[str]" not in result.output, command
    result = CliRunner().invoke(app, ["detect", "eval", "--help"])
    assert result.output.split("\n")[0].endswith(" detect eval [OPTIONS] CHECKPOINT")


def test_help_text_is_whole_when_piped():
    """Option help is wrapped, never cut to fit a table ("json/jsonl/parque…" before)."""
    result = CliRunner().invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "json/jsonl/parquet" in result.output and "…" not in result.output
