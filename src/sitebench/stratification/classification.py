"""Binary classification performance of a biomarker, overall and per site / vendor / software version.

* :func:`delong` -- ROC AUC with the DeLong, DeLong & Clarke-Pearson (1988) variance, computed
  with the fast midrank algorithm of Sun & Xu (2014, IEEE Signal Process. Lett. 21:1389), O(n log n).
  The CI is pROC's default ``ci.auc(method = "delong")``: a normal interval on the AUC scale,
  clipped to [0, 1]. With a second score on the same subjects, the paired DeLong test of
  ``roc.test(paired = TRUE, method = "delong")``: difference auc1 - auc2, its (unclipped) normal
  CI, z and the two-sided p. Ties count one half (midranks). Checked against R pROC
  (tests/test_classification.py).

  **Direction**: a LARGER score means the POSITIVE class (truth 1), i.e. pROC
  ``direction = "<"`` (controls < cases). The direction is never chosen from the data: a score
  that runs the other way gives AUC < 0.5; negate it to flip it.
* :func:`sensitivity_specificity` -- counts, sensitivity and specificity with exact
  Clopper-Pearson CIs.
* :func:`calibration` -- calibration-in-the-large (intercept of ``logit(y) ~ offset(logit(p))``)
  and calibration slope (coefficient of ``logit(p)`` in ``logit(y) ~ logit(p)``), logistic GLMs
  with Wald CIs. Ideal calibration is intercept 0 and slope 1.
* :func:`classification_by_stratum` -- the above overall and per level of stratum columns; levels
  with one class or too few of either class are reported as "not estimable" with the reason.

Truth is binary: 1/0 or True/False (1 = positive). Bad input raises
:class:`sitebench.errors.SitebenchError` with one line.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from sitebench.errors import SitebenchError
from sitebench.provenance import jsonable
from sitebench.stratification.validation import as_numeric, check_alpha, fmt_number

__all__ = [
    "CalibrationResult",
    "DeLongResult",
    "SensitivitySpecificityResult",
    "StratifiedClassification",
    "calibration",
    "classification_by_stratum",
    "delong",
    "sensitivity_specificity",
]

ESTIMABLE = "ok"
NOT_ESTIMABLE = "not estimable"
OVERALL = "overall"
OVERALL_LEVEL = "all"
#: Columns of :meth:`StratifiedClassification.to_frame`.
STRATUM_COLUMNS: tuple[str, ...] = (
    "stratum", "level", "metric", "estimate", "ci_low", "ci_high",
    "n", "n_positive", "n_negative", "status", "reason",
)
#: Columns of the single-result ``to_frame`` tables.
TERM_COLUMNS: tuple[str, ...] = ("term", "estimate", "se", "ci_low", "ci_high", "z", "p")


# ----------------------------------------------------------------------------- input checks
def _values(values: Any, name: str) -> pd.Series:
    """1-D values as a Series (position index)."""
    if isinstance(values, pd.DataFrame):
        raise SitebenchError(f"{name} must be 1-D (one value per subject), got a table")
    if isinstance(values, pd.Series):
        return values.reset_index(drop=True)
    array = np.asarray(values if not isinstance(values, (str, bytes)) else [values], dtype=object)
    if array.ndim != 1:
        raise SitebenchError(f"{name} must be 1-D (one value per subject), got shape {array.shape}")
    return pd.Series(array, dtype=object)


def _missing(series: pd.Series, name: str) -> None:
    missing = series.isna().to_numpy()
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise SitebenchError(f"{name} has {int(missing.sum())} missing (NaN) value(s), first at position {first}")


def _binary(values: Any, name: str) -> np.ndarray:
    """0/1 int array from 0/1 or True/False values; anything else is a one-line error."""
    series = _values(values, name)
    if len(series) == 0:
        raise SitebenchError(f"{name} is empty")
    _missing(series, name)
    distinct = pd.unique(series.astype(object))
    allowed = []
    for value in distinct:
        if isinstance(value, (bool, np.bool_)):
            allowed.append(int(value))
        elif isinstance(value, (int, np.integer, float, np.floating)) and float(value) in (0.0, 1.0):
            allowed.append(int(value))
        else:
            shown = ", ".join(repr(v.item() if hasattr(v, "item") else v) for v in distinct[:5])
            more = ", ..." if len(distinct) > 5 else ""
            raise SitebenchError(
                f"{name} must be binary (1/0 or True/False, 1 = positive); found values {shown}{more}")
    return np.array([int(bool(v)) for v in series.to_numpy()], dtype=np.int64)


def _numeric(values: Any, name: str) -> np.ndarray:
    """Scores or values with no missing entry (ROC and calibration need every one)."""
    series = _values(values, name)
    if len(series) == 0:
        raise SitebenchError(f"{name} is empty")
    _missing(series, name)
    array = as_numeric(series, name)
    if np.isnan(array).any():
        first = int(np.flatnonzero(np.isnan(array))[0])
        raise SitebenchError(f"{name} has missing (NaN) value(s), first at position {first}")
    return array


def _same_length(first: np.ndarray, first_name: str, other: np.ndarray, other_name: str) -> None:
    if len(first) != len(other):
        raise SitebenchError(f"{first_name} has {len(first)} values but {other_name} has {len(other)}")


def _two_classes(truth: np.ndarray, name: str = "truth") -> None:
    n_pos = int(truth.sum())
    if n_pos == 0 or n_pos == len(truth):
        only = "1 (positive)" if n_pos else "0 (negative)"
        raise SitebenchError(
            f"{name} has one class only (all {len(truth)} values are {only}); need positives and negatives")


def _num(value: Any) -> float | None:
    """float, or None when missing / not finite (for to_dict)."""
    return jsonable(value) if value is not None else None


def _fmt_ci(low: float | None, high: float | None, digits: int = 3) -> str:
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "[CI n/e]"
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def _fmt_p(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return "n/e"
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"


# ----------------------------------------------------------------------------- DeLong
def _placements(positive: np.ndarray, negative: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong structural components (placement values) by midranks (Sun & Xu 2014).

    V10[i]: share of negatives below positive i (ties 1/2); V01[j]: share of positives above
    negative j (ties 1/2). AUC = mean(V10) = mean(V01).
    """
    m, n = len(positive), len(negative)
    tz = stats.rankdata(np.concatenate([positive, negative]), method="average")
    tx = stats.rankdata(positive, method="average")
    ty = stats.rankdata(negative, method="average")
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    auc = float((tz[:m].sum() - m * (m + 1) / 2.0) / (m * n))
    return auc, v10, v01


def _delong_covariance(components: list[tuple[float, np.ndarray, np.ndarray]]) -> np.ndarray | None:
    """k x k DeLong covariance of k AUCs on the same subjects (None when m < 2 or n < 2)."""
    m, n = len(components[0][1]), len(components[0][2])
    if m < 2 or n < 2:
        return None
    v10 = np.vstack([c[1] - c[0] for c in components])
    v01 = np.vstack([c[2] - c[0] for c in components])
    s10 = v10 @ v10.T / (m - 1)
    s01 = v01 @ v01.T / (n - 1)
    return s10 / m + s01 / n


def _normal_ci(estimate: float, se: float, alpha: float, clip: bool) -> tuple[float, float]:
    crit = stats.norm.ppf(1.0 - alpha / 2.0)
    low, high = estimate - crit * se, estimate + crit * se
    if clip:
        low, high = min(max(low, 0.0), 1.0), min(max(high, 0.0), 1.0)
    return float(low), float(high)


@dataclass
class DeLongResult:
    """AUC with DeLong CI; with a second score also the paired DeLong test (auc - auc2).

    Direction: larger score = positive class (pROC ``direction = "<"``). Fields that cannot be
    estimated (the variance needs at least 2 positives and 2 negatives) are None.
    """

    auc: float
    ci_low: float | None
    ci_high: float | None
    se: float | None
    n_positive: int
    n_negative: int
    alpha: float = 0.05
    paired: bool = False
    auc2: float | None = None
    auc2_ci_low: float | None = None
    auc2_ci_high: float | None = None
    auc2_se: float | None = None
    difference: float | None = None
    difference_ci_low: float | None = None
    difference_ci_high: float | None = None
    difference_se: float | None = None
    z: float | None = None
    p: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record; None where not estimable."""
        keys = ["auc", "ci_low", "ci_high", "n_positive", "n_negative"]
        if self.paired:
            keys += ["auc2", "auc2_ci_low", "auc2_ci_high", "difference", "difference_ci_low",
                     "difference_ci_high", "z", "p"]
        return {key: jsonable(getattr(self, key)) for key in keys}

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: one row per term (auc; with two scores also auc2 and difference)."""
        rows = [{"term": "auc", "estimate": self.auc, "se": self.se, "ci_low": self.ci_low,
                 "ci_high": self.ci_high, "z": None, "p": None}]
        if self.paired:
            rows.append({"term": "auc2", "estimate": self.auc2, "se": self.auc2_se,
                         "ci_low": self.auc2_ci_low, "ci_high": self.auc2_ci_high, "z": None, "p": None})
            rows.append({"term": "difference", "estimate": self.difference, "se": self.difference_se,
                         "ci_low": self.difference_ci_low, "ci_high": self.difference_ci_high,
                         "z": self.z, "p": self.p})
        frame = pd.DataFrame(rows, columns=list(TERM_COLUMNS))
        for column in TERM_COLUMNS[1:]:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
        frame["n_positive"] = self.n_positive
        frame["n_negative"] = self.n_negative
        return frame

    def summary(self) -> str:
        """A few readable lines."""
        pct = f"{(1 - self.alpha) * 100:g}%"
        lines = [
            f"AUC (DeLong, larger score = positive): {self.n_positive} positive, {self.n_negative} negative",
            f"  AUC  {fmt_number(self.auc, '.3f')} {pct} CI {_fmt_ci(self.ci_low, self.ci_high)}",
        ]
        if self.paired:
            lines.append(f"  AUC2 {fmt_number(self.auc2, '.3f')} {pct} CI {_fmt_ci(self.auc2_ci_low, self.auc2_ci_high)}")
            lines.append(
                f"  paired DeLong test: difference {fmt_number(self.difference, '.4f')} {pct} CI "
                f"{_fmt_ci(self.difference_ci_low, self.difference_ci_high, 4)}, "
                f"z = {fmt_number(self.z, '.3f')}, p = {_fmt_p(self.p)}")
        if self.se is None:
            lines.append("  note: the DeLong variance needs at least 2 positives and 2 negatives")
        return "\n".join(lines)


def delong(truth: Any, score: Any, score2: Any = None, alpha: float = 0.05) -> DeLongResult:
    """AUC of ``score`` for ``truth`` with the DeLong CI; with ``score2`` the paired DeLong test.

    Direction: a larger score means the positive class (truth 1), pROC ``direction = "<"``.
    The CI is a normal interval on the AUC scale clipped to [0, 1] (pROC ``ci.auc`` default);
    the difference CI (auc - auc2) is not clipped, as in pROC ``roc.test``. Ties count 1/2.
    """
    alpha = check_alpha(alpha)
    y = _binary(truth, "truth")
    x1 = _numeric(score, "score")
    _same_length(y, "truth", x1, "score")
    x2 = None
    if score2 is not None:
        x2 = _numeric(score2, "score2")
        _same_length(y, "truth", x2, "score2")
    _two_classes(y)
    pos, neg = y == 1, y == 0
    comps = [_placements(x1[pos], x1[neg])]
    if x2 is not None:
        comps.append(_placements(x2[pos], x2[neg]))
    cov = _delong_covariance(comps)

    def auc_ci(k: int) -> tuple[float | None, float | None, float | None]:
        if cov is None:
            return None, None, None
        se = math.sqrt(max(float(cov[k, k]), 0.0))
        low, high = _normal_ci(comps[k][0], se, alpha, clip=True)
        return se, low, high

    se1, low1, high1 = auc_ci(0)
    result = DeLongResult(auc=comps[0][0], ci_low=low1, ci_high=high1, se=se1,
                          n_positive=int(pos.sum()), n_negative=int(neg.sum()), alpha=alpha)
    if x2 is None:
        return result
    se2, low2, high2 = auc_ci(1)
    result.paired = True
    result.auc2, result.auc2_ci_low, result.auc2_ci_high, result.auc2_se = comps[1][0], low2, high2, se2
    diff = comps[0][0] - comps[1][0]
    result.difference = diff
    if cov is not None:
        var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
        sig = math.sqrt(max(var, 0.0))
        result.difference_se = sig
        result.difference_ci_low, result.difference_ci_high = _normal_ci(diff, sig, alpha, clip=False)
        if sig > 0:
            z = diff / sig
        elif diff == 0:  # pROC: 0/0 -> z = 0 (identical ROC curves)
            z = 0.0
        else:
            z = math.copysign(math.inf, diff)
        result.z = z
        result.p = float(2.0 * stats.norm.sf(abs(z)))
    return result


# ----------------------------------------------------------------------------- sensitivity / specificity
def _clopper_pearson(k: int, n: int, alpha: float) -> tuple[float | None, float | None, float | None]:
    if n == 0:
        return None, None, None
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=1.0 - alpha, method="exact")
    return k / n, float(ci.low), float(ci.high)


@dataclass
class SensitivitySpecificityResult:
    """2x2 counts with sensitivity and specificity and exact Clopper-Pearson CIs."""

    tp: int
    fn: int
    tn: int
    fp: int
    sensitivity: float | None
    sensitivity_ci_low: float | None
    sensitivity_ci_high: float | None
    specificity: float | None
    specificity_ci_low: float | None
    specificity_ci_high: float | None
    alpha: float = 0.05

    @property
    def n_positive(self) -> int:
        return self.tp + self.fn

    @property
    def n_negative(self) -> int:
        return self.tn + self.fp

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record; None where not estimable."""
        keys = ["tp", "fn", "tn", "fp", "n_positive", "n_negative", "sensitivity", "sensitivity_ci_low",
                "sensitivity_ci_high", "specificity", "specificity_ci_low", "specificity_ci_high", "alpha"]
        return {key: jsonable(getattr(self, key)) for key in keys}

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: one row per measure (sensitivity, specificity) with its counts."""
        rows = [
            {"measure": "sensitivity", "estimate": self.sensitivity, "ci_low": self.sensitivity_ci_low,
             "ci_high": self.sensitivity_ci_high, "successes": self.tp, "trials": self.n_positive},
            {"measure": "specificity", "estimate": self.specificity, "ci_low": self.specificity_ci_low,
             "ci_high": self.specificity_ci_high, "successes": self.tn, "trials": self.n_negative},
        ]
        frame = pd.DataFrame(rows)
        for column in ("estimate", "ci_low", "ci_high"):
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
        return frame

    def summary(self) -> str:
        pct = f"{(1 - self.alpha) * 100:g}%"
        return "\n".join([
            f"TP {self.tp}  FN {self.fn}  TN {self.tn}  FP {self.fp}",
            f"  sensitivity {fmt_number(self.sensitivity, '.3f')} ({self.tp}/{self.n_positive}) {pct} Clopper-Pearson CI "
            f"{_fmt_ci(self.sensitivity_ci_low, self.sensitivity_ci_high)}",
            f"  specificity {fmt_number(self.specificity, '.3f')} ({self.tn}/{self.n_negative}) {pct} Clopper-Pearson CI "
            f"{_fmt_ci(self.specificity_ci_low, self.specificity_ci_high)}",
        ])


def sensitivity_specificity(truth: Any, predicted: Any, alpha: float = 0.05) -> SensitivitySpecificityResult:
    """Sensitivity TP/(TP+FN) and specificity TN/(TN+FP) with exact Clopper-Pearson CIs.

    ``truth`` and ``predicted`` are binary (1/0 or True/False, 1 = positive).
    """
    alpha = check_alpha(alpha)
    y = _binary(truth, "truth")
    yhat = _binary(predicted, "predicted")
    _same_length(y, "truth", yhat, "predicted")
    _two_classes(y)
    return _sens_spec(y, yhat, alpha)


def _sens_spec(y: np.ndarray, yhat: np.ndarray, alpha: float) -> SensitivitySpecificityResult:
    tp = int(((y == 1) & (yhat == 1)).sum())
    fn = int(((y == 1) & (yhat == 0)).sum())
    tn = int(((y == 0) & (yhat == 0)).sum())
    fp = int(((y == 0) & (yhat == 1)).sum())
    sens = _clopper_pearson(tp, tp + fn, alpha)
    spec = _clopper_pearson(tn, tn + fp, alpha)
    return SensitivitySpecificityResult(tp, fn, tn, fp, *sens, *spec, alpha=alpha)


# ----------------------------------------------------------------------------- calibration
@dataclass
class CalibrationResult:
    """Calibration-in-the-large (ideal 0) and calibration slope (ideal 1) with Wald CIs."""

    intercept: float
    intercept_se: float
    intercept_ci_low: float
    intercept_ci_high: float
    slope: float
    slope_se: float
    slope_ci_low: float
    slope_ci_high: float
    n: int
    n_positive: int
    n_negative: int
    alpha: float = 0.05

    def to_dict(self) -> dict[str, Any]:
        keys = ["intercept", "intercept_ci_low", "intercept_ci_high", "slope", "slope_ci_low",
                "slope_ci_high", "n", "n_positive", "n_negative", "alpha"]
        return {key: jsonable(getattr(self, key)) for key in keys}

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: rows calibration_intercept and calibration_slope (with ideal value)."""
        rows = [
            {"term": "calibration_intercept", "estimate": self.intercept, "se": self.intercept_se,
             "ci_low": self.intercept_ci_low, "ci_high": self.intercept_ci_high, "ideal": 0.0},
            {"term": "calibration_slope", "estimate": self.slope, "se": self.slope_se,
             "ci_low": self.slope_ci_low, "ci_high": self.slope_ci_high, "ideal": 1.0},
        ]
        frame = pd.DataFrame(rows)
        frame["n"] = self.n
        return frame

    def summary(self) -> str:
        pct = f"{(1 - self.alpha) * 100:g}%"
        return "\n".join([
            f"Calibration (logistic, n = {self.n}: {self.n_positive} positive, {self.n_negative} negative)",
            f"  calibration-in-the-large {self.intercept:.3f} {pct} CI "
            f"{_fmt_ci(self.intercept_ci_low, self.intercept_ci_high)} (ideal 0)",
            f"  calibration slope        {self.slope:.3f} {pct} CI "
            f"{_fmt_ci(self.slope_ci_low, self.slope_ci_high)} (ideal 1)",
        ])


def _probabilities(values: Any, name: str = "probability") -> np.ndarray:
    p = _numeric(values, name)
    outside = (p < 0) | (p > 1) | ~np.isfinite(p)
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        raise SitebenchError(
            f"{name} must lie strictly between 0 and 1; {int(outside.sum())} value(s) outside [0, 1], "
            f"first {p[first]!r} at position {first}")
    edge = (p == 0) | (p == 1)
    if edge.any():
        first = int(np.flatnonzero(edge)[0])
        raise SitebenchError(
            f"{name} has {int(edge.sum())} value(s) at exactly 0 or 1 (first at position {first}), where "
            f"logit(p) is infinite; calibration needs probabilities strictly between 0 and 1")
    return p


def _fit_calibration(y: np.ndarray, p: np.ndarray, alpha: float) -> CalibrationResult:
    """Both logistic fits; raises SitebenchError when a fit fails (separation, no convergence)."""
    import statsmodels.api as sm
    from statsmodels.tools.sm_exceptions import (
        ConvergenceWarning,
        PerfectSeparationError,
        PerfectSeparationWarning,
    )

    lp = np.log(p) - np.log1p(-p)
    family = sm.families.Binomial()
    n = len(y)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            warnings.simplefilter("error", PerfectSeparationWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            citl = sm.GLM(y, np.ones((n, 1)), family=family, offset=lp).fit()
            slope = sm.GLM(y, np.column_stack([np.ones(n), lp]), family=family).fit()
    except (ConvergenceWarning, PerfectSeparationWarning, PerfectSeparationError) as exc:
        raise SitebenchError(f"calibration model could not be fitted ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    except (np.linalg.LinAlgError, ValueError) as exc:
        raise SitebenchError(f"calibration model could not be fitted ({exc})") from None
    if np.ptp(lp) == 0:
        raise SitebenchError("calibration slope not estimable: all probabilities are equal")
    ci_citl = np.asarray(citl.conf_int(alpha=alpha))
    ci_slope = np.asarray(slope.conf_int(alpha=alpha))
    values = [citl.params[0], citl.bse[0], *ci_citl[0], slope.params[1], slope.bse[1], *ci_slope[1]]
    if not all(math.isfinite(float(v)) for v in values):
        raise SitebenchError("calibration model could not be fitted (non-finite estimates)")
    return CalibrationResult(
        intercept=float(citl.params[0]), intercept_se=float(citl.bse[0]),
        intercept_ci_low=float(ci_citl[0, 0]), intercept_ci_high=float(ci_citl[0, 1]),
        slope=float(slope.params[1]), slope_se=float(slope.bse[1]),
        slope_ci_low=float(ci_slope[1, 0]), slope_ci_high=float(ci_slope[1, 1]),
        n=n, n_positive=int(y.sum()), n_negative=int(n - y.sum()), alpha=alpha,
    )


def calibration(truth: Any, probability: Any, alpha: float = 0.05) -> CalibrationResult:
    """Calibration-in-the-large and calibration slope of predicted probabilities.

    Intercept: ``logit(P(y=1)) = a + offset(logit(p))`` (0 when the mean risk is right).
    Slope: ``logit(P(y=1)) = a + b * logit(p)`` (1 when the spread of the risks is right).
    Logistic GLMs (statsmodels, binomial), Wald CIs. Probabilities must be strictly in (0, 1).
    """
    alpha = check_alpha(alpha)
    y = _binary(truth, "truth")
    p = _probabilities(probability)
    _same_length(y, "truth", p, "probability")
    _two_classes(y)
    return _fit_calibration(y, p, alpha)


# ----------------------------------------------------------------------------- per stratum
@dataclass
class StratifiedClassification:
    """Classification metrics overall and per level of each stratum column."""

    truth: str
    score: str
    strata: tuple[str, ...]
    metrics: tuple[str, ...]
    min_per_class: int
    alpha: float
    threshold: float | None
    predicted: str | None
    n: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: one row per stratum, level and metric (NaN estimate where not estimable)."""
        frame = pd.DataFrame(self.rows, columns=list(STRATUM_COLUMNS))
        for column in ("estimate", "ci_low", "ci_high"):
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
        for column in ("n", "n_positive", "n_negative"):
            frame[column] = frame[column].astype("Int64")
        return frame

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record (None where not estimable)."""
        return {
            "truth": self.truth,
            "score": self.score,
            "strata": list(self.strata),
            "metrics": list(self.metrics),
            "min_per_class": int(self.min_per_class),
            "alpha": float(self.alpha),
            "threshold": jsonable(self.threshold),
            "predicted": self.predicted,
            "n": int(self.n),
            "rows": [{key: jsonable(row[key]) for key in STRATUM_COLUMNS} for row in self.rows],
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """Text table: one line per stratum level, each metric as 'estimate [CI]' or n/e."""
        pct = f"{(1 - self.alpha) * 100:g}%"
        lines = [f"Classification of '{self.truth}' by '{self.score}' (larger = positive): {self.n} subjects, "
                 f"{pct} CIs, levels need >= {self.min_per_class} of each class"]
        table: dict[tuple[str, str], dict[str, str]] = {}
        for row in self.rows:
            cells = table.setdefault((row["stratum"], row["level"]),
                                     {"n+": str(row["n_positive"]), "n-": str(row["n_negative"])})
            if row["status"] == ESTIMABLE:
                cells[row["metric"]] = f"{row['estimate']:.3f} {_fmt_ci(row['ci_low'], row['ci_high'])}"
            else:
                cells[row["metric"]] = "n/e"
        header = ["stratum", "level", "n+", "n-", *self.metrics]
        body = [[stratum, level] + [cells.get(h, "") for h in header[2:]]
                for (stratum, level), cells in table.items()]
        widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body)
        grouped: dict[tuple[str, str, str], list[str]] = {}
        for r in self.rows:
            if r["status"] != ESTIMABLE:
                grouped.setdefault((r["stratum"], r["level"], r["reason"]), []).append(r["metric"])
        reasons = [f"{stratum}={level} {'all metrics' if len(names) == len(self.metrics) else ', '.join(names)}: "
                   f"{reason}" for (stratum, level, reason), names in grouped.items()]
        if reasons:
            lines.append("not estimable (n/e):")
            lines.extend(f"  {reason}" for reason in reasons)
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def _level_rows(stratum: str, level: str, y: np.ndarray, x: np.ndarray, yhat: np.ndarray | None,
                metrics: tuple[str, ...], min_per_class: int, alpha: float) -> list[dict[str, Any]]:
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    base = {"stratum": stratum, "level": level, "n": int(len(y)), "n_positive": n_pos, "n_negative": n_neg}

    def row(metric: str, estimate=None, low=None, high=None, reason: str | None = None) -> dict[str, Any]:
        ok = reason is None
        return {**base, "metric": metric, "estimate": estimate if ok else None,
                "ci_low": low if ok else None, "ci_high": high if ok else None,
                "status": ESTIMABLE if ok else NOT_ESTIMABLE, "reason": reason}

    reason = None
    if n_pos == 0 or n_neg == 0:
        reason = f"one class only ({n_pos} positive, {n_neg} negative)"
    elif n_pos < min_per_class or n_neg < min_per_class:
        reason = (f"too few of a class ({n_pos} positive, {n_neg} negative; "
                  f"need at least {min_per_class} of each)")
    if reason is not None:
        return [row(metric, reason=reason) for metric in metrics]

    out: list[dict[str, Any]] = []
    auc = delong(y, x, alpha=alpha)
    if auc.ci_low is None:
        out.append(row("auc", reason="DeLong variance needs at least 2 positives and 2 negatives"))
    else:
        out.append(row("auc", auc.auc, auc.ci_low, auc.ci_high))
    if yhat is not None:
        ss = _sens_spec(y, yhat, alpha)
        out.append(row("sensitivity", ss.sensitivity, ss.sensitivity_ci_low, ss.sensitivity_ci_high))
        out.append(row("specificity", ss.specificity, ss.specificity_ci_low, ss.specificity_ci_high))
    if "calibration_intercept" in metrics:
        try:
            cal = _fit_calibration(y, x, alpha)
        except SitebenchError as exc:
            out.append(row("calibration_intercept", reason=str(exc)))
            out.append(row("calibration_slope", reason=str(exc)))
        else:
            out.append(row("calibration_intercept", cal.intercept, cal.intercept_ci_low, cal.intercept_ci_high))
            out.append(row("calibration_slope", cal.slope, cal.slope_ci_low, cal.slope_ci_high))
    return out


def classification_by_stratum(table: pd.DataFrame, truth: str, score: str,
                              strata: str | Sequence[str], min_per_class: int = 5, *,
                              predicted: str | None = None, threshold: float | None = None,
                              calibrate: bool | None = None,
                              alpha: float = 0.05) -> StratifiedClassification:
    """AUC (DeLong), sensitivity/specificity and calibration overall and per stratum level.

    ``truth`` names a binary column (1/0 or True/False), ``score`` a numeric column where a
    larger value means positive. Sensitivity/specificity are reported when ``predicted`` names
    a binary column of predicted classes, or ``threshold`` is given (positive when
    ``score >= threshold``). Calibration is reported when ``calibrate`` is True (the score must
    then be a probability strictly in (0, 1)); ``calibrate=None`` (default) reports it when every
    score lies strictly in (0, 1). A level with one class, or fewer than ``min_per_class``
    positives or negatives, is reported with status "not estimable" and the reason, never a
    number. Rows whose stratum value is missing are left out of that stratum (with a note).
    The overall row ("overall" / "all") uses every subject.
    """
    alpha = check_alpha(alpha)
    if not isinstance(table, pd.DataFrame):
        raise SitebenchError("table must be a pandas DataFrame (one row per subject)")
    if isinstance(strata, str):
        strata = (strata,)
    strata = tuple(strata)
    if isinstance(min_per_class, bool) or not isinstance(min_per_class, (int, np.integer)) or min_per_class < 1:
        raise SitebenchError(f"min_per_class must be a positive integer, got {min_per_class!r}")
    if predicted is not None and threshold is not None:
        raise SitebenchError("give either predicted (a column of predicted classes) or threshold, not both")
    wanted = [truth, score, *strata] + ([predicted] if predicted is not None else [])
    for column in wanted:
        if column not in table.columns:
            raise SitebenchError(f"column '{column}' not in the table (have: {', '.join(map(str, table.columns))})")

    data = table.reset_index(drop=True)
    y = _binary(data[truth], f"truth column '{truth}'")
    x = _numeric(data[score], f"score column '{score}'")
    _two_classes(y, f"truth column '{truth}'")
    yhat = None
    if predicted is not None:
        yhat = _binary(data[predicted], f"predicted column '{predicted}'")
    elif threshold is not None:
        try:
            threshold = float(threshold)
        except (TypeError, ValueError):
            raise SitebenchError(f"threshold must be a number, got {threshold!r}") from None
        yhat = (x >= threshold).astype(np.int64)

    notes: list[str] = []
    in_unit = bool(np.all((x > 0) & (x < 1)))
    if calibrate is None:
        calibrate = in_unit
        if not in_unit:
            notes.append(f"score '{score}' is not a probability in (0, 1): calibration not reported")
    elif calibrate:
        _probabilities(x, f"score column '{score}'")
    if yhat is None:
        notes.append("no predicted column or threshold: sensitivity/specificity not reported")

    metrics: tuple[str, ...] = ("auc",)
    if yhat is not None:
        metrics += ("sensitivity", "specificity")
    if calibrate:
        metrics += ("calibration_intercept", "calibration_slope")

    rows = _level_rows(OVERALL, OVERALL_LEVEL, y, x, yhat, metrics, min_per_class, alpha)
    for stratum in strata:
        values = data[stratum]
        missing = values.isna().to_numpy()
        if missing.any():
            notes.append(f"{int(missing.sum())} row(s) without a '{stratum}' value left out of that stratum")
        present = values[~missing]
        levels = list(dict.fromkeys(present.tolist()))
        try:
            levels = sorted(levels)
        except TypeError:
            pass
        for level in levels:
            mask = (~missing) & (values == level).to_numpy()
            rows.extend(_level_rows(stratum, str(level), y[mask], x[mask],
                                    None if yhat is None else yhat[mask], metrics, min_per_class, alpha))
    return StratifiedClassification(
        truth=truth, score=score, strata=strata, metrics=metrics, min_per_class=int(min_per_class),
        alpha=alpha, threshold=threshold, predicted=predicted, n=len(y), rows=rows, notes=notes)
