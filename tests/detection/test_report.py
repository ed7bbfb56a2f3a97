"""The detection comparison report: one seed shows values alone, two show mean ± std; method colours
are the shared ones; files are complete; the result is not changed (issue 12)."""

from __future__ import annotations

import copy
import json

import matplotlib
import pytest
import torch

from moevl.analysis.display import method_color
from moevl.detection import report as report_module
from moevl.detection.data import make_digit_scenes
from moevl.detection.model import GFLDetector
from moevl.detection.recipe import STUDENT, ComparisonResult, DetectionCompareConfig
from moevl.detection.report import summarize, write_detection_report

METHODS = ("none", "bckd")


def _result(seeds: tuple[int, ...]) -> ComparisonResult:
    torch.manual_seed(0)
    model = GFLDetector(STUDENT)
    maps = {("none", 0): 0.30, ("none", 1): 0.34, ("bckd", 0): 0.40, ("bckd", 1): 0.36}
    runs = [
        {"method": m, "seed": s, "mAP": maps[m, s], "AP50": 0.5, "AP75": 0.25, "seconds": 1.0, "params": 10}
        for s in seeds
        for m in METHODS
    ]
    teacher = {"mAP": 0.5, "AP50": 0.7, "AP75": 0.5, "seconds": 2.0, "params": 100, "source": "test"}
    config = DetectionCompareConfig(seeds=seeds, methods=METHODS)
    models = {"teacher": model, "none": model, "bckd": model}
    return ComparisonResult(config, teacher, runs, 3.0, models, make_digit_scenes("test", 2))


def test_summary_over_seeds():
    summary = summarize(_result((0, 1)))
    assert summary["bckd"]["mAP"]["mean"] == pytest.approx(0.38)
    assert summary["bckd"]["mAP"]["std"] == pytest.approx(0.02828427, rel=1e-5)
    assert summary["none"]["mAP"]["values"] == [0.30, 0.34]


def test_one_seed_shows_values_alone_and_two_show_spread(tmp_path):
    write_detection_report(_result((0,)), tmp_path / "one")
    table = (tmp_path / "one" / "bckd.md").read_text().split("Methods")[0]
    assert "±" not in table and "| student + bckd | 40.0 | 50.0 | 25.0 |" in table and "one seed" in table
    write_detection_report(_result((0, 1)), tmp_path / "two")
    table = (tmp_path / "two" / "bckd.md").read_text().split("Methods")[0]
    assert "| student + bckd | 38.0 ± 2.8 | 50.0 ± 0.0 | 25.0 ± 0.0 |" in table


def test_report_files_colours_and_input_untouched(tmp_path, monkeypatch):
    drawn = {}
    real = report_module.atomic_savefig

    def savefig(fig, path, **kwargs):
        ax = fig.axes[0]
        bars = [
            p for c in ax.containers if isinstance(c, matplotlib.container.BarContainer) for p in c.patches
        ]
        drawn[path.name] = ([matplotlib.colors.to_hex(b.get_facecolor()) for b in bars], ax.get_ylabel())
        return real(fig, path, **kwargs)

    monkeypatch.setattr(report_module, "atomic_savefig", savefig)
    result = _result((0, 1))
    before = (copy.deepcopy(result.runs), copy.deepcopy(result.teacher), result.config)
    paths = write_detection_report(result, tmp_path)
    assert (result.runs, result.teacher, result.config) == before
    colors, ylabel = drawn["bckd_map.png"]
    assert colors == [method_color(m) for m in METHODS] and "%" in ylabel
    assert paths["predictions"].read_bytes()[:4] == b"\x89PNG"
    saved = json.loads(paths["json"].read_text())
    assert saved["config"]["methods"] == list(METHODS) and len(saved["runs"]) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())
