"""LoRA on the experts and the routers (Hu et al. 2021): ``W x + (alpha / r) · B A x̃`` with ``B = 0`` at start.

Experts: each expert linear layer ``W_e`` (E, d_out, d_in) gets ``A`` (E, r, d_in) and ``B`` (E, d_out, r),
in moevl's layout (``GroupedExperts``' doc: rows ``[gate; up]`` of a gated first layer, (out, in) per
expert, whatever the native tensor's layout). They run inside the experts' grouped matmuls and their
hand-written backward (``moevl.moe.expert_function``): two thin grouped matmuls per layer forward,
four backward, and no (E, d_out, d_in) tensor at all for a frozen ``W``.

NOTE: why not PEFT's ``target_parameters`` for the stacked experts. PEFT's ``ParamWrapper`` folds the
adapter into the weight on every forward (``W + s · B A`` through ``torch.nn.utils.parametrize``), so
(1) the grouped backward returns a full (E, d_out, d_in) gradient for the merged weight, the memory
LoRA is meant to save, before autograd reduces it to ``A`` and ``B``; (2) STGC would see the merged
weight's per-token gradients (``δ_t x_tᵀ``), not the adapters', so its cosine would not be that of the
trainable parameters; (3) it refuses dropout (``x̃ ≠ x`` cannot be folded into a weight). Here each
factor's per-token gradient is again an outer product (``B``: ``s δ_t ⊗ A x̃_t``; ``A``: ``s Bᵀ δ_t ⊗
x̃_t``), so STGC's exact identity (``moevl.stgc.cosine``) applies to the adapters unchanged.

Routers: ``RouterLoRA`` adds ``s · B A x`` to the router logits (upcycled ``TopKRouter``: in
``compute_logits``; adopted native routers: where moevl reads their logits). Attention and other dense
linear layers take PEFT's own LoRA (``moevl.hf.lora``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moevl.checks import check_choice, check_float, check_int
from moevl.moe.expert_function import LoRAInputs

#: What ``LoRAConfig.targets`` may name: the routed experts, the routers, the decoder's attention projections.
LORA_TARGETS: tuple[str, ...] = ("experts", "routers", "attention")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA options (``moe.lora`` of a recipe, ``MoESettings.lora``).

    Attributes:
        r: the rank (>= 1).
        alpha: the scale numerator; adapters are scaled by ``alpha / r`` (> 0).
        dropout: dropout on each adapter's input in training, in ``[0, 1)``.
        targets: which parts get adapters, among ``LORA_TARGETS``: ``experts`` (the routed experts' stacked
            weights), ``routers`` (the router weight), ``attention`` (the linear layers of each decoder layer's
            attention). A targeted part's own weights are frozen; what a stage's ``trainable`` lists and LoRA
            does not target trains fully (stage 3's default ``[experts, routers]`` with ``targets: [experts]``:
            expert adapters and full routers; shared experts, part of ``experts`` but not routed, train fully).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("experts",)

    def __post_init__(self) -> None:
        # NOTE: the names carry the "lora." prefix of MoESettings, where users meet them.
        check_int("lora.r", self.r, minimum=1)
        check_float("lora.alpha", self.alpha, minimum=0.0, exclusive_minimum=True)
        check_float("lora.dropout", self.dropout, minimum=0.0, maximum=1.0, exclusive_maximum=True)
        targets = self.targets
        if isinstance(targets, str) or not isinstance(targets, tuple | list) or len(targets) == 0:
            raise ValueError(
                f"lora.targets must be a non-empty list of {list(LORA_TARGETS)}, got {targets!r}"
            )
        for i, t in enumerate(targets):
            check_choice(f"lora.targets[{i}]", t, LORA_TARGETS)
        if len(set(targets)) != len(targets):
            raise ValueError(f"lora.targets must not repeat a target, got {list(targets)}")
        object.__setattr__(self, "targets", tuple(targets))

    @property
    def scale(self) -> float:
        """``alpha / r``, the factor on ``B A x``."""
        return self.alpha / self.r


def init_lora_(a: Tensor, b: Tensor) -> None:
    """PEFT's default initialisation: ``A`` as ``nn.Linear`` (Kaiming-uniform, a = √5, per expert), ``B = 0``."""
    with torch.no_grad():
        bound = 1.0 / math.sqrt(a.shape[-1])  # kaiming_uniform_(a=√5) of an (r, d_in) weight
        a.uniform_(-bound, bound)
        b.zero_()


#: Parameter names of the experts' adapters: ``{layer}_lora_A`` / ``{layer}_lora_B``.
def lora_names(layer: str) -> tuple[str, str]:
    return f"{layer}_lora_A", f"{layer}_lora_B"


def add_expert_lora(
    module: nn.Module,
    *,
    layers: dict[str, tuple[int, int]],
    num_experts: int,
    config: LoRAConfig,
    like: Tensor,
) -> None:
    """Register ``{layer}_lora_A`` (E, r, d_in) and ``{layer}_lora_B`` (E, d_out, r) on ``module`` for each
    ``layer -> (d_out, d_in)`` (in forward order), initialised as PEFT does, on ``like``'s device and dtype."""
    for layer, (d_out, d_in) in layers.items():
        name_a, name_b = lora_names(layer)
        if hasattr(module, name_a):
            raise ValueError(f"{type(module).__name__} already has LoRA adapters ({name_a})")
        a = nn.Parameter(like.new_empty(num_experts, config.r, d_in))
        b = nn.Parameter(like.new_empty(num_experts, d_out, config.r))
        init_lora_(a, b)
        module.register_parameter(name_a, a)
        module.register_parameter(name_b, b)


def lora_inputs(
    config: LoRAConfig, rows: int, in_features: int, hidden: int, like: Tensor, training: bool
) -> LoRAInputs:
    """The experts function's ``LoRAInputs``: the scale and, in training with dropout, the two input masks
    (rows, in_features) and (rows, hidden) (each row an independent draw: a (token, expert) pair's own dropout)."""
    if not training or config.dropout == 0.0:
        return LoRAInputs(config.scale)
    keep = 1.0 - config.dropout

    def mask(cols: int) -> Tensor:
        return like.new_empty(rows, cols).bernoulli_(keep).div_(keep)

    return LoRAInputs(config.scale, mask(in_features), mask(hidden))


def merged_delta(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``scale · B_e A_e`` (E, d_out, d_in) in float32: what merging adds to the weight."""
    return torch.bmm(b.float(), a.float()) * scale


class RouterLoRA(nn.Module):
    """Low-rank update of a router's logits: ``s · B A x̃``, A (r, D), B (E, r), ``s = alpha / r``.

    Args:
        hidden_size: D.
        num_experts: E.
        config: the LoRA options (``r``, ``alpha``, ``dropout``).
    """

    def __init__(self, *, hidden_size: int, num_experts: int, config: LoRAConfig) -> None:
        super().__init__()
        self.scale = config.scale
        self.dropout = config.dropout
        self.lora_A = nn.Parameter(torch.empty(config.r, hidden_size))
        self.lora_B = nn.Parameter(torch.empty(num_experts, config.r))
        init_lora_(self.lora_A, self.lora_B)

    def forward(self, hidden: Tensor) -> Tensor:
        """(..., D) -> (..., E) the logits' update, in the adapter's dtype."""
        x = hidden.to(self.lora_A.dtype)
        if self.training and self.dropout > 0:
            x = nn.functional.dropout(x, self.dropout)
        return (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def delta_weight(self) -> Tensor:
        """(E, D) ``s · B A`` in float32, what merging adds to the router weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale
