"""Is every site's performance within a margin of the others? TOST per site, intersection-union overall.

Per site, the mean of a per-scan performance value (an error, a Dice, a volume
difference...) is compared with the mean of all other sites by two one-sided Welch t-tests
(Schuirmann 1987): H0 is |difference| >= margin; equivalence is shown when both one-sided
p-values are below alpha, i.e. when the (1 - 2 alpha) CI lies inside (-margin, margin).

* The claim "every site is within the margin" is an intersection-union test (Berger 1982):
  it holds when every site's TOST rejects at alpha, with no multiplicity penalty; its
  p-value is the largest site p-value.
* Claims made about individual sites are Holm-adjusted across sites.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from sitebench.errors import SitebenchError
from sitebench.provenance import jsonable
from sitebench.stratification.validation import check_margin

__all__ = ["SiteEquivalence", "site_equivalence", "holm"]

MIN_SCANS = 2
COLUMNS = ("site", "n_site", "n_rest", "mean_site", "mean_rest", "difference", "ci_low", "ci_high",
           "p_lower", "p_upper", "p_tost", "p_holm", "equivalent", "equivalent_holm")


def holm(p_values: list[float]) -> list[float]:
    """Holm (1979) step-down adjusted p-values, in the input order (statsmodels' implementation)."""
    from statsmodels.stats.multitest import multipletests

    return [float(p) for p in multipletests(p_values, method="holm")[1]] if p_values else []


@dataclass
class SiteEquivalence:
    """Per-site TOST against the rest, and the intersection-union claim over all sites."""

    value: str
    margin: float
    alpha: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def all_within_margin(self) -> bool:
        """The intersection-union decision: every estimable site is equivalent, and none is not estimable."""
        return bool(self.rows) and all(r["equivalent"] for r in self.rows) and not self.notes

    @property
    def p_intersection_union(self) -> float | None:
        ps = [r["p_tost"] for r in self.rows]
        return max(ps) if ps and all(p is not None for p in ps) else None

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=list(COLUMNS))

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "margin": self.margin, "alpha": self.alpha,
                "all_within_margin": self.all_within_margin, "p_intersection_union": self.p_intersection_union,
                "sites": [{k: jsonable(r[k]) for k in COLUMNS} for r in self.rows], "notes": list(self.notes)}

    def summary(self) -> str:
        level = f"{100 * (1 - 2 * self.alpha):g}%"
        lines = [f"Equivalence of '{self.value}' per site vs the rest: margin ±{self.margin:g}, "
                 f"TOST at alpha {self.alpha:g} ({level} CI inside the margin)",
                 f"{'site':<12}{'n':>6}{'diff':>11}{level + ' CI':>24}{'p TOST':>10}{'p Holm':>10}  verdict"]
        for r in self.rows:
            verdict = "equivalent" if r["equivalent_holm"] else ("equivalent (unadjusted)" if r["equivalent"]
                                                                  else "not shown")
            ci = f"[{r['ci_low']:.4g}, {r['ci_high']:.4g}]"
            lines.append(f"{str(r['site']):<12}{r['n_site']:>6}{r['difference']:>11.4g}{ci:>24}"
                         f"{r['p_tost']:>10.3g}{r['p_holm']:>10.3g}  {verdict}")
        p = self.p_intersection_union
        lines.append(f"every site within ±{self.margin:g}: {'YES' if self.all_within_margin else 'NO'} "
                     f"(intersection-union p = {'n/e' if p is None else f'{p:.3g}'})")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def site_equivalence(table: pd.DataFrame, value: str, site: str, margin: float,
                     alpha: float = 0.05) -> SiteEquivalence:
    """TOST of each site's mean ``value`` against the other sites' (Welch), margin in ``value``'s units."""
    for column in (value, site):
        if column not in table.columns:
            raise SitebenchError(f"no column '{column}' (have: {', '.join(map(str, table.columns))})")
    margin, alpha = check_margin(margin, alpha)
    values = pd.to_numeric(table[value], errors="coerce")
    if values.isna().any():
        raise SitebenchError(f"column '{value}' has {int(values.isna().sum())} missing or non-numeric value(s)")
    if float(values.std(ddof=0)) == 0.0:
        raise SitebenchError(f"column '{value}' is constant: there is no variation to test")
    sites = table[site].astype(str)
    levels = sorted(sites.unique())
    if len(levels) < 2:
        raise SitebenchError(f"column '{site}' has a single level: equivalence needs at least two sites")
    result = SiteEquivalence(value=value, margin=float(margin), alpha=float(alpha))
    x_all = values.to_numpy(float)
    for level in levels:
        mask = (sites == level).to_numpy()
        a, b = x_all[mask], x_all[~mask]
        if len(a) < MIN_SCANS or len(b) < MIN_SCANS:
            result.notes.append(f"site {level}: {len(a)} scan(s), not estimable (needs {MIN_SCANS})")
            continue
        result.rows.append(_tost_welch(level, a, b, float(margin), float(alpha)))
    adjusted = holm([r["p_tost"] for r in result.rows])
    for row, p in zip(result.rows, adjusted):
        row["p_holm"] = p
        row["equivalent_holm"] = p < alpha
    return result


def _tost_welch(level: str, a: np.ndarray, b: np.ndarray, margin: float, alpha: float) -> dict[str, Any]:
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    diff = float(a.mean() - b.mean())
    if se == 0:
        raise SitebenchError(f"site {level}: no variation within the site or the rest")
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    p_lower = float(stats.t.sf((diff + margin) / se, df))  # H0: diff <= -margin
    p_upper = float(stats.t.cdf((diff - margin) / se, df))  # H0: diff >= +margin
    half = float(stats.t.ppf(1 - alpha, df)) * se
    p_tost = max(p_lower, p_upper)
    return {"site": level, "n_site": len(a), "n_rest": len(b), "mean_site": float(a.mean()),
            "mean_rest": float(b.mean()), "difference": diff, "ci_low": diff - half, "ci_high": diff + half,
            "p_lower": p_lower, "p_upper": p_upper, "p_tost": p_tost, "p_holm": None,
            "equivalent": p_tost < alpha, "equivalent_holm": None}
