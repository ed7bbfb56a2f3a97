"""Routing and conflict statistics of a comparison: summaries, plots, the report."""

from moevl._deprecated import moved_names
from moevl.analysis.report import summarize, write_report

__all__ = ["summarize", "write_report"]

#: Names this package exported before issue 25 cut its surface -> their module (one release, with a warning).
__getattr__ = moved_names(
    __name__,
    {name: "moevl.analysis.display" for name in ("MeanStd", "format_mean_std", "mean_std", "method_color")},
)
