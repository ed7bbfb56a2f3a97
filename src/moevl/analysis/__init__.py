"""Routing and conflict statistics of a comparison: summaries, plots, the report."""

from moevl.analysis.display import MeanStd, format_mean_std, mean_std, method_color
from moevl.analysis.report import summarize, write_report

__all__ = ["MeanStd", "format_mean_std", "mean_std", "method_color", "summarize", "write_report"]
