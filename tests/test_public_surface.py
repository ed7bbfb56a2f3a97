"""The public surface: each package's ``__all__`` is the list README's "Public names" gives, and every name a
package exported before issue 25 cut the surface still resolves there for one release, with a
``DeprecationWarning`` naming its new place, to the very same object."""

from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

#: ``__all__`` of each package in moevl 0.1.0 before the cut (git show 0e85d4e:src/moevl/<pkg>/__init__.py),
#: and the older alias ``moevl.hf.UpcycleSettings``.
BEFORE = {
    "analysis": ["MeanStd", "format_mean_std", "mean_std", "method_color", "summarize", "write_report"],
    "data": [
        "BenchmarkConfig", "ConversationCollator", "ConversationDataset", "DataError", "DigitFiles",
        "GenerationCollator", "ImageRef", "Record", "RecordSet", "last_assistant_text", "prompt_messages",
        "read_records", "vision_token_ids", "write_digit_benchmark",
    ],
    "detection": [
        "DetectorConfig", "GFLDetector", "bckd_classification_loss", "bckd_localization_loss",
        "kl_distillation_loss", "localization_distillation_loss",
    ],
    "hf": [
        "ExportResult", "MoESettings", "MoETrainer", "RoutingContext", "UniformRoutingMonitor", "adopt",
        "apply_lora", "aux_loss", "export", "is_moevl_checkpoint", "is_native_moe", "load_moe_llava",
        "load_moe_model", "load_upcycled", "merge_lora", "moe_blocks", "routing_statistics", "save_moe_model",
        "save_upcycled", "upcycle", "UpcycleSettings",
    ],
    "moe": [
        "GroupedExperts", "LTDRConfig", "LTDRRouter", "LoRAConfig", "MoEFeedForward", "MoEOutput", "RouterLoRA",
        "RoutingRecord", "TopKRouter", "balance_loss", "ltdr_tail_mask", "router_z_loss",
    ],
    "stgc": [
        "CosineHistogram", "ExpertGradientObserver", "ExpertGrads", "FlagPersistence", "LinearGrads",
        "STGCConfig", "STGCObserver", "STGCStats", "conflict_elimination_grad", "conflict_elimination_loss",
        "cosine_histogram", "flag_persistence", "grouped_token_gradient_cosine", "token_gradient_cosine",
    ],
}  # fmt: skip


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


def _warned_target(message: str) -> object:
    """The object a deprecation message points at: "import it from moevl.x.y" or "use moevl.x.Name"."""
    where = message.rsplit(" ", 1)[1]
    if "import it from" in message:
        return where
    module, name = where.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(("package", "name"), [(p, n) for p, names in sorted(BEFORE.items()) for n in names])
def test_a_name_exported_before_still_resolves_to_the_same_object(package, name):
    module = importlib.import_module(f"moevl.{package}")
    if name in module.__all__:
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = getattr(module, name)
    [warning] = caught
    assert warning.category is DeprecationWarning
    message = str(warning.message)
    assert re.fullmatch(
        rf"moevl\.{package}\.{name} is deprecated and goes in moevl 0\.3: (import it from|use) \S+", message
    )
    target = _warned_target(message)
    new = getattr(importlib.import_module(target), name) if isinstance(target, str) else target
    assert old is new


def test_from_import_of_an_old_name_warns_too():
    from moevl.checkpoint import load_moe_model

    with pytest.warns(DeprecationWarning, match="import it from moevl.checkpoint"):
        from moevl.hf import load_moe_model as old
    assert old is load_moe_model


def test_unknown_names_are_not_found():
    import moevl.hf

    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        moevl.hf.no_such_name  # noqa: B018
