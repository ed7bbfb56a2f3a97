import pytest
import torch

from moevl.checkpoint import load_moe_model, save_moe_model
from moevl.hf import moe_blocks, moe_state, upcycle
from moevl.hf.block import UpcycledMoEBlock
from moevl.moe import LTDRConfig
from moevl.stgc import STGCConfig
from tests.fixtures.tiny import ARCHS, IMAGE_TOKEN, causal_lm, llava_batch, tiny_llava


def _batch(seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 90, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[1, 9:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_upcycled_equals_dense_at_init(arch):
    dense = causal_lm(arch)
    ids, mask = _batch()
    with torch.no_grad():
        ref = dense(input_ids=ids, attention_mask=mask).logits
    moe = upcycle(causal_lm(arch), num_experts=4, top_k=2, layers="alternate")
    blocks = moe_blocks(moe)
    assert [b.layer_index for b in blocks] == [0, 2]
    with torch.no_grad():
        out = moe(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    # the routing really is non-trivial: tokens spread over several experts
    rec = moe_state(moe).context.records[0]
    assert len(set(rec.indices[rec.indices >= 0].tolist())) > 2


@pytest.mark.parametrize("arch", ["llama", "phi", "phi3"])
def test_training_reduces_loss_and_save_reload_roundtrips(arch, tmp_path):
    model = upcycle(
        causal_lm(arch), num_experts=4, top_k=2, layers="all", freeze_dense=True, stgc=STGCConfig()
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n or ".experts." in n for n in trainable)
    model.train()
    ids, mask = _batch(pad=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.3
    model.eval()
    save_moe_model(model, tmp_path)
    reloaded = load_moe_model(tmp_path, model_class=type(model))
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = reloaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    assert moe_state(reloaded).settings == moe_state(model).settings


@pytest.mark.parametrize("original_format", [False, True])
def test_llava_save_reload_both_key_formats(tmp_path, original_format):
    model = upcycle(tiny_llava(), num_experts=4, top_k=2, router="ltdr", stgc=STGCConfig(weight=0.3))
    with torch.no_grad():
        for p in model.parameters():  # make every tensor distinct from a fresh init
            p.add_(0.01 * torch.randn_like(p))
    save_moe_model(model, tmp_path, save_original_format=original_format)
    if original_format:  # transformers' legacy names really were written
        from safetensors import safe_open

        with safe_open(str(next(tmp_path.glob("*.safetensors"))), "pt") as f:
            assert not set(f.keys()) <= set(model.state_dict())
    reloaded = load_moe_model(tmp_path, model_class=type(model))
    ref = model.state_dict()
    got = reloaded.state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert moe_state(reloaded).settings == moe_state(model).settings


def test_aux_loss_is_added_to_the_model_loss():
    model = upcycle(causal_lm("llama"), num_experts=4, top_k=2, balance_coef=0.5, z_loss_coef=0.1)
    ids, mask = _batch()
    dense = causal_lm("llama")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        ref = dense(input_ids=ids, attention_mask=mask, labels=ids)
    recs = moe_state(model).context.records.values()
    expected = ref.loss + sum(0.5 * r.balance_loss + 0.1 * r.z_loss for r in recs)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # what MoETrainer passes for 4 accumulation steps
        out = model(input_ids=ids, attention_mask=mask, labels=ids, moe_aux_scale=0.25)
    expected = ref.loss + 0.25 * sum(0.5 * r.balance_loss + 0.1 * r.z_loss for r in recs)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the next forward without it: no scale left over from the last one
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
    expected = ref.loss + sum(0.5 * r.balance_loss + 0.1 * r.z_loss for r in recs)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="moe_aux_scale must be a number >= 0, got -1"):
        model(input_ids=ids, attention_mask=mask, moe_aux_scale=-1)


def test_llava_modality_masks_with_padding_and_several_images():
    for side in ("right", "left"):
        model = upcycle(tiny_llava(), num_experts=4, top_k=2, router="ltdr")
        batch = llava_batch((1, 2, 0), pad_side=side)
        with torch.no_grad():
            model(**batch)
        ctx = moe_state(model).context
        assert torch.equal(
            ctx.vision_mask, (batch["input_ids"] == IMAGE_TOKEN) & batch["attention_mask"].bool()
        )
        assert torch.equal(ctx.token_mask, batch["attention_mask"].bool())
        rec = ctx.records[0]
        assert torch.equal(rec.vision_mask, ctx.vision_mask.reshape(-1))
        assert int(rec.vision_mask.sum()) == 3 * 4
        assert not rec.tail_mask[~rec.vision_mask].any()
        assert torch.all(rec.indices[~rec.token_mask] == -1)


def test_llava_upcycled_equals_dense_and_generates_with_ltdr():
    dense = tiny_llava()
    batch = llava_batch((1, 1), pad_side="left")
    with torch.no_grad():
        ref = dense(**batch).logits
        ref_gen = dense.generate(**batch, max_new_tokens=4, do_sample=False)
    model = upcycle(tiny_llava(), num_experts=4, top_k=2, router="ltdr", ltdr=LTDRConfig(tail_top_k=3))
    with torch.no_grad():
        out = model(**batch).logits
        gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(gen, ref_gen)
    # during generation the last step's context describes only the new token: all text, real
    assert (
        moe_state(model).context.vision_mask.shape == (2, 1)
        and not moe_state(model).context.vision_mask.any()
    )


def test_text_only_model_routes_every_token_as_text():
    model = upcycle(causal_lm("llama"), num_experts=4, top_k=2, router="ltdr")
    ids, mask = _batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    rec = moe_state(model).context.records[0]
    assert rec.vision_mask is None and not rec.tail_mask.any()


def test_unsupported_models_and_bad_arguments():
    class NoMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(ValueError, match="no decoder layer list"):
        upcycle(NoMLP(), num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="top_k"):
        upcycle(causal_lm("llama"), num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="layers"):
        upcycle(causal_lm("llama"), num_experts=2, top_k=1, layers=[7])
    with pytest.raises(ValueError, match="router"):
        upcycle(causal_lm("llama"), num_experts=2, top_k=1, router="hash")
    model = upcycle(causal_lm("llama"), num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="already upcycled"):
        upcycle(model, num_experts=2, top_k=1)
    assert isinstance(model.model.layers[0].mlp, UpcycledMoEBlock)


def test_upcycled_blocks_take_the_models_mode():
    from tests.fixtures.tiny import causal_lm

    model = upcycle(causal_lm("llama"), num_experts=4, top_k=2, jitter=0.5)  # causal_lm is in eval mode
    blocks = [m for m in model.modules() if type(m).__name__ == "UpcycledMoEBlock"]
    assert blocks and not any(b.training for b in blocks)  # no jitter at inference
    x = torch.randint(0, 90, (1, 7))
    torch.testing.assert_close(model(x).logits, model(x).logits, rtol=0, atol=0)
