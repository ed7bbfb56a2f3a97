import json

import numpy as np
import pytest

from moevl.analysis import mean_std, summarize, write_report

FAMILIES = ["position", "count"]


def _eval(acc):
    return {"accuracy": dict(zip(FAMILIES, acc, strict=True)), "overall": float(np.mean(acc)),
            "chance": {"position": 0.3, "count": 0.5}, "count": {"position": 10, "count": 10}, "examples": []}  # fmt: skip


def _stats(conflict, tail):
    history = []
    for step in range(1, 9):
        h = {
            "step": step,
            "stgc/conflict_ratio": conflict,
            "stgc/cosine_mean": 0.1,
            "moe/experts_per_token": 2.0,
        }
        if tail is not None:
            h["ltdr/tail_share"] = tail
        history.append(h)
    return {"history": history, "expert_load": {"1": {"vision": [5, 1, 1, 1], "text": [2, 2, 2, 2]}}}


@pytest.fixture
def results():
    runs = {
        "baseline": {"0": (0.5, 0.6, 0.2, None), "1": (0.7, 0.6, 0.4, None)},
        "ltdr": {"0": (0.8, 0.7, 0.1, 0.13), "1": (0.8, 0.9, 0.1, 0.15)},
    }
    methods = {
        m: {
            "runs": {
                s: {"train_time_s": 10.0, "eval": _eval(v[:2]), "moe_stats": _stats(v[2], v[3])}
                for s, v in r.items()
            }
        }
        for m, r in runs.items()
    }
    return {"config": {"compare": {"seeds": 2}}, "wall_time_s": 123.0,
            "dense": {"stage1_time_s": 1.0, "stage2_time_s": 2.0, "eval": _eval([0.6, 0.6])}, "methods": methods}  # fmt: skip


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(np.sqrt(2.0)))
    assert mean_std([4.0]) == (4.0, 0.0)


def test_summary_over_seeds(results):
    s = summarize(results)
    assert s["baseline"]["accuracy"]["position"] == (
        pytest.approx(0.6),
        pytest.approx(np.std([0.5, 0.7], ddof=1)),
    )
    assert s["ltdr"]["tail_share"][0] == pytest.approx(0.14)
    assert s["baseline"]["tail_share"] is None  # absent statistic, not a zero
    assert s["baseline"]["conflict_ratio"][0] == pytest.approx(0.3)


def test_report_files(results, tmp_path):
    write_report(results, tmp_path)
    for name in (
        "report.md",
        "results.json",
        "accuracy.png",
        "conflicts.png",
        "expert_load.png",
        "tail_share.png",
    ):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "report.md").read_text()
    assert "| baseline | 60.0 ± 14.1 | 60.0 ± 0.0 |" in text
    assert "| ltdr |" in text and "n/a" in text and "Wall time: 123 s" in text
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["methods"]["ltdr"]["summary"]["seeds"] == 2
