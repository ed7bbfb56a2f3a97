import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moevl.moe import GroupedExperts, MoEFeedForward, TopKRouter, apply_capacity, balance_loss, router_z_loss


def test_balance_loss_top1_hand_formula():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5]])
    idx = probs.topk(2, -1).indices
    # f = fraction of first choices: e0 two tokens, e1 one, e2 one; P = column means.
    f = torch.tensor([2 / 4, 1 / 4, 1 / 4])
    p = probs.mean(0)
    assert balance_loss(probs, idx) == pytest.approx(float(3 * (f * p).sum()), abs=1e-6)


def test_balance_loss_topk_equals_transformers_mixtral():
    torch.manual_seed(0)
    logits = torch.randn(2 * 9, 6)
    idx = logits.softmax(-1).topk(2, -1).indices
    ours = balance_loss(logits.softmax(-1), idx, balance_from="topk")
    hf = load_balancing_loss_func((logits,), num_experts=6, top_k=2)
    torch.testing.assert_close(ours, hf)


def test_balance_and_z_loss_invariant_to_masked_padding():
    torch.manual_seed(0)
    router = TopKRouter(hidden_size=8, num_experts=4, top_k=2)
    x = torch.randn(10, 8)
    rec = router(x)
    padded = torch.cat([x, 50 * torch.randn(6, 8)])
    mask = torch.arange(16) < 10
    rec_pad = router(padded, token_mask=mask)
    torch.testing.assert_close(rec_pad.balance_loss, rec.balance_loss)
    torch.testing.assert_close(rec_pad.z_loss, rec.z_loss)
    assert torch.all(rec_pad.indices[10:] == -1) and torch.all(rec_pad.weights[10:] == 0)
    # and the padding really would have changed an unmasked loss
    assert not torch.allclose(router(padded).balance_loss, rec.balance_loss)


def test_z_loss_hand_formula():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2) ** 2 + math.log(math.e + math.e**2) ** 2) / 2
    assert router_z_loss(logits) == pytest.approx(expected, rel=1e-6)


def test_topk_weights_renormalised():
    torch.manual_seed(0)
    router = TopKRouter(hidden_size=8, num_experts=5, top_k=3)
    rec = router(torch.randn(7, 8))
    torch.testing.assert_close(rec.weights.sum(-1), torch.ones(7))
    top = rec.probs.topk(3, -1)
    torch.testing.assert_close(rec.weights, top.values / top.values.sum(-1, keepdim=True))
    raw = TopKRouter(hidden_size=8, num_experts=5, top_k=3, normalize_weights=False)
    raw.load_state_dict(router.state_dict())
    torch.testing.assert_close(
        raw(torch.ones(2, 8)).weights, router(torch.ones(2, 8)).probs.topk(3, -1).values
    )


def test_capacity_drops_in_slot_major_order():
    # 4 tokens, 2 experts, k=2, capacity = ceil(0.5 * 4 * 2 / 2) = 2 per expert.
    idx = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    w = torch.full((4, 2), 0.5)
    new_idx, new_w = apply_capacity(idx, w, num_experts=2, capacity_factor=0.5, renormalize=False)
    # first choices placed first: e0 gets tokens 0,1 (token 2's first choice dropped); e1 gets token 3
    # (first) and token 0 (second choice); the rest are over capacity.
    expected = torch.tensor([[0, 1], [0, -1], [-1, -1], [1, -1]])
    assert torch.equal(new_idx, expected)
    assert torch.equal(new_w == 0, expected == -1)
    for e in range(2):
        assert int((new_idx == e).sum()) <= 2


def test_jitter_only_in_training_and_routing_deterministic_in_eval():
    torch.manual_seed(0)
    router = TopKRouter(hidden_size=8, num_experts=4, top_k=2, jitter=0.5).eval()
    x = torch.randn(20, 8)
    assert torch.equal(router(x).logits, router(x).logits)
    router.train()
    assert not torch.equal(router(x).logits, router(x).logits)


def test_padding_tokens_get_zero_output_and_no_gradient():
    torch.manual_seed(0)
    moe = MoEFeedForward(
        router=TopKRouter(hidden_size=16, num_experts=4, top_k=2),
        experts=GroupedExperts(num_experts=4, hidden_size=16, intermediate_size=32),
    )
    x = torch.randn(2, 6, 16, requires_grad=True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    out, rec = moe(x, token_mask=mask)
    assert torch.all(out[0, 4:] == 0)
    out.sum().backward()
    assert torch.all(x.grad[0, 4:] == 0)
    full, _ = moe(x)
    torch.testing.assert_close(out[mask], full[mask])


def test_router_argument_errors():
    with pytest.raises(ValueError, match="top_k"):
        TopKRouter(hidden_size=8, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="balance_from"):
        TopKRouter(hidden_size=8, num_experts=2, top_k=1, balance_from="all")
    router = TopKRouter(hidden_size=8, num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="token_mask"):
        router(torch.randn(3, 8), token_mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="hidden"):
        router(torch.randn(3, 7))
