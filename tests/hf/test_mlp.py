"""``find_mlp`` / ``experts_from_mlp``: decoder MLPs found by the shapes of their linear layers and
verified against their own forward, whatever they are called; upcycled models equal the dense ones."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moevl.hf import upcycle
from moevl.hf.block import UpcycledMoEBlock
from moevl.hf.mlp import experts_from_mlp, find_mlp
from moevl.hf.runtime import decoder_layers
from tests.fixtures.tiny import ARCHS, causal_lm
from tests.fixtures.tiny_export import gpt2, gpt_j, gpt_neox, qwen3

torch.set_num_threads(1)

# family: (builder, gated, fused, (up, gate, down) layer names, bias); H is 64 (GPT-2/J: 4 D = 128)
FAMILIES = {
    "gpt2": (gpt2, False, False, ("c_fc", None, "c_proj"), True),  # Conv1D: weights (in, out)
    "gpt_neox": (gpt_neox, False, False, ("dense_h_to_4h", None, "dense_4h_to_h"), True),
    "gpt_j": (gpt_j, False, False, ("fc_in", None, "fc_out"), True),
    "qwen3": (qwen3, True, False, ("up_proj", "gate_proj", "down_proj"), False),
    "phi3": (lambda: causal_lm("phi3"), True, True, ("gate_up_proj", None, "down_proj"), False),
    "phi": (lambda: causal_lm("phi"), False, False, ("fc1", None, "fc2"), True),
    **{
        arch: (lambda a=arch: causal_lm(a), True, False, ("up_proj", "gate_proj", "down_proj"), False)
        for arch in ("llama", "qwen2", "mistral", "stablelm", "gemma")
    },
}
assert set(ARCHS) <= set(FAMILIES)


def _x(d: int, n: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _all_experts(experts, x: torch.Tensor, expert: int) -> torch.Tensor:
    """Every token through one expert with weight 1."""
    indices = torch.full((x.shape[0], 1), expert)
    out = experts(x, indices, torch.ones(x.shape[0], 1))
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_find_mlp_by_shape_in_every_family(family):
    build, gated, fused, (up, gate, down), bias = FAMILIES[family]
    layer = decoder_layers(build())[0]
    spec = find_mlp(layer)
    assert spec.attribute == "mlp" and spec.module is layer.mlp
    assert (
        spec.gated,
        spec.fused,
        spec.up.name,
        spec.gate and spec.gate.name,
        spec.down.name,
        spec.bias,
    ) == (
        gated,
        fused,
        up,
        gate,
        down,
        bias,
    )
    assert (spec.hidden_size, spec.intermediate_size) == (32, 128 if family in ("gpt2", "gpt_j") else 64)
    assert find_mlp(layer.mlp).module is layer.mlp  # the MLP module given directly
    # the formula is the module's forward on an input other than the probe, and so are the experts
    x = _x(32)
    with torch.no_grad():
        dense = layer.mlp(x[None])[0]
        torch.testing.assert_close(spec(x), dense, rtol=1e-5, atol=1e-6)
        experts = experts_from_mlp(layer.mlp, 3)
        for e in range(3):
            torch.testing.assert_close(_all_experts(experts, x, e), dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "gpt_j"])
def test_upcycled_models_found_by_shape_equal_the_dense_model(family):
    dense = FAMILIES[family][0]()
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = dense(input_ids=ids).logits
    model = upcycle(dense, num_experts=4, top_k=2, layers="all").eval()
    assert all(isinstance(layer.mlp, UpcycledMoEBlock) for layer in decoder_layers(model))
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class W123(nn.Module):
    """Mixtral-style ``w2(act(w_gate(x)) * w_up(x))``: names say nothing of which is the gate."""

    def __init__(self, gate_is_w1: bool, act=F.silu, bias: bool = False):
        super().__init__()
        self.w1, self.w3 = nn.Linear(8, 12, bias=bias), nn.Linear(8, 12, bias=bias)
        self.w2 = nn.Linear(12, 8, bias=bias)
        self.gate_is_w1, self.act = gate_is_w1, act

    def forward(self, x):
        gate, up = (self.w1, self.w3) if self.gate_is_w1 else (self.w3, self.w1)
        return self.w2(self.act(gate(x)) * up(x))


@pytest.mark.parametrize("gate_is_w1", [True, False])
@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
def test_w1_w2_w3_gate_and_activation_come_from_the_forward(gate_is_w1, act):
    torch.manual_seed(0)
    mlp = W123(gate_is_w1, getattr(F, act), bias=act == "gelu")
    spec = find_mlp(mlp)
    assert spec.gate.name == ("w1" if gate_is_w1 else "w3") and spec.up.name == ("w3" if gate_is_w1 else "w1")
    assert spec.down.name == "w2" and spec.activation == act and spec.bias == (act == "gelu")
    x = _x(8)
    with torch.no_grad():
        torch.testing.assert_close(
            _all_experts(experts_from_mlp(spec, 2), x, 1), mlp(x), rtol=1e-5, atol=1e-6
        )


class FusedUpGate(nn.Module):
    """A fused projection with the UP half first (the opposite of Phi-3's order)."""

    def __init__(self):
        super().__init__()
        self.proj_in, self.proj_out = nn.Linear(8, 24, bias=False), nn.Linear(12, 8, bias=False)

    def forward(self, x):
        up, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(F.silu(gate) * up)


def test_fused_half_order_comes_from_the_forward():
    torch.manual_seed(0)
    mlp = FusedUpGate()
    spec = find_mlp(mlp)
    assert spec.fused and not spec.gate_first
    # the experts hold the native layout: gate rows first
    torch.testing.assert_close(
        experts_from_mlp(spec, 2).gate_up_proj[0], torch.cat(mlp.proj_in.weight.chunk(2)[::-1])
    )
    x = _x(8)
    with torch.no_grad():
        torch.testing.assert_close(_all_experts(experts_from_mlp(mlp, 2), x, 0), mlp(x), rtol=1e-5, atol=1e-6)


class Layer(nn.Module):
    """A decoder layer whose MLP is not called ``mlp``."""

    def __init__(self, attribute: str, mlp: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        setattr(self, attribute, mlp)


@pytest.mark.parametrize("attribute", ["feed_forward", "ffn"])
def test_an_mlp_under_another_attribute_is_found(attribute):
    torch.manual_seed(0)
    spec = find_mlp(Layer(attribute, W123(True)))
    assert spec.attribute == attribute and spec.gate.name == "w1"


class Scaled(W123):
    def forward(self, x):
        return 2 * super().forward(x)


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down, self.norm = nn.Linear(8, 12), nn.Linear(12, 8), nn.LayerNorm(12)

    def forward(self, x):
        return self.down(F.gelu(self.norm(self.up(x))))


def test_modules_no_formula_reproduces_are_refused_by_name():
    torch.manual_seed(0)
    with pytest.raises(
        ValueError, match=r"in Scaled; tried itself: D=8: no formula .*best relative error 0\."
    ):
        find_mlp(Scaled(True))
    with pytest.raises(ValueError, match=r"no feed-forward MLP .* in Normed"):
        find_mlp(Normed())  # a norm between the layers: never approximated
    with pytest.raises(ValueError, match=r"its linear layers \(none\)"):
        find_mlp(nn.LayerNorm(8))
    two = Layer("ffn", W123(True))
    two.mlp = W123(False)
    with pytest.raises(ValueError, match=r"Layer has several MLPs \['ffn', 'mlp'\]"):
        find_mlp(two)
    with pytest.raises(ValueError, match="Layer is not itself a feed-forward MLP \\(its child `ffn` is\\)"):
        experts_from_mlp(Layer("ffn", W123(True)), 2)


def test_uninitialised_weights_do_not_confuse_the_structure():
    """Identification runs on random weights: an all-zero gate (a model built without init) is fine."""
    torch.manual_seed(0)
    mlp = W123(gate_is_w1=False)
    with torch.no_grad():
        mlp.w1.weight.zero_()
        mlp.w3.weight.zero_()
    spec = find_mlp(mlp)
    assert spec.gate.name == "w3" and spec.gate.module is mlp.w3  # the original layers, not the copy
    assert all(p.abs().sum() == 0 for p in (mlp.w1.weight, mlp.w3.weight))  # the module is untouched
