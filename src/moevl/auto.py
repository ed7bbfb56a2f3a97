"""Register the moevl checkpoint format with transformers' Auto classes, without slowing ``import moevl``.

After ``import moevl``, ``AutoConfig.from_pretrained(d)`` returns a ``MoevlConfig`` and
``AutoModelForCausalLM`` / ``AutoModelForImageTextToText.from_pretrained(d)`` load a moevl
checkpoint exactly (``moevl.checkpoint.format.load_moe_model``). Without moevl they raise.

Registering needs transformers' Auto modules, whose import costs seconds (they import torch).
``register_auto_classes`` therefore registers at once what is already imported and, for what is
not, adds a one-shot import hook that registers right after transformers' own
``configuration_auto`` / ``modeling_auto`` modules have run, then removes itself. It changes no
transformers code: it only calls the public ``AutoConfig.register`` / ``AutoModel*.register``.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
_MODELING_MODULE = "transformers.models.auto.modeling_auto"
_registered = {_CONFIG_MODULE: False, _MODELING_MODULE: False}


def register_auto_classes() -> None:
    """Register ``model_type="moevl"`` with ``AutoConfig``, ``AutoModelForCausalLM`` and
    ``AutoModelForImageTextToText``: now for the Auto modules already imported, else as soon as
    transformers imports them. Idempotent; ``import moevl`` calls it."""
    _register_imported()
    if not all(_registered.values()) and not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def _register_imported() -> None:
    if not _registered[_CONFIG_MODULE] and _imported(_CONFIG_MODULE):
        from transformers.models.auto.configuration_auto import AutoConfig

        from moevl.auto_classes import MoevlConfig

        AutoConfig.register(MoevlConfig.model_type, MoevlConfig, exist_ok=True)
        _registered[_CONFIG_MODULE] = True
    if _registered[_CONFIG_MODULE] and not _registered[_MODELING_MODULE] and _imported(_MODELING_MODULE):
        from transformers.models.auto.modeling_auto import AutoModelForCausalLM, AutoModelForImageTextToText

        from moevl.auto_classes import MoevlConfig, MoevlForCausalLM, MoevlForImageTextToText

        AutoModelForCausalLM.register(MoevlConfig, MoevlForCausalLM, exist_ok=True)
        AutoModelForImageTextToText.register(MoevlConfig, MoevlForImageTextToText, exist_ok=True)
        _registered[_MODELING_MODULE] = True


def _imported(name: str) -> bool:
    """``name`` is imported and has finished running (not half-initialised)."""
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    return module is not None and not getattr(spec, "_initializing", False)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for transformers' two Auto modules it returns the spec the other
    finders return, with a loader that calls ``_register_imported`` after the module has run."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname not in _registered:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader, self)
                return spec
        return None


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, finder: _RegisterAfterImport) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        # the module is complete now; ``_imported`` must not see it as initialising
        spec = module.__spec__
        initializing = getattr(spec, "_initializing", False)
        spec._initializing = False
        try:
            _register_imported()
        finally:
            spec._initializing = initializing
        if all(_registered.values()) and self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... for tracebacks
        return getattr(self._loader, name)
