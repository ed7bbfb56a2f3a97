"""A training step waits for the device nowhere in moevl: the host reads of device values (``item``, ``tolist``,
``float``/``int``/``bool`` of a tensor, ``cpu``, ``nonzero``, boolean-mask indexing) that moevl's code makes in a
micro-step, a logging step and an optimizer step are counted."""

from __future__ import annotations

import collections
import contextlib
import traceback

import pytest
import torch
from transformers import TrainingArguments

from moevl.hf import adopt, moe_blocks, upcycle
from moevl.stgc import STGCConfig
from moevl.training import MoETrainer
from tests.fixtures.tiny import causal_lm, native_moe

#: Tensor methods that read a device value on the host (a synchronisation on an accelerator).
SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero")
#: Functions of the experts function that read on the host on CPU only (their accelerator branch does not):
#: the padded layout's choice and build, and the sorted layout's zeroing of unused rows.
CPU_ONLY = {"choose_capacity", "pad_to_capacity", "zero_unused_rows_"}


@contextlib.contextmanager
def host_reads():
    """Counts, by ``(method, file:line)``, the host reads made directly by moevl's code (not by torch's or
    transformers' own), except the ``CPU_ONLY`` ones."""
    hits: collections.Counter = collections.Counter()
    saved = {name: getattr(torch.Tensor, name) for name in (*SYNCS, "__getitem__", "__setitem__")}

    def counted(name, method):
        def wrapper(*args, **kwargs):
            if name in ("__getitem__", "__setitem__"):
                index = args[1] if isinstance(args[1], tuple) else (args[1],)
                if not any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                    return method(*args, **kwargs)
            caller = traceback.extract_stack(limit=2)[0]
            if "/moevl/" in caller.filename and caller.name not in CPU_ONLY:
                hits[(name, f"{caller.filename.split('/moevl/')[-1]}:{caller.lineno}")] += 1
            return method(*args, **kwargs)

        return wrapper

    for name, method in saved.items():
        setattr(torch.Tensor, name, counted(name, method))
    try:
        yield hits
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def _trainer(model, tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, report_to=[], use_cpu=True
    )
    trainer = MoETrainer(model=model.train(), args=args)
    trainer.current_gradient_accumulation_steps = 1  # what the Trainer's loop sets before a step
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    return trainer


MODELS = {
    "topk": lambda: upcycle(causal_lm("llama"), num_experts=4, top_k=2),
    "ltdr": lambda: upcycle(causal_lm("llama"), num_experts=4, top_k=2, router="ltdr"),
    "stgc": lambda: upcycle(causal_lm("llama"), num_experts=4, top_k=2, stgc=STGCConfig()),
    "adopted": lambda: adopt(native_moe("qwen3_moe"), balance_coef=0.01),
}


@pytest.mark.parametrize("case", sorted(MODELS))
def test_a_micro_step_reads_nothing_and_a_logging_step_once(case, tmp_path):
    torch.manual_seed(0)
    model = MODELS[case]()
    trainer = _trainer(model, tmp_path)
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding: unused expert slots
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    trainer.training_step(model, inputs)  # the first step builds what the later ones reuse
    with host_reads() as micro:
        trainer.training_step(model, inputs)
    layers = len(moe_blocks(model))
    if case == "stgc":
        # the one read left: STGC's observer takes the used rows of each layer's dispatch (in backward)
        assert dict(micro) == {("__int__", "moe/expert_function.py:" + _used_rows_line()): layers}
    else:
        assert dict(micro) == {}
    with host_reads() as logging:
        trainer.log({"loss": 1.0})
    assert sum(logging.values()) == 1, logging  # the pending micro-steps' statistics, in one transfer
    assert {"router/entropy_normalized", "moe/balance_loss"} <= trainer.moe_history[-1].keys()
    assert trainer.expert_load  # the loads of both micro-steps, summed on the host
    guard = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "_FiniteGradientGuard")
    with host_reads() as optimizer_step:
        guard.on_pre_optimizer_step(trainer.args, trainer.state, trainer.control)
    assert sum(optimizer_step.values()) == 1, optimizer_step  # losses and gradient norms checked together


def _used_rows_line() -> str:
    import inspect

    import moevl.moe.expert_function as ef

    lines, start = inspect.getsourcelines(ef._used_rows)
    return str(start + next(i for i, line in enumerate(lines) if "int(d.offsets[-1])" in line))


def test_a_non_finite_loss_still_stops_before_the_optimizer_step(tmp_path):
    from moevl.training.trainer import NonFiniteTrainingError

    model = MODELS["topk"]()
    trainer = _trainer(model, tmp_path)
    trainer._step_losses = [torch.tensor(1.0), torch.tensor(float("nan"))]
    guard = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "_FiniteGradientGuard")
    with pytest.raises(NonFiniteTrainingError, match="non-finite loss"):
        guard.on_pre_optimizer_step(trainer.args, trainer.state, trainer.control)
