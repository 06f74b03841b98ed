"""Measurement agreement and technical performance of a quantitative imaging biomarker.

The statistics a QIBA / FDA technical-performance section asks for (Raunig et al. 2015,
Obuchowski et al. 2015, Stat Methods Med Res 24:27-67 and 68-106; FDA 2022 guidance on
QIB technical performance):

* :func:`icc` - the six intraclass correlations of McGraw & Wong (1996) from the two-way
  ANOVA mean squares, each with McGraw & Wong's F-based confidence interval;
* :func:`bland_altman` - bias and 95% limits of agreement (Bland & Altman 1986, 1999) with
  confidence intervals (exact non-central t intervals of Carkeet 2015 by default);
* :func:`lins_ccc` - Lin's (1989, 2000) concordance correlation with its Fisher-z interval;
* :func:`metrology` - bias, % bias and linearity against a reference value, within-subject
  SD / repeatability coefficient / within-subject CV, and the reproducibility coefficient
  across sites, with "not estimable" reported as ``None`` plus a note, never as a number.

Tables come in long format (one row per measurement) and every result has ``summary()``,
``to_frame()`` and ``to_dict()`` (JSON-able: plain floats, ``None`` where not estimable).
Bad input raises :class:`~sitebench.errors.SitebenchError` with a one-line message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
# scipy.special, not scipy.stats: the same distribution functions (scipy.stats calls these
# for t, F, chi-squared and normal) without a second of import on every `stats icc`.
from scipy import special

from sitebench.errors import SitebenchError
from sitebench.stratification.validation import as_numeric, check_alpha

__all__ = [
    "ICC_FORMS",
    "RC_FACTOR",
    "BlandAltmanResult",
    "CCCResult",
    "ICCForm",
    "ICCResult",
    "MetrologyResult",
    "bland_altman",
    "icc",
    "lins_ccc",
    "metrology",
]

#: 1.96 * sqrt(2) = 2.77: two replicate measurements differ by less than ``RC_FACTOR * wSD``
#: with 95% probability (repeatability / reproducibility coefficient; QIBA, Raunig 2015).
RC_FACTOR: float = float(special.ndtri(0.975) * math.sqrt(2.0))

#: McGraw & Wong (1996) name -> (Shrout & Fleiss 1979 name, description), in report order.
ICC_FORMS: dict[str, tuple[str, str]] = {
    "ICC(1,1)": ("ICC(1,1)", "one-way random, single rater"),
    "ICC(A,1)": ("ICC(2,1)", "two-way random, absolute agreement, single rater"),
    "ICC(C,1)": ("ICC(3,1)", "two-way mixed, consistency, single rater"),
    "ICC(1,k)": ("ICC(1,k)", "one-way random, mean of k raters"),
    "ICC(A,k)": ("ICC(2,k)", "two-way random, absolute agreement, mean of k raters"),
    "ICC(C,k)": ("ICC(3,k)", "two-way mixed, consistency, mean of k raters"),
}

# ----------------------------------------------------------------------------- helpers


def _float(value: Any) -> float | None:
    """Plain float, or None when missing / not finite (the JSON form of "not estimable")."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "n/e" if value is None else format(value, spec)


def _ci_text(low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return "n/e"
    return f"[{low:.4g}, {high:.4g}]"


def _check_table(table: Any, columns: Iterable[str]) -> None:
    """A non-empty DataFrame holding every named column (named once)."""
    if not isinstance(table, pd.DataFrame):
        raise SitebenchError(f"expected a pandas DataFrame, got {type(table).__name__}")
    names = list(columns)
    if len(set(names)) != len(names):
        raise SitebenchError(f"the same column is named for two roles: {names}")
    missing = [c for c in names if c not in table.columns]
    if missing:
        available = ", ".join(map(str, list(table.columns)[:20]))
        raise SitebenchError(f"column(s) {', '.join(map(repr, missing))} not in the table "
                             f"(columns: {available})")
    if len(table) == 0:
        raise SitebenchError("the table has no rows")


def _row_label(table: pd.DataFrame, position: int) -> str:
    return repr(table.index[position])


def _numeric(table: pd.DataFrame, column: str) -> np.ndarray:
    """The column as float64; NaN/inf and non-numbers are refused (these statistics need all values)."""
    values = as_numeric(table[column], f"column '{column}'")
    bad = ~np.isfinite(values)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise SitebenchError(f"column '{column}' has {int(bad.sum())} NaN/inf value(s) "
                             f"(first at row {_row_label(table, first)}); drop or impute them first")
    return values


def _labels(table: pd.DataFrame, column: str) -> pd.Series:
    """A label column (subject, rater, site...) with no missing entries."""
    labels = table[column]
    missing = labels.isna().to_numpy()
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise SitebenchError(f"column '{column}' has {int(missing.sum())} missing label(s) "
                             f"(first at row {_row_label(table, first)})")
    return labels.reset_index(drop=True)


def _not_constant(values: np.ndarray, column: str) -> None:
    if np.ptp(values) == 0.0:
        raise SitebenchError(f"column '{column}' is constant ({values[0]:g}); "
                             "agreement statistics need varying values")


def _t_interval(estimate: float, se: float, df: float, alpha: float) -> tuple[float, float]:
    half = float(special.stdtrit(df, 1.0 - alpha / 2.0)) * se
    return estimate - half, estimate + half


def _pct(alpha: float) -> str:
    return f"{(1.0 - alpha) * 100:g}%"


# ----------------------------------------------------------------------------- ICC


def _quantity_frame(rows: list[tuple], n: int) -> pd.DataFrame:
    """Tidy (quantity, estimate, ci_low, ci_high, n) table; None becomes NaN."""
    frame = pd.DataFrame(rows, columns=["quantity", "estimate", "ci_low", "ci_high"])
    for column in ("estimate", "ci_low", "ci_high"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    frame["n"] = n
    return frame


@dataclass(frozen=True)
class ICCForm:
    """One intraclass correlation with its CI and the F test of ICC = 0."""

    form: str
    shrout_fleiss: str
    description: str
    icc: float | None
    ci_low: float | None
    ci_high: float | None
    F: float | None
    df1: float
    df2: float
    p: float | None
    ci_df2: float | None  # denominator df used for the CI (Satterthwaite df for ICC(A,.))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: form, icc, ci_low, ci_high, F, df1, df2, p."""
        return {"form": self.form, "icc": self.icc, "ci_low": self.ci_low,
                "ci_high": self.ci_high, "F": self.F, "df1": float(self.df1),
                "df2": float(self.df2), "p": self.p}


@dataclass(frozen=True)
class ICCResult:
    """All six McGraw & Wong ICCs of one complete targets x raters design."""

    targets: str
    raters: str
    ratings: str
    n_targets: int
    n_raters: int
    alpha: float
    ms_targets: float
    ms_raters: float
    ms_error: float
    ms_within: float
    forms: tuple[ICCForm, ...]
    notes: tuple[str, ...] = ()

    def __getitem__(self, name: str) -> ICCForm:
        """Look a form up by its McGraw-Wong ("ICC(A,1)") or Shrout-Fleiss ("ICC(2,1)") name."""
        key = name.replace(" ", "").upper().replace("K)", "k)")
        for form in self.forms:
            if key in (form.form.upper().replace("K)", "k)"),
                       form.shrout_fleiss.upper().replace("K)", "k)")):
                return form
        raise KeyError(f"{name!r} is not one of {[f.form for f in self.forms]}")

    def to_dict(self) -> dict[str, Any]:
        """``{"forms": [{form, icc, ci_low, ci_high, F, df1, df2, p}, ...]}``."""
        return {"forms": [form.to_dict() for form in self.forms]}

    def to_frame(self) -> pd.DataFrame:
        """One row per form (NaN where not estimable)."""
        rows = [{**form.to_dict(), "shrout_fleiss": form.shrout_fleiss,
                 "description": form.description, "ci_df2": form.ci_df2} for form in self.forms]
        frame = pd.DataFrame(rows, columns=["form", "shrout_fleiss", "description", "icc", "ci_low",
                                            "ci_high", "F", "df1", "df2", "p", "ci_df2"])
        for column in ("icc", "ci_low", "ci_high", "F", "df1", "df2", "p", "ci_df2"):
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
        return frame

    def summary(self) -> str:
        """Readable table of the six forms with CIs and F tests."""
        pct = _pct(self.alpha)
        lines = [
            f"Intraclass correlation of '{self.ratings}': {self.n_targets} {self.targets} x "
            f"{self.n_raters} {self.raters} (McGraw & Wong 1996; two-way ANOVA)",
            f"MS {self.targets} {self.ms_targets:.4g}, MS {self.raters} {self.ms_raters:.4g}, "
            f"MS error {self.ms_error:.4g}, MS within {self.ms_within:.4g}",
            "",
            f"{'form':<9} {'S&F':<9} {'ICC':>7} {pct + ' CI':>20} {'F':>9} {'df1':>5} {'df2':>5} "
            f"{'p':>9}  description",
        ]
        for f in self.forms:
            lines.append(f"{f.form:<9} {f.shrout_fleiss:<9} {_fmt(f.icc, '.3f'):>7} "
                         f"{_ci_text(f.ci_low, f.ci_high):>20} {_fmt(f.F, '.4g'):>9} "
                         f"{f.df1:>5g} {f.df2:>5g} {_fmt(f.p, '.3g'):>9}  {f.description}")
        lines.append("ICC(A,.) CIs use the Satterthwaite-type df of McGraw & Wong (1996, Table 7).")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _ratings_matrix(table: pd.DataFrame, targets: str, raters: str,
                    ratings: str) -> tuple[np.ndarray, list[Any], list[Any]]:
    """targets x raters matrix of a complete, balanced design (one rating per cell)."""
    values = _numeric(table, ratings)
    target_labels = _labels(table, targets)
    rater_labels = _labels(table, raters)
    frame = pd.DataFrame({"t": target_labels, "r": rater_labels, "y": values})
    duplicated = frame.duplicated(["t", "r"], keep=False).to_numpy()
    if duplicated.any():
        first = frame[duplicated].iloc[0]
        raise SitebenchError(
            f"{int(duplicated.sum())} rows repeat a {targets}/{raters} pair (e.g. {targets} "
            f"{first['t']!r} by {raters} {first['r']!r}); ICC needs exactly one rating per pair "
            "(average replicates first)")
    t_codes, t_levels = pd.factorize(frame["t"], sort=True)
    r_codes, r_levels = pd.factorize(frame["r"], sort=True)
    n, k = len(t_levels), len(r_levels)
    if n < 2:
        raise SitebenchError(f"ICC needs at least 2 {targets}, got {n}")
    if k < 2:
        raise SitebenchError(f"ICC needs at least 2 {raters}, got {k}")
    matrix = np.full((n, k), np.nan)
    matrix[t_codes, r_codes] = frame["y"].to_numpy()
    holes = np.argwhere(np.isnan(matrix))
    if len(holes):
        i, j = holes[0]
        raise SitebenchError(
            f"incomplete design: {len(holes)} of {n * k} {targets} x {raters} ratings missing "
            f"(e.g. {targets} {t_levels[i]!r} by {raters} {r_levels[j]!r}); these ICCs need "
            "every rater to rate every target")
    return matrix, list(t_levels), list(r_levels)


def icc(table: pd.DataFrame, targets: str, raters: str, ratings: str,
        alpha: float = 0.05) -> ICCResult:
    """The six McGraw & Wong (1996) ICCs with F-based (1 - alpha) CIs from a long table.

    Complete balanced designs only (every rater rates every target once), because the
    closed-form ANOVA estimators and their exact / Satterthwaite CIs assume it. The CIs use
    the two-sided quantiles F(1 - alpha/2) of McGraw & Wong (1996, Tables 7-8), i.e. a true
    (1 - alpha) interval (some psych::ICC versions use F(1 - alpha), a 1 - 2*alpha interval).
    """
    alpha = check_alpha(alpha)
    _check_table(table, [targets, raters, ratings])
    x, _, _ = _ratings_matrix(table, targets, raters, ratings)
    n, k = x.shape
    if np.ptp(x) == 0.0:
        raise SitebenchError(f"column '{ratings}' is constant ({x[0, 0]:g}); ICC is undefined")

    grand = x.mean()
    ss_rows = k * float(((x.mean(axis=1) - grand) ** 2).sum())
    ss_cols = n * float(((x.mean(axis=0) - grand) ** 2).sum())
    ss_total = float(((x - grand) ** 2).sum())
    ss_error = ss_total - ss_rows - ss_cols
    tiny = 1e-12 * ss_total  # rounding noise of the subtraction / of exactly equal means
    ss_error = 0.0 if ss_error <= tiny else ss_error
    ss_rows = 0.0 if ss_rows <= tiny else ss_rows
    df_rows, df_cols, df_error, df_within = n - 1, k - 1, (n - 1) * (k - 1), n * (k - 1)
    msr, msc = ss_rows / df_rows, ss_cols / df_cols
    mse, msw = ss_error / df_error, (ss_cols + ss_error) / df_within
    q = 1.0 - alpha / 2.0
    notes: list[str] = []

    with np.errstate(divide="ignore", invalid="ignore"):
        # One-way model (ICC(1,.)): F = MSR / MSW on (n-1, n(k-1)).
        f1 = np.float64(msr) / np.float64(msw)
        f1_low = f1 / special.fdtri(df_rows, df_within, q)
        f1_high = f1 * special.fdtri(df_within, df_rows, q)
        p1 = special.fdtrc(df_rows, df_within, f1)
        # Two-way models: F = MSR / MSE on (n-1, (n-1)(k-1)).
        f2 = np.float64(msr) / np.float64(mse)
        f2_low = f2 / special.fdtri(df_rows, df_error, q)
        f2_high = f2 * special.fdtri(df_error, df_rows, q)
        p2 = special.fdtrc(df_rows, df_error, f2)

        icc_11 = (msr - msw) / np.float64(msr + (k - 1) * msw)
        icc_1k = (msr - msw) / np.float64(msr)
        icc_c1 = (msr - mse) / np.float64(msr + (k - 1) * mse)
        icc_ck = (msr - mse) / np.float64(msr)
        icc_a1 = (msr - mse) / np.float64(msr + (k - 1) * mse + k * (msc - mse) / n)
        icc_ak = (msr - mse) / np.float64(msr + (msc - mse) / n)

        # ICC(A,.): Satterthwaite df of a*MSC + b*MSE (McGraw & Wong 1996, Table 7, case 2A).
        a = k * icc_a1 / (n * (1.0 - icc_a1))
        b = 1.0 + k * icc_a1 * (n - 1) / (n * (1.0 - icc_a1))
        v = (a * msc + b * mse) ** 2 / ((a * msc) ** 2 / df_cols + (b * mse) ** 2 / df_error)
        fa_star = special.fdtri(df_rows, v, q)
        fa_sub = special.fdtri(v, df_rows, q)
        c = k * msc + (k * n - k - n) * mse
        a1_low = n * (msr - fa_star * mse) / (fa_star * c + n * msr)
        a1_high = n * (fa_sub * msr - mse) / (c + n * fa_sub * msr)
        ak_low = n * (msr - fa_star * mse) / (fa_star * (msc - mse) + n * msr)
        ak_high = n * (fa_sub * msr - mse) / ((msc - mse) + n * fa_sub * msr)

    if mse == 0.0:
        notes.append("no residual variation (ratings are exactly additive in target and rater): "
                     "two-way F tests and CIs not estimable")
    if msr == 0.0:
        notes.append(f"all {targets} have the same mean rating: ICC(.,k) not estimable")

    def form(name: str, value: Any, low: Any, high: Any, f_value: Any, df2: int, p: Any,
             ci_df2: Any) -> ICCForm:
        sf_name, description = ICC_FORMS[name]
        f_value = _float(f_value)
        if f_value is None:  # no F statistic: no p-value and no F-based interval either
            p = low = high = None
        return ICCForm(name, sf_name, description, _float(value), _float(low), _float(high),
                       f_value, float(df_rows), float(df2), _float(p), _float(ci_df2))

    with np.errstate(divide="ignore", invalid="ignore"):
        forms = (
            form("ICC(1,1)", icc_11, (f1_low - 1) / (f1_low + k - 1),
                 (f1_high - 1) / (f1_high + k - 1), f1, df_within, p1, df_within),
            form("ICC(A,1)", icc_a1, a1_low, a1_high, f2, df_error, p2, v),
            form("ICC(C,1)", icc_c1, (f2_low - 1) / (f2_low + k - 1),
                 (f2_high - 1) / (f2_high + k - 1), f2, df_error, p2, df_error),
            form("ICC(1,k)", icc_1k, 1 - 1 / f1_low, 1 - 1 / f1_high, f1, df_within, p1, df_within),
            form("ICC(A,k)", icc_ak, ak_low, ak_high, f2, df_error, p2, v),
            form("ICC(C,k)", icc_ck, 1 - 1 / f2_low, 1 - 1 / f2_high, f2, df_error, p2, df_error),
        )
    missing = [f.form for f in forms if f.icc is not None and (f.ci_low is None or f.ci_high is None)]
    if missing and not notes:
        notes.append(f"CI not estimable for {', '.join(missing)}")
    return ICCResult(targets, raters, ratings, n, k, alpha, float(msr), float(msc), float(mse),
                     float(msw), forms, tuple(notes))


# ----------------------------------------------------------------------------- Bland-Altman

_BA_METHODS = ("exact", "approximate")


@dataclass(frozen=True)
class BlandAltmanResult:
    """Bias and limits of agreement of ``a - b`` with confidence intervals."""

    a: str
    b: str
    n: int
    alpha: float
    limit_z: float
    method: str
    bias: float
    bias_ci_low: float
    bias_ci_high: float
    sd: float
    lower: float
    lower_ci_low: float | None
    lower_ci_high: float | None
    upper: float
    upper_ci_low: float | None
    upper_ci_high: float | None
    notes: tuple[str, ...] = ()

    _KEYS = ("bias", "bias_ci_low", "bias_ci_high", "sd", "lower", "lower_ci_low",
             "lower_ci_high", "upper", "upper_ci_low", "upper_ci_high", "n")

    def to_dict(self) -> dict[str, Any]:
        """bias, bias_ci_low/high, sd, lower (+ CI), upper (+ CI), n."""
        out: dict[str, Any] = {key: _float(getattr(self, key)) for key in self._KEYS[:-1]}
        out["n"] = int(self.n)
        return out

    def to_frame(self) -> pd.DataFrame:
        """One row per quantity: bias, lower and upper limit of agreement, SD of differences."""
        rows = [
            ("bias", self.bias, self.bias_ci_low, self.bias_ci_high),
            ("lower_limit", self.lower, self.lower_ci_low, self.lower_ci_high),
            ("upper_limit", self.upper, self.upper_ci_low, self.upper_ci_high),
            ("sd", self.sd, None, None),
        ]
        return _quantity_frame(rows, self.n)

    def summary(self) -> str:
        """Readable table of bias and limits of agreement with their CIs."""
        pct = _pct(self.alpha)
        how = ("exact, non-central t (Carkeet 2015)" if self.method == "exact"
               else "approximate, SE = sqrt(3 s^2 / n) (Bland & Altman 1986)")
        lines = [
            f"Bland-Altman agreement of '{self.a}' - '{self.b}' ({self.n} pairs)",
            f"limits of agreement = bias -/+ {self.limit_z:g} SD; {pct} CIs: bias by t, limits {how}",
            "",
            f"{'quantity':<12} {'estimate':>10} {pct + ' CI':>24}",
            f"{'bias':<12} {self.bias:>10.4g} {_ci_text(self.bias_ci_low, self.bias_ci_high):>24}",
            f"{'lower limit':<12} {self.lower:>10.4g} "
            f"{_ci_text(self.lower_ci_low, self.lower_ci_high):>24}",
            f"{'upper limit':<12} {self.upper:>10.4g} "
            f"{_ci_text(self.upper_ci_low, self.upper_ci_high):>24}",
            f"{'SD of diff.':<12} {self.sd:>10.4g}",
        ]
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def bland_altman(table: pd.DataFrame, a: str, b: str, alpha: float = 0.05, *,
                 limit_z: float = 1.96, method: str = "exact") -> BlandAltmanResult:
    """Bias (mean of a - b), SD and limits bias -/+ ``limit_z`` SD, each with a (1 - alpha) CI.

    The bias CI is the t interval. The limit CIs are, with ``method="exact"``, the exact
    intervals for mu -/+ z*sigma under normal differences: the pivot sqrt(n) (limit - mean)/s is
    non-central t with n - 1 df and non-centrality z*sqrt(n) (Carkeet 2015, Optom Vis Sci
    92:e71); with ``method="approximate"`` they are limit -/+ t(n-1) sqrt(3 s^2 / n) of Bland &
    Altman (1986, 1999). ``limit_z=2`` reproduces the 1986 paper's "mean -/+ 2 SD" limits.
    """
    alpha = check_alpha(alpha)
    if method not in _BA_METHODS:
        raise SitebenchError(f"method must be one of {', '.join(_BA_METHODS)}, got {method!r}")
    try:
        limit_z = float(limit_z)
    except (TypeError, ValueError):
        raise SitebenchError(f"limit_z must be a positive number, got {limit_z!r}") from None
    if not (math.isfinite(limit_z) and limit_z > 0):
        raise SitebenchError(f"limit_z must be a positive number, got {limit_z}")
    _check_table(table, [a, b])
    d = _numeric(table, a) - _numeric(table, b)
    n = len(d)
    if n < 3:
        raise SitebenchError(f"Bland-Altman needs at least 3 pairs, got {n}")
    if np.ptp(d) == 0.0:
        raise SitebenchError(f"'{a}' - '{b}' is constant ({d[0]:g}); limits of agreement are "
                             "degenerate (no spread of differences)")
    bias = float(d.mean())
    sd = float(d.std(ddof=1))
    df = n - 1
    bias_low, bias_high = _t_interval(bias, sd / math.sqrt(n), df, alpha)
    lower, upper = bias - limit_z * sd, bias + limit_z * sd
    if method == "exact":
        nc = limit_z * math.sqrt(n)
        q_low = float(special.nctdtrit(df, nc, alpha / 2.0)) * sd / math.sqrt(n)
        q_high = float(special.nctdtrit(df, nc, 1.0 - alpha / 2.0)) * sd / math.sqrt(n)
        upper_ci = (bias + q_low, bias + q_high)
        lower_ci = (bias - q_high, bias - q_low)
    else:
        lower_ci = _t_interval(lower, math.sqrt(3.0 * sd**2 / n), df, alpha)
        upper_ci = _t_interval(upper, math.sqrt(3.0 * sd**2 / n), df, alpha)
    notes = []
    if n < 30:
        notes.append(f"only {n} pairs: the limits of agreement are imprecise (see their CIs)")
    return BlandAltmanResult(a, b, n, alpha, limit_z, method, bias, bias_low, bias_high, sd,
                             lower, _float(lower_ci[0]), _float(lower_ci[1]), upper,
                             _float(upper_ci[0]), _float(upper_ci[1]), tuple(notes))


# ----------------------------------------------------------------------------- Lin's CCC


@dataclass(frozen=True)
class CCCResult:
    """Lin's concordance correlation of two measurements of the same quantity."""

    a: str
    b: str
    n: int
    alpha: float
    ccc: float
    ci_low: float | None
    ci_high: float | None
    pearson_r: float
    accuracy: float | None  # C_b = ccc / r, Lin's bias-correction factor
    location_shift: float  # u = (mean_a - mean_b) / sqrt(s_a s_b)
    scale_shift: float  # v = s_a / s_b
    notes: tuple[str, ...] = ()

    _KEYS = ("ccc", "ci_low", "ci_high", "pearson_r", "accuracy", "location_shift", "scale_shift")

    def to_dict(self) -> dict[str, Any]:
        """ccc, ci_low, ci_high, pearson_r, accuracy, location_shift, scale_shift, n."""
        out: dict[str, Any] = {key: _float(getattr(self, key)) for key in self._KEYS}
        out["n"] = int(self.n)
        return out

    def to_frame(self) -> pd.DataFrame:
        """One row per quantity (the CI belongs to the CCC only)."""
        rows = [("ccc", self.ccc, self.ci_low, self.ci_high),
                ("pearson_r", self.pearson_r, None, None),
                ("accuracy", self.accuracy, None, None),
                ("location_shift", self.location_shift, None, None),
                ("scale_shift", self.scale_shift, None, None)]
        return _quantity_frame(rows, self.n)

    def summary(self) -> str:
        """Readable CCC with its Fisher-z CI and the precision / accuracy decomposition."""
        pct = _pct(self.alpha)
        lines = [
            f"Lin's concordance correlation of '{self.a}' and '{self.b}' ({self.n} pairs)",
            f"{'CCC':<26} {self.ccc:>8.4f}  {pct} CI {_ci_text(self.ci_low, self.ci_high)} (Fisher z)",
            f"{'precision (Pearson r)':<26} {self.pearson_r:>8.4f}",
            f"{'accuracy (C_b = CCC / r)':<26} {_fmt(self.accuracy, '>8.4f')}",
            f"{'location shift u':<26} {self.location_shift:>8.4f}",
            f"{'scale shift v':<26} {self.scale_shift:>8.4f}",
        ]
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def lins_ccc(table: pd.DataFrame, a: str, b: str, alpha: float = 0.05) -> CCCResult:
    """Lin's CCC = 2 s_ab / (s_a^2 + s_b^2 + (mean_a - mean_b)^2) with a Fisher-z CI.

    Moments use divisor n as in Lin (1989). The CI back-transforms z = atanh(CCC) -/+ z_(1-alpha/2)
    * se, with the asymptotic variance of Lin (1989) as corrected in Lin (2000, Biometrics 56:324).
    """
    alpha = check_alpha(alpha)
    _check_table(table, [a, b])
    x, y = _numeric(table, a), _numeric(table, b)
    n = len(x)
    if n < 4:
        raise SitebenchError(f"Lin's CCC needs at least 4 pairs for its CI, got {n}")
    _not_constant(x, a)
    _not_constant(y, b)
    mx, my = float(x.mean()), float(y.mean())
    sxx, syy = float(((x - mx) ** 2).mean()), float(((y - my) ** 2).mean())
    sxy = float(((x - mx) * (y - my)).mean())
    ccc = 2.0 * sxy / (sxx + syy + (mx - my) ** 2)
    r = sxy / math.sqrt(sxx * syy)
    u = (mx - my) / (sxx * syy) ** 0.25
    notes: list[str] = []
    ci_low = ci_high = None
    if abs(ccc) >= 1.0 or r == 0.0:
        notes.append("perfect agreement (CCC = 1): Fisher-z CI not estimable" if abs(ccc) >= 1.0
                     else "Pearson r = 0: the CCC variance formula is undefined, no CI")
    else:
        var_z = ((1 - r**2) * ccc**2 / ((1 - ccc**2) * r**2)
                 + 2 * ccc**3 * (1 - ccc) * u**2 / (r * (1 - ccc**2) ** 2)
                 - ccc**4 * u**4 / (2 * r**2 * (1 - ccc**2) ** 2)) / (n - 2)
        if var_z > 0 and math.isfinite(var_z):
            half = float(special.ndtri(1 - alpha / 2)) * math.sqrt(var_z)
            z = math.atanh(ccc)
            ci_low, ci_high = math.tanh(z - half), math.tanh(z + half)
        else:
            notes.append("asymptotic variance of atanh(CCC) is not positive: no CI")
    accuracy = ccc / r if r != 0 else None
    return CCCResult(a, b, n, alpha, float(ccc), ci_low, ci_high, float(r), _float(accuracy),
                     float(u), float(math.sqrt(sxx / syy)), tuple(notes))


# ----------------------------------------------------------------------------- metrology

#: (key, label, has a CI) of every quantity MetrologyResult reports, in report order.
_METROLOGY_QUANTITIES: tuple[tuple[str, str, bool], ...] = (
    ("bias", "bias (measured - true)", True),
    ("percent_bias", "% bias", True),
    ("slope", "linearity slope", True),
    ("intercept", "linearity intercept", True),
    ("r_squared", "linearity R^2", False),
    ("quadratic_p", "quadratic term p", False),
    ("wsd", "within-subject SD", True),
    ("rc", "repeatability coeff.", True),
    ("wcv", "within-subject CV", True),
    ("sigma2_site", "var site", False),
    ("sigma2_interaction", "var subject x site", False),
    ("sigma2_within", "var within (repeat.)", False),
    ("reproducibility_sd", "reproducibility SD", True),
    ("rdc", "reproducibility coeff.", True),
)


@dataclass(frozen=True)
class MetrologyResult:
    """QIBA technical-performance metrics (Raunig et al. 2015); ``None`` = not estimable."""

    subject: str
    value: str
    n_subjects: int
    n_measurements: int
    n_sites: int | None
    alpha: float
    bias: float | None = None
    bias_ci_low: float | None = None
    bias_ci_high: float | None = None
    percent_bias: float | None = None
    percent_bias_ci_low: float | None = None
    percent_bias_ci_high: float | None = None
    slope: float | None = None
    slope_ci_low: float | None = None
    slope_ci_high: float | None = None
    intercept: float | None = None
    intercept_ci_low: float | None = None
    intercept_ci_high: float | None = None
    r_squared: float | None = None
    quadratic_p: float | None = None
    wsd: float | None = None
    wsd_ci_low: float | None = None
    wsd_ci_high: float | None = None
    wsd_df: int | None = None
    rc: float | None = None
    rc_ci_low: float | None = None
    rc_ci_high: float | None = None
    wcv: float | None = None
    wcv_ci_low: float | None = None
    wcv_ci_high: float | None = None
    sigma2_site: float | None = None
    sigma2_interaction: float | None = None
    sigma2_within: float | None = None
    reproducibility_sd: float | None = None
    reproducibility_sd_ci_low: float | None = None
    reproducibility_sd_ci_high: float | None = None
    reproducibility_df: float | None = None
    rdc: float | None = None
    rdc_ci_low: float | None = None
    rdc_ci_high: float | None = None
    reproducibility_method: str | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Every field, flat: counts as int, estimates as float or None, notes as a list."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "notes":
                out[f.name] = list(value)
            elif isinstance(value, (str, type(None))):
                out[f.name] = value
            elif f.name in ("n_subjects", "n_measurements", "n_sites", "wsd_df"):
                out[f.name] = int(value)
            else:
                out[f.name] = _float(value)
        return out

    def to_frame(self) -> pd.DataFrame:
        """One row per quantity: estimate, CI (NaN where none) and whether it was estimable."""
        rows = []
        for key, label, has_ci in _METROLOGY_QUANTITIES:
            estimate = getattr(self, key)
            rows.append({
                "quantity": key, "label": label, "estimate": estimate,
                "ci_low": getattr(self, f"{key}_ci_low") if has_ci else None,
                "ci_high": getattr(self, f"{key}_ci_high") if has_ci else None,
                "estimable": estimate is not None,
            })
        frame = pd.DataFrame(rows, columns=["quantity", "label", "estimate", "ci_low", "ci_high",
                                            "estimable"])
        for column in ("estimate", "ci_low", "ci_high"):
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
        return frame

    def summary(self) -> str:
        """Readable table of every estimable metric with CIs, then the notes."""
        pct = _pct(self.alpha)
        head = (f"Technical performance of '{self.value}': {self.n_measurements} measurements of "
                f"{self.n_subjects} subjects" + (f" at {self.n_sites} sites" if self.n_sites else ""))
        lines = [head, "", f"{'quantity':<24} {'estimate':>11} {pct + ' CI':>24}"]
        for key, label, has_ci in _METROLOGY_QUANTITIES:
            estimate = getattr(self, key)
            if estimate is None:
                continue
            ci = (_ci_text(getattr(self, f"{key}_ci_low"), getattr(self, f"{key}_ci_high"))
                  if has_ci else "")
            lines.append(f"{label:<24} {estimate:>11.4g} {ci:>24}")
        if self.wsd_df is not None:
            lines.append(f"wSD / RC / wCV CIs: chi-square with {self.wsd_df} df; RC = "
                         f"{RC_FACTOR:.3f} x wSD")
        if self.reproducibility_method:
            lines.append(f"reproducibility: {self.reproducibility_method}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, int]:
    """OLS coefficients, their standard errors, residual SS and residual df (x has the columns)."""
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    df = len(y) - x.shape[1]
    rss = float(resid @ resid)
    cov = rss / df * np.linalg.inv(x.T @ x)
    return coef, np.sqrt(np.diag(cov)), rss, df


def _pooled_within(values: np.ndarray, cells: np.ndarray) -> tuple[float, int]:
    """Pooled within-cell variance sum((y - cell mean)^2) / sum(n_cell - 1) and its df."""
    counts = np.bincount(cells)
    means = np.bincount(cells, weights=values) / counts
    ss = float(((values - means[cells]) ** 2).sum())
    df = int((counts - 1).sum())
    return (ss / df if df > 0 else math.nan), df


def _chi2_variance_ci(var: float, df: float, alpha: float) -> tuple[float, float]:
    return (df * var / float(special.chdtri(df, 1.0 - (1 - alpha / 2))),
            df * var / float(special.chdtri(df, 1.0 - (alpha / 2))))


def metrology(table: pd.DataFrame, subject: str, value: str, reference: str | None = None,
              replicate: str | None = None, site: str | None = None,
              alpha: float = 0.05, *, reproducibility: str = "auto") -> MetrologyResult:
    """Bias, linearity, repeatability and reproducibility of a QIB (Raunig et al. 2015).

    * ``reference`` (true value, constant within subject): bias = mean over subjects of
      (subject's mean measurement - true value), t CI over subjects; % bias = mean of
      100 (mean - true) / true; linearity = OLS of subject means on true values (slope,
      intercept, t CIs) plus the t-test p-value of an added quadratic term.
    * replicates (several rows per subject, or per subject and site when ``site`` is given):
      wSD^2 = pooled within-subject variance, df = sum(n_i - 1); chi-square CI; RC = 2.77 wSD;
      wCV = sqrt(exp(s^2_log) - 1) from the pooled variance of log values, chi-square CI.
    * ``site`` (each subject measured at every site, same number of times): balanced two-way
      crossed random-effects ANOVA, method-of-moments (expected mean squares) estimates of
      sigma^2_site, sigma^2_subject x site and sigma^2_within; reproducibility variance =
      their untruncated sum (a positive combination of mean squares) with a Satterthwaite CI,
      RDC = 2.77 sqrt(reproducibility variance).
    * ``site`` on an unbalanced design (the common one: repeats at one site, one scan at each
      of the others) or with empty cells: REML variance components of
      ``y ~ 1 + (1 | subject) + (1 | site) [+ (1 | subject:site)]`` from :func:`fit_lmm`;
      reproducibility variance = sigma^2_site + sigma^2_subject x site + sigma^2_within, CI
      chi-square with Satterthwaite's df ``2 V^2 / Var(V)`` (delta method on the REML
      information). On a balanced design with positive components REML equals the ANOVA
      estimates. ``reproducibility``: ``"auto"`` (ANOVA when balanced, else REML),
      ``"anova"`` or ``"reml"``.
    ``replicate`` labels repeat measurements; a (subject, [site,] replicate) seen twice is an error.
    """
    alpha = check_alpha(alpha)
    if reproducibility not in ("auto", "anova", "reml"):
        raise SitebenchError(f"reproducibility must be 'auto', 'anova' or 'reml', got {reproducibility!r}")
    roles = [c for c in (subject, value, reference, replicate, site) if c is not None]
    _check_table(table, roles)
    y = _numeric(table, value)
    subjects = _labels(table, subject)
    sites = _labels(table, site) if site is not None else None
    x_ref = _numeric(table, reference) if reference is not None else None
    _not_constant(y, value)
    if replicate is not None:
        keys = [subjects.rename("s")] + ([sites.rename("g")] if sites is not None else [])
        keys.append(_labels(table, replicate).rename("r"))
        dup = pd.concat(keys, axis=1).duplicated(keep=False).to_numpy()
        if dup.any():
            first = int(np.flatnonzero(dup)[0])
            raise SitebenchError(
                f"{int(dup.sum())} rows repeat a {subject}/{replicate} label (first at row "
                f"{_row_label(table, first)}); each replicate must be measured once")

    s_codes, s_levels = pd.factorize(subjects, sort=True)
    n_subj = len(s_levels)
    if n_subj < 2:
        raise SitebenchError(f"metrology needs at least 2 subjects, got {n_subj}")
    counts = np.bincount(s_codes)
    if reference is None and site is None and counts.max() < 2:
        raise SitebenchError("nothing to estimate: every subject was measured once and no "
                             "reference or site column was given (need replicates or a true value)")
    out: dict[str, Any] = {}
    notes: list[str] = []

    # ---- bias, % bias and linearity against the true value
    if x_ref is not None:
        ref_range = (pd.Series(x_ref).groupby(s_codes).agg(["min", "max"]))
        varies = ref_range["max"] > ref_range["min"]
        if varies.any():
            bad = s_levels[int(np.flatnonzero(varies.to_numpy())[0])]
            raise SitebenchError(f"column '{reference}' differs within {subject} {bad!r}; the true "
                                 "value must be one number per subject")
        truth = ref_range["min"].to_numpy()
        ybar = np.bincount(s_codes, weights=y) / counts
        diff = ybar - truth
        out["bias"] = float(diff.mean())
        out["bias_ci_low"], out["bias_ci_high"] = _t_interval(
            out["bias"], float(diff.std(ddof=1)) / math.sqrt(n_subj), n_subj - 1, alpha)
        if np.any(truth == 0):
            notes.append(f"% bias not estimable: '{reference}' is 0 for some {subject}")
        else:
            rel = 100.0 * diff / truth
            out["percent_bias"] = float(rel.mean())
            out["percent_bias_ci_low"], out["percent_bias_ci_high"] = _t_interval(
                out["percent_bias"], float(rel.std(ddof=1)) / math.sqrt(n_subj), n_subj - 1, alpha)
        distinct = len(np.unique(truth))
        if distinct < 3:
            notes.append(f"linearity not estimable: needs at least 3 distinct true values, got "
                         f"{distinct}")
        else:
            design = np.column_stack([np.ones(n_subj), truth])
            coef, se, rss, df = _ols(design, ybar)
            for name, j in (("intercept", 0), ("slope", 1)):
                out[name] = float(coef[j])
                out[f"{name}_ci_low"], out[f"{name}_ci_high"] = _t_interval(
                    float(coef[j]), float(se[j]), df, alpha)
            tss = float(((ybar - ybar.mean()) ** 2).sum())
            out["r_squared"] = 1.0 - rss / tss if tss > 0 else None
            if n_subj < 4:
                notes.append("quadratic linearity test not estimable: needs at least 4 subjects")
            else:
                centred = truth - truth.mean()
                quad = np.column_stack([np.ones(n_subj), centred, centred**2])
                qcoef, qse, qrss, qdf = _ols(quad, ybar)
                if qrss <= 1e-12 * max(tss, 1e-300):
                    notes.append("quadratic linearity test not estimable: the fit is exact")
                else:
                    out["quadratic_p"] = float(2 * special.stdtr(qdf, -abs(qcoef[2] / qse[2])))
    else:
        notes.append("bias and linearity not estimable: no reference (true value) column")

    # ---- repeatability within subject (within subject and site when sites are given)
    if sites is not None:
        g_codes, g_levels = pd.factorize(sites, sort=True)
        cells = pd.factorize(s_codes * len(g_levels) + g_codes, sort=True)[0]
        where = f"{subject} and {site}"
    else:
        g_codes, g_levels = None, None
        cells = s_codes
        where = subject
    var_w, df_w = _pooled_within(y, cells)
    if df_w == 0:
        notes.append(f"repeatability not estimable: each {where} was measured once (needs replicates)")
    else:
        wsd = math.sqrt(var_w)
        low, high = _chi2_variance_ci(var_w, df_w, alpha)
        out.update(wsd=wsd, wsd_ci_low=math.sqrt(low), wsd_ci_high=math.sqrt(high), wsd_df=df_w,
                   rc=RC_FACTOR * wsd, rc_ci_low=RC_FACTOR * math.sqrt(low),
                   rc_ci_high=RC_FACTOR * math.sqrt(high))
        if wsd == 0:
            notes.append("replicates are identical: wSD = 0 (check that they are true repeats)")
        if np.any(y <= 0):
            notes.append("wCV not estimable: it needs positive values (log scale)")
        else:
            var_log, _ = _pooled_within(np.log(y), cells)
            lo_log, hi_log = _chi2_variance_ci(var_log, df_w, alpha)
            out.update(wcv=math.sqrt(math.expm1(var_log)), wcv_ci_low=math.sqrt(math.expm1(lo_log)),
                       wcv_ci_high=math.sqrt(math.expm1(hi_log)))

    # ---- reproducibility across sites
    n_sites = None
    if sites is None:
        notes.append("reproducibility not estimable: no site column")
    else:
        n_sites = len(g_levels)
        out.update(_reproducibility(y, s_codes, g_codes, list(s_levels), list(g_levels),
                                    subject, site, alpha, notes, reproducibility))
    return MetrologyResult(subject=subject, value=value, n_subjects=n_subj,
                           n_measurements=len(y), n_sites=n_sites, alpha=alpha,
                           notes=tuple(notes), **out)


def _reproducibility(y: np.ndarray, s_codes: np.ndarray, g_codes: np.ndarray,
                     s_levels: Sequence[Any], g_levels: Sequence[Any], subject: str, site: str,
                     alpha: float, notes: list[str], method: str = "auto") -> dict[str, Any]:
    """Reproducibility across sites: balanced ANOVA (method of moments), or REML components."""
    n, s = len(s_levels), len(g_levels)
    if s < 2:
        notes.append(f"reproducibility not estimable: only one {site}")
        return {}
    cell_n = np.zeros((n, s), dtype=int)
    np.add.at(cell_n, (s_codes, g_codes), 1)
    if (cell_n > 0).sum(axis=1).max() < 2:
        notes.append(f"reproducibility not estimable: each {subject} was measured at one "
                     f"{site} only, so {site} and {subject} variance cannot be separated")
        return {}
    balanced = not (cell_n == 0).any() and cell_n.min() == cell_n.max()
    if method == "reml" or (method == "auto" and not balanced):
        return _reproducibility_reml(y, s_codes, g_codes, cell_n, subject, site, alpha, notes)
    if (cell_n == 0).any():
        i, j = np.argwhere(cell_n == 0)[0]
        notes.append(f"reproducibility not estimable: {int((cell_n == 0).sum())} {subject} x "
                     f"{site} cells are empty (e.g. {s_levels[i]!r} at {g_levels[j]!r}); the "
                     "ANOVA estimator needs every subject measured at every site")
        return {}
    if cell_n.min() != cell_n.max():
        notes.append(f"reproducibility not estimable: unequal numbers of measurements per "
                     f"{subject} and {site} ({cell_n.min()} to {cell_n.max()}); the ANOVA "
                     "estimator needs a balanced design")
        return {}
    r = int(cell_n[0, 0])
    cell_mean = np.zeros((n, s))
    np.add.at(cell_mean, (s_codes, g_codes), y)
    cell_mean /= r
    grand = cell_mean.mean()
    subj_mean, site_mean = cell_mean.mean(axis=1), cell_mean.mean(axis=0)
    ms_site = r * n * float(((site_mean - grand) ** 2).sum()) / (s - 1)
    resid = cell_mean - subj_mean[:, None] - site_mean[None, :] + grand
    df_int = (n - 1) * (s - 1)
    ms_int = r * float((resid**2).sum()) / df_int
    out: dict[str, Any] = {}
    if r >= 2:
        df_err = n * s * (r - 1)
        ms_err = float(((y - cell_mean[s_codes, g_codes]) ** 2).sum()) / df_err
        raw = {"sigma2_site": (ms_site - ms_int) / (n * r),
               "sigma2_interaction": (ms_int - ms_err) / r, "sigma2_within": ms_err}
        terms = [(ms_site / (n * r), s - 1), (ms_int * (n - 1) / (n * r), df_int),
                 (ms_err * (r - 1) / r, df_err)]
        method = (f"balanced two-way crossed random-effects ANOVA ({n} {subject} x {s} {site} x "
                  f"{r} replicates), method-of-moments variance components; Satterthwaite CI")
    else:
        raw = {"sigma2_site": (ms_site - ms_int) / n, "sigma2_within": ms_int}
        terms = [(ms_site / n, s - 1), (ms_int * (n - 1) / n, df_int)]
        method = (f"two-way crossed random-effects ANOVA without replication ({n} {subject} x {s} "
                  f"{site}), method-of-moments variance components; Satterthwaite CI")
        notes.append(f"one measurement per {subject} and {site}: sigma2_within includes the "
                     f"{subject} x {site} interaction (not separable without replicates)")
    total = sum(term for term, _ in terms)
    for name, estimate in raw.items():
        if estimate < 0:
            notes.append(f"{name} estimated negative ({estimate:.4g}), reported as 0; the "
                         "reproducibility variance uses the untruncated ANOVA sum")
        out[name] = max(estimate, 0.0)
    out["reproducibility_method"] = method
    if total <= 0:
        notes.append("reproducibility variance is 0: no variation within subjects")
        out.update(reproducibility_sd=0.0, rdc=0.0)
        return out
    df = total**2 / sum(term**2 / d for term, d in terms)
    low, high = _chi2_variance_ci(total, df, alpha)
    sd = math.sqrt(total)
    out.update(reproducibility_sd=sd, reproducibility_sd_ci_low=math.sqrt(low),
               reproducibility_sd_ci_high=math.sqrt(high), reproducibility_df=float(df),
               rdc=RC_FACTOR * sd, rdc_ci_low=RC_FACTOR * math.sqrt(low),
               rdc_ci_high=RC_FACTOR * math.sqrt(high))
    return out


def _reproducibility_reml(y: np.ndarray, s_codes: np.ndarray, g_codes: np.ndarray, cell_n: np.ndarray,
                          subject: str, site: str, alpha: float, notes: list[str]) -> dict[str, Any]:
    """REML variance components of y ~ 1 + (1|subject) + (1|site) [+ (1|subject:site)] (any design)."""
    from sitebench.stratification.lmm import ENGINE_ID, fit_lmm  # only unbalanced designs pay for the LMM

    frame = pd.DataFrame({"s": s_codes, "g": g_codes, "y": y})
    replicated = bool((cell_n >= 2).any())
    vc = {"interaction": "g"} if replicated else {}
    fit = fit_lmm(frame, "y ~ 1", "s", vc=vc, crossed={"site": "g"})
    comps = fit.variance_components
    out: dict[str, Any] = {"sigma2_site": comps["site"], "sigma2_within": comps["residual"]}
    terms = f"(1 | {subject}) + (1 | {site})"
    if replicated:
        out["sigma2_interaction"] = comps["interaction"]
        terms += f" + (1 | {subject}:{site})"
    else:
        notes.append(f"one measurement per {subject} and {site}: sigma2_within includes the "
                     f"{subject} x {site} interaction (not separable without replicates)")
    design = "balanced" if cell_n.min() == cell_n.max() else "unbalanced"
    out["reproducibility_method"] = (f"REML variance components ({ENGINE_ID}) of y ~ 1 + {terms} on a "
                                     f"{design} design ({int(cell_n.sum())} measurements, {cell_n.shape[0]} "
                                     f"{subject} x {cell_n.shape[1]} {site}); Satterthwaite CI")
    if not fit.converged:
        notes.append("the REML fit of the reproducibility components did not meet lme4's convergence check")
    names = ["site", "interaction", "residual"] if replicated else ["site", "residual"]
    summed = fit.variance_sum(names)
    total = summed["variance"]
    if total <= 0:
        notes.append("reproducibility variance is 0: no variation within subjects")
        out.update(reproducibility_sd=0.0, rdc=0.0)
        return out
    sd = math.sqrt(total)
    out.update(reproducibility_sd=sd, rdc=RC_FACTOR * sd)
    if not math.isfinite(summed["df"]):
        notes.append("reproducibility CI not estimable: the REML information matrix is singular")
        return out
    low, high = _chi2_variance_ci(total, summed["df"], alpha)
    out.update(reproducibility_sd_ci_low=math.sqrt(low), reproducibility_sd_ci_high=math.sqrt(high),
               reproducibility_df=float(summed["df"]), rdc_ci_low=RC_FACTOR * math.sqrt(low),
               rdc_ci_high=RC_FACTOR * math.sqrt(high))
    return out

