"""write_llava_task: LLaVA-format JSON -> a local lmms-eval task (JSONL + YAML); no lmms-eval needed."""

from __future__ import annotations

import json

import pytest
import yaml

from moevl.integrations.lmms_tasks import (
    doc_to_target,
    doc_to_text,
    process_results,
    write_llava_task,
)


class _TaskLoader(yaml.SafeLoader):
    """Reads ``!function`` tags as their dotted names (lmms-eval imports them instead)."""


_TaskLoader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))


def _write(tmp_path, records, images=("a.png", "b.png")):
    for name in images:
        (tmp_path / name).write_bytes(b"png")  # only existence is checked when writing the task
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(records))
    return path


def _rows(yaml_path):
    task = yaml.load(yaml_path.read_text(), Loader=_TaskLoader)
    data = task["dataset_kwargs"]["data_files"]["test"]
    return task, [json.loads(line) for line in open(data)]


def test_records_become_rows_and_a_task(tmp_path):
    records = [
        {
            "id": 7,
            "image": "a.png",
            "conversations": [
                {"from": "system", "value": "be brief"},
                {"from": "human", "value": "<image>\nwhat is it"},
                {"from": "gpt", "value": "a cat"},
                {"from": "human", "value": "how many"},
                {"from": "gpt", "value": "Two."},
            ],
        },
        {
            "image": ["a.png", "b.png"],
            "messages": [
                {"role": "user", "content": "left <image> right <image> same?"},
                {"role": "assistant", "content": "no"},
            ],
        },
        {"conversations": [{"from": "human", "value": "no image here"}, {"from": "gpt", "value": "ok"}]},
    ]
    data = _write(tmp_path, records)
    path = write_llava_task(data, tmp_path / "tasks", task_name="my.vqa-1", max_new_tokens=5)

    assert path == tmp_path / "tasks" / "my.vqa-1.yaml"
    task, rows = _rows(path)
    assert rows == [
        {"id": "7", "images": [str(tmp_path / "a.png")], "question": "how many", "answer": "Two."},
        {
            "id": "1",
            "images": [str(tmp_path / "a.png"), str(tmp_path / "b.png")],
            "question": "left <image> right <image> same?",
            "answer": "no",
        },
        {"id": "2", "images": [], "question": "no image here", "answer": "ok"},
    ]
    assert task["task"] == "my.vqa-1"
    assert task["dataset_path"] == "json" and task["test_split"] == "test"
    assert task["output_type"] == "generate_until"
    assert task["generation_kwargs"] == {"max_new_tokens": 5, "temperature": 0, "do_sample": False}
    assert task["metric_list"] == [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]
    for key in ("doc_to_visual", "doc_to_text", "doc_to_target", "process_results"):
        assert task[key] == ("function", f"moevl.integrations.lmms_tasks.{key}")
    assert doc_to_text(rows[1]) == "left <image> right <image> same?"
    assert doc_to_target(rows[0]) == "Two."


def test_image_folder_and_rewrite(tmp_path):
    (tmp_path / "imgs").mkdir()
    data = _write(
        tmp_path / "imgs",
        [
            {
                "image": "a.png",
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
            }
        ],
        images=("a.png",),
    )
    moved = tmp_path / "eval.json"
    moved.write_text(data.read_text())
    path = write_llava_task(moved, tmp_path / "t", task_name="t", image_folder=tmp_path / "imgs")
    assert _rows(path)[1][0]["images"] == [str(tmp_path / "imgs" / "a.png")]
    # writing again replaces both files (atomically), leaving no temporary files behind
    write_llava_task(moved, tmp_path / "t", task_name="t", image_folder=tmp_path / "imgs", max_new_tokens=2)
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["t.jsonl", "t.yaml"]
    assert _rows(path)[0]["generation_kwargs"]["max_new_tokens"] == 2


def test_exact_match_is_vqa_normalised():
    doc = {"answer": "two dogs"}
    assert process_results(doc, ["  The 2 dogs."]) == {"exact_match": 1.0}
    assert process_results(doc, ["2 cats"]) == {"exact_match": 0.0}


@pytest.mark.parametrize(
    ("records", "match"),
    [
        ([{"conversations": [{"from": "human", "value": "q"}]}], "last turn must be the assistant"),
        ([{"conversations": [{"from": "gpt", "value": "a"}]}], "no user turn"),
        (
            [
                {
                    "id": "x",
                    "image": "missing.png",
                    "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                }
            ],
            r"id 'x'.*image not found",
        ),
        (
            [{"image": 3, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}],
            "path or a list of paths",
        ),
        ([{"turns": []}], "'conversations' or 'messages'"),
        ([{"conversations": [{"from": "human"}]}], "each turn needs"),
        ([], "non-empty JSON list"),
        ([3], "record 0 must be a JSON object"),
    ],
)
def test_bad_records_are_named(tmp_path, records, match):
    data = _write(tmp_path, records)
    with pytest.raises(ValueError, match=match):
        write_llava_task(data, tmp_path / "t", task_name="t")
    assert not (tmp_path / "t" / "t.yaml").exists()


def test_bad_arguments(tmp_path):
    data = _write(
        tmp_path, [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    )
    with pytest.raises(ValueError, match="task_name"):
        write_llava_task(data, tmp_path / "t", task_name="a/b")
    with pytest.raises(ValueError, match="max_new_tokens"):
        write_llava_task(data, tmp_path / "t", task_name="t", max_new_tokens=0)
    with pytest.raises(ValueError, match="data_file"):
        write_llava_task(tmp_path / "nope.json", tmp_path / "t", task_name="t")
    with pytest.raises(ValueError, match="image_folder"):
        write_llava_task(data, tmp_path / "t", task_name="t", image_folder=tmp_path / "nope")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        write_llava_task(tmp_path / "bad.json", tmp_path / "t", task_name="t")
