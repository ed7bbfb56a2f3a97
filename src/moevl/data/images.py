"""Image sources for the embedded benchmark: scikit-learn's handwritten digits, or Fashion-MNIST.

Every source gives gray images in ``[0, 1]`` of one cell size (8x8), integer labels 0..9 and a
word per class. Splits are made from *disjoint images*, stratified by class, so that no digit
image seen in training appears in validation or test.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CELL = 8  # side of one cell in pixels (load_digits images are 8x8)

DIGIT_WORDS = tuple(str(i) for i in range(10))
FASHION_WORDS = (
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
)

# Where Debian's `dataset-fashion-mnist` package and common manual installs put the idx files.
FASHION_MNIST_DIRS = (
    "/usr/share/dataset-fashion-mnist",
    "/usr/share/datasets/fashion-mnist",
    "/usr/share/fashion-mnist",
)


@dataclass(frozen=True)
class ImageSource:
    """Images (M, 8, 8) float32 in [0, 1], labels (M,) int64 in 0..9, one word per class."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    class_words: tuple[str, ...]
    numeric: bool  # class index is the value (digits): sum/compare questions make sense


def load_digits_source() -> ImageSource:
    """scikit-learn's ``load_digits`` (1797 real handwritten digits, 8x8, 17 gray levels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    return ImageSource("digits", images, digits.target.astype(np.int64), DIGIT_WORDS, numeric=True)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {root}")


def find_fashion_mnist(path: str | os.PathLike | None = None) -> Path | None:
    """The first directory holding Fashion-MNIST idx files: ``path`` if given, else the known places."""
    candidates = [Path(path)] if path is not None else [Path(p) for p in FASHION_MNIST_DIRS]
    for root in candidates:
        try:
            _find_idx(root, "train-images-idx3-ubyte")
            return root
        except FileNotFoundError:
            continue
    return None


def load_fashion_mnist_source(
    path: str | os.PathLike | None = None, *, max_images: int = 6000
) -> ImageSource:
    """Fashion-MNIST from local idx files, average-pooled from 28x28 to 8x8 (a 7/2 area resize).

    ``max_images`` keeps the first images of the train file (a benchmark this size needs few).
    """
    root = find_fashion_mnist(path)
    if root is None:
        where = path if path is not None else ", ".join(FASHION_MNIST_DIRS)
        raise FileNotFoundError(
            f"Fashion-MNIST not found (looked in {where}); install Debian's dataset-fashion-mnist "
            "or pass data.source_path"
        )
    images = _read_idx(_find_idx(root, "train-images-idx3-ubyte"))[:max_images].astype(np.float32) / 255.0
    labels = _read_idx(_find_idx(root, "train-labels-idx1-ubyte"))[:max_images].astype(np.int64)
    import torch
    import torch.nn.functional as F

    small = F.adaptive_avg_pool2d(torch.from_numpy(images)[:, None], CELL)[:, 0].numpy()  # (M, 8, 8)
    small = small / np.maximum(small.max(axis=(1, 2), keepdims=True), 1e-6)
    return ImageSource("fashion-mnist", small.astype(np.float32), labels, FASHION_WORDS, numeric=False)


def load_source(name: str, path: str | None = None) -> ImageSource:
    if name == "digits":
        return load_digits_source()
    if name == "fashion-mnist":
        return load_fashion_mnist_source(path)
    raise ValueError(f"the image source must be 'digits' or 'fashion-mnist', got {name!r}")


def split_indices(
    labels: np.ndarray, fractions: tuple[float, float, float], seed: int
) -> dict[str, np.ndarray]:
    """Disjoint train/validation/test image indices, stratified by class, deterministic given ``seed``."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = round(fractions[0] * len(idx))
        n_val = round(fractions[1] * len(idx))
        parts["train"].append(idx[:n_train])
        parts["validation"].append(idx[n_train : n_train + n_val])
        parts["test"].append(idx[n_train + n_val :])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}
