"""STGC's weight modes: ``absolute`` (β L_cel) and ``relative`` (the CEL gradient scaled to ρ times the norm
of the rest of the router logits' gradient), against a plain layer and autograd."""

import pytest
import torch

from moevl.stgc import STGCConfig
from moevl.stgc.loss import conflict_elimination_grad
from tests.stgc.test_loss_forms import FORMS, _layer, _step


def _reference(layer, cfg, x, target, loss_scale):
    """The rest of the logits' gradient (plain layer, autograd), the CEL gradient with the STGC layer's own
    masks, and the plain layer for its router weight."""
    rec = _step(layer, x, target, loss_scale)
    s = rec.stgc
    conflicts = torch.zeros(x.shape[0], layer.router.num_experts, dtype=torch.bool)
    conflicts[s.token_ids[s.conflicts], s.expert_ids[s.conflicts]] = True
    dispatched = torch.zeros_like(conflicts)
    dispatched[s.token_ids, s.expert_ids] = True
    assert conflicts.any()
    plain = _layer(None, e=layer.router.num_experts, seed=3)
    plain.load_state_dict(layer.state_dict())
    out, prec = plain(x)
    loss = loss_scale * (((out - target) ** 2).sum() + prec.aux_loss())
    (rest,) = torch.autograd.grad(loss, prec.logits, retain_graph=True)
    _, cel = conflict_elimination_grad(prec.logits.detach(), conflicts, form=cfg.cel, dispatched=dispatched)
    return rec, rest, cel, plain, prec


def _router_grad(plain, prec, logits_grad):
    (g,) = torch.autograd.grad(prec.logits, plain.router.weight, grad_outputs=logits_grad)
    return g


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("loss_scale", [1.0, 4.0])
def test_relative_mode_adds_the_cel_gradient_at_rho_times_the_rest(form, loss_scale):
    cfg = STGCConfig(threshold=0.3, weight=0.25, weight_mode="relative", cel=form, centered=False)
    layer = _layer(cfg, e=5, seed=3)
    torch.manual_seed(4)
    x, target = torch.randn(33, 16), torch.randn(33, 16)
    rec, rest, cel, plain, prec = _reference(layer, cfg, x, target, loss_scale)
    added = cel * (cfg.weight * rest.norm() / cel.norm())
    torch.testing.assert_close(
        layer.router.weight.grad, _router_grad(plain, prec, rest + added), atol=1e-5, rtol=1e-5
    )
    assert float(rec.stgc.cel_grad_ratio) == pytest.approx(cfg.weight, rel=1e-5)
    # the experts' weights see no CEL: their gradients are the plain layer's
    plain.zero_grad()
    out, prec = plain(x)
    (loss_scale * (((out - target) ** 2).sum() + prec.aux_loss())).backward()
    for name, p in plain.experts.named_parameters():
        torch.testing.assert_close(
            dict(layer.experts.named_parameters())[name].grad, p.grad, atol=1e-5, rtol=1e-5
        )


def test_absolute_mode_reports_the_ratio_of_its_cel_gradient_to_the_rest():
    cfg = STGCConfig.paper(threshold=0.3, weight=0.7)
    layer = _layer(cfg, e=5, seed=3)
    torch.manual_seed(4)
    x, target = torch.randn(33, 16), torch.randn(33, 16)
    rec, rest, cel, plain, prec = _reference(layer, cfg, x, target, 1.0)
    torch.testing.assert_close(
        layer.router.weight.grad, _router_grad(plain, prec, rest + cfg.weight * cel), atol=1e-5, rtol=1e-5
    )
    expected = cfg.weight * cel.norm() / rest.norm()
    assert float(rec.stgc.cel_grad_ratio) == pytest.approx(float(expected), rel=1e-4)
    assert rec.stgc.summary()["cel_grad_ratio"] == pytest.approx(float(expected), rel=1e-4)


def test_relative_mode_without_conflicts_adds_nothing():
    cfg = STGCConfig(threshold=-1.0, weight=0.5, weight_mode="relative")  # no cosine is below -1
    layer = _layer(cfg, e=4, seed=1)
    plain = _layer(None, e=4, seed=1)
    plain.load_state_dict(layer.state_dict())
    torch.manual_seed(2)
    x, target = torch.randn(20, 16), torch.randn(20, 16)
    rec = _step(layer, x, target)
    _step(plain, x, target)
    assert rec.stgc.conflict_ratio == 0 and float(rec.stgc.cel_grad_ratio) == 0
    torch.testing.assert_close(layer.router.weight.grad, plain.router.weight.grad)


def test_weight_mode_is_checked():
    with pytest.raises(ValueError, match="weight_mode"):
        STGCConfig(weight_mode="proportional")
