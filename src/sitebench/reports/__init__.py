"""Versioned, locked validation reports (reads results and hashes files; never runs a model)."""

from sitebench.reports.content import ReportContent
from sitebench.reports.build import Report, build_report
from sitebench.reports.verify import EXIT_CODES, Verification, verify_report

__all__ = ["EXIT_CODES", "Report", "ReportContent", "Verification", "build_report", "verify_report"]
