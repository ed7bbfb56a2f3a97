"""The end-to-end check of an adopted block: its output equals the native block's on probe inputs (in
eval and train mode), within ``PROBE_TOLERANCE`` in float32."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moevl.hf.adopt.experts_spec import experts_child
from moevl.hf.adopt.rule import first_tensor, probe_inputs, tolerance
from moevl.hf.block import MoEBlock


@torch.no_grad()
def check_end_to_end(
    adopted: MoEBlock, probes_native: list[tuple[Tensor, bool, Tensor]], run: nn.Module | None = None
) -> float:
    """max |Δ| (in tolerances) between the adopted block and the native outputs; ``run``: what is run
    on the probes (the adopted block, or the routed part of a layer that holds its experts)."""
    diff = 0.0
    training = adopted.training
    records = adopted.context.records
    run = adopted if run is None else run
    try:
        for hidden, mode, ref in probes_native:
            adopted.train(mode)
            torch.manual_seed(0)
            out = first_tensor(run(hidden.clone()))  # a block may scale its input in place (jitter)
            diff = max(diff, float((out.float() - ref.float()).abs().max()) / tolerance(ref))
    finally:
        adopted.train(training)
        records.clear()
    return diff


@torch.no_grad()
def native_outputs(block: nn.Module) -> list[tuple[Tensor, bool, Tensor]]:
    """``(hidden, training mode, output)`` of the native ``block`` on the end-to-end check's probe inputs."""
    experts = getattr(block, experts_child(block))
    training = block.training
    out = []
    try:
        for _, mode, hidden in probe_inputs(experts, seed_offset=100):
            block.train(mode)
            torch.manual_seed(0)
            out.append((hidden, mode, first_tensor(block(hidden.clone())).clone()))
    finally:
        block.train(training)
    return out
