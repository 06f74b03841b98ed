"""Two model versions on the SAME scans, side by side, overall and per site.

When both versions read the same scans, each scan is its own control: comparing them
scan by scan removes the between-scan variation that an unpaired (per-model) comparison
would leave in the error term. Which test to use:

* :func:`paired_comparison` -- a continuous per-scan value (absolute error of a biomarker,
  Dice, volume difference...). Per scan, difference = value_b - value_a; per site and overall
  the paired t-test (CI and two-sided p, ``scipy.stats.ttest_rel`` / R ``t.test(paired=TRUE)``)
  and, with a ``margin``, the paired TOST (Schuirmann 1987; H0 |mean difference| >= margin,
  equivalence when the (1 - 2 alpha) CI lies inside (-margin, margin)). "Every site within the
  margin" is an intersection-union test (Berger 1982): all site TOSTs reject, p = the largest
  site p, no multiplicity penalty; claims about single sites use Holm-adjusted p-values.
  A Wilcoxon signed-rank p is added as a robustness check against non-normal differences.
* :func:`paired_auc` -- a binary endpoint (disease yes/no) scored by both versions: the
  paired DeLong test (:func:`~sitebench.stratification.classification.delong`),
  difference = auc_b - auc_a, overall and per site.

Rows are paired by the scan column; scans read by one version only are dropped and counted
in a note. Levels that cannot be estimated give ``None`` plus a note, never a crash.
Bad input raises :class:`~sitebench.errors.SitebenchError` with a one-line message.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from sitebench.errors import SitebenchError
from sitebench.provenance import jsonable
from sitebench.stratification.classification import _binary, delong
from sitebench.stratification.equivalence import holm
from sitebench.stratification.validation import check_alpha, check_margin, fmt_number

__all__ = ["PairedAUC", "PairedComparison", "paired_auc", "paired_comparison"]

OVERALL = "overall"
MIN_PAIRS = 2
COLUMNS = ("level", "n_pairs", "mean_a", "mean_b", "difference", "sd_difference", "ci_low", "ci_high", "p",
           "p_wilcoxon", "p_lower", "p_upper", "p_tost", "tost_ci_low", "tost_ci_high", "p_holm",
           "equivalent", "equivalent_holm", "estimable")
AUC_COLUMNS = ("level", "n", "n_positive", "n_negative", "auc_a", "auc_b", "difference", "se", "ci_low",
               "ci_high", "z", "p", "status", "reason")


def _numeric_frame(rows: list[dict[str, Any]], columns: tuple[str, ...], keep: tuple[str, ...]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(columns))
    for column in columns[1:]:
        if column not in keep:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    return frame


# ----------------------------------------------------------------------------- pairing
def _pair(table: pd.DataFrame, model: str, a: Any, b: Any, scan: str, columns: list[str],
          per_scan: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """One row per scan read by both models: ``<col>_a`` / ``<col>_b`` for ``columns``, plus ``per_scan``."""
    if not isinstance(table, pd.DataFrame):
        raise SitebenchError(f"table must be a pandas DataFrame, got {type(table).__name__}")
    for column in dict.fromkeys([model, scan, *columns, *per_scan]):
        if column not in table.columns:
            raise SitebenchError(f"no column '{column}' (have: {', '.join(map(str, table.columns))})")
    if a == b:
        raise SitebenchError(f"models a and b are both {a!r}: need two different versions to compare")
    present = list(pd.unique(table[model]))
    for key in (a, b):
        if key not in present:
            raise SitebenchError(f"model {key!r} not found in column '{model}' (have: "
                                 f"{', '.join(map(str, present[:10]))})")
    sub = table[table[model].isin([a, b])]
    for column in [scan, *per_scan]:
        if sub[column].isna().any():
            raise SitebenchError(f"column '{column}' has {int(sub[column].isna().sum())} missing value(s)")
    for column in columns:
        numeric = pd.to_numeric(sub[column], errors="coerce")
        if numeric.isna().any() or not np.isfinite(numeric.to_numpy(float)).all():
            raise SitebenchError(f"column '{column}' has missing, infinite or non-numeric value(s)")
    dup = sub.duplicated([scan, model])
    if dup.any():
        first = sub.loc[dup, scan].iloc[0]
        raise SitebenchError(f"{int(dup.sum())} duplicated ({scan}, {model}) row(s), e.g. {scan} {first!r}: "
                             f"need one row per scan and model")
    for column in per_scan:
        varies = sub.groupby(scan, sort=False)[column].nunique() > 1
        if varies.any():
            raise SitebenchError(f"column '{column}' differs between the two models' rows of {scan} "
                                 f"{varies.index[varies][0]!r}: it must be one value per scan")
    sides = []
    for key, suffix in ((a, "_a"), (b, "_b")):
        part = sub[sub[model] == key].set_index(scan)
        side = part[columns].apply(pd.to_numeric).add_suffix(suffix)
        sides.append(side.join(part[per_scan]) if suffix == "_a" else side)
    paired = sides[0].join(sides[1], how="inner")
    only_a = len(sides[0]) - len(paired)
    only_b = len(sides[1]) - len(paired)
    notes = []
    if only_a or only_b:
        notes.append(f"{only_a + only_b} unpaired scan(s) dropped ({only_a} only with {a!r}, "
                     f"{only_b} only with {b!r})")
    if paired.empty:
        raise SitebenchError(f"no {scan} is read by both {a!r} and {b!r}: nothing to pair")
    return paired, notes


def _levels(paired: pd.DataFrame, by: str | None) -> list[tuple[Any, np.ndarray]]:
    """(level, row mask) per level of ``by``, sorted, then the overall mask."""
    out: list[tuple[Any, np.ndarray]] = []
    if by is not None:
        values = pd.unique(paired[by])
        try:
            values = sorted(values)
        except TypeError:
            values = sorted(values, key=str)
        out = [(v, (paired[by] == v).to_numpy()) for v in values]
    return out + [(OVERALL, np.ones(len(paired), dtype=bool))]


# ----------------------------------------------------------------------------- continuous: paired t / TOST
@dataclass
class PairedComparison:
    """Per level of ``by`` and overall: paired t, Wilcoxon and (with a margin) TOST of value_b - value_a."""

    value: str
    model: str
    a: Any
    b: Any
    by: str | None
    margin: float | None
    alpha: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def level_rows(self) -> list[dict[str, Any]]:
        """The rows the intersection-union claim is about: the levels of ``by`` (or overall without ``by``)."""
        return [r for r in self.rows if r["level"] != OVERALL] if self.by is not None else self.rows

    @property
    def all_within_margin(self) -> bool:
        """Every level's TOST rejects at alpha and no level is non-estimable (False without a margin)."""
        rows = self.level_rows
        return self.margin is not None and bool(rows) and all(r["estimable"] and r["equivalent"] for r in rows)

    @property
    def p_intersection_union(self) -> float | None:
        ps = [r["p_tost"] for r in self.level_rows]
        return max(ps) if self.margin is not None and ps and None not in ps else None

    def to_frame(self) -> pd.DataFrame:
        """Tidy table, one row per level then ``overall``; NaN where not estimable."""
        return _numeric_frame(self.rows, COLUMNS, ("n_pairs", "equivalent", "equivalent_holm", "estimable"))

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"value": self.value, "model": self.model, "a": self.a, "b": self.b, "by": self.by,
                         "margin": self.margin, "alpha": self.alpha, "all_within_margin": self.all_within_margin,
                         "p_intersection_union": self.p_intersection_union,
                         "rows": [{k: r[k] for k in COLUMNS} for r in self.rows], "notes": list(self.notes)})

    def summary(self) -> str:
        pct = f"{100 * (1 - self.alpha):g}%"
        lines = [f"Paired comparison of '{self.value}': {self.b!r} - {self.a!r} on the same scans",
                 f"{'level':<12}{'n':>6}{'diff':>11}{pct + ' CI':>24}{'p':>10}{'p Wilcox':>10}"
                 + (f"{'p TOST':>10}{'p Holm':>10}" if self.margin is not None else "")]
        for r in self.rows:
            ci = f"[{fmt_number(r['ci_low'])}, {fmt_number(r['ci_high'])}]"
            line = (f"{str(r['level']):<12}{r['n_pairs']:>6}{fmt_number(r['difference']):>11}{ci:>24}"
                    f"{fmt_number(r['p'], '.3g'):>10}{fmt_number(r['p_wilcoxon'], '.3g'):>10}")
            if self.margin is not None:
                line += f"{fmt_number(r['p_tost'], '.3g'):>10}{fmt_number(r['p_holm'], '.3g'):>10}"
            lines.append(line)
        if self.margin is not None:
            lines.append(f"every {'level' if self.by else 'scan set'} within ±{self.margin:g} (TOST at "
                         f"{self.alpha:g}): {'YES' if self.all_within_margin else 'NO'} (intersection-union "
                         f"p = {fmt_number(self.p_intersection_union, '.3g')})")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _paired_row(level: Any, xa: np.ndarray, xb: np.ndarray, margin: float | None, alpha: float,
                notes: list[str]) -> dict[str, Any]:
    d = xb - xa
    n = len(d)
    row = dict.fromkeys(COLUMNS)
    row.update(level=level, n_pairs=n, mean_a=float(xa.mean()), mean_b=float(xb.mean()),
               difference=float(d.mean()), estimable=False)
    if n >= MIN_PAIRS:
        row["sd_difference"] = float(d.std(ddof=1))
        if np.any(d != 0):
            with warnings.catch_warnings():  # small-n normal-approximation warnings
                warnings.simplefilter("ignore")
                p_w = float(stats.wilcoxon(d, zero_method="wilcox").pvalue)
            row["p_wilcoxon"] = p_w if math.isfinite(p_w) else None
    if n < MIN_PAIRS or row["sd_difference"] == 0:
        why = f"{n} pair(s), needs {MIN_PAIRS}" if n < MIN_PAIRS else "all differences are equal (SD 0)"
        notes.append(f"{level}: not estimable ({why})")
        return row
    df, diff = n - 1, row["difference"]
    se = row["sd_difference"] / math.sqrt(n)
    half = float(stats.t.ppf(1 - alpha / 2, df)) * se
    row.update(estimable=True, ci_low=diff - half, ci_high=diff + half,
               p=float(2 * stats.t.sf(abs(diff / se), df)))
    if margin is not None:
        p_lower = float(stats.t.sf((diff + margin) / se, df))  # H0: diff <= -margin
        p_upper = float(stats.t.cdf((diff - margin) / se, df))  # H0: diff >= +margin
        half2 = float(stats.t.ppf(1 - alpha, df)) * se
        row.update(p_lower=p_lower, p_upper=p_upper, p_tost=max(p_lower, p_upper), tost_ci_low=diff - half2,
                   tost_ci_high=diff + half2, equivalent=max(p_lower, p_upper) < alpha)
    return row


def paired_comparison(table: pd.DataFrame, *, model: str, a: Any, b: Any, value: str, scan: str = "scan_id",
                      by: str | None = "site", margin: float | None = None,
                      alpha: float = 0.05) -> PairedComparison:
    """Compare ``value`` of model ``b`` with model ``a`` scan by scan (difference b - a), per ``by`` and overall.

    ``table`` is long: one row per (scan, model). ``margin`` (in ``value``'s units) adds the paired TOST.
    """
    alpha = check_alpha(alpha)
    if margin is not None:
        margin, alpha = check_margin(margin, alpha)
    paired, notes = _pair(table, model, a, b, scan, [value], [by] if by is not None else [])
    result = PairedComparison(value=value, model=model, a=a, b=b, by=by, margin=margin, alpha=alpha, notes=notes)
    xa, xb = paired[f"{value}_a"].to_numpy(float), paired[f"{value}_b"].to_numpy(float)
    for level, mask in _levels(paired, by):
        result.rows.append(_paired_row(level, xa[mask], xb[mask], margin, alpha, result.notes))
    if margin is not None:
        tested = [r for r in result.level_rows if r["p_tost"] is not None]
        for row, p in zip(tested, holm([r["p_tost"] for r in tested])):
            row["p_holm"], row["equivalent_holm"] = p, p < alpha
    return result


# ----------------------------------------------------------------------------- binary: paired DeLong
@dataclass
class PairedAUC:
    """Paired DeLong test of auc_b - auc_a, overall and per level of ``by``."""

    truth: str
    score: str
    model: str
    a: Any
    b: Any
    by: str | None
    alpha: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_frame(self) -> pd.DataFrame:
        """Tidy table, one row per level then ``overall``; NaN where not estimable."""
        return _numeric_frame(self.rows, AUC_COLUMNS, ("n", "n_positive", "n_negative", "status", "reason"))

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"truth": self.truth, "score": self.score, "model": self.model, "a": self.a, "b": self.b,
                         "by": self.by, "alpha": self.alpha, "rows": [{k: r[k] for k in AUC_COLUMNS}
                                                                      for r in self.rows],
                         "notes": list(self.notes)})

    def summary(self) -> str:
        pct = f"{100 * (1 - self.alpha):g}%"
        lines = [f"Paired DeLong test of AUC ('{self.score}' for '{self.truth}'): {self.b!r} - {self.a!r}",
                 f"{'level':<12}{'n':>6}{'AUC a':>8}{'AUC b':>8}{'diff':>9}{pct + ' CI':>22}{'p':>10}"]
        for r in self.rows:
            ci = f"[{fmt_number(r['ci_low'], '.3f')}, {fmt_number(r['ci_high'], '.3f')}]"
            lines.append(f"{str(r['level']):<12}{r['n']:>6}{fmt_number(r['auc_a'], '.3f'):>8}{fmt_number(r['auc_b'], '.3f'):>8}"
                         f"{fmt_number(r['difference'], '.3f'):>9}{ci:>22}{fmt_number(r['p'], '.3g'):>10}"
                         + ("" if r["status"] == "ok" else f"  {r['status']}: {r['reason']}"))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def paired_auc(table: pd.DataFrame, *, model: str, a: Any, b: Any, truth: str, score: str, scan: str = "scan_id",
               by: str | None = None, alpha: float = 0.05) -> PairedAUC:
    """Paired DeLong test (larger score = positive) of model ``b`` vs ``a`` on the scans both scored."""
    alpha = check_alpha(alpha)
    paired, notes = _pair(table, model, a, b, scan, [score], [truth] + ([by] if by is not None else []))
    y = _binary(paired[truth], f"column '{truth}'")
    sa, sb = paired[f"{score}_a"].to_numpy(float), paired[f"{score}_b"].to_numpy(float)
    result = PairedAUC(truth=truth, score=score, model=model, a=a, b=b, by=by, alpha=alpha, notes=notes)
    for level, mask in _levels(paired, by):
        yl = y[mask]
        row = dict.fromkeys(AUC_COLUMNS)
        n_pos = int(yl.sum())
        row.update(level=level, n=int(mask.sum()), n_positive=n_pos, n_negative=int(mask.sum()) - n_pos,
                   status="ok", reason="")
        if min(n_pos, row["n_negative"]) < MIN_PAIRS:
            row.update(status="not estimable", reason=f"{n_pos} positive, {row['n_negative']} negative "
                                                      f"(needs {MIN_PAIRS} of each)")
            result.notes.append(f"{level}: not estimable ({row['reason']})")
        else:
            r = delong(yl, sb[mask], sa[mask], alpha=alpha)  # difference = auc(b) - auc(a)
            row.update(auc_a=r.auc2, auc_b=r.auc, difference=r.difference, se=r.difference_se,
                       ci_low=r.difference_ci_low, ci_high=r.difference_ci_high, z=r.z, p=r.p)
        result.rows.append(row)
    return result
