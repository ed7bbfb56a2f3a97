"""moevl.config, the one recipe builder of the VLM and detection sides: unit cases, then property tests
(hypothesis): any key, any type, any number (NaN, infinities, huge, negative) gives either a valid object
or a ``ConfigError`` naming the key, never another exception (issue 12)."""

from __future__ import annotations

import contextlib
import copy
import math
import tempfile
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moevl.config import ConfigError, apply_overrides, build, read_yaml, to_plain
from moevl.detection.model import DetectorConfig
from moevl.detection.recipe import DetectionCompareConfig, DetectionDataConfig, load_detection_config

# --- a representative recipe: every kind of annotation the builder supports -------------------------


@dataclass(frozen=True)
class Section:
    width: int = 4
    rate: float = 0.5
    name: str = "a"
    kind: Literal["x", "y", 3] = "x"
    flag: bool = False
    sizes: tuple[int, ...] = (1, 2)
    pair: tuple[float, float] = (0.0, 1.0)
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"width must be an integer >= 1, got {self.width}")


@dataclass(frozen=True)
class Recipe:
    section: Section = field(default_factory=Section)
    maybe: Section | None = None
    extra: dict[str, Any] = field(default_factory=lambda: {"keep": 1})
    steps: int = 10
    lr: float = 1e-3
    tags: list[str] = field(default_factory=list)
    anything: Any = None


def test_sections_merge_onto_defaults_and_convert():
    got = build(Recipe, {"section": {"rate": 2, "sizes": [3]}, "extra": {"new": [1.5]}, "lr": "1e-4"})
    assert got.section == Section(rate=2.0, sizes=(3,))
    assert isinstance(got.section.rate, float) and got.lr == 1e-4
    assert got.extra == {"keep": 1, "new": [1.5]}
    assert build(Recipe, to_plain(got)) == got
    assert build(Recipe, {"maybe": {"width": 2}}).maybe == Section(width=2)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stepz": 1}, "unknown config key 'stepz'"),
        ({"section": {"wdth": 1}}, "unknown config key 'section.wdth'"),
        ({"steps": True}, "config key 'steps' must be int"),
        ({"steps": 1.0}, "config key 'steps'"),
        ({"lr": math.nan}, "config key 'lr' must be a finite number"),
        ({"lr": -math.inf}, "config key 'lr'"),
        ({"lr": 10**400}, "config key 'lr'"),
        ({"lr": "1e999"}, "config key 'lr'"),
        ({"section": {"kind": True}}, "config key 'section.kind'"),
        ({"section": {"pair": [1.0]}}, "config key 'section.pair'"),
        ({"section": {"sizes": [1, "2"]}}, "config key 'section.sizes[1]'"),
        ({"section": {"width": 0}}, "config section 'section': width must be an integer >= 1"),
        ({"extra": {"x": [math.inf]}}, "config key 'extra.x[0]'"),
        ({"section": 3}, "config key 'section'"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError) as error:
        build(Recipe, data)
    assert message in str(error.value)


def test_yaml_duplicate_and_unhashable_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("steps: 1\nsection:\n  width: 2\n  width: 3\n")
    with pytest.raises(ConfigError, match="duplicate key 'width' at line 4"):
        read_yaml(path)
    path.write_text("? [a, b]\n: 1\n")  # a list as a key: PyYAML refuses it, so must we (no TypeError)
    with pytest.raises(ConfigError, match=str(path)):
        read_yaml(path)
    with pytest.raises(ConfigError, match="not found"):
        read_yaml(tmp_path / "missing.yaml")


def test_overrides():
    data = apply_overrides({"section": {"width": 2}}, ["section.rate=0.25", "tags=[a, b]"])
    assert build(Recipe, data) == Recipe(section=Section(width=2, rate=0.25), tags=["a", "b"])
    for bad in ("steps", "=1", "a..b=1", "steps.x=1"):
        with pytest.raises(ConfigError, match="override"):
            apply_overrides({"steps": 3}, [bad])


# --- property tests ---------------------------------------------------------------------------------

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NUMBERS = st.one_of(
    st.integers(),
    st.sampled_from([0, -1, 2**64, -(2**70), 10**400, True, False]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324]),
)
SCALARS = st.one_of(
    st.none(), NUMBERS, st.text(max_size=6), st.sampled_from(["1e-3", "nan", "inf", "x", "y"])
)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _values(cls: type | None) -> st.SearchStrategy:
    """Any value; for a dataclass section also mappings of (mostly) its own keys, recursively."""
    plain = st.recursive(
        SCALARS,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
        max_leaves=8,
    )
    return plain if cls is None else st.one_of(plain, _mappings(cls))


def _typed(tp: Any) -> st.SearchStrategy:
    """Values of the annotation's shape holding any number (so many examples build, and the numbers
    that must be refused still come): ints of any size, NaN, infinities, negatives, bools for ints."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if is_dataclass(tp):
        return st.deferred(lambda: _mappings(tp))
    if origin is Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, type(int | None)):
        return st.one_of([_typed(a) for a in args])
    if origin in (tuple, list):
        if origin is list or args[-1] is Ellipsis:
            return st.lists(_typed(args[0]), max_size=4)
        return st.tuples(*(_typed(a) for a in args)).map(list)
    if origin is dict or tp is dict:
        return st.dictionaries(st.text(max_size=4), SCALARS, max_size=3)
    if tp is type(None):
        return st.none()
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.one_of(st.integers(0, 64), st.integers(0, 64), NUMBERS)
    if tp is float:
        return st.one_of(st.floats(1e-4, 100.0), st.floats(1e-4, 100.0), NUMBERS)
    if tp is str:
        return st.text(max_size=6)
    return _values(None)


def _mappings(cls: type) -> st.SearchStrategy:
    """Mappings of some of ``cls``'s keys (mostly values of the right shape), sometimes a stray key."""
    hints = typing.get_type_hints(cls)

    def value_for(name: str) -> st.SearchStrategy:
        typed = _typed(hints[name])
        return st.one_of(typed, typed, typed, _values(None))

    own = st.fixed_dictionaries({}, optional={n: value_for(n) for n in _field_names(cls)})
    stray = st.dictionaries(st.text(max_size=5) | st.integers(-2, 2), _values(None), min_size=1, max_size=1)
    return st.one_of(own, own, own, own, st.builds(lambda a, b: {**a, **b}, own, stray))


def _any_data(cls: type) -> st.SearchStrategy:
    """Mostly mappings shaped like ``cls``; sometimes anything at all (a list, a number, null)."""
    return st.one_of(_mappings(cls), _mappings(cls), _mappings(cls), _values(None))


def _leaf_paths(plain: dict, prefix: tuple = ()) -> list[tuple]:
    paths = []
    for k, v in plain.items():
        paths += _leaf_paths(v, (*prefix, k)) if isinstance(v, dict) and v else [(*prefix, k)]
    return paths


def _one_change(cls: type) -> st.SearchStrategy:
    """The defaults of ``cls`` as plain data with one value replaced (by one of its shape, or anything):
    close to real recipes, so many build and the refusals are of one value at a known key."""
    plain = to_plain(cls())

    def change(path: tuple, value: Any) -> dict:
        data = copy.deepcopy(plain)
        node = data
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        return data

    def for_path(path: tuple) -> st.SearchStrategy:
        tp = typing.get_type_hints(cls)[path[0]]
        for k in path[1:]:
            tp = typing.get_type_hints(tp)[k] if is_dataclass(tp) else Any
        typed = _typed(tp)
        return st.one_of(typed, typed, _values(None)).map(lambda v: change(path, v))

    return st.sampled_from(_leaf_paths(plain)).flatmap(for_path)


def _key_paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in ``data`` (mappings inside mappings and lists)."""
    paths = []
    if isinstance(data, dict):
        for k, v in data.items():
            paths.append((*prefix, k))
            paths += _key_paths(v, (*prefix, k))
    elif isinstance(data, list | tuple):
        for v in data:
            paths += _key_paths(v, prefix)
    return paths


def _assert_names_a_key(error: ConfigError, data: Any) -> None:
    message = str(error)
    if not isinstance(data, dict):
        assert "top level" in message, message
        return
    paths = _key_paths(data)
    assert any(all(str(part) in message for part in path) for path in paths), (message, data)


def _assert_well_typed(obj: Any, cls: type) -> None:
    """Every field of the built object holds a value of its annotation; no float is NaN or infinite."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        _check_value(getattr(obj, f.name), hints[f.name], f.name)


def _check_value(value: Any, tp: Any, key: str) -> None:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return
    if is_dataclass(tp):
        assert isinstance(value, tp), key
        _assert_well_typed(value, tp)
    elif origin is Literal:
        assert any(value == a and type(value) is type(a) for a in args), key
    elif origin in (typing.Union, type(int | None)):
        assert value is None or any(_matches(value, a) for a in args if a is not type(None)), key
        for a in args:
            if a is not type(None) and _matches(value, a):
                _check_value(value, a, key)
                break
    elif origin in (tuple, list):
        assert isinstance(value, origin), key
        items = args[:1] * len(value) if origin is list or args[-1] is Ellipsis else args
        for v, a in zip(value, items, strict=True):
            _check_value(v, a, key)
    elif origin is dict or tp is dict:
        assert isinstance(value, dict) and all(isinstance(k, str) for k in value), key
        assert not any(isinstance(v, float) and not math.isfinite(v) for v in _leaves(value)), key
    elif tp is float:
        assert type(value) is float and math.isfinite(value), key
    elif tp is int:
        assert type(value) is int, key
    else:
        assert type(value) is tp, key


def _matches(value: Any, tp: Any) -> bool:
    if is_dataclass(tp):
        return isinstance(value, tp)
    origin = typing.get_origin(tp)
    return isinstance(value, origin or tp)


def _leaves(value: Any):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def _build_or_config_error(cls: type, data: Any, build_fn=None) -> Any:
    try:
        obj = (build_fn or (lambda d: build(cls, d)))(data)
    except ConfigError as error:
        _assert_names_a_key(error, data)
        return None
    assert isinstance(obj, cls)
    _assert_well_typed(obj, cls)
    return obj


@FAST
@given(data=_any_data(Recipe) | _one_change(Recipe))
def test_property_build_gives_an_object_or_a_config_error(data):
    _build_or_config_error(Recipe, data)


@FAST
@given(data=_any_data(DetectionCompareConfig) | _one_change(DetectionCompareConfig))
def test_property_detection_recipe(data):
    config = _build_or_config_error(DetectionCompareConfig, data, DetectionCompareConfig.from_dict)
    if config is not None:  # what __post_init__ promises: counts >= 1, finite positive lr, no repeats
        assert config.lr > 0 and config.batch_size >= 1 and config.data.image_size >= 24
        assert len(set(config.seeds)) == len(config.seeds) >= 1 and min(config.seeds) >= 0
        assert all(w >= 1 for w in config.teacher.stage_widths + config.student.stage_widths)
        assert DetectionCompareConfig.from_dict(config.to_dict()) == config


@FAST
@given(data=_any_data(DetectorConfig), section=st.sampled_from([DetectorConfig, DetectionDataConfig]))
def test_property_detection_sections(data, section):
    _build_or_config_error(section, data)


_TMP = Path(tempfile.mkdtemp(prefix="moevl-config-props-"))


@FAST
@given(
    data=_mappings(DetectionCompareConfig),
    overrides=st.lists(
        st.tuples(
            st.sampled_from(
                ["lr", "seeds", "methods", "teacher.stage_widths", "data.image_size", "x.y", "lr.z"]
            )
            | st.text(max_size=5),
            st.text(max_size=8) | NUMBERS.map(str),
        ).map(lambda kv: f"{kv[0]}={kv[1]}"),
        max_size=3,
    ),
)
def test_property_yaml_file_and_overrides(data, overrides):
    """Through the whole path a command takes: a YAML file (any content PyYAML can dump), then overrides."""
    path = _TMP / "recipe.yaml"
    try:
        text = yaml.safe_dump(data)
    except yaml.YAMLError:
        return
    path.write_text(text)
    try:
        config = load_detection_config(path, overrides)
    except ConfigError as error:
        assert str(error)  # a message, never another exception type
        return
    assert isinstance(config, DetectionCompareConfig)
    _assert_well_typed(config, DetectionCompareConfig)


@FAST
@given(
    text=st.text(max_size=40)
    | st.sampled_from(["? [a]\n: 1\n", "a: 1\na: 2\n", "a: !!python/tuple [1]\n", "[1, 2]"])
)
def test_property_read_yaml_any_text(text):
    path = _TMP / "any.yaml"
    path.write_text(text)
    try:
        data = read_yaml(path)
    except ConfigError as error:
        assert str(path) in str(error)
        return
    with contextlib.suppress(ConfigError):  # any data read: built or refused, nothing else
        DetectionCompareConfig.from_dict(data)
