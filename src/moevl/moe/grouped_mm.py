"""The grouped matmul under ``GroupedExperts``: rows sorted by expert, one matmul per expert group.

Rows of ``a`` are grouped by ``offsets`` (E,) int32, the cumulative row counts: expert ``e`` owns
rows ``[offsets[e-1], offsets[e])``. Rows at or after ``offsets[-1]`` belong to no expert; their
output rows are unspecified (garbage, possibly NaN) and the caller masks them.

Fast path: ``torch.nn.functional.grouped_mm`` (``torch._grouped_mm`` before torch 2.10), on CPU
and on CUDA sm80+. Its alignment rule: every operand's data pointer and every stride that is not 1
must be a multiple of 16 bytes (fp32: sizes divisible by 4; bf16/fp16: by 8). Elsewhere the same
result comes from a per-expert loop of ``torch.mm`` that reads the row counts on the host; only that
fallback synchronises with the device.

Padded groups: with ``capacity=C`` every expert owns exactly ``C`` rows (expert ``e`` rows
``[e·C, (e+1)·C)``, the layout ``moe/expert_function.py`` pads to on multi-threaded CPU) and both
functions are one ``torch.bmm`` over (E, C, ·) views: one parallel region for all experts, where
torch's CPU ``grouped_mm`` runs one ``mm`` (one parallel region, one thread barrier) per expert.

Under ``torch.compile`` both ops are opaque custom ops (``moevl::grouped_matmul``,
``moevl::grouped_weight_grad``) with shape-only fake implementations: the compiled graph calls the
same eager kernels (the loop fallback's host read of the counts then stays inside the op instead of
breaking the graph). Their backward is the experts' hand-written one, so they need no autograd rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_grouped_mm_fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _aligned(t: Tensor) -> bool:
    size = t.element_size()
    if t.data_ptr() % 16:
        return False
    return all(s == 1 or (s * size) % 16 == 0 for s in t.stride())


def can_use_grouped_mm(*tensors: Tensor) -> bool:
    """Whether ``grouped_mm`` can run on these operands: same supported dtype, sm80+ on CUDA,
    16-byte aligned data pointers and strides."""
    if _grouped_mm_fn is None:
        return False
    t0 = tensors[0]
    if t0.dtype not in GROUPED_DTYPES or any(t.dtype != t0.dtype for t in tensors):
        return False
    if t0.device.type == "cuda" and torch.cuda.get_device_capability(t0.device) < (8, 0):
        return False
    return all(_aligned(t) for t in tensors)


def _groups(offsets: Tensor) -> list[tuple[int, int]]:
    """(start, end) row range of each expert, on the host (the loop fallback's only sync)."""
    ends = offsets.tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def grouped_matmul(a: Tensor, b: Tensor, offsets: Tensor, *, capacity: int | None = None) -> Tensor:
    """``out[rows of e] = a[rows of e] @ b[e]``.

    Args:
        a: (P, K) rows sorted by expert.
        b: (E, K, M) one matrix per expert (a transposed view of an (E, M, K) weight is fine).
        offsets: (E,) int32 cumulative row counts.
        capacity: padded groups (module doc): ``P = E·capacity`` and expert ``e`` owns rows
            ``[e·capacity, (e+1)·capacity)``; ``offsets`` is then not read.
    Returns:
        (P, M); rows at or after ``offsets[-1]`` are unspecified.
    """
    if capacity is not None:
        return torch.bmm(_by_expert(a, b.shape[0], capacity), b).view(a.shape[0], b.shape[-1])
    if torch.compiler.is_compiling():
        return _grouped_matmul_op(a, b, offsets)
    return _grouped_matmul_eager(a, b, offsets)


def grouped_weight_grad(
    out_grads: Tensor, inputs: Tensor, offsets: Tensor, *, capacity: int | None = None
) -> Tensor:
    """Per-expert ``Σ_rows δ_t x_tᵀ``, the weight gradient of ``y = W_e x`` in the weight's own
    (E, d_out, d_in) layout (no transpose copy when it is accumulated into ``.grad``).

    Args:
        out_grads: (P, d_out) δ, rows sorted by expert.
        inputs: (P, d_in) x, the same rows.
        offsets: (E,) int32 cumulative row counts.
        capacity: padded groups, as in ``grouped_matmul`` (every row is read: padding rows must
            hold zero out_grads).
    Returns:
        (E, d_out, d_in); zero for an expert without rows. Rows at or after ``offsets[-1]`` are
        ignored.
    """
    if capacity is not None:
        e = offsets.shape[0]
        return torch.bmm(_by_expert(out_grads, e, capacity).transpose(1, 2), _by_expert(inputs, e, capacity))
    if torch.compiler.is_compiling():
        return _grouped_weight_grad_op(out_grads, inputs, offsets)
    return _grouped_weight_grad_eager(out_grads, inputs, offsets)


def _by_expert(t: Tensor, num_experts: int, capacity: int) -> Tensor:
    """(E·C, K) rows as (E, C, K) (a view of rows with one common stride)."""
    if t.shape[0] != num_experts * capacity:
        raise ValueError(f"padded groups need E·capacity = {num_experts}·{capacity} rows, got {t.shape[0]}")
    return t.reshape(num_experts, capacity, t.shape[1])


def _grouped_matmul_eager(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    if can_use_grouped_mm(a, b):
        return _grouped_mm_fn(a, b, offs=offsets)
    out = a.new_empty(a.shape[0], b.shape[-1])
    for e, (start, end) in enumerate(_groups(offsets)):
        if end > start:
            torch.mm(a[start:end], b[e], out=out[start:end])
    return out


def _grouped_weight_grad_eager(out_grads: Tensor, inputs: Tensor, offsets: Tensor) -> Tensor:
    num_experts = offsets.shape[0]
    d_t = out_grads.t()  # (d_out, P)
    if out_grads.shape[0] > 0 and can_use_grouped_mm(d_t, inputs):
        return _grouped_mm_fn(d_t, inputs, offs=offsets)
    out = out_grads.new_zeros(num_experts, out_grads.shape[1], inputs.shape[1])
    if out_grads.shape[0] > 0:
        for e, (start, end) in enumerate(_groups(offsets)):
            if end > start:
                torch.mm(d_t[:, start:end], inputs[start:end], out=out[e])
    return out


# The compiler's view of the two ops (eager calls the functions directly, without the dispatcher).
_grouped_matmul_op = torch.library.custom_op("moevl::grouped_matmul", _grouped_matmul_eager, mutates_args=())
_grouped_weight_grad_op = torch.library.custom_op(
    "moevl::grouped_weight_grad", _grouped_weight_grad_eager, mutates_args=()
)


@_grouped_matmul_op.register_fake
def _(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[-1])


@_grouped_weight_grad_op.register_fake
def _(out_grads: Tensor, inputs: Tensor, offsets: Tensor) -> Tensor:
    return out_grads.new_empty(offsets.shape[0], out_grads.shape[1], inputs.shape[1])
