import dataclasses
import json
import math
import re

import pytest
import torch

from moevl.hf import MoESettings, moe_state, upcycle
from moevl.hf.settings import FIELD_KINDS, RECONFIGURABLE_FIELDS, STRUCTURAL_FIELDS, FixedSettingError
from moevl.moe import LoRAConfig, LTDRConfig, LTDRRouter, TopKRouter
from moevl.stgc import STGCConfig
from tests.fixtures.tiny import causal_lm

FULL = MoESettings(
    num_experts=6,
    top_k=2,
    layers=[3, 1],
    stgc=STGCConfig(threshold=-0.1, weight=0.3, scope="last", min_tokens=3),
    ltdr=LTDRConfig(tail_top_k=4, language_only_balance=False),
    balance_coef=0.02,
    z_loss_coef=1e-3,
    balance_from="topk",
    capacity_factor=1.5,
    jitter=0.1,
)


@pytest.mark.parametrize("settings", [MoESettings(), MoESettings(num_experts=4, top_k=1, layers="all"), FULL])
def test_to_dict_is_json_and_round_trips_exactly(settings):
    text = json.dumps(settings.to_dict(), allow_nan=False)
    back = MoESettings.from_dict(json.loads(text))
    assert back == settings
    assert back.to_dict() == settings.to_dict()


def test_layers_are_normalised_and_router_follows_ltdr():
    assert FULL.layers == (1, 3)
    assert FULL.router == "ltdr" and MoESettings().router == "topk"


def test_reads_the_dict_older_versions_stored():
    old = {  # what older moevl versions stored, before the STGC weight modes
        "num_experts": 4,
        "top_k": 2,
        "layers": [0, 2],
        "router": "ltdr",
        "ltdr": {"tail_top_k": None, "language_only_balance": True, "vision_tail": True},
        "stgc": {"threshold": 0.0, "weight": 0.5, "scope": "all", "min_tokens": 2},
        "balance_coef": 0.01,
        "z_loss_coef": 0.0,
        "balance_from": "top1",
        "capacity_factor": None,
        "jitter": 0.0,
    }
    s = MoESettings.from_dict(old)
    assert s.ltdr == LTDRConfig() and s.stgc == STGCConfig.paper() and s.layers == (0, 2)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"colour": 1}, "colour"),
        ({"stgc": {"weight": 0.5, "colour": 1}}, "stgc.colour"),
        ({"ltdr": {"tail": 3}}, "ltdr.tail"),
        ({"num_experts": "4"}, "num_experts"),
        ({"num_experts": 4.0}, "num_experts"),
        ({"num_experts": True}, "num_experts"),
        ({"top_k": 5}, "top_k"),
        ({"layers": [1.7]}, "layers"),
        ({"layers": [True]}, "layers"),
        ({"layers": [1, 1]}, "layers"),
        ({"layers": []}, "layers"),
        ({"layers": "every"}, "layers"),
        ({"balance_coef": -0.1}, "balance_coef"),
        ({"balance_coef": math.nan}, "balance_coef"),
        ({"z_loss_coef": math.inf}, "z_loss_coef"),
        ({"balance_from": "top2"}, "balance_from"),
        ({"capacity_factor": 0}, "capacity_factor"),
        ({"jitter": 1.0}, "jitter"),
        ({"stgc": {"weight": math.nan}}, "stgc.weight"),
        ({"stgc": {"weight": math.inf}}, "stgc.weight"),
        ({"stgc": {"min_tokens": True}}, "stgc.min_tokens"),
        ({"ltdr": {"tail_top_k": 1}}, "tail_top_k"),  # below top_k
        ({"ltdr": {"tail_top_k": 9}}, "tail_top_k"),  # above num_experts
        ({"ltdr": {"vision_tail": 1}}, "vision_tail"),
        ({"router": "ltdr"}, "router"),  # says ltdr, has no ltdr options
        ({"router": "hash"}, "router"),
        ({"stgc": 0.5}, "stgc"),
    ],
)
def test_from_dict_names_the_bad_key(change, key):
    d = {**MoESettings(num_experts=4, top_k=2).to_dict(), **change}
    if "router" not in change:
        d.pop("router")
    with pytest.raises(ValueError, match=key.replace(".", r"\.").replace("[", r"\[")):
        MoESettings.from_dict(d)


def test_non_finite_numbers_are_refused_by_every_constructor():
    with pytest.raises(ValueError, match=r"stgc\.weight"):
        MoESettings(stgc=STGCConfig(weight=math.nan))
    with pytest.raises(ValueError, match="tail_top_k"):
        LTDRConfig(tail_top_k=True)
    for kwargs, key in [
        ({"routed_scaling_factor": math.nan}, "routed_scaling_factor"),
        ({"capacity_factor": math.inf}, "capacity_factor"),
        ({"jitter": math.nan}, "jitter"),
        ({"top_k": 2.0}, "top_k"),
        ({"num_experts": True}, "num_experts"),
    ]:
        with pytest.raises(ValueError, match=key):
            TopKRouter(**{"hidden_size": 8, "num_experts": 4, "top_k": 2, **kwargs})
    with pytest.raises(ValueError, match="tail_top_k"):
        LTDRRouter(hidden_size=8, num_experts=4, top_k=2, tail_top_k=2.5)


def test_keywords_router_shortcut_and_errors():
    assert MoESettings.from_keywords(router="ltdr").ltdr == LTDRConfig()
    assert MoESettings.from_keywords(router="topk").ltdr is None
    with pytest.raises(ValueError, match="router is 'topk'"):
        MoESettings.from_keywords(router="topk", ltdr=LTDRConfig())
    with pytest.raises(TypeError, match="colour"):
        MoESettings.from_keywords(colour=1)


def test_upcycle_takes_settings_or_keywords_with_the_same_result():
    ids = torch.randint(1, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    settings = dataclasses.replace(FULL, jitter=0.0, capacity_factor=None)
    a = upcycle(causal_lm("llama"), settings)
    kw = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    b = upcycle(causal_lm("llama"), **kw)
    assert moe_state(a).settings == moe_state(b).settings == settings
    assert a.config.moevl == settings.to_dict()
    for block_a, block_b in zip(a.model.layers, b.model.layers, strict=True):
        block_b.mlp.load_state_dict(block_a.mlp.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not both"):
        upcycle(causal_lm("llama"), settings, top_k=1)
    with pytest.raises(ValueError, match="num_experts and top_k"):
        upcycle(causal_lm("llama"), MoESettings(top_k=1))


def test_upcycle_stores_resolved_settings():
    model = upcycle(causal_lm("llama"), MoESettings(num_experts=4, top_k=2))
    assert moe_state(model).settings.layers == (0, 2)  # "alternate" over 4 layers
    assert moe_state(model).settings.balance_coef == 0.01  # an upcycled model has no loss of its own
    assert MoESettings.from_dict(model.config.moevl) == moe_state(model).settings


def test_every_field_has_one_kind():
    assert set(FIELD_KINDS) == {f.name for f in dataclasses.fields(MoESettings)}
    assert set(FIELD_KINDS.values()) <= {"structural", "inference", "training"}
    # what the weights of a sparse model fix: its experts, its layers, its top-k, its choice bias, its adapters'
    # tensors
    assert STRUCTURAL_FIELDS == ("num_experts", "top_k", "layers", "bias_update_rate", "lora")
    assert set(RECONFIGURABLE_FIELDS) == set(FIELD_KINDS) - set(STRUCTURAL_FIELDS)
    assert {k for k, kind in FIELD_KINDS.items() if kind == "inference"} == {"ltdr", "capacity_factor"}


def test_reconfigure_changes_what_the_weights_leave_free():
    stored = dataclasses.replace(FULL, layers=(1, 3))
    changed = stored.reconfigure(
        {"stgc": None, "router": "topk", "z_loss_coef": 0.5, "capacity_factor": None, "jitter": 0.0}
    )
    assert changed.stgc is None and changed.ltdr is None and changed.router == "topk"
    assert (changed.z_loss_coef, changed.capacity_factor, changed.jitter) == (0.5, None, 0.0)
    # untouched fields stay; a structural field given with the value it has is no change (a rule or indices)
    assert changed.balance_coef == 0.02 and changed.layers == (1, 3) and changed.num_experts == 6
    same = stored.reconfigure({"num_experts": 6, "layers": [3, 1], "top_k": None}, num_layers=4)
    assert same == stored
    assert FULL.reconfigure({"lora": None}).lora is None  # None: as it is
    assert stored.reconfigure({"router": "ltdr"}).ltdr == stored.ltdr  # the shortcut keeps given options
    assert stored.reconfigure({}) == stored


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_experts": 8}, "num_experts=8 (the model has 6)"),
        ({"top_k": 1}, "top_k=1 (the model has 2)"),
        ({"layers": "alternate"}, "layers='alternate' (the model has (1, 3))"),
        ({"lora": LoRAConfig(r=4)}, "lora=LoRAConfig(r=4"),
    ],
)
def test_reconfigure_refuses_every_structural_change_by_name(change, message):
    stored = dataclasses.replace(FULL, layers=(1, 3))
    with pytest.raises(FixedSettingError, match=re.escape(message)) as info:
        stored.reconfigure(change, num_layers=4)
    assert list(info.value.fixed) == list(change) and "fixed by the model's weights" in str(info.value)
    with pytest.raises(TypeError, match="unknown MoE setting"):
        stored.reconfigure({"experts": 8})


def test_every_path_refuses_the_same_structural_changes(tmp_path):
    from moevl.checkpoint import load_moe_model, save_moe_model

    model = upcycle(causal_lm("llama"), num_experts=4, top_k=2)
    save_moe_model(model, tmp_path)
    for name, value in (("num_experts", 8), ("top_k", 1), ("layers", "all")):
        with pytest.raises(
            ValueError, match=f"{name}={value!r} \\(the checkpoint has .*fixed by the checkpoint"
        ):
            load_moe_model(tmp_path, **{name: value})
    loaded = load_moe_model(tmp_path, top_k=2, stgc=STGCConfig(), capacity_factor=2.0)  # free, or unchanged
    assert moe_state(loaded).settings == dataclasses.replace(
        moe_state(model).settings, stgc=STGCConfig(), capacity_factor=2.0
    )
