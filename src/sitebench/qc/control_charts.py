r"""Statistical process control charts for image-quality metrics and biomarkers, per scanner.

A QC dashboard follows each scanner's IQMs (SNR, CNR, EFC, FBER, ...) or a biomarker over time
and asks when the series left its qualified baseline. :class:`ControlChart` is fitted on that
baseline (scikit-learn style: options in ``__init__``, ``fit`` learns ``center_`` and
``sigma_``) and :meth:`ControlChart.chart` judges a monitored series, returning a
:class:`ControlChartResult` (``summary()``, ``to_frame()``, ``to_dict()``, ``first_signal``).

Shewhart individuals chart (Montgomery, *Introduction to Statistical Quality Control*, 7th ed.,
Wiley 2013, section 6.4 "Control charts for individual measurements"): ``center_`` is the
baseline mean; ``sigma_`` is MR-bar / d2, MR-bar the average moving range of two consecutive
baseline values and d2 = 1.128 (the d2 constant for subgroups of n = 2), or with ``sigma="std"``
the baseline sample standard deviation (ddof = 1). Limits: center +/- 3 sigma.

EWMA chart (Roberts 1959; Montgomery section 9.2; Lucas & Saccucci 1990, Technometrics 32:1-12):
z_t = lambda x_t + (1 - lambda) z_{t-1}, z_0 = center, with the exact (time-varying) limits
center +/- L sigma sqrt(lambda / (2 - lambda) (1 - (1 - lambda)^(2t))), t counting observed points.
Defaults lambda = 0.2, L = 2.86: an in-control ARL of about 370, as a 3-sigma Shewhart chart, and
about 5.2 for a 1.5 sigma shift. For an in-control ARL of about 500 use L = 2.962 with lambda = 0.2
(Lucas & Saccucci's table, reproduced in Montgomery section 9.2). These ARLs hold for the asymptotic
limits and known parameters (a Brook & Evans Markov chain gives 371 and 5.2); the exact limits are
narrower at first, and limits estimated from a short baseline alarm far more often (Jones, Champ &
Rigdon 2001, Technometrics 43:156-167).

Run rules (Westgard, Barry, Hunt & Groth 1981, Clin Chem 27:493-501), on z = (x - center) / sigma
over consecutive *observed* points, each flagged at the point that completes it:

* ``1_3s``: one point beyond 3 sigma (either side);
* ``2_2s``: two consecutive points beyond 2 sigma on the same side;
* ``R_4s``: the range of two consecutive points exceeds 4 sigma (the range form; Westgard's
  original wording is one point above +2 sigma and the next below -2 sigma);
* ``4_1s``: four consecutive points beyond 1 sigma on the same side;
* ``10_x``: ten consecutive points on the same side of the center (a point exactly on it breaks
  the run);
* ``ewma``: the EWMA statistic is outside its limits (not a Westgard rule; selectable alike).

"Beyond" is strict (> / <). Non-finite values (NaN, inf) are skipped: they get the flag
``missing``, no EWMA value, are never out of control, and the rules see their neighbours as
consecutive. Values are judged in the order given; ``times``, when given, must not decrease.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from sitebench.errors import SitebenchError

__all__ = ["ControlChart", "ControlChartResult", "plot_control_chart", "RULES", "WESTGARD_RULES",
           "D2_N2", "MIN_BASELINE", "SHORT_BASELINE", "MISSING"]

#: d2 for subgroups of two (moving range of consecutive individuals), Montgomery appendix table VI.
D2_N2 = 1.128
#: Westgard run rules, in the order they are reported.
WESTGARD_RULES: tuple[str, ...] = ("1_3s", "2_2s", "R_4s", "4_1s", "10_x")
#: Every selectable signal: the Westgard rules and the EWMA limits.
RULES: tuple[str, ...] = WESTGARD_RULES + ("ewma",)
#: Fewest usable baseline values :meth:`ControlChart.fit` accepts by default.
MIN_BASELINE = 8
#: Below this many baseline values the summary warns: Montgomery (section 6.4) advises 20-25 Phase I
#: values, and with estimated limits the in-control ARL of an EWMA chart falls well below its nominal value
#: (Jones, Champ & Rigdon 2001, Technometrics 43:156-167).
SHORT_BASELINE = 20
#: The flag of a skipped (non-finite) value.
MISSING = "missing"
_SIGMA_METHODS = {"mr": f"average moving range / {D2_N2}", "std": "sample standard deviation"}


def _finite_values(values: Any, what: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise SitebenchError(f"{what} must be numbers: {exc}") from None
    if array.ndim != 1:
        raise SitebenchError(f"{what} must be one series of numbers, got shape {array.shape}")
    return array


class ControlChart:
    """Shewhart individuals + EWMA chart with Westgard run rules, fitted on a qualified baseline.

    Parameters: ``sigma`` ``"mr"`` (MR-bar / 1.128, Montgomery) or ``"std"``; ``ewma_lambda`` and
    ``ewma_l`` the EWMA weight and limit width (Lucas & Saccucci 1990); ``rules`` the signals
    judged (subset of :data:`RULES`); ``min_baseline`` the fewest usable baseline values;
    ``metric`` a name for summaries and plots.

    Fitted attributes: ``center_``, ``sigma_``, ``n_baseline_``, ``mr_bar_`` (None with ``"std"``).
    """

    def __init__(self, *, sigma: str = "mr", ewma_lambda: float = 0.2, ewma_l: float = 2.86,
                 rules: Sequence[str] = RULES, min_baseline: int = MIN_BASELINE,
                 metric: str | None = None) -> None:
        self.sigma = sigma
        self.ewma_lambda = ewma_lambda
        self.ewma_l = ewma_l
        self.rules = rules
        self.min_baseline = min_baseline
        self.metric = metric

    # ------------------------------------------------------------------ options

    def _check_options(self) -> tuple[str, ...]:
        if self.sigma not in _SIGMA_METHODS:
            raise SitebenchError(f"sigma must be one of {sorted(_SIGMA_METHODS)}, got {self.sigma!r}")
        lam = float(self.ewma_lambda)
        if not 0 < lam <= 1:
            raise SitebenchError(f"ewma_lambda must be in (0, 1], got {self.ewma_lambda}")
        if not float(self.ewma_l) > 0:
            raise SitebenchError(f"ewma_l must be positive, got {self.ewma_l}")
        if int(self.min_baseline) < 2:
            raise SitebenchError(f"min_baseline must be at least 2, got {self.min_baseline}")
        rules = (self.rules,) if isinstance(self.rules, str) else tuple(self.rules)
        unknown = [r for r in rules if r not in RULES]
        if unknown:
            raise SitebenchError(f"unknown control-chart rule(s) {unknown}; choose from {list(RULES)}")
        return tuple(r for r in RULES if r in rules)

    # ------------------------------------------------------------------ fit

    def fit(self, baseline: Any) -> ControlChart:
        """Learn ``center_`` and ``sigma_`` from the qualified baseline (non-finite values dropped)."""
        self._check_options()
        x = _finite_values(baseline, "the control-chart baseline")
        x = x[np.isfinite(x)]
        need = int(self.min_baseline)
        if x.size < need:
            raise SitebenchError(f"the control-chart baseline has {x.size} usable values; at least {need} "
                                 "are needed to estimate the center and sigma")
        center = float(np.mean(x))
        if self.sigma == "mr":
            mr_bar = float(np.mean(np.abs(np.diff(x))))
            sigma = mr_bar / D2_N2
        else:
            mr_bar = None
            sigma = float(np.std(x, ddof=1))
        if not (math.isfinite(sigma) and sigma > 0):
            raise SitebenchError("the control-chart baseline does not vary (sigma 0): no control limits "
                                 "can be set")
        self.center_ = center
        self.sigma_ = sigma
        self.mr_bar_ = mr_bar
        self.n_baseline_ = int(x.size)
        return self

    # ------------------------------------------------------------------ chart

    def ewma_limits(self, t: np.ndarray | int) -> np.ndarray:
        """Half-width of the EWMA limits after ``t`` observed points (Montgomery section 9.2)."""
        self._check_fitted()
        lam, t = float(self.ewma_lambda), np.asarray(t, dtype=float)
        return self.ewma_l * self.sigma_ * np.sqrt(lam / (2.0 - lam) * (1.0 - (1.0 - lam) ** (2.0 * t)))

    def _check_fitted(self) -> None:
        if not hasattr(self, "center_"):
            raise SitebenchError("the control chart is not fitted: call fit(baseline) first")

    def chart(self, values: Any, times: Any = None) -> ControlChartResult:
        """Judge ``values`` (in time order) against the fitted baseline; ``times`` label the points."""
        self._check_fitted()
        rules = self._check_options()
        x = _finite_values(values, "the monitored values")
        n = x.size
        index = _times(times, n)
        observed = np.isfinite(x)
        xv = x[observed]
        center, sigma, lam = self.center_, self.sigma_, float(self.ewma_lambda)

        ewma_v = _ewma(xv, lam, center)
        width_v = self.ewma_limits(np.arange(1, xv.size + 1))
        z = (xv - center) / sigma
        fired = {rule: _rule(rule, z, ewma_v, width_v, center) for rule in rules}

        ewma = np.full(n, np.nan)
        ewma[observed] = ewma_v
        width = np.full(n, np.nan)
        width[observed] = width_v
        positions = np.flatnonzero(observed)
        flags: list[list[str]] = [[] if ok else [MISSING] for ok in observed]
        for rule in rules:  # rule order, so flags read alike everywhere
            for i in positions[fired[rule]]:
                flags[i].append(rule)
        return ControlChartResult(
            times=index, values=x, ewma=ewma, ewma_ucl=center + width, ewma_lcl=center - width,
            flags=flags, center=center, sigma=sigma, ucl=center + 3 * sigma, lcl=center - 3 * sigma,
            sigma_method=str(self.sigma), n_baseline=self.n_baseline_, ewma_lambda=lam,
            ewma_l=float(self.ewma_l), rules=rules, metric=self.metric)

    def fit_chart(self, baseline: Any, values: Any, times: Any = None) -> ControlChartResult:
        """``fit(baseline)`` then ``chart(values, times)``."""
        return self.fit(baseline).chart(values, times)


def _times(times: Any, n: int) -> pd.Index:
    if times is None:
        return pd.RangeIndex(n)
    index = pd.Index(list(times) if not isinstance(times, (pd.Index, pd.Series, np.ndarray)) else times)
    if len(index) != n:
        raise SitebenchError(f"got {len(index)} times for {n} values; give one time per value")
    if (index.dtype == object or pd.api.types.is_string_dtype(index.dtype)) and n \
            and all(isinstance(t, str) for t in index):
        try:  # ISO dates as text (a manifest's acquisition_date) are dates
            index = pd.DatetimeIndex(pd.to_datetime(index))
        except (ValueError, TypeError):
            pass
    try:
        steps = np.asarray(index[1:] >= index[:-1], dtype=bool) if n > 1 else np.ones(0, dtype=bool)
    except TypeError:
        return index  # labels that do not order (free text): taken in the order given
    if not steps.all():
        k = int(np.flatnonzero(~steps)[0]) + 1
        raise SitebenchError(f"times are not in order: point {k} ({index[k]}) comes before point {k - 1} "
                             f"({index[k - 1]}); sort the series by time first")
    return index


def _ewma(x: np.ndarray, lam: float, start: float) -> np.ndarray:
    """z_t = lam x_t + (1 - lam) z_{t-1}, z_0 = start."""
    out = np.empty_like(x)
    z = start
    for i, value in enumerate(x):
        z = lam * value + (1.0 - lam) * z
        out[i] = z
    return out


def _run_ending(mask: np.ndarray, k: int) -> np.ndarray:
    """True where ``mask`` holds at this point and the ``k - 1`` before it."""
    counts = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    out = np.zeros(mask.size, dtype=bool)
    if mask.size >= k:
        out[k - 1:] = (counts[k:] - counts[:-k]) == k
    return out


def _rule(rule: str, z: np.ndarray, ewma: np.ndarray, width: np.ndarray, center: float) -> np.ndarray:
    if rule == "1_3s":
        return np.abs(z) > 3
    if rule == "2_2s":
        return _run_ending(z > 2, 2) | _run_ending(z < -2, 2)
    if rule == "R_4s":
        out = np.zeros(z.size, dtype=bool)
        out[1:] = np.abs(np.diff(z)) > 4
        return out
    if rule == "4_1s":
        return _run_ending(z > 1, 4) | _run_ending(z < -1, 4)
    if rule == "10_x":
        return _run_ending(z > 0, 10) | _run_ending(z < 0, 10)
    if rule == "ewma":
        return np.abs(ewma - center) > width
    raise AssertionError(rule)  # pragma: no cover - options are checked first


def _json_time(value: Any) -> Any:
    if isinstance(value, (pd.Timestamp, _dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, np.datetime64):
        return pd.Timestamp(value).isoformat()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _label_time(value: Any) -> str:
    """A time as a summary prints it: dates without a midnight clock."""
    if isinstance(value, pd.Timestamp) and value == value.normalize():
        return value.date().isoformat()
    return str(_json_time(value))


def _number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass
class ControlChartResult:
    """One monitored series judged against its baseline: per-point values, limits and rule flags."""

    times: pd.Index
    values: np.ndarray
    ewma: np.ndarray
    ewma_ucl: np.ndarray
    ewma_lcl: np.ndarray
    flags: list[list[str]]
    center: float
    sigma: float
    ucl: float
    lcl: float
    sigma_method: str
    n_baseline: int
    ewma_lambda: float
    ewma_l: float
    rules: tuple[str, ...]
    metric: str | None = None
    out_of_control: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.out_of_control = np.array([any(f != MISSING for f in flags) for flags in self.flags], dtype=bool)

    @property
    def first_signal_index(self) -> int | None:
        """Position of the first out-of-control point, or None."""
        hits = np.flatnonzero(self.out_of_control)
        return int(hits[0]) if hits.size else None

    @property
    def first_signal(self) -> Any:
        """Time (the position when no times were given) of the first out-of-control point, or None."""
        i = self.first_signal_index
        return None if i is None else self.times[i]

    def rule_counts(self) -> dict[str, int]:
        """How many points each selected rule flagged."""
        return {rule: sum(rule in f for f in self.flags) for rule in self.rules}

    def to_frame(self) -> pd.DataFrame:
        """One row per point: time, value, ewma, center, ucl, lcl, ewma_ucl, ewma_lcl, z, flags, out_of_control."""
        n = len(self.values)
        return pd.DataFrame({
            "time": list(self.times), "value": self.values, "ewma": self.ewma,
            "center": np.full(n, self.center), "ucl": np.full(n, self.ucl), "lcl": np.full(n, self.lcl),
            "ewma_ucl": self.ewma_ucl, "ewma_lcl": self.ewma_lcl, "z": (self.values - self.center) / self.sigma,
            "flags": [list(f) for f in self.flags], "out_of_control": self.out_of_control.copy()})

    def to_dict(self) -> dict[str, Any]:
        """The chart as JSON-able data: settings, counts and every point."""
        points = [{"time": _json_time(t), "value": _number(v), "ewma": _number(e), "ewma_ucl": _number(u),
                   "ewma_lcl": _number(lo), "flags": list(f), "out_of_control": bool(o)}
                  for t, v, e, u, lo, f, o in zip(self.times, self.values, self.ewma, self.ewma_ucl,
                                                  self.ewma_lcl, self.flags, self.out_of_control)]
        return {"metric": self.metric, "center": self.center, "sigma": self.sigma,
                "sigma_method": self.sigma_method, "n_baseline": self.n_baseline, "ucl": self.ucl,
                "lcl": self.lcl, "ewma_lambda": self.ewma_lambda, "ewma_l": self.ewma_l,
                "rules": list(self.rules), "n_points": len(self.values),
                "n_missing": int(sum(MISSING in f for f in self.flags)),
                "n_out_of_control": int(self.out_of_control.sum()), "rule_counts": self.rule_counts(),
                "first_signal": _json_time(self.first_signal), "first_signal_index": self.first_signal_index,
                "points": points}

    def summary(self) -> str:
        """A few plain-English lines: baseline, limits, and where the series went out of control."""
        name = self.metric or "the series"
        n, missing = len(self.values), int(sum(MISSING in f for f in self.flags))
        lines = [
            f"Control chart of {name}: {n} point{'s' if n != 1 else ''}"
            + (f" ({missing} missing, skipped)" if missing else "")
            + f", baseline of {self.n_baseline} values: center {self.center:.4g}, sigma {self.sigma:.4g} "
              f"({_SIGMA_METHODS.get(self.sigma_method, self.sigma_method)}).",
            (f"Shewhart limits {self.lcl:.4g} to {self.ucl:.4g} (center +/- 3 sigma); EWMA lambda "
             f"{self.ewma_lambda:g}, L {self.ewma_l:g}; rules: {', '.join(self.rules) or 'none'}.")]
        if self.n_baseline < SHORT_BASELINE:
            lines.append(f"The baseline is short (under {SHORT_BASELINE} values): the limits are uncertain and "
                         "false alarms come more often than the nominal rates.")
        i = self.first_signal_index
        if i is None:
            lines.append("No point is out of control.")
        else:
            counts = ", ".join(f"{rule} at {k} point{'s' if k != 1 else ''}"
                               for rule, k in self.rule_counts().items() if k)
            where = f"point {i}"
            if not isinstance(self.times, pd.RangeIndex):
                where = f"{_label_time(self.times[i])} ({where})"
            lines.append(f"Out of control at {int(self.out_of_control.sum())} of {n} points; first signal at "
                         f"{where}: {', '.join(f for f in self.flags[i] if f != MISSING)}.")
            lines.append(f"Signals by rule: {counts}.")
        return "\n".join(lines)


def _plot_x(times: pd.Index) -> np.ndarray:
    """Times matplotlib can place: numbers and dates as they are, anything else by position."""
    if isinstance(times, pd.DatetimeIndex):
        return np.asarray(times.tz_localize(None) if times.tz is not None else times, dtype="datetime64[ns]")
    if pd.api.types.is_numeric_dtype(times.dtype):
        return np.asarray(times, dtype=float)
    return np.arange(len(times), dtype=float)


def _marker_x(times: pd.Index, when: Any) -> Any:
    if isinstance(times, pd.DatetimeIndex):
        stamp = pd.Timestamp(when)
        return np.datetime64(stamp.tz_localize(None) if stamp.tz is not None else stamp, "ns")
    if pd.api.types.is_numeric_dtype(times.dtype):
        return float(when)
    labels = list(times)
    if when not in labels:
        raise SitebenchError(f"marker time {when!r} is not one of the chart's times")
    return float(labels.index(when))


def plot_control_chart(result: ControlChartResult, ax: Any = None, title: str | None = None,
                       markers: Sequence[tuple[Any, str]] | None = None) -> Any:
    """Draw values, center and 3-sigma limits, the EWMA with its limits, flagged points in red and
    vertical ``markers`` ((time, label): software upgrades, scanner changes); returns the Figure.

    nilearn style: give ``ax`` to draw into a figure of your own. Without it a new Figure is made on
    an Agg canvas (no pyplot, no display); the caller saves and closes it.
    """
    if ax is None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8.0, 3.5), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
    else:
        try:
            fig = ax.get_figure(root=True)
        except TypeError:  # matplotlib < 3.10
            fig = ax.get_figure()
    xs = _plot_x(result.times)
    ok = np.isfinite(result.values)
    ax.plot(xs[ok], result.values[ok], "-o", color="#1b6ca8", ms=3.5, lw=1.0, label=result.metric or "value")
    ax.axhline(result.center, color="black", lw=1.0, label="center")
    ax.axhline(result.ucl, color="#555555", ls="--", lw=1.0, label="center ± 3σ")
    ax.axhline(result.lcl, color="#555555", ls="--", lw=1.0)
    ax.plot(xs[ok], result.ewma[ok], color="#edae49", lw=1.5, label=f"EWMA (λ={result.ewma_lambda:g})")
    ax.plot(xs[ok], result.ewma_ucl[ok], color="#edae49", ls=":", lw=1.0, label=f"EWMA limits (L={result.ewma_l:g})")
    ax.plot(xs[ok], result.ewma_lcl[ok], color="#edae49", ls=":", lw=1.0)
    bad = result.out_of_control
    if bad.any():
        ax.scatter(xs[bad], result.values[bad], color="#d1495b", s=36, zorder=5, label="out of control")
    for when, label in markers or ():
        where = _marker_x(result.times, when)
        ax.axvline(where, color="#6c4f70", ls="-.", lw=1.0)
        ax.annotate(str(label), xy=(where, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3),
                    textcoords="offset points", rotation=90, va="top", ha="left", fontsize=8, color="#6c4f70")
    ax.set_title(title if title is not None else f"Control chart: {result.metric or 'value'}")
    ax.set_xlabel("time")
    ax.set_ylabel(result.metric or "value")
    ax.legend(loc="best", fontsize=7, frameon=False)
    if isinstance(result.times, pd.DatetimeIndex):
        ax.tick_params(axis="x", labelrotation=30)
    return fig
