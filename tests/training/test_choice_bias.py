"""Auxiliary-loss-free balancing (``MoESettings.bias_update_rate``): the update rule against a loop, the trainer's
update from the whole batch of an optimizer step, the bias in checkpoints and exports, adopted models."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from moevl.checkpoint import load_moe_model, save_moe_model
from moevl.checkpoint.plan import plan_export
from moevl.hf import adopt, moe_blocks, moe_state, upcycle
from moevl.hf.runtime import update_choice_biases
from moevl.moe.routing import update_choice_bias_
from moevl.training import MoETrainer
from tests.fixtures.tiny import causal_lm, native_moe


def test_the_update_rule_against_a_loop():
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(6, generator=g)
    load = torch.tensor([5.0, 1.0, 3.0, 3.0, 0.0, 6.0])  # mean 3: two experts exactly at the mean
    expected = bias.clone()
    mean = sum(load.tolist()) / 6
    for i, c in enumerate(load.tolist()):
        expected[i] += 0.01 * (1.0 if mean > c else -1.0 if mean < c else 0.0)
    assert update_choice_bias_(bias, load, 0.01) is bias
    torch.testing.assert_close(bias, expected, atol=0, rtol=0)


def _load_recorder(model):
    """Per forward, {layer: (E,) tokens routed to each expert} read from the records (a loop over tokens)."""
    seen = []

    def hook(module, args, output):
        per_layer = {}
        for layer, rec in moe_state(module).context.records.items():
            counts = [0.0] * rec.probs.shape[1]
            for t in range(rec.indices.shape[0]):
                if rec.token_mask[t]:
                    for e in rec.indices[t].tolist():
                        if e >= 0:
                            counts[e] += 1
            per_layer[layer] = torch.tensor(counts)
        seen.append(per_layer)

    model.register_forward_hook(hook)
    return seen


def test_the_trainer_moves_the_bias_by_the_load_of_each_optimizer_steps_whole_batch(tmp_path):
    torch.manual_seed(0)
    model = upcycle(causal_lm("llama"), num_experts=4, top_k=2, balance_coef=0.0, bias_update_rate=0.1)
    blocks = moe_blocks(model)
    assert all(b.choice_bias() is not None and torch.all(b.choice_bias() == 0) for b in blocks)
    seen = _load_recorder(model)
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(8):
        ids = torch.randint(0, 50, (9,), generator=g)
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    MoETrainer(model=model, args=args, train_dataset=data).train()
    assert len(seen) == 4  # 2 optimizer steps of 2 micro-steps
    for block in blocks:
        i = block.layer_index
        expected = torch.zeros(4)
        for step in (seen[0:2], seen[2:4]):  # the bias moves once per optimizer step, by its whole batch
            load = step[0][i] + step[1][i]
            expected += 0.1 * torch.sign(load.mean() - load)
        torch.testing.assert_close(block.choice_bias(), expected, atol=1e-6, rtol=0)
    assert any(torch.any(b.choice_bias() != 0) for b in blocks)


def test_the_bias_is_part_of_the_checkpoint_and_of_no_native_class(tmp_path):
    model = upcycle(causal_lm("llama"), num_experts=4, top_k=2, layers="all", bias_update_rate=0.001)
    update_choice_biases(model, {b.layer_index: torch.arange(4.0) for b in moe_blocks(model)})
    save_moe_model(model, tmp_path)
    reloaded = load_moe_model(tmp_path)
    for ours, theirs in zip(moe_blocks(model), moe_blocks(reloaded), strict=True):
        torch.testing.assert_close(theirs.choice_bias(), ours.choice_bias(), atol=0, rtol=0)
        assert torch.any(ours.choice_bias() != 0)
    plan = plan_export(model)  # all-layer Llama would export to Mixtral, which has no such bias
    assert plan.native_class is None and "aux-loss-free choice bias" in plan.reason


def test_an_adopted_model_updates_its_own_bias_or_is_refused():
    model = adopt(native_moe("deepseek_v3"), balance_coef=0.0, bias_update_rate=0.01)
    block = moe_blocks(model)[0]
    native = block.native.get_submodule(block.rule.bias_at[0])
    before = getattr(native, block.rule.bias_at[1]).clone()
    load = torch.arange(float(block.experts.num_experts))
    update_choice_biases(model, {block.layer_index: load})
    after = getattr(native, block.rule.bias_at[1])  # the native e_score_correction_bias itself
    torch.testing.assert_close(after.reshape(-1), before.reshape(-1) + 0.01 * torch.sign(load.mean() - load))
    with pytest.raises(ValueError, match=r"bias_update_rate=0.01 updates the model's own choice bias, but"):
        adopt(native_moe("qwen3_moe"), balance_coef=0.0, bias_update_rate=0.01)
