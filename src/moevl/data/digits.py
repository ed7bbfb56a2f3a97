"""The embedded digit benchmark, written out as LLaVA-format data: PNG images and conversation JSON files.

Scenes are grids of real handwritten digits (scikit-learn's ``load_digits``, or Fashion-MNIST items);
each split draws its digit images only from its own pool. ``write_digit_benchmark`` writes:

* ``images/<split>/<n>.png`` (8-bit grayscale; the processor converts to RGB),
* ``captions.json`` (stage 1: "describe the image" -> the scene's caption),
* ``instruct.json`` (stages 2-3: the train questions, then the captions: LLaVA-1.5's instruction mix keeps
  captioning, and without it the small decoder fell back to the answer prior),
* ``validation.json`` and ``test.json`` (questions with a ``category`` field: the question family).

The files are a pure function of the config: same config, byte-identical files. A manifest with the config
is written last (atomically); a complete directory with the same manifest is reused, not rewritten.

Prompt layout (LLaVA's ``"<image>\n{question}"``): the image comes first. NOTE: with the question first,
"count" and "exists" stayed exactly at the answer prior for thousands of steps (the class word must be
copied into the image tokens and matched there, a three-factor saddle); image-first with the class word
last, tied embeddings and a larger initialisation (see ``moevl.vlm.checkpoint.TinyModelConfig``) learns them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from moevl.atomic import atomic_write_json, atomic_write_text
from moevl.data.images import ImageSource, load_source, split_indices
from moevl.data.scenes import (
    FAMILIES,
    NUMERIC_FAMILIES,
    Question,
    Scene,
    ask,
    caption,
    sample_scene,
    vocabulary,
)

SPLITS = ("train", "validation", "test")
CAPTION_PROMPT = "describe the image"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class BenchmarkConfig:
    """The digit benchmark's recipe. Every field is a YAML key under ``demo.benchmark:``."""

    source: str = "digits"  # "digits" | "fashion-mnist"
    source_path: str | None = None  # directory of Fashion-MNIST idx files (None: Debian's path)
    grid: int = 3  # 2 or 3 cells a side
    empty_prob: float = 0.3
    # Each scene draws its classes from a palette of k classes, k uniform in [lo, hi]: small
    # palettes repeat digits, so "count" answers spread over 0..4 instead of being mostly "1".
    palette: tuple[int, int] = (2, 10)
    # "count" answers drawn uniformly from the counts a scene offers (see scenes.ask).
    balance_answers: bool = True
    families: tuple[str, ...] = FAMILIES
    # Relative number of *train* questions per family: one integer per family of FAMILIES (position,
    # count, sum, exists, compare), whichever ``families`` asks; empty: equal. Validation and test
    # always hold every family in equal numbers. Default: count and exists (the families that bind
    # a word to image content) twice as often.
    family_weights: tuple[int, ...] = (1, 2, 1, 2, 1)
    # Where the question goes: after the image tokens (LLaVA's "<image>\n{question}"; see the
    # module's NOTE) or before them.
    layout: Literal["image_first", "question_first"] = "image_first"
    # Share of the questions (every split) asked "inverted": answered as if each class c were 9 - c
    # (moevl.data.scenes). 0.5 makes the conflict-rich variant (``CONFLICT_BENCHMARK``).
    inverted_share: float = 0.0
    # Share of the "exists" questions (every split) asked negated: "is there no 7", the answer the
    # opposite (moevl.data.scenes): opposite gradients on the same image tokens (``NEGATION_BENCHMARK``).
    negated_share: float = 0.0
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  # of the digit images
    train_scenes: int = 4000
    validation_scenes: int = 200
    test_scenes: int = 400
    questions_per_scene: int = 5
    caption_scenes: int = 4000
    seed: int = 0


#: The conflict-rich variant: half the questions inverted (``demo.benchmark.inverted_share``).
CONFLICT_BENCHMARK = ["demo.benchmark.inverted_share=0.5"]
#: The negation variant: "exists" questions only, 30% of them negated (``demo.benchmark.negated_share``).
NEGATION_BENCHMARK = ["demo.benchmark.families=[exists]", "demo.benchmark.negated_share=0.3"]


@dataclass(frozen=True)
class Example:
    scene: Scene
    question: Question


@dataclass
class Benchmark:
    """Scenes and questions of every split, deterministic given ``config`` (its seed included)."""

    config: BenchmarkConfig
    source: ImageSource
    pools: dict[str, np.ndarray]
    questions: dict[str, list[Example]] = field(default_factory=dict)
    captions: list[Scene] = field(default_factory=list)

    @property
    def families(self) -> tuple[str, ...]:
        if self.source.numeric:
            return self.config.families
        return tuple(f for f in self.config.families if f not in NUMERIC_FAMILIES)

    def family_cycle(self, split: str) -> list[str]:
        """Families in the order questions cycle through them: each ``weight`` times for train."""
        weights = self.config.family_weights
        if split != "train" or not weights:
            return list(self.families)
        by_family = dict(zip(FAMILIES, weights, strict=True))
        return [f for f in self.families for _ in range(by_family[f])]

    def render(self, scene: Scene) -> np.ndarray:
        return scene.render(self.source)


def build_benchmark(config: BenchmarkConfig, source: ImageSource | None = None) -> Benchmark:
    """All splits of the benchmark. Each split draws its images only from its own pool."""
    source = source if source is not None else load_source(config.source, config.source_path)
    pools = split_indices(source.labels, config.split_fractions, config.seed)
    bench = Benchmark(config=config, source=source, pools=pools)
    counts = {
        "train": config.train_scenes,
        "validation": config.validation_scenes,
        "test": config.test_scenes,
    }
    scene_kw = {"grid": config.grid, "empty_prob": config.empty_prob, "palette": config.palette}
    for s, split in enumerate(SPLITS):
        rng = np.random.default_rng([config.seed, s])
        cycle = bench.family_cycle(split)
        examples = []
        k = 0
        for _ in range(counts[split]):
            scene = sample_scene(rng, source, pools[split], **scene_kw)
            for _ in range(config.questions_per_scene):
                family = cycle[k % len(cycle)]  # families in the numbers family_cycle says
                k += 1
                # NOTE: no draw when the share is 0, so the plain benchmark's files stay as they were
                inverted = config.inverted_share > 0 and rng.random() < config.inverted_share
                negated = (
                    config.negated_share > 0 and family == "exists" and rng.random() < config.negated_share
                )
                question = ask(
                    rng,
                    scene,
                    family,
                    source,
                    balance=config.balance_answers,
                    inverted=inverted,
                    negated=negated,
                )
                examples.append(Example(scene, question))
        bench.questions[split] = examples
    rng = np.random.default_rng([config.seed, len(SPLITS)])
    bench.captions = [
        sample_scene(rng, source, pools["train"], **scene_kw) for _ in range(config.caption_scenes)
    ]
    return bench


def scene_png(canvas: np.ndarray) -> bytes:
    """(H, W) in [0, 1] -> PNG bytes, 8-bit grayscale (deterministic: no timestamps or metadata)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(canvas * 255).astype(np.uint8), mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


@dataclass(frozen=True)
class DigitFiles:
    """Paths of a written benchmark."""

    root: Path
    captions: Path
    instruct: Path
    validation: Path
    test: Path
    vocabulary: tuple[str, ...]

    @property
    def image_folder(self) -> Path:
        return self.root


def _conversation(
    rid: str, image: str, question: str, answer: str, category: str | None, layout: str = "image_first"
) -> dict:
    prompt = f"<image>\n{question}" if layout == "image_first" else f"{question}\n<image>"
    record = {
        "id": rid,
        "image": image,
        "conversations": [
            {"from": "human", "value": prompt},
            {"from": "gpt", "value": answer},
        ],
    }
    if category is not None:
        record["category"] = category
    return record


def write_digit_benchmark(out_dir: str | os.PathLike, config: BenchmarkConfig | None = None) -> DigitFiles:
    """Writes the benchmark of ``config`` into ``out_dir`` (module doc) unless it is already there."""
    config = config if config is not None else BenchmarkConfig()
    out = Path(out_dir)
    bench = build_benchmark(config)
    words = tuple(vocabulary(bench.source, config.grid))
    files = DigitFiles(
        root=out,
        captions=out / "captions.json",
        instruct=out / "instruct.json",
        validation=out / "validation.json",
        test=out / "test.json",
        vocabulary=words,
    )
    manifest = {"config": asdict(config), "format": 1}
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        try:
            if json.loads(manifest_path.read_text()) == json.loads(json.dumps(manifest)):
                return files
        except json.JSONDecodeError:
            pass
    # An older or partial benchmark: start over (the manifest goes last, so partial never looks complete).
    manifest_path.unlink(missing_ok=True)
    if (out / "images").exists():
        shutil.rmtree(out / "images")
    image_names: dict[int, str] = {}

    def image(scene: Scene, split: str) -> str:
        key = id(scene)
        if key not in image_names:
            name = f"images/{split}/{len(image_names):06d}.png"
            path = out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(scene_png(bench.render(scene)))
            image_names[key] = name
        return image_names[key]

    captions = [
        _conversation(
            f"caption-{i}",
            image(sc, "caption"),
            CAPTION_PROMPT,
            caption(sc, bench.source),
            None,
            config.layout,
        )
        for i, sc in enumerate(bench.captions)
    ]
    by_split = {
        split: [
            _conversation(
                f"{split}-{i}",
                image(ex.scene, split),
                ex.question.text,
                ex.question.answer,
                ex.question.family,
                config.layout,
            )
            for i, ex in enumerate(bench.questions[split])
        ]
        for split in SPLITS
    }
    dump = lambda rows: json.dumps(rows, indent=0) + "\n"  # noqa: E731
    atomic_write_text(files.captions, dump(captions))
    atomic_write_text(files.instruct, dump(by_split["train"] + captions))
    atomic_write_text(files.validation, dump(by_split["validation"]))
    atomic_write_text(files.test, dump(by_split["test"]))
    atomic_write_json(manifest_path, manifest)
    return files
