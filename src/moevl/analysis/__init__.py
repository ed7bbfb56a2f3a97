"""Routing and conflict statistics of a comparison: summaries, plots, the report."""

from moevl.analysis.report import mean_std, summarize, write_report

__all__ = ["mean_std", "summarize", "write_report"]
