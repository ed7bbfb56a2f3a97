"""Local lmms-eval tasks from LLaVA-format JSON eval files: nothing is fetched from the Hub.

``write_llava_task`` turns a LLaVA conversation file into a task folder that ``lmms-eval --include_path``
reads: ``<task>.jsonl`` (one record a line: ``id``, absolute ``images`` paths, ``question``, ``answer``)
and ``<task>.yaml``, which loads the JSONL with the ``datasets`` library's ``json`` builder and points at the
functions below (``!function moevl.integrations.lmms_tasks.*``). Each record is asked its last user turn
(``<image>`` placeholders kept where they are); its last assistant turn is the reference. The metric,
``exact_match``, is the mean of ``moevl.vlm.answers.vqa_accuracy`` (exact match after VQAv2 normalisation),
the score ``moevl eval`` gives.

This module does not need lmms-eval.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from moevl.atomic import atomic_write_jsonl, atomic_write_text
from moevl.checks import check_int
from moevl.vlm.answers import vqa_accuracy

IMAGE_PLACEHOLDER = "<image>"
METRIC = "exact_match"
_USER_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant")
_TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def write_llava_task(
    data_file: str | os.PathLike,
    task_dir: str | os.PathLike,
    *,
    task_name: str,
    image_folder: str | os.PathLike | None = None,
    max_new_tokens: int = 16,
) -> Path:
    """Writes ``task_dir/<task_name>.jsonl`` and ``task_dir/<task_name>.yaml``; returns the YAML's path.

    Args:
        data_file: a LLaVA-format JSON list: records with ``conversations`` (``from`` human/gpt, ``value``)
            or ``messages`` (``role`` user/assistant, ``content`` text), an optional ``image`` (a path or a
            list of paths) and an optional ``id``.
        task_dir: the folder to give ``lmms-eval --include_path`` (created if missing).
        task_name: the name to give ``--tasks``.
        image_folder: where relative image paths start (default: the data file's folder).
        max_new_tokens: the generation budget of every answer.
    Raises:
        ValueError: a bad argument, a record without a final assistant turn after a user turn, or an image
            that does not exist (each names the record).
    """
    if not isinstance(task_name, str) or _TASK_NAME.fullmatch(task_name) is None:
        raise ValueError(
            f"task_name must be letters, digits, '_', '.' or '-' (e.g. 'my_vqa'), got {task_name!r}"
        )
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    data_file = Path(data_file)
    if not data_file.is_file():
        raise ValueError(f"data_file: no such file: {data_file}")
    image_root = Path(image_folder) if image_folder is not None else data_file.parent
    if not image_root.is_dir():
        raise ValueError(f"image_folder: no such folder: {image_root}")
    try:
        records = json.loads(data_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"data_file: {data_file} is not valid JSON ({e})") from None
    if not isinstance(records, list) or not records:
        raise ValueError(
            f"data_file must hold a non-empty JSON list of records, got {type(records).__name__}"
        )
    rows = [_row(record, i, image_root.resolve()) for i, record in enumerate(records)]
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    data_path = atomic_write_jsonl(task_dir / f"{task_name}.jsonl", rows)
    return atomic_write_text(
        task_dir / f"{task_name}.yaml", _task_yaml(task_name, data_path.resolve(), max_new_tokens)
    )


def _task_yaml(task_name: str, data_path: Path, max_new_tokens: int) -> str:
    functions = "moevl.integrations.lmms_tasks"
    # JSON strings are YAML scalars: paths and names with any characters stay intact.
    return "\n".join(
        [
            f"# Written by moevl.integrations.lmms_tasks.write_llava_task: lmms-eval --include_path {json.dumps(str(data_path.parent))}",
            f"task: {json.dumps(task_name)}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str(data_path))}",
            "test_split: test",
            "output_type: generate_until",
            f"doc_to_visual: !function {functions}.doc_to_visual",
            f"doc_to_text: !function {functions}.doc_to_text",
            f"doc_to_target: !function {functions}.doc_to_target",
            f"process_results: !function {functions}.process_results",
            "generation_kwargs:",
            f"  max_new_tokens: {max_new_tokens}",
            "  temperature: 0",
            "  do_sample: false",
            "metric_list:",
            f"  - metric: {METRIC}",
            "    aggregation: mean",
            "    higher_is_better: true",
            "",
        ]
    )


def _row(record: Any, index: int, image_root: Path) -> dict[str, Any]:
    where = f"record {index}"
    if not isinstance(record, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(record).__name__}")
    if "id" in record:
        where = f"record {index} (id {record['id']!r})"
    turns = _turns(record, where)
    if not turns or turns[-1][0] != "assistant":
        raise ValueError(
            f"{where}: the last turn must be the assistant's answer, got {turns[-1:] or 'no turns'}"
        )
    questions = [text for role, text in turns[:-1] if role == "user"]
    if not questions:
        raise ValueError(f"{where}: no user turn before the last assistant turn")
    images = record.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ValueError(f"{where}: 'image' must be a path or a list of paths, got {images!r}")
    paths = [image_root / p for p in images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"{where}: image not found: {', '.join(missing)}")
    return {
        "id": str(record.get("id", index)),
        "images": [str(p) for p in paths],
        "question": questions[-1],
        "answer": turns[-1][1],
    }


def _turns(record: dict, where: str) -> list[tuple[str, str]]:
    """``[(role, text)]`` with roles normalised to ``user`` / ``assistant`` (others, e.g. system, kept)."""
    if "conversations" in record:
        raw, role_key, text_key = record["conversations"], "from", "value"
    elif "messages" in record:
        raw, role_key, text_key = record["messages"], "role", "content"
    else:
        raise ValueError(f"{where} must have a 'conversations' or 'messages' list, got keys {sorted(record)}")
    if not isinstance(raw, list):
        raise ValueError(f"{where}: turns must be a list, got {type(raw).__name__}")
    turns = []
    for turn in raw:
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            raise ValueError(f"{where}: each turn needs {role_key!r} and a text {text_key!r}, got {turn!r}")
        role = turn.get(role_key)
        role = "user" if role in _USER_ROLES else "assistant" if role in _ASSISTANT_ROLES else str(role)
        turns.append((role, turn[text_key]))
    return turns


# The functions the task YAML names. lmms-eval calls them with one record (a dict) of the JSONL.


def doc_to_visual(doc: dict) -> list:
    """The record's images as RGB PIL images, in placeholder order."""
    from PIL import Image

    images = []
    for path in doc["images"]:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def doc_to_text(doc: dict) -> str:
    """The last user turn, ``<image>`` placeholders included."""
    return doc["question"]


def doc_to_target(doc: dict) -> str:
    return doc["answer"]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """``{"exact_match": 1.0 or 0.0}``: the generated answer against the reference, VQAv2-normalised."""
    return {METRIC: vqa_accuracy(results[0], [doc["answer"]])}
