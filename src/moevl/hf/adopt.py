"""Adopt transformers' native sparse MoE models: keep their weights and routing, add moevl's.

``adopt`` takes a model whose decoder has sparse blocks built on transformers' experts interface
(``use_experts_implementation``: an experts module with stacked 3-D ``gate_up_proj`` / ``up_proj``
and ``down_proj``, called as ``experts(hidden (N, D), top_k_index (N, K), top_k_weights (N, K))``)
and puts an ``AdoptedMoEBlock`` in place of each block. The adopted block computes what the native
block did (the same logits, up to float summation order) while adding STGC, LTDR, routing
statistics and moevl's balancing options.

No table of families: the routing rule of a block is derived from its behaviour.

* The native block's forward still runs, as written, over the very same modules, parameters and
  buffers (its shared experts and their gates, input jitter, post-norms, output scaling, ...): the
  native block object is kept as the *forward engine*, and its module, parameter and buffer dicts
  are the adopted block's own (one dict each). Only the experts module is replaced, by an
  ``AdoptedExperts`` holding the native experts' tensors under their native names.
* When the native block hands its tokens to the experts, moevl decides instead: the router
  module's logits (read by a forward hook on the native router) go through
  ``moevl.moe.TopKRouter.route`` (or LTDR's rule), and moevl's experts function runs on the
  decision (its hand-written backward carries STGC).
* The ``TopKRouter`` options that reproduce the native decision are *searched*: candidates built
  from the router's and the block's attributes (top-k from the native decision itself; softmax or
  sigmoid scoring; renormalised or not; a score-correction bias found on the router or the block;
  group-limited top-k; a routed scaling factor) are checked against the native block's own
  decisions on random probe inputs, with the router's tensors perturbed so that a rule cannot pass
  by accident (a zero-initialised router makes every rule look alike). The block is then checked end
  to end: the adopted block's output must equal the native block's on every probe (max
  ``|Δ| <= PROBE_TOLERANCE`` in float32). Nothing else is accepted: a block that no rule reproduces
  is refused with its class, the closest rule and by how much it differs.

Every module keeps its native attribute name, so ``state_dict()`` keys equal the native model's
(``mlp.gate.weight``, ``mlp.gate.e_score_correction_bias``, ``mlp.experts.gate_up_proj``,
``mlp.shared_expert.*``, ...) and the native class loads what an adopted model saves.

NOTE: why not register moevl in transformers' ``ExpertsInterface``: that registry is selected by a
string on the (shared, saved) config for every experts module of the model at once, and the
experts function it calls sees only ``(hidden, top_k_index, top_k_weights)``: not the router
logits that moevl's decision, LTDR and STGC's gradient need. Replacing the experts module inside the
adopted block keeps the choice per block and the logits at hand.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moevl.checks import check_choice
from moevl.hf.runtime import (
    HFMoEBlock,
    RoutingContext,
    attach,
    decoder_layers,
    find_moe_state,
    freeze_all_but_moe,
    make_router,
    vision_token_ids,
)
from moevl.hf.settings import MoESettings, select_layers, settings_from
from moevl.moe import TopKRouter
from moevl.moe.activations import Activation
from moevl.moe.expert_function import ExpertsFunction, dispatch
from moevl.moe.grouped_mm import can_use_grouped_mm
from moevl.moe.lora import LoRAConfig, add_expert_lora, lora_inputs, lora_names, merged_delta
from moevl.stgc import STGCConfig

#: max |Δ| (float32) between the adopted and the native block, on decisions and outputs.
PROBE_TOLERANCE = 1e-5
#: probe inputs per block: (batch, tokens) of random hidden states, each in eval and train mode.
PROBE_SHAPE = (2, 12)
PROBE_SEEDS = (0, 1, 2)


# --- finding the native blocks ----------------------------------------------------------------------


def is_experts_module(module: nn.Module) -> bool:
    """Experts in transformers' interface: 3-D ``gate_up_proj`` (or ``up_proj``) and ``down_proj``."""
    if isinstance(module, AdoptedExperts):
        return False
    first = getattr(module, "gate_up_proj", None)
    if not isinstance(first, Tensor):
        first = getattr(module, "up_proj", None)
    down = getattr(module, "down_proj", None)
    return isinstance(first, Tensor) and first.dim() == 3 and isinstance(down, Tensor) and down.dim() == 3


def _experts_child(module: nn.Module) -> str | None:
    for name, child in module.named_children():
        if is_experts_module(child):
            return name
    return None


def is_native_sparse_block(module: nn.Module) -> bool:
    """A transformers-style sparse block by structure: a module owning an experts module of the
    experts interface (``is_experts_module``), not one moevl built."""
    return not isinstance(module, HFMoEBlock) and _experts_child(module) is not None


def _sparse_owner(layer: nn.Module) -> tuple[nn.Module, str] | None:
    """(parent, attribute) of the module in ``layer`` that owns its experts (``layer.mlp`` for most
    families; ``(layer, "")`` where the experts live in the decoder layer itself), or None (dense)."""
    if any(isinstance(m, HFMoEBlock) for m in layer.modules()):
        return None
    for name, module in layer.named_modules():
        if _experts_child(module) is not None:
            if not name:
                return layer, ""
            parent_name, _, attr = name.rpartition(".")
            return layer.get_submodule(parent_name), attr
    return None


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list: ``decoder_layers``'s (layers with an ``mlp``), else the first layer
    list under the decoder holding experts (layers whose sparse block has another name)."""
    try:
        return decoder_layers(model)
    except ValueError:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        for _, module in (decoder if decoder is not None else model).named_modules():
            if isinstance(module, nn.ModuleList) and any(_sparse_owner(m) for m in module):
                return module
        raise


def _native_layers(model: nn.Module) -> tuple[nn.ModuleList, dict[int, tuple[nn.Module, str]]]:
    layers = _decoder_layers(model)
    owners = {i: _sparse_owner(layer) for i, layer in enumerate(layers)}
    return layers, {i: o for i, o in owners.items() if o is not None}


def is_native_moe(model: nn.Module) -> bool:
    """Whether ``model``'s decoder has transformers-native sparse MoE blocks moevl has not adopted
    (then ``adopt`` it; a dense model is ``upcycle``d)."""
    try:
        _, sparse = _native_layers(model)
    except ValueError:
        return False
    return bool(sparse)


# --- the adopted modules ----------------------------------------------------------------------------


def _take_state(twin: nn.Module, native: nn.Module) -> None:
    """Make ``twin`` hold ``native``'s modules, parameters and buffers: the same dicts, so that a
    device/dtype move, a loaded state dict or a replaced child is seen by both."""
    twin._modules = native._modules
    twin._parameters = native._parameters
    twin._buffers = native._buffers
    twin._non_persistent_buffers_set = native._non_persistent_buffers_set


class _NativeAttributes:
    """A module standing in for a native one (kept as ``self.__dict__["native"]``): an attribute it does not
    have itself is the native's (its plain attributes: a block's ``top_k`` and ``config``, experts' ``act_fn``
    config and flags, ...)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # nn.Module's: parameters, buffers, submodules
        except AttributeError:
            native = self.__dict__.get("native")
            if native is None:
                raise
            return getattr(native, name)


class AdoptedExperts(_NativeAttributes, nn.Module):
    """In place of a native experts module: its tensors under their native names; its forward
    (``experts(hidden, top_k_index, top_k_weights)``, called by the native block) asks the owning
    ``AdoptedMoEBlock`` for moevl's decision and output instead of using the native decision."""

    def __init__(self, native: nn.Module, block: AdoptedMoEBlock) -> None:
        super().__init__()
        _take_state(self, native)
        self.__dict__["native"] = native  # the native experts object (its attributes, its eager forward)
        self.__dict__["block"] = block  # not a submodule: the block owns this module
        self.__dict__["lora"] = None  # LoRAConfig once moevl.hf.lora gave it adapters (moevl's layout)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        # the native decision (top_k_index, top_k_weights: the rest of the call) is not used
        return self.block.routed_output(hidden_states)

    @property
    def num_experts(self) -> int:
        return int(self.down_proj.shape[0])

    def native_forward(self, hidden: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """The native experts' own eager forward (its loop, its gate function) on a decision;
        unused slots (-1) become expert 0 with weight 0."""
        unused = indices < 0
        indices = indices.masked_fill(unused, 0)
        weights = weights.masked_fill(unused, 0.0)
        forward = type(self.native).forward
        forward = getattr(forward, "__wrapped__", forward)  # the class's own, not the interface dispatch
        return forward(self.native, hidden, indices, weights)  # its tensors are this module's


@dataclass(frozen=True)
class RoutingRule:
    """The ``TopKRouter`` options reproducing a native router's decision from its logits, and where
    its score-correction bias lives (a module path under the block and an attribute), if it has one."""

    options: tuple[tuple[str, Any], ...]
    bias_at: tuple[str, str] | None = None
    #: a per-expert factor (E,) on the chosen experts' weights (Gemma 4's ``per_expert_scale``)
    expert_scale_at: tuple[str, str] | None = None
    #: the router module returns probabilities, not logits: moevl routes from their log
    log_probabilities: bool = False

    def describe(self) -> str:
        opts = dict(self.options)
        parts = ["log of its probabilities"] if self.log_probabilities else []
        parts.append(opts.get("scoring", "softmax"))
        parts.append("renormalised" if opts.get("normalize_weights", True) else "not renormalised")
        if self.bias_at is not None:
            on = " on the logits" if opts.get("bias_on") == "logits" else ""
            parts.append(f"score bias {'.'.join(p for p in self.bias_at if p)}{on}")
        if opts.get("num_groups", 1) > 1:
            parts.append(f"groups {opts['topk_groups']}/{opts['num_groups']} by {opts['group_score']}")
        if opts.get("routed_scaling_factor", 1.0) != 1.0:
            parts.append(f"scaling {opts['routed_scaling_factor']:g}")
        if self.expert_scale_at is not None:
            parts.append(f"expert scale {'.'.join(p for p in self.expert_scale_at if p)}")
        return ", ".join(parts)


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


class AdoptedMoEBlock(_NativeAttributes, HFMoEBlock):
    """An ``HFMoEBlock`` in place of a transformers-native sparse block, under the native names.

    It holds the native block's modules, parameters and buffers (the same dicts as the native block
    object, kept as ``native``: its forward runs unchanged), with the experts module replaced by an
    ``AdoptedExperts``. ``router`` is moevl's decision (a ``TopKRouter`` or ``LTDRRouter`` without
    parameters); the native router module keeps its own name (``gate``, ``router``, ...) and computes
    the logits.
    """

    def __init__(
        self,
        *,
        native: nn.Module,
        experts_name: str,
        router_name: str,
        rule: RoutingRule,
        spec: ExpertsSpec,
        router: TopKRouter,
        layer_index: int,
        context: RoutingContext,
        implementation: str = "auto",
        stgc: STGCConfig | None = None,
        stgc_scale: float = 1.0,
    ) -> None:
        # NOTE: MoEFeedForward.__init__ is skipped on purpose: its children are the native block's.
        nn.Module.__init__(self)
        self.__dict__["native"] = native
        native_experts = getattr(native, experts_name)
        _take_state(self, native)
        self._modules[experts_name] = AdoptedExperts(native_experts, self)
        self.__dict__["decision"] = router  # no parameters, no buffers: not part of the state
        self.context = context  # the model's, shared by its MoE blocks (attach)
        self.experts_name, self.router_name = experts_name, router_name
        self.rule, self.spec, self.implementation = rule, spec, implementation
        self.layer_index = layer_index
        self.stgc = stgc
        self.stgc_scale = stgc_scale
        self.__dict__["_logits"] = None
        self.__dict__["_hook"] = getattr(native, router_name).register_forward_hook(self._capture_logits)
        self.train(native.training)

    # the names the rest of moevl reads on an HFMoEBlock
    @property
    def router(self) -> TopKRouter:  # type: ignore[override]
        """moevl's decision (the native router module is ``self.<router_name>``)."""
        return self.decision

    @property
    def experts(self) -> AdoptedExperts:  # type: ignore[override]
        return self._modules[self.experts_name]

    @property
    def native_class_name(self) -> str:
        """The class name of the transformers block this one replaced (``Qwen3MoeSparseMoeBlock``, ...)."""
        return type(self.native).__name__

    def router_parameters(self) -> list[nn.Parameter]:
        # moevl's decision has no parameters: the native router module computes the logits.
        return list(getattr(self.native, self.router_name).parameters())

    def train(self, mode: bool = True) -> AdoptedMoEBlock:
        super().train(mode)
        self.native.training = mode  # the engine reads self.training (e.g. Mixtral's jitter)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self.native.forward(*args, **kwargs)

    def release(self) -> None:
        """Give the native block its experts module back and drop the hook (a refused adoption)."""
        self._modules[self.experts_name] = self.experts.native
        self._hook.remove()

    def _capture_logits(self, module: nn.Module, args: Any, output: Any) -> None:
        logits = _find_logits(output, self.experts.num_experts)
        lora = module._modules.get("lora")
        if lora is not None and logits is not None:
            # LoRA on the native router (moevl.hf.lora): moevl's decision reads s · B A x on top of its logits
            if not args:
                raise RuntimeError(f"adopt: {type(module).__name__} was called without a positional input")
            logits = logits + lora(args[0].reshape(logits.shape[0], -1)).to(logits.dtype)
        self.__dict__["_logits"] = logits

    def score_bias(self) -> Tensor | None:
        if self.rule.bias_at is None:
            return None
        path, attr = self.rule.bias_at
        return getattr(self.native.get_submodule(path), attr).reshape(-1)

    def expert_scale(self) -> Tensor | None:
        if self.rule.expert_scale_at is None:
            return None
        path, attr = self.rule.expert_scale_at
        return getattr(self.native.get_submodule(path), attr).reshape(-1)

    def routed_output(self, hidden: Tensor) -> Tensor:
        """moevl's decision and experts output (N, D) for the tokens hidden (N, D) the native block
        hands its experts (its own decision is not used)."""
        logits, self.__dict__["_logits"] = self._logits, None
        n = hidden.shape[0]
        if logits is None or logits.shape[0] != n:
            raise RuntimeError(
                f"adopt: {self.native_class_name} called its experts without a router call of the same "
                f"{n} tokens before it; moevl cannot decide for them"
            )
        logits = _router_logits(logits, self.rule)  # (N, E)
        token_mask, vision_mask = self._flat_masks(n)
        observer = None
        if self.stgc is not None and self.training and torch.is_grad_enabled():
            observer = self.stgc.new_observer(scale=self.stgc_scale)
            logits = self.stgc.guard_logits(logits, observer)
        record = self.router.route(
            logits, token_mask=token_mask, vision_mask=vision_mask, score_bias=self.score_bias()
        )
        weights = _scaled(record.weights, record.indices, self.expert_scale())  # (N, K)
        if self.spec.own_function and not (self.implementation == "loop" and observer is None):
            y, anchor = self._moevl_experts(hidden, record.indices, weights, observer, logits)
            if observer is not None:
                record.stgc, record.cel_anchor = observer.stats, anchor
        else:
            y = self.experts.native_forward(hidden, record.indices, weights.to(hidden.dtype))
        # NOTE: setdefault, so that a gradient-checkpointing recompute (during backward) does not
        # replace the record whose STGC statistics that backward fills.
        self.context.records.setdefault(self.layer_index, record)
        return y.to(hidden.dtype)

    def _flat_masks(self, n: int) -> tuple[Tensor | None, Tensor | None]:
        out = []
        for m in (self.context.token_mask, self.context.vision_mask):
            out.append(m.reshape(-1) if m is not None and m.numel() == n else None)
        return out[0], out[1]

    def expert_weights(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``w_in`` (E, 2H | H, D) with rows [gate; up], ``w_out`` (E, D, H) and their biases, as
        moevl's experts function takes them (views of the native tensors: gradients reach them)."""
        e, s = self.experts, self.spec
        w_in = e.gate_up_proj if s.gated else e.up_proj
        b_in = getattr(e, "gate_up_proj_bias" if s.gated else "up_proj_bias", None)
        w_out, b_out = e.down_proj, getattr(e, "down_proj_bias", None)
        w_in, w_out = to_moevl_layout(w_in, s, first=True), to_moevl_layout(w_out, s, first=False)
        if s.gated and not s.concatenated and b_in is not None:  # interleaved -> [g; u]
            b_in = torch.cat([b_in[:, 0::2], b_in[:, 1::2]], dim=1)
        return w_in, w_out, b_in, b_out

    def _moevl_experts(
        self, hidden: Tensor, indices: Tensor, weights: Tensor, observer: Any, observed: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """moevl's experts function (grouped matmul, hand-written backward, STGC's observer)."""
        compute_dtype = hidden.dtype
        if torch.is_autocast_enabled(hidden.device.type):
            compute_dtype = torch.get_autocast_dtype(hidden.device.type)
        params = [None if p is None else p.to(compute_dtype) for p in self.expert_weights()]
        experts, lora = self.experts, None
        adapters: list[Tensor | None] = [None] * 4
        if experts.lora is not None:
            lora = lora_inputs(
                experts.lora, indices.numel(), hidden.shape[-1], params[1].shape[-1], hidden, self.training
            )
            adapters = [experts._parameters[n].to(compute_dtype) for n in self.lora_parameter_names()]
        if self.implementation == "grouped" and not can_use_grouped_mm(
            hidden, *[p for p in params if p is not None]
        ):
            raise ValueError(
                f"implementation='grouped' needs fp32/bf16/fp16 weights and 16-byte aligned sizes; got {compute_dtype}"
            )
        d = dispatch(indices, self.experts.num_experts)
        with torch.autocast(hidden.device.type, enabled=False):
            y, anchor = ExpertsFunction.apply(
                hidden.to(compute_dtype),
                weights.to(compute_dtype),
                observed if observer is not None else None,
                observer,
                d,
                self.spec.activation,
                self.spec.gated,
                *params,
                lora,
                *adapters,
            )
        return y, anchor if observer is not None else None

    def lora_parameter_names(self) -> list[str]:
        """The experts' LoRA factors ``A_in, B_in, A_out, B_out`` (moevl's layout: (out, in), rows ``[gate; up]``)."""
        first = "gate_up_proj" if self.spec.gated else "up_proj"
        return [*lora_names(first), *lora_names("down_proj")]

    def add_experts_lora(self, config: LoRAConfig) -> None:
        """LoRA adapters on the native experts, run by moevl's experts function (``moevl.moe.lora``)."""
        if not self.spec.own_function or self.implementation == "loop":
            why = self.spec.reason or "implementation='loop' runs the native eager loop"
            raise ValueError(
                f"LoRA on the experts needs moevl's experts function, but {why} ({self.native_class_name}); "
                "leave 'experts' out of lora.targets"
            )
        w_in, w_out, _, _ = self.expert_weights()
        first = "gate_up_proj" if self.spec.gated else "up_proj"
        layers = {first: tuple(w_in.shape[1:]), "down_proj": tuple(w_out.shape[1:])}
        add_expert_lora(
            self.experts, layers=layers, num_experts=self.experts.num_experts, config=config, like=w_out
        )
        self.experts.__dict__["lora"] = config

    @torch.no_grad()
    def merge_experts_lora(self, *, fold: bool = True) -> None:
        """Fold the experts' adapters into the native tensors (their own layout) and remove them
        (``fold=False``: remove them only)."""
        experts, config = self.experts, self.experts.lora
        a_in, b_in, a_out, b_out = (experts._parameters[n] for n in self.lora_parameter_names())
        first = "gate_up_proj" if self.spec.gated else "up_proj"
        for name, delta in (
            (first, merged_delta(a_in, b_in, config.scale)),
            ("down_proj", merged_delta(a_out, b_out, config.scale)),
        ):
            delta = to_native_layout(delta, self.spec, first=name != "down_proj")
            w = experts._parameters[name]
            if fold:
                w.copy_((w.float() + delta).to(w.dtype))
        for n in self.lora_parameter_names():
            del experts._parameters[n]
        experts.__dict__["lora"] = None


def _tolerance(reference: Tensor) -> float:
    """``PROBE_TOLERANCE`` in float32; in a lower precision a few roundings of the output's magnitude
    (the native and moevl's experts round at other points)."""
    scale = max(1.0, float(reference.float().abs().max()))  # relative above 1: rounding scales with it
    if reference.dtype in (torch.float32, torch.float64):
        return PROBE_TOLERANCE * scale
    return 8 * torch.finfo(reference.dtype).eps * scale


def _router_logits(output: Tensor, rule: RoutingRule) -> Tensor:
    """(N, E) fp32 logits moevl routes from: the router module's, or the log of its probabilities."""
    z = output.float()
    return z.clamp_min(torch.finfo(z.dtype).tiny).log() if rule.log_probabilities else z


def _scaled(weights: Tensor, indices: Tensor, expert_scale: Tensor | None) -> Tensor:
    """(N, K) weights times a per-expert factor (E,) of the chosen experts (0 slots stay 0)."""
    if expert_scale is None:
        return weights
    return weights * expert_scale.to(weights.dtype)[indices.clamp_min(0)]


def _find_logits(output: Any, num_experts: int) -> Tensor | None:
    """The router logits in a router module's output: its first floating tensor whose last dim is E."""
    items = output if isinstance(output, (tuple, list)) else (output,)
    for t in items:
        if isinstance(t, Tensor) and t.is_floating_point() and t.dim() >= 2 and t.shape[-1] == num_experts:
            return t.reshape(-1, num_experts)
    return None


# --- deriving the routing rule -------------------------------------------------------------------------


@dataclass
class _Probe:
    """What the native block did on one probe input."""

    hidden: Tensor  # the block input
    training: bool
    logits: Tensor  # (N, E) the router's
    index: Tensor  # (N, K) the native decision
    weights: Tensor  # (N, K)
    output: Tensor  # the block output (its first tensor)


class NotReproduced(ValueError):
    """A native block no candidate rule reproduces (the message names its class and why)."""


def _first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    for t in output:
        if isinstance(t, Tensor):
            return t
    raise TypeError(f"no tensor in the block output {type(output).__name__}")


def _experts_spec(native: nn.Module, config: Any) -> ExpertsSpec:
    from transformers.integrations.moe import _default_apply_gate

    gated = bool(getattr(native, "has_gate", isinstance(getattr(native, "gate_up_proj", None), Tensor)))
    spec = dict(
        gated=gated,
        transposed=bool(getattr(native, "is_transposed", False)),
        concatenated=bool(getattr(native, "is_concatenated", True)),
        activation=None if (act := _activation(native, config)) is None else Activation.resolve(act),
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


def _float_attributes(*objects: Any) -> dict[str, float]:
    found: dict[str, float] = {}
    for obj in objects:
        if obj is None:
            continue
        for name, value in vars(obj).items():
            if isinstance(value, float) and not isinstance(value, bool):
                found.setdefault(name, value)
    return found


def _int_attribute(names: tuple[str, ...], *objects: Any) -> int | None:
    for obj in objects:
        for name in names:
            value = getattr(obj, name, None) if obj is not None else None
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _bias_candidates(
    block: nn.Module, router_name: str, experts_name: str, num_experts: int
) -> list[tuple[str, str]]:
    """Float tensors of E values ((E,) or (1, E)) on the router (any depth) or the block itself."""
    out = []
    for path, module in block.named_modules():
        if path == experts_name or path.startswith(experts_name + "."):
            continue
        if path and path != router_name and not path.startswith(router_name + "."):
            continue
        for attr, t in itertools.chain(
            module.named_parameters(recurse=False), module.named_buffers(recurse=False)
        ):
            if t.shape[-1:] == (num_experts,) and t.numel() == num_experts and t.is_floating_point():
                out.append((path, attr))
    return out


def _candidate_rules(
    block: nn.Module,
    router_name: str,
    experts_name: str,
    num_experts: int,
    top_k: int,
    config: Any,
    probabilities: bool = False,
    weight_sums: tuple[float, ...] = (),
) -> Iterator[RoutingRule]:
    """Candidates, the router's own attributes first; each is checked, none is trusted. E-sized tensors
    are tried as a choice bias and as a per-expert factor on the weights; routing from the log of the
    router's output is tried where that output is ``probabilities`` (rows of non-negative values
    summing to 1). ``weight_sums``: the constant sums of the native weights per token, if they are
    constant (a scaling the router applies without naming it, e.g. ``/ top_k``), tried as scalings."""
    router = getattr(block, router_name)
    floats = _float_attributes(router, block, config)
    named = {v for k, v in floats.items() if "scal" in k.lower() and v > 0}
    scales = [1.0, *sorted((named | set(weight_sums)) - {1.0})]
    n_group = _int_attribute(("num_group", "n_group", "num_groups", "n_groups"), router, block, config)
    topk_group = _int_attribute(("topk_group", "topk_groups"), router, block, config)
    groups: list[dict[str, Any]] = [{}]
    if (
        n_group
        and topk_group
        and 1 < n_group <= num_experts
        and num_experts % n_group == 0
        and topk_group < n_group
    ):
        groups += [
            dict(num_groups=n_group, topk_groups=topk_group, group_score=g) for g in ("top2_sum", "max")
        ]
    biases: list[tuple[str, str] | None] = [
        None,
        *_bias_candidates(block, router_name, experts_name, num_experts),
    ]
    for log_p, scoring, normalize, bias, bias_on, group, scale, expert_scale in itertools.product(
        (False, True) if probabilities else (False,),
        ("softmax", "sigmoid"),
        (True, False),
        biases,
        ("scores", "logits"),
        groups,
        scales,
        biases,
    ):
        if bias is None and bias_on == "logits":
            continue  # the same rule as on the scores
        options = dict(
            scoring=scoring,
            normalize_weights=normalize,
            score_bias=bias is not None,
            routed_scaling_factor=scale,
            **group,
        )
        if bias_on == "logits":
            options["bias_on"] = "logits"
        try:  # options TopKRouter refuses (e.g. top_k above what the groups allow) are no candidates
            TopKRouter(hidden_size=1, num_experts=num_experts, top_k=top_k, own_weight=False, **options)
        except ValueError:
            continue
        yield RoutingRule(tuple(options.items()), bias, expert_scale, log_p)


def _dense(index: Tensor, weights: Tensor, num_experts: int) -> Tensor:
    """(N, E) weight of each expert for each token (0 where not chosen)."""
    used = index >= 0
    return torch.zeros(index.shape[0], num_experts, dtype=torch.float32).scatter_add_(
        1, index.clamp_min(0).long(), weights.float() * used
    )


@torch.no_grad()
def _perturbed(block: nn.Module, router_name: str, bias_tensors: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Randomise the router's tensors (and E-sized bias vectors) in place, for probing only; returns
    (tensor, saved copy) pairs to restore. A trained or zero-initialised router could hide the rule:
    with equal logits every rule agrees."""
    g = torch.Generator().manual_seed(1234)
    saved: list[tuple[Tensor, Tensor]] = []
    router = getattr(block, router_name)
    seen: set[int] = set()
    for t in [*router.parameters(), *router.buffers(), *bias_tensors]:
        if id(t) in seen or not t.is_floating_point():
            continue
        seen.add(id(t))
        saved.append((t, t.detach().clone()))
        noise = torch.randn(t.shape, generator=g).to(t.dtype)
        if t.dim() >= 2:
            t.copy_(noise * 2.0 / t.shape[-1] ** 0.5)
        else:
            t.add_(noise * 0.1)
    return saved


@torch.no_grad()
def _restore(saved: list[tuple[Tensor, Tensor]]) -> None:
    for t, copy in saved:
        t.copy_(copy)


def _probe_inputs(experts: nn.Module, seed_offset: int = 0) -> Iterator[tuple[int, bool, Tensor]]:
    """``(seed, training mode, hidden (*PROBE_SHAPE, D))`` for every probe seed in eval and train mode: random
    block inputs (seeded by ``seed_offset + seed``) in the experts' device and dtype."""
    transposed = getattr(experts, "is_transposed", False)
    dim = int(experts.down_proj.shape[2] if transposed else experts.down_proj.shape[1])
    param = next(iter(experts.parameters()))
    for seed, mode in itertools.product(PROBE_SEEDS, (False, True)):
        g = torch.Generator().manual_seed(seed_offset + seed)
        yield seed, mode, torch.randn(*PROBE_SHAPE, dim, generator=g).to(param.device, param.dtype)


def _run_probes(block: nn.Module, experts_name: str, num_experts: int) -> tuple[str, list[_Probe]]:
    """Run the native block on random hidden states in eval and train mode, recording each router
    child's output, the native decision handed to the experts and the block output."""
    experts = getattr(block, experts_name)
    calls: list[tuple] = []
    outputs: dict[str, list[Any]] = {}

    def on_experts(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, index, weights = [*args, *kwargs.values()][:3]  # the interface's order
        calls.append((hidden, index, weights))

    hooks = [experts.register_forward_pre_hook(on_experts, with_kwargs=True)]
    for name, child in block.named_children():
        if name != experts_name:
            hooks.append(
                child.register_forward_hook(lambda m, a, o, name=name: outputs.setdefault(name, []).append(o))
            )
    training = block.training
    probes_raw = []
    try:
        for seed, mode, hidden in _probe_inputs(experts):
            calls.clear()
            outputs.clear()
            block.train(mode)
            torch.manual_seed(seed)
            with torch.no_grad():
                out = _first_tensor(block(hidden))
            if len(calls) != 1:
                raise NotReproduced(
                    f"{type(block).__name__} called its experts {len(calls)} times in one forward"
                )
            probes_raw.append((hidden, mode, dict(outputs), calls[0], out))
    finally:
        block.train(training)
        for h in hooks:
            h.remove()
    # the router: the child whose output holds (N, E) logits on every probe
    routers = [
        name
        for name in probes_raw[0][2]
        if all(
            len(p[2].get(name, [])) == 1
            and (z := _find_logits(p[2][name][0], num_experts)) is not None
            and z.shape[0] == p[3][0].shape[0]
            for p in probes_raw
        )
    ]
    if not routers:
        n = probes_raw[0][3][0].shape[0]
        wider = {  # a router scoring more classes than stacked experts: skip or zero-computation experts
            name: t.shape[-1]
            for name, outs in probes_raw[0][2].items()
            for t in (outs[0] if isinstance(outs[0], (tuple, list)) else (outs[0],))
            if isinstance(t, Tensor)
            and t.is_floating_point()
            and t.dim() == 2
            and t.shape[0] == n
            and t.shape[-1] > num_experts
        }
        why = "".join(
            f"; its {name} scores {e} choices for {num_experts} stacked experts (skip or zero-computation "
            "experts moevl's experts do not have)"
            for name, e in wider.items()
        )
        raise NotReproduced(
            f"{type(block).__name__}: no child module returns (tokens, {num_experts}) router logits{why}"
        )
    name = next((r for r in routers if r in ("gate", "router")), routers[0])
    probes = [
        _Probe(h, mode, _find_logits(outs[name][0], num_experts).float(), call[1], call[2], out)
        for h, mode, outs, call, out in probes_raw
    ]
    return name, probes


def derive_rule(block: nn.Module, *, config: Any = None) -> tuple[str, str, RoutingRule, int, ExpertsSpec]:
    """The routing rule of a native sparse block, checked on probes; ``NotReproduced`` otherwise.

    Returns:
        (experts child name, router child name, rule, top_k, experts spec).
    """
    cls = type(block).__name__
    experts_name = _experts_child(block)
    if experts_name is None:
        raise NotReproduced(f"{cls} has no experts module of transformers' experts interface")
    experts = getattr(block, experts_name)
    num_experts = int(experts.down_proj.shape[0])
    spec = _experts_spec(experts, config)
    try:
        router_name, _ = _run_probes(block, experts_name, num_experts)
        biases = [
            getattr(block.get_submodule(p), a)
            for p, a in _bias_candidates(block, router_name, experts_name, num_experts)
        ]
        saved = _perturbed(block, router_name, biases)
        try:
            router_name, probes = _run_probes(block, experts_name, num_experts)
            return _fit(block, cls, experts_name, router_name, probes, num_experts, spec, config)
        finally:
            _restore(saved)
    except NotReproduced:
        raise
    except Exception as err:  # the block's forward does not run on (batch, tokens, hidden) alone
        raise NotReproduced(
            f"{cls} cannot be probed with hidden states alone: {type(err).__name__}: {err}"
        ) from None


def _fit(
    block: nn.Module,
    cls: str,
    experts_name: str,
    router_name: str,
    probes: list[_Probe],
    num_experts: int,
    spec: ExpertsSpec,
    config: Any,
) -> tuple[str, str, RoutingRule, int, ExpertsSpec]:
    ks = {int(p.index.shape[-1]) for p in probes}
    if len(ks) != 1:
        raise NotReproduced(f"{cls} hands its experts a varying number of slots {sorted(ks)}")
    (top_k,) = ks
    router_cls = type(getattr(block, router_name)).__name__
    if any(int(p.index.max()) >= num_experts for p in probes):
        raise NotReproduced(
            f"no candidate rule reproduces {cls} (router {router_cls}): it chooses experts beyond its "
            f"{num_experts} stacked experts (e.g. zero-computation experts)"
        )
    natives = [_dense(p.index.reshape(-1, top_k), p.weights.reshape(-1, top_k), num_experts) for p in probes]
    probabilities = all(
        bool((p.logits >= 0).all()) and float((p.logits.sum(-1) - 1).abs().max()) <= 1e-5 for p in probes
    )
    best: tuple[float, RoutingRule | None] = (float("inf"), None)
    sums = torch.cat([p.weights.reshape(-1, top_k).float().sum(-1) for p in probes])
    constant = float(sums[0]) if float((sums - sums[0]).abs().max()) <= 1e-6 and float(sums[0]) > 0 else None
    candidates = _candidate_rules(
        block,
        router_name,
        experts_name,
        num_experts,
        top_k,
        config,
        probabilities,
        (constant,) if constant else (),
    )
    for rule in candidates:
        router = TopKRouter(
            hidden_size=1, num_experts=num_experts, top_k=top_k, own_weight=False, **dict(rule.options)
        )
        bias, scale = (
            None if at is None else getattr(block.get_submodule(at[0]), at[1]).detach().float().reshape(-1)
            for at in (rule.bias_at, rule.expert_scale_at)
        )
        diff = 0.0
        for p, ref in zip(probes, natives, strict=True):
            rec = router.route(_router_logits(p.logits, rule), score_bias=bias)
            weights = _scaled(rec.weights, rec.indices, scale)
            ours = _dense(rec.indices, weights.to(p.weights.dtype), num_experts)
            diff = max(diff, float((ours - ref).abs().max()) / _tolerance(p.weights))
            if diff > best[0]:
                break
        if diff < best[0]:
            best = (diff, rule)
        if diff <= 1.0:
            return experts_name, router_name, rule, top_k, spec
    tolerance = _tolerance(probes[0].weights)
    closest = "none" if best[1] is None else f"{best[1].describe()} differs by {best[0] * tolerance:.3g}"
    raise NotReproduced(f"no candidate rule reproduces {cls} (router {router_cls}): closest rule {closest}")


@torch.no_grad()
def _check_end_to_end(
    adopted: AdoptedMoEBlock, probes_native: list[tuple[Tensor, bool, Tensor]], run: nn.Module | None = None
) -> float:
    """max |Δ| (in tolerances) between the adopted block and the native outputs; ``run``: what is run
    on the probes (the adopted block, or the routed part of a layer that holds its experts)."""
    diff = 0.0
    training = adopted.training
    records = adopted.context.records
    run = adopted if run is None else run
    try:
        for hidden, mode, ref in probes_native:
            adopted.train(mode)
            torch.manual_seed(0)
            out = _first_tensor(run(hidden.clone()))  # a block may scale its input in place (jitter)
            diff = max(diff, float((out.float() - ref.float()).abs().max()) / _tolerance(ref))
    finally:
        adopted.train(training)
        records.clear()
    return diff


@torch.no_grad()
def _native_outputs(block: nn.Module) -> list[tuple[Tensor, bool, Tensor]]:
    experts = getattr(block, _experts_child(block))
    training = block.training
    out = []
    try:
        for _, mode, hidden in _probe_inputs(experts, seed_offset=100):
            block.train(mode)
            torch.manual_seed(0)
            out.append((hidden, mode, _first_tensor(block(hidden.clone())).clone()))
    finally:
        block.train(training)
    return out


class _RoutedPart(nn.Module):
    """The routed part of a decoder layer that holds its router and experts itself (Gemma 4), standing
    in for a block of its own in the probes: ``experts(h, index, weights)`` on the decision its router
    returns. (The layer's forward needs positions and masks; its router and experts need hidden states
    only.) Its children are the layer's router and experts modules themselves."""

    def __init__(self, layer: nn.Module, router_name: str, experts_name: str) -> None:
        super().__init__()
        self.router_name, self.experts_name = router_name, experts_name
        self.add_module(router_name, layer._modules[router_name])
        self.add_module(experts_name, layer._modules[experts_name])
        self.train(layer.training)

    @classmethod
    def of(cls, layer: nn.Module) -> _RoutedPart:
        """The routed part of ``layer``: its router is the child whose output holds the decision (an
        integer (N, K) index and (N, K) weights); ``NotReproduced`` if no child hands one out."""
        experts_name = _experts_child(layer)
        experts = getattr(layer, experts_name)
        _, _, hidden = next(_probe_inputs(experts))
        hidden = hidden.reshape(-1, hidden.shape[-1])
        for name, child in layer.named_children():
            if name == experts_name or not any(True for _ in child.parameters()):
                continue
            try:
                with torch.no_grad():
                    _decision(child(hidden))
            except Exception:  # a child that does not take hidden states alone
                continue
            return cls(layer, name, experts_name)
        raise NotReproduced(
            f"{type(layer).__name__} holds its experts and router itself, and no child of it hands out the "
            "decision (index, weights) from hidden states alone"
        )

    def forward(self, hidden: Tensor) -> Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
        index, weights = _decision(getattr(self, self.router_name)(flat))
        return getattr(self, self.experts_name)(flat, index, weights).reshape(hidden.shape)


def _decision(output: Any) -> tuple[Tensor, Tensor]:
    """(index (N, K), weights (N, K)) in a router's output; ``ValueError`` if it holds none."""
    items = [t for t in (output if isinstance(output, (tuple, list)) else (output,)) if isinstance(t, Tensor)]
    index = next(t for t in items if not t.is_floating_point() and t.dim() == 2)
    weights = [t for t in items if t.is_floating_point() and t.shape == index.shape]
    if not weights:
        raise ValueError("no (N, K) weights beside the index")
    return index, weights[0]


# --- adopt ------------------------------------------------------------------------------------------


def adopt(
    model: nn.Module,
    settings: MoESettings | None = None,
    *,
    freeze_dense: bool = False,
    implementation: str = "auto",
    **kwargs: Any,
) -> nn.Module:
    """Bring a transformers-native sparse MoE model into moevl, in place, keeping its semantics.

    The adopted model computes the same logits as before (same router logits, same decision, same
    expert weights), and adds STGC, LTDR (tail rule and language-only balancing; image and video
    tokens are vision tokens), routing statistics and moevl's balancing options. Its training loss
    keeps the model's own auxiliary loss unless ``balance_coef`` asks for moevl's. Each block's
    routing rule is derived and checked on probes (module doc); a block no rule reproduces is
    refused with ``ValueError`` naming its class and the closest rule.

    Args:
        model: a transformers model whose decoder has native sparse blocks (``is_native_moe``).
        settings: a ``MoESettings``, or None and the same fields as keyword arguments (``router``,
            ``ltdr``, ``stgc``, ``balance_coef``, ...; not both). ``num_experts``/``top_k`` None:
            the model's (a different value is refused); ``layers`` None: every sparse block
            (indices or a rule must name sparse layers only); ``balance_coef`` None: the model's own
            auxiliary loss (``output_router_logits``/``router_aux_loss_coef``), a number: moevl's
            balancing instead (the model is then called with ``output_router_logits=False``).
        freeze_dense: train only the MoE blocks (routers, experts, shared experts).
        implementation: experts implementation (``auto``, ``grouped``, ``loop``: the native
            experts' own eager loop, no STGC).
    Returns:
        The same model object with ``model.moe_context`` and ``model.moe_settings`` (resolved).
    """
    if find_moe_state(model) is not None:
        raise ValueError("adopt: this model is already upcycled or adopted (it has moevl MoE layers)")
    settings = settings_from(settings, kwargs, caller="adopt")
    check_choice("implementation", implementation, ("auto", "grouped", "loop"))
    layers, sparse = _native_layers(model)
    if not sparse:
        raise ValueError(
            f"adopt: {type(model).__name__} has no transformers-native sparse MoE block in its decoder "
            "(a module owning experts with 3-D `gate_up_proj`/`down_proj`); a dense model is upcycled"
        )
    if settings.layers is None:
        chosen = sorted(sparse)
    else:
        chosen = select_layers(settings.layers, len(layers))
        dense = [i for i in chosen if i not in sparse]
        if dense:
            raise ValueError(
                f"adopt: layers {dense} are not sparse MoE layers of the model (sparse: {sorted(sparse)})"
            )
    if settings.jitter != 0:
        raise ValueError(
            f"adopt: jitter={settings.jitter} is moevl's router jitter for upcycled routers; an adopted "
            "model keeps its own (e.g. Mixtral's router_jitter_noise)"
        )
    if settings.ltdr is not None and settings.ltdr.language_only_balance and settings.balance_coef is None:
        raise ValueError(
            "adopt: LTDR's language-only balancing is moevl's balancing loss, but balance_coef=None keeps the "
            "model's own auxiliary loss over all tokens; pass balance_coef (e.g. the model's "
            "router_aux_loss_coef) or LTDRConfig(language_only_balance=False)"
        )
    text_config = model.config.get_text_config() if hasattr(model, "config") else None
    # a layer that holds its experts itself is adopted whole (its forward keeps running), probed through
    # its router and experts alone
    owned = {i for i in chosen if not sparse[i][1]}
    sparse = {i: (layers, str(i)) if i in owned else owner for i, owner in sparse.items()}
    derived = {}
    for i in chosen:
        parent, attr = sparse[i]
        native = getattr(parent, attr)
        try:
            probed = _RoutedPart.of(native) if i in owned else native
            derived[i] = derive_rule(probed, config=text_config)
        except NotReproduced as err:
            raise ValueError(f"adopt: layer {i}: {err}") from None
    num_experts = {
        int(getattr(sparse[i][0], sparse[i][1]).get_submodule(derived[i][0]).down_proj.shape[0])
        for i in chosen
    }
    top_k = {derived[i][3] for i in chosen}
    if len(num_experts) != 1 or len(top_k) != 1:
        raise ValueError(f"adopt: sparse blocks differ in num_experts {num_experts} or top_k {top_k}")
    (model_e,), (model_k,) = num_experts, top_k
    for name, ours, theirs in (
        ("num_experts", settings.num_experts, model_e),
        ("top_k", settings.top_k, model_k),
    ):
        if ours is not None and ours != theirs:
            raise ValueError(
                f"adopt: {name}={ours} but the model's blocks have {theirs}; adopt keeps the model's"
            )
    needs_own = [("STGC", "adopt without stgc")] if settings.stgc is not None else []
    if settings.lora is not None and "experts" in settings.lora.targets:
        needs_own.append(("LoRA on the experts", "leave 'experts' out of lora.targets"))
    for what, instead in needs_own:  # both run inside moevl's experts function
        for i in chosen:
            spec = derived[i][4]
            if not spec.own_function or implementation == "loop":
                why = spec.reason or "implementation='loop' is the native eager loop"
                raise ValueError(
                    f"adopt: {what} needs moevl's experts function, but {why} (layer {i}); {instead}"
                )
    settings = dataclasses.replace(settings, num_experts=model_e, top_k=model_k, layers=tuple(chosen))
    takes_flag = "output_router_logits" in inspect.signature(model.forward).parameters
    context = RoutingContext(
        vision_token_ids=vision_token_ids(getattr(model, "config", None)),
        disable_native_aux_loss=settings.balance_coef is not None and takes_flag,
    )
    adopted = {}
    for i in chosen:
        parent, attr = sparse[i]
        native = getattr(parent, attr)
        experts_name, router_name, rule, _, spec = derived[i]
        at = [a for a in (rule.bias_at, rule.expert_scale_at) if a is not None]
        biases = [getattr(native.get_submodule(path), name) for path, name in at]
        probed = _RoutedPart(native, router_name, experts_name) if i in owned else native
        saved = _perturbed(native, router_name, biases)  # as in the fit: a router that tells rules apart
        try:
            reference = _native_outputs(probed)
        finally:
            _restore(saved)
        hidden_size = int(reference[0][0].shape[-1])
        block = AdoptedMoEBlock(
            native=native,
            experts_name=experts_name,
            router_name=router_name,
            rule=rule,
            spec=spec,
            router=make_router(settings, hidden_size=hidden_size, own_weight=False, **dict(rule.options)),
            layer_index=i,
            context=context,
            implementation=implementation,
            stgc=settings.stgc,
            stgc_scale=1.0 / len(chosen),
        )
        run = _RoutedPart(native, router_name, experts_name) if i in owned else None  # the adopted experts
        saved = _perturbed(native, router_name, biases)
        try:
            diff = _check_end_to_end(block, reference, run)  # in units of the tolerance
        finally:
            _restore(saved)
        if not diff <= 1.0:
            block.release()
            for _, _, other in adopted.values():
                other.release()
            raise ValueError(
                f"adopt: layer {i}: the adopted {type(native).__name__} differs from the native block by "
                f"{diff:.3g} times the tolerance (rule: {rule.describe()}; experts: {'moevl' if spec.own_function else 'native'})"
            )
        adopted[i] = (parent, attr, block)
    for parent, attr, block in adopted.values():
        setattr(parent, attr, block)
    if freeze_dense:
        freeze_all_but_moe(model)
    attach(model, settings=settings, context=context)
    if settings.lora is not None:
        from moevl.hf.lora import apply_lora

        apply_lora(model, settings.lora)
    return model
