"""Stage 3 on model classes whose processors cannot be built here (they need torchvision): the inputs are
prepared in the test the way their processors would (pixel values, image sizes, one image token per
feature), then the model is upcycled with STGC and LTDR and takes a training step."""

import pytest
import torch
import transformers as tf

from moevl.hf import moe_blocks, moe_state, upcycle
from moevl.moe import LTDRConfig
from moevl.stgc import STGCConfig

IMAGE = 10  # the image token id in these tiny vocabularies


def _text(cls):
    return cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8)  # fmt: skip


def mistral3():
    """Mistral 3 (Pixtral vision tower): 16x16 images, 4x4 patches merged 2x2 -> 4 image tokens each."""
    vision = tf.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                    image_size=16, patch_size=4, head_dim=8)  # fmt: skip
    config = tf.Mistral3Config(vision_config=vision, text_config=_text(tf.MistralConfig), image_token_index=IMAGE,
                               spatial_merge_size=2, vision_feature_layer=-1)  # fmt: skip
    inputs = {"pixel_values": torch.randn(2, 3, 16, 16), "image_sizes": torch.tensor([[16, 16], [16, 16]])}
    return tf.Mistral3ForConditionalGeneration(config), inputs, 4


def llava_onevision():
    """LLaVA-OneVision (SigLIP + Qwen2): one 16x16 grid cell plus the base image, 8x8 patches -> 10 tokens."""
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   image_size=16, patch_size=8)  # fmt: skip
    config = tf.LlavaOnevisionConfig(vision_config=vision, text_config=_text(tf.Qwen2Config), image_token_index=IMAGE,
                                     image_grid_pinpoints=[[16, 16]], vision_feature_layer=-1,
                                     vision_feature_select_strategy="full")  # fmt: skip
    inputs = {"pixel_values": torch.randn(2, 2, 3, 16, 16), "image_sizes": torch.tensor([[16, 16], [16, 16]])}
    return tf.LlavaOnevisionForConditionalGeneration(config), inputs, 10


@pytest.mark.parametrize("build", [mistral3, llava_onevision], ids=lambda f: f.__name__)
def test_stage3_step_with_prepared_inputs(build):
    torch.manual_seed(0)
    model, inputs, image_tokens = build()
    ids = torch.tensor([[1] + [IMAGE] * image_tokens + [20, 21, 22, 23, 24]] * 2)  # (B=2, T)
    labels = ids.masked_fill(ids == IMAGE, -100)
    dense = model(input_ids=ids, labels=labels, **inputs).logits
    upcycle(
        model, num_experts=4, top_k=2, router="ltdr", ltdr=LTDRConfig(), stgc=STGCConfig(), freeze_dense=True
    )
    model.train()
    out = model(input_ids=ids, labels=labels, **inputs)
    torch.testing.assert_close(out.logits, dense, atol=1e-5, rtol=1e-5)  # upcycled == dense at initialisation
    out.loss.backward()
    for block in moe_blocks(model):
        grads = [p.grad for p in block.router_parameters()]
        assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    for rec in moe_state(model).context.records.values():
        assert rec.stgc is not None and rec.stgc.ready
        assert int(rec.vision_mask.sum()) == ids.eq(IMAGE).sum()  # the family's image token marks vision
        assert rec.tail_mask[rec.vision_mask].any()  # LTDR found a tail among them
