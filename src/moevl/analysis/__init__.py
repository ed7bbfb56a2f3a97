"""Routing and conflict statistics of a comparison: summaries, plots, the report."""

from moevl.analysis.report import summarize, write_report

__all__ = ["summarize", "write_report"]
