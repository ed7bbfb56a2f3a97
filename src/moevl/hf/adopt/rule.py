"""The routing rule of a native sparse block, derived from its behaviour: candidate ``TopKRouter`` options
built from the router's and the block's attributes, each checked against the native decisions on random
probe inputs (the router's tensors perturbed so that no rule passes by accident; restored after)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moevl.hf.adopt.experts_spec import PROBE_TOLERANCE, ExpertsSpec, experts_child, experts_spec
from moevl.moe import TopKRouter

#: probe inputs per block: (batch, tokens) of random hidden states, each in eval and train mode.
PROBE_SHAPE = (2, 12)
PROBE_SEEDS = (0, 1, 2)


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

    def to_record(self) -> dict[str, Any]:
        """A JSON-able record of the rule (``from_record`` reads it back)."""
        return {
            "options": dict(self.options),
            "bias_at": None if self.bias_at is None else list(self.bias_at),
            "expert_scale_at": None if self.expert_scale_at is None else list(self.expert_scale_at),
            "log_probabilities": self.log_probabilities,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RoutingRule:
        return cls(
            options=tuple(record["options"].items()),
            bias_at=None if record["bias_at"] is None else tuple(record["bias_at"]),
            expert_scale_at=None if record["expert_scale_at"] is None else tuple(record["expert_scale_at"]),
            log_probabilities=bool(record["log_probabilities"]),
        )


@dataclass(frozen=True)
class Adoption:
    """What adoption found for one native sparse block: its experts and router children, the routing rule,
    ``top_k`` and the experts spec. Saved with a checkpoint (``to_record``), so that loading adopts the
    block again without a search (``adopt(..., adoptions=...)``)."""

    experts_name: str
    router_name: str
    rule: RoutingRule
    top_k: int
    spec: ExpertsSpec

    def to_record(self) -> dict[str, Any]:
        return {
            "experts": self.experts_name,
            "router": self.router_name,
            "rule": self.rule.to_record(),
            "top_k": self.top_k,
            "spec": self.spec.to_record(),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], native: nn.Module) -> Adoption:
        """The adoption ``to_record`` wrote, for the native block ``native`` (its experts resolve the spec's
        activation); ``ValueError`` naming what does not fit it."""
        try:
            experts = native.get_submodule(record["experts"])
            native.get_submodule(record["router"])
            return cls(
                experts_name=record["experts"],
                router_name=record["router"],
                rule=RoutingRule.from_record(record["rule"]),
                top_k=int(record["top_k"]),
                spec=ExpertsSpec.from_record(record["spec"], experts),
            )
        except (AttributeError, KeyError, TypeError) as err:
            raise ValueError(
                f"the saved adoption record does not fit {type(native).__name__}: {type(err).__name__}: {err}"
            ) from None


def tolerance(reference: Tensor) -> float:
    """``PROBE_TOLERANCE`` in float32; in a lower precision a few roundings of the output's magnitude
    (the native and moevl's experts round at other points)."""
    scale = max(1.0, float(reference.float().abs().max()))  # relative above 1: rounding scales with it
    if reference.dtype in (torch.float32, torch.float64):
        return PROBE_TOLERANCE * scale
    return 8 * torch.finfo(reference.dtype).eps * scale


def router_logits(output: Tensor, rule: RoutingRule) -> Tensor:
    """(N, E) fp32 logits moevl routes from: the router module's, or the log of its probabilities."""
    z = output.float()
    return z.clamp_min(torch.finfo(z.dtype).tiny).log() if rule.log_probabilities else z


def scaled_weights(weights: Tensor, indices: Tensor, expert_scale: Tensor | None) -> Tensor:
    """(N, K) weights times a per-expert factor (E,) of the chosen experts (0 slots stay 0)."""
    if expert_scale is None:
        return weights
    return weights * expert_scale.to(weights.dtype)[indices.clamp_min(0)]


def find_logits(output: Any, num_experts: int) -> Tensor | None:
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


def first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    for t in output:
        if isinstance(t, Tensor):
            return t
    raise TypeError(f"no tensor in the block output {type(output).__name__}")


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
def perturbed(block: nn.Module, router_name: str, bias_tensors: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
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
def restore(saved: list[tuple[Tensor, Tensor]]) -> None:
    for t, copy in saved:
        t.copy_(copy)


def probe_inputs(experts: nn.Module, seed_offset: int = 0) -> Iterator[tuple[int, bool, Tensor]]:
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
        for seed, mode, hidden in probe_inputs(experts):
            calls.clear()
            outputs.clear()
            block.train(mode)
            torch.manual_seed(seed)
            with torch.no_grad():
                out = first_tensor(block(hidden))
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
            and (z := find_logits(p[2][name][0], num_experts)) is not None
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
        _Probe(h, mode, find_logits(outs[name][0], num_experts).float(), call[1], call[2], out)
        for h, mode, outs, call, out in probes_raw
    ]
    return name, probes


def derive_rule(block: nn.Module, *, config: Any = None) -> Adoption:
    """The routing rule of a native sparse block, checked on probes; ``NotReproduced`` otherwise. The
    router's tensors are perturbed for the probes and restored (bit-identical) after them."""
    cls = type(block).__name__
    experts_name = experts_child(block)
    if experts_name is None:
        raise NotReproduced(f"{cls} has no experts module of transformers' experts interface")
    experts = getattr(block, experts_name)
    num_experts = int(experts.down_proj.shape[0])
    spec = experts_spec(experts, config)
    try:
        router_name, _ = _run_probes(block, experts_name, num_experts)
        biases = [
            getattr(block.get_submodule(p), a)
            for p, a in _bias_candidates(block, router_name, experts_name, num_experts)
        ]
        saved = perturbed(block, router_name, biases)
        try:
            router_name, probes = _run_probes(block, experts_name, num_experts)
            return _fit(block, cls, experts_name, router_name, probes, num_experts, spec, config)
        finally:
            restore(saved)
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
) -> Adoption:
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
            rec = router.route(router_logits(p.logits, rule), score_bias=bias)
            weights = scaled_weights(rec.weights, rec.indices, scale)
            ours = _dense(rec.indices, weights.to(p.weights.dtype), num_experts)
            diff = max(diff, float((ours - ref).abs().max()) / tolerance(p.weights))
            if diff > best[0]:
                break
        if diff < best[0]:
            best = (diff, rule)
        if diff <= 1.0:
            return Adoption(experts_name, router_name, rule, top_k, spec)
    tol = tolerance(probes[0].weights)
    closest = "none" if best[1] is None else f"{best[1].describe()} differs by {best[0] * tol:.3g}"
    raise NotReproduced(f"no candidate rule reproduces {cls} (router {router_cls}): closest rule {closest}")


class RoutedPart(nn.Module):
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
    def of(cls, layer: nn.Module) -> RoutedPart:
        """The routed part of ``layer``: its router is the child whose output holds the decision (an
        integer (N, K) index and (N, K) weights); ``NotReproduced`` if no child hands one out."""
        experts_name = experts_child(layer)
        experts = getattr(layer, experts_name)
        _, _, hidden = next(probe_inputs(experts))
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
