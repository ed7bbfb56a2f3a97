import json

import torch
from transformers import TrainingArguments

from moevl.hf import moe_state, upcycle
from moevl.stgc import STGCConfig
from moevl.training import MoETrainer, routing_statistics
from moevl.training.trainer import console_line
from tests.fixtures.tiny import IMAGE_TOKEN, llava_batch, tiny_llava


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=8):
        self.items = []
        for i in range(n):
            b = llava_batch((1,), seed=i)
            labels = b["input_ids"].clone()
            labels[labels == IMAGE_TOKEN] = -100
            self.items.append(
                {
                    "input_ids": b["input_ids"][0],
                    "attention_mask": b["attention_mask"][0],
                    "pixel_values": b["pixel_values"][0],
                    "labels": labels[0],
                }
            )

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_stgc_and_ltdr_in_llava_trained_by_hf_trainer(tmp_path):
    model = upcycle(
        tiny_llava(), num_experts=4, top_k=2, router="ltdr", stgc=STGCConfig(threshold=0.2), freeze_dense=True
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        logging_steps=2,
        learning_rate=1e-2,
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=True,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        disable_tqdm=True,
    )
    trainer = MoETrainer(model=model, args=args, train_dataset=_Data())
    trainer.train()
    stats = json.loads((tmp_path / "moe_stats.json").read_text())
    assert len(stats["history"]) == 2
    last = stats["history"][-1]
    for key in (
        "stgc/conflict_ratio",
        "stgc/cosine_mean",
        "stgc/cel",
        "ltdr/tail_share",
        "moe/experts_per_token",
    ):
        assert key in last, key
    assert 0 < last["ltdr/tail_share"] < 1 and 2 < last["moe/experts_per_token"] <= 4
    assert -1 <= last["stgc/cosine_mean"] <= 1
    loads = stats["expert_load"]["0"]
    assert sum(loads["vision"]) > 0 and sum(loads["text"]) > 0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".router." in n or ".experts." in n for n in changed)
    assert any(".router." in n for n in changed)
    assert list(tmp_path.glob("**/events.out.tfevents*")), "TensorBoard logs were written"


def test_routing_statistics_hand_checked():
    model = upcycle(tiny_llava(), num_experts=4, top_k=2, layers=[1])
    batch = llava_batch((2,), pad_side="right")
    with torch.no_grad():
        model(**batch)
    scalars, loads = routing_statistics(model)
    rec = moe_state(model).context.records[1]
    assert scalars["moe/experts_per_token"] == 2.0
    n_vision = int(rec.vision_mask.sum())
    assert sum(loads[1]["vision"]) == 2 * n_vision
    assert sum(loads[1]["text"]) == 2 * (int(rec.token_mask.sum()) - n_vision)
    assert "stgc/conflict_ratio" not in scalars and "ltdr/tail_share" not in scalars


def _two_steps_saving_at_2(output_dir) -> dict:
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=2,
        save_steps=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )


def test_resume_restores_every_weight_of_an_upcycled_llava(tmp_path):
    def make(seed):
        return upcycle(tiny_llava(seed=seed), num_experts=4, top_k=2, stgc=STGCConfig(), freeze_dense=True)

    args = _two_steps_saving_at_2(tmp_path)
    trainer = MoETrainer(model=make(0), args=TrainingArguments(**args), train_dataset=_Data())
    trainer.train()
    trained = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    fresh = make(1)  # other weights everywhere
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in trained.items())
    resumed = MoETrainer(model=fresh, args=TrainingArguments(**args), train_dataset=_Data())
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_a_dense_llava_saves_its_own_key_names_and_resumes_every_weight(tmp_path, monkeypatch):
    from safetensors import safe_open

    saves = []
    save_pretrained = type(tiny_llava()).save_pretrained

    def spy(self, *args, **kwargs):  # how the Trainer saves: the class's method, never one set on the model
        saves.append(("save_pretrained" in vars(self), kwargs.get("save_original_format")))
        return save_pretrained(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_llava()), "save_pretrained", spy)
    args = _two_steps_saving_at_2(tmp_path)
    trainer = MoETrainer(model=tiny_llava(0), args=TrainingArguments(**args), train_dataset=_Data())
    trainer.train()
    assert saves == [(False, False)]
    trained = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    checkpoint = tmp_path / "checkpoint-2"
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        assert set(f.keys()) <= set(trained)  # the model's own names (the legacy ones would not resume)
    assert (checkpoint / "training_args.bin").is_file()
    fresh = tiny_llava(seed=1)
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in trained.items())
    resumed = MoETrainer(model=fresh, args=TrainingArguments(**args), train_dataset=_Data())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_a_router_that_stays_uniform_is_reported_once(tmp_path):
    import pytest

    from moevl.training import UniformRoutingMonitor

    model = upcycle(tiny_llava(), num_experts=4, top_k=2, freeze_dense=True)
    for name, p in model.named_parameters():
        if ".router." in name:
            torch.nn.init.zeros_(p)  # uniform routing that cannot move
            p.requires_grad_(False)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = MoETrainer(model=model, args=args, train_dataset=_Data())
    trainer.routing_monitor = UniformRoutingMonitor(patience=2)
    with pytest.warns(RuntimeWarning, match="uniform") as record:
        trainer.train()
    assert len([w for w in record if "uniform" in str(w.message)]) == 2  # one per MoE layer, once
    stats = json.loads((tmp_path / "moe_stats.json").read_text())
    assert len(stats["routing_warnings"]) == 2
    assert stats["history"][-1]["router/entropy_normalized"] == pytest.approx(1.0)


def test_console_lines_are_short_and_readable():
    logs = {
        "loss": 5.69612,
        "moe/balance_loss": 1.26843,
        "learning_rate": 8.5e-4,
        "epoch": 0.06,
        "other": 3.0,
    }
    assert console_line(logs, 10, 400) == "step 10/400 · loss 5.696 · balance 1.268 · lr 0.00085"
    summary = {
        "train_runtime": 412.34,
        "train_samples_per_second": 98.123,
        "train_loss": 2.0712,
        "epoch": 1.0,
    }
    assert console_line(summary, 400, 400) == "done: 412.3 s · 98.1 samples/s · train loss 2.071"
    assert console_line({"epoch": 0.5}, 3, 8) is None  # nothing worth a line


def test_a_run_shorter_than_logging_steps_still_logs_its_last_step(tmp_path, capsys):
    model = upcycle(tiny_llava(), num_experts=4, top_k=2)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    MoETrainer(model=model, args=args, train_dataset=_Data()).train()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" · ")[0] for line in lines if line.startswith("step ")] == ["step 3/3"]
    assert any(line.startswith("done: ") for line in lines)
    assert len(json.loads((tmp_path / "moe_stats.json").read_text())["history"]) == 1
