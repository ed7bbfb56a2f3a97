"""moevl.allocator: freed host buffers are reused, not faulted in again (each case in a fresh process,
since the setting is process-wide)."""

import platform
import subprocess
import sys

import pytest

# Allocates, writes and frees a 64 MiB tensor: 16 warm-up rounds, then 16 measured rounds, and prints whether
# the setting applied (twice: calling again is harmless), the minor page faults and the growth of the
# resident set over the measured rounds. The heap settles within about 10 rounds: torch's 64-byte aligned
# requests do not fit into the chunk freed just before, so the heap holds up to about 8 such buffers.
PROGRAM = """
import resource, sys, torch
from moevl.allocator import retain_freed_memory
applied = [retain_freed_memory(), retain_freed_memory()] if sys.argv[1] == "retain" else []
def rounds(n):
    for _ in range(n):
        t = torch.empty(16 * 2**20)
        t.fill_(1.0)
        del t
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
rounds(16)
faults, rss = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, resident()
rounds(16)
print(all(applied), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, resident() - rss)
"""


def _run(mode: str) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    applied, faults, growth = out.stdout.split()
    return applied, int(faults), int(growth)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting exists only in glibc")
def test_freed_buffers_are_reused_without_page_faults_or_growth():
    applied, retained, growth = _run("retain")
    _, system, _ = _run("system")
    pages = 16 * 64 * 2**20 // 4096
    assert applied == "True"  # both calls applied
    assert system > pages // 2  # the default unmaps each freed buffer: about one fault per page per round
    assert retained < pages // 50  # kept: the same pages again
    assert growth < 4 * 2**20  # and the heap does not grow with the rounds (not a leak)
