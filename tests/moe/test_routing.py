import copy
import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moevl.moe import GroupedExperts, MoEFeedForward, TopKRouter
from moevl.moe.routing import apply_capacity, balance_loss, router_z_loss


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


# --- native router semantics (transformers' routers on tiny configs, tests/fixtures/tiny.py) -----------

# Each family's decision written out by hand from transformers' router code (the reference the
# adopt() table must agree with).
NATIVE_SEMANTICS = {
    "mixtral": ({}, dict()),
    "qwen2_moe": ({}, dict(normalize_weights=False)),
    "qwen3_moe": ({}, dict(normalize_weights=True)),
    "qwen3_moe_raw": ({"norm_topk_prob": False}, dict(normalize_weights=False)),
    "olmoe": ({}, dict(normalize_weights=False)),
    "deepseek_v2": ({}, dict(normalize_weights=False, routed_scaling_factor=1.5)),
    "deepseek_v2_groups": (  # k=3 > topk_group=2: with max-scored groups a smaller k never feels the limit
        {"topk_method": "group_limited_greedy", "num_experts_per_tok": 3},
        dict(
            normalize_weights=False, routed_scaling_factor=1.5, num_groups=4, topk_groups=2, group_score="max"
        ),
    ),
    "deepseek_v3": (
        {},
        dict(
            scoring="sigmoid",
            score_bias=True,
            num_groups=4,
            topk_groups=2,
            group_score="top2_sum",
            routed_scaling_factor=2.5,
        ),
    ),
    "deepseek_v3_raw": (
        {"norm_topk_prob": False, "topk_group": 3},
        dict(
            scoring="sigmoid",
            score_bias=True,
            num_groups=4,
            topk_groups=3,
            routed_scaling_factor=2.5,
            normalize_weights=False,
        ),
    ),
}


def _native_gate(case):
    from tests.fixtures.tiny import native_moe

    overrides, semantics = NATIVE_SEMANTICS[case]
    family = case.removesuffix("_raw").removesuffix("_groups")
    gate = native_moe(family, **overrides).model.layers[-1].mlp.gate
    return gate, semantics


def _by_expert(indices, weights):
    """Slots sorted by expert index (native DeepSeek routers leave them unsorted)."""
    order = indices.sort(-1)
    return order.values, weights.gather(1, order.indices)


@pytest.mark.parametrize("case", sorted(NATIVE_SEMANTICS))
def test_router_options_equal_transformers_routers(case):
    gate, semantics = _native_gate(case)
    e, d = gate.weight.shape
    x = torch.randn(37, d, generator=torch.Generator().manual_seed(1))
    ours = TopKRouter(hidden_size=d, num_experts=e, top_k=gate.top_k, **semantics)
    with torch.no_grad():
        ours.weight.copy_(gate.weight)
        if semantics.get("score_bias"):
            ours.e_score_correction_bias.copy_(gate.e_score_correction_bias)
            assert ours.e_score_correction_bias.abs().sum() > 0  # the bias really is in play
    native_logits, native_w, native_idx = gate(x)
    rec = ours(x)
    assert torch.equal(rec.logits, native_logits)
    idx, w = _by_expert(rec.indices, rec.weights)
    ref_idx, ref_w = _by_expert(native_idx, native_w)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=0)
    if semantics.get("topk_groups", 1) < semantics.get("num_groups", 1) or semantics.get("score_bias"):
        plain = (
            rec.logits.float().softmax(-1)
            if semantics.get("scoring", "softmax") == "softmax"
            else rec.logits.sigmoid()
        )
        assert not torch.equal(idx, plain.topk(gate.top_k, -1).indices.sort(-1).values)  # the option mattered
    # the same decision from logits computed elsewhere (what adopt does with a kept native router)
    bias = gate.e_score_correction_bias if semantics.get("score_bias") else None
    outside = TopKRouter(hidden_size=d, num_experts=e, top_k=gate.top_k, own_weight=False, **semantics)
    assert not list(outside.state_dict())
    rec2 = outside.route(native_logits, score_bias=bias)
    assert torch.equal(rec2.indices, rec.indices) and torch.equal(rec2.weights, rec.weights)


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "deepseek_v2_groups", "deepseek_v3"])
def test_router_weight_gradients_equal_transformers_routers(case):
    gate, semantics = _native_gate(case)
    e, d = gate.weight.shape
    g = torch.Generator().manual_seed(2)
    x = torch.randn(29, d, generator=g)
    coef = torch.randn(29, e, generator=g)  # a loss that depends on which expert gets which weight
    ours = TopKRouter(hidden_size=d, num_experts=e, top_k=gate.top_k, **semantics)
    with torch.no_grad():
        ours.weight.copy_(gate.weight)
        if semantics.get("score_bias"):
            ours.e_score_correction_bias.copy_(gate.e_score_correction_bias)
    _, w, idx = gate(x)
    (w * coef.gather(1, idx)).sum().backward()
    rec = ours(x)
    (rec.weights * coef.gather(1, rec.indices)).sum().backward()
    assert gate.weight.grad.abs().sum() > 0
    torch.testing.assert_close(ours.weight.grad, gate.weight.grad, rtol=1e-5, atol=1e-7)


def _loop_decision(scores, bias, k, *, num_groups, topk_groups, group_score, normalize, scale):
    """Per-token reference of the decision (python lists, no vectorised masking)."""
    out = []
    n, e = scores.shape
    size = e // num_groups
    for t in range(n):
        choice = [float(scores[t, j] + (bias[j] if bias is not None else 0.0)) for j in range(e)]
        groups = []
        for gi in range(num_groups):
            members = sorted(choice[gi * size : (gi + 1) * size], reverse=True)
            groups.append(members[0] if group_score == "max" else members[0] + members[1])
        best_groups = sorted(range(num_groups), key=lambda gi: -groups[gi])[:topk_groups]
        allowed = [j for j in range(e) if j // size in best_groups]
        chosen = sorted(allowed, key=lambda j: -choice[j])[:k]
        w = [float(scores[t, j]) for j in chosen]
        if normalize:
            total = sum(w)
            w = [v / total for v in w]
        out.append({j: v * scale for j, v in zip(chosen, w, strict=True)})
    return out


@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_group_limited_bias_and_scaling_against_a_loop(scoring, group_score):
    torch.manual_seed(0)
    router = TopKRouter(
        hidden_size=12,
        num_experts=12,
        top_k=3,
        scoring=scoring,
        score_bias=True,
        num_groups=4,
        topk_groups=2,
        group_score=group_score,
        routed_scaling_factor=1.7,
    )
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias.normal_(0.0, 0.3)
    rec = router(torch.randn(23, 12))
    logits = rec.logits.detach()
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    expected = _loop_decision(
        scores,
        router.e_score_correction_bias,
        3,
        num_groups=4,
        topk_groups=2,
        group_score=group_score,
        normalize=True,
        scale=1.7,
    )
    for t, ref in enumerate(expected):
        got = dict(zip(rec.indices[t].tolist(), rec.weights[t].tolist(), strict=True))
        assert got.keys() == ref.keys()
        for j in ref:
            assert got[j] == pytest.approx(ref[j], rel=1e-6)
    # every token's experts lie in at most topk_groups groups
    assert all(len({j // 3 for j in row}) <= 2 for row in rec.indices.tolist())


def test_score_bias_moves_the_choice_not_the_weights():
    router = TopKRouter(
        hidden_size=2, num_experts=3, top_k=1, scoring="sigmoid", score_bias=True, normalize_weights=False
    )
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    assert router.route(logits).indices.tolist() == [[0]]
    router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.5, 0.0]))  # sigmoid(1) + 0.5 > sigmoid(2)
    rec = router.route(logits)
    assert rec.indices.tolist() == [[1]]
    assert rec.weights.item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())


def test_bias_on_logits_moves_the_choice_as_a_logit_offset():
    # sigmoid(1) + 0.5 > sigmoid(2) + 0: on the scores the bias picks expert 1; on the logits 1 + 0.5 < 2
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    bias = torch.tensor([0.0, 0.5, 0.0])
    on_scores, on_logits = (
        TopKRouter(hidden_size=2, num_experts=3, top_k=1, scoring="sigmoid", score_bias=True, bias_on=on)
        for on in ("scores", "logits")
    )
    for router in (on_scores, on_logits):
        router.e_score_correction_bias.copy_(bias)
    assert on_scores.route(logits).indices.tolist() == [[1]]
    assert on_logits.route(logits).indices.tolist() == [[0]]
    # against a loop: topk(z + b), weights sigmoid(z) of the chosen, renormalised (Kolibri's router)
    torch.manual_seed(0)
    z, b = torch.randn(20, 6), torch.randn(6)
    router = TopKRouter(
        hidden_size=2, num_experts=6, top_k=2, scoring="sigmoid", score_bias=True, bias_on="logits"
    )
    router.e_score_correction_bias.copy_(b)
    rec = router.route(z)
    for n in range(20):
        idx = (z[n] + b).topk(2).indices
        w = z[n][idx].sigmoid()
        assert rec.indices[n].tolist() == idx.tolist()
        torch.testing.assert_close(rec.weights[n], w / w.sum())


def test_sigmoid_router_probs_are_normalised_scores():
    router = TopKRouter(hidden_size=8, num_experts=5, top_k=2, scoring="sigmoid")
    rec = router(torch.randn(9, 8))
    s = rec.logits.sigmoid()
    torch.testing.assert_close(rec.probs, s / s.sum(-1, keepdim=True))
    torch.testing.assert_close(rec.probs.sum(-1), torch.ones(9))


def test_capacity_renormalises_before_the_scaling_factor():
    torch.manual_seed(0)
    router = TopKRouter(hidden_size=4, num_experts=2, top_k=2, capacity_factor=0.5, routed_scaling_factor=3.0)
    rec = router(torch.randn(6, 4))
    dropped = (rec.indices == -1).any(-1) & (rec.indices >= 0).any(-1)
    assert dropped.any()  # some tokens lost their second expert to the capacity
    used = (rec.indices >= 0).any(-1)
    torch.testing.assert_close(rec.weights[used].sum(-1), torch.full((int(used.sum()),), 3.0))


def test_router_option_errors():
    with pytest.raises(ValueError, match="num_groups"):
        TopKRouter(hidden_size=4, num_experts=6, top_k=1, num_groups=4)
    with pytest.raises(ValueError, match="top_k"):  # 2 groups of 2 experts: 4 choosable
        TopKRouter(hidden_size=4, num_experts=8, top_k=5, num_groups=4, topk_groups=2)
    with pytest.raises(ValueError, match="scoring"):
        TopKRouter(hidden_size=4, num_experts=4, top_k=1, scoring="relu")
    with pytest.raises(ValueError, match="top2_sum"):
        TopKRouter(hidden_size=4, num_experts=4, top_k=1, num_groups=4, topk_groups=2)
    outside = TopKRouter(hidden_size=4, num_experts=4, top_k=1, own_weight=False, score_bias=True)
    with pytest.raises(RuntimeError, match="own_weight"):
        outside.compute_logits(torch.randn(2, 4))
    with pytest.raises(ValueError, match="score_bias"):
        outside.route(torch.randn(2, 4))
    with pytest.raises(ValueError, match="score_bias"):
        TopKRouter(hidden_size=4, num_experts=4, top_k=1).route(torch.randn(2, 4), score_bias=torch.zeros(4))


@pytest.mark.parametrize("gated", [False, True])
def test_shared_experts_add_to_the_routed_output(gated):
    torch.manual_seed(0)
    router = TopKRouter(hidden_size=16, num_experts=4, top_k=2)
    experts = GroupedExperts(num_experts=4, hidden_size=16, intermediate_size=24)
    shared = torch.nn.Sequential(torch.nn.Linear(16, 40), torch.nn.SiLU(), torch.nn.Linear(40, 16))
    shared_gate = torch.nn.Linear(16, 1, bias=False) if gated else None
    moe = MoEFeedForward(router=router, experts=experts, shared_experts=shared, shared_gate=shared_gate)
    plain = MoEFeedForward(router=router, experts=experts)
    x = torch.randn(2, 7, 16, requires_grad=True)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    out, _ = moe(x, token_mask=mask)
    routed, _ = plain(x, token_mask=mask)
    s = shared(x) * (torch.sigmoid(shared_gate(x)) if gated else 1.0)
    torch.testing.assert_close(out[mask], routed[mask] + s[mask])
    assert torch.all(out[~mask] == 0)  # padding gets no output, from shared experts neither
    out.sum().backward()
    assert shared[0].weight.grad.abs().sum() > 0 and torch.all(x.grad[~mask] == 0)
    if gated:
        assert shared_gate.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shared_gate"):
        MoEFeedForward(router=router, experts=experts, shared_gate=torch.nn.Linear(16, 1))
    with pytest.raises(ValueError, match="shared_gate"):
        MoEFeedForward(
            router=router, experts=experts, shared_experts=shared, shared_gate=torch.nn.Linear(16, 2)
        )


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "deepseek_v2_groups", "deepseek_v3"])
def test_moe_layer_equals_transformers_native_blocks(case):
    """MoEFeedForward built from a native block's weights (copies) computes what the block does:
    outputs, and gradients of the router, experts and shared experts."""
    from tests.fixtures.tiny import native_moe

    overrides, semantics = NATIVE_SEMANTICS[case]
    family = case.removesuffix("_groups")
    block = native_moe(family, **overrides).model.layers[-1].mlp.train()
    e, d = block.gate.weight.shape
    h = block.experts.down_proj.shape[-1]
    router = TopKRouter(hidden_size=d, num_experts=e, top_k=block.gate.top_k, **semantics)
    experts = GroupedExperts(num_experts=e, hidden_size=d, intermediate_size=h)
    shared = copy.deepcopy(getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None))
    shared_gate = copy.deepcopy(getattr(block, "shared_expert_gate", None))
    with torch.no_grad():
        router.weight.copy_(block.gate.weight)
        if semantics.get("score_bias"):
            router.e_score_correction_bias.copy_(block.gate.e_score_correction_bias)
        experts.gate_up_proj.copy_(block.experts.gate_up_proj)
        experts.down_proj.copy_(block.experts.down_proj)
    moe = MoEFeedForward(router=router, experts=experts, shared_experts=shared, shared_gate=shared_gate)
    x = torch.randn(1, 23, d, generator=torch.Generator().manual_seed(3))
    coef = torch.randn(1, 23, d, generator=torch.Generator().manual_seed(4))
    ref = block(x)
    out, _ = moe(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    (ref * coef).sum().backward()
    (out * coef).sum().backward()
    pairs = [(router.weight, block.gate.weight), (experts.gate_up_proj, block.experts.gate_up_proj)]
    pairs.append((experts.down_proj, block.experts.down_proj))
    if shared is not None:
        native_shared = getattr(block, "shared_expert", None) or block.shared_experts
        pairs += list(zip(shared.parameters(), native_shared.parameters(), strict=True))
    if shared_gate is not None:
        pairs.append((shared_gate.weight, block.shared_expert_gate.weight))
    for ours, theirs in pairs:
        assert theirs.grad.abs().sum() > 0
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6)
