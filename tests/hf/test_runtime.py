from types import SimpleNamespace

import torch

from moevl.hf import RoutingContext, upcycle
from moevl.hf.runtime import vision_token_ids
from tests.fixtures.tiny import IMAGE_TOKEN, llava_batch, tiny_llava


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
    assert model.moe_context.vision_token_ids == (IMAGE_TOKEN, 94)
    batch = llava_batch((1, 1))
    ids = batch["input_ids"].clone()
    ids[0, 0] = 94  # a "video" position in the text model's input
    with torch.no_grad():
        model(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    rec = model.moe_context.records[0]
    expected = (torch.isin(ids, torch.tensor([IMAGE_TOKEN, 94])) & batch["attention_mask"].bool()).reshape(-1)
    assert torch.equal(rec.vision_mask, expected) and bool(rec.vision_mask[0])
