"""The three stages, evaluation, resume, Ctrl-C and errors, on configs/tiny.yaml (seconds per stage)."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from moevl.vlm.config import load_config
from moevl.vlm.evaluate import evaluate
from moevl.vlm.model import num_image_tokens
from moevl.vlm.train import (
    CheckpointError,
    OutputDirError,
    TrainingInterrupted,
    last_checkpoint,
    load_model,
    prepare_data,
    train_stage,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY)


@pytest.fixture(scope="module")
def dense(cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    s1 = train_stage(cfg, stage=1, output_dir=out / "s1", progress=False)
    s2 = train_stage(cfg, stage=2, output_dir=out / "s2", init=s1.model_dir, progress=False)
    return s1, s2


def test_stages_one_and_two_write_models_checkpoints_and_logs(dense):
    s1, s2 = dense
    for r in (s1, s2):
        assert r.global_step == 4
        assert (r.model_dir / "model.safetensors").is_file() and (r.model_dir / "tokenizer.json").is_file()
        assert (r.output_dir / "checkpoint-4" / "model.safetensors").is_file()
        assert any((r.output_dir / "runs").rglob("events.out.tfevents*"))
    meta = json.loads((s2.model_dir / "moevl.json").read_text())
    assert meta["stage"] == 2 and meta["init"] == str(s1.model_dir)


def test_stage2_starts_from_stage1_weights(cfg, dense, tmp_path):
    s1, _ = dense
    m1, _, _ = load_model(s1.model_dir)
    # Stage 2 with a zero learning rate must leave stage 1's weights untouched.
    frozen = load_config(TINY, ["stage2.learning_rate=1e-12", "stage2.max_steps=1"])
    r = train_stage(frozen, stage=2, output_dir=tmp_path, init=s1.model_dir, progress=False)
    m2, _, _ = load_model(r.model_dir)
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)


@pytest.mark.parametrize("method", ["baseline", "stgc+ltdr"])
def test_stage3_moe_tuning_trains_experts_and_reloads(cfg, dense, tmp_path, method):
    _, s2 = dense
    r = train_stage(cfg, stage=3, output_dir=tmp_path, init=s2.model_dir, method=method, progress=False)
    stats = json.loads((tmp_path / "moe_stats.json").read_text())
    assert stats["history"] and stats["expert_load"]
    assert ("ltdr/tail_share" in stats["history"][-1]) == ("ltdr" in method)
    model, tok, meta = load_model(r.model_dir)
    assert meta["upcycled"] and meta["method"] == method
    # MoE-LLaVA stage 3: only experts and routers train; everything dense stays as stage 2 left it.
    dense_model, _, _ = load_model(s2.model_dir)
    dense_state = dense_model.state_dict()
    changed_experts = False
    for name, value in model.state_dict().items():
        if ".experts." in name:  # (E, out, in); every expert started as a copy of the dense MLP
            mlp, proj = name.split(".experts.")
            start = dense_state[f"{mlp}.{proj}.weight"].expand_as(value)
            changed_experts |= not torch.equal(value, start)
        elif ".router." not in name:
            torch.testing.assert_close(value, dense_state[name], atol=0, rtol=0, msg=name)
    assert changed_experts
    assert 0 < meta["trainable_parameters"] < sum(v.numel() for v in dense_state.values())
    bench, _ = prepare_data(cfg)
    result = evaluate(model, bench, tok, num_image_tokens=num_image_tokens(cfg.model, cfg.data.grid))
    assert set(result["accuracy"]) == set(bench.families)


def test_evaluation_scores_exact_match(cfg, dense):
    _, s2 = dense
    model, tok, _ = load_model(s2.model_dir)
    bench, _ = prepare_data(cfg)
    P = num_image_tokens(cfg.model, cfg.data.grid)
    result = evaluate(model, bench, tok, num_image_tokens=P, split="test")
    n = sum(result["count"].values())
    assert n == len(bench.questions["test"])
    hits = sum(result["accuracy"][f] * result["count"][f] for f in result["count"])
    ex = result["examples"]
    assert abs(hits - round(hits)) < 1e-9 and all(set(e) == {"question", "answer", "prediction"} for e in ex)
    assert result["overall"] == pytest.approx(hits / n)


class _InterruptAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(cfg, tmp_path):
    longer = load_config(TINY, ["stage1.max_steps=6", "stage1.save_steps=100"])
    with pytest.raises(TrainingInterrupted) as err:
        train_stage(longer, stage=1, output_dir=tmp_path, progress=False, callbacks=[_InterruptAt(3)])
    # Saved at the end of the step in progress (the signal arrives inside step 3's callbacks).
    assert err.value.checkpoint == last_checkpoint(tmp_path)
    assert err.value.checkpoint.name in ("checkpoint-3", "checkpoint-4")
    assert not (tmp_path / "model").exists()
    r = train_stage(longer, stage=1, output_dir=tmp_path, resume=True, progress=False)
    assert r.global_step == 6 and (r.model_dir / "model.safetensors").is_file()
    assert last_checkpoint(tmp_path).name == "checkpoint-6"
    # the resumed run restored the checkpoint's weights: it ends where an uninterrupted run ends
    ref = train_stage(longer, stage=1, output_dir=tmp_path / "ref", progress=False)
    resumed, expected = (
        load_file(r.model_dir / "model.safetensors"),
        load_file(ref.model_dir / "model.safetensors"),
    )
    assert resumed.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(resumed[k], expected[k], atol=1e-5, rtol=1e-5, msg=k)


def test_errors_for_missing_checkpoints_and_unwritable_output(cfg, tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        train_stage(cfg, stage=1, output_dir=tmp_path / "empty", resume=True, progress=False)
    with pytest.raises(CheckpointError, match="model directory not found"):
        train_stage(cfg, stage=2, output_dir=tmp_path / "x", init=tmp_path / "missing", progress=False)
    with pytest.raises(CheckpointError, match="needs --init"):
        train_stage(cfg, stage=3, output_dir=tmp_path / "y", progress=False)
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(OutputDirError, match="not writable"):
        train_stage(cfg, stage=1, output_dir=tmp_path / "file" / "out", progress=False)


def test_two_process_ddp_with_torchrun(tmp_path):
    """2 processes, gloo, CPU: the CLI runs unchanged under torchrun."""
    with socket.socket() as sock:  # a free port, so concurrent runs do not collide
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
        "-m", "moevl.cli", "train", "--stage", "1", "--config", str(TINY), "--out", str(tmp_path),
        "--no-progress", "--set", "stage1.max_steps=2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert (tmp_path / "model" / "model.safetensors").is_file()
