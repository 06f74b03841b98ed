"""Argument checks shared by the statistics modules (one wording for one mistake)."""

from __future__ import annotations

import math

from sitebench.errors import SitebenchError

__all__ = ["check_alpha", "check_margin"]


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
