import pytest
import torch
from torch.utils.checkpoint import checkpoint

from moevl.moe import GroupedExperts, LTDRRouter, MoEFeedForward, TopKRouter
from moevl.stgc import STGCConfig, conflict_elimination_loss
from tests.fixtures.reference import mean_delta_cosines, per_token_gradient_cosines


def _layer(*, d=16, h=48, e=4, k=2, gated=True, bias=False, stgc=None, seed=0, router_cls=TopKRouter):
    torch.manual_seed(seed)
    experts = GroupedExperts(
        num_experts=e,
        hidden_size=d,
        intermediate_size=h,
        gated=gated,
        bias=bias,
        activation="silu" if gated else "gelu",
    )
    if bias:
        for name, p in experts.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(p, std=0.1)
    router = router_cls(hidden_size=d, num_experts=e, top_k=k)
    torch.nn.init.normal_(router.weight, std=0.5)
    return MoEFeedForward(router=router, experts=experts, stgc=stgc)


def _loss(out, target):
    return ((out - target) ** 2).sum()


def _brute_force_conflicts(layer, x, target, cfg, token_mask=None):
    """Per-token autograd gradients -> cosines -> conflict set {(t, e)}."""
    with torch.no_grad():
        rec = layer.router(x.reshape(-1, x.shape[-1]), token_mask=token_mask)
    flat = x.reshape(-1, x.shape[-1])
    out, _ = layer.experts(flat, rec.indices, rec.weights)
    grad_out = 2 * (out - target.reshape(-1, target.shape[-1])).detach()
    if cfg.scope == "delta":
        cos = mean_delta_cosines(layer.experts, flat, rec.indices, rec.weights, grad_out)
    else:
        cos = per_token_gradient_cosines(
            layer.experts, flat, rec.indices, rec.weights, grad_out, scope=cfg.scope
        )
    counts = torch.bincount(rec.indices[rec.indices >= 0], minlength=layer.num_experts)
    conflicts = {te for te, c in cos.items() if c < cfg.threshold and counts[te[1]] >= cfg.min_tokens}
    return cos, conflicts, rec


@pytest.mark.parametrize("layout", ["sorted", "padded"])
@pytest.mark.parametrize("scope", ["all", "last", "delta"])
@pytest.mark.parametrize(
    "gated,bias,d,h", [(True, False, 16, 48), (False, True, 16, 32), (True, False, 13, 21)]
)
def test_layer_conflicts_equal_brute_force(scope, gated, bias, d, h, layout):
    """The experts' rows in either layout (expert_function's sorted or padded) give the observer the
    same used rows."""
    cfg = STGCConfig(scope=scope, threshold=0.1)
    layer = _layer(d=d, h=h, gated=gated, bias=bias, stgc=cfg)
    torch.manual_seed(1)
    x = torch.randn(41, d)
    target = torch.randn(41, d)
    layer.experts.layout = layout
    out, rec = layer(x)
    (_loss(out, target) + rec.aux_loss()).backward()
    ref_cos, ref_conflicts, _ = _brute_force_conflicts(layer, x, target, cfg)
    stats = rec.stgc
    ours = {
        (int(t), int(e)): float(c)
        for t, e, c in zip(stats.token_ids, stats.expert_ids, stats.cosine, strict=True)
    }
    assert ours.keys() == ref_cos.keys()
    for key, c in ref_cos.items():
        assert ours[key] == pytest.approx(c, abs=1e-4), key
    flagged = {
        (int(t), int(e))
        for t, e, f in zip(stats.token_ids, stats.expert_ids, stats.conflicts, strict=True)
        if f
    }
    assert flagged == ref_conflicts
    assert 0 < len(flagged) < len(ours)  # the case is not trivial
    # the share of negative cosines (the conflict ratio at tau = 0, whatever the threshold)
    negative = sum(c < 0 for c in ref_cos.values()) / len(ref_cos)
    assert stats.summary()["negative_share"] == pytest.approx(negative)


def _one_pass_grads(layer, x, target, loss_scale=1.0, token_mask=None):
    layer.zero_grad()
    xx = x.clone().requires_grad_()
    out, rec = layer(xx, token_mask=token_mask)
    (loss_scale * (_loss(out, target) + rec.aux_loss())).backward()
    return [xx.grad] + [p.grad.clone() for p in layer.parameters()], rec


def test_one_pass_equals_two_pass_reference():
    cfg = STGCConfig.paper(weight=0.7, threshold=0.05)
    layer = _layer(stgc=cfg)
    layer.stgc_scale = 0.5
    torch.manual_seed(2)
    x, target = torch.randn(3, 11, 16), torch.randn(3, 11, 16)
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 8:] = False
    one_pass, rec = _one_pass_grads(layer, x, target, token_mask=mask)

    # Two passes: the task backward with a retained graph, masks from brute force, then the CEL.
    _, ref_conflicts, _ = _brute_force_conflicts(layer, x, target, cfg, token_mask=mask.reshape(-1))
    plain = _layer(stgc=None)
    plain.load_state_dict(layer.state_dict())
    xx = x.clone().requires_grad_()
    out, prec = plain(xx, token_mask=mask)
    (_loss(out, target) + prec.aux_loss()).backward(retain_graph=True)
    conflicts = torch.zeros_like(prec.logits, dtype=torch.bool)
    for t, e in ref_conflicts:
        conflicts[t, e] = True
    (cfg.weight * 0.5 * conflict_elimination_loss(prec.logits, conflicts)).backward()
    two_pass = [xx.grad] + [p.grad for p in plain.parameters()]
    assert conflicts.any()
    for a, b in zip(one_pass, two_pass, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the CEL really changed the router gradient
    assert not torch.allclose(layer.router.weight.grad, _plain_router_grad(layer, x, target, mask))


def _plain_router_grad(layer, x, target, mask):
    plain = _layer(stgc=None)
    plain.load_state_dict(layer.state_dict())
    out, rec = plain(x, token_mask=mask)
    (_loss(out, target) + rec.aux_loss()).backward()
    return plain.router.weight.grad


def test_stgc_weight_follows_loss_scaling():
    """Gradient accumulation / loss scaling multiply the loss; STGC must scale with it."""
    layer = _layer(stgc=STGCConfig(threshold=0.2))
    torch.manual_seed(3)
    x, target = torch.randn(40, 16), torch.randn(40, 16)
    g1, _ = _one_pass_grads(layer, x, target, loss_scale=1.0)
    g3, _ = _one_pass_grads(layer, x, target, loss_scale=3.0)
    for a, b in zip(g1, g3, strict=True):
        torch.testing.assert_close(3 * a, b, atol=1e-4, rtol=1e-4)


def test_aligned_token_gradients_give_no_conflict_and_no_change():
    layer = _layer(stgc=STGCConfig())
    x = torch.randn(1, 16).expand(12, 16).clone()  # identical tokens: identical gradients
    target = torch.randn(1, 16).expand(12, 16).clone()
    grads, rec = _one_pass_grads(layer, x, target)
    assert rec.stgc.conflict_ratio == 0 and float(rec.stgc.cel) == 0
    assert rec.stgc.cosine_mean == pytest.approx(1.0, abs=1e-5)
    plain = _layer(stgc=None)
    plain.load_state_dict(layer.state_dict())
    pgrads, _ = _one_pass_grads(plain, x, target)
    for a, b in zip(grads, pgrads, strict=True):
        torch.testing.assert_close(a, b)


def test_constructed_opposite_tokens_are_flagged_exactly():
    layer = _layer(e=2, k=1, stgc=STGCConfig.paper())
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 1.0  # every token with x[0] > 0 goes to expert 0
    x = torch.randn(1, 16).expand(10, 16).clone()
    x[:, 0] = 1.0
    sign = torch.ones(10, 1)
    sign[[2, 7]] = -1  # these two tokens pull the expert the other way
    xx = x.clone().requires_grad_()
    out, rec = layer(xx)
    ((out * sign).sum() + rec.aux_loss()).backward()
    s = rec.stgc
    assert torch.all(s.expert_ids == 0)
    assert sorted(s.token_ids[s.conflicts].tolist()) == [2, 7]
    torch.testing.assert_close(s.cosine[s.conflicts], torch.full((2,), -1.0), atol=1e-5, rtol=0)
    assert float(s.cel) > 0
    assert s.conflict_ratio_per_expert.tolist() == pytest.approx([0.2, 0.0])


def test_missing_anchor_and_cut_graph_fail_loudly():
    layer = _layer(stgc=STGCConfig())
    x = torch.randn(10, 16)
    out, rec = layer(x)
    with pytest.raises(RuntimeError, match="anchor"):
        out.sum().backward()
    out, rec = layer(x)
    with pytest.raises(RuntimeError, match="router's backward"):
        (rec.balance_loss + rec.probs.sum()).backward()  # the experts are not part of this loss
    with pytest.raises(RuntimeError, match="backward"):
        _ = layer(x)[1].stgc.conflict_ratio  # statistics before backward


def test_no_stgc_in_eval_or_no_grad():
    layer = _layer(stgc=STGCConfig()).eval()
    _, rec = layer(torch.randn(5, 16))
    assert rec.stgc is None and rec.cel_anchor is None
    layer.train()
    with torch.no_grad():
        _, rec = layer(torch.randn(5, 16))
    assert rec.stgc is None


def test_gradient_checkpointing_gives_the_same_gradients():
    layer = _layer(stgc=STGCConfig(threshold=0.1))
    torch.manual_seed(4)
    x, target = torch.randn(30, 16), torch.randn(30, 16)
    ref, ref_rec = _one_pass_grads(layer, x, target)
    layer.zero_grad()
    xx = x.clone().requires_grad_()
    records = []

    def run(inp):
        out, rec = layer(inp)
        records.append(rec)
        return out, rec.aux_loss()

    out, aux = checkpoint(run, xx, use_reentrant=False)
    (_loss(out, target) + aux).backward()
    got = [xx.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert records[0].stgc.ready
    assert records[0].stgc.conflict_ratio == ref_rec.stgc.conflict_ratio


def test_bf16_autocast_runs_and_agrees():
    layer = _layer(d=32, h=64, stgc=STGCConfig())
    torch.manual_seed(5)
    x, target = torch.randn(64, 32), torch.randn(64, 32)
    _, ref = _one_pass_grads(layer, x, target)
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, rec = layer(x)
        loss = _loss(out.float(), target) + rec.aux_loss()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    agree = (rec.stgc.conflicts == ref.stgc.conflicts).float().mean()
    assert agree > 0.85
    torch.testing.assert_close(rec.stgc.cosine, ref.stgc.cosine, atol=0.1, rtol=0)


def test_stgc_with_ltdr_router():
    layer = _layer(stgc=STGCConfig(), router_cls=LTDRRouter)
    x = torch.randn(2, 20, 16)
    vision = torch.zeros(2, 20, dtype=torch.bool)
    vision[:, :12] = True
    out, rec = layer(x, vision_mask=vision)
    (out.square().sum() + rec.aux_loss()).backward()
    assert rec.tail_mask.any()
    assert rec.stgc.ready and rec.stgc.expert_ids.numel() == int(rec.experts_per_token.sum())


def test_config_errors():
    with pytest.raises(ValueError, match="scope"):
        STGCConfig(scope="first")
    with pytest.raises(ValueError, match="threshold"):
        STGCConfig(threshold=2.0)
    with pytest.raises(ValueError, match="weight"):
        STGCConfig(weight=-1)
