import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from moevl.stgc import conflict_elimination_loss, token_gradient_cosine
from moevl.stgc.loss import conflict_elimination_grad


def _mlp_layers_and_per_sample(n, d, h, seed=0):
    """A gate/up/down SwiGLU expert, N tokens with per-token linear losses <c_t, mlp(x_t)>.

    Returns the (inputs, out_grads) of each linear layer and the per-token flat gradients
    computed by torch.func (the reference)."""
    torch.manual_seed(seed)
    params = {
        "gate": torch.randn(h, d) / d**0.5,
        "up": torch.randn(h, d) / d**0.5,
        "down": torch.randn(d, h) / h**0.5,
    }
    x = torch.randn(n, d)
    c = torch.randn(n, d)

    def mlp(p, xt):
        return (F.silu(xt @ p["gate"].t()) * (xt @ p["up"].t())) @ p["down"].t()

    def token_loss(p, xt, ct):
        return (mlp(p, xt) * ct).sum()

    per_sample = vmap(grad(token_loss), in_dims=(None, 0, 0))(params, x, c)
    flat = torch.cat([per_sample[k].reshape(n, -1) for k in ("gate", "up", "down")], dim=1)

    a_g = (x @ params["gate"].t()).requires_grad_()
    a_u = (x @ params["up"].t()).requires_grad_()
    hid = F.silu(a_g) * a_u
    hid.retain_grad()
    y = hid @ params["down"].t()
    (y * c).sum().backward()
    layers = [(x, a_g.grad), (x, a_u.grad), (hid.detach(), c)]
    return layers, flat


def _reference_cosine(flat):
    flat = flat.double()
    mean = flat.mean(0, keepdim=True)
    cos = F.cosine_similarity(flat, mean.expand_as(flat), dim=1, eps=1e-30)
    return cos.float()


@pytest.mark.parametrize("n,d,h", [(1, 5, 7), (2, 13, 29), (33, 16, 48), (64, 7, 3)])
def test_token_gradient_cosine_equals_per_sample_gradients(n, d, h):
    layers, flat = _mlp_layers_and_per_sample(n, d, h)
    ours = token_gradient_cosine(layers)
    torch.testing.assert_close(ours, _reference_cosine(flat), atol=1e-5, rtol=1e-5)


def test_single_token_and_zero_norm_tokens():
    layers, _ = _mlp_layers_and_per_sample(1, 6, 10)
    assert token_gradient_cosine(layers).item() == pytest.approx(1.0, abs=1e-6)
    x = torch.randn(4, 3)
    d = torch.randn(4, 2)
    d[2] = 0
    cos = token_gradient_cosine([(x, d)])
    assert cos[2] == 0 and torch.isfinite(cos).all()
    assert torch.all(token_gradient_cosine([(x, torch.zeros(4, 2))]) == 0)
    with pytest.raises(ValueError, match="layers"):
        token_gradient_cosine([])
    with pytest.raises(ValueError, match=r"layers\[0\]"):
        token_gradient_cosine([(x, torch.randn(3, 2))])


def test_cel_value_gradient_and_sign():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, requires_grad=True)
    conflicts = torch.zeros(6, 4, dtype=torch.bool)
    conflicts[0, 1] = conflicts[3, 2] = conflicts[3, 0] = True
    loss = conflict_elimination_loss(logits, conflicts)
    expected = -(torch.log_softmax(-logits, -1)[conflicts]).mean()
    torch.testing.assert_close(loss, expected)
    (g_auto,) = torch.autograd.grad(loss, logits)
    value, g_closed = conflict_elimination_grad(logits, conflicts)
    torch.testing.assert_close(value, loss.detach())
    torch.testing.assert_close(g_closed, g_auto)
    assert g_auto[0, 1] > 0 and g_auto[3, 2] > 0  # the conflicting expert's logit goes down
    assert torch.all(g_auto[1] == 0)  # tokens without conflicts are untouched


def test_cel_zero_without_conflicts():
    logits = torch.randn(5, 3, requires_grad=True)
    none = torch.zeros(5, 3, dtype=torch.bool)
    loss = conflict_elimination_loss(logits, none)
    assert loss.item() == 0
    loss.backward()
    assert torch.all(logits.grad == 0)
    with pytest.raises(ValueError, match="conflicts"):
        conflict_elimination_loss(logits, none[:, :2])
