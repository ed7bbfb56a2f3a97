import copy
from types import SimpleNamespace

import pytest
import torch

from moevl.hf import MoESettings, moe_blocks, moe_state, upcycle
from moevl.hf.runtime import (
    MoEState,
    RoutingContext,
    attach,
    aux_loss,
    detach,
    find_moe_state,
    vision_token_ids,
)
from moevl.stgc import STGCConfig
from tests.fixtures.tiny import IMAGE_TOKEN, causal_lm, llava_batch, tiny_llava


def test_vision_token_ids_are_read_from_image_and_video_attributes():
    cfg = SimpleNamespace(image_token_id=7, video_token_id=9, image_token_index=7, vision_start_token_id=3)
    assert vision_token_ids(cfg) == (7, 9)  # start/end markers are text; duplicates once
    assert vision_token_ids(SimpleNamespace(image_token_index=5, video_token_index=None)) == (5,)
    assert vision_token_ids(SimpleNamespace(image_token_id=True)) == ()  # not a token id
    assert vision_token_ids(None) == ()
    assert vision_token_ids(tiny_llava().config) == (IMAGE_TOKEN,)


def test_context_marks_image_and_video_positions_of_real_tokens():
    ctx = RoutingContext(vision_token_ids=(7, 9))
    ids = torch.tensor([[0, 0, 7, 7, 1, 9, 9, 2], [1, 9, 2, 7, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0]])
    ids[1, 7] = 7  # a vision id on a padding position is not a vision token
    ctx.begin(ids, mask, None)
    expected = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 0], [0, 1, 0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(ctx.vision_mask, expected)
    assert torch.equal(ctx.token_mask, mask.bool())
    # a cached generation step: the mask covers past + new tokens, the masks describe the new ones
    ctx.begin(torch.tensor([[9], [4]]), torch.ones(2, 9, dtype=torch.long), None)
    assert ctx.vision_mask.tolist() == [[True], [False]] and ctx.token_mask.shape == (2, 1)


def test_upcycled_llava_with_a_video_token_id_routes_both_as_vision():
    model = tiny_llava()
    model.config.video_token_id = 94
    model = upcycle(model, num_experts=4, top_k=2, router="ltdr")
    assert moe_state(model).context.vision_token_ids == (IMAGE_TOKEN, 94)
    batch = llava_batch((1, 1))
    ids = batch["input_ids"].clone()
    ids[0, 0] = 94  # a "video" position in the text model's input
    with torch.no_grad():
        model(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    rec = moe_state(model).context.records[0]
    expected = (torch.isin(ids, torch.tensor([IMAGE_TOKEN, 94])) & batch["attention_mask"].bool()).reshape(-1)
    assert torch.equal(rec.vision_mask, expected) and bool(rec.vision_mask[0])


def _text_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 90, (2, 6), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_moe_state_is_one_submodule_holding_settings_context_and_hooks():
    dense = causal_lm("llama")
    assert find_moe_state(dense) is None
    with pytest.raises(ValueError, match="LlamaForCausalLM has no moevl MoE layers"):
        moe_state(dense)
    model = upcycle(causal_lm("llama"), num_experts=4, top_k=2, stgc=STGCConfig())
    state = moe_state(model)
    assert model.get_submodule("moe_state") is state and isinstance(state, MoEState)
    # nothing besides the registered submodule: no hidden attributes on the model object
    assert not {"moe_state", "moe_settings", "moe_context"} & set(vars(model))
    assert list(state.parameters()) == [] and list(state.buffers()) == []
    assert not any(k.startswith("moe_state") for k in model.state_dict())
    assert state.settings.num_experts == 4 and MoESettings.from_dict(model.config.moevl) == state.settings
    assert all(block.context is state.context for block in moe_blocks(model))
    with pytest.raises(ValueError, match="already has moevl MoE layers"):
        attach(model, settings=state.settings, context=state.context)
    # wrappers that keep the model as .module (DDP, DeepSpeed) are looked through
    assert moe_state(SimpleNamespace(module=model)) is state

    batch = _text_batch()
    with_aux = model(**batch)
    assert sorted(state.context.records) == [0, 2]
    task = with_aux.loss - aux_loss(model)
    assert aux_loss(model) > 0

    assert detach(model) is state
    assert find_moe_state(model) is None and not hasattr(model.config, "moevl") and state.handles == []
    state.context.records.clear()
    plain = model(**batch)  # no hook: the task loss alone, the masks of no earlier forward
    torch.testing.assert_close(plain.loss, task)
    assert all(block.context.token_mask is None for block in moe_blocks(model))

    again = attach(model, settings=state.settings, context=state.context)
    torch.testing.assert_close(model(**batch).loss, with_aux.loss)
    assert moe_state(model) is again
    outer = torch.nn.Module()  # a wrapper of a wrapper (PEFT keeps the model two levels down)
    outer.base = torch.nn.Module()
    outer.base.model = model
    outer.module = outer.base.model
    assert detach(outer) is again and find_moe_state(model) is None


def test_a_deep_copy_has_its_own_state_wired_to_its_own_blocks():
    model = upcycle(causal_lm("llama"), num_experts=4, top_k=2)
    twin = copy.deepcopy(model)
    state, twin_state = moe_state(model), moe_state(twin)
    assert twin_state is not state and twin_state.context is not state.context
    assert all(block.context is twin_state.context for block in moe_blocks(twin))
    twin(**_text_batch())
    assert sorted(twin_state.context.records) == [0, 2] and state.context.records == {}


@pytest.mark.parametrize("build", ["upcycle", "adopt"])
def test_the_experts_layout_is_a_setting_of_the_model(build, monkeypatch):
    """``set_experts_layout`` sets every block's experts of this model (no process-wide switch): both layouts
    compute the same output and gradients, and another model keeps its own layout."""
    import moevl.moe.expert_function as ef  # the experts function calls pad_to_capacity by this name
    from moevl.hf import adopt
    from moevl.hf.runtime import set_experts_layout
    from tests.fixtures.tiny import native_moe

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # where auto would pad
    padded = []
    real_pad = ef.pad_to_capacity
    monkeypatch.setattr(ef, "pad_to_capacity", lambda *a: padded.append(1) or real_pad(*a))
    make = (lambda: upcycle(causal_lm("llama"), num_experts=4, top_k=2)) if build == "upcycle" else None
    make = make or (lambda: adopt(native_moe("qwen3_moe")))
    model, other = make().train(), make()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    results = {}
    for layout in ("sorted", "padded"):
        padded.clear()
        set_experts_layout(model, layout)
        assert {b.experts.layout for b in moe_blocks(model)} == {layout}
        assert {b.experts.layout for b in moe_blocks(other)} == {"auto"}
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results[layout] = (out.logits.detach(), grads)
        assert bool(padded) == (layout == "padded")  # the layout asked for is the one that ran
    torch.testing.assert_close(results["sorted"][0], results["padded"][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(results["sorted"][1], results["padded"][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layout must be one of"):
        set_experts_layout(model, "bmm")
