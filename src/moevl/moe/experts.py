"""GroupedExperts: E feed-forward experts stored as stacked weights, run with a grouped matmul.

Weights are in Hugging Face transformers' native MoE layout (``MixtralExperts``, ``GptOss``-style
biases): a gated expert holds ``gate_up_proj`` (E, 2H, D), rows ``[0:H]`` the gate and ``[H:2H]`` the
up projection, and ``down_proj`` (E, D, H); a non-gated (Phi fc1/fc2 style) expert holds
``up_proj`` (E, H, D) and ``down_proj`` (E, D, H). Each expert slice is an ``nn.Linear`` weight
(out, in), so ``gate, up = F.linear(x, gate_up_proj[e]).chunk(2, -1)``.

Tokens are sorted by expert and each expert's rows form one group of the grouped matmul
(``moe/grouped_mm.py``); the MLP's forward and hand-written backward are one autograd function
(``moe/expert_function.py``), the hook STGC uses. ``implementation="loop"`` is the plain-autograd
per-expert reference (no custom backward).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moevl.checks import check_choice, check_int
from moevl.moe.activations import Activation
from moevl.moe.dispatch import LAYOUTS, Dispatch, Layout, dispatch
from moevl.moe.expert_function import (
    ExpertGradientObserver,
    ExpertWeights,
    LoRAFactors,
    LoRAInputs,
    Observation,
    experts_function,
)
from moevl.moe.grouped_mm import can_use_grouped_mm
from moevl.moe.lora import LoRAConfig, add_expert_lora, lora_inputs, lora_names, merged_delta

Implementation = Literal["auto", "grouped", "loop"]


class Experts(Protocol):
    """What moevl's experts function runs: stacked experts seen in moevl's layout. ``GroupedExperts``
    implements it, and so do an adopted model's native experts (``moevl.hf.adopt``), whatever their
    tensors' own layout."""

    num_experts: int
    gated: bool
    activation: Activation
    lora: LoRAConfig | None
    training: bool
    #: the experts function's row layout (``moevl.moe.expert_function.choose_capacity``)
    layout: Layout

    def linear_weights(self) -> ExpertWeights:
        """The two linear layers in moevl's layout (views of the parameters: gradients reach them)."""
        ...

    def lora_factors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(A_in, B_in, A_out, B_out)`` (``LoRAFactors``' layout); only called with ``lora`` set."""
        ...

    def add_lora(self, config: LoRAConfig) -> None:
        """LoRA adapters on both layers (``B = 0``)."""
        ...

    def merge_lora(self, *, fold: bool = True) -> None:
        """Fold the adapters into the weights (``fold=False``: drop them) and remove them."""
        ...


def compute_inputs(
    experts: Experts, hidden: Tensor, indices: Tensor, weights: Tensor, intermediate_size: int
) -> tuple[Tensor, Tensor, LoRAInputs | None]:
    """hidden (N, D) and weights (N, K) in the compute dtype (autocast's, else hidden's), and the LoRA adapters'
    inputs (scale, dropout masks of the ``indices.numel()`` rows; None without adapters)."""
    compute_dtype = hidden.dtype
    if torch.is_autocast_enabled(hidden.device.type):
        compute_dtype = torch.get_autocast_dtype(hidden.device.type)
    hidden, weights = hidden.to(compute_dtype), weights.to(compute_dtype)
    if experts.lora is None:
        return hidden, weights, None
    rows = indices.numel()
    return (
        hidden,
        weights,
        lora_inputs(experts.lora, rows, hidden.shape[-1], intermediate_size, hidden, experts.training),
    )


def run_experts(
    experts: Experts,
    hidden: Tensor,
    indices: Tensor,
    weights: Tensor,
    *,
    observer: ExpertGradientObserver | None = None,
    observed: Tensor | None = None,
    require_grouped: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``experts`` on the decision (indices (N, K), weights (N, K)) for the tokens hidden (N, D): the one
    place that calls ``experts_function`` (compute dtype under autocast, LoRA inputs, the dispatch).

    Returns y (N, D) in the compute dtype and the observer's anchor (None without an observer).
    ``require_grouped``: ``ValueError`` where the grouped matmul cannot run (``implementation='grouped'``).
    """
    base = experts.linear_weights()
    hidden, weights, inputs = compute_inputs(experts, hidden, indices, weights, base.w_out.shape[-1])
    compute_dtype = hidden.dtype
    params = ExpertWeights(*(None if p is None else p.to(compute_dtype) for p in base.tensors()))
    if require_grouped and not can_use_grouped_mm(hidden, *[p for p in params.tensors() if p is not None]):
        raise ValueError(
            "implementation='grouped' needs fp32/bf16/fp16 weights and sizes whose rows are 16-byte aligned; "
            f"got dtype {compute_dtype}, weights {tuple(params.w_in.shape)} and {tuple(params.w_out.shape)}"
        )
    lora = (
        None
        if inputs is None
        else LoRAFactors(inputs, *(p.to(compute_dtype) for p in experts.lora_factors()))
    )
    observation = None if observer is None else Observation(observer, observed)
    with torch.autocast(hidden.device.type, enabled=False):
        return experts_function(
            hidden,
            weights,
            dispatch(indices, experts.num_experts),
            activation=experts.activation,
            gated=experts.gated,
            params=params,
            lora=lora,
            observation=observation,
            layout=experts.layout,
        )


class GroupedExperts(nn.Module):
    """E feed-forward experts with stacked weights in transformers' native layout (see module doc).

    Parameters: gated: ``gate_up_proj`` (E, 2H, D), ``down_proj`` (E, D, H); non-gated:
    ``up_proj`` (E, H, D), ``down_proj`` (E, D, H). With ``bias=True`` also ``gate_up_proj_bias``
    (E, 2H) or ``up_proj_bias`` (E, H), and ``down_proj_bias`` (E, D); these are None otherwise.

    Args:
        num_experts: E.
        hidden_size: D, the model dim.
        intermediate_size: H, each expert's hidden dim.
        gated: ``act(gate) * up`` (SwiGLU / GeGLU: Llama, Qwen2, Mistral, Phi-3, ...) or ``act(up)``
            (Phi's fc1/fc2 GELU MLP).
        activation: a name (``silu``, ``gelu``, ``gelu_pytorch_tanh``, ``relu``, ...) or a callable.
        bias: whether the linear layers have biases.
        implementation: ``auto`` (grouped matmul where it can run, else a per-expert loop, with the
            hand-written backward), ``grouped`` (the same, grouped matmul required), ``loop``
            (plain autograd per expert; reference, no gradient observer).
        layout: the grouped path's row layout: ``auto``, ``sorted`` or ``padded``
            (``moevl.moe.expert_function.choose_capacity``); an attribute a model's owner may change.

    ``add_lora`` gives each layer LoRA adapters (``moevl.moe.lora``): ``{layer}_lora_A`` (E, r, in) and
    ``{layer}_lora_B`` (E, out, r); ``merge_lora`` folds them into the weights and removes them.
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
        layout: Layout = "auto",
    ) -> None:
        super().__init__()
        check_int("num_experts", num_experts, minimum=1)
        check_int("hidden_size", hidden_size, minimum=1)
        check_int("intermediate_size", intermediate_size, minimum=1)
        check_choice("implementation", implementation, ("auto", "grouped", "loop"))
        check_choice("layout", layout, LAYOUTS)
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gated = gated
        self.activation = Activation.resolve(activation)
        self.implementation: Implementation = implementation
        self.layout: Layout = layout
        self.lora: LoRAConfig | None = None
        e, d, h = num_experts, hidden_size, intermediate_size
        self.in_name = "gate_up_proj" if gated else "up_proj"
        in_rows = 2 * h if gated else h
        for name, shape in ((self.in_name, (e, in_rows, d)), ("down_proj", (e, d, h))):
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
            self.register_parameter(f"{name}_bias", nn.Parameter(torch.zeros(shape[:2])) if bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w, b in ((self.in_proj, self.in_proj_bias), (self.down_proj, self.down_proj_bias)):
            nn.init.normal_(w, std=w.shape[-1] ** -0.5)
            if b is not None:
                nn.init.zeros_(b)

    def add_lora(self, config: LoRAConfig) -> None:
        """LoRA adapters on both layers (``B = 0``: the experts compute what they did)."""
        if self.lora is not None:
            raise ValueError("these experts already have LoRA adapters")
        rows = self.in_proj.shape[1]
        layers = {
            self.in_name: (rows, self.hidden_size),
            "down_proj": (self.hidden_size, self.intermediate_size),
        }
        add_expert_lora(self, layers=layers, num_experts=self.num_experts, config=config, like=self.down_proj)
        self.lora = config

    def lora_factors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(A_in, B_in, A_out, B_out)``."""
        a_in, b_in = (getattr(self, n) for n in lora_names(self.in_name))
        a_out, b_out = (getattr(self, n) for n in lora_names("down_proj"))
        return a_in, b_in, a_out, b_out

    @torch.no_grad()
    def merge_lora(self, *, fold: bool = True) -> None:
        """``W += (alpha / r) · B A`` for both layers (in float32, then the weight's dtype); the adapters go.
        ``fold=False`` removes them without changing ``W``."""
        if self.lora is None:
            raise ValueError("these experts have no LoRA adapters to merge")
        for layer in (self.in_name, "down_proj"):
            name_a, name_b = lora_names(layer)
            w = getattr(self, layer)
            if fold:
                w.copy_(
                    (
                        w.float()
                        + merged_delta(getattr(self, name_a), getattr(self, name_b), self.lora.scale)
                    ).to(w.dtype)
                )
            delattr(self, name_a)
            delattr(self, name_b)
        self.lora = None

    def linear_weights(self) -> ExpertWeights:
        return ExpertWeights(self.in_proj, self.down_proj, self.in_proj_bias, self.down_proj_bias)

    @property
    def in_proj(self) -> Tensor:
        """The first linear layer: ``gate_up_proj`` (gated) or ``up_proj``."""
        return getattr(self, self.in_name)

    @property
    def in_proj_bias(self) -> Tensor | None:
        return getattr(self, f"{self.in_name}_bias")

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, gated={self.gated}, "
            f"activation={self.activation.name}, implementation={self.implementation}"
        )

    def expert_mlp(
        self, x: Tensor, e: int, *, in_mask: Tensor | None = None, out_mask: Tensor | None = None
    ) -> Tensor:
        """Expert ``e`` applied to x (M, D) with plain autograd ops (the reference); with LoRA adapters,
        ``in_mask`` (M, D) / ``out_mask`` (M, H) are their dropout masks (None: no dropout)."""
        b_in, b_out = self.in_proj_bias, self.down_proj_bias
        a = F.linear(x, self.in_proj[e], None if b_in is None else b_in[e])
        if self.lora is not None:
            a_in, bb_in, a_out, bb_out = self.lora_factors()
            x_in = x if in_mask is None else x * in_mask
            a = a + self.lora.scale * F.linear(F.linear(x_in, a_in[e]), bb_in[e])
        if self.gated:
            gate, up = a.chunk(2, dim=-1)
            hid = self.activation(gate) * up
        else:
            hid = self.activation(a)
        y = F.linear(hid, self.down_proj[e], None if b_out is None else b_out[e])
        if self.lora is not None:
            h_in = hid if out_mask is None else hid * out_mask
            y = y + self.lora.scale * F.linear(F.linear(h_in, a_out[e]), bb_out[e])
        return y

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

        if self.implementation == "loop":
            hidden, weights, lora = compute_inputs(self, hidden, indices, weights, self.intermediate_size)
            return self._loop_forward(hidden, weights, dispatch(indices, self.num_experts), lora), None
        return run_experts(
            self,
            hidden,
            indices,
            weights,
            observer=observer,
            observed=observed,
            require_grouped=self.implementation == "grouped",
        )

    def _loop_forward(
        self, hidden: Tensor, weights: Tensor, d: Dispatch, lora: LoRAInputs | None = None
    ) -> Tensor:
        """The plain-autograd reference: one ``expert_mlp`` call per expert on its used rows (the LoRA
        dropout masks' rows are the dispatch order's, as in the grouped path)."""
        ends = d.offsets.tolist()
        used = slice(0, ends[-1])
        xs = hidden.index_select(0, d.token_ids[used])  # (P, D) sorted by expert
        starts = [0, *ends[:-1]]
        in_mask = None if lora is None else lora.in_mask
        out_mask = None if lora is None else lora.out_mask

        def rows(mask: Tensor | None, s: int, t: int) -> Tensor | None:
            return None if mask is None else mask[s:t]

        ys = torch.cat(
            [xs[:0]]
            + [
                self.expert_mlp(xs[s:t], e, in_mask=rows(in_mask, s, t), out_mask=rows(out_mask, s, t))
                for e, (s, t) in enumerate(zip(starts, ends, strict=True))
            ]
        )
        ys = ys * weights.reshape(-1)[d.order[used]][:, None]
        return ys.new_zeros(hidden.shape).index_add(0, d.token_ids[used], ys)
