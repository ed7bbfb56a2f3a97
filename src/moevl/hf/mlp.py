"""Find a decoder MLP by the shapes of its linear layers and copy it into experts (upcycling).

A feed-forward block is ``D -> H -> D`` (``down(act(up(x)))``) or gated
``down(act(gate(x)) * up(x))``, whatever its layers are called: ``gate_proj/up_proj/down_proj``,
fused ``gate_up_proj``, ``fc1/fc2``, ``c_fc/c_proj`` (GPT-2's ``Conv1D``, weights stored
transposed), ``dense_h_to_4h/dense_4h_to_h`` (GPT-NeoX), ``fc_in/fc_out`` (GPT-J), ``w1/w2/w3``.

``find_mlp`` uses no name table. It lists the candidate structures the linear layers' shapes
allow (which layer is ``down``, which is the gate and which the up projection, a fused layer's
half order), and the candidate activations (the module's own parameterless children first, then
moevl's named functions). Then it runs the module's own ``forward`` on a random probe and keeps
the candidate whose formula gives the same output. A module none of whose candidates reproduces
its forward is refused with the reasons: never an approximation.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moevl.moe import GroupedExperts
from moevl.moe.activations import ACTIVATION_NAMES, Activation

#: Relative error ``‖forward - formula‖ / ‖forward‖`` under which a candidate matches, by dtype:
#: summation-order noise, orders of magnitude below what a wrong structure gives (O(1)).
_MATCH_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
_PROBE_TOKENS = 7
#: moevl's named activations, one name per function
_CANONICAL_ACTIVATIONS = tuple(dict.fromkeys(Activation.resolve(n).name for n in ACTIVATION_NAMES))


@dataclass(frozen=True)
class LinearRef:
    """One linear layer of an MLP: ``nn.Linear`` (weight (out, in)) or GPT-2's ``Conv1D``
    (weight (in, out), ``transposed``)."""

    name: str
    module: nn.Module
    transposed: bool

    @property
    def weight(self) -> Tensor:
        """(out, in), as ``nn.Linear`` stores it (a view for ``Conv1D``)."""
        w = self.module.weight
        return w.t() if self.transposed else w

    @property
    def bias(self) -> Tensor | None:
        return self.module.bias

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class MLPSpec:
    """What ``find_mlp`` found: the layers of an MLP and its formula, verified on a probe.

    ``gated``: ``down(act(gate(x)) * up(x))``, else ``down(act(up(x)))``. A fused gated MLP has
    one layer ``up`` of 2H rows (``gate`` None), its gate half first when ``gate_first``.

    Attributes:
        module: the MLP module.
        attribute: its attribute name in the layer ``find_mlp`` was given (None: the module itself
            was given).
        hidden_size: D.
        intermediate_size: H.
        gated, fused, gate_first: the formula (see above).
        up, gate, down: the linear layers.
        activation: a moevl activation name when it is bitwise the same function (its fast
            backward), else the module's own activation callable.
    """

    module: nn.Module
    attribute: str | None
    hidden_size: int
    intermediate_size: int
    gated: bool
    fused: bool
    gate_first: bool
    up: LinearRef
    gate: LinearRef | None
    down: LinearRef
    activation: str | Callable[[Tensor], Tensor]

    @property
    def bias(self) -> bool:
        return any(lin.bias is not None for lin in (self.up, self.gate, self.down) if lin is not None)

    def in_weight(self) -> Tensor:
        """The experts' first weight: gated ``[gate; up]`` (2H, D), gate rows first; else (H, D)."""
        return self._in(lambda lin: lin.weight)

    def in_bias(self) -> Tensor | None:
        """Bias of ``in_weight`` (zeros where a layer has none), or None without biases."""
        if not self.bias:
            return None
        return self._in(_bias)

    def __call__(self, x: Tensor) -> Tensor:
        """The formula (plain ops): what the module computes if the spec is right."""
        act = Activation.resolve(self.activation)
        a = F.linear(x, self.in_weight(), self.in_bias())
        if self.gated:
            gate, up = a.chunk(2, dim=-1)
            a = act(gate) * up
        else:
            a = act(a)
        return self.down(a)

    def _in(self, part: Callable[[LinearRef], Tensor]) -> Tensor:
        if not self.gated:
            return part(self.up)
        if self.gate is not None:
            return torch.cat([part(self.gate), part(self.up)])
        both = part(self.up)
        h = self.intermediate_size
        return both if self.gate_first else torch.cat([both[h:], both[:h]])


def _bias(lin: LinearRef) -> Tensor:
    return lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)


def find_mlp(layer: nn.Module) -> MLPSpec:
    """The feed-forward block of a decoder layer (or the MLP module itself), found by shape.

    ``layer`` itself is tried first (an MLP module given directly: ``attribute`` None); else each
    direct child (whatever its name: ``mlp``, ``feed_forward``, ``ffn``, ...). A candidate is an
    MLP when one of its shape-consistent formulas reproduces its forward on a random probe
    (module doc). A decoder layer is never taken for an MLP: it holds more linear layers.

    Raises:
        ValueError: naming the layer and what each candidate lacked, when neither the layer nor
            a child is an MLP, or when several children are.
    """
    spec, why = _match(layer)
    if spec is not None:
        return spec
    found: list[MLPSpec] = []
    tried: list[str] = [f"itself: {why}"]
    for name, child in layer.named_children():
        spec, why = _match(child)
        if spec is None:
            tried.append(f"{name} ({type(child).__name__}): {why}")
        else:
            found.append(dataclasses.replace(spec, attribute=name))
    if len(found) > 1:
        names = [s.attribute for s in found]
        raise ValueError(f"find_mlp: {type(layer).__name__} has several MLPs {names}; upcycling needs one")
    if found:
        return found[0]
    raise ValueError(
        f"find_mlp: no feed-forward MLP (linear layers D -> H (-> gate) -> D whose formula reproduces the "
        f"module's forward) in {type(layer).__name__}; tried " + "; ".join(tried)
    )


def experts_from_mlp(
    mlp: nn.Module | MLPSpec, num_experts: int, implementation: str = "auto"
) -> GroupedExperts:
    """``num_experts`` exact copies of a dense MLP (module or ``find_mlp`` result) as ``GroupedExperts``
    in transformers' native layout (``gate_up_proj`` gate rows first, or ``up_proj``; ``down_proj``).

    A module given must itself be the MLP (its own forward verified, not one of its children's:
    the experts replace the whole module); else ``ValueError``.
    """
    spec = mlp if isinstance(mlp, MLPSpec) else find_mlp(mlp)
    if not isinstance(mlp, MLPSpec) and spec.attribute is not None:
        raise ValueError(
            f"experts_from_mlp: {type(mlp).__name__} is not itself a feed-forward MLP (its child "
            f"`{spec.attribute}` is); pass that module, or find_mlp's result"
        )
    ref = spec.down.weight
    experts = GroupedExperts(
        num_experts=num_experts,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        gated=spec.gated,
        activation=spec.activation,
        bias=spec.bias,
        implementation=implementation,  # type: ignore[arg-type]
    ).to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        pairs = [(experts.in_proj, spec.in_weight()), (experts.down_proj, spec.down.weight)]
        if spec.bias:
            pairs += [(experts.in_proj_bias, spec.in_bias()), (experts.down_proj_bias, _bias(spec.down))]
        for target, source in pairs:
            target.copy_(source.detach().unsqueeze(0).expand_as(target))
    return experts


# --- matching -------------------------------------------------------------------------------------


def _linears(module: nn.Module) -> list[LinearRef]:
    from transformers.pytorch_utils import Conv1D

    out = []
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            out.append(LinearRef(name, m, transposed=False))
        elif isinstance(m, Conv1D):
            out.append(LinearRef(name, m, transposed=True))
    return out


def _structures(linears: list[LinearRef]) -> list[dict]:
    """Every formula the shapes allow; each uses all the module's linear layers."""
    found = []
    if len(linears) not in (2, 3):
        return found
    for down in linears:
        d, h = down.out_features, down.in_features
        rest = [lin for lin in linears if lin is not down]
        if any(lin.in_features != d for lin in rest):
            continue
        if len(rest) == 1:
            (up,) = rest
            if up.out_features == h:
                found.append(dict(gated=False, fused=False, gate_first=True, up=up, gate=None, down=down))
            elif up.out_features == 2 * h:
                for first in (True, False):
                    found.append(dict(gated=True, fused=True, gate_first=first, up=up, gate=None, down=down))
        elif all(lin.out_features == h for lin in rest):
            for gate, up in itertools.permutations(rest):
                found.append(dict(gated=True, fused=False, gate_first=True, up=up, gate=gate, down=down))
    return found


def _activations(module: nn.Module) -> list[Callable[[Tensor], Tensor] | str]:
    """The module's own parameterless children (not dropout) first, then moevl's named functions."""
    own = [
        m
        for m in module.modules()
        if m is not module
        and not isinstance(m, nn.Dropout | nn.Identity)
        and next(m.parameters(), None) is None
        and next(m.children(), None) is None
    ]
    return [*own, *_CANONICAL_ACTIVATIONS]


def _named_equivalent(act: Callable[[Tensor], Tensor] | str) -> Callable[[Tensor], Tensor] | str:
    """A moevl name computing bitwise the same function as ``act`` (its closed-form backward), else ``act``."""
    if isinstance(act, str):
        return act
    grid = torch.linspace(-10.0, 10.0, 2001)
    with torch.no_grad():
        values = act(grid)
        for name in _CANONICAL_ACTIVATIONS:
            if torch.equal(Activation.resolve(name)(grid), values):
                return name
    return act


def _match(module: nn.Module) -> tuple[MLPSpec | None, str]:
    """(spec, "") when a formula reproduces ``module``'s forward, else (None, why not).

    The formula is identified on a copy of ``module`` with seeded random weights: the structure
    is a property of the code, not of the values (a freshly built model's uninitialised or zero
    weights would make gate and up indistinguishable). The spec returned names ``module``'s layers.
    """
    linears = _linears(module)
    if not _structures(linears):
        shapes = ", ".join(f"{lin.name} {lin.in_features}->{lin.out_features}" for lin in linears) or "none"
        return None, f"its linear layers ({shapes}) are not D -> H (-> gate) -> D"
    probe_module = _randomized_copy(module)
    structures = _structures(_linears(probe_module))
    own_names = {id(m): name for name, m in probe_module.named_modules()}
    reasons, best = [], float("inf")
    for d in sorted({s["down"].out_features for s in structures}):
        expected, probe, why = _run(probe_module, d, structures[0]["down"].weight)
        if expected is None:
            reasons.append(f"D={d}: {why}")
            continue
        tolerance = _MATCH_TOLERANCE.get(probe.dtype, 1e-5)
        scale = expected.float().norm().clamp_min(torch.finfo(torch.float32).tiny)
        for structure in (s for s in structures if s["down"].out_features == d):
            for act in _activations(probe_module):
                spec = MLPSpec(
                    module=probe_module,
                    attribute=None,
                    hidden_size=d,
                    intermediate_size=structure["down"].in_features,
                    activation=act,
                    **structure,
                )
                with torch.no_grad():
                    err = float((spec(probe).float() - expected.float()).norm() / scale)
                best = min(best, err)
                if err <= tolerance:
                    return _on_module(spec, module, own_names), ""
        reasons.append(
            f"D={d}: no formula of its shapes reproduces its forward (best relative error {best:.2g})"
        )
    return None, "; ".join(reasons)


def _randomized_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose floating parameters are seeded random values of O(1) effect."""
    g = torch.Generator(device="cpu").manual_seed(0)
    copy = deepcopy(module)
    with torch.no_grad():
        for p in copy.parameters():
            if p.is_floating_point():
                std = 1.0 / math.sqrt(max(p.shape)) if p.dim() > 1 else 0.1
                p.copy_((std * torch.randn(p.shape, generator=g)).to(p.dtype))
    return copy


def _on_module(spec: MLPSpec, module: nn.Module, names: dict[int, str]) -> MLPSpec:
    """``spec`` found on the random copy, pointing at ``module``'s own layers and activation."""

    def own(lin: LinearRef | None) -> LinearRef | None:
        return None if lin is None else dataclasses.replace(lin, module=module.get_submodule(lin.name))

    activation = _named_equivalent(spec.activation)
    if isinstance(activation, nn.Module):
        activation = module.get_submodule(names[id(activation)])
    return dataclasses.replace(
        spec, module=module, up=own(spec.up), gate=own(spec.gate), down=own(spec.down), activation=activation
    )


def _run(module: nn.Module, d: int, ref: Tensor) -> tuple[Tensor | None, Tensor, str]:
    """The module's output on a seeded random probe (1, T, d) in eval mode (dropout off)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(1, _PROBE_TOKENS, d, generator=g).to(device=ref.device, dtype=ref.dtype)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            expected = module(probe)
    except Exception as err:  # not callable on hidden states alone: not a feed-forward block
        return None, probe, f"its forward does not take hidden states alone ({type(err).__name__}: {err})"
    finally:
        module.train(was_training)
    if not isinstance(expected, Tensor) or expected.shape != probe.shape:
        return None, probe, "its forward does not return a tensor of the input's shape"
    return expected, probe, ""
