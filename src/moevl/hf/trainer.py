"""``MoETrainer``: the Hugging Face Trainer, logging routing / LTDR / STGC statistics."""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from transformers import Trainer

from moevl.hf.stats import routing_statistics


class MoETrainer(Trainer):
    """A ``transformers.Trainer`` that reads each step's MoE statistics after backward.

    For a dense model it is exactly ``Trainer``. For an upcycled model it averages the statistics
    of the micro-steps between two logging steps into the normal logs (so TensorBoard, W&B, ...
    get them), keeps them in ``moe_history``, sums expert loads for vision and text tokens per
    layer, and writes both to ``<output_dir>/moe_stats.json`` (temp file + rename) after training.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.moe_history: list[dict[str, float]] = []
        self.expert_load: dict[int, dict[str, list[float]]] = {}
        self._pending: dict[str, list[float]] = {}

    def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[override]
        context = getattr(self.model, "moe_context", None)
        if context is not None:
            # With num_items_in_batch the task loss of a micro-batch is a share of the accumulated
            # batch's mean and the Trainer does not divide by the accumulation steps: do it for the
            # aux terms, which are per-micro-batch means.
            scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
            context.aux_scale = 1.0 / self.current_gradient_accumulation_steps if scaled else 1.0
        loss = super().training_step(model, inputs, num_items_in_batch)
        scalars, loads = routing_statistics(self.model)
        for k, v in scalars.items():
            self._pending.setdefault(k, []).append(v)
        for layer, by_mod in loads.items():
            acc = self.expert_load.setdefault(layer, {})
            for mod, counts in by_mod.items():
                prev = acc.get(mod, [0.0] * len(counts))
                acc[mod] = [a + b for a, b in zip(prev, counts, strict=True)]
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._pending and "loss" in logs:
            means = {k: sum(v) / len(v) for k, v in self._pending.items()}
            self._pending = {}
            # per-layer keys go to TensorBoard; the history keeps the layer averages
            logs = {**logs, **means}
            self.moe_history.append(
                {"step": self.state.global_step, **{k: v for k, v in means.items() if "/L" not in k}}
            )
        super().log(logs, *args, **kwargs)

    def train(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        out = super().train(*args, **kwargs)
        if self.moe_history or self.expert_load:
            self.write_moe_stats(os.path.join(self.args.output_dir, "moe_stats.json"))
        return out

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # NOTE: transformers 5 saves LLaVA-family checkpoints under their legacy key names by
        # default, and the Trainer's resume loads them with a plain load_state_dict(strict=False):
        # the weights silently do not come back. Save the model's own key names instead, so that
        # resume and ``load_upcycled`` restore every tensor.
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if getattr(model, "moe_settings", None) is not None:
            model.config.moevl = model.moe_settings.to_dict()
        model.save_pretrained = functools.partial(
            type(model).save_pretrained, model, save_original_format=False
        )
        try:
            super()._save(output_dir, state_dict)
        finally:
            del model.save_pretrained

    def write_moe_stats(self, path: str) -> None:
        if not self.is_world_process_zero():
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        payload = {
            "history": self.moe_history,
            "expert_load": {str(k): v for k, v in self.expert_load.items()},
        }
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
