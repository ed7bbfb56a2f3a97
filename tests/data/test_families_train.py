"""Every named checkpoint family through stage 2, stage 3 (STGC + LTDR) and ``moevl eval``'s code, with the
same calls as for the demo's LLaVA: no per-family branch in moevl."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from moevl.checkpoint import export
from moevl.data import ConversationCollator, ConversationDataset, read_records
from moevl.hf import moe_state
from moevl.vlm.compare import demo_config
from moevl.vlm.evaluate import predictions_path, run_eval
from moevl.vlm.io import load_model
from moevl.vlm.train import train_stage
from tests.data.test_processing import STOCK_LLAVA_TEMPLATE
from tests.fixtures.checkpoints import FAMILIES
from tests.fixtures.demo import TINY
from tests.fixtures.records import file_for, records_for

pytestmark = pytest.mark.slow  # multi-process or end-to-end: `pytest -m 'not slow'` skips them

#: families whose checkpoints are natively sparse: stage 3 adopts them (Aria's decoder is a MoE)
NATIVE_MOE = ("aria",)


@pytest.mark.parametrize("family", FAMILIES)
def test_stage2_stage3_and_eval_run_on_each_family(checkpoints, llava_file, tmp_path, family):
    cfg = demo_config(TINY, ["stage2.training.max_steps=2", "stage3.training.max_steps=2"])
    llava_file = file_for(llava_file, family, tmp_path)
    common = dict(data=llava_file, image_folder=llava_file.parent, progress=False, log=lambda *_: None)
    s2 = train_stage(cfg, stage=2, model=checkpoints[family], output_dir=tmp_path / "s2", **common)
    s3 = train_stage(
        cfg, stage=3, model=s2.model_dir, output_dir=tmp_path / "s3", method="stgc+ltdr", **common
    )
    model, processor = load_model(s3.model_dir)
    result = run_eval(cfg, model=s3.model_dir, data=llava_file, out=tmp_path / "eval.json", progress=False)
    assert s2.global_step == 2 and s3.global_step == 2
    meta = json.loads((s3.model_dir / "moevl.json").read_text())
    assert (
        meta["moe"] == ("adopted" if family in NATIVE_MOE else "upcycled") and meta["method"] == "stgc+ltdr"
    )
    assert moe_state(model).settings.stgc.weight > 0 and moe_state(model).settings.ltdr is not None
    last = json.loads((tmp_path / "s3" / "moe_stats.json").read_text())["history"][-1]
    # the vision positions came from the family's own image token: LTDR saw a long tail among them
    assert last["ltdr/tail_share"] > 0
    records = read_records(llava_file).records
    assert len(result.predictions) == len(records)
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["overall"] == result.overall
    assert len(predictions_path(tmp_path / "eval.json").read_text().splitlines()) == len(records)
    # `moevl export`'s code path: the exported checkpoint computes what the trained one does
    written = export(model, tmp_path / "export", processor=processor)
    back, back_processor = load_model(tmp_path / "export")
    dataset = ConversationDataset(records, back_processor, progress=False)
    batch = ConversationCollator(back_processor)([dataset[i] for i in range(len(dataset))])
    model.eval(), back.eval()
    with torch.no_grad():
        expected, got = model(**batch).logits, back(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=f"{written.format} export differs")


def test_a_model_tuned_on_the_stock_llava_template_learns_to_stop(checkpoints, llava_file, tmp_path):
    """llava-1.5-hf's template writes nothing after an answer: without the appended EOS the labels never
    hold an end token and generation repeats until ``max_new_tokens``."""
    template = tmp_path / "stock.jinja"
    template.write_text(STOCK_LLAVA_TEMPLATE)
    cfg = demo_config(
        TINY,
        [
            f"data.chat_template={template}",
            "stage2.training.max_steps=60",
            "stage2.training.learning_rate=3e-3",
            "eval.max_new_tokens=12",
        ],
    )
    logged = []
    common = dict(data=llava_file, image_folder=llava_file.parent, progress=False)
    s2 = train_stage(
        cfg, stage=2, model=checkpoints["llava"], output_dir=tmp_path / "s2", log=logged.append, **common
    )
    assert any("appending </s> to each assistant turn" in line for line in logged)
    result = run_eval(cfg, model=s2.model_dir, data=llava_file, progress=False)
    for p in result.predictions:  # each answer learnt, then the end: no repetition up to 12 tokens
        assert p.prediction == p.answer, (p.prediction, p.answer)


@pytest.mark.parametrize("family", ["llava", "gemma3", "idefics3"])
def test_diagnose_on_a_users_checkpoint(checkpoints, llava_file, tmp_path, family):
    """``moevl diagnose`` on a dense checkpoint of the walk-through's kind (upcycled in memory, unchanged on
    disk): every layer the recipe makes sparse is measured, vision and text tokens apart."""
    from moevl.vlm.diagnose import diagnose

    cfg = demo_config(TINY, ["moe.layers=all"])
    before = {p.name: p.read_bytes() for p in checkpoints[family].glob("*.safetensors")}
    result = diagnose(
        cfg, model=checkpoints[family], data=llava_file, steps=3, batch_size=3, out=tmp_path, progress=False
    )
    assert result["moe"] == "upcycled" and result["probe_records"] == 3
    assert len(result["layers"]) == 2  # the tiny decoders have 2 layers, all sparse here
    for layer in result["layers"]:
        assert sum(layer["histogram_counts"]) > 0
        assert layer["vision_conflict_ratio"] is not None and layer["text_conflict_ratio"] is not None
    assert (tmp_path / "diagnosis.json").is_file() and (tmp_path / "cosines.png").is_file()
    assert {p.name: p.read_bytes() for p in checkpoints[family].glob("*.safetensors")} == before


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in NATIVE_MOE])
def test_stage3_step_trains_the_routers_of_each_family(checkpoints, llava_file, family):
    """Each dense family upcycled with STGC and LTDR (the experts and routers trained) takes a stage-3 step on a
    batch its own processor prepared: every router gets a finite, non-zero gradient, STGC's conflicts are
    measured and LTDR finds a tail among the family's image tokens."""
    from moevl.hf import moe_blocks, upcycle
    from moevl.vlm.config import method_settings

    cfg = demo_config(TINY)
    processor = AutoProcessor.from_pretrained(checkpoints[family])
    model = AutoModelForImageTextToText.from_pretrained(checkpoints[family])
    upcycle(model, method_settings(cfg.moe, "stgc+ltdr"), freeze_dense=True)
    dataset = ConversationDataset(records_for(llava_file, family), processor, progress=False)
    batch = ConversationCollator(processor)([dataset[i] for i in range(len(dataset))])
    model.train()
    model(**batch).loss.backward()
    for block in moe_blocks(model):
        grads = [p.grad for p in block.router_parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(
            g.abs().sum() > 0 for g in grads
        )
    records = moe_state(model).context.records
    assert records and all(rec.stgc is not None and rec.stgc.ready for rec in records.values())
    # the vision positions came from the family's own image token: LTDR saw a long tail among them
    assert any(rec.tail_mask is not None and rec.tail_mask.any() for rec in records.values())
