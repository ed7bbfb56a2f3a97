"""The experts as one ``autograd.Function`` with a hand-written backward, and the types through
which that backward hands its gradients to STGC.

    y_t = Σ_s w_{t,s} · out_e(h(in_e(x_t))),   e = indices[t, s]

Every expert is two linear layers around an activation: ``in`` (the fused ``gate_up_proj``
(E, 2H, D) of a gated expert, rows ``[0:H]`` the gate and ``[H:2H]`` the up projection, so
``h = act(gate) · up``; or ``up_proj`` (E, H, D) with ``h = act(up)``) and ``out`` (``down_proj``
(E, D, H)). Both layers of both kinds go through the same per-layer helpers ``linear_forward`` /
``linear_backward``; only the activation step differs.

The function owns the whole dispatch (gather the tokens in expert order, the grouped matmuls, the
weighted combine) so that it allocates few large buffers and works in place where it can: on CPU a
fresh buffer of tens of MB costs more (page faults) than the elementwise pass that fills it.

Shapes are static: all ``P = N·K`` slots are rows; the unused slots (index ``-1``) sort to the end,
past ``offsets[-1]``, where the grouped matmul leaves garbage. Those rows are zeroed before they
reach a sum. Nothing in the forward reads a device value on the host (no synchronisation on an
accelerator); the per-expert loop fallback of the grouped matmul is the only exception.

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
from moevl.moe.dispatch import (
    Dispatch,
    Layout,
    choose_capacity,
    gather_rows,
    pad_to_capacity,
    scatter_add_rows,
    zero_unused_rows_,
)
from moevl.moe.grouped_mm import grouped_matmul, grouped_weight_grad


@dataclass
class LinearGrads:
    """One logical expert linear layer ``y = W x (+ b)`` seen from the backward pass, all experts
    at once. The fused gate/up projection is one layer (its output rows are the gate's and the up's).

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
    """What the experts' backward hands to an observer (used slots only).

    Attributes:
        layers: the expert's linear layers in forward order (the last is the output projection).
        expert_ids: (P,) long, the expert of each row (sorted).
        token_ids: (P,) long, the token of each row.
        counts: (E,) long, rows per expert; ``offsets`` (E,) int32 their cumulative sum.
        anchor_grad: gradient of the loss w.r.t. the observer's zero-valued anchor, None if the
            anchor is not part of the loss.
        observed: the observed tensor's value (detached), e.g. the router logits (N, E).
        output_layers: how many of ``layers`` (at the end) belong to the expert's output projection:
            1 for the projection itself; 2 for its LoRA factors ``A``, ``B`` (``moevl.moe.lora``).

    Which layers are listed: those whose parameters train. Full weights train: ``in`` and ``out``;
    LoRA on frozen weights: the four adapter factors (each token's gradient on a factor is again an
    outer product, ``LinearGrads``' doc); nothing in the experts trains: the full weights (the
    gradient they would get).
    """

    layers: list[LinearGrads]
    expert_ids: Tensor
    token_ids: Tensor
    counts: Tensor
    offsets: Tensor
    anchor_grad: Tensor | None
    observed: Tensor | None
    output_layers: int = 1


class ExpertGradientObserver(Protocol):
    """Receives the experts' gradients during backward; returns a gradient for the observed
    tensor (the router logits, (N, E)) or None. ``moevl.stgc`` implements it."""

    def backward(self, grads: ExpertGrads) -> Tensor | None: ...


def _bias_rows(bias: Tensor, d: Dispatch) -> Tensor:
    return bias.index_select(0, d.expert_ids.clamp(max=d.num_experts - 1))  # (P, out)


def linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None, d: Dispatch) -> Tensor:
    """Each row's expert as a linear layer: x (P, d_in), weight (E, d_out, d_in), bias (E, d_out)
    or None -> (P, d_out)."""
    y = grouped_matmul(x, weight.transpose(1, 2), d.offsets, capacity=d.capacity)
    if bias is not None:
        y += _bias_rows(bias, d)
    return y


def linear_backward(
    x: Tensor,
    dy: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    d: Dispatch,
    *,
    input_grad: bool = True,
    param_grads: bool = True,
) -> tuple[Tensor | None, LinearGrads | None]:
    """Backward of ``linear_forward``: the input gradient (P, d_in) (None unless ``input_grad``;
    garbage in unused rows) and the layer's ``LinearGrads`` (None unless ``param_grads``: a frozen
    weight under LoRA costs no (E, d_out, d_in) gradient). ``dy`` may hold garbage in unused rows."""
    dx = grouped_matmul(dy, weight, d.offsets, capacity=d.capacity) if input_grad else None
    if not param_grads:
        return dx, None
    # (E, d_out, d_in); unused rows are not read (sorted) or hold a zero dy (padded: their g_rows are zero)
    dw = grouped_weight_grad(dy, x, d.offsets, capacity=d.capacity)
    db = None
    if bias is not None:  # unused rows land in the extra row E, dropped
        db = dy.new_zeros(d.num_experts + 1, dy.shape[1]).index_add_(0, d.expert_ids, dy)[:-1]
    return dx, LinearGrads(x, dy, dw, db)


@dataclass(frozen=True)
class LoRAInputs:
    """The non-parameter inputs of the experts' LoRA adapters (``moevl.moe.lora``).

    Attributes:
        scale: ``alpha / r``.
        in_mask, out_mask: (P, D) and (P, H) dropout masks of the two adapters' inputs, rows in
            the dispatch order (already scaled by ``1 / (1 - p)``), or None without dropout.
    """

    scale: float
    in_mask: Tensor | None = None
    out_mask: Tensor | None = None


def lora_forward(x: Tensor, a: Tensor, b: Tensor, scale: float, d: Dispatch) -> tuple[Tensor, Tensor]:
    """``scale · B_e A_e x`` of each row: x (P, d_in) (dropout applied), a (E, r, d_in), b (E, d_out, r)
    -> (delta (P, d_out), u = A_e x (P, r), kept for the backward)."""
    u = grouped_matmul(x, a.transpose(1, 2), d.offsets, capacity=d.capacity)  # (P, r)
    delta = grouped_matmul(u, b.transpose(1, 2), d.offsets, capacity=d.capacity)  # (P, d_out)
    return delta.mul_(scale), u


def lora_backward(
    x: Tensor, u: Tensor, dy: Tensor, a: Tensor, b: Tensor, scale: float, d: Dispatch, *, input_grad: bool
) -> tuple[Tensor | None, LinearGrads, LinearGrads]:
    """Backward of ``lora_forward`` for the output gradient dy (P, d_out): the gradient of its input x
    (P, d_in, before the dropout mask; None unless ``input_grad``) and the two factors as linear layers:
    ``B`` with inputs ``u`` and output gradients ``scale · δ``, ``A`` with inputs ``x`` and output
    gradients ``scale · Bᵀ δ``. Each token's gradient on a factor is the outer product of the two."""
    dy_b = dy * scale  # (P, d_out) the gradient at B's output
    db = grouped_weight_grad(dy_b, u, d.offsets, capacity=d.capacity)  # (E, d_out, r)
    du = grouped_matmul(dy_b, b, d.offsets, capacity=d.capacity)  # (P, r) the gradient at A's output
    da = grouped_weight_grad(du, x, d.offsets, capacity=d.capacity)  # (E, r, d_in)
    dx = grouped_matmul(du, a, d.offsets, capacity=d.capacity) if input_grad else None
    return dx, LinearGrads(x, du, da, None), LinearGrads(u, dy_b, db, None)


def _hidden(a: Tensor, act: Activation, gated: bool) -> Tensor:
    """The activation step: ``act(gate) · up`` (a (P, 2H) -> (P, H)) or ``act(a)``; one buffer."""
    if not gated:
        return act(a)
    gate, up = a.chunk(2, dim=-1)
    return act(gate).mul_(up)


def _hidden_with_act(a: Tensor, act: Activation, gated: bool) -> tuple[Tensor, Tensor]:
    """``(h, act(gate))`` for the backward (gated); ``(act(a), act(a))`` otherwise."""
    if not gated:
        h = act(a)
        return h, h
    gate, up = a.chunk(2, dim=-1)
    s = act(gate)
    return s * up, s


def _hidden_backward(a: Tensor, s: Tensor, dh: Tensor, act: Activation, gated: bool) -> Tensor:
    """Gradient w.r.t. ``a`` of the activation step in closed form; overwrites ``dh``."""
    if not gated:
        return act.backward(dh, a, out=dh)
    gate, up = a.chunk(2, dim=-1)  # (P, H) views
    if torch.compiler.is_compiling():  # the compiler fuses this and takes no strided out=
        return torch.cat([act.backward(dh * up, gate), dh * s], dim=-1)
    da = torch.empty_like(a)
    d_gate, d_up = da.chunk(2, dim=-1)
    torch.mul(dh, s, out=d_up)  # ∂(act(g)·u)/∂u = act(g)
    act.backward(dh.mul_(up), gate, out=d_gate)  # ∂(act(g)·u)/∂g = u · act'(g)
    return da


@dataclass(frozen=True)
class ExpertWeights:
    """The experts' two linear layers in moevl's layout, all in the compute dtype.

    Attributes:
        w_in: (E, 2H | H, D), a gated expert's rows ``[gate; up]``.
        w_out: (E, D, H).
        b_in: (E, 2H | H) or None.
        b_out: (E, D) or None.
    """

    w_in: Tensor
    w_out: Tensor
    b_in: Tensor | None = None
    b_out: Tensor | None = None

    def tensors(self) -> tuple[Tensor | None, ...]:
        return self.w_in, self.w_out, self.b_in, self.b_out


@dataclass(frozen=True)
class LoRAFactors:
    """The experts' LoRA adapters (``moevl.moe.lora``): ``A_in`` (E, r, D), ``B_in`` (E, 2H | H, r), ``A_out``
    (E, r, H), ``B_out`` (E, D, r) in the compute dtype, and their non-parameter ``inputs`` (scale, masks)."""

    inputs: LoRAInputs
    a_in: Tensor
    b_in: Tensor
    a_out: Tensor
    b_out: Tensor

    def tensors(self) -> tuple[Tensor, ...]:
        return self.a_in, self.b_in, self.a_out, self.b_out


@dataclass(frozen=True)
class Observation:
    """An observer of the experts' backward (STGC) and the tensor it returns a gradient for: ``observed``,
    the router logits (N, E)."""

    observer: ExpertGradientObserver
    observed: Tensor | None


def experts_function(
    hidden: Tensor,
    weights: Tensor,
    d: Dispatch,
    *,
    activation: Activation,
    gated: bool,
    params: ExpertWeights,
    lora: LoRAFactors | None = None,
    observation: Observation | None = None,
    layout: Layout = "auto",
) -> tuple[Tensor, Tensor | None]:
    """``y (N, D) = Σ_s w_{t,s} · MLP_{indices[t,s]}(x_t)`` with the hand-written backward (module doc).

    Args:
        hidden: (N, D) tokens; weights: (N, K) combine weights; ``d``: their ``dispatch``; everything in
            one dtype (the compute dtype).
        activation, gated: the expert MLP's activation step (``act(gate) · up`` or ``act(up)``).
        params: the linear layers. lora: the adapters, or None: with them each linear layer is
            ``W x + b + s · B A x̃`` (``x̃`` the dropout-masked input).
        observation: the observer of the backward (STGC), or None.
        layout: the row layout (``choose_capacity``).
    Returns:
        y (N, D), and the observer's anchor (a zero scalar whose gradient reaches the observer: add it to the
        loss) or None without an observer.
    """
    static = _Static(d, activation, gated, None if lora is None else lora.inputs, observation, layout)
    y, anchor = _ExpertsFunction.apply(
        hidden,
        weights,
        None if observation is None else observation.observed,
        static,
        *params.tensors(),
        *((None,) * 4 if lora is None else lora.tensors()),
    )
    return y, None if observation is None else anchor


@dataclass(frozen=True)
class _Static:
    """The experts function's non-tensor inputs."""

    d: Dispatch
    act: Activation
    gated: bool
    lora: LoRAInputs | None
    observation: Observation | None
    layout: Layout


# the autograd function's inputs: hidden, weights, observed, static, then these groups
_BASE = slice(4, 8)  # w_in, w_out, b_in, b_out
_ADAPTERS = slice(8, 12)  # a_in, bb_in, a_out, bb_out


class _ExpertsFunction(torch.autograd.Function):
    """``experts_function`` as one autograd function (its inputs: ``_BASE`` and ``_ADAPTERS``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden, weights, observed, static, w_in, w_out, b_in, b_out, a_in, bb_in, a_out, bb_out
    ):  # fmt: skip
        d, act, gated, lora = static.d, static.act, static.gated, static.lora
        capacity = choose_capacity(d, hidden.device, lora=lora is not None, layout=static.layout)
        if capacity is not None:
            d = pad_to_capacity(d, capacity, hidden.shape[0])
        w_rows = gather_rows(weights.reshape(-1), d.order, d)  # (P,)
        xs = gather_rows(hidden, d.token_ids, d)  # (P, D) in expert order
        a = linear_forward(xs, w_in, b_in, d)  # (P, 2H) or (P, H)
        u_in = u_out = None
        if lora is not None:
            delta, u_in = lora_forward(_masked(xs, lora.in_mask), a_in, bb_in, lora.scale, d)
            a += delta
        h = _hidden(a, act, gated)
        ys = linear_forward(h, w_out, b_out, d)  # (P, D)
        if lora is not None:
            delta, u_out = lora_forward(_masked(h, lora.out_mask), a_out, bb_out, lora.scale, d)
            ys += delta
        y = scatter_add_rows(ys.mul_(w_rows[:, None]), d.token_ids, d, hidden.shape[0])
        ctx.save_for_backward(
            xs, a, w_rows, w_in, w_out, b_in, b_out, u_in, u_out, a_in, bb_in, a_out, bb_out
        )
        ctx.d, ctx.act, ctx.gated, ctx.lora = d, act, gated, lora
        ctx.observer = None if static.observation is None else static.observation.observer
        ctx.observed = None if observed is None else observed.detach()
        ctx.weights_shape = weights.shape
        ctx.set_materialize_grads(False)
        return y, hidden.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_y, grad_anchor):  # type: ignore[override]
        xs, a, w_rows, w_in, w_out, b_in, b_out, u_in, u_out, a_in, bb_in, a_out, bb_out = ctx.saved_tensors
        if grad_y is None:
            return (None,) * 12
        d: Dispatch = ctx.d
        observer, lora = ctx.observer, ctx.lora
        needs = ctx.needs_input_grad
        base_trains = any(needs[_BASE])
        lora_trains = lora is not None and any(needs[_ADAPTERS])
        # the observer sees the layers whose parameters train (ExpertGrads' doc)
        base_grads = base_trains or (observer is not None and not lora_trains)
        g_rows = gather_rows(grad_y, d.token_ids, d)  # (P, D) ∂L/∂y of each row's token
        h, s = _hidden_with_act(a, ctx.act, ctx.gated)  # recomputed: cheaper than keeping them
        dh = grouped_matmul(
            g_rows, w_out, d.offsets, capacity=d.capacity
        )  # (P, H), before the combine weight

        # ∂L/∂w_{t,s} = <g_t, W_e h + b_e + s B_e u_t> = <g_t W_e, h> + <g_t, b_e> + s <g_t B_e, u_t>
        dw_rows = None
        if needs[1] and b_out is not None:
            dw_rows = (g_rows @ b_out.t()).gather(1, d.expert_ids.clamp(max=d.num_experts - 1)[:, None])[:, 0]
        if needs[1] and lora is not None:
            lora_w = (
                (grouped_matmul(g_rows, bb_out, d.offsets, capacity=d.capacity) * u_out)
                .sum(-1)
                .mul_(lora.scale)
            )
            dw_rows = lora_w if dw_rows is None else dw_rows + lora_w
        dy = g_rows.mul_(w_rows[:, None])  # (P, D) ∂L/∂(expert output) of each row
        out_layers: list[LinearGrads] = []
        dh_lora = None
        if lora is not None:
            h_in = _masked(h, lora.out_mask)
            dh_lora, out_a, out_b = lora_backward(
                h_in, u_out, dy, a_out, bb_out, lora.scale, d, input_grad=True
            )
            dh_lora = _masked(dh_lora, lora.out_mask)
            out_layers = [out_a, out_b] if lora_trains else []
        _, out_layer = linear_backward(h, dy, w_out, b_out, d, input_grad=False, param_grads=base_grads)
        grad_weights = None
        if needs[1]:
            # h is not needed any more unless the observer or the adapter reads it
            keep_h = observer is not None or lora is not None
            hdh = (h * dh if keep_h else h.mul_(dh)).sum(-1)
            dw_rows = hdh if dw_rows is None else dw_rows + hdh
            slots = ctx.weights_shape.numel()
            if d.capacity is None:
                grad_weights = torch.empty_like(dw_rows).index_copy_(
                    0, d.order, zero_unused_rows_(dw_rows, d)
                )
            else:  # unused slots are in no row; padding rows go to the dropped slot P
                grad_weights = dw_rows.new_zeros(slots + 1).index_copy_(0, d.order, dw_rows)[:slots]
            grad_weights = grad_weights.view(ctx.weights_shape)

        dh = dh.mul_(w_rows[:, None])
        if dh_lora is not None:
            dh += dh_lora
        da = _hidden_backward(a, s, dh, ctx.act, ctx.gated)
        in_layers: list[LinearGrads] = []
        dxs_lora = None
        if lora is not None:
            x_in = _masked(xs, lora.in_mask)
            dxs_lora, in_a, in_b = lora_backward(
                x_in, u_in, da, a_in, bb_in, lora.scale, d, input_grad=needs[0]
            )
            dxs_lora = _masked(dxs_lora, lora.in_mask)
            in_layers = [in_a, in_b] if lora_trains else []
        dxs, in_layer = linear_backward(xs, da, w_in, b_in, d, input_grad=needs[0], param_grads=base_grads)
        grad_hidden = None
        if dxs is not None:
            if dxs_lora is not None:
                dxs += dxs_lora
            grad_hidden = scatter_add_rows(dxs, d.token_ids, d, grad_y.shape[0])

        grad_observed = None
        if observer is not None:
            layers = [*([in_layer] if base_grads else []), *in_layers]
            output_layers = len(out_layers) + (1 if base_grads else 0)
            layers += [*([out_layer] if base_grads else []), *out_layers]
            grad_observed = observer.backward(_used_rows(d, layers, grad_anchor, ctx.observed, output_layers))
            if ctx.observed is None:
                grad_observed = None
        base = (None,) * 4
        if base_trains:
            base = (in_layer.weight_grad, out_layer.weight_grad, in_layer.bias_grad, out_layer.bias_grad)
        adapters = (None,) * 4
        if lora is not None:
            adapters = (in_a.weight_grad, in_b.weight_grad, out_a.weight_grad, out_b.weight_grad)
        grads = [grad_hidden, grad_weights, grad_observed, None, *base, *adapters]
        return tuple(g if need else None for g, need in zip(grads, needs, strict=True))


def _masked(t: Tensor, mask: Tensor | None) -> Tensor:
    """``t · mask`` (a fresh tensor), or ``t`` itself without a mask."""
    return t if mask is None else t * mask


def _used_rows(
    d: Dispatch,
    layers: list[LinearGrads],
    anchor_grad: Tensor | None,
    observed: Tensor | None,
    output_layers: int = 1,
):
    """The observer's view: the used rows only, in the sorted layout (reads their number on the host:
    backward only; the padded layout's used rows are gathered)."""
    if d.capacity is None:
        p = int(d.offsets[-1])

        def used(t: Tensor) -> Tensor:
            return t[:p]

        offsets = d.offsets
    else:
        rows = d.used.nonzero().squeeze(1)  # expert-major, each group in the sorted order

        def used(t: Tensor) -> Tensor:
            return t.index_select(0, rows)

        offsets = d.sorted_offsets
    return ExpertGrads(
        layers=[
            LinearGrads(used(lg.inputs), used(lg.out_grads), lg.weight_grad, lg.bias_grad) for lg in layers
        ],
        expert_ids=used(d.expert_ids),
        token_ids=used(d.token_ids),
        counts=d.counts,
        offsets=offsets,
        anchor_grad=anchor_grad,
        observed=observed,
        output_layers=output_layers,
    )
