"""``bench/gpu.sh --cpu``: the GPU check's own code path on tiny shapes (a smoke test; its numbers are not
asserted, only that every arm ran and what it reports is consistent)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # multi-process or end-to-end: `pytest -m 'not slow'` skips them

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_mode_runs_every_arm(tmp_path):
    env = {**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--cpu", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_step_cpu.json").read_text())
    rows = result["rows"]
    assert [(r["stgc"], r["compile"]) for r in rows] == [
        (False, False),
        (True, False),
        (False, True),
        (True, True),
    ]
    # stage 3: the experts and routers of the one MoE layer (alternate layers of 2) train, nothing else:
    # E x (gate, up, down) x H x D + E x D router weights
    d, h, e = result["shape"]["hidden_size"], result["shape"]["intermediate_size"], 4
    assert {r["trainable_parameters"] for r in rows} == {e * 3 * h * d + e * d}
    tokens = result["shape"]["batch"] * result["shape"]["seq"]
    for r in rows:
        assert r["step_s"] > 0 and abs(r["tokens_per_s"] * r["step_s"] - tokens) < 1e-6 * tokens
        assert (r["stgc_overhead"] is None) == (not r["stgc"])
    assert "| on | on |" in (tmp_path / "gpu_step_cpu.md").read_text()
