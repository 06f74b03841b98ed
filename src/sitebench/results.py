"""What every analysis returns: one protocol, so the command line and reports treat results alike.

A result (statsmodels-style) says itself in words (``summary()``), as a tidy table
(``to_frame()``) and as plain JSON-able data (``to_dict()``). The command line prints
``summary()``, or with ``--json`` exactly one JSON document made from ``to_dict()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pandas stays off the start-up path
    import pandas as pd


@runtime_checkable
class Summarized(Protocol):
    """What the command line prints: words, or one JSON document (verifications, QC records too)."""

    def summary(self) -> str:
        """A few lines a person reads."""
        ...

    def to_dict(self) -> Any:
        """The numbers as JSON-able data (dicts, lists, str, float, int, bool, None)."""
        ...


@runtime_checkable
class Result(Summarized, Protocol):
    """An analysis result: a readable summary, a tidy frame and a JSON-able dict."""

    def to_frame(self) -> pd.DataFrame:
        """The numbers as a tidy table, one row per estimate."""
        ...
