from dataclasses import dataclass
from pathlib import Path

import pytest

from moevl.data.digits import DigitFiles, write_digit_benchmark
from moevl.data.images import CELL
from moevl.vlm.checkpoint import build_llava_checkpoint
from moevl.vlm.compare import demo_config
from moevl.vlm.config import RunConfig
from moevl.vlm.train import train_stage

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


@dataclass
class Demo:
    cfg: RunConfig
    files: DigitFiles
    init: Path  # the untrained tiny checkpoint


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Demo:
    """The tiny digit benchmark written as LLaVA data and a tiny LLaVA checkpoint directory."""
    root = tmp_path_factory.mktemp("demo")
    cfg = demo_config(TINY)
    files = write_digit_benchmark(root / "data", cfg.demo.benchmark)
    init = build_llava_checkpoint(
        root / "init", cfg.demo.model, words=files.vocabulary, image_size=cfg.demo.benchmark.grid * CELL
    )
    return Demo(cfg, files, init)


def run_stage(demo: Demo, stage: int, out: Path, model: Path, cfg: RunConfig | None = None, **kwargs):
    data = demo.files.captions if stage == 1 else demo.files.instruct
    return train_stage(
        cfg or demo.cfg,
        stage=stage,
        model=model,
        output_dir=out,
        data=data,
        image_folder=demo.files.image_folder,
        progress=False,
        log=lambda *_: None,
        **kwargs,
    )


@pytest.fixture(scope="session")
def dense(demo, tmp_path_factory):
    """Stages 1 and 2 of the tiny demo (4 steps each)."""
    out = tmp_path_factory.mktemp("dense")
    s1 = run_stage(demo, 1, out / "s1", demo.init)
    s2 = run_stage(demo, 2, out / "s2", s1.model_dir)
    return s1, s2
