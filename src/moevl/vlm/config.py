"""The run recipe (YAML in ``configs/``): data, model, the three training stages, MoE, evaluation.

``load_config`` validates while it builds: an unknown key, a value of the wrong type, or an
impossible value (``top_k > num_experts``) raises ``ConfigError`` naming the key, what was expected
and what was given. Overrides (``key.sub=value``, values parsed as YAML) are applied before
validation, so they are checked the same way.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from moevl.data.dataset import DataConfig
from moevl.data.scenes import FAMILIES
from moevl.vlm.model import MOE_PARTS, PARTS, ModelConfig

METHODS = ("baseline", "stgc", "ltdr", "stgc+ltdr")


class ConfigError(ValueError):
    """A bad recipe: the message names the key, the expected and the given value."""


@dataclass(frozen=True)
class StageConfig:
    """One training stage. Every field is a YAML key under ``stage1:``/``stage2:``/``stage3:``."""

    max_steps: int = 100
    batch_size: int = 32
    learning_rate: float = 1e-3  # 3e-3 left the vision tower stuck (digit identity never learnt)
    warmup_steps: int = 10
    weight_decay: float = 0.0
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    logging_steps: int = 10
    save_steps: int = 100
    save_total_limit: int = 2
    # Parts trained: stages 1-2 some of PARTS; stage 3 (MoE-LLaVA: experts and routers only) some of
    # MOE_PARTS + PARTS (a dense part listed there trains beside the experts, e.g. the projector).
    trainable: tuple[str, ...] = PARTS


@dataclass(frozen=True)
class MoEConfig:
    """MoE-tuning (stage 3) as in MoE-LLaVA, plus the STGC and LTDR options."""

    num_experts: int = 4
    top_k: int = 2
    layers: str = "alternate"
    balance_coef: float = 0.01
    stgc_weight: float = 0.5
    stgc_threshold: float = 0.0
    stgc_scope: Literal["all", "last", "delta"] = "all"
    ltdr_tail_top_k: int | None = None  # None: num_experts
    ltdr_language_only_balance: bool = True
    ltdr_vision_tail: bool = True
    # Measure token-gradient conflicts (STGC with weight 0) for methods without STGC, so that the
    # report compares conflict ratios across all methods. Adds the measurement's cost to their time.
    monitor_conflicts: bool = True


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 256
    max_new_tokens: int = 3
    split: Literal["train", "validation", "test"] = "test"


@dataclass(frozen=True)
class CompareConfig:
    methods: tuple[str, ...] = METHODS
    seeds: int = 1


def _stage1() -> StageConfig:
    return StageConfig(max_steps=400, save_steps=400)


def _stage2() -> StageConfig:
    return StageConfig(max_steps=2500, save_steps=500)


def _stage3() -> StageConfig:
    # Experts and routers only (MoE-LLaVA); 400 steps at 1e-3 move the loss and accuracy measurably.
    return StageConfig(max_steps=400, learning_rate=1e-3, save_steps=400, trainable=MOE_PARTS)


@dataclass(frozen=True)
class RunConfig:
    """The whole recipe; the defaults are the default ``moevl compare`` (configs/compare.yaml)."""

    seed: int = 0
    # torch intra-op threads per process (0: torch's default). NOTE: 1 by default: these models are
    # small, and on a shared 2-core machine two spinning threads ran 5-50x slower than one.
    threads: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: StageConfig = field(default_factory=_stage1)
    stage2: StageConfig = field(default_factory=_stage2)
    stage3: StageConfig = field(default_factory=_stage3)
    moe: MoEConfig = field(default_factory=MoEConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def stage(self, n: int) -> StageConfig:
        if n not in (1, 2, 3):
            raise ConfigError(f"stage: expected 1, 2 or 3, got {n!r}")
        return (self.stage1, self.stage2, self.stage3)[n - 1]


# --- building dataclasses from plain data, with type checks ----------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        inner = _type_name(args[0])
        return f"a list of {inner}" if args[-1] is Ellipsis else f"a list of {len(args)} {inner}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp`` (and converted: lists -> tuples, int -> float)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping of {_fields(tp)}, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise bad
        if args[-1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in this file


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = _fields(cls)
    for k in data:
        if k not in known:
            raise ConfigError(f"unknown config key '{prefix}{k}'; expected one of: {', '.join(known)}")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    defaults = cls()
    # Nested sections merge onto their defaults (stage2 keeps its own default max_steps, etc.).
    for k, v in list(kwargs.items()):
        if dataclasses.is_dataclass(v):
            given = data[k]
            kwargs[k] = dataclasses.replace(getattr(defaults, k), **{f: getattr(v, f) for f in given})
    return dataclasses.replace(defaults, **kwargs)


def _require(ok: bool, key: str, expected: str, given: Any) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': expected {expected}, got {given!r}")


def validate(cfg: RunConfig) -> RunConfig:
    """Checks the values that types cannot: ranges and relations between keys."""
    d, m, moe = cfg.data, cfg.model, cfg.moe
    _require(cfg.threads >= 0, "threads", "an integer >= 0 (0: torch's default)", cfg.threads)
    _require(d.source in ("digits", "fashion-mnist"), "data.source", "'digits' or 'fashion-mnist'", d.source)
    _require(d.grid in (2, 3), "data.grid", "2 or 3", d.grid)
    _require(0.0 <= d.empty_prob < 1.0, "data.empty_prob", "a probability in [0, 1)", d.empty_prob)
    _require(len(d.families) > 0, "data.families", f"a non-empty list of {FAMILIES}", d.families)
    for i, f in enumerate(d.families):
        _require(f in FAMILIES, f"data.families[{i}]", f"one of {FAMILIES}", f)
    lo, hi = d.palette
    _require(1 <= lo <= hi <= 10, "data.palette", "[lo, hi] with 1 <= lo <= hi <= 10", list(d.palette))
    if d.family_weights:
        _require(
            len(d.family_weights) == len(FAMILIES) and all(w >= 1 for w in d.family_weights),
            "data.family_weights",
            f"empty, or one integer >= 1 per family of {FAMILIES}",
            list(d.family_weights),
        )
    fr = d.split_fractions
    _require(
        all(x > 0 for x in fr) and abs(sum(fr) - 1.0) < 1e-6,
        "data.split_fractions",
        "three positive fractions summing to 1",
        list(fr),
    )
    for k in ("train_scenes", "validation_scenes", "test_scenes", "questions_per_scene", "caption_scenes"):
        _require(getattr(d, k) >= 1, f"data.{k}", "an integer >= 1", getattr(d, k))
    _require(
        m.patch_size in (1, 2, 4, 8),
        "model.patch_size",
        "1, 2, 4 or 8 (dividing the 8-pixel cell)",
        m.patch_size,
    )
    for prefix in ("vision", "text"):
        hidden, heads = getattr(m, f"{prefix}_hidden_size"), getattr(m, f"{prefix}_heads")
        _require(heads >= 1, f"model.{prefix}_heads", "an integer >= 1", heads)
        _require(
            hidden >= 1 and hidden % heads == 0,
            f"model.{prefix}_hidden_size",
            f"a positive multiple of model.{prefix}_heads ({heads})",
            hidden,
        )
        _require(
            getattr(m, f"{prefix}_layers") >= 1,
            f"model.{prefix}_layers",
            "an integer >= 1",
            getattr(m, f"{prefix}_layers"),
        )
    for n in (1, 2, 3):
        s = cfg.stage(n)
        p = f"stage{n}"
        _require(s.max_steps >= 1, f"{p}.max_steps", "an integer >= 1", s.max_steps)
        _require(s.batch_size >= 1, f"{p}.batch_size", "an integer >= 1", s.batch_size)
        _require(s.learning_rate > 0, f"{p}.learning_rate", "a positive number", s.learning_rate)
        _require(s.warmup_steps >= 0, f"{p}.warmup_steps", "an integer >= 0", s.warmup_steps)
        _require(s.logging_steps >= 1, f"{p}.logging_steps", "an integer >= 1", s.logging_steps)
        _require(s.save_steps >= 1, f"{p}.save_steps", "an integer >= 1", s.save_steps)
        _require(s.save_total_limit >= 1, f"{p}.save_total_limit", "an integer >= 1", s.save_total_limit)
        allowed = PARTS if n < 3 else MOE_PARTS + PARTS
        _require(len(s.trainable) > 0, f"{p}.trainable", f"a non-empty list of {allowed}", s.trainable)
        for i, part in enumerate(s.trainable):
            _require(part in allowed, f"{p}.trainable[{i}]", f"one of {allowed}", part)
    _require(moe.num_experts >= 1, "moe.num_experts", "an integer >= 1", moe.num_experts)
    _require(
        1 <= moe.top_k <= moe.num_experts,
        "moe.top_k",
        f"an integer in [1, moe.num_experts={moe.num_experts}]",
        moe.top_k,
    )
    if moe.ltdr_tail_top_k is not None:
        _require(
            moe.top_k <= moe.ltdr_tail_top_k <= moe.num_experts,
            "moe.ltdr_tail_top_k",
            f"null or an integer in [moe.top_k={moe.top_k}, moe.num_experts={moe.num_experts}]",
            moe.ltdr_tail_top_k,
        )
    _require(moe.balance_coef >= 0, "moe.balance_coef", "a number >= 0", moe.balance_coef)
    _require(moe.stgc_weight >= 0, "moe.stgc_weight", "a number >= 0", moe.stgc_weight)
    _require(
        moe.layers in ("alternate", "all") or all(p.strip().isdigit() for p in moe.layers.split(",")),
        "moe.layers",
        "'alternate', 'all' or comma-separated layer indices",
        moe.layers,
    )
    _require(cfg.eval.batch_size >= 1, "eval.batch_size", "an integer >= 1", cfg.eval.batch_size)
    _require(cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens", "an integer >= 1", cfg.eval.max_new_tokens)
    _require(
        len(cfg.compare.methods) > 0, "compare.methods", f"a non-empty list of {METHODS}", cfg.compare.methods
    )
    for i, meth in enumerate(cfg.compare.methods):
        _require(meth in METHODS, f"compare.methods[{i}]", f"one of {METHODS}", meth)
    _require(cfg.compare.seeds >= 1, "compare.seeds", "an integer >= 1", cfg.compare.seeds)
    return cfg


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"stage2.max_steps=50"`` -> (["stage2", "max_steps"], 50); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from e
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for p in path[:-1]:
            child = node.get(p)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a section")
            node[p] = child = dict(child)
            node = child
        node[path[-1]] = value
    return data


def config_from_dict(data: dict | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    data = apply_overrides(data, list(overrides))
    return validate(_build(RunConfig, data))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The recipe from a YAML file (None: the built-in defaults), with ``overrides`` applied."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    return config_from_dict(data, overrides)


def config_to_dict(cfg: Any) -> dict:
    """Plain data (tuples as lists) for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        return v

    return plain(cfg)
