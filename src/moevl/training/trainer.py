"""``MoETrainer``: the Hugging Face Trainer, with routing / LTDR / STGC statistics, a short console log,
a stop on non-finite losses or gradients, and checkpoints that reload exactly."""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import is_peft_available

from moevl import observability as metrics
from moevl.atomic import atomic_write_json
from moevl.checkpoint.format import is_moevl_checkpoint, load_moe_state_into, save_moe_model
from moevl.hf.runtime import find_moe_state, update_choice_biases
from moevl.training.routing_health import UniformRoutingMonitor
from moevl.training.stats import StepStatistics, collect, read

STATS_FILE = "moe_stats.json"

# What the console shows per logging step, under short names; everything goes to TensorBoard (and
# moe_stats.json).
CONSOLE_KEYS = {
    "loss": "loss",
    metrics.BALANCE_LOSS: "balance",
    metrics.MAX_VIO: "maxvio",
    metrics.CONFLICT_RATIO: "conflicts",
    metrics.EXPERTS_PER_TOKEN: "experts/token",
    metrics.TAIL_SHARE: "tail",
    metrics.ROUTER_ENTROPY: "entropy",
    "grad_norm": "grad norm",
    "learning_rate": "lr",
}
_SUMMARY_KEYS = {"train_runtime": ("s", "{:.1f}"), "train_samples_per_second": ("samples/s", "{:.3g}")}


class NonFiniteTrainingError(RuntimeError):
    """The loss or the gradients became NaN or infinite; training stopped before the optimizer step."""


def console_line(logs: dict[str, Any], step: int, max_steps: int) -> str | None:
    """One console line of a logging step (``step 20/400 · loss 2.31 · balance 1.01 · ...``) or of the
    final summary (``done: 412.3 s · 98.1 samples/s · train loss 2.07``); None when ``logs`` holds neither."""
    if "train_runtime" in logs:
        parts = [fmt.format(logs[k]) + f" {unit}" for k, (unit, fmt) in _SUMMARY_KEYS.items() if k in logs]
        if "train_loss" in logs:
            parts.append(f"train loss {logs['train_loss']:.4g}")
        return "done: " + " · ".join(parts)
    shown = [
        f"{name} {logs[k]:.4g}" for k, name in CONSOLE_KEYS.items() if isinstance(logs.get(k), int | float)
    ]
    return " · ".join([f"step {step}/{max_steps}", *shown]) if shown else None


class _ConsoleProgress(ProgressCallback):
    """The Trainer's progress bar, printing ``console_line`` at each logging step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        line = console_line(logs or {}, state.global_step, state.max_steps)
        if state.is_world_process_zero and self.training_bar is not None and line:
            self.training_bar.write(line)


class _ConsolePrinter(PrinterCallback):
    """``PrinterCallback`` (used without progress bars), printing ``console_line``."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        line = console_line(logs or {}, state.global_step, state.max_steps)
        if state.is_world_process_zero and line:  # one voice: not once per node
            print(line, flush=True)


class _LogLastStep(TrainerCallback):
    """Logs the last step too, so that a run shorter than ``logging_steps`` still shows (and records) one."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and args.logging_strategy == "steps":
            control.should_log = True


class _FiniteGradientGuard(TrainerCallback):
    """Before each optimizer step: a NaN or infinite gradient stops the run, so the weights stay as the
    last good step left them and no checkpoint with NaNs is written. (Under DeepSpeed the gradients live in
    its partitions, not in ``p.grad``; DeepSpeed's own overflow handling applies there.)"""

    def __init__(self, trainer: MoETrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        losses, self.trainer._step_losses = self.trainer._step_losses, []
        named = [(n, p.grad) for n, p in self.trainer.model.named_parameters() if p.grad is not None]
        sums = [torch.stack(losses).float().sum()] if losses else []
        if named:
            sums.append(torch.stack(torch._foreach_norm([g for _, g in named])).float().sum())
        if not sums:
            return
        values = torch.stack(
            [t.to(sums[0].device) for t in sums]
        ).tolist()  # one host sync per optimizer step
        if losses and not math.isfinite(values[0]):
            raise NonFiniteTrainingError(
                f"non-finite loss ({values[0]}) at step {state.global_step + 1}; training stopped before the "
                "optimizer step (the last saved checkpoint is intact). Lower the learning rate or the "
                "auxiliary-loss weights, or use bf16 instead of fp16."
            )
        if not named or math.isfinite(values[-1]):
            return
        bad = [n for n, g in named if not torch.isfinite(g).all()]
        raise NonFiniteTrainingError(
            f"non-finite gradient at step {state.global_step + 1} in {len(bad)} parameter(s), e.g. "
            f"{bad[0] if bad else '?'}; training stopped before the optimizer step (the last saved checkpoint "
            "is intact). Lower the learning rate or the auxiliary-loss weights, or use bf16 instead of fp16."
        )


class _ChoiceBiasUpdate(TrainerCallback):
    """Aux-loss-free balancing (``MoESettings.bias_update_rate``): after each optimizer step, every MoE layer's
    choice bias moves by the load of the step's whole batch: its micro-steps summed, then over the
    data-parallel ranks (an all-reduce), so every rank applies the same update."""

    def __init__(self, trainer: MoETrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        loads, self.trainer._step_loads = self.trainer._step_loads, {}
        if not loads:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            layers = sorted(loads)
            total = torch.stack([loads[i] for i in layers])
            torch.distributed.all_reduce(total)
            loads = dict(zip(layers, total, strict=True))
        update_choice_biases(self.trainer.model, loads)


class _StatsInCheckpoints(TrainerCallback):
    """After each checkpoint save: the MoE statistics so far into the checkpoint folder (a resumed run keeps
    the steps before the resume)."""

    def __init__(self, trainer: MoETrainer) -> None:
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        trainer = self.trainer
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if (trainer.moe_history or trainer.expert_load or trainer._pending_steps) and os.path.isdir(folder):
            trainer.write_moe_stats(os.path.join(folder, STATS_FILE))


class MoETrainer(Trainer):
    """A ``transformers.Trainer`` that reads each step's MoE statistics after backward.

    For a dense model it is the Trainer with checkpoints under the model's own key names. For a MoE model it
    averages the statistics of the micro-steps between two logging steps into the logs (TensorBoard, W&B, ...
    get all of them; the console shows ``CONSOLE_KEYS``), keeps them in ``moe_history``, sums expert loads
    for vision and text tokens per layer, and writes both to ``<output_dir>/moe_stats.json`` (and into each
    checkpoint, so a resumed run keeps the steps before the resume).

    A NaN or infinite loss or gradient raises ``NonFiniteTrainingError`` before the optimizer step.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.moe_history: list[dict[str, float]] = []
        # a router within 2% of uniform for 100 micro-steps in a row: warned once per layer
        self.routing_monitor = UniformRoutingMonitor()
        self.routing_warnings: list[str] = []
        self.expert_load: dict[int, dict[str, list[float]]] = {}
        self._pending_steps: list[StepStatistics] = []  # on the device until the logging step
        self._pending: dict[str, list[float]] = {}  # read, waiting for the logging step
        self._step_losses: list[torch.Tensor] = []  # checked before the optimizer step
        self._step_loads: dict[int, torch.Tensor] = {}  # (E,) per MoE layer, for the aux-loss-free bias
        for old, new in ((ProgressCallback, _ConsoleProgress), (PrinterCallback, _ConsolePrinter)):
            if self.pop_callback(old) is not None:
                self.add_callback(new)
        self.add_callback(_FiniteGradientGuard(self))
        self.add_callback(_LogLastStep())
        self.add_callback(_StatsInCheckpoints(self))
        self.add_callback(_ChoiceBiasUpdate(self))

    # --- one step ------------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[override]
        state = find_moe_state(self.model)
        if state is not None:  # this forward's weight of the aux losses (RoutingContext)
            inputs = {**inputs, "moe_aux_scale": self._aux_scale(num_items_in_batch)}
        loss = super().training_step(model, inputs, num_items_in_batch)
        # NOTE: nothing here reads a device value on the host: the loss is checked before the optimizer step
        # (_FiniteGradientGuard), the statistics are read at the logging step (_read_statistics).
        self._step_losses.append(loss.detach())
        step = collect(self.model)
        if step is not None:
            self._pending_steps.append(step)
            if state.settings.bias_update_rate is not None:
                for layer, by_mod in step.loads.items():  # this optimizer step's load, on the device
                    load = by_mod["vision"] + by_mod["text"]
                    self._step_loads[layer] = (
                        load if layer not in self._step_loads else self._step_loads[layer] + load
                    )
        return loss

    def _read_statistics(self) -> None:
        """The micro-steps' statistics still on the device, read in one host synchronisation: the routing
        monitor sees each micro-step, the scalars wait in ``_pending`` for the next log, the loads are summed."""
        steps, self._pending_steps = self._pending_steps, []
        if not steps:
            return
        per_step, loads = read(steps)
        for scalars in per_step:
            for message in self.routing_monitor.update(scalars):
                self.routing_warnings.append(message)
                if self.is_world_process_zero():
                    warnings.warn(message, RuntimeWarning, stacklevel=2)
            for k, v in scalars.items():
                self._pending.setdefault(k, []).append(v)
        for layer, by_mod in loads.items():
            acc = self.expert_load.setdefault(layer, {})
            for mod, counts in by_mod.items():
                prev = acc.get(mod, [0.0] * len(counts))
                acc[mod] = [a + b for a, b in zip(prev, counts, strict=True)]

    def _aux_scale(self, num_items_in_batch) -> float:
        """The factor that keeps the auxiliary terms (balance, z-loss, STGC) at their per-micro-batch mean
        over the accumulated, data-parallel batch.

        With ``num_items_in_batch`` the task loss of a micro-batch is a share of the whole batch's token mean:
        the Trainer does not divide it by the accumulation steps, and with ``average_tokens_across_devices``
        ``compute_loss`` multiplies it by the number of processes (DDP / DeepSpeed then average gradients).
        The aux terms are per-micro-batch means, so undo both for them: without this they weigh
        ``world_size`` times more under DDP and DeepSpeed than in one process.
        """
        if not (self.model_accepts_loss_kwargs and num_items_in_batch is not None):
            return 1.0
        scale = 1.0 / self.current_gradient_accumulation_steps
        if self.args.average_tokens_across_devices:
            processes = self.accelerator.num_processes // self.get_tp_size()
            scale /= processes if self.args.n_gpu <= 1 else self.args.n_gpu
        return scale

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            self._read_statistics()
        if self._pending and "loss" in logs:
            means = {k: sum(v) / len(v) for k, v in self._pending.items()}
            self._pending = {}
            logs = {**logs, **means}
            # the history keeps the layer averages; per-layer keys go to TensorBoard only
            self.moe_history.append(
                {"step": self.state.global_step, **{k: v for k, v in means.items() if "/L" not in k}}
            )
        super().log(logs, *args, **kwargs)

    # --- training, statistics and resume ----------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):  # type: ignore[override]
        if isinstance(resume_from_checkpoint, str):
            self._load_moe_stats(os.path.join(resume_from_checkpoint, STATS_FILE))
        out = super().train(resume_from_checkpoint, *args, **kwargs)
        if self.moe_history or self.expert_load:
            self.write_moe_stats(os.path.join(self.args.output_dir, STATS_FILE))
        return out

    def _load_moe_stats(self, path: str) -> None:
        if not os.path.isfile(path):
            return
        with open(path) as f:
            payload = json.load(f)
        self.moe_history = list(payload.get("history", []))
        self.routing_warnings = list(payload.get("routing_warnings", []))
        self.expert_load = {int(k): v for k, v in payload.get("expert_load", {}).items()}

    def write_moe_stats(self, path: str) -> None:
        self._read_statistics()  # the loads of micro-steps not logged yet
        if not self.is_world_process_zero():
            return
        payload = {
            "history": self.moe_history,
            "expert_load": {str(k): v for k, v in sorted(self.expert_load.items())},
            "routing_warnings": self.routing_warnings,
        }
        atomic_write_json(path, payload, indent=1)

    # --- the checkpoint format: the one place that changes how the Trainer saves and loads ------------------
    # NOTE: transformers has no public hook for a model's checkpoint format, so these two Trainer methods are
    # overridden (5.25's signatures): a MoE model is saved in the moevl format (which plain transformers refuses
    # instead of loading random experts) and resumed strictly; a dense model under its own key names.

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """A MoE model in the moevl format (``state_dict``: the one the Trainer gathered under ZeRO-3 / FSDP); a
        dense transformers (or PEFT) model with ``save_original_format=False``; anything else as the Trainer does.

        NOTE: transformers 5 saves LLaVA-family checkpoints under their legacy key names by default, and the
        Trainer's resume loads them with a plain load_state_dict(strict=False): the weights silently do not come
        back. The model's own key names load back.
        """
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        main = self.args.should_save
        if find_moe_state(model) is not None:
            processor = self.processing_class if main else None
            save_moe_model(
                model, output_dir, processor=processor, state_dict=state_dict, is_main_process=main
            )
        else:
            supported: tuple[type, ...] = (PreTrainedModel,)
            if is_peft_available():
                from peft import PeftModel

                supported = (PreTrainedModel, PeftModel)
            if not isinstance(model, supported):
                super()._save(output_dir, state_dict)
                return
            # non-writer ranks stay only when the model was sharded at load time, for the gathers in save_pretrained
            if not main and not self.is_distributed_loading_by_transformers:
                return
            if state_dict is None and not isinstance(self.model, supported):  # a wrapped model
                state_dict = self.model.state_dict()
            model.save_pretrained(
                output_dir, state_dict=state_dict, is_main_process=main, save_original_format=False
            )
            tokenizer = getattr(self.data_collator, "tokenizer", None)
            processor = self.processing_class if self.processing_class is not None else tokenizer
            if main and processor is not None:  # as the Trainer does when processing_class is None
                processor.save_pretrained(output_dir)
        if main:
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:  # type: ignore[override]
        target = model if model is not None else self.model
        if is_moevl_checkpoint(resume_from_checkpoint) and not self.is_deepspeed_enabled:
            # strict: every tensor of the model comes back, or an error names what is missing
            load_moe_state_into(self.accelerator.unwrap_model(target), resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)
