"""The dispatch of the experts function: the ``P = N·K`` (token, slot) pairs as rows sorted by expert, the
padded layout (every expert's group padded to one capacity: one ``torch.bmm`` per projection on CPU), and the
row gathers and scatters both layouts share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


@dataclass(frozen=True)
class Dispatch:
    """The ``P = N·K`` (token, slot) pairs as rows sorted by expert.

    Attributes:
        order: (P,) long, the flat slot ``t·K + s`` of each row.
        token_ids: (P,) long, ``order // K``.
        expert_ids: (P,) long, sorted; ``E`` for unused slots (the rows past ``offsets[-1]``).
        offsets: (E,) int32, the end row of each expert's group.
        capacity: None for the layout above. Padded layout (``pad_to_capacity``): ``E·capacity``
            rows, expert ``e`` owning rows ``[e·capacity, (e+1)·capacity)``, its used rows first in
            the sorted layout's order, then padding rows: ``order = P``, ``token_ids = N``,
            ``expert_ids = E``, each one past the last real slot / token / expert, so every scatter
            drops them into an extra row. ``offsets`` is then ``capacity·(e+1)``.
        sorted_offsets: the sorted layout's ``offsets`` (the real group ends); None when it is this
            layout.
    """

    order: Tensor
    token_ids: Tensor
    expert_ids: Tensor
    offsets: Tensor
    capacity: int | None = None
    sorted_offsets: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.offsets.shape[0]

    @property
    def counts(self) -> Tensor:
        """(E,) long used rows per expert."""
        ends = self.offsets if self.sorted_offsets is None else self.sorted_offsets
        return torch.diff(ends.long(), prepend=ends.new_zeros(1, dtype=torch.long))

    @property
    def used(self) -> Tensor:
        """(P,) bool, the rows of used slots (``expert_ids < E``)."""
        return self.expert_ids < self.num_experts


def dispatch(indices: Tensor, num_experts: int) -> Dispatch:
    """Sort the (token, slot) pairs of ``indices`` (N, K) (``-1`` = unused) by expert."""
    k = indices.shape[1]
    flat = indices.reshape(-1)  # (N·K,)
    # unused slots get the key E so that they sort after every expert's rows
    keys = torch.where(flat < 0, num_experts, flat)
    expert_ids, order = torch.sort(keys, stable=True)
    bounds = torch.arange(1, num_experts + 1, device=indices.device, dtype=expert_ids.dtype)
    offsets = torch.searchsorted(expert_ids, bounds, out_int32=True)  # (E,) rows with key < e+1
    return Dispatch(order=order, token_ids=order // k, expert_ids=expert_ids, offsets=offsets)


# The padded layout (one torch.bmm per projection) replaces torch's per-expert CPU grouped_mm when the
# experts' ``layout`` says so; "auto" decides per call by ``choose_capacity``'s rule.
Layout = Literal["auto", "sorted", "padded"]
LAYOUTS: tuple[Layout, ...] = ("auto", "sorted", "padded")
# auto pads only while padding adds at most this fraction of rows (FLOPs) to the used ones
MAX_PADDING = 0.25


def choose_capacity(d: Dispatch, device: torch.device, *, lora: bool, layout: Layout = "auto") -> int | None:
    """The capacity to pad ``d`` to (``pad_to_capacity``), or None to keep the sorted layout.

    ``layout`` (the experts' setting): ``sorted`` (torch's grouped matmul, one ``mm`` per expert on CPU),
    ``padded`` (every expert padded to the largest group, one ``torch.bmm``; CPU, no LoRA adapters) or
    ``auto`` (the rule below).

    On CPU torch's ``grouped_mm`` is a loop of one ``mm`` per expert, each its own parallel region
    whose threads meet at a barrier: with many small groups that is many barriers, and on a shared
    machine each one waits for whichever thread the OS has descheduled. One ``bmm`` over experts
    padded to a common capacity is one parallel region, at the price of the padding rows' FLOPs.
    ``auto`` pads on CPU with more than one intra-op thread when that price is at most
    ``MAX_PADDING`` (one thread has no barrier to save); never on an accelerator (a real grouped
    kernel), under ``torch.compile`` (the capacity is read on the host), with LoRA adapters (their
    dropout masks are in the sorted layout), or without used rows.
    """
    if layout == "sorted" or device.type != "cpu" or lora or torch.compiler.is_compiling():
        return None
    counts = d.counts
    used = int(d.offsets[-1])
    if used == 0:
        return None
    capacity = int(counts.max())
    if layout == "padded":
        return capacity
    if torch.get_num_threads() < 2 or capacity * d.num_experts > (1 + MAX_PADDING) * used:
        return None
    return capacity


def pad_to_capacity(d: Dispatch, capacity: int, num_tokens: int) -> Dispatch:
    """``d`` (sorted layout) in the padded layout (``Dispatch``' doc) with ``capacity`` rows per expert
    (at least the largest group)."""
    e, p = d.num_experts, d.order.shape[0]
    used = int(d.offsets[-1])
    starts = d.offsets.long() - d.counts  # (E,)
    expert_ids = d.expert_ids[:used]
    # row i of the sorted layout (expert e, rank i - starts[e] in its group) -> e·C + rank
    rows = torch.arange(used, device=d.order.device) - starts[expert_ids] + expert_ids * capacity
    r = e * capacity

    def padded(values: Tensor, fill: int) -> Tensor:
        return values.new_full((r,), fill).index_copy_(0, rows, values[:used])

    bounds = torch.arange(1, e + 1, device=d.offsets.device, dtype=torch.int32) * capacity
    return Dispatch(
        order=padded(d.order, p),
        token_ids=padded(d.token_ids, num_tokens),
        expert_ids=padded(d.expert_ids, e),
        offsets=bounds,
        capacity=capacity,
        sorted_offsets=d.offsets,
    )


def gather_rows(t: Tensor, index: Tensor, d: Dispatch) -> Tensor:
    """``t[index]`` along dim 0; in the padded layout the padding rows' index (one past the end of
    ``t``) reads zeros."""
    if d.capacity is not None:
        t = torch.cat([t, t.new_zeros(1, *t.shape[1:])])
    return t.index_select(0, index)


def scatter_add_rows(rows: Tensor, index: Tensor, d: Dispatch, n: int) -> Tensor:
    """``out (n, ...) = Σ rows[i]`` into ``out[index[i]]``; unused rows are left out (zeroed in the
    sorted layout, overwritten; sent to a dropped extra row in the padded one)."""
    if d.capacity is None:
        return rows.new_zeros(n, *rows.shape[1:]).index_add_(0, index, zero_unused_rows_(rows, d))
    return rows.new_zeros(n + 1, *rows.shape[1:]).index_add_(0, index, rows)[:n]


def zero_unused_rows_(t: Tensor, d: Dispatch) -> Tensor:
    """``t[rows past offsets[-1]] = 0`` in place. On CPU the boundary is read on the host (free);
    elsewhere, and while compiling, a mask keeps the device from synchronising."""
    if d.capacity is not None:
        return t.masked_fill_(~d.used.view(-1, *([1] * (t.dim() - 1))), 0)
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        t[int(d.offsets[-1]) :] = 0
    else:
        t.masked_fill_(~d.used.view(-1, *([1] * (t.dim() - 1))), 0)
    return t
