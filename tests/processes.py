"""Child processes for the tests that start interpreters or launchers (torchrun, DeepSpeed, a fresh Python).

``run`` puts the child in its own process group and, when ``timeout`` passes, kills the whole group: a
launcher's workers (torchrun's ranks) would otherwise outlive it and keep the test session waiting.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest


def run(cmd: list[str], *, timeout: float, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run ``cmd`` with its output captured (text); the test fails, with the output's tail, after ``timeout`` s."""
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{cmd[:6]} ran past {timeout} s and was killed\n{out[-2000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun(nproc: int) -> list[str]:
    """The argv prefix of ``torchrun`` with ``nproc`` ranks on this machine, at 127.0.0.1 and a free port.

    Not ``--standalone``: its rendezvous publishes the machine's hostname to the ranks, which hang where
    that name does not resolve (some CI containers).
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(port)]  # fmt: skip
