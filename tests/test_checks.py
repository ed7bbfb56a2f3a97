"""moevl.checks: one message for every argument check, "<name> must be <what>, got <value>"."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

import moevl.checks
from moevl.checks import check, check_bool, check_choice, check_float, check_int, check_seed
from moevl.config import ConfigError


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_int("top_k", 0, minimum=1), "top_k must be an integer >= 1, got 0"),
        (
            lambda: check_int("top_k", 5, minimum=1, maximum=4),
            "top_k must be an integer >= 1 and <= 4, got 5",
        ),
        (lambda: check_int("top_k", True, minimum=1), "top_k must be an integer >= 1, got True"),
        (lambda: check_int("top_k", 2.0), "top_k must be an integer, got 2.0"),
        (
            lambda: check_float("lr", 0.0, minimum=0.0, exclusive_minimum=True),
            "lr must be a finite number > 0.0, got 0.0",
        ),
        (
            lambda: check_float("p", 1.5, minimum=0, maximum=1),
            "p must be a finite number >= 0 and <= 1, got 1.5",
        ),
        (lambda: check_float("p", math.nan), "p must be a finite number, got nan"),
        (lambda: check_float("p", -math.inf, minimum=0.0), "p must be a finite number >= 0.0, got -inf"),
        (lambda: check_float("p", False), "p must be a finite number, got False"),
        (lambda: check_float("p", "0.5"), "p must be a finite number, got '0.5'"),
        (lambda: check_bool("flag", 1), "flag must be True or False, got 1"),
        (
            lambda: check_choice("scope", "first", ("all", "last")),
            "scope must be one of 'all', 'last', got 'first'",
        ),
        (lambda: check_choice("scope", 3, ("all", "last")), "scope must be one of 'all', 'last', got 3"),
        (
            lambda: check_seed("seed", -1),
            "seed must be an integer in [0, 2**64) (torch's seed range), got -1",
        ),
        (lambda: check_seed("seed", 2**64), "seed must be an integer in [0, 2**64)"),
        (lambda: check(False, "methods", "a non-empty list", []), "methods must be a non-empty list, got []"),
    ],
)
def test_messages_name_the_argument_the_expected_and_the_given(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert str(error.value).startswith(message), str(error.value)


def test_valid_values_come_back():
    assert check_int("n", 3, minimum=1, maximum=3) == 3
    assert check_float("x", 1, minimum=0.0) == 1.0 and isinstance(check_float("x", 1), float)
    assert check_bool("b", False) is False
    assert check_choice("c", "a", iter(["a", "b"])) == "a"
    assert check_seed("seed", 2**64 - 1) == 2**64 - 1
    check(True, "x", "anything", None)


def test_an_integer_beyond_float_range_is_refused_not_an_overflow():
    with pytest.raises(ValueError, match=r"lr must be a finite number, got 1000"):
        check_float("lr", 10**400)


def test_check_raises_the_class_asked_for():
    with pytest.raises(ConfigError, match="config key 'seed' must be an integer >= 0, got -1"):
        check(False, "config key 'seed'", "an integer >= 0", -1, error=ConfigError)


def test_the_module_is_a_leaf():
    """It imports nothing of moevl, so every part may use it (``moe`` imports nothing else of moevl)."""
    tree = ast.parse(Path(moevl.checks.__file__).read_text())
    imported = [
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    ] + [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert imported and not [name for name in imported if name.split(".")[0] == "moevl"], imported
