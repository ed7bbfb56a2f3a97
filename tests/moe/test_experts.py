import pytest
import torch
import torch.nn.functional as F

from moevl.moe import GroupedExperts, MoEFeedForward, TopKRouter
from moevl.moe.activations import ACTIVATION_NAMES, Activation
from moevl.moe.dispatch import choose_capacity, dispatch, pad_to_capacity
from moevl.moe.grouped_mm import can_use_grouped_mm, grouped_matmul, grouped_weight_grad
from tests.fixtures.reference import per_token_moe

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


@pytest.mark.parametrize("layout", ["sorted", "padded"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("gated,bias", [(True, False), (False, True), (True, True)])
def test_grouped_equals_loop_and_per_token(size, gated, bias, layout):
    experts, x, idx, w = _make(*size, gated=gated, bias=bias)
    # Make one expert empty (where there are enough experts) so that empty groups are exercised.
    experts.layout = layout
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


@pytest.mark.parametrize("layout", ["sorted", "padded"])
def test_unused_slots_and_all_padding(layout):
    experts, x, idx, w = _make(10, 16, 32, 4, 2)
    idx[3] = -1
    w[3] = 0
    idx[5, 1] = -1
    w[5, 1] = 0
    experts.layout = layout
    y_fast, g_fast = _grads(experts, x, idx, w, lambda m, x, i, w: m(x, i, w)[0])
    y_ref, g_ref = _grads(experts, x, idx, w, per_token_moe)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.all(y_fast[3] == 0)
    none = torch.full_like(idx, -1)
    x = x.requires_grad_()
    y = experts(x, none, torch.zeros_like(w))[0]
    assert torch.all(y == 0)
    y.sum().backward()
    assert torch.all(x.grad == 0)
    assert torch.all(experts.gate_up_proj.grad == 0)


@pytest.mark.parametrize("gated", [True, False])
def test_one_expert_equals_dense_mlp(gated):
    """megablocks' degenerate case: one expert, top-1 routing, is the dense MLP (outputs and weight
    gradients), with the dense gate and up weights at rows [0:H] and [H:2H] of gate_up_proj."""
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
        gate, up, down = (torch.nn.Linear(i, o, bias=False) for i, o in ((d, h), (d, h), (h, d)))
        with torch.no_grad():
            gate.weight.copy_(experts.gate_up_proj[0, :h])
            up.weight.copy_(experts.gate_up_proj[0, h:])
            down.weight.copy_(experts.down_proj[0])
        ref = down(F.silu(gate(x)) * up(x))
    else:
        fc1, fc2 = torch.nn.Linear(d, h), torch.nn.Linear(h, d)
        with torch.no_grad():
            for lin, name in ((fc1, "up_proj"), (fc2, "down_proj")):
                torch.nn.init.normal_(getattr(experts, f"{name}_bias"))
                lin.weight.copy_(getattr(experts, name)[0])
                lin.bias.copy_(getattr(experts, f"{name}_bias")[0])
        ref = fc2(F.gelu(fc1(x)))
    out, _ = moe(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    tol = dict(atol=1e-5, rtol=1e-5)
    if gated:
        torch.testing.assert_close(
            experts.gate_up_proj.grad[0], torch.cat([gate.weight.grad, up.weight.grad]), **tol
        )
        torch.testing.assert_close(experts.down_proj.grad[0], down.weight.grad, **tol)
    else:
        for lin, name in ((fc1, "up_proj"), (fc2, "down_proj")):
            torch.testing.assert_close(getattr(experts, name).grad[0], lin.weight.grad, **tol)
            torch.testing.assert_close(getattr(experts, f"{name}_bias").grad[0], lin.bias.grad, **tol)


@pytest.mark.parametrize("impl", ["auto", "loop"])
def test_layout_equals_transformers_mixtral_experts(impl):
    """Same weights in transformers' MixtralExperts (native layout) give the same outputs and
    weight gradients on the same indices and weights, unused slots included."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    n, d, h, e, k = 29, 16, 24, 5, 3
    experts, x, idx, w = _make(n, d, h, e, k, impl=impl)
    idx[4, 2] = -1  # an unused slot (HF: the sentinel expert E)
    cfg = MixtralConfig(hidden_size=d, intermediate_size=h, num_local_experts=e, num_experts_per_tok=k)
    hf = MixtralExperts(cfg)
    with torch.no_grad():
        hf.gate_up_proj.copy_(experts.gate_up_proj)
        hf.down_proj.copy_(experts.down_proj)
    ours = experts(x, idx, w)[0]
    theirs = hf(x, idx.masked_fill(idx < 0, e), w)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ours)
    (ours * g).sum().backward()
    (theirs * g).sum().backward()
    torch.testing.assert_close(experts.gate_up_proj.grad, hf.gate_up_proj.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(experts.down_proj.grad, hf.down_proj.grad, atol=1e-5, rtol=1e-5)
    assert [n for n, _ in experts.named_parameters()] == [n for n, _ in hf.named_parameters()]


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


@pytest.mark.parametrize("name", ACTIVATION_NAMES)
def test_activation_closed_form_backward_equals_autograd(name):
    """The closed-form ``grad · f'(x)`` (ATen backward kernels) against autograd through the
    forward, also written in place over ``grad``; the forward against transformers' ``ACT2FN``."""
    from transformers.activations import ACT2FN

    hf_name = {"gelu_tanh": "gelu_pytorch_tanh"}.get(name, name)  # our internal name of HF's
    act = Activation.resolve(name)
    x = torch.cat([torch.randn(101, dtype=torch.float64) * 3, torch.tensor([0.0, -1e-3, 1e-3, 20.0, -20.0])])
    g = torch.randn_like(x)
    xx = x.clone().requires_grad_()
    (ref,) = torch.autograd.grad(act(xx), xx, g)
    torch.testing.assert_close(act.backward(g, x), ref)
    g_inplace = g.clone()
    assert act.backward(g_inplace, x, out=g_inplace) is g_inplace
    torch.testing.assert_close(g_inplace, ref)
    torch.testing.assert_close(act(x), ACT2FN[hf_name](x))
    # a callable activation goes through autograd and gives the same result
    via_callable = Activation.resolve(ACT2FN[hf_name])
    torch.testing.assert_close(via_callable.backward(g, x), ref)


@pytest.mark.parametrize("bias", [False, True])
def test_torch_compile_fullgraph_equals_eager(bias):
    """The whole MoE layer (router, balancing loss, experts' forward and hand-written backward)
    compiles as one graph: no graph break, so no host read of a device value in the forward. The
    ``aot_eager`` backend traces exactly what inductor would get and keeps the test fast."""
    torch.manual_seed(0)
    n_d = 16
    moe = MoEFeedForward(
        router=TopKRouter(hidden_size=n_d, num_experts=4, top_k=2),
        experts=GroupedExperts(num_experts=4, hidden_size=n_d, intermediate_size=32, bias=bias),
    )
    if bias:
        for p in (moe.experts.gate_up_proj_bias, moe.experts.down_proj_bias):
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 9, n_d)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False  # padding: unused slots reach the experts as -1

    def run(module):
        xx = x.clone().requires_grad_()
        out, rec = module(xx, token_mask=mask)
        loss = out.square().mean() + 0.01 * rec.balance_loss
        return out.detach(), torch.autograd.grad(loss, [xx, *moe.parameters()])

    compiled = torch.compile(moe, backend="aot_eager", fullgraph=True)
    out_c, grads_c = run(compiled)
    out_e, grads_e = run(moe)
    torch.testing.assert_close(out_c, out_e)
    assert torch.all(out_c[1, 5:] == 0)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge)


def test_padded_dispatch_layout():
    """Every expert's used rows first, in the sorted layout's order, then padding rows whose slot,
    token and expert are one past the last real one; the capacity groups end at C·(e+1)."""
    idx = torch.tensor([[2, 0], [2, -1], [0, 2], [2, 1]])
    d = dispatch(idx, 3)  # groups: expert 0 slots 1, 4; expert 1 slot 7; expert 2 slots 0, 2, 5, 6
    p = pad_to_capacity(d, 4, num_tokens=4)
    assert p.capacity == 4 and p.offsets.tolist() == [4, 8, 12]
    assert p.order.tolist() == [1, 4, 8, 8, 7, 8, 8, 8, 0, 2, 5, 6]
    assert p.token_ids.tolist() == [0, 2, 4, 4, 3, 4, 4, 4, 0, 1, 2, 3]
    assert p.expert_ids.tolist() == [0, 0, 3, 3, 1, 3, 3, 3, 2, 2, 2, 2]
    assert p.counts.tolist() == d.counts.tolist() == [2, 1, 4]
    assert p.used.sum() == 7


def test_capacity_groups_are_one_bmm_equal_to_per_expert_mm():
    torch.manual_seed(0)
    e, c, k, m = 3, 5, 8, 4
    a, b, dy = torch.randn(e * c, k), torch.randn(e, k, m), torch.randn(e * c, m)
    offs = torch.arange(1, e + 1, dtype=torch.int32) * c
    out = grouped_matmul(a, b, offs, capacity=c)
    dw = grouped_weight_grad(dy, a, offs, capacity=c)
    for i in range(e):
        rows = slice(i * c, (i + 1) * c)
        torch.testing.assert_close(out[rows], a[rows] @ b[i])
        torch.testing.assert_close(dw[i], dy[rows].t() @ a[rows])
    with pytest.raises(ValueError, match="E·capacity"):
        grouped_matmul(a[:-1], b, offs, capacity=c)


def test_auto_layout_rule(monkeypatch):
    """auto pads on multi-threaded CPU while padding adds at most MAX_PADDING of the used rows, never
    with one thread or LoRA; sorted/padded force the layout."""
    cpu = torch.device("cpu")
    balanced = dispatch(torch.arange(16).remainder(4).view(8, 2), 4)  # 4 rows per expert
    skewed = dispatch(torch.tensor([[0, 1]] * 6 + [[2, 3]] * 2), 4)  # 6, 6, 2, 2: 50% padding
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert choose_capacity(balanced, cpu, lora=False) == 4
    assert choose_capacity(skewed, cpu, lora=False) is None
    assert choose_capacity(balanced, cpu, lora=True) is None
    assert choose_capacity(skewed, cpu, lora=False, layout="padded") == 6
    assert choose_capacity(balanced, cpu, lora=False, layout="sorted") is None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert choose_capacity(balanced, cpu, lora=False) is None
    with pytest.raises(ValueError, match="layout must be one of"):
        GroupedExperts(num_experts=4, hidden_size=8, intermediate_size=8, layout="bmm")
