"""Shared benchmark helpers: interleaved timing, saved-activation bytes, JSON + markdown output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
    ratio_to: str | None = None,
):
    """Median seconds per call of each function, calls interleaved so machine noise hits all alike.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read. With ``ratio_to``, also
    returns the median over rounds of each function's time divided by that function's time in the
    same round (a ratio that a noisy machine disturbs less than the absolute times).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            times[name].append(time.perf_counter() - t0)
    medians = {k: statistics.median(v) for k, v in times.items()}
    if ratio_to is None:
        return medians
    ratios = {
        k: statistics.median(a / b for a, b in zip(v, times[ratio_to], strict=True)) for k, v in times.items()
    }
    return medians, ratios


def saved_activation_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct tensors autograd saves for backward during ``fn()`` (activation memory)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor):
        if t.device.type != "meta" and t.numel():
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine() -> dict[str, object]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }


def write(
    name: str, payload: dict, table_header: list[str], rows: list[list[object]], notes: str = ""
) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1))
    lines = [
        f"# {name}",
        "",
        notes,
        "",
        "| " + " | ".join(table_header) + " |",
        "|" + "|".join("---" for _ in table_header) + "|",
    ]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _fmt(c: object) -> str:
    return f"{c:.3g}" if isinstance(c, float) else str(c)
