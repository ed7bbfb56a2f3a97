"""The classes transformers' Auto classes see for a moevl checkpoint (``moevl.checkpoint.auto`` registers
them).

``MoevlConfig`` only carries ``config.json`` (the model's own fields plus ``config.moevl``);
``MoevlForCausalLM`` / ``MoevlForImageTextToText`` are thin: ``from_pretrained`` checks that the
stored model is of the Auto class's kind, exactly as transformers' mapping for the original
``model_type`` says, then calls ``moevl.checkpoint.format.load_moe_model``. They are never instantiated.
"""

from __future__ import annotations

import os
from typing import Any

from transformers.configuration_utils import PreTrainedConfig


class MoevlConfig(PreTrainedConfig):
    """``config.json`` of a moevl checkpoint: the model's own fields, ``moevl`` the format entry."""

    model_type = "moevl"


#: Auto-class keyword arguments that are about fetching files (meaningless for a local folder).
_HUB_KWARGS = (
    "_from_auto",
    "adapter_kwargs",
    "cache_dir",
    "code_revision",
    "force_download",
    "local_files_only",
    "proxies",
    "revision",
    "token",
    "trust_remote_code",
)
#: ``load_moe_model`` keyword arguments besides the ``MoESettings`` overrides.
_LOAD_KWARGS = ("dtype", "implementation", "freeze_dense", "model_class")


class _MoevlAutoModel:
    config_class = MoevlConfig
    #: name of transformers' ``*_MAPPING_NAMES`` (model_type -> class name) of this Auto class
    _mapping_name: str
    _auto_name: str

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        config: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Load the moevl checkpoint in the local folder ``pretrained_model_name_or_path``.

        Keyword arguments: ``dtype`` (or ``torch_dtype``), ``device_map`` (one device), the
        ``MoESettings`` overrides of ``load_moe_model`` (e.g. ``stgc=None``), ``implementation``,
        ``freeze_dense``. ``config`` is read from the folder.
        """
        from moevl.checkpoint.format import load_moe_model, read_checkpoint_config

        if model_args:
            raise TypeError(
                f"{cls._auto_name}.from_pretrained of a moevl checkpoint takes no positional model_args"
            )
        for name in _HUB_KWARGS:
            kwargs.pop(name, None)
        path = os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.pop("subfolder", None) or "")
        if not os.path.isdir(path):
            raise ValueError(
                f"moevl checkpoints load from a local folder; {path!r} is not one (download it first, e.g. "
                "with huggingface_hub.snapshot_download)"
            )
        if "torch_dtype" in kwargs:
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        device = kwargs.pop("device_map", None)
        if device is not None and not isinstance(device, str | int):
            raise ValueError(
                f"device_map must be one device (e.g. 'cuda:0') for a moevl checkpoint, got {device!r}"
            )
        kwargs.setdefault(
            "model_class", cls._model_class(read_checkpoint_config(path).config["model_type"], path)
        )
        model = load_moe_model(path, **kwargs)
        return model if device is None else model.to(device)

    @classmethod
    def _model_class(cls, model_type: str, path: str) -> type:
        import transformers
        from transformers.models.auto import modeling_auto

        name = getattr(modeling_auto, cls._mapping_name).get(model_type)
        if name is None:
            raise ValueError(
                f"the moevl checkpoint in {path} holds a {model_type!r} model, which {cls._auto_name} does not "
                "load (as for the model without moevl)"
            )
        return getattr(transformers, name)


class MoevlForCausalLM(_MoevlAutoModel):
    """``AutoModelForCausalLM`` entry of the moevl format."""

    _mapping_name = "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"
    _auto_name = "AutoModelForCausalLM"


class MoevlForImageTextToText(_MoevlAutoModel):
    """``AutoModelForImageTextToText`` entry of the moevl format."""

    _mapping_name = "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"
    _auto_name = "AutoModelForImageTextToText"
