import pytest
import torch

from moevl.moe import LTDRRouter, TopKRouter, ltdr_tail_mask


def test_tail_mask_hand_example():
    probs = torch.tensor(
        [
            [0.25, 0.25, 0.25, 0.25],  # vision, var 0
            [0.70, 0.10, 0.10, 0.10],  # vision, var 0.0675
            [0.40, 0.30, 0.20, 0.10],  # vision, var 0.0125
            [0.97, 0.01, 0.01, 0.01],  # text: never tail
        ]
    )
    vision = torch.tensor([True, True, True, False])
    # mean vision RPV = (0 + 0.0675 + 0.0125) / 3 = 0.0267: only token 1 is above it.
    assert ltdr_tail_mask(probs, vision).tolist() == [False, True, False, False]
    assert not ltdr_tail_mask(probs, torch.zeros(4, dtype=torch.bool)).any()


def test_tail_mask_against_loop():
    torch.manual_seed(0)
    probs = torch.randn(50, 8).softmax(-1)
    vision = torch.rand(50) < 0.6
    rpv = [float(((p - p.mean()) ** 2).mean()) for p in probs]
    mean = sum(r for r, v in zip(rpv, vision, strict=True) if v) / int(vision.sum())
    expected = [bool(v) and r > mean for r, v in zip(rpv, vision, strict=True)]
    assert ltdr_tail_mask(probs, vision).tolist() == expected


def test_tail_tokens_get_a_experts_with_renormalised_weights():
    torch.manual_seed(0)
    router = LTDRRouter(hidden_size=8, num_experts=6, top_k=2, tail_top_k=4)
    x = torch.randn(40, 8)
    vision = torch.arange(40) < 25
    rec = router(x, vision_mask=vision)
    assert rec.tail_mask.any() and not rec.tail_mask[~vision].any()
    n_exp = rec.experts_per_token
    assert torch.all(n_exp[rec.tail_mask] == 4) and torch.all(n_exp[~rec.tail_mask] == 2)
    torch.testing.assert_close(rec.weights.sum(-1), torch.ones(40))
    for t in range(40):
        a = 4 if rec.tail_mask[t] else 2
        top = rec.probs[t].topk(a)
        assert rec.indices[t, :a].tolist() == top.indices.tolist()
        torch.testing.assert_close(rec.weights[t, :a], top.values / top.values.sum())


def test_vision_tokens_do_not_move_the_balancing_loss():
    torch.manual_seed(0)
    router = LTDRRouter(hidden_size=8, num_experts=4, top_k=2)
    x = torch.randn(30, 8)
    vision = torch.arange(30) < 12
    base = router(x, vision_mask=vision).balance_loss
    x_vis = x.clone()
    x_vis[:12] = torch.randn(12, 8) * 5
    torch.testing.assert_close(router(x_vis, vision_mask=vision).balance_loss, base)
    x_txt = x.clone()
    x_txt[12:] = torch.randn(18, 8) * 5
    assert not torch.allclose(router(x_txt, vision_mask=vision).balance_loss, base)


def test_a_equal_k_without_msdar_equals_topk_router():
    torch.manual_seed(0)
    topk = TopKRouter(hidden_size=8, num_experts=4, top_k=2)
    ltdr = LTDRRouter(hidden_size=8, num_experts=4, top_k=2, tail_top_k=2, language_only_balance=False)
    ltdr.load_state_dict(topk.state_dict())
    x = torch.randn(25, 8)
    vision = torch.rand(25) < 0.5
    mask = torch.rand(25) < 0.9
    a, b = topk(x, token_mask=mask, vision_mask=vision), ltdr(x, token_mask=mask, vision_mask=vision)
    for name in ("logits", "probs", "indices", "weights", "balance_loss", "z_loss"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_switches_and_errors():
    torch.manual_seed(0)
    x = torch.randn(20, 8)
    vision = torch.arange(20) < 10
    no_tail = LTDRRouter(hidden_size=8, num_experts=4, top_k=2, vision_tail=False)
    assert torch.all(no_tail(x, vision_mask=vision).experts_per_token == 2)
    with pytest.raises(ValueError, match="tail_top_k"):
        LTDRRouter(hidden_size=8, num_experts=4, top_k=2, tail_top_k=5)
    with pytest.raises(ValueError, match="vision"):
        ltdr_tail_mask(torch.rand(3, 4), torch.ones(2, dtype=torch.bool))


@pytest.mark.parametrize(
    "options",
    [
        dict(scoring="sigmoid", score_bias=True, num_groups=4, topk_groups=2, routed_scaling_factor=2.5),
        dict(
            normalize_weights=False, num_groups=4, topk_groups=3, group_score="max", routed_scaling_factor=1.5
        ),
    ],
)
def test_tail_tokens_take_top_a_under_the_routers_own_rule(options):
    from tests.moe.test_routing import _loop_decision

    torch.manual_seed(0)
    router = LTDRRouter(hidden_size=8, num_experts=8, top_k=2, tail_top_k=4, **options)
    with torch.no_grad():
        router.weight.normal_()
        if options.get("score_bias"):
            router.e_score_correction_bias.normal_(0.0, 0.3)
    x = torch.randn(30, 8)
    vision = torch.arange(30) < 18
    rec = router(x, vision_mask=vision)
    assert rec.tail_mask.any() and not rec.tail_mask[~vision].any()
    logits = rec.logits.detach()
    scores = logits.sigmoid() if options.get("scoring") == "sigmoid" else logits.softmax(-1)
    if options.get("scoring") == "sigmoid":  # RPV on the normalised sigmoid scores
        torch.testing.assert_close(rec.probs, scores / scores.sum(-1, keepdim=True))
    bias = router.e_score_correction_bias if options.get("score_bias") else None
    common = dict(
        num_groups=4,
        topk_groups=options["topk_groups"],
        group_score=options.get("group_score", "top2_sum"),
        normalize=options.get("normalize_weights", True),
        scale=options["routed_scaling_factor"],
    )
    head = _loop_decision(scores, bias, 2, **common)
    tail = _loop_decision(scores, bias, 4, **common)
    for t in range(30):
        ref = tail[t] if rec.tail_mask[t] else head[t]
        got = {j: w for j, w in zip(rec.indices[t].tolist(), rec.weights[t].tolist(), strict=True) if j >= 0}
        assert got.keys() == ref.keys()
        for j in ref:
            assert got[j] == pytest.approx(ref[j], rel=1e-6)


def test_tail_top_k_defaults_to_every_choosable_expert():
    grouped = LTDRRouter(hidden_size=8, num_experts=8, top_k=2, num_groups=4, topk_groups=2)
    assert grouped.tail_top_k == 4
    assert LTDRRouter(hidden_size=8, num_experts=8, top_k=2).tail_top_k == 8
    with pytest.raises(ValueError, match="tail_top_k"):
        LTDRRouter(hidden_size=8, num_experts=8, top_k=2, tail_top_k=5, num_groups=4, topk_groups=2)


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.5, 1.0])
def test_fixed_tail_ratio_takes_the_vision_tokens_of_highest_rpv(ratio):
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(61, 6, generator=g) * 2, -1)
    probs[5] = probs[7]  # a tie: the earlier token goes first
    vision = torch.rand(61, generator=g) < 0.7
    mask = ltdr_tail_mask(probs, vision, tail_ratio=ratio)
    # reference: sort the vision tokens by RPV (population variance written out), take the first round(r * n)
    rows = [i for i in range(61) if vision[i]]
    rpv = {i: sum((float(p) - 1 / 6) ** 2 for p in probs[i]) / 6 for i in rows}
    ranked = sorted(rows, key=lambda i: (-round(rpv[i], 6), i))
    expected = set(ranked[: round(ratio * len(rows))])
    assert set(torch.nonzero(mask).flatten().tolist()) == expected
    assert len(expected) > 0


def test_router_with_a_fixed_tail_ratio_gives_that_share_of_vision_tokens_a_experts():
    torch.manual_seed(0)
    router = LTDRRouter(hidden_size=8, num_experts=4, top_k=1, tail_top_k=3, tail_ratio=0.2)
    x = torch.randn(50, 8)
    vision = torch.zeros(50, dtype=torch.bool)
    vision[:40] = True
    rec = router(x, vision_mask=vision)
    assert int(rec.tail_mask.sum()) == 8  # 20% of 40
    n_exp = rec.experts_per_token
    assert (n_exp[rec.tail_mask] == 3).all() and (n_exp[~rec.tail_mask] == 1).all()
    assert "tail_ratio=0.2" in repr(router)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_tail_ratio_outside_0_1_is_refused(ratio):
    from moevl.moe import LTDRConfig

    with pytest.raises(ValueError, match="tail_ratio"):
        LTDRConfig(tail_ratio=ratio)
    with pytest.raises(ValueError, match="tail_ratio"):
        LTDRRouter(hidden_size=8, num_experts=4, top_k=1, tail_ratio=ratio)
