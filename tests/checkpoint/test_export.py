"""``export``: native checkpoints that plain transformers loads with the same logits and greedy
generations, and the moevl format (with the reason) where no native class is exact."""

import json

import pytest
import torch

from moevl.checkpoint.export import export
from moevl.checkpoint.format import WEIGHTS_NAME, is_moevl_checkpoint, load_moe_model
from moevl.checkpoint.plan import plan_export
from moevl.hf import adopt, moe_blocks, upcycle
from moevl.hf.runtime import find_moe_state
from moevl.moe import LTDRConfig
from moevl.stgc import STGCConfig
from tests.fixtures.tiny import (
    causal_lm,
    llava_batch,
    native_moe,
    qwen3_vl_batch,
    tiny_llava,
    tiny_qwen3_vl_moe,
)
from tests.fixtures.tiny_export import (
    gpt2,
    llava_qwen3,
    make_routing_matter,
    qwen3,
    run_python,
    text_batch,
    tiny_processor,
)


def _upcycled(build, **settings):
    # .eval(): upcycle leaves the new MoE blocks in training mode (router jitter on) under an eval model
    return make_routing_matter(upcycle(build(), **{"num_experts": 4, "top_k": 2, **settings})).eval()


# name: (model builder, batch builder, expected native class, Auto class that loads it)
EXACT = {
    "qwen3_alternate": (lambda: _upcycled(qwen3), text_batch, "Qwen3MoeForCausalLM", "AutoModelForCausalLM"),
    "qwen3_layer_2": (lambda: _upcycled(qwen3, layers=[2], top_k=3), text_batch, "Qwen3MoeForCausalLM", None),
    "llama_all": (
        lambda: _upcycled(lambda: causal_lm("llama"), layers="all"),
        text_batch,
        "MixtralForCausalLM",
        "AutoModelForCausalLM",
    ),
    "mistral_all": (
        lambda: _upcycled(lambda: causal_lm("mistral"), layers="all", top_k=1),
        text_batch,
        "MixtralForCausalLM",
        None,
    ),
    "llava_llama_all": (
        lambda: _upcycled(tiny_llava, layers="all"),
        lambda: llava_batch((1, 2), pad_side="left"),
        "LlavaForConditionalGeneration",
        "AutoModelForImageTextToText",
    ),
    "llava_qwen3_alternate": (
        lambda: _upcycled(llava_qwen3),
        lambda: llava_batch((2, 1), pad_side="left"),
        "LlavaForConditionalGeneration",
        "AutoModelForImageTextToText",
    ),
    # training-only settings never block an export
    "qwen3_training_options": (
        lambda: _upcycled(
            qwen3,
            stgc=STGCConfig(weight=0.5),
            balance_coef=0.1,
            z_loss_coef=0.01,
            balance_from="topk",
            jitter=0.1,
            router="ltdr",  # a text-only model has no vision tokens: the tail rule never acts
        ),
        text_batch,
        "Qwen3MoeForCausalLM",
        None,
    ),
    "llava_ltdr_tail_equals_k": (
        lambda: _upcycled(tiny_llava, layers="all", router="ltdr", ltdr=LTDRConfig(tail_top_k=2)),
        lambda: llava_batch((1, 1), pad_side="left"),
        "LlavaForConditionalGeneration",
        None,
    ),
}
ADOPTED = {
    family: (lambda f=family: native_moe(f), text_batch)
    for family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
}
ADOPTED["qwen3_vl_moe"] = (tiny_qwen3_vl_moe, qwen3_vl_batch)


def _logits_and_generation(model, batch):
    # generation continues after the last position: only rows that are not right-padded (the logits
    # of padded positions are not defined alike: moevl routes no padding)
    rows = batch["attention_mask"][:, -1].bool()
    prompt = batch if rows.all() else {k: v[rows] for k, v in batch.items()}
    with torch.no_grad():
        logits = model(**batch).logits
        generated = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    return logits, generated


def _assert_same_outputs(model, native, batch):
    logits, generated = _logits_and_generation(model, batch)
    native_logits, native_generated = _logits_and_generation(native, batch)
    real = batch["attention_mask"].bool()  # moevl routes no padding; padded positions differ
    torch.testing.assert_close(native_logits[real], logits[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(native_generated, generated)


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_native_export(name, tmp_path):
    import transformers

    build, batch_fn, class_name, _ = EXACT[name]
    model = build()
    result = export(model, tmp_path)
    assert (result.format, result.model_class) == ("native", class_name), result.reason
    assert not is_moevl_checkpoint(tmp_path) and not (tmp_path / WEIGHTS_NAME).exists()
    native = getattr(transformers, class_name).from_pretrained(tmp_path).eval()
    assert find_moe_state(native) is None and "moevl" not in native.config.to_dict()
    _assert_same_outputs(model, native, batch_fn())


def test_native_configs_describe_the_moe_layers(tmp_path):
    from transformers import Qwen3MoeConfig

    model = _upcycled(qwen3, layers=[0, 3], balance_coef=0.02)
    result = export(model, tmp_path / "qwen3")
    assert result.reason == "upcycled qwen3 -> Qwen3MoeForCausalLM, dense layers [1, 2] in mlp_only_layers"
    raw = json.loads((tmp_path / "qwen3" / "config.json").read_text())
    assert raw["model_type"] == "qwen3_moe" and raw["architectures"] == ["Qwen3MoeForCausalLM"]
    assert "moevl" not in raw and raw["head_dim"] == 8  # Qwen3-MoE's attention reads config.head_dim
    loaded = Qwen3MoeConfig.from_pretrained(tmp_path / "qwen3")
    expected = dict(
        mlp_only_layers=[1, 2],
        decoder_sparse_step=1,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        intermediate_size=64,
        norm_topk_prob=True,
        router_aux_loss_coef=0.02,
    )
    assert {k: getattr(loaded, k) for k in expected} == expected
    export(_upcycled(tiny_llava, layers="all"), tmp_path / "llava")
    text = json.loads((tmp_path / "llava" / "config.json").read_text())["text_config"]
    assert (text["model_type"], text["num_local_experts"], text["num_experts_per_tok"]) == ("mixtral", 4, 2)


def test_non_renormalised_qwen3_routers_export_with_norm_topk_prob_false(tmp_path):
    from transformers import Qwen3MoeForCausalLM

    model = _upcycled(qwen3, top_k=3)
    for block in moe_blocks(model):
        block.router.normalize_weights = False  # weights: the softmax scores of the chosen experts
    export(model, tmp_path)
    native = Qwen3MoeForCausalLM.from_pretrained(tmp_path).eval()
    assert native.config.norm_topk_prob is False
    _assert_same_outputs(model, native, text_batch())


@pytest.mark.parametrize("family", sorted(ADOPTED))
def test_adopted_models_export_as_themselves(family, tmp_path):
    build, batch_fn = ADOPTED[family]
    native_model = build()
    native_keys = set(native_model.state_dict())
    native_model.save_pretrained(tmp_path / "plain")  # what transformers writes for the native model
    model = adopt(native_model, stgc=STGCConfig(), z_loss_coef=0.01)
    assert set(model.state_dict()) == native_keys  # adopt keeps the native key names
    result = export(model, tmp_path / "export")
    assert (result.format, result.model_class) == ("native", type(model).__name__), result.reason
    assert json.loads((tmp_path / "export" / "config.json").read_text()) == json.loads(
        (tmp_path / "plain" / "config.json").read_text()
    )  # the original config, no moevl entry
    reloaded = type(model).from_pretrained(tmp_path / "export").eval()
    assert set(reloaded.state_dict()) == native_keys and find_moe_state(reloaded) is None
    _assert_same_outputs(model, reloaded, batch_fn())


# name: (model builder, words the reason must contain)
REFUSED = {
    "llama_alternate": (
        lambda: _upcycled(lambda: causal_lm("llama")),
        "Mixtral has no dense layers, but layers [1, 3] of this llama model are dense",
    ),
    "mistral_first_half": (
        lambda: _upcycled(lambda: causal_lm("mistral"), layers="first_half"),
        "no dense layers",
    ),
    "llava_ltdr_tail": (
        lambda: _upcycled(tiny_llava, layers="all", router="ltdr", ltdr=LTDRConfig(tail_top_k=3)),
        "LTDR's tail rule routes vision tail tokens to tail_top_k=3 experts instead of top_k=2 at inference",
    ),
    "adopted_ltdr_tail": (
        lambda: adopt(tiny_qwen3_vl_moe(), router="ltdr", balance_coef=0.01),
        "LTDR's tail rule",
    ),
    "capacity": (
        lambda: _upcycled(qwen3, capacity_factor=1.0),
        "capacity_factor=1.0 drops tokens over capacity at inference",
    ),
    "adopted_capacity": (lambda: adopt(native_moe("mixtral"), capacity_factor=1.5), "capacity_factor=1.5"),
    "qwen2": (
        lambda: _upcycled(lambda: causal_lm("qwen2"), layers="all"),
        "upcycled qwen2 models have no native",
    ),
    # found by shape (Conv1D): reloads from uninitialised weights, its MLP identified on random ones
    "gpt2": (lambda: _upcycled(gpt2, layers="all"), "upcycled gpt2 models have no native MoE class"),
    "phi_non_gated": (lambda: _upcycled(lambda: causal_lm("phi"), layers="all"), "upcycled phi models"),
    "llama_attention_bias": (
        lambda: _upcycled(lambda: _llama(attention_bias=True), layers="all"),
        "attention_bias=True: Mixtral's attention has no biases",
    ),
    "llama_mlp_bias": (lambda: _upcycled(lambda: _llama(mlp_bias=True), layers="all"), "expert biases"),
    "qwen3_mixed_sliding_window": (
        lambda: _upcycled(lambda: qwen3(use_sliding_window=True, sliding_window=4, max_window_layers=2)),
        "Qwen3-MoE applies one attention window to every layer",
    ),
}


def _llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.fixtures.tiny import COMMON

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**COMMON, num_key_value_heads=2, **overrides)).eval()


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_models_without_an_exact_native_class_use_the_moevl_format(name, tmp_path):
    build, words = REFUSED[name]
    model = build()
    plan = plan_export(model)
    assert plan.native_class is None and words in plan.reason, plan.reason
    with pytest.raises(ValueError, match="no exact native class") as refused:
        export(model, tmp_path / "native", require_native=True)
    assert "saved" not in str(refused.value)  # nothing was
    assert not (tmp_path / "native").exists()
    result = export(model, tmp_path / "ck")
    assert result.format == "moevl" and result.reason.endswith("saved in the moevl format")
    assert is_moevl_checkpoint(tmp_path / "ck")
    reloaded = load_moe_model(tmp_path / "ck")
    reference = model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in reloaded.state_dict().items())


def test_non_renormalised_llama_routers_are_refused():
    model = _upcycled(lambda: causal_lm("llama"), layers="all")
    moe_blocks(model)[1].router.normalize_weights = False
    reason = plan_export(model).reason
    assert "model.layers.1.mlp does not renormalise its top-k weights; Mixtral always does" in reason


def test_bf16_export_notes_the_router_cast(tmp_path):
    from safetensors import safe_open

    model = _upcycled(lambda: qwen3().to(torch.bfloat16))
    assert moe_blocks(model)[0].router.weight.dtype == torch.float32
    result = export(model, tmp_path)
    assert (
        result.format == "native" and "router weights cast from float32 to torch.bfloat16" in result.notes[0]
    )
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118


def test_export_refuses_dense_models_and_files(tmp_path):
    with pytest.raises(ValueError, match="no moevl MoE layers"):
        export(causal_lm("llama"), tmp_path / "dense")
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="is an existing file"):
        export(_upcycled(qwen3), target)


def test_plain_transformers_without_moevl_loads_the_native_exports(tmp_path):
    """The exports load in an interpreter that never imports moevl, through the Auto classes."""
    expected = {}
    for name in ("qwen3_alternate", "llama_all", "llava_qwen3_alternate"):
        build, batch_fn, class_name, auto = EXACT[name]
        model = build()
        batch = batch_fn()
        export(model, tmp_path / name, processor=tiny_processor() if "llava" in name else None)
        with torch.no_grad():
            expected[name] = (auto, class_name, batch, model(**batch).logits)
    torch.save(expected, tmp_path / "expected.pt")
    code = """
        import sys
        import torch
        import transformers as T

        for name, (auto, class_name, batch, logits) in torch.load("expected.pt").items():
            model = getattr(T, auto).from_pretrained(name).eval()
            with torch.no_grad():
                got = model(**batch).logits
            real = batch["attention_mask"].bool()
            torch.testing.assert_close(got[real], logits[real], rtol=1e-5, atol=1e-5)
            print(name, type(model).__name__)
        print("processor", type(T.AutoProcessor.from_pretrained("llava_qwen3_alternate")).__name__)
        print("moevl imported:", any(m.split(".")[0] == "moevl" for m in sys.modules))
    """
    stdout = run_python(code, tmp_path)
    assert stdout.splitlines() == [
        "qwen3_alternate Qwen3MoeForCausalLM",
        "llama_all MixtralForCausalLM",
        "llava_qwen3_alternate LlavaForConditionalGeneration",
        "processor LlavaProcessor",
        "moevl imported: False",
    ]
