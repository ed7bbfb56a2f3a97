"""GroupedExperts: E feed-forward experts stored as stacked weights, run with a grouped matmul.

Tokens are sorted by expert and each expert's rows form one group of ``torch.nn.functional.
grouped_mm`` (CPU and CUDA in torch >= 2.10; int32 offsets, 16-byte aligned strides). Where it
cannot run (dtype, odd sizes, older torch) the same code runs a per-expert loop of matmuls.

The forward and backward of the expert MLP are one ``autograd.Function`` with a hand-written
backward. That backward is the extension point STGC uses (``moevl.stgc``): it can hand every
expert linear layer's inputs, output gradients and weight gradients to an ``ExpertGradientObserver``
and return a gradient for the router logits from the same backward pass.

``implementation="loop"`` is the plain-autograd per-expert reference (no custom backward).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Implementation = Literal["auto", "grouped", "loop"]

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_available() -> bool:
    return hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")


def _aligned(t: Tensor) -> bool:
    size = t.element_size()
    if t.data_ptr() % 16:
        return False
    return all(s == 1 or (s * size) % 16 == 0 for s in t.stride())


def can_use_grouped_mm(*tensors: Tensor) -> bool:
    """Whether ``grouped_mm`` can run on these operands (dtype, device, alignment)."""
    if not _grouped_mm_available():
        return False
    t0 = tensors[0]
    if t0.dtype not in _GROUPED_DTYPES or any(t.dtype != t0.dtype for t in tensors):
        return False
    if t0.device.type == "cuda" and torch.cuda.get_device_capability(t0.device) < (8, 0):
        return False
    return all(_aligned(t) for t in tensors)


def _gmm(a: Tensor, b: Tensor, offsets: Tensor, counts: list[int]) -> Tensor:
    """Grouped ``a[g] @ b[g]``: a (P, K) rows grouped by expert, b (E, K, M) -> (P, M)."""
    if can_use_grouped_mm(a, b):
        fn = F.grouped_mm if hasattr(F, "grouped_mm") else torch._grouped_mm
        return fn(a, b, offs=offsets)
    out = a.new_empty(a.shape[0], b.shape[-1])
    start = 0
    for e, c in enumerate(counts):
        if c:
            torch.mm(a[start : start + c], b[e], out=out[start : start + c])
        start += c
    return out


def _gmm_weight(a: Tensor, b: Tensor, offsets: Tensor, counts: list[int]) -> Tensor:
    """Per-expert ``a[g]ᵀ @ b[g]``: a (P, K), b (P, M) grouped by expert -> (E, K, M)."""
    a_t = a.t()
    if a.shape[0] > 0 and can_use_grouped_mm(a_t, b):
        fn = F.grouped_mm if hasattr(F, "grouped_mm") else torch._grouped_mm
        return fn(a_t, b, offs=offsets)
    out = a.new_zeros(len(counts), a.shape[1], b.shape[1])
    start = 0
    for e, c in enumerate(counts):
        if c:
            torch.mm(a_t[:, start : start + c], b[start : start + c], out=out[e])
        start += c
    return out


def grouped_matmul(a: Tensor, b: Tensor, offsets: Tensor, counts: list[int]) -> Tensor:
    """Public form of the grouped matmul: a (P, K) grouped by ``offsets``, b (E, K, M) -> (P, M)."""
    return _gmm(a, b, offsets, counts)


@dataclass
class LinearGrads:
    """One expert linear layer ``y = W x (+ b)`` seen from the backward pass, all experts at once.

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
        counts: (E,) long, rows per expert; ``offsets`` (E,) int32 their cumulative sum;
            ``counts_list`` the same counts as Python ints (for the per-expert loop fallback).
        anchor_grad: gradient of the loss w.r.t. the observer's zero-valued anchor, None if the
            anchor is not part of the loss.
        observed: the observed tensor's value (detached), e.g. the router logits (N, E).
    """

    layers: list[LinearGrads]
    expert_ids: Tensor
    token_ids: Tensor
    counts: Tensor
    offsets: Tensor
    counts_list: list[int]
    anchor_grad: Tensor | None
    observed: Tensor | None


class ExpertGradientObserver(Protocol):
    """Receives the experts' gradients during backward; returns a gradient for the observed
    tensor (the router logits, (N, E)) or None. ``moevl.stgc`` implements it."""

    def backward(self, grads: ExpertGrads) -> Tensor | None: ...


@dataclass(frozen=True)
class _MLPSpec:
    gated: bool
    activation: Callable[[Tensor], Tensor]


class _ExpertMLPFunction(torch.autograd.Function):
    """ys = MLP_e(xs) for rows grouped by expert, with a hand-written backward.

    Inputs: xs (P, D), observed (N, E) or None, then the non-tensor routing, then the weights
    (E, out, in) and biases (E, out) or None, in the order of ``GroupedExperts._params``.
    Outputs: ys (P, D) and a zero scalar anchor (its gradient reaches the observer).
    """

    @staticmethod
    def forward(ctx, xs, observed, observer, routing, spec: _MLPSpec, *params):  # type: ignore[override]
        expert_ids, token_ids, counts, offsets, counts_list = routing
        if spec.gated:
            w_gate, w_up, w_down, b_gate, b_up, b_down = params
            a_gate = _gmm(xs, w_gate.transpose(1, 2), offsets, counts_list)
            a_up = _gmm(xs, w_up.transpose(1, 2), offsets, counts_list)
            if b_gate is not None:
                a_gate = a_gate + b_gate[expert_ids]
                a_up = a_up + b_up[expert_ids]
            h = spec.activation(a_gate) * a_up
            ctx.save_for_backward(xs, a_gate, a_up, *params)
        else:
            w_in, w_out, b_in, b_out = params
            b_down = b_out
            w_down = w_out
            a_in = _gmm(xs, w_in.transpose(1, 2), offsets, counts_list)
            if b_in is not None:
                a_in = a_in + b_in[expert_ids]
            h = spec.activation(a_in)
            ctx.save_for_backward(xs, a_in, *params)
        ys = _gmm(h, w_down.transpose(1, 2), offsets, counts_list)
        if b_down is not None:
            ys = ys + b_down[expert_ids]
        ctx.spec = spec
        ctx.routing = routing
        ctx.observer = observer
        ctx.observed = None if observed is None else observed.detach()
        ctx.set_materialize_grads(False)
        anchor = xs.new_zeros((), dtype=torch.float32)
        return ys, anchor

    @staticmethod
    def backward(ctx, grad_ys, grad_anchor):  # type: ignore[override]
        spec: _MLPSpec = ctx.spec
        expert_ids, token_ids, counts, offsets, counts_list = ctx.routing
        num_experts = len(counts_list)
        saved = ctx.saved_tensors
        nparams = 6 if spec.gated else 4
        params = saved[-nparams:]
        if grad_ys is None:
            return (None, None, None, None, None) + (None,) * nparams
        dy = grad_ys.contiguous()

        def bias_grad(d: Tensor) -> Tensor:
            return d.new_zeros(num_experts, d.shape[1]).index_add_(0, expert_ids, d)

        layers: list[LinearGrads] = []
        if spec.gated:
            xs, a_gate, a_up = saved[:3]
            w_gate, w_up, w_down, b_gate, b_up, b_down = params
            with torch.enable_grad():
                ag = a_gate.detach().requires_grad_()
                act = spec.activation(ag)
            h = act.detach() * a_up
            # weight gradients in the parameters' own (E, out, in) layout: no copy on accumulation
            dw_down = _gmm_weight(dy, h, offsets, counts_list)  # (E, D, H)
            dh = _gmm(dy, w_down, offsets, counts_list)  # (P, H)
            (d_gate,) = torch.autograd.grad(act, ag, dh * a_up)
            d_up = dh * act.detach()
            dw_gate = _gmm_weight(d_gate, xs, offsets, counts_list)  # (E, H, D)
            dw_up = _gmm_weight(d_up, xs, offsets, counts_list)
            dxs = _gmm(d_gate, w_gate, offsets, counts_list) + _gmm(d_up, w_up, offsets, counts_list)
            has_bias = b_gate is not None
            db = [bias_grad(d) if has_bias else None for d in (d_gate, d_up, dy)]
            layers = [
                LinearGrads(xs, d_gate, dw_gate, db[0]),
                LinearGrads(xs, d_up, dw_up, db[1]),
                LinearGrads(h, dy, dw_down, db[2]),
            ]
            grads = [dw_gate, dw_up, dw_down, *db]
        else:
            xs, a_in = saved[:2]
            w_in, w_out, b_in, b_out = params
            with torch.enable_grad():
                ai = a_in.detach().requires_grad_()
                act = spec.activation(ai)
            h = act.detach()
            dw_out = _gmm_weight(dy, h, offsets, counts_list)
            dh = _gmm(dy, w_out, offsets, counts_list)
            (d_in,) = torch.autograd.grad(act, ai, dh)
            dw_in = _gmm_weight(d_in, xs, offsets, counts_list)
            dxs = _gmm(d_in, w_in, offsets, counts_list)
            has_bias = b_in is not None
            db = [bias_grad(d) if has_bias else None for d in (d_in, dy)]
            layers = [LinearGrads(xs, d_in, dw_in, db[0]), LinearGrads(h, dy, dw_out, db[1])]
            grads = [dw_in, dw_out, *db]

        grad_observed = None
        if ctx.observer is not None:
            grad_observed = ctx.observer.backward(
                ExpertGrads(
                    layers=layers,
                    expert_ids=expert_ids,
                    token_ids=token_ids,
                    counts=counts,
                    offsets=offsets,
                    counts_list=counts_list,
                    anchor_grad=grad_anchor,
                    observed=ctx.observed,
                )
            )
            if ctx.observed is None:
                grad_observed = None
        param_grads = tuple(
            gr if p is not None and ctx.needs_input_grad[5 + i] else None
            for i, (gr, p) in enumerate(zip(grads, params, strict=True))
        )
        return (dxs, grad_observed, None, None, None, *param_grads)


class GroupedExperts(nn.Module):
    """E feed-forward experts with stacked weights ``(E, out, in)`` (``nn.Linear`` layout per expert).

    Gated experts (SwiGLU / GeGLU, as Llama, Qwen2, Mistral, StableLM, Gemma, Phi-3) hold
    ``gate_proj``, ``up_proj`` (E, H, D) and ``down_proj`` (E, D, H); non-gated experts (Phi's
    fc1/fc2 GELU MLP) hold ``fc1`` (E, H, D) and ``fc2`` (E, D, H). Biases ``*_bias`` (E, out) when
    ``bias=True``.

    Args:
        num_experts: E.
        hidden_size: D, the model dim.
        intermediate_size: H, each expert's hidden dim.
        gated: gate/up/down (True) or fc1/fc2 (False).
        activation: a name (``silu``, ``gelu``, ``gelu_pytorch_tanh``, ``relu``, ...) or a callable.
        bias: whether the linear layers have biases.
        implementation: ``auto`` (grouped matmul where it can run, else a per-expert loop, with the
            hand-written backward), ``grouped`` (the same, grouped matmul required), ``loop``
            (plain autograd per expert; reference, no gradient observer).
    """

    def __init__(
        self,
        *,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        gated: bool = True,
        activation: str | Callable[[Tensor], Tensor] = "silu",
        bias: bool = False,
        implementation: Implementation = "auto",
    ) -> None:
        super().__init__()
        if num_experts < 1 or hidden_size < 1 or intermediate_size < 1:
            raise ValueError(
                "num_experts, hidden_size and intermediate_size must be >= 1, got "
                f"{num_experts}, {hidden_size}, {intermediate_size}"
            )
        if implementation not in ("auto", "grouped", "loop"):
            raise ValueError(f"implementation must be 'auto', 'grouped' or 'loop', got {implementation!r}")
        if isinstance(activation, str):
            if activation not in _ACTIVATIONS:
                raise ValueError(
                    f"activation must be one of {sorted(_ACTIVATIONS)} or a callable, got {activation!r}"
                )
            activation = _ACTIVATIONS[activation]
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gated = gated
        self.activation = activation
        self.implementation: Implementation = implementation
        e, d, h = num_experts, hidden_size, intermediate_size
        names = ("gate_proj", "up_proj", "down_proj") if gated else ("fc1", "fc2")
        for name in names:
            shape = (e, d, h) if name in ("down_proj", "fc2") else (e, h, d)
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
            self.register_parameter(f"{name}_bias", nn.Parameter(torch.zeros(e, shape[1])) if bias else None)
        self._names = names
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name in self._names:
            w = getattr(self, name)
            nn.init.normal_(w, std=w.shape[-1] ** -0.5)
            b = getattr(self, f"{name}_bias")
            if b is not None:
                nn.init.zeros_(b)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, gated={self.gated}, implementation={self.implementation}"
        )

    def _params(self) -> list[Tensor | None]:
        return [getattr(self, n) for n in self._names] + [getattr(self, f"{n}_bias") for n in self._names]

    def expert_mlp(self, x: Tensor, e: int) -> Tensor:
        """Expert ``e`` applied to x (M, D) with plain autograd ops (the reference)."""
        p = {n: getattr(self, n)[e] for n in self._names}
        b = {
            n: (None if getattr(self, f"{n}_bias") is None else getattr(self, f"{n}_bias")[e])
            for n in self._names
        }
        if self.gated:
            hid = self.activation(F.linear(x, p["gate_proj"], b["gate_proj"])) * F.linear(
                x, p["up_proj"], b["up_proj"]
            )
            return F.linear(hid, p["down_proj"], b["down_proj"])
        return F.linear(self.activation(F.linear(x, p["fc1"], b["fc1"])), p["fc2"], b["fc2"])

    def forward(
        self,
        hidden: Tensor,
        indices: Tensor,
        weights: Tensor,
        *,
        observer: ExpertGradientObserver | None = None,
        observed: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Combine the experts' outputs: ``y_t = Σ_slots weights[t, s] · MLP_{indices[t, s]}(x_t)``.

        Args:
            hidden: (N, D) tokens.
            indices: (N, K) long expert ids, ``-1`` for unused slots.
            weights: (N, K) combine weights.
            observer: receives the expert gradients in backward (STGC); needs a custom-backward
                implementation (not ``loop``).
            observed: (N, E) tensor the observer returns a gradient for (the router logits).
        Returns:
            y (N, D) in the compute dtype, and the observer's anchor (a zero scalar to add to the
            loss) or None without an observer.
        """
        n, d = hidden.shape if hidden.dim() == 2 else (None, None)
        if d != self.hidden_size:
            raise ValueError(f"hidden must be (N, {self.hidden_size}), got shape {tuple(hidden.shape)}")
        if indices.shape != weights.shape or indices.dim() != 2 or indices.shape[0] != n:
            raise ValueError(
                f"indices and weights must both be (N={n}, K), got {tuple(indices.shape)} and {tuple(weights.shape)}"
            )
        if observer is not None and self.implementation == "loop":
            raise ValueError("implementation='loop' is the autograd reference and takes no observer (STGC)")

        k = indices.shape[1]
        flat = indices.reshape(-1)
        pair = (flat >= 0).nonzero().squeeze(1)  # (P,) flat (token, slot) ids of used slots
        expert_of_pair = flat[pair]
        expert_ids, order = torch.sort(expert_of_pair, stable=True)
        pair = pair[order]
        token_ids = pair // k
        pair_weight = weights.reshape(-1)[pair]  # (P,)
        counts = torch.bincount(expert_ids, minlength=self.num_experts)
        counts_list = counts.tolist()

        compute_dtype = hidden.dtype
        if torch.is_autocast_enabled(hidden.device.type):
            compute_dtype = torch.get_autocast_dtype(hidden.device.type)

        xs = hidden[token_ids].to(compute_dtype)  # (P, D) sorted by expert
        anchor = None
        if self.implementation == "loop":
            ys = torch.cat(
                [self.expert_mlp(xs[s : s + c], e) for e, (s, c) in enumerate(_segments(counts_list)) if c]
                or [xs.new_zeros(0, d)]
            )
        else:
            params = [None if p is None else p.to(compute_dtype) for p in self._params()]
            if self.implementation == "grouped" and not can_use_grouped_mm(
                xs, *[p for p in params if p is not None]
            ):
                raise ValueError(
                    "implementation='grouped' needs fp32/bf16/fp16 weights and sizes whose rows are "
                    f"16-byte aligned; got dtype {compute_dtype}, hidden {self.hidden_size}, "
                    f"intermediate {self.intermediate_size}"
                )
            offsets = torch.cumsum(counts, 0).to(torch.int32)
            spec = _MLPSpec(gated=self.gated, activation=self.activation)
            routing = (expert_ids, token_ids, counts, offsets, counts_list)
            with torch.autocast(hidden.device.type, enabled=False):
                ys, anchor = _ExpertMLPFunction.apply(
                    xs, observed if observer is not None else None, observer, routing, spec, *params
                )
            if observer is None:
                anchor = None
        ys = ys * pair_weight.to(ys.dtype)[:, None]
        out = ys.new_zeros(n, d).index_add_(0, token_ids, ys)
        return out, anchor


def _segments(counts: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for c in counts:
        out.append((start, c))
        start += c
    return out
