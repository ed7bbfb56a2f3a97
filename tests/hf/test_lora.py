"""LoRA on upcycled and adopted models (moevl.hf.lora): B = 0 changes nothing, the adapters alone train,
merging gives the adapter model's logits with the original keys, checkpoints reload, export merges."""

import json

import pytest
import torch

from moevl.checkpoint.export import export
from moevl.checkpoint.format import load_moe_model, save_moe_model
from moevl.hf import adopt, moe_blocks, moe_state, upcycle
from moevl.hf.lora import apply_lora, is_lora_parameter, merge_lora
from moevl.hf.runtime import set_experts_layout
from moevl.moe.lora import LoRAConfig
from tests.fixtures.tiny import causal_lm, llava_batch, native_moe, tiny_llava
from tests.fixtures.tiny_export import make_routing_matter, text_batch

ALL = ("experts", "routers", "attention")


def _with(model, lora):
    return model if lora is None else apply_lora(model, lora)


def _upcycled_llama(lora=None):
    model = make_routing_matter(upcycle(causal_lm("llama"), num_experts=4, top_k=2, layers="all"))
    return _with(model, lora).eval()


def _upcycled_llava(lora=None):
    return _with(make_routing_matter(upcycle(tiny_llava(), num_experts=4, top_k=2)), lora).eval()


def _upcycled_llava_all(lora=None):
    return _with(
        make_routing_matter(upcycle(tiny_llava(), num_experts=4, top_k=2, layers="all")), lora
    ).eval()


def _adopted(family):
    return lambda lora=None: _with(adopt(native_moe(family)), lora).eval()


# name: (builder taking lora=, batch builder)
MODELS = {
    "llama_upcycled": (_upcycled_llama, text_batch),
    "llava_upcycled": (_upcycled_llava, lambda: llava_batch((1, 2), pad_side="left")),
    "mixtral_adopted": (_adopted("mixtral"), text_batch),
    "qwen2_moe_adopted": (_adopted("qwen2_moe"), text_batch),
    "deepseek_v3_adopted": (_adopted("deepseek_v3"), text_batch),
}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


def _train_adapters(model, seed=0):
    """Stand-in for training: every B (and A) moved off its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_lora_parameter(name):
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.2)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_b_zero_changes_nothing_and_merge_keeps_the_adapter_models_logits(name):
    build, batch_of = MODELS[name]
    batch = batch_of()
    plain = build()
    model = build(lora=LoRAConfig(r=4, alpha=8.0, targets=ALL))
    keys = set(plain.state_dict())
    adapter_keys = set(model.state_dict()) - keys
    assert any("experts" in k for k in adapter_keys) and any(
        "lora" in k and "attn" in k for k in adapter_keys
    )
    assert any(".router.lora." in k or ".gate.lora." in k for k in adapter_keys)
    # experts with adapters run in the sorted row layout (choose_capacity); the plain model in the same one,
    # for a bit-for-bit comparison whatever the thread count (auto pads on multi-threaded CPU)
    set_experts_layout(plain, "sorted")
    assert torch.equal(_logits(model, batch), _logits(plain, batch))  # B = 0: exactly the same model

    _train_adapters(model)
    adapted = _logits(model, batch)
    assert not torch.allclose(adapted, _logits(plain, batch), atol=1e-3)  # the adapters act
    merge_lora(model)
    assert moe_state(model).settings.lora is None and model.config.moevl["lora"] is None
    state = model.state_dict()
    assert set(state) == keys  # the original names and nothing else
    torch.testing.assert_close(_logits(model, batch), adapted, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama_upcycled", "mixtral_adopted"])
def test_only_the_adapters_and_untargeted_parts_get_gradients(name):
    build, batch_of = MODELS[name]
    model = build(lora=LoRAConfig(r=4, targets=("experts", "attention"))).train()
    _train_adapters(model)
    batch = batch_of()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for n, p in model.named_parameters():
        if is_lora_parameter(n):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        elif ".experts." in n or ".base_layer." in n:
            assert not p.requires_grad and p.grad is None, n
    routers = [p for b in moe_blocks(model) for p in b.router_parameters()]
    assert all(p.requires_grad for p in routers)  # not targeted: the router weights keep training


@pytest.mark.parametrize("name", ["llava_upcycled", "qwen2_moe_adopted"])
def test_checkpoint_with_adapters_reloads_exactly(name, tmp_path):
    build, batch_of = MODELS[name]
    model = build(lora=LoRAConfig(r=4, alpha=4.0, targets=ALL))
    _train_adapters(model)
    save_moe_model(model, tmp_path / "ckpt")
    loaded = load_moe_model(tmp_path / "ckpt")
    assert moe_state(loaded).settings.lora == moe_state(model).settings.lora
    batch = batch_of()
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["llama_upcycled", "mixtral_adopted"])
def test_export_merges_the_adapters_into_a_native_checkpoint(name, tmp_path):
    import transformers

    build, batch_of = MODELS[name]
    model = build(lora=LoRAConfig(r=4, targets=ALL))
    _train_adapters(model)
    batch = batch_of()
    expected = _logits(model, batch)
    result = export(model, tmp_path / "out", require_native=True)
    assert result.format == "native"
    assert moe_state(model).settings.lora is not None  # export merged a copy, not the caller's model
    native = getattr(transformers, result.model_class).from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(native, batch), expected, atol=2e-5, rtol=1e-5)


def test_transposed_native_experts_merge_exactly():
    from tests.hf.test_families import tiny_model

    model = adopt(tiny_model("aria_text"), lora=LoRAConfig(r=4, targets=("experts",))).eval()
    assert moe_blocks(model)[0].spec.transposed  # native (E, in, out) tensors, adapters in (E, out, in)
    assert moe_state(model).settings.lora.targets == ("experts",)  # adopt(..., lora=) applies them
    _train_adapters(model)
    batch = text_batch()
    adapted = _logits(model, batch)
    merge_lora(model)
    torch.testing.assert_close(_logits(model, batch), adapted, atol=2e-5, rtol=1e-5)


def test_experts_moevl_does_not_compute_are_refused_by_name():
    from tests.hf.test_families import tiny_model

    with pytest.raises(ValueError, match=r"GptOssExperts applies its own gate function.*leave 'experts' out"):
        adopt(tiny_model("gpt_oss"), lora=LoRAConfig(targets=("experts",)))


def test_bad_targets_are_refused_by_name():
    with pytest.raises(ValueError, match=r"lora.targets\[0\] must be one of"):
        LoRAConfig(targets=("mlp",))
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        merge_lora(_upcycled_llama())


@pytest.mark.parametrize("name", ["llama_upcycled", "llava_upcycled_all", "mixtral_adopted"])
def test_adapter_export_in_peft_format_loads_into_the_native_base(name, tmp_path):
    import transformers
    from peft import PeftModel

    build, batch_of = {**MODELS, "llava_upcycled_all": (_upcycled_llava_all, MODELS["llava_upcycled"][1])}[
        name
    ]
    model = build(lora=LoRAConfig(r=4, targets=ALL))
    _train_adapters(model)
    batch = batch_of()
    expected = _logits(model, batch)
    result = export(model, tmp_path / "out", lora="adapter")
    adapter_config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((tmp_path / "out").resolve())
    base = getattr(transformers, result.model_class).from_pretrained(tmp_path / "out").eval()
    plain = _logits(base, batch)
    assert not torch.allclose(plain, expected, atol=1e-3)  # the base alone is the model before the adapters
    served = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()
    torch.testing.assert_close(_logits(served, batch), expected, atol=2e-5, rtol=1e-5)


def test_adapter_export_without_a_native_class_is_refused_with_the_reason(tmp_path):
    model = _upcycled_llava(lora=LoRAConfig(r=4))  # alternate layers: no native class
    with pytest.raises(
        ValueError, match="PEFT adapters need a native class to load into, and Mixtral has no dense layers"
    ):
        export(model, tmp_path / "out", lora="adapter")


def test_stgc_runs_on_the_adapters_and_its_cel_reaches_the_router_adapter():
    from moevl.stgc import STGCConfig

    model = make_routing_matter(
        upcycle(causal_lm("llama"), num_experts=4, top_k=2, layers="all", stgc=STGCConfig.paper(weight=1.0))
    )
    apply_lora(model, LoRAConfig(r=4, targets=("experts", "routers")))
    _train_adapters(model)
    model.train()
    batch = text_batch()
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    records = moe_state(model).context.records
    assert records and all(r.stgc.ready and r.stgc.cosine.numel() > 0 for r in records.values())
    assert any(r.stgc.conflicts.any() for r in records.values())  # the CEL has something to push
    router_lora = [p for n, p in model.named_parameters() if ".router.lora." in n]
    assert router_lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in router_lora)
    assert all(
        p.grad is None for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))
    )


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("concatenated", [False, True])
@pytest.mark.parametrize("first", [False, True])
def test_a_merged_update_lands_where_moevls_view_of_the_native_tensor_reads_it(
    transposed, concatenated, first
):
    """Every native layout (transposed, interleaved gate/up): the update put back in native layout is read
    by moevl's view as the update itself (the interleaved layout has no family that adopts with LoRA here)."""
    from moevl.hf.adopt import ExpertsSpec, to_moevl_layout, to_native_layout

    spec = ExpertsSpec(
        gated=True, transposed=transposed, concatenated=concatenated, activation=None, own_function=True
    )
    out, inp = (2 * 6, 5) if first else (5, 6)  # (E, out, in) in moevl's layout
    g = torch.Generator().manual_seed(0)
    native = torch.randn((3, inp, out) if transposed else (3, out, inp), generator=g)
    delta = torch.randn(3, out, inp, generator=g)
    seen = to_moevl_layout(native + to_native_layout(delta, spec, first=first), spec, first=first)
    torch.testing.assert_close(seen, to_moevl_layout(native, spec, first=first) + delta, atol=0, rtol=0)
