"""``moevl train --stage 3 --set moe.lora.r=8`` on the tiny demo: only the adapters (and the routers, which
LoRA does not target here) train, the checkpoints reload with their adapters, ``moevl export`` merges them."""

import json
import sys

import pytest
import torch

from moevl.hf import moe_state
from moevl.hf.lora import is_lora_parameter
from moevl.vlm.io import load_model
from moevl.vlm.parts import parameter_parts
from tests.fixtures.demo import ROOT, TINY
from tests.fixtures.processes import run

pytestmark = pytest.mark.slow  # multi-process or end-to-end: `pytest -m 'not slow'` skips them


def _moevl(*args, timeout=600):
    done = run([sys.executable, "-m", "moevl.cli", *args], timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def test_stage3_with_lora_trains_the_adapters_only_reloads_and_exports_merged(demo, dense, tmp_path):
    _, s2 = dense
    out = tmp_path / "s3"
    done = _moevl(
        "train", "--stage", "3", "--model", str(s2.model_dir), "--data", str(demo.files.instruct),
        "--image-folder", str(demo.files.image_folder), "--out", str(out), "--config", str(TINY),
        "--no-progress", "--set", "moe.lora.r=8", "--set", "moe.lora.targets=[experts,attention]",
    )  # fmt: skip
    assert "LoRA r=8 alpha=16 on experts, attention" in done.stdout + done.stderr
    meta = json.loads((out / "model" / "moevl.json").read_text())
    assert meta["moe_settings"]["lora"] == {
        "r": 8,
        "alpha": 16.0,
        "dropout": 0.0,
        "targets": ["experts", "attention"],
    }

    model, _ = load_model(out / "model")
    assert moe_state(model).settings.lora.r == 8
    dense_model, _ = load_model(s2.model_dir)
    dense_state = dense_model.state_dict()
    parts = parameter_parts(model)
    trained = {"adapters": 0, "routers": 0}
    for name, value in model.state_dict().items():
        if is_lora_parameter(name):
            trained["adapters"] += int(
                name.endswith(("lora_B", "lora_B.default.weight")) and value.abs().sum() > 0
            )
        elif parts.get(name) == "routers":
            trained["routers"] += 1
        elif parts.get(name) == "experts":  # frozen copies of the dense MLP
            layer = name.split(".mlp.")[0]
            gate = dense_state[f"{layer}.mlp.gate_proj.weight"]
            if name.endswith("gate_up_proj"):
                for e in range(value.shape[0]):
                    assert torch.equal(value[e, : gate.shape[0]], gate), name
        else:  # everything else, the attention's base weights included, is the dense model's
            assert torch.equal(value, dense_state[name.replace(".base_layer.", ".")]), name
    assert trained["adapters"] > 0 and trained["routers"] > 0
    checkpoint, _ = load_model(out / "checkpoint-4")  # a Trainer checkpoint reloads with its adapters
    assert moe_state(checkpoint).settings.lora == moe_state(model).settings.lora

    # the adapter alone needs a native class to load into: the demo's alternate layers have none
    refused = run([sys.executable, "-m", "moevl.cli", "export", "--model", str(out), "--out", str(tmp_path / "a"),
                   "--lora", "adapter"], timeout=300, cwd=ROOT)  # fmt: skip
    assert refused.returncode != 0 and "PEFT adapters need a native class" in refused.stderr + refused.stdout
    _moevl("export", "--model", str(out), "--out", str(tmp_path / "exported"))
    exported, processor = load_model(tmp_path / "exported")
    assert moe_state(exported).settings.lora is None
    assert not any(is_lora_parameter(n) for n, _ in exported.named_parameters())
    batch = processor(
        text=["<image> w1 w2"], images=[torch.zeros(3, 8, 8, dtype=torch.uint8)], return_tensors="pt"
    )
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, model(**batch).logits, atol=2e-5, rtol=1e-5)
