"""The small LLaVA-architecture model of the main job, its training stages and evaluation."""

from moevl.vlm.model import PARTS, ModelConfig, build_model, greedy_generate, num_image_tokens, set_trainable

__all__ = ["PARTS", "ModelConfig", "build_model", "greedy_generate", "num_image_tokens", "set_trainable"]
