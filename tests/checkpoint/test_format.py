"""The moevl checkpoint format: exact round trips, strict loading, plain transformers refusing it,
the Auto classes after ``register_auto_classes()``, atomic writes."""

import importlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moevl.checkpoint.format import (
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    is_moevl_checkpoint,
    load_moe_model,
    load_moe_state_into,
    save_moe_model,
)
from moevl.hf import adopt, moe_blocks, moe_state, upcycle
from moevl.moe import LTDRConfig, LTDRRouter
from moevl.stgc import STGCConfig
from tests.fixtures.tiny import causal_lm, llava_batch, native_moe, tiny_llava
from tests.fixtures.tiny_export import make_routing_matter, run_python, text_batch, tiny_processor


def _upcycled_llama(**kwargs):
    settings = dict(num_experts=4, top_k=2, layers="alternate", router="ltdr", stgc=STGCConfig(weight=0.3))
    return make_routing_matter(upcycle(causal_lm("llama"), **{**settings, **kwargs}))


def _upcycled_llava():
    return make_routing_matter(
        upcycle(tiny_llava(), num_experts=4, top_k=2, router="ltdr", ltdr=LTDRConfig(tail_top_k=3))
    )


def _assert_same_model(a, b, batch):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert moe_state(a).settings == moe_state(b).settings
    with torch.no_grad():
        assert torch.equal(a(**batch).logits, b(**batch).logits)


def test_format_files_and_exact_round_trip(tmp_path):
    model = _upcycled_llama()
    save_moe_model(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "generation_config.json",
        WEIGHTS_NAME,
    ]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "moevl" and config["architectures"] == ["MoevlForCausalLM"]
    info = config["moevl"]
    assert info["model_type"] == "llama" and info["architectures"] == ["LlamaForCausalLM"]
    assert info["method"] == "upcycle" and info["settings"]["layers"] == [0, 2]
    assert info["weights"] == WEIGHTS_NAME and "transformers_weights" not in config
    assert is_moevl_checkpoint(tmp_path)
    reloaded = load_moe_model(tmp_path)
    assert type(reloaded) is type(model) and not reloaded.training
    assert isinstance(moe_blocks(reloaded)[0].router, LTDRRouter)
    _assert_same_model(model, reloaded, text_batch())


def test_sharded_checkpoint_round_trip(tmp_path):
    model = _upcycled_llama()
    save_moe_model(model, tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and all(s.startswith("moevl-model-") for s in shards)
    index = json.loads((tmp_path / WEIGHTS_INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    _assert_same_model(model, load_moe_model(tmp_path), text_batch())


def test_llava_round_trip_with_processor_and_both_key_formats(tmp_path):
    from transformers import AutoProcessor

    model = _upcycled_llava()
    batch = llava_batch((1, 2), pad_side="left")
    for original_format in (False, True):
        folder = tmp_path / str(original_format)
        save_moe_model(model, folder, processor=tiny_processor(), save_original_format=original_format)
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["MoevlForImageTextToText"]
        assert config["text_config"]["model_type"] == "llama"  # nested configs stay as they are
        _assert_same_model(model, load_moe_model(folder), batch)
        processor = AutoProcessor.from_pretrained(folder)
        ids = processor(text="w5 <image> w7", images=torch.rand(3, 8, 8), return_tensors="pt")["input_ids"]
        assert ids.tolist() == [[5, 95, 95, 95, 95, 7]]


def test_adopted_model_round_trip(tmp_path):
    model = adopt(native_moe("qwen3_moe"), router="ltdr", balance_coef=0.02, ltdr=LTDRConfig(tail_top_k=4))
    save_moe_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["moevl"]["method"] == "adopt"
    reloaded = load_moe_model(tmp_path)
    assert type(moe_blocks(reloaded)[0]) is type(moe_blocks(model)[0])
    _assert_same_model(model, reloaded, text_batch())


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "qwen2_moe"])
def test_a_saved_adopted_model_loads_without_a_search_and_its_routers_untouched(
    tmp_path, monkeypatch, family
):
    """The rule adoption found is saved (``rules`` in config.moevl): loading runs no probe and never perturbs
    a router tensor, so the router weights (and score-correction biases) are the saved ones, bit for bit."""
    # the package, not the function moevl.hf re-exports under the same name
    package, rule, check = (importlib.import_module(f"moevl.hf.adopt{m}") for m in ("", ".rule", ".check"))

    model = adopt(native_moe(family), balance_coef=0.02)
    save_moe_model(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["moevl"]["rules"]
    assert saved == {str(b.layer_index): b.rule_record() for b in moe_blocks(model)}

    def no_search(*args, **kwargs):
        raise AssertionError("loading a saved adopted model searched or probed")

    for module, name in (
        (package, "derive_rule"),
        (package, "perturbed"),
        (rule, "_run_probes"),
        (rule, "perturbed"),
        (check, "native_outputs"),
    ):
        monkeypatch.setattr(module, name, no_search)
    reloaded = load_moe_model(tmp_path)
    for ours, theirs in zip(moe_blocks(model), moe_blocks(reloaded), strict=True):
        assert theirs.rule_record() == ours.rule_record()
        router, loaded = ours.router_module(), theirs.router_module()
        for (name, t), (name_l, t_l) in zip(
            [*router.named_parameters(), *router.named_buffers()],
            [*loaded.named_parameters(), *loaded.named_buffers()],
            strict=True,
        ):
            assert name == name_l and torch.equal(t, t_l), name
    _assert_same_model(model, reloaded, text_batch())
    # a record that does not fit the model is refused by name, not searched around
    config = json.loads((tmp_path / "config.json").read_text())
    config["moevl"]["rules"] = {k: {**v, "experts": "no_such_child"} for k, v in saved.items()}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"layer \d+: the saved adoption record does not fit"):
        load_moe_model(tmp_path)


def test_checkpoints_of_older_moevl_versions_load(tmp_path):
    # before the format: save_pretrained with the settings in config.moevl, model.safetensors
    model = _upcycled_llama()
    model.save_pretrained(tmp_path / "upcycled", save_original_format=False)
    assert not is_moevl_checkpoint(tmp_path / "upcycled")
    _assert_same_model(model, load_moe_model(tmp_path / "upcycled"), text_batch())
    adopted = adopt(native_moe("mixtral"))
    adopted.save_pretrained(tmp_path / "adopted")  # transformers' per-expert legacy names
    _assert_same_model(adopted, load_moe_model(tmp_path / "adopted"), text_batch())


def test_model_class_and_overrides(tmp_path):
    model = _upcycled_llama()
    save_moe_model(model, tmp_path)
    assert is_moevl_checkpoint(tmp_path)
    _assert_same_model(model, load_moe_model(tmp_path, model_class=type(model)), text_batch())
    plain = load_moe_model(tmp_path, stgc=None, router="topk")
    assert moe_state(plain).settings.stgc is None and moe_state(plain).settings.ltdr is None
    assert type(moe_blocks(plain)[0].router).__name__ == "TopKRouter"
    with pytest.raises(ValueError, match="fixed by the checkpoint"):
        load_moe_model(tmp_path, num_experts=8)
    with pytest.raises(TypeError, match="unknown MoE setting"):
        load_moe_model(tmp_path, experts=8)


def test_layers_given_as_a_list_round_trip(tmp_path):
    model = _upcycled_llama(layers=[3, 1])
    assert moe_state(model).settings.layers == (1, 3)
    save_moe_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["moevl"]["settings"]["layers"] == [1, 3]
    reloaded = load_moe_model(tmp_path, layers=[1, 3], num_experts=4)  # a settings file passed whole
    assert [b.layer_index for b in moe_blocks(reloaded)] == [1, 3]
    _assert_same_model(model, reloaded, text_batch())
    with pytest.raises(ValueError, match=r"layers='alternate' \(the checkpoint has \(1, 3\)\): fixed by"):
        load_moe_model(tmp_path, layers="alternate")
    with pytest.raises(ValueError, match=r"layers=\[1, 2\]"):
        load_moe_model(tmp_path, layers=[1, 2])


@pytest.mark.parametrize("writer", ["save_moe_model", "save_pretrained"])
def test_load_moe_model_reads_adopted_checkpoints(tmp_path, writer):
    model = adopt(native_moe("qwen3_moe"), balance_coef=0.02)
    if writer == "save_moe_model":
        save_moe_model(model, tmp_path)
    else:
        model.save_pretrained(tmp_path)
    for reloaded in (load_moe_model(tmp_path, model_class=type(model)), load_moe_model(tmp_path)):
        assert type(moe_blocks(reloaded)[0]) is type(moe_blocks(model)[0])
        _assert_same_model(model, reloaded, text_batch())


def test_load_state_into_a_built_model(tmp_path):
    model = _upcycled_llama()
    save_moe_model(model, tmp_path)
    fresh = upcycle(causal_lm("llama", seed=1), moe_state(model).settings)
    assert not torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    load_moe_state_into(fresh, tmp_path)
    _assert_same_model(model, fresh, text_batch())
    other = upcycle(causal_lm("llama"), num_experts=4, top_k=2, layers="all")
    with pytest.raises(ValueError, match="layers"):
        load_moe_state_into(other, tmp_path)
    with pytest.raises(ValueError, match="no moevl MoE layers"):
        load_moe_state_into(causal_lm("llama"), tmp_path)


def _rewrite(path, change):
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: s.pop("model.layers.0.mlp.router.weight"),
            r"1 missing \(model.layers.0.mlp.router.weight\)",
        ),
        (lambda s: s.__setitem__("model.layers.9.mlp.router.weight", torch.zeros(4, 32)), "1 unexpected"),
        (
            lambda s: s.__setitem__("model.layers.0.mlp.router.weight", torch.zeros(5, 32)),
            r"shape-mismatched \(model.layers.0.mlp.router.weight: checkpoint \(5, 32\), model \(4, 32\)\)",
        ),
    ],
)
def test_strict_loading_names_the_keys(tmp_path, change, message):
    save_moe_model(_upcycled_llama(), tmp_path)
    _rewrite(tmp_path / WEIGHTS_NAME, change)
    with pytest.raises(ValueError, match=message):
        load_moe_model(tmp_path)


def test_corrupt_and_missing_files_are_named(tmp_path):
    save_moe_model(_upcycled_llama(), tmp_path / "a", max_shard_size="40KB")
    shard = sorted((tmp_path / "a").glob("moevl-model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    with pytest.raises(ValueError, match=f"{shard.name} is not a readable safetensors file"):
        load_moe_model(tmp_path / "a")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_moe_model(tmp_path / "a")
    (tmp_path / "a" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_moe_model(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        is_moevl_checkpoint(tmp_path / "b")
    assert not is_moevl_checkpoint(tmp_path / "missing")


def test_save_refuses_a_file_and_dense_models(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match=f"{target} is an existing file"):
        save_moe_model(_upcycled_llama(), target)
    assert target.read_text() == "x"
    with pytest.raises(ValueError, match="no moevl MoE layers"):
        save_moe_model(causal_lm("llama"), tmp_path / "dense")


def test_save_into_an_existing_folder_removes_stale_weights(tmp_path):
    causal_lm("llama").save_pretrained(tmp_path)  # a dense model.safetensors that LlamaForCausalLM would load
    (tmp_path / "notes.txt").write_text("kept")
    model = _upcycled_llama()
    save_moe_model(model, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "generation_config.json", WEIGHTS_NAME, "notes.txt"]
    _assert_same_model(model, load_moe_model(tmp_path), text_batch())


def test_a_failed_save_changes_nothing(tmp_path, monkeypatch):
    first = _upcycled_llama()
    save_moe_model(first, tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    second = _upcycled_llama(layers="all")

    def crash(self, directory, **kwargs):  # dies after writing part of the checkpoint
        (directory / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(second), "save_pretrained", crash)
    for target in (tmp_path / "ck", tmp_path / "new"):
        with pytest.raises(RuntimeError, match="disk full"):
            save_moe_model(second, target)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no new folder, no temporary left


def test_auto_classes_load_the_format_after_register_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from moevl.checkpoint import register_auto_classes

    register_auto_classes()
    llama, llava = _upcycled_llama(), _upcycled_llava()
    save_moe_model(llama, tmp_path / "llama")
    save_moe_model(llava, tmp_path / "llava")
    assert type(AutoConfig.from_pretrained(tmp_path / "llama")).__name__ == "MoevlConfig"
    _assert_same_model(llama, AutoModelForCausalLM.from_pretrained(tmp_path / "llama"), text_batch())
    _assert_same_model(
        llava, AutoModelForImageTextToText.from_pretrained(tmp_path / "llava"), llava_batch((1, 2))
    )
    inference = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", stgc=None, dtype=torch.float64)
    assert moe_state(inference).settings.stgc is None and inference.lm_head.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="holds a 'llava' model, which AutoModelForCausalLM does not load"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "llava")


def test_plain_transformers_refuses_the_format(tmp_path):
    save_moe_model(_upcycled_llama(), tmp_path / "llama")
    save_moe_model(_upcycled_llava(), tmp_path / "llava", processor=tiny_processor())
    out = run_python(
        """
        import sys
        import transformers as T

        def attempt(label, load):
            try:
                load()
                print(label, "LOADED")
            except Exception as err:
                print(label, type(err).__name__, str(err).replace("\\n", " ")[:200])

        attempt("AutoConfig", lambda: T.AutoConfig.from_pretrained("llama"))
        attempt("AutoModelForCausalLM", lambda: T.AutoModelForCausalLM.from_pretrained("llama"))
        attempt("LlamaForCausalLM", lambda: T.LlamaForCausalLM.from_pretrained("llama"))
        attempt("AutoModelForImageTextToText", lambda: T.AutoModelForImageTextToText.from_pretrained("llava"))
        attempt("LlavaForConditionalGeneration", lambda: T.LlavaForConditionalGeneration.from_pretrained("llava"))
        print("processor", type(T.AutoProcessor.from_pretrained("llava")).__name__)
        print("moevl imported:", any(m.split(".")[0] == "moevl" for m in sys.modules))
        """,
        tmp_path,
    )
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    for label in ("AutoConfig", "AutoModelForCausalLM", "AutoModelForImageTextToText"):
        line = lines[label]
        assert line.startswith("ValueError") and "model type `moevl`" in line and "not recognize" in line, (
            line
        )
    for label in ("LlamaForCausalLM", "LlavaForConditionalGeneration"):
        assert lines[label].startswith("OSError") and "no file named model.safetensors" in lines[label], (
            lines[label]
        )
    assert lines["processor"] == "LlavaProcessor"
    assert lines["moevl"] == "imported: False"


def test_import_moevl_registers_nothing_and_register_auto_classes_does(tmp_path):
    save_moe_model(_upcycled_llama(), tmp_path / "llama")
    out = run_python(
        """
        import sys
        finders = list(sys.meta_path)
        import moevl
        print("after import:", "torch" in sys.modules, "transformers" in sys.modules, sys.meta_path == finders)
        import transformers
        try:
            transformers.AutoConfig.from_pretrained("llama")
            print("before registering: LOADED")
        except ValueError as err:
            print("before registering:", "model type `moevl`" in str(err))
        from moevl.checkpoint import register_auto_classes
        register_auto_classes()
        register_auto_classes()  # idempotent
        model = transformers.AutoModelForCausalLM.from_pretrained("llama")
        from moevl.hf import moe_state
        print("loaded:", type(model).__name__, len(moe_state(model).settings.layers))
        print("moevl finders:", [f for f in sys.meta_path if type(f).__module__.startswith("moevl")])
        """,
        tmp_path,
    )
    assert out.splitlines() == [
        "after import: False False True",
        "before registering: True",
        "loaded: LlamaForCausalLM 2",
        "moevl finders: []",
    ]
