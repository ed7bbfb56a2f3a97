import dataclasses
from pathlib import Path

import pytest

from moevl.config import ConfigError
from moevl.stgc import STGCConfig
from moevl.vlm.config import METHODS, RunConfig, config_from_dict, load_config, method_settings

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_file_equals_builtin_defaults():
    assert load_config(ROOT / "configs" / "train.yaml") == load_config(None) == RunConfig()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage2.trainabel=[projector]"], "unknown config key 'stage2.trainabel'"),
        (["modle=x"], "unknown config key 'modle'"),
        (["seed=abc"], "'seed' must be int, got str 'abc'"),
        (["moe.top_k=5"], "top_k must be an integer >= 1 and <= num_experts (4), got 5"),
        # the key the user changed is named too (it said "top_k must be ... <= 1, got 2")
        (
            ["moe.num_experts=1"],
            "config section 'moe': top_k must be an integer >= 1 and <= num_experts (1), got 2",
        ),
        (["moe.stgc.scope=some"], "'moe.stgc.scope' must be one of 'all', 'last', 'delta'"),
        (["moe.stgc.weight=.inf"], "'moe.stgc.weight' must be a finite number, got float inf"),
        (["moe.balance_coef=.nan"], "'moe.balance_coef'"),
        (["moe.balance_coef=-1"], "balance_coef must be a finite number >= 0.0, got -1.0"),
        (["moe.layers=[1.7]"], "'moe.layers[0]' must be int, got float 1.7"),
        (["moe.layers=[true]"], "'moe.layers[0]' must be int, got bool True"),
        (["compare.methods=[moe]"], "'compare.methods[0]'"),
        (
            ["compare.methods=[baseline,baseline]"],
            "'compare.methods' must be a list with each method at most once",
        ),
        (["stage1.trainable=[decoder]"], "'stage1.trainable[0]'"),
        (["stage2.trainable=[experts]"], "'stage2.trainable[0]'"),
        (["training.learning_rat=1"], "did you mean learning_rate?"),
        (["training.output_dir=x"], "'training.output_dir': set by moevl"),
        (["training.learning_rate=.nan"], "'training.learning_rate' must be a finite number"),
        (["stage3.training.warmup_steps=.inf"], "'stage3.training.warmup_steps'"),
        (["method=moe"], "'method' must be one of baseline, stgc, ltdr, stgc+ltdr"),
        (["seed=-1"], "'seed' must be an integer >= 0, got -1"),
        (["moe.ltdr.tail_top_k=1"], "ltdr.tail_top_k must be in [top_k=2, num_experts=4], got 1"),
        # training values: types from TrainingArguments' own fields, ranges of the usual keys
        (["stage3.training.learning_rate=inf"], "'stage3.training.learning_rate' must be a finite number"),
        (["training.max_grad_norm=nan"], "'training.max_grad_norm' must be a finite number, got str 'nan'"),
        (["training.adam_beta1=nan"], "'training.adam_beta1' must be a finite number"),
        (["training.adam_beta1=1.5"], "'training.adam_beta1' must be a number in [0, 1), got 1.5"),
        (["training.num_train_epochs=nan"], "'training.num_train_epochs' must be a finite number"),
        (["training.warmup_steps=nan"], "'training.warmup_steps' must be a finite number"),
        (
            ["training.per_device_train_batch_size=0"],
            "'training.per_device_train_batch_size' must be an integer >= 1, got 0",
        ),
        (
            ["training.per_device_train_batch_size=2.5"],
            "'training.per_device_train_batch_size' must be int, got float 2.5",
        ),
        (
            ["stage3.training.learning_rate=-1"],
            "'stage3.training.learning_rate' must be a number >= 0, got -1",
        ),
        (
            ["training.max_steps=0"],
            "'training.max_steps' must be -1 (use num_train_epochs) or an integer >= 1",
        ),
        (["training.bf16=yes please"], "'training.bf16' must be bool"),
        (["training.seed=nan"], "'training.seed': set by moevl, not in the recipe; use the top-level `seed`"),
        (
            ["training.disable_tqdm=true"],
            "'training.disable_tqdm': set by moevl, not in the recipe; use --no-progress",
        ),
    ],
)
def test_bad_values_name_key_expected_and_given(overrides, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({}, overrides)
    assert message in str(err.value)


def test_sections_merge_key_by_key():
    cfg = config_from_dict(
        {"training": {"bf16": True}, "moe": {"stgc": {"weight": 0.2}}},
        ["moe.layers=[0,2]", "stage3.training.learning_rate=1e-4"],
    )
    assert cfg.training["bf16"] is True and cfg.training["lr_scheduler_type"] == "cosine"
    assert cfg.moe.stgc == STGCConfig(weight=0.2) and cfg.moe.layers == (0, 2)
    assert cfg.training_arguments(3)["learning_rate"] == 1e-4
    assert cfg.training_arguments(2)["learning_rate"] == 2e-5


def test_training_learning_rate_sets_every_stage_unless_a_stage_sets_its_own(tmp_path):
    builtin = RunConfig()
    assert [builtin.training_arguments(n)["learning_rate"] for n in (1, 2, 3)] == [1e-3, 2e-5, 2e-5]
    cfg = config_from_dict({}, ["training.learning_rate=1e-3", "stage2.training.learning_rate=5e-4"])
    assert [cfg.training_arguments(n)["learning_rate"] for n in (1, 2, 3)] == [1e-3, 5e-4, 1e-3]
    from moevl.vlm.train import training_arguments  # what the Trainer gets

    assert training_arguments(cfg, 3, tmp_path, seed=0, progress=False).learning_rate == 1e-3
    from_file = config_from_dict({"training": {"learning_rate": "1e-4"}})  # a quoted exponent is a number
    assert from_file.training_arguments(3)["learning_rate"] == 1e-4


def test_nan_in_a_config_file_is_refused(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    for value in ("nan", "'inf'", ".nan"):
        recipe.write_text(f"training:\n  learning_rate: {value}\n")
        with pytest.raises(ConfigError, match=r"'training.learning_rate' must be a finite number"):
            load_config(recipe)


def test_float_written_without_dot_is_accepted():
    assert config_from_dict({"moe": {"jitter": "1e-3"}}).moe.jitter == 1e-3


def test_duplicate_key_and_missing_file(tmp_path):
    bad = tmp_path / "dup.yaml"
    bad.write_text("seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match="duplicate key 'seed' at line 2"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("method", METHODS)
def test_method_presets_switch_stgc_and_ltdr(method):
    moe = RunConfig().moe
    s = method_settings(moe, method, monitor_conflicts=False)
    assert (s.stgc is not None) == ("stgc" in method)
    assert (s.ltdr is not None) == ("ltdr" in method)
    monitored = method_settings(moe, method, monitor_conflicts=True)
    assert monitored.stgc is not None
    assert monitored.stgc.weight == (moe.stgc.weight if "stgc" in method else 0.0)
    # everything but STGC / LTDR is the recipe's
    for f in ("num_experts", "top_k", "layers", "balance_coef"):
        assert getattr(s, f) == getattr(moe, f)
    assert dataclasses.replace(s, stgc=moe.stgc, ltdr=moe.ltdr) == moe


def test_demo_file_equals_the_builtin_demo_recipe():
    from moevl.vlm.compare import demo_config

    demo = demo_config(None)
    assert demo_config(ROOT / "configs" / "demo.yaml") == demo
    # the demo is the train defaults with the demo's schedule: stage 3 is still experts and routers
    assert demo.stage3.trainable == ("experts", "routers") and demo.moe == RunConfig().moe
    tiny = demo_config(ROOT / "configs" / "tiny.yaml", ["stage2.training.max_steps=7"])
    assert tiny.training_arguments(2)["max_steps"] == 7 and tiny.demo.benchmark.grid == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["demo.benchmark.grid=5"], "'demo.benchmark.grid' must be 2 or 3, got 5"),
        (["demo.benchmark.split_fractions=[0.5,0.5,0.5]"], "three positive fractions summing to 1"),
        (["demo.benchmark.palette=[5,2]"], "'demo.benchmark.palette'"),
        (
            ["demo.model.text_hidden_size=30"],
            "text_hidden_size must be a positive multiple of text_heads (4)",
        ),
    ],
)
def test_bad_demo_values(overrides, message):
    from moevl.vlm.compare import demo_config

    with pytest.raises(ConfigError) as err:
        demo_config(None, overrides)
    assert message in str(err.value)
