"""Register the moevl checkpoint format with transformers' Auto classes, when asked.

After ``moevl.checkpoint.register_auto_classes()``, ``AutoConfig.from_pretrained(d)`` returns a
``MoevlConfig`` and ``AutoModelForCausalLM`` / ``AutoModelForImageTextToText.from_pretrained(d)`` load a
moevl checkpoint exactly (``moevl.checkpoint.load_moe_model``). Without it they raise, as in an interpreter
that never imported moevl: ``import moevl`` registers nothing and imports nothing of transformers.

Registering changes no transformers code: it only calls the public ``AutoConfig.register`` /
``AutoModel*.register``. The classes it registers are in ``moevl.checkpoint.auto_classes``.
"""

from __future__ import annotations


def register_auto_classes() -> None:
    """Register ``model_type="moevl"`` with ``AutoConfig``, ``AutoModelForCausalLM`` and
    ``AutoModelForImageTextToText`` (importing transformers' Auto modules). Idempotent."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from moevl.checkpoint.auto_classes import MoevlConfig, MoevlForCausalLM, MoevlForImageTextToText

    AutoConfig.register(MoevlConfig.model_type, MoevlConfig, exist_ok=True)
    AutoModelForCausalLM.register(MoevlConfig, MoevlForCausalLM, exist_ok=True)
    AutoModelForImageTextToText.register(MoevlConfig, MoevlForImageTextToText, exist_ok=True)
