"""The benchmark as torch datasets: scenes -> (pixel_values, input_ids, labels), and the collator.

Sequence layout (one image per example, ``P`` image tokens = number of vision patches), as LLaVA's
"<image>\n{question}" (``layout="image_first"``, the default)::

    <s>  <image>*P  question words  answer words </s>
    labels: -100 on <s>, image and question positions; the answer and </s> are learnt.

``layout="question_first"`` puts the question before the image (image tokens then see the
question). NOTE: with question-first, "count" and "exists" stayed exactly at the answer prior for
thousands of steps (the class word must be copied into the image tokens and matched there, a
three-factor saddle); image-first with the class word last, tied embeddings and a larger
initialisation (see ModelConfig) learns them. A question asked with a fixed class ("is there a 3")
is learnt in a few hundred steps either way: the hard part is binding the question's word to the
image's content.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerFast

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
from moevl.data.tokenizer import build_tokenizer, encode_words

SPLITS = ("train", "validation", "test")
CAPTION_PROMPT = "describe the image"
IGNORE = -100


@dataclass(frozen=True)
class DataConfig:
    """The benchmark recipe. Every field is a YAML key under ``data:``."""

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
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  # of the digit images
    train_scenes: int = 4000
    validation_scenes: int = 200
    test_scenes: int = 400
    questions_per_scene: int = 5
    caption_scenes: int = 4000
    seed: int = 0


@dataclass(frozen=True)
class Example:
    scene: Scene
    question: Question


@dataclass
class Benchmark:
    """Scenes and questions of every split, deterministic given ``config`` (its seed included)."""

    config: DataConfig
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


def build_benchmark(config: DataConfig, source: ImageSource | None = None) -> Benchmark:
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
                examples.append(
                    Example(scene, ask(rng, scene, family, source, balance=config.balance_answers))
                )
        bench.questions[split] = examples
    rng = np.random.default_rng([config.seed, len(SPLITS)])
    bench.captions = [
        sample_scene(rng, source, pools["train"], **scene_kw) for _ in range(config.caption_scenes)
    ]
    return bench


def benchmark_tokenizer(bench: Benchmark) -> PreTrainedTokenizerFast:
    return build_tokenizer(vocabulary(bench.source, bench.config.grid))


def pixel_tensor(canvas: np.ndarray) -> torch.Tensor:
    """(H, W) in [0, 1] -> (1, H, W) in [-1, 1]."""
    return torch.from_numpy(canvas * 2.0 - 1.0)[None]


def encode_prompt(
    tokenizer: PreTrainedTokenizerFast, text: str, num_image_tokens: int, layout: str = "question_first"
) -> list[int]:
    image = [tokenizer.convert_tokens_to_ids("<image>")] * num_image_tokens
    words = encode_words(tokenizer, text)
    if layout == "image_first":
        return [tokenizer.bos_token_id, *image, *words]
    return [tokenizer.bos_token_id, *words, *image]


class VQADataset(Dataset):
    """Questions (``kind="vqa"``) or captions (``kind="caption"``) of one split, encoded for training.

    Items are dicts of ``pixel_values`` (1, H, W), ``input_ids`` (L,), ``labels`` (L,),
    and for evaluation ``prompt_ids``, ``answer``, ``family``.
    """

    def __init__(
        self,
        bench: Benchmark,
        tokenizer: PreTrainedTokenizerFast,
        *,
        split: str = "train",
        kind: str = "vqa",
        num_image_tokens: int,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if kind == "vqa":
            items = [
                (ex.scene, ex.question.text, ex.question.answer, ex.question.family)
                for ex in bench.questions[split]
            ]
        elif kind == "caption":
            if split != "train":
                raise ValueError("captions exist for the train split only")
            items = [(sc, CAPTION_PROMPT, caption(sc, bench.source), "caption") for sc in bench.captions]
        else:
            raise ValueError(f"unknown dataset kind {kind!r}; expected 'vqa' or 'caption'")
        self.items = items
        self.bench = bench
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self._pixels: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        scene, text, answer, family = self.items[i]
        prompt = encode_prompt(self.tokenizer, text, self.num_image_tokens, self.bench.config.layout)
        target = [*encode_words(self.tokenizer, answer), self.tokenizer.eos_token_id]
        key = id(scene)
        if key not in self._pixels:
            self._pixels[key] = pixel_tensor(self.bench.render(scene))
        return {
            "pixel_values": self._pixels[key],
            "input_ids": torch.tensor(prompt + target),
            "labels": torch.tensor([IGNORE] * len(prompt) + target),
            "prompt_ids": torch.tensor(prompt),
            "answer": answer,
            "family": family,
        }


@dataclass
class VQACollator:
    """Right-pads ``input_ids``/``labels`` for training; drops the evaluation-only fields."""

    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(b["input_ids"]) for b in batch)
        input_ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            input_ids[i, :n] = b["input_ids"]
            labels[i, :n] = b["labels"]
            attention_mask[i, :n] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
            "labels": labels,
        }
