"""Stage 3 on model classes whose inputs come with extra per-image tensors (Mistral 3's ``image_sizes`` with
Pixtral's variable image grid, LLaVA-OneVision's grid cells plus the base image): a batch made by the family's
own processor (tiny checkpoints of ``tests/fixtures/checkpoints.py``, loaded with ``AutoProcessor``), then the
model is upcycled with STGC and LTDR and takes a training step."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from moevl.data import ConversationCollator, ConversationDataset, read_records
from moevl.hf import moe_blocks, moe_state, upcycle
from moevl.moe import LTDRConfig
from moevl.stgc import STGCConfig
from tests.fixtures.checkpoints import build_checkpoint
from tests.fixtures.records import LLAVA_RECORDS, write_images


@pytest.mark.parametrize("family", ["mistral3", "llava_onevision"])
def test_stage3_step_on_the_processors_batch(family, tmp_path):
    checkpoint = build_checkpoint(family, tmp_path / family)
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    write_images(tmp_path)
    (tmp_path / "data.json").write_text(json.dumps(LLAVA_RECORDS))
    dataset = ConversationDataset(read_records(tmp_path / "data.json").records, processor, progress=False)
    batch = ConversationCollator(processor)([dataset[i] for i in range(len(dataset))])
    ids = batch["input_ids"]
    image = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert ids.eq(image).any() and not batch["attention_mask"].all()  # images and padding both present
    torch.manual_seed(0)
    with torch.no_grad():
        dense = model(**batch).logits
    upcycle(
        model, num_experts=4, top_k=2, router="ltdr", ltdr=LTDRConfig(), stgc=STGCConfig(), freeze_dense=True
    )
    model.train()
    out = model(**batch)
    # upcycled == dense at initialisation, on the real tokens (moevl's layers route no padding: token_mask)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[real], dense[real], atol=1e-5, rtol=1e-5)
    out.loss.backward()
    for block in moe_blocks(model):
        grads = [p.grad for p in block.router_parameters()]
        assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    records = moe_state(model).context.records
    assert records
    for rec in records.values():
        assert rec.stgc is not None and rec.stgc.ready
        assert int(rec.vision_mask.sum()) == ids.eq(image).sum()  # the family's image token marks vision
        assert rec.tail_mask[rec.vision_mask].any()  # LTDR found a tail among them
