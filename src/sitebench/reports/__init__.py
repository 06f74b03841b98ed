"""Versioned, locked validation reports (reads results and hashes files; never runs a model).

Names load on first use, so ``report verify`` does not import the HTML and figure builders.
"""

from __future__ import annotations

from sitebench.lazy import lazy_exports

_WHERE = {"ReportContent": "content", "Report": "build", "build_report": "build",
          "EXIT_CODES": "verify", "Verification": "verify", "verify_report": "verify"}

__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())
