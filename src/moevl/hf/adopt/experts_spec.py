"""How moevl sees a native experts module of transformers' experts interface: which modules are experts,
their tensors' layout (transposed, interleaved gate/up) against moevl's, their activation and gate function."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moevl.moe.activations import Activation

#: max |Δ| (float32) between the adopted and the native block, on decisions and outputs (and between a
#: native gate function and ``act(gate) · up``).
PROBE_TOLERANCE = 1e-5
#: ``ExpertsSpec.activation_source`` of an activation that is the native experts' own ``act_fn`` module
NATIVE_ACTIVATION = "native"


def is_experts_module(module: nn.Module) -> bool:
    """Experts in transformers' interface: 3-D ``gate_up_proj`` (or ``up_proj``) and ``down_proj``."""
    if getattr(module, "adopted_by_moevl", False):  # an AdoptedExperts (moevl.hf.adopt.modules)
        return False
    first = getattr(module, "gate_up_proj", None)
    if not isinstance(first, Tensor):
        first = getattr(module, "up_proj", None)
    down = getattr(module, "down_proj", None)
    return isinstance(first, Tensor) and first.dim() == 3 and isinstance(down, Tensor) and down.dim() == 3


def experts_child(module: nn.Module) -> str | None:
    """The name of ``module``'s experts child (``is_experts_module``), or None."""
    for name, child in module.named_children():
        if is_experts_module(child):
            return name
    return None


@dataclass(frozen=True)
class ExpertsSpec:
    """How moevl computes a native experts module (``is_transposed`` etc. are the interface's flags).

    ``own_function`` False: the native experts apply a gate function or a post-expert norm moevl's
    experts function does not compute; their own eager forward runs (exact, but no STGC)."""

    gated: bool
    transposed: bool
    concatenated: bool
    activation: Any
    own_function: bool
    reason: str = ""
    #: where ``activation`` comes from: a moevl activation's name, ``NATIVE_ACTIVATION`` (the experts' own
    #: ``act_fn`` module) or None (no activation: a gate function of the experts' own)
    activation_source: str | None = None

    def to_record(self) -> dict[str, Any]:
        """A JSON-able record (``from_record`` rebuilds the spec from it and the native experts)."""
        fields = ("gated", "transposed", "concatenated", "own_function", "reason", "activation_source")
        return {name: getattr(self, name) for name in fields}

    @classmethod
    def from_record(cls, record: dict[str, Any], native: nn.Module) -> ExpertsSpec:
        """The spec ``to_record`` wrote, its activation resolved again (``native``: the native experts)."""
        source = record["activation_source"]
        act = native.act_fn if source == NATIVE_ACTIVATION else source
        return cls(**record, activation=None if act is None else Activation.resolve(act))


def to_moevl_layout(w: Tensor, spec: ExpertsSpec, *, first: bool) -> Tensor:
    """A native stacked expert weight in moevl's layout: (E, out, in), a gated first layer's rows
    ``[gate; up]`` (a view where no interleaving is undone)."""
    if spec.transposed:
        w = w.transpose(1, 2)
    if first and spec.gated and not spec.concatenated:  # interleaved [g0, u0, g1, u1, ...] -> [g; u]
        w = torch.cat([w[:, 0::2], w[:, 1::2]], dim=1)
    return w


def to_native_layout(w: Tensor, spec: ExpertsSpec, *, first: bool) -> Tensor:
    """The inverse of ``to_moevl_layout`` (a merged LoRA update back in the native tensor's layout)."""
    if first and spec.gated and not spec.concatenated:  # [g; u] -> [g0, u0, g1, u1, ...]
        g, u = w.chunk(2, dim=1)
        w = torch.stack([g, u], dim=2).flatten(1, 2)
    return w.transpose(1, 2) if spec.transposed else w


def experts_spec(native: nn.Module, config: Any) -> ExpertsSpec:
    """How moevl computes the native experts module ``native`` (its flags, activation and gate function)."""
    from transformers.integrations.moe import _default_apply_gate

    gated = bool(getattr(native, "has_gate", isinstance(getattr(native, "gate_up_proj", None), Tensor)))
    act = _activation(native, config)
    spec = dict(
        gated=gated,
        transposed=bool(getattr(native, "is_transposed", False)),
        concatenated=bool(getattr(native, "is_concatenated", True)),
        activation=None if act is None else Activation.resolve(act),
        activation_source=act if isinstance(act, str) or act is None else NATIVE_ACTIVATION,
    )
    if spec["activation"] is None:
        return ExpertsSpec(
            **spec, own_function=False, reason=f"{type(native).__name__} applies its own gate function"
        )
    if getattr(native, "has_post_expert_norm", False):
        return ExpertsSpec(
            **spec, own_function=False, reason=f"{type(native).__name__} normalises each expert's output"
        )
    learned = [name for name, child in native.named_children() if any(True for _ in child.parameters())]
    if learned:  # e.g. a per-expert norm of each route's output (Ergo): moevl's function has no place for it
        reason = f"{type(native).__name__} computes with modules of its own ({', '.join(learned)})"
        return ExpertsSpec(**spec, own_function=False, reason=reason)
    apply_gate = getattr(type(native), "_apply_gate", _default_apply_gate)
    if apply_gate is not _default_apply_gate and gated:
        diff = _gate_difference(native, spec["activation"], spec["concatenated"])
        if not diff <= PROBE_TOLERANCE:
            reason = f"{type(native).__name__} applies its own gate function (differs from act(gate)·up by {diff:.3g})"
            return ExpertsSpec(**spec, own_function=False, reason=reason)
    return ExpertsSpec(**spec, own_function=True)


@torch.no_grad()
def _gate_difference(native: nn.Module, activation: Activation, concatenated: bool) -> float:
    """max |Δ| between a native ``_apply_gate`` and ``act(gate) · up`` over gate/up values from
    0.01 to 1000 in magnitude (a clamp, an offset or another activation shows)."""
    g = torch.Generator().manual_seed(0)
    hidden = int(
        native.down_proj.shape[-1]
        if not getattr(native, "is_transposed", False)
        else native.down_proj.shape[1]
    )
    scale = torch.logspace(-2, 3, 24)[:, None]
    gate, up = torch.randn(24, hidden, generator=g) * scale, torch.randn(24, hidden, generator=g) * scale
    a = torch.cat([gate, up], -1) if concatenated else torch.stack([gate, up], -1).reshape(24, 2 * hidden)
    param = native.down_proj
    try:
        ref = native._apply_gate(a.to(param.device, param.dtype)).float().cpu()
        ours = (activation(gate) * up).float()
    except TypeError:  # an activation of another signature (e.g. act_fn(gate, up))
        return float("inf")
    return float(((ref - ours).abs() / (1.0 + ours.abs())).max())


#: transformers activation names whose ACT2FN function is exactly moevl's function of that name.
_SAME_ACTIVATIONS = ("silu", "swish", "gelu", "relu", "gelu_pytorch_tanh")


def _activation(native_experts: nn.Module, config: Any) -> Any:
    """The experts' activation: its name when moevl computes the very same function (its fast
    path), else the native activation module itself."""
    from transformers.activations import ACT2FN

    act = getattr(native_experts, "act_fn", None)
    if act is None:  # a gate function of its own (e.g. GPT-OSS's clamped, offset SwiGLU)
        return None
    names = [getattr(config, "hidden_act", None), *_SAME_ACTIVATIONS]
    for name in names:
        if name in _SAME_ACTIVATIONS and type(act) is type(ACT2FN[name]) and vars(act) == vars(ACT2FN[name]):
            return name
    return act
