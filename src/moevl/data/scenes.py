"""Scenes of several digits on a grid, and the questions and captions asked about them.

A scene is a ``grid x grid`` canvas of 8x8 cells; each cell holds one image of the split's
pool or is empty. Question families (answers are one word):

- ``position``  "what digit is at the top left"              -> "7" | "empty"
- ``count``     "how many digits are 7"                      -> "0" .. str(grid**2)
- ``sum``       "what is the sum of the left column"         -> "0" .. str(9*grid)   (digits only)
- ``exists``    "is there a 3"                               -> "yes" | "no"
- ``compare``   "which is larger , the top row or the bottom row" -> "top" | "bottom" | "same"
                (row or column sums; digits only)

Questions end with their last content word, no "?": with the image before the question (the default
layout) the answer is predicted at that word, so for "count" and "exists" the class word's own query
can look for matching image tokens (one attention hop instead of copying it to a later token first).

A *negated* "exists" question (``ask(..., negated=True)``) is "is there no 3", answered the opposite way:
its answer token's gradient is the exact opposite of the plain question's (two answers: raising "no" is
lowering "yes"), reaching the same image tokens through the same read-out until the model learns the negation.
Where plain questions are the majority, the negated ones' gradients point against their expert's mean: STGC's
premise by construction, the answers being binary (the inverted questions' are not: 9 - c and c are two of
ten classes, whose gradients are near orthogonal, not opposite).

Captions (projector pre-training) list the cells in reading order: "7 none 2 0 ...".

An *inverted* question (``ask(..., inverted=True)``) starts with the word "inverted" and is answered as if
every class ``c`` in the scene were ``9 - c`` ("inverted what digit is at the top left" -> "2" for a 7):
the same image tokens must be read in two opposite ways, chosen by a prompt word. Mixing both kinds puts
conflicting gradients on the same visual tokens by construction (STGC's premise).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moevl.data.images import CELL, ImageSource

FAMILIES = ("position", "count", "sum", "exists", "compare")
NEGATION = {"yes": "no", "no": "yes"}
NUMERIC_FAMILIES = ("sum", "compare")

ROW_WORDS = {2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
COL_WORDS = {2: ("left", "right"), 3: ("left", "middle", "right")}
# NOTE: not "none": the VQAv2 answer normalisation maps "none" to "0", which is a digit here.
EMPTY = "empty"


def cell_words(grid: int) -> list[str]:
    """Name of each cell in reading order, e.g. "top left", ..., "center" (3x3)."""
    names = []
    for r in ROW_WORDS[grid]:
        for c in COL_WORDS[grid]:
            names.append("center" if (r, c) == ("middle", "middle") else f"{r} {c}")
    return names


@dataclass(frozen=True)
class Scene:
    """``labels``: (grid, grid) int, -1 for an empty cell; ``image_ids``: same shape, index into the source."""

    labels: np.ndarray
    image_ids: np.ndarray

    @property
    def grid(self) -> int:
        return self.labels.shape[0]

    def render(self, source: ImageSource) -> np.ndarray:
        """The canvas (grid*8, grid*8) float32 in [0, 1]."""
        g = self.grid
        canvas = np.zeros((g * CELL, g * CELL), dtype=np.float32)
        for r in range(g):
            for c in range(g):
                if self.labels[r, c] >= 0:
                    canvas[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = source.images[
                        self.image_ids[r, c]
                    ]
        return canvas


@dataclass(frozen=True)
class Question:
    family: str
    text: str
    answer: str


def sample_scene(
    rng: np.random.Generator,
    source: ImageSource,
    pool: np.ndarray,
    *,
    grid: int,
    empty_prob: float,
    palette: tuple[int, int] = (10, 10),
) -> Scene:
    """Cells empty with probability ``empty_prob`` (at least one cell filled).

    Each scene first draws a palette of ``k`` classes, ``k`` uniform in ``palette`` (inclusive), and
    its cells' classes uniformly from the palette: small palettes repeat classes, so counts above 1
    are common. ``(10, 10)``: every class uniform.
    """
    filled = rng.random((grid, grid)) >= empty_prob
    if not filled.any():
        filled[rng.integers(grid), rng.integers(grid)] = True
    k = int(rng.integers(palette[0], palette[1] + 1))
    classes = rng.permutation(10)[:k]
    labels = np.where(filled, classes[rng.integers(0, k, size=(grid, grid))], -1)
    image_ids = np.full((grid, grid), -1, dtype=np.int64)
    pool_labels = source.labels[pool]
    for r, c in zip(*np.nonzero(filled), strict=True):
        candidates = pool[pool_labels == labels[r, c]]
        image_ids[r, c] = candidates[rng.integers(len(candidates))]
    return Scene(labels=labels, image_ids=image_ids)


def caption(scene: Scene, source: ImageSource) -> str:
    return " ".join(source.class_words[v] if v >= 0 else EMPTY for v in scene.labels.ravel())


def _line(scene: Scene, axis: str, i: int) -> np.ndarray:
    line = scene.labels[i] if axis == "row" else scene.labels[:, i]
    return np.where(line >= 0, line, 0)


def ask(
    rng: np.random.Generator,
    scene: Scene,
    family: str,
    source: ImageSource,
    *,
    balance: bool = True,
    inverted: bool = False,
    negated: bool = False,
) -> Question:
    """One question of ``family`` about ``scene``; answer-balancing choices use ``rng``. ``inverted``: the
    question of the scene whose classes are ``9 - c`` (module doc), its text prefixed with "inverted".

    ``negated``: an "exists" question is asked "is there no 7", its answer the opposite (other families are
    asked as usual).

    ``balance``: "count" draws its answer uniformly from the counts the scene offers (0 and the count
    of each present class), then a class with that count, so no count dominates; otherwise it asks
    about a present class half the time and a uniform class otherwise (answers mostly "1").
    """
    if inverted:
        flipped = Scene(labels=np.where(scene.labels >= 0, 9 - scene.labels, -1), image_ids=scene.image_ids)
        q = ask(rng, flipped, family, source, balance=balance, negated=negated)
        return Question(family, f"inverted {q.text}", q.answer)
    if negated and family == "exists":
        q = ask(rng, scene, family, source, balance=balance)
        return Question(family, q.text.replace("is there a ", "is there no ", 1), NEGATION[q.answer])
    g, words = scene.grid, source.class_words
    noun = "digit" if source.numeric else "item"
    present = sorted({int(v) for v in scene.labels.ravel() if v >= 0})
    if family == "position":
        i = int(rng.integers(g * g))
        v = int(scene.labels.ravel()[i])
        return Question(family, f"what {noun} is at the {cell_words(g)[i]}", words[v] if v >= 0 else EMPTY)
    if family in ("count", "exists"):
        # Half the time ask about a class in the scene, so non-zero counts are common and
        # "exists" is balanced: present vs absent classes 50/50.
        absent = sorted(set(range(10)) - set(present))
        if family == "exists":
            c = int(rng.choice(absent if absent and rng.random() < 0.5 else present))
        elif balance:
            counts = {int((scene.labels == v).sum()): [] for v in present}
            for v in present:
                counts[int((scene.labels == v).sum())].append(v)
            if absent:
                counts[0] = absent
            n = sorted(counts)[int(rng.integers(len(counts)))]
            c = int(rng.choice(counts[n]))
        elif rng.random() < 0.5:
            c = int(rng.choice(present))
        else:
            c = int(rng.integers(10))
        n = int((scene.labels == c).sum())
        if family == "count":
            return Question(family, f"how many {noun}s are {words[c]}", str(n))
        return Question(family, f"is there a {words[c]}", "yes" if n > 0 else "no")
    if not source.numeric:
        raise ValueError(f"question family {family!r} needs numeric classes; source {source.name!r} has none")
    axis = "row" if rng.random() < 0.5 else "column"
    names = ROW_WORDS[g] if axis == "row" else COL_WORDS[g]
    if family == "sum":
        i = int(rng.integers(g))
        return Question(
            family, f"what is the sum of the {names[i]} {axis}", str(int(_line(scene, axis, i).sum()))
        )
    if family == "compare":
        a, b = (0, g - 1) if rng.random() < 0.5 else (g - 1, 0)  # order of mention is random
        sa, sb = _line(scene, axis, a).sum(), _line(scene, axis, b).sum()
        answer = names[a] if sa > sb else names[b] if sb > sa else "same"
        return Question(family, f"which is larger , the {names[a]} {axis} or the {names[b]} {axis}", answer)
    raise ValueError(f"the question family must be one of {', '.join(map(repr, FAMILIES))}, got {family!r}")


def vocabulary(source: ImageSource, grid: int) -> list[str]:
    """Every word a question, answer or caption of this source and grid can use (sorted)."""
    words = set(source.class_words) | {EMPTY, "yes", "no", "same", ",", "describe", "the", "image"}
    words |= set(ROW_WORDS[grid]) | set(COL_WORDS[grid]) | {"center", "row", "column"}
    words |= {str(i) for i in range(9 * grid + 1)}
    words |= {"what", "digit", "item", "is", "at", "how", "many", "are", "there", "sum", "of", "a", "which"}
    words |= {"digits", "items"}
    words |= {"larger", "or", "inverted"}
    return sorted(words)
