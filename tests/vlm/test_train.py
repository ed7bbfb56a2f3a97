"""The three stages through ``train_stage`` on a tiny checkpoint and the tiny digit data (seconds per stage):
what trains, what is saved, resume, Ctrl-C, non-finite losses and bad input."""

import json
import os
import shutil
import signal
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from moevl.config import ConfigError
from moevl.data import DataError
from moevl.hf import moe_state
from moevl.training.trainer import NonFiniteTrainingError
from moevl.vlm.compare import demo_config
from moevl.vlm.io import CheckpointError, OutputDirError, load_model
from moevl.vlm.parts import parameter_parts
from moevl.vlm.resume import last_checkpoint
from moevl.vlm.train import TrainingInterrupted, train_stage
from tests.fixtures.demo import ROOT, TINY, run_stage
from tests.fixtures.processes import run, torchrun


def _state(path):
    model, _ = load_model(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, parameter_parts(model)


def test_stages_one_and_two_write_models_checkpoints_and_logs(dense):
    s1, s2 = dense
    for r in (s1, s2):
        assert r.global_step == 4 and r.num_records > 0
        for name in (
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "processor_config.json",
            "moevl.json",
        ):
            assert (r.model_dir / name).is_file(), name
        assert (r.output_dir / "checkpoint-4" / "model.safetensors").is_file()
        assert any((r.output_dir / "runs").rglob("events.out.tfevents*"))
    meta = json.loads((s2.model_dir / "moevl.json").read_text())
    assert meta["stage"] == 2 and meta["init"] == str(s1.model_dir) and meta["init_meta"]["stage"] == 1


def test_each_stage_trains_only_its_parts(demo, dense, tmp_path):
    s1, s2 = dense
    before, parts = _state(s1.model_dir)
    # stage 1 as MoE-LLaVA: the projector only
    cfg = demo_config(TINY, ["stage1.trainable=[projector]"])
    r = run_stage(demo, 1, tmp_path / "p", s1.model_dir, cfg)
    after, _ = _state(r.model_dir)
    changed = {parts[k] for k in before if k in parts and not torch.equal(before[k], after[k])}
    assert changed == {"projector"}
    # stage 2's defaults: projector and language model; the vision tower stays frozen
    r = run_stage(
        demo,
        2,
        tmp_path / "l",
        s1.model_dir,
        demo_config(TINY, ["stage2.trainable=[projector,language_model]"]),
    )
    after, _ = _state(r.model_dir)
    changed = {parts[k] for k in before if k in parts and not torch.equal(before[k], after[k])}
    assert changed == {"projector", "language_model"}


@pytest.mark.parametrize("method", ["baseline", "stgc+ltdr"])
def test_stage3_upcycles_trains_experts_and_routers_and_reloads(demo, dense, tmp_path, method):
    _, s2 = dense
    r = run_stage(demo, 3, tmp_path, s2.model_dir, method=method)
    stats = json.loads((tmp_path / "moe_stats.json").read_text())
    assert stats["history"] and stats["expert_load"]
    assert ("ltdr/tail_share" in stats["history"][-1]) == ("ltdr" in method)
    config = json.loads((r.model_dir / "config.json").read_text())
    assert config["model_type"] == "moevl"  # alternate layers: no native class; plain transformers refuses it
    meta = json.loads((r.model_dir / "moevl.json").read_text())
    assert meta["moe"] == "upcycled" and meta["method"] == method
    assert (meta["moe_settings"]["ltdr"] is not None) == ("ltdr" in method)
    model, _ = load_model(r.model_dir)
    assert (moe_state(model).settings.stgc.weight > 0) == ("stgc" in method)
    dense_state, _ = _state(s2.model_dir)
    parts = parameter_parts(model)
    changed_experts = False
    for name, value in model.state_dict().items():
        if parts.get(name) == "experts":
            changed_experts = True  # compared below through the upcycled copies
        elif parts.get(name) != "routers":
            torch.testing.assert_close(value, dense_state[name], atol=0, rtol=0, msg=name)
    assert changed_experts
    # every expert started as the dense MLP: after training they differ from it
    layer = model.model.language_model.layers[0].mlp
    gate_up = layer.experts.gate_up_proj.detach()
    dense_gate = dense_state["model.language_model.layers.0.mlp.gate_proj.weight"]
    assert not torch.equal(gate_up[0, : dense_gate.shape[0]], dense_gate)


def test_a_second_moe_tuning_keeps_the_experts_and_takes_the_method(demo, dense, tmp_path):
    _, s2 = dense
    first = run_stage(demo, 3, tmp_path / "a", s2.model_dir, method="baseline")
    frozen = demo_config(TINY, ["stage3.training.learning_rate=1e-30"])
    second = run_stage(demo, 3, tmp_path / "b", first.model_dir, frozen, method="ltdr")
    meta = json.loads((second.model_dir / "moevl.json").read_text())
    assert meta["moe"] == "reconfigured" and meta["moe_settings"]["router"] == "ltdr"
    a, b = (
        load_file(first.model_dir / "moevl-model.safetensors"),
        load_file(second.model_dir / "moevl-model.safetensors"),
    )
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


class _InterruptAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_saves_a_checkpoint_and_resume_ends_where_an_uninterrupted_run_ends(demo, dense, tmp_path):
    _, s2 = dense
    cfg = demo_config(TINY, ["stage3.training.max_steps=6", "training.save_steps=100"])
    with pytest.raises(TrainingInterrupted) as err:
        run_stage(demo, 3, tmp_path / "run", s2.model_dir, cfg, method="stgc", callbacks=[_InterruptAt(3)])
    assert err.value.checkpoint == last_checkpoint(tmp_path / "run")
    assert err.value.checkpoint.name in ("checkpoint-3", "checkpoint-4")
    assert not (tmp_path / "run" / "model").exists()
    resumed = run_stage(demo, 3, tmp_path / "run", s2.model_dir, cfg, method="stgc", resume=True)
    assert resumed.global_step == 6
    history = json.loads((tmp_path / "run" / "moe_stats.json").read_text())["history"]
    assert [h["step"] for h in history] == [2, 4, 6]  # the steps before the resume are kept
    ref = run_stage(demo, 3, tmp_path / "ref", s2.model_dir, cfg, method="stgc")
    got, expected = (load_file(x.model_dir / "moevl-model.safetensors") for x in (resumed, ref))
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=1e-5, msg=k)


def _cut(path, keep=0.5):
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def test_resume_passes_over_a_damaged_last_checkpoint_to_the_newest_complete_one(demo, dense, tmp_path):
    # a ValueError traceback from load_moe_state_into before
    _, s2 = dense
    out = tmp_path / "run"
    cfg = demo_config(TINY, ["stage3.training.max_steps=6", "training.save_total_limit=3"])
    with pytest.raises(TrainingInterrupted):
        run_stage(demo, 3, out, s2.model_dir, cfg, method="stgc", callbacks=[_InterruptAt(3)])
    *_, older, newest = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    _cut(newest / "moevl-model.safetensors")
    logged = []
    resumed = train_stage(
        cfg, stage=3, model=s2.model_dir, output_dir=out, data=demo.files.instruct, method="stgc",
        image_folder=demo.files.image_folder, resume=True, progress=False, log=logged.append,
    )  # fmt: skip
    assert logged[0].startswith(f"--resume: {newest.name} is damaged (moevl-model.safetensors is cut short (")
    assert logged[0].endswith(
        f"resuming from {older.name}, the newest complete checkpoint ({newest.name} is written again when the run "
        "reaches its step)"
    )
    assert resumed.global_step == 6
    history = json.loads((out / "moe_stats.json").read_text())["history"]
    assert [h["step"] for h in history] == [2, 4, 6]


def test_a_checkpoint_is_whole_only_when_every_file_in_it_is(demo, dense, tmp_path):
    from moevl.vlm.resume import checkpoint_damage

    _, s2 = dense
    cfg = demo_config(TINY, ["stage3.training.max_steps=2"])
    run_stage(demo, 3, tmp_path / "run", s2.model_dir, cfg)
    good = tmp_path / "run" / "checkpoint-2"
    assert checkpoint_damage(good) is None
    cases = {
        "optimizer.pt": "optimizer.pt is cut short or corrupt",
        "rng_state.pth": "rng_state.pth is cut short or corrupt",
        "moevl-model.safetensors": "moevl-model.safetensors is cut short (",
        "trainer_state.json": "trainer_state.json is not valid JSON",
    }
    for name, why in cases.items():
        broken = tmp_path / name
        shutil.copytree(good, broken)
        _cut(broken / name)
        assert checkpoint_damage(broken).startswith(why), name
    (broken / "trainer_state.json").unlink()
    assert checkpoint_damage(broken) == "no trainer_state.json: its save was cut short"
    weightless = tmp_path / "weightless"
    shutil.copytree(good, weightless)
    (weightless / "moevl-model.safetensors").unlink()
    assert checkpoint_damage(weightless) == "no weights (*.safetensors)"
    out = tmp_path / "all-damaged"
    shutil.copytree(tmp_path / "optimizer.pt", out / "checkpoint-2")
    with pytest.raises(
        CheckpointError, match=r"no complete checkpoint-N directory in .*; checkpoint-2: optimizer.pt"
    ):
        run_stage(demo, 3, out, s2.model_dir, cfg, resume=True)


def test_an_out_holding_a_run_is_refused_unless_resumed_with_its_settings_or_overwritten(
    demo, dense, tmp_path
):
    _, s2 = dense
    out = tmp_path / "run"
    cfg = demo_config(TINY, ["stage3.training.max_steps=4", "training.save_steps=2"])
    with pytest.raises(TrainingInterrupted):
        run_stage(demo, 3, out, s2.model_dir, cfg, method="stgc", callbacks=[_InterruptAt(2)])
    started = sorted(p.name for p in out.iterdir())
    with pytest.raises(
        OutputDirError, match=r"already holds a run \(1 checkpoint\(s\), the last checkpoint-\d\)"
    ):
        run_stage(demo, 3, out, s2.model_dir, cfg, method="stgc")
    with pytest.raises(
        ConfigError, match=r"--resume: moe.num_experts is 8 but the run .* was started with 4"
    ):
        other = demo_config(TINY, ["stage3.training.max_steps=4", "moe.num_experts=8"])
        run_stage(demo, 3, out, s2.model_dir, other, method="stgc", resume=True)
    with pytest.raises(ConfigError, match=r"--resume: method is 'ltdr' but .* was started with 'stgc'"):
        run_stage(demo, 3, out, s2.model_dir, cfg, method="ltdr", resume=True)
    # another schedule: the learning rate jumped to another point of another schedule (accepted silently before)
    with pytest.raises(
        ConfigError,
        match=r"--resume: training.max_steps is 12 but the run in .* was started with 4 \(the learning-rate "
        r"schedule is made from it\); resume it with the same settings",
    ):
        run_stage(demo, 3, out, s2.model_dir, cfg, method="stgc", resume=True, max_steps=12)
    faster = demo_config(
        TINY, ["stage3.training.max_steps=4", "training.save_steps=2", "stage3.training.learning_rate=5e-4"]
    )
    with pytest.raises(
        ConfigError, match=r"--resume: training.learning_rate is 0.0005 but .* was started with 0.001"
    ):
        run_stage(demo, 3, out, s2.model_dir, faster, method="stgc", resume=True)
    assert sorted(p.name for p in out.iterdir()) == started  # the refusals changed nothing
    assert run_stage(demo, 3, out, s2.model_dir, cfg, method="stgc", resume=True).global_step == 4
    with pytest.raises(CheckpointError, match="has finished"):  # not one more step each time
        run_stage(demo, 3, out, s2.model_dir, cfg, method="stgc", resume=True)
    with pytest.raises(OutputDirError) as err:  # it said "--resume continues it", which then refused
        run_stage(demo, 3, out, s2.model_dir, cfg, method="stgc")
    assert "already holds a finished run" in str(err.value) and "--resume" not in str(err.value)
    for old in out.glob("checkpoint-*"):
        (old / "from-the-first-run").touch()
    again = run_stage(demo, 3, out, s2.model_dir, cfg, method="ltdr", overwrite=True)
    assert (
        again.global_step == 4
        and json.loads((again.model_dir / "moevl.json").read_text())["method"] == "ltdr"
    )
    assert not list(out.glob("checkpoint-*/from-the-first-run"))  # the earlier run's checkpoints were deleted


def test_a_non_finite_loss_stops_before_the_optimizer_step(demo, dense, tmp_path):
    _, s2 = dense
    cfg = demo_config(TINY, ["stage2.training.learning_rate=1e30", "stage2.training.max_steps=8"])
    with pytest.raises(NonFiniteTrainingError, match="non-finite"):
        run_stage(demo, 2, tmp_path, s2.model_dir, cfg)
    assert not (tmp_path / "model").exists()


def test_bad_input_is_refused_before_anything_is_created(demo, dense, tmp_path):
    _, s2 = dense
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        run_stage(demo, 1, tmp_path / "a", demo.init, resume=True)
    with pytest.raises(CheckpointError, match="model directory not found"):
        run_stage(demo, 2, tmp_path / "b", tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"config.json must be a model directory .* got a file"):
        run_stage(demo, 2, tmp_path / "b", demo.init / "config.json")
    with pytest.raises(ConfigError, match="only stage 3"):
        run_stage(demo, 1, tmp_path / "c", demo.init, method="stgc")
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(OutputDirError, match=r"not a directory|cannot be created"):
        run_stage(demo, 1, tmp_path / "file" / "out", demo.init)
    (tmp_path / "bad.json").write_text(
        json.dumps([{"id": "x", "conversations": [{"from": "gpt", "value": "a"}]}])
    )
    cfg = demo.cfg
    from moevl.vlm.train import train_stage

    with pytest.raises(DataError, match="'x'"):
        train_stage(
            cfg,
            stage=2,
            model=demo.init,
            output_dir=tmp_path / "d",
            data=tmp_path / "bad.json",
            progress=False,
        )
    for name in ("a", "b", "c", "d"):
        assert not (tmp_path / name).exists(), name


def test_an_image_that_fails_to_decode_mid_training_stops_in_one_line_or_is_skipped(demo, dense, tmp_path):
    """A TIFF cut short (read_records cannot see it: TIFF says nowhere how it ends) in a record that only training
    reaches: one DataError line (it was an OSError traceback from the collator, in a DataLoader worker here), the
    checkpoints kept; --resume --skip-bad-records then skips it, names it and counts it."""
    from PIL import Image

    s1, _ = dense
    records = json.loads(demo.files.instruct.read_text())
    folder = tmp_path / "data"
    shutil.copytree(demo.files.image_folder, folder)
    Image.open(folder / records[150]["image"]).save(folder / "cut.tiff")
    data = (folder / "cut.tiff").read_bytes()
    (folder / "cut.tiff").write_bytes(data[: len(data) * 2 // 3])
    records[150]["image"] = "cut.tiff"
    path = tmp_path / "instruct.json"
    path.write_text(json.dumps(records))
    cfg = demo_config(TINY, ["stage2.training.max_steps=30"])  # one epoch: every record is reached
    assert cfg.training_arguments(2)["dataloader_num_workers"] == 1
    common = dict(stage=2, model=s1.model_dir, output_dir=tmp_path / "out", data=path, image_folder=folder)
    with pytest.raises(DataError) as err:
        train_stage(cfg, **common, progress=False, log=lambda *_: None)
    message = str(err.value)
    assert message.startswith(
        f"record 'train-150' ({path}[150]): cannot decode image {folder / 'cut.tiff'}: OSError: "
    )
    assert "\n" not in message and "Traceback" not in message
    checkpoint = last_checkpoint(tmp_path / "out")
    assert checkpoint is not None and message.endswith(
        f"--resume --skip-bad-records continues from {checkpoint.name}, skipping such records"
    )
    assert not (tmp_path / "out" / "model").exists()
    logged = []
    skipping = demo_config(TINY, ["stage2.training.max_steps=30", "data.skip_bad_records=true"])
    result = train_stage(skipping, **common, resume=True, progress=False, log=logged.append)
    assert result.global_step == 30 and result.skipped_bad == 1
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "skipped_records.jsonl").read_text().splitlines()
    ]
    assert {r["id"] for r in rows} == {"train-150"}
    assert any(
        line.startswith("skipped 1 record(s) during training whose images did not decode") for line in logged
    )


def test_a_data_file_that_is_not_utf8_is_one_line_and_exit_2_from_the_command(demo, tmp_path):
    from typer.testing import CliRunner

    from moevl.cli import app

    records = json.loads(demo.files.instruct.read_text())[:3]
    records[1]["conversations"][1]["value"] = "café"
    data = tmp_path / "latin1.json"
    data.write_bytes(json.dumps(records, ensure_ascii=False).encode("latin-1"))
    args = ["train", "--stage", "2", "--model", str(demo.init), "--data", str(data), "--out", str(tmp_path / "out"),
            "--config", str(TINY), "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    at = data.read_bytes().index(b"\xe9")
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        f"error: {data} must be UTF-8 text, got byte 0xe9 at position {at} (line 1), which is not UTF-8; convert "
        "the file (e.g. iconv -f latin1 -t utf-8)"
    ]
    assert not (tmp_path / "out").exists()


def test_moe_layers_beyond_the_model_are_one_config_error(demo, dense, tmp_path):
    _, s2 = dense
    cfg = demo_config(TINY, ["moe.layers=[5]"])
    with pytest.raises(ConfigError, match=r"layers must be indices in \[0, 2\), got \[5\]"):
        run_stage(demo, 3, tmp_path / "out", s2.model_dir, cfg)
    assert not (tmp_path / "out").exists()


def test_skipped_records_are_named_and_the_saved_recipe_is_the_one_used(demo, tmp_path):
    good = json.loads(demo.files.instruct.read_text())[:8]
    bad = [{"id": f"bad{i}", "conversations": [{"from": "gpt", "value": "a"}]} for i in range(12)]
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(good + bad))
    cfg = demo_config(TINY, ["data.skip_bad_records=true", "stage2.training.max_steps=1"])
    logged = []
    from moevl.vlm.train import train_stage

    result = train_stage(
        cfg, stage=2, model=demo.init, output_dir=tmp_path / "out", data=data,
        image_folder=demo.files.image_folder, progress=False, log=logged.append,
    )  # fmt: skip
    line = next(m for m in logged if m.startswith("skipped"))
    assert line.startswith("skipped 12 bad record(s)") and line.endswith("'bad8', 'bad9' and 2 more")
    recipe = json.loads((result.model_dir / "moevl.json").read_text())["config"]
    assert recipe["model"] == str(demo.init) and recipe["data"]["train"] == str(data)


def test_a_recipe_without_deepspeed_gets_no_deepspeed_warning(demo, tmp_path):
    """DeepSpeed warned on every command that it set its accelerator to the CPU (accelerate imports it)."""
    cmd = [sys.executable, "-m", "moevl.cli", "train", "--stage", "1", "--model", str(demo.init), "--data",
           str(demo.files.captions), "--image-folder", str(demo.files.image_folder), "--out", str(tmp_path / "o"),
           "--config", str(TINY), "--max-steps", "1", "--no-progress"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    done = run(cmd, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "accelerator" not in done.stderr.lower(), done.stderr[-3000:]
    assert "step 1/1" in done.stdout  # the one step still gets its line


@pytest.mark.slow
def test_two_processes_with_torchrun_run_the_same_command(demo, dense, tmp_path):
    """DDP, gloo, CPU: ``moevl train`` unchanged under torchrun, stage 3 with STGC and LTDR."""
    _, s2 = dense
    cmd = [
        *torchrun(2), "-m", "moevl.cli", "train", "--stage", "3", "--method", "stgc+ltdr", "--config", str(TINY),
        "--model", str(s2.model_dir), "--data", str(demo.files.instruct),
        "--image-folder", str(demo.files.image_folder), "--out", str(tmp_path), "--no-progress",
        "--max-steps", "2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = run(cmd, timeout=300, env=env, cwd=ROOT)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 0, "\n".join(errors) + done.stderr[-3000:]
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert (tmp_path / "model" / "moevl-model.safetensors").is_file()
    # rank 0 alone talks (each rank printed every line before)
    lines = done.stdout.splitlines()
    for start in ("upcycled 1 MoE layer", "step 2/2 ·", "done:", "stage 3 done in"):
        assert sum(line.startswith(start) for line in lines) == 1, (start, done.stdout)
    # the other ranks still report their own errors: here every rank has the same one
    bad = [*cmd[: cmd.index("--out") + 1], str(tmp_path / "bad"), "--set", "moe.top_k=9"]
    done = run(bad, timeout=300, env=env, cwd=ROOT)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and len(errors) == 2 and "got 9" in errors[0], done.stderr[-3000:]
