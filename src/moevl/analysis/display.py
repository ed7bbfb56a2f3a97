"""How results are shown, the same in every table and figure of both reports (VLM and detection):
mean ± std over seeds (the value alone for one seed), and one colour per method name."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["METHOD_COLORS", "MeanStd", "format_mean_std", "mean_std", "method_color"]


class MeanStd(NamedTuple):
    """Mean and sample standard deviation of ``n`` values (``std`` 0 when ``n`` is 1)."""

    mean: float
    std: float
    n: int


def mean_std(values: Sequence[float]) -> MeanStd:
    """Mean and sample standard deviation (0 for one value); NaN for none."""
    if not len(values):
        return MeanStd(math.nan, math.nan, 0)
    a = np.asarray(values, dtype=float)
    return MeanStd(float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0, len(a))


def format_mean_std(stat: MeanStd | None, *, scale: float = 1.0, digits: int = 1) -> str:
    """``"61.2 ± 3.4"``; one value alone (``"61.2"``: a spread of one seed is unknown, not 0);
    ``"n/a"`` for none."""
    if stat is None or stat.n == 0 or math.isnan(stat.mean):
        return "n/a"
    if stat.n == 1:
        return f"{scale * stat.mean:.{digits}f}"
    return f"{scale * stat.mean:.{digits}f} ± {scale * stat.std:.{digits}f}"


# Fixed colours for the methods moevl knows (tab10), so a method looks the same in every figure and in
# every report, whichever other methods ran.
METHOD_COLORS = {
    "dense": "#7f7f7f",
    "teacher": "#7f7f7f",
    "baseline": "#1f77b4",
    "none": "#1f77b4",
    "stgc": "#ff7f0e",
    "ltdr": "#2ca02c",
    "stgc+ltdr": "#d62728",
    "kl": "#9467bd",
    "ld": "#8c564b",
    "bckd": "#d62728",
}
_OTHER_COLORS = ("#e377c2", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")


def method_color(name: str) -> str:
    """The colour of method ``name``: fixed for known methods, else chosen by a hash of the name (stable
    across runs and figures, unlike matplotlib's colour cycle, which depends on drawing order)."""
    if name in METHOD_COLORS:
        return METHOD_COLORS[name]
    return _OTHER_COLORS[zlib.crc32(name.encode()) % len(_OTHER_COLORS)]
