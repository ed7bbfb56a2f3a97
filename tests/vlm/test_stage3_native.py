"""Stage 3 on natively sparse LLaVA checkpoints (Mixtral and Qwen3-MoE text backbones, built offline from configs):
every sparse block is adopted with the model's own experts and top-k, its gates train as routers, dense layers stay
dense, a structural ``moe.*`` key that disagrees with the model is refused; then eval and export."""

import json
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration
from typer.testing import CliRunner

from moevl.checkpoint import export
from moevl.cli import app
from moevl.config import ConfigError
from moevl.data import read_records
from moevl.data.processing import ConversationCollator, ConversationDataset
from moevl.hf.adopt import AdoptedMoEBlock
from moevl.hf.runtime import decoder_layers
from moevl.vlm.compare import demo_config
from moevl.vlm.evaluate import run_eval
from moevl.vlm.io import load_model, resolve_model_dir
from moevl.vlm.parts import parameter_parts, set_trainable
from moevl.vlm.train import prepare_moe, train_stage
from tests.fixtures.demo import TINY
from tests.fixtures.tiny import moe_config

# case: (family, text config overrides, E, top-k, sparse layers of the 3-layer decoder, native block class)
CASES = {
    "mixtral": ("mixtral", {}, 4, 2, [0, 1, 2], "MixtralSparseMoeBlock"),
    "mixtral_e8": ("mixtral", {"num_local_experts": 8}, 8, 2, [0, 1, 2], "MixtralSparseMoeBlock"),
    "qwen3_moe": ("qwen3_moe", {"mlp_only_layers": [0]}, 8, 3, [1, 2], "Qwen3MoeSparseMoeBlock"),
}


def build_sparse_llava(dense_dir, out, family, **overrides):
    """The demo's tiny LLaVA with a natively sparse text backbone of ``family`` (random weights, spread gates)."""
    config = AutoConfig.from_pretrained(dense_dir)
    text = config.text_config
    config.text_config = moe_config(
        family,
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        pad_token_id=text.pad_token_id,
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        tie_word_embeddings=text.tie_word_embeddings,
        **overrides,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):  # native routers may start at zero
                p.normal_(0.0, 0.5)
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(dense_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sparse(demo, tmp_path_factory):
    """case -> the checkpoint directory (built once)."""
    root, built = tmp_path_factory.mktemp("sparse"), {}

    def get(case):
        if case not in built:
            family, overrides, *_ = CASES[case]
            built[case] = build_sparse_llava(demo.init, root / case, family, **overrides)
        return built[case]

    return get


def stage3(demo, model, out, sets=(), log=None, method="stgc"):
    return train_stage(
        demo_config(TINY, list(sets)),
        stage=3,
        model=model,
        output_dir=out,
        data=demo.files.instruct,
        image_folder=demo.files.image_folder,
        method=method,
        progress=False,
        log=log or (lambda *_: None),
    )


def _batch(demo, processor, n=3):
    records = read_records(demo.files.validation, image_folder=demo.files.image_folder).records[:n]
    examples = ConversationDataset(records, processor, progress=False)
    batch = ConversationCollator(processor)([examples[i] for i in range(len(examples))])
    batch.pop("labels")
    return batch


def test_an_adopted_blocks_gate_is_its_router(sparse):
    model, _ = load_model(sparse("mixtral"))
    assert prepare_moe(model, demo_config(TINY).moe_settings("baseline")) == "adopted"
    parts = parameter_parts(model)
    for i in range(3):
        prefix = f"model.language_model.layers.{i}.mlp"
        assert parts[f"{prefix}.gate.weight"] == "routers"
        assert parts[f"{prefix}.experts.gate_up_proj"] == parts[f"{prefix}.experts.down_proj"] == "experts"
    set_trainable(model, ["experts"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp.experts." in n for n in trainable)


@pytest.mark.parametrize("case", sorted(CASES))
def test_stage3_adopts_every_sparse_block_trains_its_gates_evaluates_and_exports(
    demo, sparse, tmp_path, case
):
    _, _, num_experts, top_k, sparse_layers, block = CASES[case]
    init = sparse(case)
    lines = []
    r = stage3(demo, init, tmp_path / "s3", log=lines.append)
    moe_lines = [line for line in lines if "MoE layer" in line]
    assert moe_lines == [
        f"adopted {len(sparse_layers)} MoE layers {sparse_layers} (E={num_experts}, top-{top_k}) of {block}"
    ]
    meta = json.loads((r.model_dir / "moevl.json").read_text())
    assert meta["moe"] == "adopted"
    assert (meta["moe_settings"]["num_experts"], meta["moe_settings"]["top_k"]) == (num_experts, top_k)
    assert meta["moe_settings"]["layers"] == sparse_layers

    model, processor = load_model(r.model_dir)
    layers = decoder_layers(model)
    assert [i for i, layer in enumerate(layers) if isinstance(layer.mlp, AdoptedMoEBlock)] == sparse_layers
    dense_classes = {type(layers[i].mlp).__name__ for i in range(len(layers)) if i not in sparse_layers}
    assert dense_classes <= {"Qwen3MoeMLP"}  # a dense layer of the model stays its dense MLP
    assert all(layers[i].mlp.router.num_experts == num_experts for i in sparse_layers)

    # experts and gates trained; every other tensor is the initial checkpoint's, under the same keys
    before = AutoModelForImageTextToText.from_pretrained(init).state_dict()
    after = model.state_dict()
    assert before.keys() == after.keys()
    for i in sparse_layers:
        for name in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"):
            key = f"model.language_model.layers.{i}.mlp.{name}"
            assert not torch.equal(before[key], after[key]), key
    for key in before:
        if ".mlp.gate." not in key and ".mlp.experts." not in key:
            torch.testing.assert_close(after[key], before[key], atol=0, rtol=0, msg=key)

    result = run_eval(
        demo.cfg,
        model=r.model_dir,
        data=demo.files.validation,
        image_folder=demo.files.image_folder,
        out=tmp_path / "eval.json",
        progress=False,
    )
    assert result.count > 0 and (tmp_path / "eval.json").is_file()

    exported = export(model, tmp_path / "exported", processor=processor)
    assert exported.format == "native" and exported.model_class == "LlavaForConditionalGeneration"
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "exported").eval()
    plain_layers = decoder_layers(plain)
    assert [i for i, layer in enumerate(plain_layers) if type(layer.mlp).__name__ == block] == sparse_layers
    batch = _batch(demo, processor)
    real = batch["attention_mask"].bool()  # moevl gives padding no expert output
    with torch.no_grad():
        ours, theirs = model.eval()(**batch).logits[real], plain(**batch).logits[real]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "case, key, value, message",
    [
        ("mixtral", "moe.top_k", "1", "'moe.top_k': 1, but the model is sparse with top_k=2"),
        (
            "mixtral_e8",
            "moe.num_experts",
            "6",
            "'moe.num_experts': 6, but the model is sparse with num_experts=8",
        ),
        ("qwen3_moe", "moe.layers", "all", "'moe.layers': 'all', but the model is sparse with layers=[1, 2]"),
    ],
)
def test_a_structural_key_unlike_the_native_models_is_refused(
    demo, sparse, tmp_path, case, key, value, message
):
    with pytest.raises(ConfigError, match=re.escape(message)):
        stage3(demo, sparse(case), tmp_path / "out", sets=[f"{key}={value}"])
    assert not (tmp_path / "out").exists()


def test_a_setting_an_adopted_model_cannot_take_is_one_config_error(demo, sparse, tmp_path):
    with pytest.raises(ConfigError, match=re.escape("stage 3: adopt: jitter=0.1 is moevl's router jitter")):
        stage3(demo, sparse("mixtral"), tmp_path / "out", sets=["moe.jitter=0.1"])


def test_the_models_own_structure_may_be_spelled_out(demo, sparse, tmp_path):
    r = stage3(demo, sparse("mixtral_e8"), tmp_path, sets=["moe.num_experts=8", "moe.layers=all"])
    assert json.loads((r.model_dir / "moevl.json").read_text())["moe_settings"]["num_experts"] == 8


def test_a_model_moevl_made_sparse_keeps_its_structure_and_takes_the_method(demo, sparse, tmp_path):
    first = stage3(demo, sparse("mixtral_e8"), tmp_path / "a", method="baseline")
    lines = []
    second = stage3(demo, first.model_dir, tmp_path / "b", log=lines.append, method="ltdr")
    assert [line for line in lines if "MoE layer" in line] == [
        "reconfigured 3 MoE layers [0, 1, 2] (E=8, top-2) of MixtralSparseMoeBlock: experts and routers kept, "
        "the method's options applied"
    ]
    meta = json.loads((second.model_dir / "moevl.json").read_text())
    assert meta["moe"] == "reconfigured" and meta["moe_settings"]["router"] == "ltdr"
    with pytest.raises(ConfigError, match=re.escape("'moe.top_k': 3, but the model is sparse with top_k=2")):
        stage3(demo, first.model_dir, tmp_path / "c", sets=["moe.top_k=3"])


def test_the_command_line_adopts_and_refuses_a_different_expert_count(demo, sparse, tmp_path):
    runner = CliRunner()
    args = [
        "train", "--stage", "3", "--config", str(TINY), "--model", str(sparse("mixtral")),
        "--data", str(demo.files.instruct), "--image-folder", str(demo.files.image_folder),
        "--method", "stgc", "--no-progress",
    ]  # fmt: skip
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "ok")])
    assert result.exit_code == 0, result.output
    assert "adopted 3 MoE layers [0, 1, 2] (E=4, top-2) of MixtralSparseMoeBlock" in result.output
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "no"), "--set", "moe.num_experts=8"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "'moe.num_experts': 8, but the model is sparse with num_experts=4" in result.output
    assert not (tmp_path / "no").exists()


def test_a_sparse_block_under_another_name_goes_through_the_command_line(demo, tmp_path):
    """GraniteMoE keeps its experts in ``block_sparse_moe`` (no ``mlp``): ``moevl train --stage 3`` (stgc) adopts
    it, ``moevl eval`` reads the result, and the export reloads in plain transformers with equal logits."""
    init = build_sparse_llava(demo.init, tmp_path / "granite", "granitemoe")
    runner = CliRunner()
    out = tmp_path / "s3"
    result = runner.invoke(app, [
        "train", "--stage", "3", "--config", str(TINY), "--model", str(init), "--out", str(out),
        "--data", str(demo.files.instruct), "--image-folder", str(demo.files.image_folder),
        "--method", "stgc", "--no-progress",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "adopted 3 MoE layers [0, 1, 2] (E=4, top-2) of GraniteMoeMoE" in result.output
    model_dir = resolve_model_dir(out)
    assert json.loads((model_dir / "moevl.json").read_text())["moe"] == "adopted"
    result = runner.invoke(app, [
        "eval", "--config", str(TINY), "--model", str(model_dir), "--data", str(demo.files.validation),
        "--image-folder", str(demo.files.image_folder), "--out", str(tmp_path / "eval.json"), "--no-progress",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    model, processor = load_model(model_dir)
    exported = export(model, tmp_path / "exported", processor=processor)
    assert exported.format == "native"
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "exported").eval()
    batch = _batch(demo, processor)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(
            plain(**batch).logits[real], model.eval()(**batch).logits[real], atol=1e-5, rtol=1e-5
        )


def test_diagnose_adopts_a_native_moe_model_in_memory(demo, sparse, tmp_path):
    from moevl.vlm.diagnose import diagnose

    model = sparse("mixtral")
    result = diagnose(
        demo_config(TINY), model=model, data=demo.files.instruct, image_folder=demo.files.image_folder,
        steps=2, batch_size=4, progress=False,
    )  # fmt: skip
    assert result["moe"] == "adopted"
    # every layer of the native model is sparse, and each was measured
    assert [d["layer"] for d in result["layers"]] == list(range(len(result["layers"]))) and len(
        result["layers"]
    ) == 3
