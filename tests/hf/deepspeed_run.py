"""One SGD step of an upcycled tiny LLaVA with STGC and LTDR through ``MoETrainer``, then ``save_model``.

Run by tests/hf/test_deepspeed.py: under ``torchrun --nproc_per_node 2`` with DeepSpeed ZeRO-2 / ZeRO-3
(one record per process), or in one process without DeepSpeed, accumulating the same two records as two
micro-batches (the reference). STGC's conflicts are per micro-batch, so both see the same micro-batches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moevl.hf import upcycle
from moevl.stgc import STGCConfig
from moevl.training import MoETrainer
from tests.hf.tiny import tiny_llava
from tests.training.test_trainer import _Data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zero", type=int, choices=(0, 2, 3), required=True)
    parser.add_argument("--out", required=True)
    a = parser.parse_args()
    torch.set_num_threads(1)
    model = upcycle(
        tiny_llava(),
        num_experts=4,
        top_k=2,
        router="ltdr",
        stgc=STGCConfig(threshold=0.2, weight=1.0),
        freeze_dense=True,
    )
    for block_router in (m for n, m in model.named_modules() if n.endswith(".router")):
        torch.nn.init.normal_(block_router.weight, std=0.5, generator=torch.Generator().manual_seed(1))
    distributed = a.zero > 0
    kwargs = {}
    if distributed:
        kwargs["deepspeed"] = {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
            "gradient_clipping": "auto",
            "zero_allow_untested_optimizer": True,
            "zero_optimization": {
                "stage": a.zero,
                **({"stage3_gather_16bit_weights_on_model_save": True} if a.zero == 3 else {}),
            },
        }
    args = TrainingArguments(
        output_dir=a.out,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1 if distributed else 2,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo" if distributed else None,
        disable_tqdm=True,
        logging_steps=1,
        **kwargs,
    )
    trainer = MoETrainer(model=model, args=args, train_dataset=_Data(n=2))
    trainer.train()
    trainer.save_model(os.path.join(a.out, "model"))
    if trainer.is_world_process_zero():
        Path(a.out, "history.json").write_text(json.dumps(trainer.moe_history))


if __name__ == "__main__":
    main()
