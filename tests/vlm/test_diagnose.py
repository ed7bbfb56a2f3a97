"""``moevl diagnose`` on the tiny demo model: what it measures adds up, and the checkpoint is unchanged."""

import hashlib
import json

import pytest
from typer.testing import CliRunner

from moevl.cli import app
from moevl.vlm.diagnose import PREMISE, LayerDiagnosis, condition_lines, verdict
from tests.fixtures.demo import TINY


def _layer(std, clear, persistence, chance, mean=0.0):
    return LayerDiagnosis(-1, 0.4, 0.3, 0.5, mean, std, clear, persistence, chance, 0.9, [], [], [])


def test_verdict_follows_the_three_thresholds():
    holds, met = verdict(_layer(0.3, 0.2, 0.6, 0.3))
    assert holds.startswith("STGC's premise holds:") and all(met.values())
    near_zero, met = verdict(_layer(0.07, 0.05, 0.45, 0.4))  # the digit benchmark's kind of numbers
    assert near_zero.startswith("STGC's premise does not hold: few conflicts") and not any(met.values())
    assert "cosines sit near 0" in near_zero and "nothing for STGC to act on" in near_zero
    # aligned tokens whose (few) flags persist perfectly: the reason is the missing conflicts, not noise
    aligned, met = verdict(_layer(0.12, 0.002, 1.0, 0.002, mean=0.3))
    assert "aligned" in aligned and "nothing for STGC to act on" in aligned and "noise" not in aligned
    assert met == {"cosine_std": False, "clear_conflict_share": False, "persistence_lift": True}
    lines = condition_lines(_layer(0.12, 0.002, 1.0, 0.002, mean=0.3))
    assert lines == [
        "cosine std 0.120, needs >= 0.15: not met",
        "share of pairs below -0.1 0.002, needs >= 0.1: not met",
        "flag persistence above chance 0.998 (1.000 vs chance 0.002), needs >= 0.1: met",
    ]
    noise, met = verdict(_layer(0.3, 0.2, 0.35, 0.3))  # clear conflicts, flags at chance
    assert "no better than chance" in noise and "noise" in noise and met["clear_conflict_share"]
    part, met = verdict(_layer(0.1, 0.2, 0.6, 0.3))  # clear and persistent, narrow spread
    assert part.startswith("STGC's premise holds in part") and met == {
        "cosine_std": False,
        "clear_conflict_share": True,
        "persistence_lift": True,
    }
    unflagged, met = verdict(_layer(0.3, 0.2, None, None))  # no flags: persistence cannot be measured
    assert "no pair was flagged" in unflagged and not met["persistence_lift"]
    assert condition_lines(_layer(0.3, 0.2, None, None))[2].startswith("flag persistence above chance n/a")
    edge = PREMISE["cosine_std"]
    assert verdict(_layer(edge, 0.2, 0.6, 0.3))[1]["cosine_std"]  # at the threshold counts as met


def test_diagnose_measures_without_changing_the_checkpoint(demo, dense, tmp_path):
    _, s2 = dense
    weights = sorted(s2.model_dir.glob("*.safetensors"))
    before = [hashlib.sha256(w.read_bytes()).hexdigest() for w in weights]
    out = tmp_path / "diag"
    args = ["diagnose", "--model", str(s2.model_dir), "--data", str(demo.files.instruct), "--image-folder",
            str(demo.files.image_folder), "--steps", "3", "--batch-size", "8", "--out", str(out),
            "--config", str(TINY), "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "premise" in result.output and (out / "cosines.png").stat().st_size > 0
    assert [hashlib.sha256(w.read_bytes()).hexdigest() for w in weights] == before
    d = json.loads((out / "diagnosis.json").read_text())
    assert d["moe"] == "upcycled" and d["steps"] == 3 and d["probe_records"] == 8
    assert [layer["layer"] for layer in d["layers"]] == [0]  # tiny model: 2 layers, alternate -> [0]
    for layer in [*d["layers"], d["overall"]]:
        counts, flagged = layer["histogram_counts"], layer["histogram_flagged"]
        assert sum(counts) > 0 and all(f <= c for f, c in zip(flagged, counts, strict=True))
        assert layer["conflict_ratio"] == pytest.approx(sum(flagged) / sum(counts))
        assert -1 <= layer["cosine_mean"] <= 1 and 0 <= layer["clear_conflict_share"] <= 1
        # a weighted mean of its vision and text parts (the demo's records have both)
        low, high = sorted((layer["vision_conflict_ratio"], layer["text_conflict_ratio"]))
        assert low <= layer["conflict_ratio"] <= high
    # one layer: its persistence is the overall one
    assert d["overall"]["persistence"] == pytest.approx(d["layers"][0]["persistence"])
    assert d["premise"]["verdict"].startswith("STGC's premise")


def test_diagnose_refuses_bad_options(demo, dense, tmp_path):
    _, s2 = dense
    base = [
        "diagnose",
        "--model",
        str(s2.model_dir),
        "--data",
        str(demo.files.instruct),
        "--out",
        str(tmp_path),
    ]
    result = CliRunner().invoke(app, [*base, "--steps", "1"])
    assert result.exit_code == 2 and "--steps" in result.output
    result = CliRunner().invoke(app, [*base[:2], str(tmp_path / "missing"), *base[3:]])
    assert result.exit_code == 2 and "model directory not found" in result.output
