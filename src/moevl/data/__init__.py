"""Embedded data: a VQA benchmark of scenes made from real handwritten digits (scikit-learn)."""

from moevl.data.dataset import (
    SPLITS,
    Benchmark,
    DataConfig,
    VQACollator,
    VQADataset,
    benchmark_tokenizer,
    build_benchmark,
)
from moevl.data.images import ImageSource, load_digits_source, load_fashion_mnist_source, split_indices
from moevl.data.scenes import FAMILIES, Question, Scene
from moevl.data.tokenizer import build_tokenizer

__all__ = [
    "FAMILIES",
    "SPLITS",
    "Benchmark",
    "DataConfig",
    "ImageSource",
    "Question",
    "Scene",
    "VQACollator",
    "VQADataset",
    "benchmark_tokenizer",
    "build_benchmark",
    "build_tokenizer",
    "load_digits_source",
    "load_fashion_mnist_source",
    "split_indices",
]
