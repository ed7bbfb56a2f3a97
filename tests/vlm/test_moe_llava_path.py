"""A released MoE-LLaVA checkpoint (synthetic, in the original layout) goes through ``moevl train --stage 3``
and ``moevl eval`` like any checkpoint: its experts are kept, the method's options are applied."""

import json

import torch
from safetensors.torch import load_file

from moevl.hf import moe_state
from moevl.vlm.compare import demo_config
from moevl.vlm.evaluate import run_eval
from moevl.vlm.io import load_model
from moevl.vlm.train import train_stage
from tests.fixtures.checkpoints import LLAVA_TEMPLATE, WORDS
from tests.fixtures.demo import TINY
from tests.fixtures.moe_llava_checkpoint import write_checkpoint
from tests.fixtures.records import LLAVA_RECORDS, write_images


def test_moe_llava_checkpoint_is_tuned_with_stgc_and_evaluated(tmp_path):
    from moevl.vlm.checkpoint import word_tokenizer

    ckpt = tmp_path / "moe-llava-phi"
    config, state = write_checkpoint(ckpt, "phi")
    word_tokenizer(WORDS).save_pretrained(ckpt)
    write_images(tmp_path)
    (tmp_path / "data.json").write_text(json.dumps(LLAVA_RECORDS))
    (tmp_path / "template.jinja").write_text(LLAVA_TEMPLATE)
    cfg = demo_config(
        TINY, [f"data.chat_template={tmp_path / 'template.jinja'}", "training.per_device_train_batch_size=3"]
    )

    model, processor = load_model(ckpt, chat_template=LLAVA_TEMPLATE)
    assert moe_state(model).settings.num_experts == config["moe"]["num_experts"][0]
    r = train_stage(
        cfg, stage=3, model=ckpt, output_dir=tmp_path / "out", data=tmp_path / "data.json", method="stgc",
        max_steps=2, progress=False, log=lambda *_: None,
    )  # fmt: skip
    meta = json.loads((r.model_dir / "moevl.json").read_text())
    assert meta["moe"] == "reconfigured" and meta["moe_settings"]["stgc"]["weight"] > 0
    tuned = load_file(r.model_dir / "moevl-model.safetensors")
    # MoE-tuning trains experts and routers only: the attention weights are the checkpoint's
    key = next(k for k in state if k.endswith("layers.0.self_attn.q_proj.weight"))
    ours = next(k for k in tuned if k.endswith("layers.0.self_attn.q_proj.weight"))
    torch.testing.assert_close(tuned[ours], state[key].to(tuned[ours].dtype))
    routers = [k for k in tuned if k.endswith("router.weight")]
    assert routers and any(
        not torch.equal(tuned[k], model.state_dict()[k].to(tuned[k].dtype)) for k in routers
    )
    result = run_eval(
        cfg, model=r.model_dir, data=tmp_path / "data.json", out=tmp_path / "eval.json", progress=False
    )
    assert result.count == 3 and (tmp_path / "eval.predictions.jsonl").is_file()
