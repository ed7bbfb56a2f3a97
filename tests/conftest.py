"""Environment shared by every test and by the processes the tests start."""

import os

# The multi-process tests (DDP, FSDP2, DeepSpeed, torchrun; gloo on CPU) run on one machine: gloo binds to
# loopback. Left to itself, gloo binds to the address of the machine's hostname, and where that name does
# not resolve (some CI containers) its fallback hung the ranks spawned under pytest.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
