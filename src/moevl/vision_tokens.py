"""Which token ids of a checkpoint stand for vision features, read from its config: the routing context
(``moevl.hf.runtime``) marks those positions as vision tokens, the data side (``moevl.data.processing``) adds
the processor's own placeholder tokens to them.

A leaf: this module imports nothing of moevl (nor torch), so ``data`` and ``hf`` share it without one
importing the other.
"""

from __future__ import annotations

from typing import Any

#: Config attributes (of the model's top config) holding token ids whose positions are vision
#: features: images and videos (LLaVA-family, Qwen2-VL, Qwen3-VL, LLaVA-OneVision, ...).
VISION_TOKEN_ATTRIBUTES = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


def vision_token_ids(config: Any) -> tuple[int, ...]:
    """The vision placeholder token ids named in ``config`` (``VISION_TOKEN_ATTRIBUTES``), in order."""
    ids: list[int] = []
    for name in VISION_TOKEN_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value not in ids:
            ids.append(value)
    return tuple(ids)
