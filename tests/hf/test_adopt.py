import copy

import pytest
import torch

from moevl.hf import MoESettings, adopt, moe_blocks, moe_state, upcycle
from moevl.hf.adopt import AdoptedMoEBlock, is_native_moe
from moevl.moe import LTDRConfig
from moevl.moe.routing import balance_loss
from moevl.stgc import STGCConfig
from tests.fixtures.tiny import (
    QWEN3VL_IMAGE,
    QWEN3VL_VIDEO,
    causal_lm,
    native_moe,
    qwen3_vl_batch,
    tiny_qwen3_vl_moe,
)

# case: (family, config overrides)
CASES = {
    "mixtral": ("mixtral", {}),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe_raw": ("qwen3_moe", {"norm_topk_prob": False}),
    "olmoe": ("olmoe", {}),
    "deepseek_v2": ("deepseek_v2", {}),
    "deepseek_v2_groups": ("deepseek_v2", {"topk_method": "group_limited_greedy", "num_experts_per_tok": 3}),
    "deepseek_v3": ("deepseek_v3", {}),
}
NATIVE_AUX_LOSS = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"}  # DeepSeek has none in transformers
VISION_ID = 7  # a text model with a designated "vision" token, for LTDR's tail rule


def _native(case, **extra):
    family, overrides = CASES[case]
    return native_moe(family, **overrides, **extra)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 90, (3, 11), generator=g)
    ids[:, 2:5] = VISION_ID
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    return ids, mask


def _labels(ids, mask):
    """Labels predicted from real positions only: moevl gives padding no expert output, so the
    logits AT padding differ from the native model's (those of real tokens do not)."""
    predicted_from_real = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1).bool()
    return ids.masked_fill(~(mask.bool() & predicted_from_real), -100)


def _real_logits(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits[mask.bool()]


@pytest.mark.parametrize("case", sorted(CASES))
def test_adopted_model_keeps_logits_keys_and_gradients(case):
    native = _native(case)
    model = adopt(copy.deepcopy(native))
    ids, mask = _batch()
    sparse = [i for i, layer in enumerate(native.model.layers) if hasattr(layer.mlp, "experts")]
    assert [b.layer_index for b in moe_blocks(model)] == sparse
    assert all(isinstance(b, AdoptedMoEBlock) for b in moe_blocks(model))
    diff = (_real_logits(model, ids, mask) - _real_logits(native, ids, mask)).abs().max()
    assert diff < 2e-6, diff
    # the same state-dict keys and tensors: the native class loads what the adopted model saves
    ref, got = native.state_dict(), model.state_dict()
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    fresh = type(native)(native.config)
    fresh.load_state_dict(got, strict=True)
    torch.testing.assert_close(
        _real_logits(fresh.eval(), ids, mask), _real_logits(native, ids, mask), rtol=0, atol=0
    )
    # one backward: every gradient equals the native model's (router, experts, shared experts, ...)
    for m in (native, model):
        m.train()
        m(input_ids=ids, attention_mask=mask, labels=_labels(ids, mask)).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for n, p in native.named_parameters():
        if p.grad is None:
            assert grads[n] is None, n
        else:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert all(grads[f"model.layers.{i}.mlp.gate.weight"].abs().sum() > 0 for i in sparse)


@pytest.mark.parametrize("case", sorted(CASES))
def test_stgc_gradient_reaches_the_native_router_weight(case):
    native = _native(case)
    ids, mask = _batch(seed=1)
    grads = {}
    for weight in (0.0, 1.0):
        model = adopt(copy.deepcopy(native), stgc=STGCConfig(threshold=0.3, weight=weight)).train()
        model(input_ids=ids, attention_mask=mask, labels=_labels(ids, mask)).loss.backward()
        recs = moe_state(model).context.records
        assert recs and all(r.stgc.ready for r in recs.values())
        assert sum(int(r.stgc.conflicts.sum()) for r in recs.values()) > 0
        grads[weight] = {i: model.model.layers[i].mlp.gate.weight.grad.clone() for i in recs}
    for i in grads[0.0]:
        assert not torch.allclose(grads[1.0][i], grads[0.0][i]), i


@pytest.mark.parametrize("case", sorted(CASES))
def test_ltdr_tail_tokens_get_a_experts_on_adopted_models(case):
    native = _native(case)
    native.config.image_token_id = VISION_ID
    k = native.config.num_experts_per_tok
    ltdr = LTDRConfig(tail_top_k=k + 1, language_only_balance=False)
    model = adopt(native, router="ltdr", ltdr=ltdr)
    ids, mask = _batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    vision = ((ids == VISION_ID) & mask.bool()).reshape(-1)
    for rec in moe_state(model).context.records.values():
        assert torch.equal(rec.vision_mask, vision)
        assert rec.tail_mask.any() and not rec.tail_mask[~vision].any()
        n = rec.experts_per_token
        assert torch.all(n[rec.tail_mask] == k + 1) and torch.all(n[~rec.tail_mask & rec.token_mask] == k)
        assert torch.all(n[~rec.token_mask] == 0)


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3"])
def test_aux_loss_is_the_models_own_unless_moevl_balancing_is_asked(case):
    native = _native(case)
    ids, mask = _batch()
    with torch.no_grad():
        ref = native(input_ids=ids, attention_mask=mask, labels=_labels(ids, mask), output_router_logits=True)
        task = native(
            input_ids=ids, attention_mask=mask, labels=_labels(ids, mask), output_router_logits=False
        ).loss
    model = adopt(copy.deepcopy(native))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=_labels(ids, mask), output_router_logits=True)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    if case in NATIVE_AUX_LOSS:
        assert not torch.allclose(ref.loss, task)  # the native auxiliary loss really is in play
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-6, atol=1e-7)
    # moevl's balancing instead: the native term is switched off, moevl's added
    model = adopt(copy.deepcopy(native), balance_coef=0.05, z_loss_coef=0.01)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=_labels(ids, mask), output_router_logits=True)
    recs = moe_state(model).context.records.values()
    expected = task + sum(0.05 * r.balance_loss + 0.01 * r.z_loss for r in recs)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)


def test_qwen3_vl_moe_image_and_video_tokens_are_vision():
    native = tiny_qwen3_vl_moe()
    batch = qwen3_vl_batch()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = native(**batch).logits
        out = adopt(copy.deepcopy(native))(**batch).logits
    assert (out[real] - ref[real]).abs().max() < 2e-6
    model = adopt(
        copy.deepcopy(native),
        router="ltdr",
        ltdr=LTDRConfig(tail_top_k=3),
        balance_coef=0.01,
        stgc=STGCConfig(threshold=0.3),
    )
    assert moe_state(model).context.vision_token_ids == (QWEN3VL_IMAGE, QWEN3VL_VIDEO)
    with torch.no_grad():
        model(**batch)
    ids, tok = batch["input_ids"], real.reshape(-1)
    vision = torch.isin(ids, torch.tensor([QWEN3VL_IMAGE, QWEN3VL_VIDEO])).reshape(-1) & tok
    assert int(((ids == QWEN3VL_VIDEO).reshape(-1) & tok).sum()) == 8 and int(vision.sum()) == 16
    for rec in moe_state(model).context.records.values():
        assert torch.equal(rec.vision_mask, vision)
        assert rec.tail_mask.any() and not rec.tail_mask[~vision].any()
        assert torch.all(rec.experts_per_token[rec.tail_mask] == 3)
        # MsDaR: the balancing loss counts text tokens only
        torch.testing.assert_close(rec.balance_loss, balance_loss(rec.probs, rec.indices, tok & ~vision))
    # training: the CEL gradient reaches the native router weight
    model.train()
    model(**batch, labels=_labels(ids, batch["attention_mask"])).loss.backward()
    assert all(r.stgc.ready for r in moe_state(model).context.records.values())
    grad = model.model.language_model.layers[0].mlp.gate.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_is_native_moe_and_refusals():
    native = _native("mixtral")
    assert is_native_moe(native)
    assert not is_native_moe(causal_lm("llama"))
    assert not is_native_moe(upcycle(causal_lm("llama"), num_experts=2, top_k=1))
    with pytest.raises(ValueError, match="no transformers-native sparse MoE block"):
        adopt(causal_lm("llama"))
    with pytest.raises(ValueError, match="adopt instead"):
        upcycle(copy.deepcopy(native), num_experts=4, top_k=2)
    for kwargs, match in [
        (dict(num_experts=5), "num_experts=5"),
        (dict(top_k=1), "top_k=1"),
        (dict(jitter=0.1), "jitter"),
        (dict(router="ltdr"), "language-only"),
        (dict(layers=[7]), "layers"),
    ]:
        with pytest.raises(ValueError, match=match):
            adopt(copy.deepcopy(native), **kwargs)
    with pytest.raises(ValueError, match="not both"):
        adopt(copy.deepcopy(native), MoESettings(), balance_coef=0.1)
    native_params = [native.model.layers[0].mlp.gate.weight, native.model.layers[0].mlp.experts.gate_up_proj]
    adopted = adopt(native)
    block = adopted.model.layers[0].mlp
    assert block.gate.weight is native_params[0] and block.experts.gate_up_proj is native_params[1]  # no copy
    assert not is_native_moe(adopted)
    with pytest.raises(ValueError, match="already"):
        adopt(adopted)


def test_unknown_router_class_is_named_never_approximated():
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    class HashRouter(MixtralTopKRouter):  # same structure, a rule moevl does not know: the k worst experts
        def forward(self, hidden_states):
            logits = super().forward(hidden_states)[0]
            index = (-logits).topk(self.top_k, dim=-1).indices
            return logits, logits.softmax(-1).gather(1, index), index

    model = _native("mixtral")
    old = model.model.layers[1].mlp.gate
    model.model.layers[1].mlp.gate = HashRouter(model.config)
    model.model.layers[1].mlp.gate.load_state_dict(old.state_dict())
    assert is_native_moe(model)
    with pytest.raises(
        ValueError, match=r"no candidate rule reproduces MixtralSparseMoeBlock \(router HashRouter\)"
    ):
        adopt(model)
    # the refused model is left as it was: native blocks, native experts, logits unchanged
    assert is_native_moe(model) and all(not isinstance(m, AdoptedMoEBlock) for m in model.modules())

    class OtherBlock(torch.nn.Module):  # a known router in a block moevl does not know
        def __init__(self, block):
            super().__init__()
            self.gate, self.experts = block.gate, block.experts

    model = _native("mixtral")
    model.model.layers[0].mlp = OtherBlock(model.model.layers[0].mlp)
    with pytest.raises(ValueError, match="OtherBlock"):
        adopt(model)


def test_dense_layers_of_qwen2_moe_stay_dense_and_layers_select_sparse_ones():
    model = adopt(_native("qwen2_moe"))  # mlp_only_layers=[1]
    assert type(model.model.layers[1].mlp).__name__ == "Qwen2MoeMLP"
    assert moe_state(model).settings.layers == (0, 2)
    stepped = _native("qwen2_moe", decoder_sparse_step=2, mlp_only_layers=[])
    assert [type(layer.mlp).__name__ for layer in stepped.model.layers][1] == "Qwen2MoeSparseMoeBlock"
    with pytest.raises(ValueError, match=r"layers \[0\] are not sparse"):
        adopt(copy.deepcopy(stepped), layers=[0, 1])
    only = adopt(stepped, layers=[1])
    assert [b.layer_index for b in moe_blocks(only)] == [1]
    assert MoESettings.from_dict(only.config.moevl) == moe_state(only).settings


def test_freeze_dense_trains_routers_experts_and_shared_experts_only():
    model = adopt(_native("qwen2_moe"), freeze_dense=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        n for n, _ in model.named_parameters() if n.startswith(("model.layers.0.mlp.", "model.layers.2.mlp."))
    }
    assert trainable == expected
    assert any(".shared_expert_gate." in n for n in trainable) and any(".gate.weight" in n for n in trainable)


def test_mixtral_input_jitter_is_kept_in_training():
    native = _native("mixtral", router_jitter_noise=0.2).train()
    model = adopt(copy.deepcopy(native)).train()
    ids, mask = _batch()
    torch.manual_seed(5)
    with torch.no_grad():
        ref = native(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(5)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (out[real] - ref[real]).abs().max() < 2e-6
    torch.manual_seed(6)
    with torch.no_grad():
        other = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(other[real], out[real])  # the noise is really there


@pytest.mark.parametrize("case", ["mixtral", "deepseek_v3"])
def test_adopted_model_saves_as_the_native_class_and_generates_the_same(case, tmp_path):
    native = _native(case)
    model = adopt(copy.deepcopy(native))
    ids, mask = _batch()
    model.save_pretrained(tmp_path)  # Mixtral: transformers' original per-expert key format
    reloaded = type(native).from_pretrained(tmp_path).eval()  # plain transformers, native class
    ref = _real_logits(native, ids, mask)
    torch.testing.assert_close(_real_logits(reloaded, ids, mask), ref, rtol=0, atol=0)  # every weight back
    assert (_real_logits(model, ids, mask) - ref).abs().max() < 2e-6
    prompt = ids[:2, :6]
    with torch.no_grad():
        a = native.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
        b = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)


def test_gradient_checkpointing_keeps_stgc_gradients():
    native = _native("deepseek_v3")
    ids, mask = _batch(seed=2)
    grads = []
    for checkpointing in (False, True):
        model = adopt(copy.deepcopy(native), stgc=STGCConfig(threshold=0.3)).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=ids, attention_mask=mask, labels=_labels(ids, mask)).loss.backward()
        assert sum(int(r.stgc.conflicts.sum()) for r in moe_state(model).context.records.values()) > 0
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_bf16_adopted_model_is_within_a_bf16_rounding_of_the_native(case):
    native = _native(case).to(torch.bfloat16)
    model = adopt(copy.deepcopy(native))
    ids, mask = _batch()
    ref, out = _real_logits(native, ids, mask), _real_logits(model, ids, mask)
    assert out.dtype == ref.dtype == torch.bfloat16
    ref, out = ref.float(), out.float()
    assert ref.abs().max() < 1.0
    # the routing is computed as the native router does (its logits, fp32 softmax/sigmoid); the
    # combine rounds to bf16 at another point than transformers' eager loop: one bf16 ulp of a
    # logit below 1 is 2^-8
    assert (out - ref).abs().max() <= 2**-8


def test_adopted_model_trains_with_moe_trainer(tmp_path):
    import json

    from transformers import TrainingArguments

    from moevl.training import MoETrainer

    native = _native("qwen3_moe", output_router_logits=True)  # the model's own aux loss in training
    model = adopt(native, stgc=STGCConfig(threshold=0.3), freeze_dense=True)
    before = model.model.layers[0].mlp.gate.weight.detach().clone()
    ids, mask = _batch()
    rows = [
        {"input_ids": i, "attention_mask": m, "labels": lab}
        for i, m, lab in zip(ids, mask, _labels(ids, mask), strict=True)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=3,
        max_steps=3,
        logging_steps=1,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    MoETrainer(model=model, args=args, train_dataset=rows).train()
    stats = json.loads((tmp_path / "moe_stats.json").read_text())
    assert len(stats["history"]) == 3 and stats["history"][-1]["stgc/conflict_ratio"] > 0
    assert not torch.equal(model.model.layers[0].mlp.gate.weight, before)


def test_export_of_an_adopted_model_notes_that_ltdr_changes_inference(tmp_path):
    from moevl.checkpoint import export

    ltdr = LTDRConfig(tail_top_k=3)
    model = adopt(tiny_qwen3_vl_moe(), router="ltdr", ltdr=ltdr, balance_coef=0.01)
    result = export(model, tmp_path / "tail")
    assert result.format == "moevl"
    assert any("LTDR changes inference" in n and "only without LTDR" in n for n in result.notes), result.notes
    # the tail rule off (a == k): the native class is exact again, and nothing claims otherwise
    same = adopt(tiny_qwen3_vl_moe(), router="ltdr", ltdr=LTDRConfig(tail_top_k=2), balance_coef=0.01)
    result = export(same, tmp_path / "no_tail")
    assert result.format == "native" and not any("LTDR changes inference" in n for n in result.notes)
