import pytest

from moevl.vlm.config import ConfigError, RunConfig, config_from_dict, load_config


def test_defaults_and_yaml_files_load():
    assert load_config(None) == RunConfig()
    assert load_config("configs/compare.yaml") == RunConfig()
    tiny = load_config("configs/tiny.yaml", ["stage2.max_steps=7"])
    assert tiny.stage2.max_steps == 7 and tiny.data.grid == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage2.max_step=3"], "unknown config key 'stage2.max_step'"),
        (["modle.patch_size=4"], "unknown config key 'modle'"),
        (["stage2.max_steps=abc"], "'stage2.max_steps': expected int, got str 'abc'"),
        (["moe.top_k=5"], "'moe.top_k': expected an integer in [1, moe.num_experts=4], got 5"),
        (["data.grid=5"], "'data.grid': expected 2 or 3, got 5"),
        (["moe.stgc_scope=some"], "'moe.stgc_scope': expected one of 'all', 'last', 'delta'"),
        (["data.split_fractions=[0.5,0.5,0.5]"], "'data.split_fractions': expected three positive fractions"),
        (["compare.methods=[moe]"], "'compare.methods[0]'"),
        (["stage1.trainable=[decoder]"], "'stage1.trainable[0]'"),
        (["stage2.trainable=[experts]"], "'stage2.trainable[0]'"),
        (["data.family_weights=[1,2]"], "'data.family_weights'"),
        (["data.palette=[5,2]"], "'data.palette'"),
    ],
)
def test_bad_values_name_key_expected_and_given(overrides, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({}, overrides)
    assert message in str(err.value)


def test_stage3_trains_experts_and_routers_only_by_default():
    cfg = load_config("configs/compare.yaml")
    assert cfg.stage3.trainable == ("experts", "routers")
    assert (
        config_from_dict({}, ["stage3.trainable=[experts,routers,projector]"]).stage3.trainable[-1]
        == "projector"
    )


def test_float_written_without_dot_is_accepted():
    assert config_from_dict({"stage1": {"learning_rate": "1e-3"}}).stage1.learning_rate == 1e-3


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("configs/nope.yaml")
