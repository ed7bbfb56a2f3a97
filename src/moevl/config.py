"""Recipes as data: build frozen dataclasses from YAML with type checks, for every moevl command.

One builder and one ``ConfigError`` serve the vision-language side (``moevl.vlm.config``) and the
detection side (``moevl.detection.recipe``). ``build`` checks while it builds: an unknown key, a value
of the wrong type, a non-finite number, or a value a dataclass refuses in ``__post_init__`` raises
``ConfigError`` naming the key, what was expected and what was given, in the words of ``moevl.checks``
(``"config key 'moe.top_k' must be int, got str 'two'"``). Overrides (``key.sub=value``,
values parsed as YAML) are applied to the plain data before building, so they are checked the same way.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad recipe: the message names the key, the expected and the given value."""


# --- YAML --------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (PyYAML keeps the last)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            break  # construct_mapping below refuses it with PyYAML's own error ("found unhashable key")
        if key in seen:
            line = key_node.start_mark.line + 1
            raise ConfigError(f"duplicate key {key!r} at line {line}: each key may appear once per mapping")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_yaml(path: str | Path) -> Any:
    """A YAML file's data; ``ConfigError`` for a missing file, invalid YAML or a duplicate key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return yaml.load(path.read_text(), Loader=_StrictLoader)
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"stage2.training.max_steps=50"`` -> (["stage2", "training", "max_steps"], 50) (value as YAML)."""
    if "=" not in item:
        raise ConfigError(f"an override must be key.sub=value, got {item!r}")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"an override must be key.sub=value with non-empty key parts, got {item!r}")
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else ""
    except (yaml.YAMLError, ConfigError) as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
    return path, value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """A copy of ``data`` with each ``key.sub=value`` set (sections created as needed)."""
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


# --- building dataclasses ----------------------------------------------------------------------------


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list, collections.abc.Sequence):
        args = typing.get_args(tp)
        inner = type_name(args[0]) if args else "values"
        return (
            f"a list of {inner}"
            if origin is not tuple or args[-1] is Ellipsis
            else f"a list of {len(args)} {inner}"
        )
    if origin is dict or tp is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {', '.join(field_names(tp))}"
    if tp is float:
        return "a finite number"
    return getattr(tp, "__name__", str(tp))


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


_SEQUENCES = (tuple, list, collections.abc.Sequence)  # YAML lists; a Sequence field gets a tuple


def convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp`` (lists become tuples, ints become floats)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}' must be {type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return build(tp, value, key + ".")
    if origin is Literal:
        # NOTE: `True == 1` in Python; a bool never matches a non-bool literal.
        if not any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            raise bad
        return value
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        # A mapping or a list can only be meant for the one member of its kind: report its own error
        # (e.g. an unknown key inside a section) rather than "expected X or null".
        for arg in args:
            if (isinstance(value, dict) and dataclasses.is_dataclass(arg)) or (
                isinstance(value, list | tuple) and typing.get_origin(arg) in _SEQUENCES
            ):
                return convert(value, arg, key)
        for arg in args:
            try:
                return convert(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin in _SEQUENCES:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise bad
        if origin is not tuple or args[-1] is Ellipsis:
            items = tuple(convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
            return list(items) if origin is list else items
        if len(value) != len(args):
            raise bad
        return tuple(convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        for k in value:
            if not isinstance(k, str):
                raise ConfigError(f"config key '{key}' must have string keys, got {type(k).__name__} {k!r}")
        return {k: _free_form(v, f"{key}.{k}") for k, v in value.items()}
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
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float's range
            raise bad from None
        if not math.isfinite(number):
            raise bad
        return number
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in the recipe's classes


# YAML 1.1 (PyYAML) reads "1e-4" (no dot) as a string; in free-form sections it is meant as a number.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _free_form(value: Any, key: str) -> Any:
    """A free-form value (``training:`` mappings): exponent strings become floats, and NaN or infinity is
    refused at any depth."""
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    if isinstance(value, dict):
        return {k: _free_form(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_free_form(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def build(cls: type, data: dict, prefix: str = "", defaults: Any = None) -> Any:
    """An instance of the dataclass ``cls`` from plain ``data``, merged onto ``defaults`` (``cls()``).

    Nested dataclass sections and ``dict`` fields merge key by key onto their defaults, so a YAML file
    (or an override) only writes the keys it changes.
    """
    if not isinstance(data, dict):
        where = f"config section '{prefix[:-1]}'" if prefix else "the config's top level"
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    known = field_names(cls)
    for k in data:
        if k not in known:
            raise ConfigError(f"unknown config key '{prefix}{k}'; expected one of: {', '.join(known)}")
    base = cls() if defaults is None else defaults
    kwargs = {}
    for k, v in data.items():
        tp, current = hints[k], getattr(base, k)
        if dataclasses.is_dataclass(current) and isinstance(v, dict):
            kwargs[k] = build(type(current), v, f"{prefix}{k}.", current)
        elif isinstance(current, dict) and isinstance(v, dict) and typing.get_origin(tp) is not Literal:
            kwargs[k] = {**current, **convert(v, tp, prefix + k)}
        else:
            kwargs[k] = convert(v, tp, prefix + k)
    try:
        return dataclasses.replace(base, **kwargs)
    except (ValueError, TypeError) as e:
        where = f"config section '{prefix[:-1]}'" if prefix else "config"
        raise ConfigError(f"{where}: {e}") from None


def to_plain(obj: Any) -> Any:
    """Plain data (dataclasses as mappings, tuples as lists) for YAML and JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
