"""DeepSpeed ZeRO-2 and ZeRO-3 with STGC, LTDR and the aux-loss-free bias: 2 processes on CPU (gloo) give exactly
the weights (and choice biases: the load all-reduced over ranks equals the one accumulated over micro-steps) of
one process accumulating the same two micro-batches (tests/fixtures/deepspeed_run.py), and save a complete
moevl checkpoint. Before the fix in ``MoETrainer._aux_scale`` the auxiliary losses (balance, z, STGC) weighed
``world_size`` times more under DeepSpeed and DDP than in one process, and this test failed."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures.processes import run, torchrun

pytestmark = pytest.mark.slow  # multi-process or end-to-end: `pytest -m 'not slow'` skips them

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "fixtures" / "deepspeed_run.py"


def _run(out: Path, zero: int) -> dict[str, torch.Tensor]:
    launcher = torchrun(2) if zero else [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = run([*launcher, str(SCRIPT), "--zero", str(zero), "--out", str(out)], env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return load_file(out / "model" / "moevl-model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("reference"), zero=0)


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_matches_one_process_with_stgc_and_ltdr(tmp_path, reference, zero):
    got = _run(tmp_path, zero)
    assert set(got) == set(reference)
    biases = [k for k in reference if k.endswith("router.e_score_correction_bias")]
    assert biases and all(reference[k].abs().sum() > 0 for k in biases)  # moved once, by both records' load
    for k in reference:
        torch.testing.assert_close(got[k], reference[k], rtol=1e-5, atol=1e-6, msg=k)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == "moevl"
    settings = config["moevl"]["settings"]
    assert settings["router"] == "ltdr" and settings["stgc"]["weight"] == 1.0
    history = json.loads((tmp_path / "history.json").read_text())
    assert history[-1]["stgc/cel"] != 0 and 0 < history[-1]["ltdr/tail_share"] < 1  # centered: either sign
