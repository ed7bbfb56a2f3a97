from pathlib import Path

from typer.testing import CliRunner

from moevl.cli import app

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "eval", "compare", "detect"):
        assert command in result.output


def test_bad_config_is_a_clear_error(tmp_path):
    result = runner.invoke(
        app, ["train", "--stage", "1", "--config", TINY, "--out", str(tmp_path), "--set", "moe.top_k=9"]
    )
    assert result.exit_code == 2
    assert "moe.top_k" in result.output and "got 9" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1:\n  batchsize: 3\n")
    result = runner.invoke(app, ["compare", "--config", str(bad), "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "unknown config key 'stage1.batchsize'" in result.output


def test_missing_checkpoint_and_unwritable_output(tmp_path):
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "model directory not found" in result.output
    (tmp_path / "f").write_text("")
    result = runner.invoke(
        app, ["train", "--stage", "1", "--config", TINY, "--out", str(tmp_path / "f" / "o")]
    )
    assert result.exit_code == 2 and "not writable" in result.output


def test_compare_end_to_end_on_tiny(tmp_path):
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
    result = runner.invoke(
        app, ["eval", "--model", str(out / "moe" / "stgc_ltdr" / "seed0"), "--split", "validation"]
    )
    assert result.exit_code == 0, result.output
    assert "overall" in result.output
