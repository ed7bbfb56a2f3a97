"""The public surface: each package's ``__all__`` is the list README's "Public names" gives, and each of those
names resolves there without a warning."""

from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_surface() -> dict[str, list[str]]:
    """The ``- `moevl.<pkg>`: `a`, `b`, ...`` lines of README's "Public names" section."""
    section = README.read_text().split("### Public names", 1)[1].split("\n#", 1)[0]
    return {
        m.group(1): re.findall(r"`(\w+)`", m.group(2))
        for m in re.finditer(r"^- `moevl\.(\w+)`: (.+)$", section, re.M)
    }


def test_every_package_exports_what_readme_lists():
    listed = readme_surface()
    assert set(listed) == {"moe", "stgc", "hf", "checkpoint", "training", "data", "analysis", "detection"}
    for package, names in listed.items():
        module = importlib.import_module(f"moevl.{package}")
        assert sorted(module.__all__) == sorted(names), package
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a public name resolves without a warning
            for name in names:
                getattr(module, name)


@pytest.mark.parametrize("package", ["hf", "detection"])  # detection resolves its names lazily
def test_unknown_names_are_not_found(package):
    module = importlib.import_module(f"moevl.{package}")
    with pytest.raises(AttributeError, match=f"module 'moevl.{package}' has no attribute 'no_such_name'"):
        module.no_such_name  # noqa: B018
