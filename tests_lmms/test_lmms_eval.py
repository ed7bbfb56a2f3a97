"""lmms-eval runs a moevl model directory offline on a local task and reports what moevl computes by hand.

Needs ``pip install moevl[lmms]`` (skipped without lmms-eval, like any optional integration)."""

from __future__ import annotations

import json

import lmms_eval  # noqa: F401  (make test-lmms installs it; the default suite does not collect this folder)
import pytest
import torch

from moevl.checkpoint.format import save_moe_model
from moevl.hf.upcycle import upcycle
from moevl.integrations.lmms_eval import MoevlLMM, model_manifest
from moevl.integrations.lmms_tasks import doc_to_visual, write_llava_task
from moevl.vlm.answers import vqa_accuracy
from tests.fixtures.tiny_export import make_routing_matter
from tests.fixtures.tiny_vqa import (
    QUESTIONS,
    reference_answer,
    tiny_vqa_model,
    tiny_vqa_processor,
    write_images,
    write_llava_json,
)

MAX_NEW_TOKENS = 3


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    torch.set_num_threads(1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets_cache"))


def _model(kind: str):
    """The tiny LLaVA (``dense``) or its upcycled MoE version (``moevl``: no transformers class exists)."""
    model = tiny_vqa_model()
    if kind == "moevl":
        model = make_routing_matter(upcycle(model, num_experts=4, top_k=2)).eval()
    return model


def _save(model, processor, kind: str, folder):
    if kind == "moevl":
        save_moe_model(model, folder, processor=processor)
    else:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["dense", "moevl"])
def test_lmms_eval_accuracy_equals_direct_generation(tmp_path, kind):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    from PIL import Image

    processor = tiny_vqa_processor()
    model = _model(kind)
    model_dir = _save(model, processor, kind, tmp_path / "stage" / "model")
    model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
    assert model_type == {"dense": "llava", "moevl": "moevl"}[kind]
    images = write_images(tmp_path / "images")
    # The hand-made reference: greedy answers of the in-memory model, one record at a time.
    expected = []
    for name, question in zip(images, QUESTIONS, strict=True):
        with Image.open(tmp_path / "images" / name) as image:
            expected.append(
                reference_answer(model, processor, image.convert("RGB"), question, MAX_NEW_TOKENS)
            )
    assert len(set(expected)) > 1, "the test needs answers that depend on the record"
    # References: three equal to the model's answer (one only after VQA normalisation), two not.
    answers = [expected[0], "w93 w94", expected[2], f"  {expected[3].upper()}.", "no"]
    direct = sum(vqa_accuracy(p, [a]) for p, a in zip(expected, answers, strict=True)) / len(answers)
    assert 0 < direct < 1
    data = write_llava_json(tmp_path / "images" / "eval.json", images, answers)
    task_yaml = write_llava_task(
        data, tmp_path / "tasks", task_name="tiny_vqa", max_new_tokens=MAX_NEW_TOKENS
    )

    # A stage's output folder (holding model/) is accepted; batches of 2 are left-padded.
    lm = MoevlLMM(pretrained=str(tmp_path / "stage"), batch_size=2)
    results = simple_evaluate(
        model=lm,
        tasks=["tiny_vqa"],
        task_manager=TaskManager(include_path=str(task_yaml.parent)),
        log_samples=True,
        bootstrap_iters=0,
    )

    assert results["results"]["tiny_vqa"]["exact_match,none"] == pytest.approx(direct)
    samples = sorted(results["samples"]["tiny_vqa"], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in samples] == expected


def test_model_checks_requests(tmp_path):
    processor = tiny_vqa_processor()
    model_dir = _save(_model("dense"), processor, "dense", tmp_path / "model")
    lm = MoevlLMM(pretrained=str(model_dir))
    with pytest.raises(ValueError, match="greedily"):
        lm._generation_options({"temperature": 0.7, "do_sample": True})
    with pytest.raises(ValueError, match="not supported"):
        lm._generation_options({"max_new_tokens": 4, "image_aspect_ratio": "pad"})
    assert lm._generation_options({"max_new_tokens": 4, "until": "\n\n", "top_p": None}) == (4, ["\n\n"])
    with pytest.raises(ValueError, match="2 <image> placeholders but the task gives 1 images"):
        lm._prompt("<image> w10 <image>", 1)
    # placeholders put the images where they stand; without one, images go first
    assert lm._prompt("w10 <image> w11", 1) == "USER: w10 <image> w11 ASSISTANT: "
    assert lm._prompt("w10 w11", 1) == "USER: <image> w10 w11 ASSISTANT: "
    with pytest.raises(ValueError, match="batch_size"):
        MoevlLMM(pretrained=str(model_dir), batch_size=0)
    with pytest.raises(ValueError, match="max_batch_size"):
        MoevlLMM(pretrained=str(model_dir), max_batch_size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"config\.json"):
        MoevlLMM(pretrained=str(tmp_path / "empty"))


def test_manifest_names_the_model_class():
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    registry.register_manifest(model_manifest())
    assert registry.get_model_class("moevl") is MoevlLMM


def test_doc_to_visual_reads_rgb(tmp_path):
    from PIL import Image

    Image.new("L", (5, 3), color=7).save(tmp_path / "g.png")
    (image,) = doc_to_visual({"images": [str(tmp_path / "g.png")]})
    assert image.mode == "RGB" and image.size == (5, 3) and image.getpixel((0, 0)) == (7, 7, 7)


def test_batches_answer_as_single_records(tmp_path):
    """Left-padded batches (padding with </s>: this tokenizer has no pad token) with a different budget
    and stop string per request give each record the answer it gets alone."""
    from lmms_eval.api.instance import Instance

    processor = tiny_vqa_processor()
    processor.tokenizer.pad_token = None
    model = _model("dense")
    lm = MoevlLMM(pretrained=str(_save(model, processor, "dense", tmp_path / "model")), batch_size=3)
    assert lm.tokenizer.pad_token == "</s>"
    names = write_images(tmp_path / "images")
    docs = [{"images": [str(tmp_path / "images" / n)]} for n in names]
    lm.task_dict = {"t": {"test": docs}}
    budgets = [3, 1, 2, 3, 3]
    singles = []
    for doc, question, budget in zip(docs, QUESTIONS, budgets, strict=True):
        (image,) = doc_to_visual(doc)
        singles.append(reference_answer(model, processor, image, question, budget))
    stop = singles[4].split()[1]  # the answer of record 4 is cut before its second word
    kwargs = [{"max_new_tokens": b, "until": [stop] if i == 4 else []} for i, b in enumerate(budgets)]
    requests = [
        Instance(
            "generate_until",
            (f"<image> {q}", kw, doc_to_visual, i, "t", "test"),
            idx=0,
            metadata={"task": "t", "doc_id": i, "repeats": 1},
        )
        for i, (q, kw) in enumerate(zip(QUESTIONS, kwargs, strict=True))
    ]
    singles[4] = singles[4].split(stop)[0].strip()
    assert lm.generate_until(requests) == singles
