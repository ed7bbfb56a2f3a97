"""LoRA adapters on the grouped experts: exactness at B = 0, the grouped path against a per-expert loop and a
per-token reference (outputs and every gradient), merging, dropout, and STGC's cosine over the adapters only
against per-sample autograd gradients."""

import pytest
import torch

from moevl.moe import GroupedExperts
from moevl.moe.expert_function import ExpertGrads
from moevl.moe.lora import LoRAConfig
from moevl.stgc.cosine import grouped_token_gradient_cosine
from tests.fixtures.reference import per_token_moe

# (N, D, H, E, K, r): 16/48 grouped_mm-aligned in fp32, 17/33 and r=3 not (loop fallback), a single token.
SIZES = [(37, 16, 48, 4, 2, 4), (23, 17, 33, 5, 3, 3), (1, 16, 32, 4, 2, 8), (40, 32, 64, 8, 1, 4)]


def _make(n, d, h, e, k, r, *, gated=True, bias=False, dropout=0.0, seed=0, random_b=True):
    torch.manual_seed(seed)
    experts = GroupedExperts(
        num_experts=e, hidden_size=d, intermediate_size=h, gated=gated, bias=bias,
        activation="silu" if gated else "gelu",
    )  # fmt: skip
    if bias:
        for name, p in experts.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(p, std=0.1)
    experts.add_lora(LoRAConfig(r=r, alpha=2.0 * r + 1, dropout=dropout))
    if random_b:  # B = 0 at start makes A's gradient zero: test with a trained-looking B
        with torch.no_grad():
            for name, p in experts.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(std=0.3)
    x = torch.randn(n, d)
    w, idx = torch.randn(n, e).softmax(-1).topk(k, -1)
    return experts, x, idx, w


def _grads(experts, x, idx, w, run, seed=5):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    torch.manual_seed(seed)  # the same dropout masks in every path
    y = run(experts, x, idx, w)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    params = [p for p in experts.parameters() if p.requires_grad]
    return y.detach(), torch.autograd.grad((y * g).sum(), [x, w, *params])


def _call(m, x, i, w):
    return m(x, i, w)[0]


def test_b_zero_gives_the_model_without_adapters_exactly():
    experts, x, idx, w = _make(37, 16, 48, 4, 2, 4, bias=True, random_b=False)
    with_adapters = experts(x, idx, w)[0]
    config, experts.lora = experts.lora, None  # the same experts, adapters ignored
    without = experts(x, idx, w)[0]
    experts.lora = config
    assert torch.equal(with_adapters, without)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("gated,bias", [(True, False), (False, True)])
@pytest.mark.parametrize("freeze", [True, False])
def test_grouped_equals_loop_and_per_token_reference(size, gated, bias, freeze):
    experts, x, idx, w = _make(*size, gated=gated, bias=bias)
    if freeze:  # LoRA training: only the adapters have gradients
        for name, p in experts.named_parameters():
            p.requires_grad_("lora" in name)
    y_fast, g_fast = _grads(experts, x, idx, w, _call)
    experts.implementation = "loop"
    y_loop, g_loop = _grads(experts, x, idx, w, _call)
    y_ref, g_ref = _grads(experts, x, idx, w, per_token_moe)
    assert len(g_fast) == 2 + (4 if freeze else 6 + 2 * bias)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_loop, y_ref, atol=1e-5, rtol=1e-5)
    for a, b, c in zip(g_fast, g_loop, g_ref, strict=True):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b, c, atol=1e-5, rtol=1e-5)


def test_dropout_masks_are_the_same_in_grouped_and_loop_and_off_in_eval():
    experts, x, idx, w = _make(37, 16, 48, 4, 2, 4, dropout=0.3)
    experts.train()
    y_fast, g_fast = _grads(experts, x, idx, w, _call)
    experts.implementation = "loop"
    y_loop, g_loop = _grads(experts, x, idx, w, _call)
    torch.testing.assert_close(y_fast, y_loop, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fast, g_loop, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    experts.implementation = "auto"
    y_other, _ = _grads(experts, x, idx, w, _call, seed=6)  # other masks: dropout really acts
    assert not torch.allclose(y_fast, y_other)
    experts.eval()
    torch.testing.assert_close(
        _grads(experts, x, idx, w, _call, seed=6)[0], _grads(experts, x, idx, w, _call)[0]
    )


def test_merge_equals_the_adapter_model_and_removes_the_adapters():
    experts, x, idx, w = _make(23, 17, 33, 5, 3, 3, bias=True)
    before = experts(x, idx, w)[0]
    experts.merge_lora()
    assert experts.lora is None and not any("lora" in n for n, _ in experts.named_parameters())
    torch.testing.assert_close(experts(x, idx, w)[0], before, atol=1e-5, rtol=1e-5)


def test_frozen_base_weights_get_no_gradient():
    experts, x, idx, w = _make(37, 16, 48, 4, 2, 4)
    for name, p in experts.named_parameters():
        p.requires_grad_("lora" in name)
    experts(x, idx, w)[0].square().sum().backward()
    assert experts.gate_up_proj.grad is None and experts.down_proj.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in experts.parameters() if p.requires_grad)


class _Capture:
    """An observer that keeps what the experts' backward hands it."""

    grads: ExpertGrads | None = None

    def backward(self, grads: ExpertGrads):
        self.grads = grads
        return None


def _per_sample_cosines(experts, x, idx, w, g, names):
    """Cosine of each (token, expert) pair's own gradient on ``names`` (autograd, one pair at a time)
    against its expert's mean."""
    params = [getattr(experts, n) for n in names]
    per_expert: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for t in range(x.shape[0]):
        for s in range(idx.shape[1]):
            e = int(idx[t, s])
            y = w[t, s] * experts.expert_mlp(x[t : t + 1], e)[0]
            grads = torch.autograd.grad((y * g[t]).sum(), params)
            per_expert.setdefault(e, []).append((t, torch.cat([gr[e].reshape(-1) for gr in grads]).double()))
    out = {}
    for e, items in per_expert.items():
        mean = torch.stack([v for _, v in items]).mean(0)
        for t, v in items:
            out[(t, e)] = float(v @ mean / (v.norm() * mean.norm()))
    return out


@pytest.mark.parametrize("scope", ["all", "last"])
@pytest.mark.parametrize("size", [(31, 16, 48, 4, 2, 4), (19, 17, 33, 3, 2, 3)])
def test_stgc_cosine_over_the_adapters_equals_per_sample_gradients(scope, size):
    experts, x, idx, w = _make(*size, bias=True)
    for name, p in experts.named_parameters():
        p.requires_grad_("lora" in name)
    observer = _Capture()
    y, anchor = experts(x, idx, w, observer=observer, observed=torch.zeros(x.shape[0], experts.num_experts))
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    ((y * g).sum() + anchor).backward()
    grads = observer.grads
    assert len(grads.layers) == 4 and grads.output_layers == 2  # the four factors, nothing of W
    cos = grouped_token_gradient_cosine(grads, scope)
    names = ["gate_up_proj_lora_A", "gate_up_proj_lora_B", "down_proj_lora_A", "down_proj_lora_B"]
    ref = _per_sample_cosines(experts, x, idx, w, g, names if scope == "all" else names[2:])
    got = {(int(t), int(e)): float(c) for t, e, c in zip(grads.token_ids, grads.expert_ids, cos, strict=True)}
    assert set(got) == set(ref)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-4), key
    assert min(ref.values()) < 0 < max(ref.values())  # the comparison covers both signs


def test_bad_lora_settings_name_the_key():
    for kwargs, match in [
        ({"r": 0}, "lora.r must be an integer >= 1, got 0"),
        ({"alpha": 0.0}, "lora.alpha must be a finite number > 0.0, got 0.0"),
        ({"dropout": 1.0}, r"lora.dropout must be a finite number >= 0.0 and < 1.0, got 1.0"),
        (
            {"targets": ("experts", "mlp")},
            r"lora.targets\[1\] must be one of 'experts', 'routers', 'attention', got 'mlp'",
        ),
        ({"targets": ()}, "lora.targets must be a non-empty list"),
        ({"targets": ("experts", "experts")}, "must not repeat"),
    ]:
        with pytest.raises(ValueError, match=match):
            LoRAConfig(**kwargs)
