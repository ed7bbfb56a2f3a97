"""``MoESettings``: the one MoE settings object, from a recipe through ``upcycle``/``adopt`` to
``config.moevl`` of the saved checkpoint.

A field left ``None`` means "the default of the model it is applied to": ``upcycle`` and ``adopt``
resolve it and store the resolved settings in the model's ``MoEState`` (``moe_state(model).settings``) and in
its config, so a checkpoint reloads with exactly the same MoE layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from moevl.checks import check, check_choice, check_float, check_int
from moevl.moe.lora import LoRAConfig
from moevl.moe.ltdr import LTDRConfig
from moevl.stgc import STGCConfig

LayerRule = Literal["alternate", "all", "first_half", "second_half"]
LayerSpec = LayerRule | Sequence[int]
LAYER_RULES: tuple[str, ...] = ("alternate", "all", "first_half", "second_half")
ROUTERS: tuple[str, ...] = ("topk", "ltdr")

#: MoE-LLaVA's balancing coefficient α, the default of an upcycled model (it has no loss of its own).
UPCYCLE_BALANCE_COEF = 0.01


SettingKind = Literal["structural", "inference", "training"]


_STRUCTURAL = {"kind": "structural"}
_INFERENCE = {"kind": "inference"}
_TRAINING = {"kind": "training"}


@dataclass(frozen=True)
class MoESettings:
    """How the sparse layers of a model are built, routed and trained.

    Attributes:
        num_experts: E. ``upcycle`` needs it; ``adopt`` reads it from the model (None) or checks it.
        top_k: experts per token. ``upcycle`` needs it; ``adopt`` reads it from the model or checks it.
        layers: which decoder layers are MoE: ``"alternate"`` (every other layer from 0, MoE-LLaVA),
            ``"all"``, ``"first_half"``, ``"second_half"`` or layer indices. None: ``upcycle`` uses
            ``"alternate"``, ``adopt`` every sparse block of the model. Stored resolved (indices).
        stgc: STGC options (RESEARCH.md §1), or None for no STGC.
        ltdr: LTDR options (tail rule, language-only balancing), or None for plain top-k routing.
            The router is ``"ltdr"`` exactly when this is set (``router`` property).
        balance_coef: α, the weight of moevl's balancing loss (summed over MoE layers; with LTDR's
            ``language_only_balance`` over language tokens only). None means "the model's own
            balancing": for an adopted native MoE model, its own auxiliary loss exactly as
            transformers computes it (``output_router_logits`` / ``router_aux_loss_coef``) and no
            moevl term; an upcycled model has none of its own, so there it means MoE-LLaVA's 0.01.
            A number on an adopted model replaces the native auxiliary loss by moevl's.
        z_loss_coef: weight of the ST-MoE router z-loss summed over MoE layers.
        balance_from: ``"top1"`` (DeepSpeed / MoE-LLaVA) or ``"topk"`` (Mixtral) expert fractions.
        capacity_factor: None (dropless) or the capacity factor (> 0).
        jitter: Switch-style multiplicative router input noise in training, in ``[0, 1)``
            (upcycled routers; an adopted model keeps its own ``router_jitter_noise``).
        bias_update_rate: auxiliary-loss-free balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3):
            ``u`` of the per-expert choice bias ``b`` that top-k selection adds to the scores (the combine
            weights do not see it), nudged after each optimizer step by ``b_i += u · sign(c̄ − c_i)``, ``c_i``
            the tokens routed to expert ``i`` over the step's whole batch (accumulation steps and data-parallel
            ranks; ``moevl.moe.routing.update_choice_bias_``). DeepSeek-V3 uses 0.001 with ``balance_coef``
            near 0. None: no such bias. Structural: the bias is part of the weights (an upcycled router's
            ``e_score_correction_bias``; an adopted model's own, which it must have).
        lora: LoRA adapters (``moevl.moe.lora.LoRAConfig``: ``r``, ``alpha``, ``dropout``, ``targets``
            among experts, routers, attention), or None for full-weight tuning. Structural: the adapters'
            tensors are part of the checkpoint (``moevl.hf.lora.merge_lora`` / ``export`` fold them in).

    Each field has a kind (``FIELD_KINDS``), which says when it may change: ``structural`` fields are fixed by
    the weights of a model that has its MoE layers (its experts, which layers are sparse, its top-k, its
    adapters); ``inference`` fields change what the model computes (LTDR's tail rule, capacity);
    ``training`` fields change only the training loss and its gradients. ``reconfigure`` is the one way
    settings of an existing MoE model change: a checkpoint loaded with overrides, a MoE-LLaVA import, a
    stage-3 recipe on a sparse model.
    """

    num_experts: int | None = field(default=None, metadata=_STRUCTURAL)
    top_k: int | None = field(default=None, metadata=_STRUCTURAL)
    layers: LayerSpec | None = field(default=None, metadata=_STRUCTURAL)
    stgc: STGCConfig | None = field(default=None, metadata=_TRAINING)
    ltdr: LTDRConfig | None = field(default=None, metadata=_INFERENCE)
    balance_coef: float | None = field(default=None, metadata=_TRAINING)
    z_loss_coef: float = field(default=0.0, metadata=_TRAINING)
    balance_from: Literal["top1", "topk"] = field(default="top1", metadata=_TRAINING)
    capacity_factor: float | None = field(default=None, metadata=_INFERENCE)
    jitter: float = field(default=0.0, metadata=_TRAINING)
    bias_update_rate: float | None = field(default=None, metadata=_STRUCTURAL)
    lora: LoRAConfig | None = field(default=None, metadata=_STRUCTURAL)

    def __post_init__(self) -> None:
        if self.num_experts is not None:
            check_int("num_experts", self.num_experts, minimum=1)
        if self.top_k is not None:  # naming num_experts too: a change to either can break it
            check_int("top_k", self.top_k, minimum=1)
            check(
                self.num_experts is None or self.top_k <= self.num_experts,
                "top_k",
                f"an integer >= 1 and <= num_experts ({self.num_experts})",
                self.top_k,
            )
        object.__setattr__(self, "layers", _check_layers(self.layers))
        if self.stgc is not None:
            check_stgc_config(self.stgc)
        if self.ltdr is not None:
            if not isinstance(self.ltdr, LTDRConfig):
                raise ValueError(f"ltdr must be an LTDRConfig or None, got {self.ltdr!r}")
            tail = self.ltdr.tail_top_k
            if tail is not None and (
                (self.top_k is not None and tail < self.top_k)
                or (self.num_experts is not None and tail > self.num_experts)
            ):
                raise ValueError(
                    f"ltdr.tail_top_k must be in [top_k={self.top_k}, num_experts={self.num_experts}], got {tail}"
                )
        if self.balance_coef is not None:
            check_float("balance_coef", self.balance_coef, minimum=0.0)
        check_float("z_loss_coef", self.z_loss_coef, minimum=0.0)
        check_choice("balance_from", self.balance_from, ("top1", "topk"))
        if self.capacity_factor is not None:
            check_float("capacity_factor", self.capacity_factor, minimum=0.0, exclusive_minimum=True)
        check_float("jitter", self.jitter, minimum=0.0, maximum=1.0, exclusive_maximum=True)
        if self.bias_update_rate is not None:
            check_float("bias_update_rate", self.bias_update_rate, minimum=0.0, exclusive_minimum=True)
        if self.lora is not None:
            if not isinstance(self.lora, LoRAConfig):
                raise ValueError(f"lora must be a LoRAConfig or None, got {self.lora!r}")
            self.lora.__post_init__()  # every field valid (a replace() or a hand-built object included)

    @property
    def router(self) -> str:
        """``"ltdr"`` when LTDR options are set, else ``"topk"``."""
        return "ltdr" if self.ltdr is not None else "topk"

    @classmethod
    def from_keywords(cls, *, router: str | None = None, **kwargs: Any) -> MoESettings:
        """Settings from ``upcycle``/``adopt`` keyword arguments, with the ``router`` shortcut:
        ``router="ltdr"`` without ``ltdr`` options means ``LTDRConfig()``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown MoE setting(s) {unknown}; expected router or one of {sorted(names)}")
        if router is not None:
            check_choice("router", router, ROUTERS)
            if router == "ltdr" and kwargs.get("ltdr") is None:
                kwargs["ltdr"] = LTDRConfig()
            if router == "topk" and kwargs.get("ltdr") is not None:
                raise ValueError("ltdr options were given but router is 'topk'; pass router='ltdr'")
        return cls(**kwargs)

    def reconfigure(
        self, changes: Mapping[str, Any], *, num_layers: int | None = None, holder: str = "the model"
    ) -> MoESettings:
        """These settings, of a model that has its MoE layers, with ``changes`` (fields, and the ``router``
        shortcut: ``router="topk"`` drops ``ltdr``, ``router="ltdr"`` without options adds ``LTDRConfig()``).

        Inference and training fields take the new value. A structural field may be given only with the
        value it has (``layers`` as a rule or indices, resolved over ``num_layers`` decoder layers), or None for
        "as it is"; any other value raises ``FixedSettingError`` naming each field, the value given and
        ``holder``'s (e.g. "the checkpoint").
        """
        fixed = {}
        for name in STRUCTURAL_FIELDS:
            if name not in changes or changes[name] is None:
                continue
            value, have = changes[name], getattr(self, name)
            if name == "layers":  # a rule or indices in any order: compared as indices where it can be
                value = (
                    _check_layers(value) if num_layers is None else tuple(select_layers(value, num_layers))
                )
                have = have if have is None or num_layers is None else tuple(select_layers(have, num_layers))
            if value != have:
                fixed[name] = (changes[name], getattr(self, name))
        if fixed:
            raise FixedSettingError(fixed, holder)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        # a structural field given is the value it has (checked above), in its stored form
        given = {k: v for k, v in changes.items() if k not in STRUCTURAL_FIELDS}
        if given.get("router") == "topk" and "ltdr" not in given:
            fields["ltdr"] = None
        return MoESettings.from_keywords(**{**fields, **given})  # names an unknown key (TypeError)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (stored in ``config.moevl``); ``from_dict`` inverts it exactly."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, STGCConfig | LTDRConfig | LoRAConfig):
                value = dataclasses.asdict(value)
                value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        out["router"] = self.router  # derived, for readers of config.json; checked by from_dict
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MoESettings:
        """Inverse of ``to_dict``. Unknown keys and bad values raise ``ValueError`` naming the key.

        Also reads what older moevl versions stored: the same keys, with ``stgc`` settings written before
        ``weight_mode`` / ``centered`` existed read as the paper's CEL.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"MoE settings must be a mapping, got {type(data).__name__}")
        data = dict(data)
        router = data.pop("router", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"unknown MoE setting key(s) {unknown}; expected some of {sorted(names | {'router'})}"
            )
        if isinstance(data.get("stgc"), Mapping):
            data["stgc"] = {**_STGC_BEFORE_WEIGHT_MODE, **data["stgc"]}
        for key, config_cls in (("stgc", STGCConfig), ("ltdr", LTDRConfig), ("lora", LoRAConfig)):
            if data.get(key) is not None:
                data[key] = _nested(key, data[key], config_cls)
        if router is not None:
            check_choice("router", router, ROUTERS)
            if (router == "ltdr") != (data.get("ltdr") is not None):
                raise ValueError(f"router is {router!r} but ltdr is {data.get('ltdr')!r}: they disagree")
        return cls(**data)


#: The kind of each ``MoESettings`` field (class doc): ``structural``, ``inference`` or ``training``.
FIELD_KINDS: dict[str, SettingKind] = {f.name: f.metadata["kind"] for f in dataclasses.fields(MoESettings)}
#: The fields fixed by the weights of a model that has MoE layers.
STRUCTURAL_FIELDS: tuple[str, ...] = tuple(k for k, kind in FIELD_KINDS.items() if kind == "structural")
#: The fields a model with MoE layers can change (``reconfigure``): inference and training ones.
RECONFIGURABLE_FIELDS: tuple[str, ...] = tuple(k for k, kind in FIELD_KINDS.items() if kind != "structural")


class FixedSettingError(ValueError):
    """``reconfigure`` asked to change a structural field. ``fixed``: ``{field: (given, has)}``."""

    def __init__(self, fixed: dict[str, tuple[Any, Any]], holder: str) -> None:
        self.fixed, self.holder = fixed, holder
        detail = ", ".join(f"{k}={given!r} ({holder} has {has!r})" for k, (given, has) in fixed.items())
        super().__init__(f"{detail}: fixed by {holder}'s weights and cannot be changed")


#: What settings saved before ``STGCConfig.weight_mode`` and ``centered`` existed meant: the paper's CEL.
_STGC_BEFORE_WEIGHT_MODE = {"weight_mode": "absolute", "centered": False}


def settings_from(settings: MoESettings | None, kwargs: dict[str, Any], *, caller: str) -> MoESettings:
    """The settings of an ``upcycle``/``adopt`` call: the object, or the keyword arguments."""
    if settings is not None and kwargs:
        raise ValueError(
            f"{caller}: pass either a MoESettings or keyword arguments, not both (got settings and {sorted(kwargs)})"
        )
    if settings is None:
        return MoESettings.from_keywords(**kwargs)
    if not isinstance(settings, MoESettings):
        raise ValueError(f"{caller}: settings must be a MoESettings, got {type(settings).__name__}")
    return settings


def check_stgc_config(stgc: Any) -> None:
    """Every field of an ``STGCConfig`` valid and finite (nan/inf refused): its own checks, run again."""
    if not isinstance(stgc, STGCConfig):
        raise ValueError(f"stgc must be an STGCConfig or None, got {stgc!r}")
    stgc.__post_init__()


def select_layers(spec: LayerSpec, num_layers: int) -> list[int]:
    """Layer indices of ``spec`` in a decoder of ``num_layers`` layers."""
    if isinstance(spec, str):
        table = {
            "alternate": list(range(0, num_layers, 2)),  # MoE-LLaVA's moe_mode="sparse"
            "all": list(range(num_layers)),
            "first_half": list(range(num_layers // 2)),
            "second_half": list(range(num_layers // 2, num_layers)),
        }
        return table[check_choice("layers", spec, LAYER_RULES)]
    idx = list(_check_layers(spec))
    if idx[-1] >= num_layers:
        raise ValueError(f"layers must be indices in [0, {num_layers}), got {idx}")
    return idx


def _check_layers(layers: Any) -> str | tuple[int, ...] | None:
    if layers is None:
        return None
    if isinstance(layers, str):
        return check_choice("layers", layers, LAYER_RULES)
    if not isinstance(layers, Sequence) or len(layers) == 0:
        raise ValueError(
            f"layers must be one of {list(LAYER_RULES)} or a non-empty list of indices, got {layers!r}"
        )
    for pos, i in enumerate(layers):
        check_int(f"layers[{pos}]", i, minimum=0)
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must not repeat an index, got {list(layers)}")
    return tuple(sorted(layers))


def _nested(key: str, value: Any, config_cls: type) -> Any:
    if isinstance(value, config_cls):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{key} must be a mapping of {config_cls.__name__} fields or null, got {value!r}")
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {[f'{key}.{u}' for u in unknown]}; {key} has {sorted(names)}")
    try:
        return config_cls(**value)
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None
