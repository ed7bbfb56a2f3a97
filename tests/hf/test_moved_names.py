"""Names ``moevl.hf`` exported before issue 25 moved them: they still resolve for one release, with a
``DeprecationWarning`` naming the new place, to the very same objects."""

import importlib

import pytest

import moevl.hf

MOVED = {
    "ExportResult": "moevl.checkpoint",
    "export": "moevl.checkpoint",
    "is_moevl_checkpoint": "moevl.checkpoint",
    "load_moe_llava": "moevl.checkpoint",
    "load_moe_model": "moevl.checkpoint",
    "load_upcycled": "moevl.checkpoint",
    "save_moe_model": "moevl.checkpoint",
    "save_upcycled": "moevl.checkpoint",
    "MoETrainer": "moevl.training",
    "UniformRoutingMonitor": "moevl.training",
    "routing_statistics": "moevl.training",
}


@pytest.mark.parametrize("name", sorted(MOVED))
def test_an_old_name_warns_and_is_the_moved_object(name):
    package = MOVED[name]
    with pytest.warns(
        DeprecationWarning, match=rf"moevl\.hf\.{name} is deprecated .*: import it from {package}$"
    ):
        old = getattr(moevl.hf, name)
    assert old is getattr(importlib.import_module(package), name)


def test_from_import_of_an_old_name_warns_too():
    from moevl.checkpoint import load_moe_model

    with pytest.warns(DeprecationWarning, match="import it from moevl.checkpoint"):
        from moevl.hf import load_moe_model as old
    assert old is load_moe_model


def test_other_names_are_not_found():
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        moevl.hf.no_such_name  # noqa: B018
    assert not set(MOVED) & set(moevl.hf.__all__)
