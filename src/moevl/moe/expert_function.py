"""The experts' MLP as one ``autograd.Function`` with a hand-written backward, and the types through
which that backward hands its gradients to STGC.

Every expert is two linear layers around an activation: ``in`` (the fused ``gate_up_proj`` (E, 2H, D)
of a gated expert, whose rows ``[0:H]`` are the gate and ``[H:2H]`` the up projection, or ``up_proj``
(E, H, D)) and ``out`` (``down_proj`` (E, D, H)). Both layers of both kinds go through the same
per-layer helpers ``linear_forward`` / ``linear_backward``; only the activation step differs.

The backward is the extension point STGC uses (``moevl.stgc``): it can hand every expert linear
layer's inputs, output gradients and weight gradients to an ``ExpertGradientObserver`` and return a
gradient for the router logits from the same backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from moevl.moe.activations import Activation
from moevl.moe.grouped_mm import grouped_matmul, grouped_weight_grad


@dataclass
class LinearGrads:
    """One logical expert linear layer ``y = W x (+ b)`` seen from the backward pass, all experts
    at once. The fused gate/up projection is one layer (its rows are the gate and the up rows).

    Rows are the dispatched (token, expert) pairs sorted by expert.

    Attributes:
        inputs: (P, d_in) the layer inputs ``x_t``.
        out_grads: (P, d_out) ``δ_t = ∂L/∂y_t``.
        weight_grad: (E, d_out, d_in) ``Σ_t δ_t x_tᵀ`` per expert (the weight gradient).
        bias_grad: (E, d_out) ``Σ_t δ_t`` per expert, or None when the layer has no bias.
    """

    inputs: Tensor
    out_grads: Tensor
    weight_grad: Tensor
    bias_grad: Tensor | None


@dataclass
class ExpertGrads:
    """What the experts' backward hands to an observer.

    Attributes:
        layers: the expert's linear layers in forward order (the last is the output projection).
        expert_ids: (P,) long, the expert of each row (sorted).
        token_ids: (P,) long, the token of each row.
        counts: (E,) long, rows per expert; ``offsets`` (E,) int32 their cumulative sum.
        anchor_grad: gradient of the loss w.r.t. the observer's zero-valued anchor, None if the
            anchor is not part of the loss.
        observed: the observed tensor's value (detached), e.g. the router logits (N, E).
    """

    layers: list[LinearGrads]
    expert_ids: Tensor
    token_ids: Tensor
    counts: Tensor
    offsets: Tensor
    anchor_grad: Tensor | None
    observed: Tensor | None


class ExpertGradientObserver(Protocol):
    """Receives the experts' gradients during backward; returns a gradient for the observed
    tensor (the router logits, (N, E)) or None. ``moevl.stgc`` implements it."""

    def backward(self, grads: ExpertGrads) -> Tensor | None: ...


@dataclass(frozen=True)
class Routing:
    """Rows sorted by expert: the (token, expert) pair of each row and the group boundaries.

    Attributes:
        expert_ids: (P,) long, sorted.
        token_ids: (P,) long.
        counts: (E,) long rows per expert.
        offsets: (E,) int32 cumulative ``counts``.
    """

    expert_ids: Tensor
    token_ids: Tensor
    counts: Tensor
    offsets: Tensor


def linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None, routing: Routing) -> Tensor:
    """Each row's expert applied as a linear layer: x (P, d_in), weight (E, d_out, d_in),
    bias (E, d_out) or None -> (P, d_out)."""
    y = grouped_matmul(x, weight.transpose(1, 2), routing.offsets)
    if bias is not None:
        y += bias[routing.expert_ids]
    return y


def linear_backward(
    x: Tensor, dy: Tensor, weight: Tensor, bias: Tensor | None, routing: Routing, *, input_grad: bool = True
) -> tuple[Tensor | None, LinearGrads]:
    """Backward of ``linear_forward``: the input gradient (P, d_in) (None unless ``input_grad``) and
    the layer's ``LinearGrads`` (its weight and bias gradients)."""
    dw = grouped_weight_grad(dy, x, routing.offsets)  # (E, d_out, d_in)
    db = None
    if bias is not None:
        db = dy.new_zeros(bias.shape).index_add_(0, routing.expert_ids, dy)  # (E, d_out)
    dx = grouped_matmul(dy, weight, routing.offsets) if input_grad else None
    return dx, LinearGrads(x, dy, dw, db)


def _hidden(a: Tensor, activation: Activation, gated: bool) -> Tensor:
    """The activation step: ``act(gate) * up`` on a (P, 2H) for gated experts, ``act(a)`` else."""
    if not gated:
        return activation(a)
    gate, up = a.chunk(2, dim=-1)
    return activation(gate) * up


def _hidden_backward(a: Tensor, dh: Tensor, activation: Activation, gated: bool) -> Tensor:
    """Gradient of ``_hidden`` w.r.t. a, in closed form (no autograd for named activations)."""
    if not gated:
        return activation.backward(dh, a)
    gate, up = a.chunk(2, dim=-1)  # (P, H) views
    da = torch.empty_like(a)
    d_gate, d_up = da.chunk(2, dim=-1)
    d_gate.copy_(activation.backward(dh * up, gate))
    torch.mul(dh, activation(gate), out=d_up)
    return da


class ExpertMLPFunction(torch.autograd.Function):
    """ys = down_e(h(in_e(xs))) for rows grouped by expert, with a hand-written backward.

    Inputs: xs (P, D), observed (N, E) or None, the observer or None, the ``Routing``, the
    activation, ``gated``, then ``w_in`` (E, 2H | H, D), ``w_out`` (E, D, H), ``b_in``, ``b_out``
    (E, out) or None. Outputs: ys (P, D) and a zero scalar anchor (its gradient reaches the observer).
    """

    @staticmethod
    def forward(ctx, xs, observed, observer, routing, activation, gated, w_in, w_out, b_in, b_out):  # type: ignore[override]
        a = linear_forward(xs, w_in, b_in, routing)  # (P, 2H) or (P, H)
        ys = linear_forward(_hidden(a, activation, gated), w_out, b_out, routing)  # (P, D)
        ctx.save_for_backward(xs, a, w_in, w_out, b_in, b_out)
        ctx.routing, ctx.activation, ctx.gated, ctx.observer = routing, activation, gated, observer
        ctx.observed = None if observed is None else observed.detach()
        ctx.set_materialize_grads(False)
        return ys, xs.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_ys, grad_anchor):  # type: ignore[override]
        xs, a, w_in, w_out, b_in, b_out = ctx.saved_tensors
        if grad_ys is None:
            return (None,) * 10
        routing: Routing = ctx.routing
        h = _hidden(a, ctx.activation, ctx.gated)  # recomputed: cheaper than keeping it
        dh, out_layer = linear_backward(h, grad_ys.contiguous(), w_out, b_out, routing)
        da = _hidden_backward(a, dh, ctx.activation, ctx.gated)
        dxs, in_layer = linear_backward(xs, da, w_in, b_in, routing, input_grad=ctx.needs_input_grad[0])

        grad_observed = None
        if ctx.observer is not None:
            grad_observed = ctx.observer.backward(
                ExpertGrads(
                    layers=[in_layer, out_layer],
                    expert_ids=routing.expert_ids,
                    token_ids=routing.token_ids,
                    counts=routing.counts,
                    offsets=routing.offsets,
                    anchor_grad=grad_anchor,
                    observed=ctx.observed,
                )
            )
            if ctx.observed is None:
                grad_observed = None
        grads = (in_layer.weight_grad, out_layer.weight_grad, in_layer.bias_grad, out_layer.bias_grad)
        param_grads = tuple(g if ctx.needs_input_grad[6 + i] else None for i, g in enumerate(grads))
        return (dxs, grad_observed, None, None, None, None, *param_grads)
