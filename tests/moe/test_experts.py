import pytest
import torch
import torch.nn.functional as F

from moevl.moe import GroupedExperts, MoEFeedForward, TopKRouter
from moevl.moe.experts import can_use_grouped_mm
from tests.reference import per_token_moe

# (N, D, H, E, K): awkward sizes; 16/48 are grouped_mm-aligned in fp32, 17/33 are not (loop fallback).
SIZES = [(37, 16, 48, 4, 2), (23, 16, 48, 5, 3), (1, 16, 32, 4, 2), (29, 17, 33, 3, 3), (40, 32, 64, 8, 1)]


def _make(n, d, h, e, k, *, gated=True, bias=False, impl="auto", seed=0):
    torch.manual_seed(seed)
    experts = GroupedExperts(
        num_experts=e,
        hidden_size=d,
        intermediate_size=h,
        gated=gated,
        bias=bias,
        implementation=impl,
        activation="silu" if gated else "gelu",
    )
    if bias:
        for name, p in experts.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(n, d)
    logits = torch.randn(n, e)
    w, idx = logits.softmax(-1).topk(k, -1)
    return experts, x, idx, w


def _grads(experts, x, idx, w, run):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    y = run(experts, x, idx, w)
    g = torch.randn_like(y, generator=torch.Generator().manual_seed(1))
    params = [p for p in experts.parameters()]
    grads = torch.autograd.grad((y * g).sum(), [x, w, *params])
    return y.detach(), grads


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("gated,bias", [(True, False), (False, True), (True, True)])
def test_grouped_equals_loop_and_per_token(size, gated, bias):
    experts, x, idx, w = _make(*size, gated=gated, bias=bias)
    # Make one expert empty (where there are enough experts) so that empty groups are exercised.
    y_fast, g_fast = _grads(experts, x, idx, w, lambda m, x, i, w: m(x, i, w)[0])
    experts.implementation = "loop"
    y_loop, g_loop = _grads(experts, x, idx, w, lambda m, x, i, w: m(x, i, w)[0])
    y_ref, g_ref = _grads(experts, x, idx, w, per_token_moe)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_loop, y_ref, atol=1e-5, rtol=1e-5)
    for a, b, c in zip(g_fast, g_loop, g_ref, strict=True):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b, c, atol=1e-5, rtol=1e-5)


def test_aligned_sizes_really_use_grouped_mm():
    x = torch.randn(8, 16)
    w = torch.randn(4, 48, 16)
    assert can_use_grouped_mm(x, w.transpose(1, 2))
    assert not can_use_grouped_mm(torch.randn(8, 17), torch.randn(4, 33, 17).transpose(1, 2))
    experts, x, idx, w = _make(30, 16, 48, 4, 2, impl="grouped")
    y = experts(x, idx, w)[0]
    torch.testing.assert_close(y, per_token_moe(experts, x, idx, w), atol=1e-5, rtol=1e-5)
    odd, x, idx, w = _make(30, 17, 33, 4, 2, impl="grouped")
    with pytest.raises(ValueError, match="grouped"):
        odd(x, idx, w)


def test_unused_slots_and_all_padding():
    experts, x, idx, w = _make(10, 16, 32, 4, 2)
    idx[3] = -1
    w[3] = 0
    idx[5, 1] = -1
    w[5, 1] = 0
    y = experts(x, idx, w)[0]
    torch.testing.assert_close(y, per_token_moe(experts, x, idx, w), atol=1e-5, rtol=1e-5)
    assert torch.all(y[3] == 0)
    none = torch.full_like(idx, -1)
    x = x.requires_grad_()
    y = experts(x, none, torch.zeros_like(w))[0]
    assert torch.all(y == 0)
    y.sum().backward()
    assert torch.all(x.grad == 0)
    assert torch.all(experts.gate_proj.grad == 0)


@pytest.mark.parametrize("gated", [True, False])
def test_one_expert_equals_dense_mlp(gated):
    torch.manual_seed(0)
    d, h = 16, 40
    experts = GroupedExperts(
        num_experts=1,
        hidden_size=d,
        intermediate_size=h,
        gated=gated,
        bias=not gated,
        activation="silu" if gated else "gelu",
    )
    moe = MoEFeedForward(router=TopKRouter(hidden_size=d, num_experts=1, top_k=1), experts=experts)
    x = torch.randn(3, 7, d)
    if gated:
        dense = [
            torch.nn.Linear(d, h, bias=False),
            torch.nn.Linear(d, h, bias=False),
            torch.nn.Linear(h, d, bias=False),
        ]
        for lin, name in zip(dense, ["gate_proj", "up_proj", "down_proj"], strict=True):
            lin.weight.data.copy_(getattr(experts, name).data[0])
        ref = dense[2](F.silu(dense[0](x)) * dense[1](x))
    else:
        dense = [torch.nn.Linear(d, h), torch.nn.Linear(h, d)]
        for lin, name in zip(dense, ["fc1", "fc2"], strict=True):
            lin.weight.data.copy_(getattr(experts, name).data[0])
            lin.bias.data.copy_(getattr(experts, f"{name}_bias").data[0])
        ref = dense[1](F.gelu(dense[0](x)))
    out, _ = moe(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    names = ["gate_proj", "up_proj", "down_proj"] if gated else ["fc1", "fc2"]
    for lin, name in zip(dense, names, strict=True):
        torch.testing.assert_close(getattr(experts, name).grad[0], lin.weight.grad, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_matches_fp32():
    experts, x, idx, w = _make(64, 32, 64, 4, 2)
    ref = experts(x, idx, w)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts(x, idx, w)[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)


def test_bad_inputs_have_clear_errors():
    experts, x, idx, w = _make(5, 16, 32, 4, 2)
    with pytest.raises(ValueError, match="hidden must be"):
        experts(torch.randn(5, 15), idx, w)
    with pytest.raises(ValueError, match="indices and weights"):
        experts(x, idx[:, :1], w)
    with pytest.raises(ValueError, match="activation"):
        GroupedExperts(num_experts=2, hidden_size=4, intermediate_size=4, activation="nope")
    with pytest.raises(ValueError, match="num_experts"):
        MoEFeedForward(router=TopKRouter(hidden_size=16, num_experts=3, top_k=1), experts=experts)
