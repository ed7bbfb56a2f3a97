"""load_moe_llava: synthetic MoE-LLaVA checkpoints (original layout) against a hand-written forward."""

from __future__ import annotations

import json

import pytest
import torch

from moevl.checkpoint.moe_llava import IMAGE_TOKEN_INDEX, expand_image_tokens, load_moe_llava
from moevl.hf import moe_blocks, moe_state
from moevl.stgc import STGCConfig
from tests.fixtures.moe_llava_checkpoint import (
    IMAGE_TOKEN_ID,
    NUM_EXPERTS,
    NUM_PATCHES,
    VISION,
    config_dict,
    reference_logits,
    state_dict,
    write_checkpoint,
)

torch.set_num_threads(1)
BACKBONES = ["phi", "stablelm"]
ATOL = 2e-4


@pytest.fixture(scope="module", params=BACKBONES)
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    config, state = write_checkpoint(directory, request.param, seed=1)
    return directory, config, state


def _text_ids(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, IMAGE_TOKEN_ID, (2, 9), generator=g)


def test_text_logits_equal_hand_assembled_reference(checkpoint):
    directory, config, state = checkpoint
    model, tokenizer = load_moe_llava(directory, image_token_id=IMAGE_TOKEN_ID)
    assert tokenizer is None
    ids = _text_ids()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    choices: list = []
    ref = torch.stack([reference_logits(config, state, row.tolist(), choices=choices) for row in ids])
    # The routing is not degenerate: several different expert pairs are chosen.
    assert len(set(choices)) >= 4
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=1e-4)


def test_image_logits_equal_hand_assembled_reference(checkpoint):
    directory, config, state = checkpoint
    model, _ = load_moe_llava(directory, image_token_id=IMAGE_TOKEN_ID)
    g = torch.Generator().manual_seed(3)
    size = VISION["image"]
    rows = [
        [5, 6, IMAGE_TOKEN_INDEX, 7, 8, 9],
        [10, IMAGE_TOKEN_INDEX, 11, 12, IMAGE_TOKEN_INDEX, 13, 14, 15, 16],
    ]
    pixels = [
        [torch.randn(3, size, size, generator=g) for t in row if t == IMAGE_TOKEN_INDEX] for row in rows
    ]
    ids, mask = expand_image_tokens(rows, image_token_id=IMAGE_TOKEN_ID, num_image_tokens=NUM_PATCHES)
    lengths = mask.sum(1).tolist()
    with torch.no_grad():
        logits = model(
            input_ids=ids, attention_mask=mask, pixel_values=torch.stack([p for ps in pixels for p in ps])
        ).logits
    for i, row in enumerate(rows):
        ref = reference_logits(config, state, row, pixels[i])
        assert ref.shape[0] == lengths[i]
        torch.testing.assert_close(logits[i, : lengths[i]], ref, atol=ATOL, rtol=1e-4)


def test_weights_land_in_grouped_experts_and_routers(checkpoint):
    directory, config, state = checkpoint
    model, _ = load_moe_llava(directory, image_token_id=IMAGE_TOKEN_ID)
    blocks = moe_blocks(model)
    assert [b.layer_index for b in blocks] == config["moe"]["moe_layers_idx"]
    assert moe_state(model).settings.num_experts == NUM_EXPERTS and moe_state(model).settings.top_k == 2
    assert moe_state(model).settings.balance_coef == config["moe"]["router_aux_loss_coef"]
    for block in blocks:
        p = f"model.layers.{block.layer_index}.mlp.deepspeed_moe"
        torch.testing.assert_close(block.router.weight, state[f"{p}.gate.wg.weight"], atol=0, rtol=0)
        e = NUM_EXPERTS - 1
        expert = f"{p}.experts.deepspeed_experts.{e}"
        if config["model_type"] == "moe_llava_phi":
            torch.testing.assert_close(
                block.experts.up_proj[e], state[f"{expert}.fc1.weight"], atol=0, rtol=0
            )
            torch.testing.assert_close(
                block.experts.down_proj_bias[e], state[f"{expert}.fc2.bias"], atol=0, rtol=0
            )
        else:
            gate_up = torch.cat([state[f"{expert}.gate_proj.weight"], state[f"{expert}.up_proj.weight"]])
            torch.testing.assert_close(block.experts.gate_up_proj[e], gate_up, atol=0, rtol=0)


def test_pytorch_bin_checkpoint_loads_the_same(checkpoint, tmp_path):
    directory, config, state = checkpoint
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(state, tmp_path / "pytorch_model.bin")
    ids = _text_ids(1)
    with torch.no_grad():
        a = load_moe_llava(directory, image_token_id=IMAGE_TOKEN_ID).model(input_ids=ids).logits
        b = load_moe_llava(tmp_path, image_token_id=IMAGE_TOKEN_ID).model(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_stgc_training_step_changes_routers(checkpoint):
    directory, _, _ = checkpoint
    model, _ = load_moe_llava(directory, image_token_id=IMAGE_TOKEN_ID, stgc=STGCConfig(), balance_coef=0.0)
    model.train()
    before = [b.router.weight.detach().clone() for b in moe_blocks(model)]
    ids = _text_ids(2)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    records = moe_state(model).context.records
    assert sorted(records) == [0, 2] and all(r.stgc is not None for r in records.values())
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    for b, w in zip(moe_blocks(model), before, strict=True):
        assert b.router.weight.grad is not None and b.router.weight.grad.abs().sum() > 0
        assert not torch.equal(b.router.weight.detach(), w)


# --- bad checkpoints ------------------------------------------------------------------------------


def _write(tmp_path, config=None, state=None, backbone="phi"):
    write_checkpoint(tmp_path, backbone, config=config, state=state)
    return tmp_path


def test_unknown_backbone_is_refused(tmp_path):
    config = dict(config_dict("phi"), model_type="moe_llava_qwen", architectures=["MoELLaVAQWenForCausalLM"])
    with pytest.raises(ValueError, match=r"unsupported MoE-LLaVA backbone model_type='moe_llava_qwen'"):
        load_moe_llava(_write(tmp_path, config=config), image_token_id=IMAGE_TOKEN_ID)


def test_other_image_towers_and_projectors_are_refused(tmp_path):
    config = dict(config_dict("phi"), mm_image_tower="google/siglip-so400m-patch14-384")
    with pytest.raises(ValueError, match=r"only CLIP image towers .* got 'google/siglip-so400m-patch14-384'"):
        load_moe_llava(_write(tmp_path / "a", config=config), image_token_id=IMAGE_TOKEN_ID)
    config = dict(config_dict("phi"), image_projector_type="qformer4_36")
    with pytest.raises(ValueError, match=r"image_projector_type must be 'mlp2x_gelu' .* got 'qformer4_36'"):
        load_moe_llava(_write(tmp_path / "b", config=config), image_token_id=IMAGE_TOKEN_ID)


def test_residual_moe_is_refused(tmp_path):
    config = config_dict("phi")
    config["moe"]["use_residual"] = True
    with pytest.raises(ValueError, match="use_residual=true"):
        load_moe_llava(_write(tmp_path, config=config), image_token_id=IMAGE_TOKEN_ID)


def test_differing_expert_counts_are_refused(tmp_path):
    config = config_dict("stablelm")
    config["moe"]["num_experts"] = [4, 2]
    with pytest.raises(ValueError, match=r"different expert counts \(\[4, 2\]\)"):
        load_moe_llava(_write(tmp_path, config=config, backbone="stablelm"), image_token_id=IMAGE_TOKEN_ID)


def test_missing_expert_is_refused(tmp_path):
    state = state_dict("phi")
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        del state[f"model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.1.{name}"]
    with pytest.raises(ValueError, match=r"layer 2 lacks experts \[1\]"):
        load_moe_llava(_write(tmp_path, state=state), image_token_id=IMAGE_TOKEN_ID)


def test_missing_and_unexpected_keys_are_refused(tmp_path):
    state = state_dict("phi")
    del state["model.final_layernorm.bias"]
    with pytest.raises(ValueError, match=r"missing \['model.language_model.final_layernorm.bias'\]"):
        load_moe_llava(_write(tmp_path / "a", state=state), image_token_id=IMAGE_TOKEN_ID)
    state = state_dict("phi")
    state["lm_head.bias"] = torch.zeros(state["lm_head.weight"].shape[0])
    with pytest.raises(ValueError, match=r"unexpected \['lm_head.bias'\]"):
        load_moe_llava(_write(tmp_path / "b", state=state), image_token_id=IMAGE_TOKEN_ID)


def test_moe_layers_disagreeing_with_weights_are_refused(tmp_path):
    config = config_dict("phi")
    config["moe"]["moe_layers_idx"] = [1, 3]
    with pytest.raises(ValueError, match=r"moe_layers_idx \[1, 3\] disagree .* \[0, 2\]"):
        load_moe_llava(_write(tmp_path, config=config), image_token_id=IMAGE_TOKEN_ID)


def test_missing_image_token_id_and_fixed_overrides_are_refused(tmp_path):
    directory = _write(tmp_path)
    with pytest.raises(ValueError, match="image_token_id is needed"):
        load_moe_llava(directory)
    with pytest.raises(ValueError, match=r"image_token_id must be an int in \[0, 64\) .*got 64"):
        load_moe_llava(directory, image_token_id=64)
    with pytest.raises(
        ValueError, match=r"num_experts=2 \(the checkpoint has 4\): fixed by the checkpoint's weights"
    ):
        load_moe_llava(directory, image_token_id=IMAGE_TOKEN_ID, num_experts=2)


def _save_tokenizer(directory, num_words: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(num_words - 1)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(directory)


def test_image_token_comes_from_the_tokenizer(tmp_path):
    config, state = write_checkpoint(tmp_path, "phi")
    _save_tokenizer(tmp_path, 60)  # 60 words: <image> gets id 60 < vocab_size 64, no resize
    model, tokenizer = load_moe_llava(tmp_path)
    assert tokenizer.convert_tokens_to_ids("<image>") == 60 == model.config.image_token_id
    assert model.get_input_embeddings().weight.shape[0] == config["vocab_size"]
    ids, mask = expand_image_tokens(
        [[5, IMAGE_TOKEN_INDEX, 6]], image_token_id=60, num_image_tokens=NUM_PATCHES
    )
    pixel = torch.randn(1, 3, VISION["image"], VISION["image"], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixel).logits[0]
    ref = reference_logits(config, state, [5, IMAGE_TOKEN_INDEX, 6], [pixel[0]])
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=1e-4)


def test_tokenizer_longer_than_the_vocabulary_resizes_the_embeddings(tmp_path):
    config, state = write_checkpoint(tmp_path, "stablelm")
    _save_tokenizer(tmp_path, config["vocab_size"])  # <image> gets id 64 = vocab_size
    model, tokenizer = load_moe_llava(tmp_path)
    assert model.config.image_token_id == 64 and len(tokenizer) == 65
    assert model.get_input_embeddings().weight.shape[0] == 65 == model.lm_head.weight.shape[0]
    ids = _text_ids(5)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    ref = torch.stack([reference_logits(config, state, row.tolist()) for row in ids])
    torch.testing.assert_close(logits[..., :64], ref, atol=ATOL, rtol=1e-4)  # old tokens unchanged


def test_tower_from_a_separate_folder_equals_the_tower_in_the_checkpoint(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config, state = config_dict("phi"), state_dict("phi", seed=2)
    prefix = "model.image_tower.image_tower.vision_model."
    tower_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    vision = CLIPVisionConfig(
        hidden_size=VISION["hidden"],
        intermediate_size=VISION["inter"],
        num_hidden_layers=VISION["layers"],
        num_attention_heads=VISION["heads"],
        image_size=VISION["image"],
        patch_size=VISION["patch"],
        hidden_act="quick_gelu",
    )
    tower = CLIPVisionModel(vision)
    tower.load_state_dict(tower_state)
    tower.save_pretrained(tmp_path / "tower")
    write_checkpoint(tmp_path / "with", "phi", config=config, state=state)
    write_checkpoint(
        tmp_path / "without",
        "phi",
        config=config,
        state={k: v for k, v in state.items() if k not in {prefix + t for t in tower_state}},
    )
    ids, mask = expand_image_tokens(
        [[7, IMAGE_TOKEN_INDEX, 8, 9]], image_token_id=IMAGE_TOKEN_ID, num_image_tokens=NUM_PATCHES
    )
    pixel = torch.randn(1, 3, VISION["image"], VISION["image"], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = load_moe_llava(tmp_path / "with", image_token_id=IMAGE_TOKEN_ID)
        b = load_moe_llava(
            tmp_path / "without", image_token_id=IMAGE_TOKEN_ID, vision_tower=tmp_path / "tower"
        )
        la = a.model(input_ids=ids, attention_mask=mask, pixel_values=pixel).logits
        lb = b.model(input_ids=ids, attention_mask=mask, pixel_values=pixel).logits
    torch.testing.assert_close(la, lb, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="no image tower weights"):
        load_moe_llava(tmp_path / "without", image_token_id=IMAGE_TOKEN_ID)


def test_bf16_load_is_a_rounding_of_fp32(checkpoint):
    directory, _, _ = checkpoint
    ids = _text_ids(6)
    with torch.no_grad():
        full = load_moe_llava(directory, image_token_id=IMAGE_TOKEN_ID).model(input_ids=ids).logits
        model = load_moe_llava(directory, image_token_id=IMAGE_TOKEN_ID, dtype=torch.bfloat16).model
        half = model(input_ids=ids).logits
    # Routers stay fp32, as DeepSpeed's gate (``wg`` is built with ``.float()``).
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if not n.endswith("router.weight")} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if n.endswith("router.weight")} == {torch.float32}
    assert (half.float() - full).abs().max() < 0.1 * full.abs().max()


def test_saved_in_the_moevl_format_reloads_exactly(checkpoint, tmp_path):
    from moevl.checkpoint.format import load_moe_model, save_moe_model

    directory, _, _ = checkpoint
    model, _ = load_moe_llava(directory, image_token_id=IMAGE_TOKEN_ID)
    save_moe_model(model, tmp_path / "moevl")
    again = load_moe_model(tmp_path / "moevl")
    ids, mask = expand_image_tokens(
        [[4, IMAGE_TOKEN_INDEX, 5, 6]], image_token_id=IMAGE_TOKEN_ID, num_image_tokens=NUM_PATCHES
    )
    pixel = torch.randn(1, 3, VISION["image"], VISION["image"], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, pixel_values=pixel).logits
        b = again(input_ids=ids, attention_mask=mask, pixel_values=pixel).logits
    assert moe_state(again).settings == moe_state(model).settings
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_freeze_dense_trains_only_experts_and_routers(checkpoint):
    directory, _, _ = checkpoint
    model, _ = load_moe_llava(directory, image_token_id=IMAGE_TOKEN_ID, freeze_dense=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp.router." in n or ".mlp.experts." in n for n in trainable)
    assert any(".mlp.router." in n for n in trainable) and any(".mlp.experts." in n for n in trainable)


def test_capacity_factor_reaches_the_routers(checkpoint):
    directory, _, _ = checkpoint
    ids = _text_ids(8)
    with torch.no_grad():
        dropless = load_moe_llava(directory, image_token_id=IMAGE_TOKEN_ID).model(input_ids=ids).logits
        # cf = E / k: every expert may take every token, nothing is dropped.
        roomy = load_moe_llava(directory, image_token_id=IMAGE_TOKEN_ID, capacity_factor=2.0)
        tight = load_moe_llava(directory, image_token_id=IMAGE_TOKEN_ID, capacity_factor=0.25)
        assert {b.router.capacity_factor for b in moe_blocks(tight.model)} == {0.25}
        # (equal up to float rounding: the capacity path renormalises the kept weights again)
        torch.testing.assert_close(roomy.model(input_ids=ids).logits, dropless, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(tight.model(input_ids=ids).logits, dropless, atol=1e-3)


def test_settings_object_must_agree_with_the_checkpoint(tmp_path):
    from moevl.hf import MoESettings

    directory = _write(tmp_path)
    with pytest.raises(ValueError, match=r"num_experts=8 \(the checkpoint has 4\): fixed by"):
        load_moe_llava(directory, image_token_id=IMAGE_TOKEN_ID, settings=MoESettings(num_experts=8, top_k=2))
    model, _ = load_moe_llava(
        directory, image_token_id=IMAGE_TOKEN_ID, settings=MoESettings(stgc=STGCConfig())
    )
    assert moe_state(model).settings.stgc == STGCConfig() and moe_state(model).settings.layers == (0, 2)
    assert moe_state(model).settings.balance_coef == 0.01  # the checkpoint's router_aux_loss_coef
