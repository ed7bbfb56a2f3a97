"""Host memory: keep freed buffers for reuse instead of handing them back to the OS (glibc malloc).

Why: a CPU training step allocates and frees the same large buffers every step: the experts' rows
sorted by expert, their activations, and the per-expert weight gradients (E · 3·H·D floats: 100 MB
per layer at E=64, H=256, D=512, where a dense MLP's are 64 times smaller). glibc serves every
allocation above its mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh ``mmap`` and unmaps
it on ``free``, so each step pays a page fault and the kernel's zeroing for every 4 KiB page it writes
again. On our 2-core machine that was about a quarter of a MoE layer's forward+backward at E=64
(``bench/results/moe_layer.md`` compares both settings side by side). Intel's PyTorch CPU tuning guide names the same cost when it recommends jemalloc or tcmalloc;
this does the same with the allocator already loaded.

``retain_freed_memory()`` raises the mmap threshold (allocations below it come from the heap and
are reused after ``free``) and switches off trimming of the heap's top. The price: the process keeps
its peak heap size instead of shrinking after a peak. ``moevl``'s commands call it at start
(``moevl --system-malloc ...`` does not); library users call it themselves. It changes nothing on
an accelerator's memory, and does nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import platform

__all__ = ["retain_freed_memory"]

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 1 << 30  # 1 GiB: only buffers larger than this are mapped (and unmapped) one by one
TOP_PAD = 64 << 20  # grow the heap 64 MiB at a time


def retain_freed_memory() -> bool:
    """Make glibc's malloc reuse freed host memory (see the module doc). Returns whether it applied:
    False where the C library is not glibc or refuses a setting. Calling it again changes nothing."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, TOP_PAD))
    return all(mallopt(param, value) == 1 for param, value in settings)
