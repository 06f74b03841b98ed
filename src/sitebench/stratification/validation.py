"""Argument checks shared by the statistics modules (one wording for one mistake)."""

from __future__ import annotations

from sitebench.errors import SitebenchError

__all__ = ["check_alpha"]


def check_alpha(alpha: float) -> float:
    """A significance level strictly between 0 and 1, as a float."""
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise SitebenchError(f"alpha must be a number between 0 and 1, got {alpha!r}") from None
    if not 0.0 < alpha < 1.0:
        raise SitebenchError(f"alpha must be between 0 and 1 (e.g. 0.05 for 95% CIs), got {alpha!r}")
    return alpha
