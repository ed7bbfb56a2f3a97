"""The adopted modules: an ``AdoptedMoEBlock`` in place of a native sparse block, an ``AdoptedExperts`` in
place of its experts, each holding the native module's own state dicts (the same dicts: one state) under the
native names, the native object kept to run its forward."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moevl.hf.adopt.experts_spec import ExpertsSpec, to_moevl_layout, to_native_layout
from moevl.hf.adopt.rule import Adoption, RoutingRule, find_logits, router_logits, scaled_weights
from moevl.hf.block import MoEBlock, RoutingContext
from moevl.moe import TopKRouter
from moevl.moe.activations import Activation
from moevl.moe.expert_function import ExpertWeights
from moevl.moe.experts import run_experts
from moevl.moe.layer import route_and_run
from moevl.moe.lora import LoRAConfig, add_expert_lora, lora_names, merged_delta
from moevl.stgc import STGCConfig


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
    """In place of a native experts module: its tensors under their native names, seen in moevl's layout
    (``moevl.moe.experts.Experts``). Its forward (``experts(hidden, top_k_index, top_k_weights)``, called by
    the native block) asks the owning ``AdoptedMoEBlock`` for moevl's decision and output instead of using the
    native decision."""

    #: not an experts module of transformers' interface any more (``is_experts_module``)
    adopted_by_moevl = True

    def __init__(self, native: nn.Module, block: AdoptedMoEBlock, spec: ExpertsSpec) -> None:
        super().__init__()
        _take_state(self, native)
        self.__dict__["native"] = native  # the native experts object (its attributes, its eager forward)
        self.__dict__["block"] = block  # not a submodule: the block owns this module
        self.__dict__["spec"] = spec
        self.__dict__["lora"] = None  # LoRAConfig once it has adapters (moevl's layout)
        self.__dict__["layout"] = (
            "auto"  # the experts function's row layout (moevl.hf.runtime.set_experts_layout)
        )

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        # the native decision (top_k_index, top_k_weights: the rest of the call) is not used
        return self.block.routed_output(hidden_states)

    @property
    def num_experts(self) -> int:
        return int(self.down_proj.shape[0])

    @property
    def gated(self) -> bool:
        return self.spec.gated

    @property
    def activation(self) -> Activation:
        return self.spec.activation

    @property
    def _first(self) -> str:
        return "gate_up_proj" if self.spec.gated else "up_proj"

    def linear_weights(self) -> ExpertWeights:
        """The native tensors in moevl's layout (views: gradients reach them)."""
        s = self.spec
        w_in, w_out = getattr(self, self._first), self.down_proj
        b_in = getattr(self, f"{self._first}_bias", None)
        b_out = getattr(self, "down_proj_bias", None)
        if s.gated and not s.concatenated and b_in is not None:  # interleaved -> [g; u]
            b_in = torch.cat([b_in[:, 0::2], b_in[:, 1::2]], dim=1)
        return ExpertWeights(
            to_moevl_layout(w_in, s, first=True), to_moevl_layout(w_out, s, first=False), b_in, b_out
        )

    def lora_parameter_names(self) -> list[str]:
        """The LoRA factors ``A_in, B_in, A_out, B_out`` (moevl's layout: (out, in), rows ``[gate; up]``)."""
        return [*lora_names(self._first), *lora_names("down_proj")]

    def lora_factors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        a_in, b_in, a_out, b_out = (self._parameters[n] for n in self.lora_parameter_names())
        return a_in, b_in, a_out, b_out

    def add_lora(self, config: LoRAConfig) -> None:
        """LoRA adapters on the native experts, run by moevl's experts function (``moevl.moe.lora``)."""
        if not self.block.runs_moevl_experts():
            why = self.spec.reason or "implementation='loop' runs the native eager loop"
            raise ValueError(
                f"LoRA on the experts needs moevl's experts function, but {why} ({self.block.native_class_name}); "
                "leave 'experts' out of lora.targets"
            )
        if self.lora is not None:
            raise ValueError("these experts already have LoRA adapters")
        w = self.linear_weights()
        layers = {self._first: tuple(w.w_in.shape[1:]), "down_proj": tuple(w.w_out.shape[1:])}
        add_expert_lora(self, layers=layers, num_experts=self.num_experts, config=config, like=w.w_out)
        self.__dict__["lora"] = config

    @torch.no_grad()
    def merge_lora(self, *, fold: bool = True) -> None:
        """Fold the adapters into the native tensors (their own layout) and remove them (``fold=False``:
        remove them only)."""
        if self.lora is None:
            raise ValueError("these experts have no LoRA adapters to merge")
        a_in, b_in, a_out, b_out = self.lora_factors()
        for name, delta in (
            (self._first, merged_delta(a_in, b_in, self.lora.scale)),
            ("down_proj", merged_delta(a_out, b_out, self.lora.scale)),
        ):
            delta = to_native_layout(delta, self.spec, first=name != "down_proj")
            w = self._parameters[name]
            if fold:
                w.copy_((w.float() + delta).to(w.dtype))
        for n in self.lora_parameter_names():
            del self._parameters[n]
        self.__dict__["lora"] = None

    def native_forward(self, hidden: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """The native experts' own eager forward (its loop, its gate function) on a decision;
        unused slots (-1) become expert 0 with weight 0."""
        unused = indices < 0
        indices = indices.masked_fill(unused, 0)
        weights = weights.masked_fill(unused, 0.0)
        forward = type(self.native).forward
        forward = getattr(forward, "__wrapped__", forward)  # the class's own, not the interface dispatch
        return forward(self.native, hidden, indices, weights)  # its tensors are this module's


class AdoptedMoEBlock(_NativeAttributes, MoEBlock):
    """A ``MoEBlock`` in place of a transformers-native sparse block, under the native names.

    It holds the native block's modules, parameters and buffers (the same dicts as the native block
    object, kept as ``native``: its forward runs unchanged), with the experts module replaced by an
    ``AdoptedExperts``. ``router`` is moevl's decision (a ``TopKRouter`` or ``LTDRRouter`` without
    parameters); the native router module keeps its own name (``gate``, ``router``, ...) and computes
    the logits.
    """

    method = "adopt"

    def __init__(
        self,
        *,
        native: nn.Module,
        adoption: Adoption,
        router: TopKRouter,
        layer_index: int,
        context: RoutingContext,
        implementation: str = "auto",
        stgc: STGCConfig | None = None,
        stgc_scale: float = 1.0,
    ) -> None:
        nn.Module.__init__(self)
        self.__dict__["native"] = native
        native_experts = getattr(native, adoption.experts_name)
        _take_state(self, native)
        self._modules[adoption.experts_name] = AdoptedExperts(native_experts, self, adoption.spec)
        self.__dict__["decision"] = router  # no parameters, no buffers: not part of the state
        self.adoption = adoption
        self.context = context  # the model's, shared by its MoE blocks (attach)
        self.experts_name, self.router_name = adoption.experts_name, adoption.router_name
        self.implementation = implementation
        self.layer_index = layer_index
        self.stgc = stgc
        self.stgc_scale = stgc_scale
        self.__dict__["_logits"] = None
        self.__dict__["_hook"] = getattr(native, self.router_name).register_forward_hook(self._capture_logits)
        self.train(native.training)

    @property
    def router(self) -> TopKRouter:
        """moevl's decision (the native router module is ``self.<router_name>``)."""
        return self.decision

    @property
    def experts(self) -> AdoptedExperts:
        return self._modules[self.experts_name]

    @property
    def rule(self) -> RoutingRule:
        return self.adoption.rule

    @property
    def spec(self) -> ExpertsSpec:
        return self.adoption.spec

    @property
    def native_class_name(self) -> str:
        """The class name of the transformers block this one replaced (``Qwen3MoeSparseMoeBlock``, ...)."""
        return type(self.native).__name__

    def runs_moevl_experts(self) -> bool:
        """Whether moevl's experts function computes the experts (else the native eager loop runs: no STGC,
        no LoRA on the experts)."""
        return self.spec.own_function and self.implementation != "loop"

    def choice_bias(self) -> Tensor | None:
        return self._tensor_at(self.rule.bias_at)

    def peft_layout_problem(self) -> str | None:
        if self.spec.gated and not self.spec.concatenated:
            return "interleaved gate/up experts have no PEFT layout here"
        return None

    def rule_record(self) -> dict[str, Any]:
        return self.adoption.to_record()

    def train(self, mode: bool = True) -> AdoptedMoEBlock:
        super().train(mode)
        self.native.training = mode  # the engine reads self.training (e.g. Mixtral's jitter)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.native.forward(*args, **kwargs)

    def release(self) -> None:
        """Give the native block its experts module back and drop the hook (a refused adoption)."""
        self._modules[self.experts_name] = self.experts.native
        self._hook.remove()

    def _capture_logits(self, module: nn.Module, args: Any, output: Any) -> None:
        logits = find_logits(output, self.experts.num_experts)
        lora = module._modules.get("lora")
        if lora is not None and logits is not None:
            # LoRA on the native router (moevl.hf.lora): moevl's decision reads s · B A x on top of its logits
            if not args:
                raise RuntimeError(f"adopt: {type(module).__name__} was called without a positional input")
            logits = logits + lora(args[0].reshape(logits.shape[0], -1)).to(logits.dtype)
        self.__dict__["_logits"] = logits

    def _tensor_at(self, at: tuple[str, str] | None) -> Tensor | None:
        if at is None:
            return None
        path, attr = at
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
        token_mask, vision_mask = self._flat_masks(n)
        expert_scale = self._tensor_at(self.rule.expert_scale_at)

        def run(indices: Tensor, weights: Tensor, observer: Any, observed: Tensor | None):
            weights = scaled_weights(weights, indices, expert_scale)  # (N, K)
            if self.runs_moevl_experts():
                return run_experts(
                    self.experts,
                    hidden,
                    indices,
                    weights,
                    observer=observer,
                    observed=observed,
                    require_grouped=self.implementation == "grouped",
                )
            return self.experts.native_forward(hidden, indices, weights.to(hidden.dtype)), None

        y, record = route_and_run(
            self.router,
            router_logits(logits, self.rule),  # (N, E)
            run,
            token_mask=token_mask,
            vision_mask=vision_mask,
            score_bias=self._tensor_at(self.rule.bias_at),
            stgc=self.stgc if self.training else None,
            stgc_scale=self.stgc_scale,
        )
        self.context.keep_record(self.layer_index, record)
        return y.to(hidden.dtype)

    def _flat_masks(self, n: int) -> tuple[Tensor | None, Tensor | None]:
        out = []
        for m in (self.context.token_mask, self.context.vision_mask):
            out.append(m.reshape(-1) if m is not None and m.numel() == n else None)
        return out[0], out[1]
