"""The comparison report: summaries over seeds, files, and issue 12's defects (one seed shows no
"± 0.0", one colour per method across figures, no empty tail-share panel, accuracy in %, input untouched)."""

import copy
import json
import warnings

import matplotlib
import numpy as np
import pytest

from moevl.analysis import report as report_module
from moevl.analysis import summarize, write_report
from moevl.analysis.display import MeanStd, format_mean_std, mean_std, method_color

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
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(np.sqrt(2.0)), 2)
    assert mean_std([4.0]) == MeanStd(4.0, 0.0, 1)
    assert mean_std([]).n == 0


def test_format_mean_std_shows_one_seed_alone():
    assert format_mean_std(MeanStd(0.5, 0.1, 2), scale=100) == "50.0 ± 10.0"
    assert format_mean_std(MeanStd(0.5, 0.0, 1), scale=100) == "50.0"
    assert format_mean_std(MeanStd(0.1234, 0.0, 1), digits=3) == "0.123"
    assert format_mean_std(None) == format_mean_std(mean_std([])) == "n/a"


def test_summary_over_seeds(results):
    s = summarize(results)
    assert s["baseline"]["accuracy"]["position"] == (
        pytest.approx(0.6),
        pytest.approx(np.std([0.5, 0.7], ddof=1)),
        2,
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
    assert saved["plots"]["tail_share"] == "tail_share.png"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_write_report_does_not_change_its_input(results, tmp_path):
    before = copy.deepcopy(results)
    write_report(results, tmp_path)
    assert results == before


def _one_seed(results):
    for entry in results["methods"].values():
        entry["runs"] = {"0": entry["runs"]["0"]}
    results["config"]["compare"]["seeds"] = 1
    return results


def test_one_seed_tables_show_values_alone(results, tmp_path):
    write_report(_one_seed(results), tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "±" not in text
    assert "| baseline | 50.0 | 60.0 | 55.0 |" in text
    assert "one seed" in text


class _Recorder:
    """Records what the report draws: per figure file, the colour of each labelled line or bar, the
    y limits and y label of each axis."""

    def __init__(self, monkeypatch):
        self.figures = {}
        real = report_module.atomic_savefig

        def savefig(fig, path, **kwargs):
            axes = []
            for ax in fig.axes:
                colors = {}
                for line in ax.get_lines():
                    colors[line.get_label()] = matplotlib.colors.to_hex(line.get_color())
                for container in ax.containers:
                    if isinstance(container, matplotlib.container.BarContainer) and container.get_label():
                        colors[container.get_label()] = matplotlib.colors.to_hex(
                            container.patches[0].get_facecolor()
                        )
                axes.append(
                    {
                        "title": ax.get_title(),
                        "colors": colors,
                        "ylim": ax.get_ylim(),
                        "ylabel": ax.get_ylabel(),
                    }
                )
            self.figures[path.name] = axes
            return real(fig, path, **kwargs)

        monkeypatch.setattr(report_module, "atomic_savefig", savefig)


def test_method_colours_are_the_same_in_every_figure(results, tmp_path, monkeypatch):
    recorder = _Recorder(monkeypatch)
    # A third method, drawn in a different order in different figures, keeps its colour too.
    results["methods"] = {"zeta": copy.deepcopy(results["methods"]["baseline"]), **results["methods"]}
    write_report(results, tmp_path)
    seen: dict[str, set] = {}
    for axes in recorder.figures.values():
        for ax in axes:
            for label, color in ax["colors"].items():
                seen.setdefault(label, set()).add(color)
    for method in ("baseline", "ltdr", "zeta"):
        assert seen[method] == {matplotlib.colors.to_hex(method_color(method))}, method
    assert len({method_color(m) for m in ("dense", "baseline", "stgc", "ltdr", "stgc+ltdr")}) == 5


def test_tail_share_panel_is_omitted_without_ltdr(results, tmp_path, monkeypatch):
    recorder = _Recorder(monkeypatch)
    del results["methods"]["ltdr"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels found" would fail here
        write_report(results, tmp_path)
    titles = [ax["title"] for ax in recorder.figures["tail_share.png"]]
    assert titles == ["experts per token"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["methods"]["baseline"]["summary"]["tail_share"] is None


def test_accuracy_axis_is_in_percent(results, tmp_path, monkeypatch):
    recorder = _Recorder(monkeypatch)
    write_report(results, tmp_path)
    (ax,) = recorder.figures["accuracy.png"]
    assert "%" in ax["ylabel"] and ax["ylim"][1] > 100


def test_router_health_is_reported_and_flat_routers_are_named(results, tmp_path):
    import copy

    data = copy.deepcopy(results)
    for method, entropy in (("baseline", 0.90), ("ltdr", 0.99)):
        for run in data["methods"][method]["runs"].values():
            for h in run["moe_stats"]["history"]:
                h["router/entropy_normalized"] = entropy
                h["router/top1_prob"] = 0.4
    report = write_report(data, tmp_path).read_text()
    assert "## Router health" in report
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    assert "0.900" in rows["baseline"] and "0.990" in rows["ltdr"]
    warning = next(line for line in report.splitlines() if line.startswith("**Warning:**"))
    assert "ltdr" in warning and "baseline" not in warning
    assert (tmp_path / "router_health.png").is_file()
