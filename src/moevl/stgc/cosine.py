"""Exact token-gradient cosines without per-token gradients (STGC, Yang et al., ICLR 2025).

For a linear layer ``y = W x`` and a token ``t`` with ``δ_t = ∂L/∂y_t``, the token's gradient on
``W`` is the outer product ``δ_t x_tᵀ``. With ``G = (1/N) Σ_s δ_s x_sᵀ`` the mean gradient over
the expert's N tokens (RESEARCH.md §1):

    <g_t, G>  = Σ_layers δ_tᵀ G x_t
    ||g_t||²  = Σ_layers ||δ_t||² ||x_t||²
    cos_t     = <g_t, G> / (||g_t|| ||G||)      (0 where either norm is 0)

One extra matmul per layer, no (N, d_out, d_in) tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from moevl.moe.expert_function import ExpertGrads
from moevl.moe.grouped_mm import grouped_matmul


def _safe_cosine(inner: Tensor, token_norm2: Tensor, mean_norm2: Tensor) -> Tensor:
    denom = (token_norm2 * mean_norm2).sqrt()
    return torch.where(
        denom > 0, inner / denom.clamp_min(torch.finfo(denom.dtype).tiny), torch.zeros_like(inner)
    )


def token_gradient_cosine(layers: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """Cosine between each token's gradient and the mean gradient, over the given linear layers.

    Args:
        layers: one ``(inputs (N, d_in), output_grads (N, d_out))`` per linear layer of one
            expert, for the same N tokens (a bias is a layer input column of ones).
    Returns:
        (N,) float32 cosines; 0 for a token (or a mean) whose gradient is zero.
    """
    if len(layers) == 0:
        raise ValueError("layers must hold at least one (inputs, output_grads) pair, got none")
    n = layers[0][0].shape[0]
    inner = torch.zeros(n, dtype=torch.float32, device=layers[0][0].device)
    token_norm2 = torch.zeros_like(inner)
    mean_norm2 = inner.new_zeros(())
    for i, (x, d) in enumerate(layers):
        if x.dim() != 2 or d.dim() != 2 or x.shape[0] != n or d.shape[0] != n:
            raise ValueError(
                f"layers[{i}] must be (inputs (N={n}, d_in), output_grads (N={n}, d_out)), "
                f"got {tuple(x.shape)} and {tuple(d.shape)}"
            )
        x, d = x.float(), d.float()
        mean = d.t() @ x / max(n, 1)  # (d_out, d_in), G of this layer
        inner += ((x @ mean.t()) * d).sum(-1)  # δ_tᵀ G x_t
        token_norm2 += x.square().sum(-1) * d.square().sum(-1)
        mean_norm2 += mean.square().sum()
    return _safe_cosine(inner, token_norm2, mean_norm2)


def grouped_token_gradient_cosine(grads: ExpertGrads, scope: str) -> Tensor:
    """``token_gradient_cosine`` for every expert at once, from the experts' backward.

    Uses the weight gradients the backward computed anyway: ``G_e = dW_e / N_e``, so the extra
    cost is one grouped matmul per layer (``x_t @ dW_eᵀ``).

    Args:
        grads: the experts' backward view (rows sorted by expert).
        scope: ``all`` (every linear layer), ``last`` (the output projection: its LoRA factors under
            LoRA, ``grads.output_layers``), ``delta`` (cosine of
            the output gradient ``δ_t`` against the expert's mean ``δ``: a cheap proxy).
    Returns:
        (P,) float32 cosine of each dispatched (token, expert) pair.
    """
    e_ids = grads.expert_ids
    counts = grads.counts.clamp_min(1).float()  # (E,)
    if scope == "delta":
        d = grads.layers[-1].out_grads.float()
        mean = d.new_zeros(counts.shape[0], d.shape[1]).index_add_(0, e_ids, d) / counts[:, None]
        return _safe_cosine(torch.linalg.vecdot(d, mean[e_ids]), _sqnorm(d, -1), _sqnorm(mean, -1)[e_ids])
    layers = grads.layers if scope == "all" else grads.layers[-grads.output_layers :]
    p = e_ids.shape[0]
    inner = torch.zeros(p, dtype=torch.float32, device=e_ids.device)
    token_norm2 = torch.zeros_like(inner)
    mean_norm2 = counts.new_zeros(counts.shape)  # (E,) Σ ||dW_e||², scaled below
    for layer in layers:
        # NOTE: a fused gate_up layer is one layer whose output rows are the gate's and the up's:
        # each term below is then the sum of the two separate layers' terms, so the cosine is
        # exactly that of separate gate and up layers.
        x, d = layer.inputs, layer.out_grads
        # δ_tᵀ dW_e x_t (dividing by N_e below turns dW_e into the mean gradient G_e), as
        # (δ_t dW_e)·x_t or (x_t dW_eᵀ)·δ_t: the same FLOPs, so project onto the narrower side
        # (fewer bytes written and read back) and take the row dot in place in that fresh buffer.
        w = layer.weight_grad.to(x.dtype)  # (E, d_out, d_in)
        if x.shape[1] <= d.shape[1]:
            proj, other = grouped_matmul(d, w, grads.offsets), x  # (P, d_in)
        else:
            proj, other = grouped_matmul(x, w.transpose(1, 2), grads.offsets), d  # (P, d_out)
        inner += proj.float().mul_(other).sum(-1)
        d_norm2 = _sqnorm(d, -1)
        token_norm2 += _sqnorm(x, -1) * d_norm2
        mean_norm2 += _sqnorm(layer.weight_grad, (1, 2))
        if layer.bias_grad is not None:
            inner += torch.linalg.vecdot(d.float(), layer.bias_grad.float()[e_ids])
            token_norm2 += d_norm2
            mean_norm2 += _sqnorm(layer.bias_grad, -1)
    inner = inner / counts[e_ids]
    mean_norm2 = mean_norm2 / counts.square()
    return _safe_cosine(inner, token_norm2, mean_norm2[e_ids])


def _sqnorm(t: Tensor, dim) -> Tensor:
    """Squared L2 norm over ``dim`` in fp32 (fp64 inputs in fp64: vector_norm refuses to narrow), returned
    in fp32, without materialising the squares."""
    acc = torch.promote_types(t.dtype, torch.float32)
    return torch.linalg.vector_norm(t, dim=dim, dtype=acc).square().float()
