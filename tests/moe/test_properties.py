"""Property-based checks of ``MoEFeedForward`` inputs (hypothesis): any shape (empty included), dtype, masks,
expert count, top-k, STGC on or off, training or not: a finite result of the right shape with padding at
zero, or a ``ValueError`` naming the problem; never another exception or a NaN."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moevl.moe import GroupedExperts, LTDRRouter, MoEFeedForward, TopKRouter
from moevl.stgc import STGCConfig

D = 8


@st.composite
def cases(draw):
    num_experts = draw(st.integers(1, 5))
    return {
        "num_experts": num_experts,
        "top_k": draw(st.integers(1, num_experts)),
        "ltdr": draw(st.booleans()),
        "stgc": draw(st.booleans()),
        "training": draw(st.booleans()),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        "batch": draw(st.integers(0, 3)),
        "length": draw(st.integers(0, 6)),
        "token_mask": draw(st.sampled_from([None, "random", "none_real"])),
        "vision_mask": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def _layer(c):
    torch.manual_seed(c["seed"])
    kwargs = dict(hidden_size=D, num_experts=c["num_experts"], top_k=c["top_k"])
    router = LTDRRouter(**kwargs) if c["ltdr"] else TopKRouter(**kwargs)
    experts = GroupedExperts(num_experts=c["num_experts"], hidden_size=D, intermediate_size=12)
    layer = MoEFeedForward(router=router, experts=experts, stgc=STGCConfig() if c["stgc"] else None)
    return layer.to(c["dtype"]).train(c["training"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_any_valid_input_gives_a_finite_result(c):
    layer = _layer(c)
    g = torch.Generator().manual_seed(c["seed"])
    x = torch.randn(c["batch"], c["length"], D, generator=g).to(c["dtype"]).requires_grad_(c["training"])
    shape = (c["batch"], c["length"])
    token_mask = None
    if c["token_mask"] == "random":
        token_mask = torch.rand(shape, generator=g) < 0.7
    elif c["token_mask"] == "none_real":
        token_mask = torch.zeros(shape, dtype=torch.bool)
    vision_mask = (torch.rand(shape, generator=g) < 0.5) if c["vision_mask"] else None
    out, record = layer(x, token_mask=token_mask, vision_mask=vision_mask)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out.float()).all()
    if token_mask is not None:
        assert (out[~token_mask] == 0).all()  # padding goes to no expert
    loss = record.aux_loss()
    assert torch.isfinite(loss.float()).all()
    if c["training"]:
        (out.float().sum() + loss).backward()
        grads = [p.grad for p in layer.parameters() if p.grad is not None] + [x.grad]
        assert all(torch.isfinite(gr.float()).all() for gr in grads if gr is not None)


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 12).filter(lambda w: w != D),
    mask_len=st.integers(0, 6),
)
def test_bad_shapes_are_value_errors(width, mask_len):
    layer = _layer(
        dict(num_experts=3, top_k=2, ltdr=False, stgc=False, training=False, dtype=torch.float32, seed=0)
    )
    try:
        layer(torch.randn(2, 4, width))
    except ValueError as e:
        assert "hidden" in str(e) or str(width) in str(e)
    else:
        raise AssertionError(f"width {width} != {D} was accepted")
    if mask_len != 4:
        try:
            layer(torch.randn(2, 4, D), token_mask=torch.ones(2, mask_len, dtype=torch.bool))
        except ValueError as e:
            assert "token_mask" in str(e)
        else:
            raise AssertionError("a token_mask of the wrong shape was accepted")
