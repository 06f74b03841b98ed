"""Argument checks shared by the statistics modules (one wording for one mistake)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sitebench.errors import SitebenchError

__all__ = ["as_numeric", "check_alpha", "check_margin", "fmt_number"]


def check_alpha(alpha: float) -> float:
    """A significance level strictly between 0 and 1, as a float."""
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise SitebenchError(f"alpha must be a number between 0 and 1, got {alpha!r}") from None
    if not 0.0 < alpha < 1.0:
        raise SitebenchError(f"alpha must be between 0 and 1 (e.g. 0.05 for 95% CIs), got {alpha!r}")
    return alpha


def check_margin(margin: float, alpha: float) -> tuple[float, float]:
    """An equivalence margin (positive, finite) and a TOST alpha below 0.5, as floats."""
    if isinstance(margin, bool) or not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin > 0):
        raise SitebenchError(f"margin must be a positive number, got {margin!r}")
    if not 0 < alpha < 0.5:
        raise SitebenchError(f"alpha must be in (0, 0.5) for TOST (a {100 * (1 - 2 * alpha):g}% CI), got {alpha!r}")
    return float(margin), float(alpha)


def as_numeric(values: Any, name: str) -> np.ndarray:
    """The values as float64, missing values as NaN; a non-number is one error naming it.

    Each statistic then applies its own missing-value rule (metrics drop NaN per
    analysis; agreement and ROC analyses refuse them), but the wording for text in a
    numeric column is the same everywhere.
    """
    import pandas as pd

    series = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values, dtype=object))
    try:
        return pd.to_numeric(series, errors="raise").to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError):
        bad = next((v for v in series if not _is_number(v)), None)
        raise SitebenchError(f"{name} must be numeric; found {bad!r}") from None


def fmt_number(value: float | None, spec: str = ".4g", missing: str = "n/e") -> str:
    """A number for a summary() table; ``missing`` ("not estimable") for None, NaN or inf."""
    if value is None or not math.isfinite(float(value)):
        return missing
    return format(value, spec)


def _is_number(value: Any) -> bool:
    if value is None:
        return True
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
