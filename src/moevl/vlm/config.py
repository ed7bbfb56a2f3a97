"""The recipe of ``moevl train`` / ``eval`` / ``compare`` (YAML; every default in ``configs/train.yaml``).

Sections:

* ``model``, ``data``: the checkpoint and the LLaVA-format (or messages-format) files.
* ``training``: passed to ``transformers.TrainingArguments`` as it is (precision, gradient checkpointing,
  batch size, accumulation, schedule, ``deepspeed``, ``report_to``, ...); ``stage1/2/3.training`` override
  it per stage, beside the stage's ``trainable`` parts and its own ``data`` file. Each stage's built-in
  learning rate (``STAGE_LEARNING_RATES``) lies beneath both: ``training.learning_rate`` replaces it in every
  stage. Values are checked against ``TrainingArguments``' field types and the ranges of the usual keys.
* ``moe``: the one MoE settings object (``moevl.hf.MoESettings``) handed to ``upcycle``/``adopt`` and saved
  with the checkpoint; ``method`` is a named preset over it (``stgc`` turns ``moe.stgc`` on, ``ltdr`` turns
  ``moe.ltdr`` on).
* ``eval``, ``compare``, ``demo``: evaluation, the comparison and the embedded digit benchmark.

``load_config`` validates while it builds (``moevl.config``): an unknown key, a wrong type, a non-finite
number or an impossible value raises ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moevl.checks import check
from moevl.config import ConfigError, apply_overrides, build, read_yaml
from moevl.data.digits import BenchmarkConfig
from moevl.data.scenes import FAMILIES
from moevl.hf.settings import MoESettings
from moevl.moe import LTDRConfig
from moevl.stgc import STGCConfig
from moevl.vlm.checkpoint import TinyModelConfig

METHODS = ("baseline", "stgc", "ltdr", "stgc+ltdr")
DENSE_PARTS = ("vision_tower", "projector", "language_model")
MOE_PARTS = ("experts", "routers")

# Keys of ``training:`` that moevl sets itself, and where the user sets them instead.
_RESERVED_TRAINING_KEYS = {
    "output_dir": "--out",
    "resume_from_checkpoint": "--resume",
    "do_train": None,
    "do_eval": None,
    "do_predict": None,
    "seed": "the top-level `seed`",
    "data_seed": "the top-level `seed`",
    "disable_tqdm": "--no-progress",
    "remove_unused_columns": None,
}

#: MoE-LLaVA's learning rate per stage (scripts/v1/*/pretrain.sh, finetune.sh, finetune_moe.sh): beneath the
#: recipe's ``training:``, so that ``training.learning_rate`` sets every stage's.
STAGE_LEARNING_RATES = {1: 1e-3, 2: 2e-5, 3: 2e-5}


@dataclass(frozen=True)
class DataSection:
    """The user's data. Every field is a YAML key under ``data:``."""

    train: str | None = (
        None  # LLaVA-format JSON/JSONL, messages-format json/jsonl/parquet, or save_to_disk dir
    )
    image_folder: str | None = None  # root of the records' relative image paths
    chat_template: str | None = None  # a Jinja file overriding the checkpoint's chat template
    max_length: int | None = None  # longer records are dropped and counted (None: the model's limit)
    skip_bad_records: bool = False  # False: a bad record stops the run, naming its id and file


@dataclass(frozen=True)
class StageSection:
    """One training stage: what trains, on which data, with which ``TrainingArguments`` overrides."""

    trainable: tuple[str, ...] = DENSE_PARTS
    data: str | None = None  # this stage's training file (None: data.train)
    training: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalSection:
    data: str | None = None  # evaluation file (None: the --data of `moevl eval`)
    batch_size: int = 16
    max_new_tokens: int = 16


@dataclass(frozen=True)
class DemoSection:
    """The embedded digit benchmark and the tiny checkpoint ``moevl compare`` builds."""

    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    model: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass(frozen=True)
class CompareSection:
    methods: tuple[str, ...] = METHODS
    seeds: int = 1
    split: Literal["validation", "test"] = "test"  # where the report's accuracies come from


def _default_training() -> dict[str, Any]:
    # MoE-LLaVA's recipe (scripts/v1/*/finetune_moe.sh): cosine schedule, 3% warmup, one epoch, no weight
    # decay. Precision, batch size and accumulation depend on the hardware: set them in your YAML.
    return {
        "num_train_epochs": 1,
        "per_device_train_batch_size": 16,
        "gradient_accumulation_steps": 1,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,
        "weight_decay": 0.0,
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": 500,
        "save_total_limit": 2,
        "report_to": ["tensorboard"],
        "dataloader_num_workers": 0,
    }


def _default_moe() -> MoESettings:
    # MoE-LLaVA stage 3: every other layer, E=4, top-2, balancing 0.01; the STGC and LTDR options the
    # presets switch on.
    return MoESettings(
        num_experts=4, top_k=2, layers="alternate", balance_coef=0.01, stgc=STGCConfig(), ltdr=LTDRConfig()
    )


@dataclass(frozen=True)
class RunConfig:
    """The whole recipe; the defaults are ``moevl train``'s (``configs/train.yaml``)."""

    seed: int = 0
    # torch intra-op threads per process (0: torch's default).
    threads: int = 0
    model: str | None = None  # a local checkpoint directory (or a hub id already in the local cache)
    method: str = "baseline"  # stage 3 preset, one of METHODS
    # Measure token-gradient conflicts (STGC with weight 0) for methods without STGC, so that reports can
    # compare conflict ratios across methods. Adds the measurement's cost to their step time.
    monitor_conflicts: bool = True
    data: DataSection = field(default_factory=DataSection)
    training: dict[str, Any] = field(default_factory=_default_training)
    stage1: StageSection = field(default_factory=lambda: StageSection(trainable=("projector",)))
    stage2: StageSection = field(
        default_factory=lambda: StageSection(trainable=("projector", "language_model"))
    )
    stage3: StageSection = field(default_factory=lambda: StageSection(trainable=MOE_PARTS))
    moe: MoESettings = field(default_factory=_default_moe)
    eval: EvalSection = field(default_factory=EvalSection)
    compare: CompareSection = field(default_factory=CompareSection)
    demo: DemoSection = field(default_factory=DemoSection)

    def stage(self, n: int) -> StageSection:
        if n not in (1, 2, 3):
            raise ConfigError(f"stage must be 1, 2 or 3, got {n!r}")
        return (self.stage1, self.stage2, self.stage3)[n - 1]

    def training_arguments(self, n: int) -> dict[str, Any]:
        """``TrainingArguments`` keywords of stage ``n``: the stage's built-in learning rate, ``training`` over
        it, ``stage{n}.training`` over both."""
        stage = self.stage(n)
        return {"learning_rate": STAGE_LEARNING_RATES[n], **self.training, **stage.training}

    def moe_settings(self, method: str | None = None) -> MoESettings:
        """The MoE settings of a method preset (default: ``self.method``)."""
        return method_settings(self.moe, method or self.method, monitor_conflicts=self.monitor_conflicts)


def method_settings(moe: MoESettings, method: str, *, monitor_conflicts: bool = False) -> MoESettings:
    """A named preset over the MoE settings: ``stgc`` and ``ltdr`` switch ``moe.stgc`` / ``moe.ltdr`` on
    (their options, or the defaults); the others are off. ``monitor_conflicts`` keeps STGC's measurement
    with weight 0 when STGC is off."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    stgc_options = moe.stgc or STGCConfig()
    if "stgc" in method:
        stgc = stgc_options
    elif monitor_conflicts:
        stgc = dataclasses.replace(stgc_options, weight=0.0)
    else:
        stgc = None
    ltdr = (moe.ltdr or LTDRConfig()) if "ltdr" in method else None
    return dataclasses.replace(moe, stgc=stgc, ltdr=ltdr)


# --- checks types cannot express ------------------------------------------------------------------------


#: Ranges of the usual ``TrainingArguments`` keys (their types are checked from the dataclass itself).
_TRAINING_RANGES: dict[str, tuple[Any, str]] = {
    "learning_rate": (lambda v: v >= 0, "a number >= 0"),
    "num_train_epochs": (lambda v: v > 0, "a number > 0"),
    "max_steps": (lambda v: v == -1 or v >= 1, "-1 (use num_train_epochs) or an integer >= 1"),
    "per_device_train_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "per_device_eval_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, "an integer >= 1"),
    "warmup_steps": (lambda v: v >= 0, "a number >= 0 (below 1: a fraction of the steps)"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "adam_epsilon": (lambda v: v >= 0, "a number >= 0"),
    "max_grad_norm": (lambda v: v >= 0, "a number >= 0 (0: no clipping)"),
    "logging_steps": (lambda v: v > 0, "a number > 0 (below 1: a fraction of the steps)"),
    "save_steps": (lambda v: v > 0, "a number > 0 (below 1: a fraction of the steps)"),
    "eval_steps": (lambda v: v is None or v > 0, "null or a number > 0"),
    "save_total_limit": (lambda v: v is None or v >= 1, "null or an integer >= 1"),
    "dataloader_num_workers": (lambda v: v >= 0, "an integer >= 0"),
}


def _plain_type(tp: Any) -> Any:
    """``tp`` when it is built of int, float, bool and None only (what ``build``'s checks handle), else None."""
    import types
    import typing

    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        return tp if all(_plain_type(a) is not None for a in args) else None
    return tp if tp in (int, float, bool, type(None)) else None


def _check_training(training: dict[str, Any], key: str) -> None:
    """Keys, types and ranges of a ``training:`` section, so that a bad value stops before anything runs."""
    import typing

    from transformers import TrainingArguments

    from moevl.config import convert

    hints = typing.get_type_hints(TrainingArguments)
    for k, v in training.items():
        if k in _RESERVED_TRAINING_KEYS:
            where = _RESERVED_TRAINING_KEYS[k]
            instead = f"; use {where}" if where else ""
            raise ConfigError(f"config key '{key}.{k}': set by moevl, not in the recipe{instead}")
        if k not in hints:
            close = difflib.get_close_matches(k, sorted(hints), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown config key '{key}.{k}': not a transformers.TrainingArguments field{hint}"
            )
        tp = _plain_type(hints[k])
        if tp is None:
            continue
        value = convert(v, tp, f"{key}.{k}")
        if k in _TRAINING_RANGES:
            ok, expected = _TRAINING_RANGES[k]
            _check(ok(value), f"{key}.{k}", expected, v)


def _check(ok: bool, key: str, what: str, given: Any) -> None:
    """``moevl.checks.check`` for a recipe key: ``ConfigError("config key '<key>' must be ..., got ...")``."""
    check(ok, f"config key '{key}'", what, given, error=ConfigError)


def validate(cfg: RunConfig) -> RunConfig:
    """Ranges and relations between keys (types are checked while building)."""
    _check(cfg.threads >= 0, "threads", "an integer >= 0 (0: torch's default)", cfg.threads)
    _check(cfg.seed >= 0, "seed", "an integer >= 0", cfg.seed)
    _check(cfg.method in METHODS, "method", f"one of {', '.join(METHODS)}", cfg.method)
    if cfg.data.max_length is not None:
        _check(cfg.data.max_length >= 1, "data.max_length", "null or an integer >= 1", cfg.data.max_length)
    _check_training(cfg.training, "training")
    for n in (1, 2, 3):
        s, p = cfg.stage(n), f"stage{n}"
        allowed = DENSE_PARTS if n < 3 else MOE_PARTS + DENSE_PARTS
        _check(len(s.trainable) > 0, f"{p}.trainable", f"a non-empty list of {allowed}", s.trainable)
        for i, part in enumerate(s.trainable):
            _check(part in allowed, f"{p}.trainable[{i}]", f"one of {allowed}", part)
        _check_training(s.training, f"{p}.training")
    _check(cfg.eval.batch_size >= 1, "eval.batch_size", "an integer >= 1", cfg.eval.batch_size)
    _check(cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens", "an integer >= 1", cfg.eval.max_new_tokens)
    c = cfg.compare
    _check(len(c.methods) > 0, "compare.methods", f"a non-empty list of {METHODS}", c.methods)
    for i, m in enumerate(c.methods):
        _check(m in METHODS, f"compare.methods[{i}]", f"one of {METHODS}", m)
    _check(
        len(set(c.methods)) == len(c.methods),
        "compare.methods",
        "a list with each method at most once",
        list(c.methods),
    )
    _check(c.seeds >= 1, "compare.seeds", "an integer >= 1", c.seeds)
    _validate_benchmark(cfg.demo.benchmark, "demo.benchmark")
    return cfg


def _validate_benchmark(d: BenchmarkConfig, p: str) -> None:
    _check(d.source in ("digits", "fashion-mnist"), f"{p}.source", "'digits' or 'fashion-mnist'", d.source)
    _check(d.grid in (2, 3), f"{p}.grid", "2 or 3", d.grid)
    _check(0.0 <= d.empty_prob < 1.0, f"{p}.empty_prob", "a probability in [0, 1)", d.empty_prob)
    _check(0.0 <= d.inverted_share <= 1.0, f"{p}.inverted_share", "a share in [0, 1]", d.inverted_share)
    _check(0.0 <= d.negated_share <= 1.0, f"{p}.negated_share", "a share in [0, 1]", d.negated_share)
    _check(len(d.families) > 0, f"{p}.families", f"a non-empty list of {FAMILIES}", d.families)
    for i, f in enumerate(d.families):
        _check(f in FAMILIES, f"{p}.families[{i}]", f"one of {FAMILIES}", f)
    lo, hi = d.palette
    _check(1 <= lo <= hi <= 10, f"{p}.palette", "[lo, hi] with 1 <= lo <= hi <= 10", list(d.palette))
    if d.family_weights:
        _check(
            len(d.family_weights) == len(FAMILIES) and all(w >= 1 for w in d.family_weights),
            f"{p}.family_weights",
            f"empty, or one integer >= 1 per family of {FAMILIES}",
            list(d.family_weights),
        )
    fr = d.split_fractions
    _check(
        all(x > 0 for x in fr) and abs(sum(fr) - 1.0) < 1e-6,
        f"{p}.split_fractions",
        "three positive fractions summing to 1",
        list(fr),
    )
    for k in ("train_scenes", "validation_scenes", "test_scenes", "questions_per_scene", "caption_scenes"):
        _check(getattr(d, k) >= 1, f"{p}.{k}", "an integer >= 1", getattr(d, k))


def config_from_dict(data: dict | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"the config's top level must be a mapping, got {type(data).__name__}")
    return validate(build(RunConfig, apply_overrides(data, list(overrides))))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The recipe from a YAML file (None: the built-in defaults), with ``overrides`` applied."""
    data = read_yaml(path) if path is not None else {}
    return config_from_dict(data, overrides)
