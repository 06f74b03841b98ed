"""Our own linear mixed model for the scanner-effect questions of a multi-site trial.

``y = X beta + Z b + e`` with random intercepts only: one per level of ``groups``
(site), of each ``vc`` factor nested in ``groups`` (scanner within site) and of each
``crossed`` factor (a traveling subject scanned at several sites). ``b ~ N(0, diag(s_k^2))``
and ``e ~ N(0, s^2 I)``.

Estimation is REML or ML with the fixed effects and the residual variance profiled
out, as lme4 does; the criterion is minimized over the log variance ratios
``log(s_k^2 / s^2)`` with scipy (L-BFGS-B, then Nelder-Mead, then Powell as
fallbacks). The reported log-likelihood is lme4's ``logLik`` (for REML: minus half the
REML criterion, without the constant ``log|X'X|`` term).

Two engines evaluate the criterion, both from sufficient statistics computed once:

* ``nested``: the random factors form a chain (site, or site > scanner, ...). Every
  evaluation is a pass up the tree over per-node weights and weighted means, so it
  costs ``O(#nodes * p^2)`` however many rows the table has. It is written in centred
  form (within-node scatter plus weighted between-node scatter), so it loses no
  precision to cancellation.
* ``sparse``: any other design (crossed factors). ``V = I + Z Lambda Lambda' Z'`` is
  handled with Woodbury through ``M = Lambda' Z'Z Lambda + I``; the largest factor's
  block of ``M`` is diagonal and is eliminated, the Schur complement of the others is
  factored densely (small) or with scipy.sparse's LU (large).

Fixed-effect tests and CIs use t with Satterthwaite degrees of freedom by default, computed
as lmerTest does (Kuznetsova, Brockhoff & Christensen 2017, J Stat Softw 82(13)):
``df = 2 (L C L')^2 / (g' A g)`` with ``C = cov(beta)`` as a function of the variance
parameters, ``g`` its gradient and ``A = 2 H^-1`` from the Hessian of the (REML) deviance;
components estimated at zero are left out, as lmerTest's boundary handling does.
``ddf="wald"`` gives Wald z (infinite df). Convergence is judged like lme4's
``checkConv``: the gradient scaled by the Cholesky factor of the Hessian (tolerance 2e-3).
Variance components get profile-likelihood CIs on the SD scale, like lme4's
``confint(method = "profile")``.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import linalg, optimize, sparse, stats
from scipy.sparse import linalg as splinalg

from sitebench.errors import SitebenchError
from sitebench.provenance import jsonable
from sitebench.stratification.validation import check_alpha

__all__ = ["ENGINE_ID", "DDF_METHODS", "LmmResult", "LrtResult", "fit_lmm", "lrt"]

#: The engine and the version of its numbers, recorded in analysis plans; bump whenever results change.
ENGINE_ID = "sitebench.lmm/2"
#: Denominator degrees of freedom for fixed-effect tests: lmerTest's Satterthwaite, or Wald z (df = inf).
DDF_METHODS: tuple[str, ...] = ("satterthwaite", "wald")
DEFAULT_OPTIMIZERS: tuple[str, ...] = ("L-BFGS-B", "Nelder-Mead", "Powell")
FIXED_COLUMNS: tuple[str, ...] = ("term", "estimate", "se", "df", "statistic", "ci_low", "ci_high", "p")
RESIDUAL = "residual"
#: Bounds of the optimized log variance ratios log(s_k^2 / s^2).
LOG_RATIO_BOUNDS: tuple[float, float] = (-30.0, 20.0)
#: lme4's checkConv tolerance (check.conv.grad): max over parameters of min(|scaled gradient|, |gradient|).
GRADIENT_TOL = 2e-3
#: lme4's check.conv.hess tolerance: Hessian eigenvalues below -tol, or a max/min ratio above 1/tol.
HESSIAN_TOL = 1e-6
#: lme4's isSingular tolerance on theta (random-effect SD relative to the residual SD).
SINGULAR_TOL = 1e-4
#: Step (theta scale) of lme4's finite-difference gradient and Hessian for checkConv (deriv12).
CHECK_STEP = 1e-4
#: Step (log variance scale) of the Richardson-extrapolated derivatives behind Satterthwaite's df: large
#: enough that rounding in the criterion (sparse engine) stays below 1e-5 of the df, error O(h^4).
SATTERTHWAITE_STEP = 1e-2
#: Components whose variance ratio ends below this are refitted at exactly zero (boundary).
ZERO_TRY_RATIO = 1e-4
#: A zero-variance refit is kept when its criterion is at most this much worse (numerical ties).
ZERO_ACCEPT_TOL = 1e-9
#: A component below this share of the total variance is flagged as near the boundary.
BOUNDARY_SHARE = 1e-4
#: Schur complements up to this size are factored densely in the sparse engine.
DENSE_MAX = 1500

_OPTIMIZER_ALIASES = {
    "l-bfgs-b": "L-BFGS-B", "lbfgsb": "L-BFGS-B", "lbfgs": "L-BFGS-B",
    "nelder-mead": "Nelder-Mead", "neldermead": "Nelder-Mead", "nm": "Nelder-Mead",
    "powell": "Powell",
}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_QUOTED = re.compile(r"""Q\(\s*(['"])(.*?)\1\s*\)""")
_LOG_2PI = math.log(2.0 * math.pi)


# =========================================================================== results


@dataclass
class LmmResult:
    """A fitted random-intercept linear mixed model (statsmodels-like, numbers like lme4's)."""

    formula: str
    groups: str
    vc: tuple[str, ...]
    crossed: tuple[str, ...]
    fixed_effects: pd.DataFrame
    cov_fixed: pd.DataFrame
    variance_components: dict[str, float]
    variance_share: dict[str, float]
    loglik: float
    reml: bool
    converged: bool
    optimizer: str | None
    attempts: list[dict[str, Any]]
    diagnostics: dict[str, Any]
    random_effects: dict[str, pd.Series]
    n_obs: int
    n_levels: dict[str, int]
    engine: str
    alpha: float
    ddf: str = "satterthwaite"
    notes: list[str] = field(default_factory=list)
    _criterion: Any = field(default=None, repr=False, compare=False)
    _psi: Any = field(default=None, repr=False, compare=False)
    _profile_cache: dict = field(default_factory=dict, repr=False, compare=False)
    _satterthwaite: Any = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ views

    @property
    def fe_params(self) -> pd.Series:
        """Fixed-effect estimates by term (statsmodels' name)."""
        return pd.Series(self.fixed_effects["estimate"].to_numpy(), index=self.fixed_effects["term"])

    @property
    def bse(self) -> pd.Series:
        """Fixed-effect standard errors by term."""
        return pd.Series(self.fixed_effects["se"].to_numpy(), index=self.fixed_effects["term"])

    @property
    def sd_components(self) -> dict[str, float]:
        """Standard deviations of the random effects and of the residual."""
        return {k: math.sqrt(v) for k, v in self.variance_components.items()}

    @property
    def confidence(self) -> float:
        """Coverage of the intervals, ``1 - alpha`` (the old name)."""
        return 1.0 - self.alpha

    @property
    def df(self) -> pd.Series:
        """Denominator degrees of freedom by term (inf for Wald z)."""
        return pd.Series(self.fixed_effects["df"].to_numpy(), index=self.fixed_effects["term"])

    @property
    def boundary(self) -> bool:
        """Whether any random-effect variance is estimated as exactly 0."""
        return any(self.diagnostics["boundary"].values())

    def to_frame(self) -> pd.DataFrame:
        """Tidy fixed effects: term, estimate, se, df, statistic (t, or z when df is inf), ci_low, ci_high, p."""
        return self.fixed_effects.copy()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable record (plain types, NaN as None)."""
        fixed = {
            str(row["term"]): {key: jsonable(row[key])
                               for key in ("estimate", "se", "df", "statistic", "ci_low", "ci_high", "p")}
            for _, row in self.fixed_effects.iterrows()
        }
        return {
            "formula": self.formula,
            "groups": self.groups,
            "vc": list(self.vc),
            "crossed": list(self.crossed),
            "fixed_effects": fixed,
            "fixed_effects_z": {str(t): jsonable(z) for t, z in zip(self.fixed_effects["term"],
                                                                    self.fixed_effects["statistic"])},
            "ddf": self.ddf,
            "variance_components": {k: jsonable(v) for k, v in self.variance_components.items()},
            "sd_components": {k: jsonable(v) for k, v in self.sd_components.items()},
            "variance_share": {k: jsonable(v) for k, v in self.variance_share.items()},
            "loglik": jsonable(self.loglik),
            "reml": bool(self.reml),
            "converged": bool(self.converged),
            "optimizer": self.optimizer,
            "attempts": jsonable(self.attempts),
            "diagnostics": jsonable(self.diagnostics),
            "random_effects": {name: {str(k): jsonable(v) for k, v in series.items()}
                               for name, series in self.random_effects.items()},
            "n_obs": int(self.n_obs),
            "n_levels": {k: int(v) for k, v in self.n_levels.items()},
            "engine": self.engine,
            "engine_id": ENGINE_ID,
            "alpha": float(self.alpha),
            "confidence": float(self.confidence),
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """Readable report: fit status, random effects (variance and SD), fixed effects, notes."""
        pct = f"{(1.0 - self.alpha) * 100:g}%"
        random_terms = [f"(1 | {self.groups})"] + [f"(1 | {self.groups}:{v})" for v in self.vc] \
            + [f"(1 | {c})" for c in self.crossed]
        lines = [
            f"Linear mixed model fit by {'REML' if self.reml else 'maximum likelihood'} "
            f"(sitebench, {self.engine} engine)",
            f"Formula: {self.formula} + {' + '.join(random_terms)}",
            f"{self.n_obs} observations; "
            + ", ".join(f"{k}: {v} levels" for k, v in self.n_levels.items()),
            f"{'REML criterion' if self.reml else 'deviance'} {-2 * self.loglik:.4f}, "
            f"log-likelihood {self.loglik:.4f}; optimizer {self.optimizer}, "
            f"converged {self.converged} (lme4 scaled gradient "
            f"{self.diagnostics['max_scaled_gradient']:.2g}, tol {GRADIENT_TOL:g})",
            "",
            "Random effects:",
            f"  {'component':<22} {'variance':>12} {'std.dev.':>12} {'share':>8}",
        ]
        for name, value in self.variance_components.items():
            flag = "  (boundary)" if self.diagnostics["boundary"].get(name) else ""
            lines.append(f"  {name:<22} {value:>12.5g} {math.sqrt(value):>12.5g} "
                         f"{self.variance_share[name]:>8.1%}{flag}")
        how = ("t tests with Satterthwaite degrees of freedom (lmerTest's method)" if self.ddf == "satterthwaite"
               else "Wald z (infinite degrees of freedom)")
        stat = "t" if self.ddf == "satterthwaite" else "z"
        lines += ["", f"Fixed effects ({pct} CIs and p-values from {how}):",
                  f"  {'term':<28} {'estimate':>11} {'se':>10} {'df':>8} {pct + ' CI':>25} {stat:>8} {'p':>9}"]
        for _, row in self.fixed_effects.iterrows():
            ci = f"[{row['ci_low']:.5g}, {row['ci_high']:.5g}]"
            df = f"{row['df']:.2f}" if math.isfinite(row["df"]) else "inf"
            lines.append(f"  {str(row['term']):<28} {row['estimate']:>11.5g} {row['se']:>10.4g} {df:>8} "
                         f"{ci:>25} {row['statistic']:>8.3f} {row['p']:>9.3g}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def contrast(self, weights: Sequence[float] | Mapping[str, float], *, alpha: float | None = None,
                 ddf: str | None = None) -> dict[str, Any]:
        """Estimate, SE, df, t (or z), CI and p of ``L beta`` for one contrast vector ``L``.

        ``weights`` is one number per fixed effect, or a mapping term -> weight (others 0).
        Satterthwaite's df for a contrast is ``2 (L C L')^2 / (g' A g)`` with
        ``g_i = L (dC/d theta_i) L'`` (lmerTest's ``contest1D``).
        """
        alpha = self.alpha if alpha is None else check_alpha(alpha)
        ddf = self.ddf if ddf is None else _ddf_name(ddf)
        terms = list(self.fixed_effects["term"])
        if isinstance(weights, Mapping):
            unknown = [t for t in weights if t not in terms]
            if unknown:
                raise SitebenchError(f"no fixed effect {unknown[0]!r} (have: {', '.join(terms)})")
            vector = np.array([float(weights.get(t, 0.0)) for t in terms])
        else:
            vector = np.asarray(weights, dtype=float).ravel()
            if vector.size != len(terms):
                raise SitebenchError(f"a contrast needs {len(terms)} weights (one per fixed effect), "
                                     f"got {vector.size}")
        if not np.any(vector):
            raise SitebenchError("a contrast needs at least one non-zero weight")
        cov = self.cov_fixed.to_numpy()
        estimate = float(vector @ self.fe_params.to_numpy())
        var = float(vector @ cov @ vector)
        note = None
        df = math.inf
        if ddf == "satterthwaite":
            df = _satterthwaite_df(self._satterthwaite, vector) if self._satterthwaite is not None else math.nan
            if not math.isfinite(df):
                note = f"Satterthwaite df not available ({self.diagnostics.get('satterthwaite_problem')}); Wald z used"
                df = math.inf
        row = _test_row(estimate, math.sqrt(var) if var > 0 else math.nan, df, alpha)
        return {"estimate": estimate, **row, "ddf": ddf, "alpha": alpha, "note": note}

    def variance_sum(self, components: Sequence[str] | None = None) -> dict[str, float]:
        """A sum of variance components with Satterthwaite's df, ``2 V^2 / Var(V)``.

        ``Var(V)`` is the delta-method variance from ``A = 2 H^-1`` (the inverse Hessian of
        the REML/ML deviance in the log variances, as for the fixed-effect df); components
        at zero contribute nothing. Used for reproducibility variances (QIBA, Raunig et al.
        2015) whose chi-square CI needs df. ``components`` default: all, residual included.
        """
        names = list(self.variance_components) if components is None else list(components)
        unknown = [c for c in names if c not in self.variance_components]
        if unknown:
            raise SitebenchError(f"no variance component {unknown[0]!r} (have: {', '.join(self.variance_components)})")
        total = float(sum(self.variance_components[c] for c in names))
        parts = self._satterthwaite
        if parts is None or total <= 0:
            return {"variance": total, "df": math.nan}
        grad = np.array([g if c in names else 0.0 for c, g in zip(parts.parameters, parts.variance_gradient)])
        var = float(grad @ parts.acov @ grad)
        return {"variance": total, "df": 2.0 * total * total / var if var > 0 else math.nan}

    # ------------------------------------------------------------------ variance CIs

    def profile_ci(self, alpha: float = 0.05, components: Sequence[str] | None = None,
                   criterion: str = "ml", *, level: float | None = None) -> pd.DataFrame:
        """Profile-likelihood CIs of the SDs of the variance components (lme4's method="profile").

        For each component the deviance is minimized over all other parameters with
        that SD held fixed; the interval is where it stays within ``chi2_1(level)`` of
        its minimum. A lower limit of 0 means the profile never rises that far towards
        zero. ``criterion="ml"`` (default) profiles the ML deviance even for a REML fit,
        as lme4 does (lme4 issue #838); ``criterion="reml"`` profiles the REML criterion
        of a REML fit. ``level`` (the old name, = 1 - alpha) is still accepted.
        """
        if level is not None:
            if not 0 < level < 1:
                raise SitebenchError(f"level must be between 0 and 1, got {level!r}")
            alpha = 1.0 - float(level)
        level = 1.0 - check_alpha(alpha)
        if criterion not in ("ml", "reml"):
            raise SitebenchError(f"criterion must be 'ml' or 'reml', got {criterion!r}")
        if criterion == "reml" and not self.reml:
            raise SitebenchError("a REML profile needs a REML fit")
        names = list(self.variance_components)
        wanted = names if components is None else list(components)
        unknown = [c for c in wanted if c not in names]
        if unknown:
            raise SitebenchError(f"no variance component {unknown[0]!r} (have: {', '.join(names)})")
        rows = []
        for name in wanted:
            key = (name, float(level), criterion)
            if key not in self._profile_cache:
                if criterion not in self._profile_cache:
                    self._profile_cache[criterion] = _profile_base(self, criterion == "reml")
                self._profile_cache[key] = _profile_interval(self._profile_cache[criterion], name, level)
            low, high = self._profile_cache[key]
            sd = math.sqrt(self.variance_components[name])
            rows.append({"component": name, "sd": sd, "sd_low": low, "sd_high": high,
                         "variance": sd * sd, "var_low": low * low, "var_high": high * high})
        return pd.DataFrame(rows, columns=["component", "sd", "sd_low", "sd_high",
                                           "variance", "var_low", "var_high"])


@dataclass
class LrtResult:
    """Likelihood-ratio test of dropping fixed effects (both models refitted by ML)."""

    chi2: float
    df: int
    p: float
    loglik_full: float
    loglik_reduced: float
    dropped_terms: list[str]
    full: LmmResult
    reduced: LmmResult

    def to_dict(self) -> dict[str, Any]:
        return {"chi2": jsonable(self.chi2), "df": int(self.df), "p": jsonable(self.p),
                "loglik_full": jsonable(self.loglik_full), "loglik_reduced": jsonable(self.loglik_reduced),
                "dropped_terms": list(self.dropped_terms),
                "full_formula": self.full.formula, "reduced_formula": self.reduced.formula}

    def summary(self) -> str:
        return (f"LRT (ML): {self.full.formula} vs {self.reduced.formula}\n"
                f"dropped: {', '.join(self.dropped_terms)}\n"
                f"loglik {self.loglik_full:.4f} vs {self.loglik_reduced:.4f}: "
                f"chi2 = {self.chi2:.4f}, df = {self.df}, p = {self.p:.4g}")


# =========================================================================== public API


def fit_lmm(table: pd.DataFrame, formula: str, groups: str, vc: Sequence[str] | Mapping[str, str] = (),
            crossed: Sequence[str] | Mapping[str, str] = (), reml: bool = True,
            optimizers: Sequence[str] = DEFAULT_OPTIMIZERS, *, alpha: float = 0.05,
            ddf: str = "satterthwaite", engine: str = "auto",
            confidence: float | None = None) -> LmmResult:
    """Fit ``formula`` with random intercepts for ``groups``, nested ``vc`` and ``crossed`` factors.

    ``formula`` is a patsy fixed-effects formula (``"y ~ age + C(vendor)"``). ``vc``
    names columns whose levels are nested in ``groups`` (scanner within site; as in
    statsmodels, a label is taken within its group); ``crossed`` names columns whose
    levels are shared across groups (a subject scanned at several sites). Either may
    be a mapping ``component name -> column``. Optimizers are tried in order until one
    converges; ``engine`` is ``"auto"``, ``"nested"`` or ``"sparse"``. CIs are ``1 - alpha``;
    ``ddf`` is ``"satterthwaite"`` (t tests, lmerTest's df) or ``"wald"`` (z tests).
    ``confidence`` (the old name, = 1 - alpha) is still accepted.

    A random factor whose levels are entirely explained by fixed effects (``y ~ C(vendor)``
    with ``groups="vendor"``) has no estimable variance: that is an error, not a fit.
    """
    if confidence is not None:
        if not 0 < confidence < 1:
            raise SitebenchError(f"confidence must be between 0 and 1, got {confidence!r}")
        alpha = 1.0 - float(confidence)
    alpha = check_alpha(alpha)
    ddf = _ddf_name(ddf)
    methods = _optimizer_names(optimizers)
    with _single_thread():
        return _fit_lmm(table, formula, groups, vc, crossed, bool(reml), methods, alpha, ddf, engine)


def _ddf_name(ddf: str) -> str:
    key = str(ddf).lower()
    if key not in DDF_METHODS:
        raise SitebenchError(f"ddf must be one of {', '.join(DDF_METHODS)}, got {ddf!r}")
    return key


_THREADPOOLS: list[Any] = []


def _single_thread() -> Any:
    """One BLAS thread for the call: the matrices are tiny and threads only add latency."""
    import contextlib

    if not _THREADPOOLS:
        try:
            from threadpoolctl import ThreadpoolController

            _THREADPOOLS.append(ThreadpoolController())  # finding the libraries once is the slow part
        except Exception:  # pragma: no cover - threadpoolctl comes with scikit-learn
            _THREADPOOLS.append(None)
    controller = _THREADPOOLS[0]
    if controller is None:  # pragma: no cover
        return contextlib.nullcontext()
    return controller.limit(limits=1, user_api="blas")


def _fit_lmm(table: pd.DataFrame, formula: str, groups: str, vc: Any, crossed: Any, reml: bool,
             methods: list[str], alpha: float, ddf: str, engine: str) -> LmmResult:
    data = _prepare(table, formula, groups, vc, crossed)
    if engine not in ("auto", "nested", "sparse"):
        raise SitebenchError(f"engine must be 'auto', 'nested' or 'sparse', got {engine!r}")
    chain = _nested_chain(data.factors)
    if engine == "nested" and chain is None:
        raise SitebenchError("the random factors are not nested in one another: use engine='sparse'")
    if engine == "sparse" or chain is None:
        eng: _Engine = _SparseEngine(data.zaug, data.factors)
    else:
        eng = _NestedEngine(data.zaug, data.factors, chain)
    criterion = _Criterion(eng, data.n, data.p, bool(reml))
    return _fit(criterion, data, methods, alpha, ddf)


def lrt(table: pd.DataFrame, full_formula: str, reduced_formula: str, groups: str,
        vc: Sequence[str] | Mapping[str, str] = (), crossed: Sequence[str] | Mapping[str, str] = (),
        optimizers: Sequence[str] = DEFAULT_OPTIMIZERS, *, engine: str = "auto") -> LrtResult:
    """ML likelihood-ratio test for dropping a block of fixed effects (both models refitted by ML)."""
    full = fit_lmm(table, full_formula, groups, vc, crossed, reml=False, optimizers=optimizers, engine=engine,
                   ddf="wald")
    reduced = fit_lmm(table, reduced_formula, groups, vc, crossed, reml=False, optimizers=optimizers,
                      engine=engine, ddf="wald")
    full_terms, reduced_terms = list(full.fixed_effects["term"]), list(reduced.fixed_effects["term"])
    extra = [t for t in reduced_terms if t not in full_terms]
    if extra:
        raise SitebenchError(f"the reduced model is not nested in the full one: term(s) "
                             f"{', '.join(extra)} are not in '{full_formula}'")
    dropped = [t for t in full_terms if t not in reduced_terms]
    if not dropped:
        raise SitebenchError("the reduced model drops no fixed effect of the full model")
    if full.n_obs != reduced.n_obs:
        raise SitebenchError("the two models use different rows")
    chi2 = max(0.0, 2.0 * (full.loglik - reduced.loglik))
    df = len(dropped)
    return LrtResult(chi2=chi2, df=df, p=float(stats.chi2.sf(chi2, df)), loglik_full=full.loglik,
                     loglik_reduced=reduced.loglik, dropped_terms=dropped, full=full, reduced=reduced)


# =========================================================================== data


@dataclass
class _Factor:
    name: str
    column: str
    codes: np.ndarray
    labels: list[str]

    @property
    def size(self) -> int:
        return len(self.labels)


@dataclass
class _Data:
    formula: str
    y_name: str
    names: list[str]
    zaug: np.ndarray  # [X, y]
    factors: list[_Factor]  # groups, vc..., crossed...
    vc_names: tuple[str, ...]
    crossed_names: tuple[str, ...]
    n: int
    p: int
    notes: list[str]


def _component_map(spec: Sequence[str] | Mapping[str, str] | str | None, what: str) -> list[tuple[str, str]]:
    if spec is None:
        return []
    if isinstance(spec, str):
        return [(spec, spec)]
    if isinstance(spec, Mapping):
        return [(str(k), str(v)) for k, v in spec.items()]
    try:
        return [(str(c), str(c)) for c in spec]
    except TypeError:
        raise SitebenchError(f"{what} must be column names, got {spec!r}") from None


def _patsy_C(data: Any, contrast: Any = None, levels: Any = None) -> Any:
    """patsy's ``C`` with a fast path: a plain ``C(x)`` becomes a pandas Categorical.

    patsy converts a boxed categorical element by element (seconds for 1e5 rows); a
    pandas Categorical with the same (sorted) levels takes its vectorised path.
    """
    import patsy.builtins

    if contrast is None and levels is None:
        if isinstance(data, pd.Categorical):
            return data
        try:
            return pd.Categorical(data)
        except (TypeError, ValueError):
            pass
    return patsy.builtins.C(data, contrast, levels)


def _prepare(table: Any, formula: str, groups: str, vc: Any, crossed: Any) -> _Data:
    import patsy

    if not isinstance(table, pd.DataFrame):
        raise SitebenchError(f"expected a pandas DataFrame, got {type(table).__name__}")
    if not isinstance(formula, str) or "~" not in formula:
        raise SitebenchError(f"formula must look like 'y ~ x1 + x2', got {formula!r}")
    if "|" in formula:
        raise SitebenchError("give random effects with groups=, vc= and crossed=, not '|' terms in the formula")
    if not isinstance(groups, str):
        raise SitebenchError(f"groups must be a column name, got {groups!r}")
    vc_map = _component_map(vc, "vc")
    crossed_map = _component_map(crossed, "crossed")
    component_names = [groups] + [n for n, _ in vc_map] + [n for n, _ in crossed_map]
    if len(set(component_names)) != len(component_names) or RESIDUAL in component_names:
        raise SitebenchError(f"random-effect names must be distinct and not '{RESIDUAL}': "
                             f"{', '.join(component_names)}")
    grouping_columns = [groups] + [c for _, c in vc_map] + [c for _, c in crossed_map]
    for column in grouping_columns:
        if column not in table.columns:
            raise SitebenchError(f"column '{column}' not in the table")

    try:
        desc = patsy.ModelDesc.from_formula(formula)
    except patsy.PatsyError as exc:
        raise SitebenchError(f"cannot parse formula '{formula}': {str(exc).splitlines()[0]}") from None
    if not desc.lhs_termlist:
        raise SitebenchError(f"formula '{formula}' has no response (left of '~')")
    codes = [f.code for term in desc.lhs_termlist + desc.rhs_termlist for f in term.factors]
    mentioned: list[str] = []
    for code in codes:
        mentioned += [m.group(2) for m in _QUOTED.finditer(code)]
        mentioned += _IDENT.findall(_QUOTED.sub("", code))
    formula_columns = [c for c in dict.fromkeys(mentioned) if c in table.columns]

    used = list(dict.fromkeys(formula_columns + grouping_columns))
    for column in used:
        missing = int(table[column].isna().sum())
        if missing:
            raise SitebenchError(f"column '{column}' has {missing} missing value(s); drop or impute "
                                 f"them before fitting")

    # A dict of arrays (not a DataFrame): patsy is much faster on plain arrays and Categoricals.
    frame: dict[str, Any] = {}
    for column in formula_columns:
        values = table[column]
        if isinstance(values.dtype, pd.CategoricalDtype):
            frame[column] = pd.Categorical(values)
            continue
        if values.dtype == object or isinstance(values.dtype, pd.StringDtype):
            try:
                frame[column] = pd.Categorical(values.to_numpy(dtype=object))
                continue
            except TypeError:
                pass
        frame[column] = values.to_numpy()
    env = patsy.EvalEnvironment([{"C": _patsy_C, "np": np, "numpy": np, "log": np.log, "exp": np.exp,
                                  "sqrt": np.sqrt}])
    try:
        y_design, x_design = patsy.dmatrices(formula, frame, eval_env=env, NA_action="raise")
    except patsy.PatsyError as exc:
        text = str(exc)
        missing_name = re.search(r"name '([^']+)' is not defined", text)
        if missing_name:
            raise SitebenchError(f"column '{missing_name.group(1)}' not in the table") from None
        missing_key = re.search(r"KeyError: '([^']+)'", text)
        if missing_key:
            raise SitebenchError(f"column '{missing_key.group(1)}' not in the table") from None
        raise SitebenchError(f"cannot build the fixed effects of '{formula}': {text.splitlines()[0]}") from None
    if y_design.shape[1] != 1:
        raise SitebenchError(f"the response of '{formula}' must be one numeric column")
    y_name = y_design.design_info.column_names[0]
    y = np.asarray(y_design, dtype=float)[:, 0]
    x = np.asarray(x_design, dtype=float)
    names = list(x_design.design_info.column_names)
    n = len(y)
    if not np.isfinite(y).all():
        raise SitebenchError(f"response '{y_name}' has {int((~np.isfinite(y)).sum())} non-finite value(s)")
    if not np.isfinite(x).all():
        raise SitebenchError("the fixed-effects design has non-finite values")
    if n == 0 or np.ptp(y) == 0:
        raise SitebenchError(f"response '{y_name}' is constant ({y[0] if n else 'no rows'}): nothing to model")
    if x.shape[1] == 0:
        raise SitebenchError(f"formula '{formula}' has no fixed effects (add an intercept)")

    notes: list[str] = []
    keep = _full_rank_columns(x)
    if len(keep) < x.shape[1]:
        dropped = [names[j] for j in range(x.shape[1]) if j not in set(keep)]
        notes.append(f"fixed-effect design is rank deficient: dropped {', '.join(dropped)}")
        x = x[:, keep]
        names = [names[j] for j in keep]
    p = x.shape[1]
    if n <= p + 1:
        raise SitebenchError(f"too few observations ({n}) for {p} fixed effect(s)")

    factors: list[_Factor] = []
    group_codes, group_labels = pd.factorize(table[groups], sort=True)
    factors.append(_Factor(groups, groups, np.asarray(group_codes, dtype=np.intp),
                           [str(v) for v in group_labels]))
    for name, column in vc_map:
        inner, inner_labels = pd.factorize(table[column], sort=True)
        combo = group_codes.astype(np.int64) * len(inner_labels) + inner
        combo_codes, combo_uniques = pd.factorize(combo, sort=True)
        labels = [f"{group_labels[u // len(inner_labels)]}:{inner_labels[u % len(inner_labels)]}"
                  for u in combo_uniques]
        factors.append(_Factor(name, column, np.asarray(combo_codes, dtype=np.intp), labels))
    for name, column in crossed_map:
        c_codes, c_labels = pd.factorize(table[column], sort=True)
        factors.append(_Factor(name, column, np.asarray(c_codes, dtype=np.intp), [str(v) for v in c_labels]))

    for factor in factors:
        if factor.size < 2:
            raise SitebenchError(f"grouping column '{factor.column}' has a single level "
                                 f"({factor.labels[0]!r}); a random intercept needs at least 2 levels")
        if factor.size >= n:
            raise SitebenchError(f"'{factor.name}' has as many levels as observations ({n}): its variance "
                                 f"cannot be separated from the residual")
    for i, a in enumerate(factors):
        for b in factors[i + 1:]:
            if a.size == b.size and len(np.unique(a.codes.astype(np.int64) * b.size + b.codes)) == a.size:
                raise SitebenchError(f"'{b.name}' has one level per level of '{a.name}': their variances "
                                     f"cannot be separated")
    notes.extend(_identifiability(x, names, factors))
    return _Data(formula=formula, y_name=y_name, names=names, zaug=np.column_stack([x, y]),
                 factors=factors, vc_names=tuple(n for n, _ in vc_map),
                 crossed_names=tuple(n for n, _ in crossed_map), n=n, p=p, notes=notes)


def _rank(x: np.ndarray) -> int:
    """Numerical rank by the same pivoted-QR rule as :func:`_full_rank_columns`."""
    return len(_full_rank_columns(x)) if x.size and np.any(x) else 0


def _identifiability(x: np.ndarray, names: list[str], factors: list[_Factor]) -> list[str]:
    """Raise when a random factor's levels are explained by the fixed effects; note partial confounding.

    The between-level contrasts of factor k left to estimate its variance number
    ``d = rank([X, Z_k]) - rank(X) = q_k + rank(X - Z_k means) - rank(X)`` (the column
    space of ``[X, Z_k]`` is that of ``[X_within, Z_k]``). ``d = 0``: ``Z_k`` lies in the
    span of ``X``, the variance is not identifiable at all (lme4 would return an arbitrary
    value). ``d < q_k - 1``: fixed effects constant within the factor's levels (vendor per
    site) absorb some contrasts; the variance rests on the ``d`` that remain.
    """
    notes: list[str] = []
    p = x.shape[1]
    for factor in factors:
        counts = np.bincount(factor.codes, minlength=factor.size).astype(float)
        means = np.column_stack([np.bincount(factor.codes, weights=x[:, j], minlength=factor.size)
                                 for j in range(p)]) / counts[:, None]
        within = x - means[factor.codes]
        d = factor.size + _rank(within) - p
        scale = np.maximum(np.abs(x).max(axis=0), 1.0)
        between = [names[j] for j in range(p) if names[j] != "Intercept"
                   and np.abs(within[:, j]).max() <= 1e-10 * scale[j]]
        terms = ", ".join(between) if between else "the fixed effects"
        if d <= 0:
            raise SitebenchError(f"the '{factor.name}' variance cannot be estimated: {terms} "
                                 f"{'is' if len(between) == 1 else 'are'} constant within each level of "
                                 f"'{factor.column}' and {'explains' if len(between) == 1 else 'explain'} all differences between its levels; drop "
                                 f"{'it' if len(between) == 1 else 'them'} or the random effect")
        absorbed = factor.size - 1 - d
        if absorbed > 0:
            notes.append(f"'{factor.name}' variance rests on {d} between-level contrast(s): {absorbed} of the "
                         f"{factor.size - 1} are explained by {terms} (constant within each "
                         f"'{factor.column}')" + ("; it is barely identifiable" if d < 3 else ""))
    return notes


def _full_rank_columns(x: np.ndarray) -> list[int]:
    """Columns kept by a pivoted QR, in their original order (lme4 drops the others too)."""
    scale = np.sqrt((x * x).sum(axis=0))
    scale[scale == 0] = 1.0
    r, piv = linalg.qr(x / scale, mode="r", pivoting=True)
    diag = np.abs(np.diag(r))
    tol = max(x.shape) * np.finfo(float).eps * 1e3 * (diag[0] if diag.size else 0.0)
    rank = int((diag > tol).sum())
    return sorted(int(j) for j in piv[:rank])


def _optimizer_names(optimizers: Sequence[str] | str) -> list[str]:
    if isinstance(optimizers, str):
        optimizers = (optimizers,)
    names = []
    for name in optimizers:
        key = str(name).lower().replace("_", "-")
        if key not in _OPTIMIZER_ALIASES:
            raise SitebenchError(f"unknown optimizer {name!r} (use L-BFGS-B, Nelder-Mead or Powell)")
        names.append(_OPTIMIZER_ALIASES[key])
    if not names:
        raise SitebenchError("no optimizers given")
    return names


def _nested_chain(factors: list[_Factor]) -> list[int] | None:
    """Factor indices coarse -> fine when each factor is nested in the previous one, else None."""
    order = sorted(range(len(factors)), key=lambda i: factors[i].size)
    for coarse, fine in zip(order, order[1:]):
        parent = np.full(factors[fine].size, -1, dtype=np.intp)
        parent[factors[fine].codes] = factors[coarse].codes
        if not np.array_equal(parent[factors[fine].codes], factors[coarse].codes):
            return None
    return order


# =========================================================================== engines


class _Engine:
    """Computes ``[X y]' V^-1 [X y]`` and ``log|V|`` for variance ratios ``psi`` (V relative to s^2)."""

    kind = "?"
    names: list[str]

    def cross(self, psi: np.ndarray) -> tuple[np.ndarray, float]:
        raise NotImplementedError

    def blups(self, psi: np.ndarray, beta: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError


class _NestedEngine(_Engine):
    """Random factors forming a chain site > scanner > ...: one pass up the tree per evaluation."""

    kind = "nested"

    def __init__(self, zaug: np.ndarray, factors: list[_Factor], chain: list[int]) -> None:
        self.chain = chain  # factor index per level, coarse -> fine
        self.names = [f.name for f in factors]
        levels = [factors[i] for i in chain]
        leaf = levels[-1]
        counts = np.bincount(leaf.codes, minlength=leaf.size).astype(float)
        sums = np.column_stack([np.bincount(leaf.codes, weights=zaug[:, j], minlength=leaf.size)
                                for j in range(zaug.shape[1])])
        self.counts = counts
        self.means = sums / counts[:, None]
        centred = zaug - self.means[leaf.codes]
        self.within = centred.T @ centred
        self.parents: list[np.ndarray] = []  # parent index of level l+1 nodes in level l
        self.aggregate: list[sparse.csr_matrix] = []
        for coarse, fine in zip(levels, levels[1:]):
            parent = np.empty(fine.size, dtype=np.intp)
            parent[fine.codes] = coarse.codes
            self.parents.append(parent)
            self.aggregate.append(sparse.csr_matrix(
                (np.ones(fine.size), (parent, np.arange(fine.size))), shape=(coarse.size, fine.size)))

    def _levels(self, psi: np.ndarray) -> tuple[np.ndarray, float, list[tuple[np.ndarray, np.ndarray]]]:
        psi_levels = psi[self.chain]
        total, mean = self.counts, self.means
        cross = self.within.copy()
        logdet = 0.0
        kept: list[tuple[np.ndarray, np.ndarray]] = []
        for level in range(len(self.chain) - 1, -1, -1):
            ratio = psi_levels[level]
            logdet += float(np.log1p(ratio * total).sum())
            weight = total / (1.0 + ratio * total)
            kept.append((weight, mean))
            if level > 0:
                parent = self.parents[level - 1]
                agg = self.aggregate[level - 1]
                total_up = agg @ weight
                mean_up = (agg @ (weight[:, None] * mean)) / total_up[:, None]
                dev = mean - mean_up[parent]
                cross += (dev * weight[:, None]).T @ dev
                total, mean = total_up, mean_up
            else:
                cross += (mean * weight[:, None]).T @ mean
        kept.reverse()
        return cross, logdet, kept

    def cross(self, psi: np.ndarray) -> tuple[np.ndarray, float]:
        cross, logdet, _ = self._levels(psi)
        return cross, logdet

    def blups(self, psi: np.ndarray, beta: np.ndarray) -> list[np.ndarray]:
        _, _, kept = self._levels(psi)
        psi_levels = psi[self.chain]
        out: list[np.ndarray] = [np.empty(0)] * len(self.names)
        above = np.zeros(len(kept[0][0]))
        for level, (weight, mean) in enumerate(kept):
            resid = mean[:, -1] - mean[:, :-1] @ beta
            inherited = above if level == 0 else above[self.parents[level - 1]]
            b = psi_levels[level] * weight * (resid - inherited)
            out[self.chain[level]] = b
            above = inherited + b
        return out


class _SparseEngine(_Engine):
    """Any random-intercept design: Woodbury through ``M = L'Z'Z L + I`` with scipy.sparse."""

    kind = "sparse"

    def __init__(self, zaug: np.ndarray, factors: list[_Factor]) -> None:
        self.names = [f.name for f in factors]
        self.order = sorted(range(len(factors)), key=lambda i: -factors[i].size)
        first, rest = factors[self.order[0]], [factors[i] for i in self.order[1:]]
        self.sizes = [f.size for f in rest]
        offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.intp)
        self.offsets = offsets
        self.q0, self.qr = first.size, int(offsets[-1])
        self.gram = zaug.T @ zaug
        p1 = zaug.shape[1]

        def level_sums(f: _Factor) -> np.ndarray:
            return np.column_stack([np.bincount(f.codes, weights=zaug[:, j], minlength=f.size)
                                    for j in range(p1)])

        self.counts0 = np.bincount(first.codes, minlength=first.size).astype(float)
        self.sums0 = level_sums(first)
        if self.qr:
            self.sums_r = np.vstack([level_sums(f) for f in rest])
            cols = np.concatenate([f.codes + offsets[k] for k, f in enumerate(rest)])
            rows0 = np.tile(first.codes, len(rest))
            self.z0zr = sparse.csr_matrix((np.ones(len(cols)), (rows0, cols)), shape=(self.q0, self.qr))
            rr_rows, rr_cols = [], []
            for a, fa in enumerate(rest):
                for b, fb in enumerate(rest):
                    rr_rows.append(fa.codes + offsets[a])
                    rr_cols.append(fb.codes + offsets[b])
            self.zrzr = sparse.csr_matrix((np.ones(sum(len(r) for r in rr_rows)),
                                           (np.concatenate(rr_rows), np.concatenate(rr_cols))),
                                          shape=(self.qr, self.qr))
        self.dense = self.qr <= DENSE_MAX
        # Small designs: dense blocks are faster than scipy.sparse's per-call overhead.
        self.small = self.dense and self.q0 * self.qr <= 4_000_000
        if self.qr and self.small:
            self.z0zr_dense = self.z0zr.toarray()
            self.zrzr_dense = self.zrzr.toarray()

    def _factor(self, psi: np.ndarray) -> tuple[Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
                                                float, float, np.ndarray]:
        """Solver for ``M x = b`` (b split into the first factor's block and the rest) and log|M|."""
        lam = np.sqrt(psi[self.order])
        lam0 = float(lam[0])
        d1 = lam0 * lam0 * self.counts0 + 1.0
        logdet = float(np.log(d1).sum())
        if not self.qr:
            def solve0(b0: np.ndarray, br: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                return b0 / d1[:, None] if b0.ndim == 2 else b0 / d1, br
            return solve0, logdet, lam0, np.empty(0)
        lam_r = np.repeat(lam[1:], self.sizes)
        if self.small:
            m12 = self.z0zr_dense * (lam0 * lam_r)[None, :]
            schur = self.zrzr_dense * np.outer(lam_r, lam_r) - m12.T @ (m12 / d1[:, None])
            schur[np.diag_indices_from(schur)] += 1.0
        else:
            scale_r = sparse.diags(lam_r)
            m12 = (self.z0zr @ scale_r) * lam0
            m22 = scale_r @ self.zrzr @ scale_r + sparse.identity(self.qr, format="csr")
            schur = m22 - m12.T @ sparse.diags(1.0 / d1) @ m12
        if self.small:
            factor = linalg.cho_factor(schur, lower=True)
            logdet += 2.0 * float(np.log(np.diag(factor[0])).sum())

            def solve_s(b: np.ndarray) -> np.ndarray:
                return linalg.cho_solve(factor, b)
        elif self.dense:
            factor = linalg.cho_factor(schur.toarray(), lower=True)
            logdet += 2.0 * float(np.log(np.diag(factor[0])).sum())

            def solve_s(b: np.ndarray) -> np.ndarray:
                return linalg.cho_solve(factor, b)
        else:
            lu = splinalg.splu(sparse.csc_matrix(schur), permc_spec="MMD_AT_PLUS_A",
                               diag_pivot_thresh=0.0, options={"SymmetricMode": True})
            logdet += float(np.log(np.abs(lu.U.diagonal())).sum())
            solve_s = lu.solve

        def solve(b0: np.ndarray, br: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            inv_d1 = (1.0 / d1)[:, None] if b0.ndim == 2 else 1.0 / d1
            x_r = solve_s(br - m12.T @ (b0 * inv_d1))
            x_0 = (b0 - m12 @ x_r) * inv_d1
            return x_0, x_r
        return solve, logdet, lam0, lam_r

    def cross(self, psi: np.ndarray) -> tuple[np.ndarray, float]:
        solve, logdet, lam0, lam_r = self._factor(psi)
        b0 = lam0 * self.sums0
        if not self.qr:
            x0, _ = solve(b0, np.empty(0))
            return self.gram - b0.T @ x0, logdet
        br = lam_r[:, None] * self.sums_r
        x0, xr = solve(b0, br)
        return self.gram - b0.T @ x0 - br.T @ xr, logdet

    def blups(self, psi: np.ndarray, beta: np.ndarray) -> list[np.ndarray]:
        solve, _, lam0, lam_r = self._factor(psi)
        e0 = self.sums0[:, -1] - self.sums0[:, :-1] @ beta
        if self.qr:
            er = self.sums_r[:, -1] - self.sums_r[:, :-1] @ beta
            x0, xr = solve(lam0 * e0, lam_r * er)
        else:
            x0, xr = solve(lam0 * e0, np.empty(0))
        out: list[np.ndarray] = [np.empty(0)] * len(self.names)
        out[self.order[0]] = lam0 * x0
        for k, index in enumerate(self.order[1:]):
            sl = slice(self.offsets[k], self.offsets[k + 1])
            out[index] = lam_r[sl] * xr[sl]
        return out


# =========================================================================== criterion


@dataclass
class _State:
    deviance: float
    beta: np.ndarray
    chol_x: np.ndarray  # lower Cholesky factor of X'V^-1 X
    sigma2: float
    r2: float
    logdet_v: float
    logdet_x: float


class _Criterion:
    """lme4's profiled deviance (ML) or REML criterion as a function of the variance ratios."""

    def __init__(self, engine: _Engine, n: int, p: int, reml: bool) -> None:
        self.engine, self.n, self.p, self.reml = engine, n, p, reml
        self.dof = n - p if reml else n
        self.evaluations = 0

    def _parts(self, psi: np.ndarray) -> tuple[float, float, float, np.ndarray] | None:
        self.evaluations += 1
        if not np.all(np.isfinite(psi)) or np.any(psi < 0):
            return None
        try:
            cross, logdet_v = self.engine.cross(psi)
            chol = linalg.cholesky(cross, lower=True, check_finite=True)
        except (linalg.LinAlgError, ValueError, RuntimeError):
            return None
        p = self.p
        r2 = float(chol[p, p]) ** 2
        if not (r2 > 0 and math.isfinite(logdet_v)):
            return None
        logdet_x = 2.0 * float(np.log(np.diag(chol)[:p]).sum())
        return logdet_v, logdet_x, r2, chol

    def state(self, psi: np.ndarray) -> _State | None:
        parts = self._parts(psi)
        if parts is None:
            return None
        logdet_v, logdet_x, r2, chol = parts
        p = self.p
        lower = chol[:p, :p]
        beta = linalg.solve_triangular(lower.T, chol[p, :p], lower=False)
        sigma2 = r2 / self.dof
        dev = logdet_v + (logdet_x if self.reml else 0.0) + self.dof * (1.0 + _LOG_2PI + math.log(sigma2))
        return _State(dev, beta, lower, sigma2, r2, logdet_v, logdet_x)

    def deviance(self, psi: np.ndarray) -> float:
        parts = self._parts(psi)
        if parts is None:
            return math.inf
        logdet_v, logdet_x, r2, _ = parts
        return (logdet_v + (logdet_x if self.reml else 0.0)
                + self.dof * (1.0 + _LOG_2PI + math.log(r2 / self.dof)))

    def deviance_at(self, psi: np.ndarray, sigma2: float) -> float:
        """The criterion at given variance ratios and residual variance (not profiled)."""
        parts = self._parts(psi)
        if parts is None or not sigma2 > 0:
            return math.inf
        logdet_v, logdet_x, r2, _ = parts
        return (logdet_v + (logdet_x if self.reml else 0.0) + r2 / sigma2
                + self.dof * (_LOG_2PI + math.log(sigma2)))


# =========================================================================== optimization


def _gradient(fun: Callable[[np.ndarray], float], x: np.ndarray, step: float = 1e-5) -> np.ndarray:
    grad = np.zeros_like(x)
    for i in range(len(x)):
        hi, lo = x.copy(), x.copy()
        hi[i] += step
        lo[i] -= step
        grad[i] = (fun(hi) - fun(lo)) / (2.0 * step)
    return grad


def _projected_norm(grad: np.ndarray, x: np.ndarray, bounds: Sequence[tuple[float, float]]) -> float:
    g = grad.copy()
    for i, (lo, hi) in enumerate(bounds):
        if x[i] <= lo + 1e-8 and g[i] > 0:
            g[i] = 0.0
        if x[i] >= hi - 1e-8 and g[i] < 0:
            g[i] = 0.0
    return float(np.max(np.abs(g))) if g.size else 0.0


def _minimize(fun: Callable[[np.ndarray], float], x0: np.ndarray, method: str,
              bounds: Sequence[tuple[float, float]]) -> optimize.OptimizeResult:
    x0 = np.clip(np.asarray(x0, dtype=float), [b[0] for b in bounds], [b[1] for b in bounds])
    history: list[float] = []

    def callback(intermediate_result: optimize.OptimizeResult) -> None:
        history.append(float(intermediate_result.fun))

    if method == "L-BFGS-B":
        res = optimize.minimize(fun, x0, method="L-BFGS-B", jac=lambda x: _gradient(fun, x), bounds=bounds,
                                callback=callback, options={"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-8})
    elif method == "Nelder-Mead":
        res = optimize.minimize(fun, x0, method="Nelder-Mead", bounds=bounds, callback=callback,
                                options={"maxiter": 5000, "maxfev": 5000, "xatol": 1e-7, "fatol": 1e-9,
                                         "adaptive": len(x0) > 2})
    else:
        res = optimize.minimize(fun, x0, method="Powell", bounds=bounds, callback=callback,
                                options={"maxiter": 20000, "xtol": 1e-10, "ftol": 1e-14})
    res.history = history
    return res


def _last_step_change(history: Sequence[float]) -> float | None:
    """Relative change of the criterion over the optimizer's last iteration."""
    values = [v for v in history if math.isfinite(v)]
    if len(values) < 2:
        return None
    return abs(values[-2] - values[-1]) / max(abs(values[-1]), 1e-300)


def _run_optimizers(fun: Callable[[np.ndarray], float], x0: np.ndarray, methods: Sequence[str],
                    bounds: Sequence[tuple[float, float]], stage: str,
                    accept: Callable[[np.ndarray], bool] | None = None,
                    ) -> tuple[np.ndarray, float, str | None, bool, list[dict[str, Any]]]:
    """Try the optimizers in order until one converges; else keep the best point found.

    Converged means ``accept(x)`` (the fit's lme4 scaled-gradient check), or without it a
    projected raw gradient below ``GRADIENT_TOL``.
    """
    attempts: list[dict[str, Any]] = []
    best_x, best_f, best_method, converged = np.asarray(x0, float), fun(np.asarray(x0, float)), None, False
    if len(x0) == 0:
        return best_x, best_f, "none (no free parameter)", math.isfinite(best_f), attempts
    start = best_x
    for method in methods:
        began = time.perf_counter()
        try:
            res = _minimize(fun, start, method, bounds)
        except (ValueError, FloatingPointError, linalg.LinAlgError) as exc:
            attempts.append({"stage": stage, "optimizer": method, "success": False, "converged": False,
                             "message": f"error: {exc.__class__.__name__}: {exc}", "nfev": None,
                             "deviance": None, "gradient_norm": None,
                             "seconds": time.perf_counter() - began})
            continue
        x, f = np.asarray(res.x, dtype=float), float(res.fun)
        gnorm = _projected_norm(_gradient(fun, x), x, bounds) if math.isfinite(f) else math.inf
        if accept is None:
            ok = math.isfinite(f) and gnorm < GRADIENT_TOL
        else:
            ok = math.isfinite(f) and bool(accept(x))
        attempts.append({"stage": stage, "optimizer": method, "success": bool(res.success), "converged": ok,
                         "message": str(res.message), "nfev": int(getattr(res, "nfev", 0) or 0),
                         "deviance": f if math.isfinite(f) else None,
                         "gradient_norm": gnorm if math.isfinite(gnorm) else None,
                         "last_step_rel_change": _last_step_change(getattr(res, "history", ())),
                         "seconds": time.perf_counter() - began})
        if ok:
            return x, f, method, True, attempts
        if math.isfinite(f) and (best_method is None or not math.isfinite(best_f) or f < best_f):
            best_x, best_f, best_method = x, f, method
        if math.isfinite(best_f):
            start = best_x
    return best_x, best_f, best_method, converged, attempts


def _fit(criterion: _Criterion, data: _Data, methods: list[str], alpha: float, ddf: str) -> LmmResult:
    k = len(data.factors)
    names = [f.name for f in data.factors]
    bounds_all = [LOG_RATIO_BOUNDS] * k
    zero = np.zeros(k, dtype=bool)

    def expand(phi: np.ndarray, free: np.ndarray) -> np.ndarray:
        psi = np.zeros(k)
        psi[free] = np.exp(phi)
        return psi

    def objective(free: np.ndarray) -> Callable[[np.ndarray], float]:
        return lambda phi: criterion.deviance(expand(phi, free))

    def accept(free: np.ndarray) -> Callable[[np.ndarray], bool]:
        return lambda phi: bool(_lme4_check(criterion, expand(phi, free), free)["ok"])

    free = ~zero
    phi, dev, optimizer, converged, attempts = _run_optimizers(
        objective(free), np.zeros(k), methods, bounds_all, "fit", accept(free))
    if not math.isfinite(dev):
        detail = "; ".join(f"{a['optimizer']}: {a['message']}" for a in attempts)
        raise SitebenchError(f"the mixed model could not be fitted with any optimizer ({detail})")
    psi = expand(phi, free)

    # Boundary: components that went to ~0 are refitted at exactly 0 and kept there if no worse.
    refits: list[dict[str, Any]] = []
    for index in np.argsort(psi):
        if not free[index] or psi[index] >= ZERO_TRY_RATIO:
            continue
        trial_free = free.copy()
        trial_free[index] = False
        start = np.log(psi[trial_free])
        t_phi, t_dev, t_opt, t_conv, t_attempts = _run_optimizers(
            objective(trial_free), start, methods, [LOG_RATIO_BOUNDS] * int(trial_free.sum()),
            f"boundary refit ({names[index]} = 0)", accept(trial_free))
        accepted = math.isfinite(t_dev) and t_dev <= dev + ZERO_ACCEPT_TOL
        refits.append({"component": names[index], "ratio_before": float(psi[index]), "deviance_before": dev,
                       "deviance_at_zero": t_dev, "accepted": accepted})
        attempts.extend(t_attempts)
        if accepted:
            free, dev, psi = trial_free, t_dev, expand(t_phi, trial_free)
            if t_conv or not free.any():
                converged = True
            if t_opt is not None and free.any():
                optimizer = t_opt

    state = criterion.state(psi)
    if state is None:
        raise SitebenchError("the mixed model criterion is not finite at the estimate")
    fun = objective(free)
    phi_free = np.log(psi[free])
    grad = _gradient(fun, phi_free) if free.any() else np.zeros(0)
    gnorm = _projected_norm(grad, phi_free, [LOG_RATIO_BOUNDS] * int(free.sum()))
    check = _lme4_check(criterion, psi, free)
    # One-sided slope of the criterion in the variance ratio at each zero component (>= 0 at an optimum).
    zero_slopes: dict[str, float] = {}
    for index in np.flatnonzero(~free):
        bumped = psi.copy()
        bumped[index] = 1e-7
        zero_slopes[names[index]] = (criterion.deviance(bumped) - state.deviance) / 1e-7
    converged = bool(check["ok"] and all(s > -GRADIENT_TOL for s in zero_slopes.values()))

    sigma2 = state.sigma2
    variances = {name: float(psi[i] * sigma2) for i, name in enumerate(names)}
    variances[RESIDUAL] = float(sigma2)
    total = sum(variances.values())
    share = {key: value / total for key, value in variances.items()}
    at_upper = [names[i] for i in range(k) if free[i] and math.log(psi[i]) >= LOG_RATIO_BOUNDS[1] - 1e-6]

    # Fixed effects: cov = s^2 (X'V^-1 X)^-1; t with Satterthwaite's df, or Wald z.
    p = criterion.p
    inv_lower = linalg.solve_triangular(state.chol_x, np.eye(p), lower=True)
    cov = sigma2 * (inv_lower.T @ inv_lower)
    se = np.sqrt(np.diag(cov))
    notes = list(data.notes)
    satt, satt_problem = _satterthwaite_setup(criterion, psi, sigma2, free, names, cov)
    if ddf == "satterthwaite":
        if satt is None:
            notes.append(f"Satterthwaite df not available ({satt_problem}); Wald z used instead")
            df = np.full(p, math.inf)
        else:
            df = np.array([_satterthwaite_df(satt, np.eye(p)[j]) for j in range(p)])
            bad = ~np.isfinite(df)
            if bad.any():
                notes.append("Satterthwaite df not available for " + ", ".join(np.array(data.names)[bad])
                             + "; Wald z used for them")
                df[bad] = math.inf
    else:
        df = np.full(p, math.inf)
    rows = [_test_row(float(b), float(e), float(d), alpha) for b, e, d in zip(state.beta, se, df)]
    fixed = pd.DataFrame({"term": data.names, "estimate": state.beta, **{key: [r[key] for r in rows] for key in
                                                                        ("se", "df", "statistic", "ci_low",
                                                                         "ci_high", "p")}},
                         columns=list(FIXED_COLUMNS))

    blups = criterion.engine.blups(psi, state.beta)
    random_effects = {f.name: pd.Series(blups[i], index=pd.Index(f.labels, name=f.column), name=f.name)
                      for i, f in enumerate(data.factors)}

    if not converged:
        notes.append(f"no optimizer met lme4's scaled-gradient tolerance ({GRADIENT_TOL:g}; max "
                     f"{check['max_scaled_gradient']:.3g}); the best point found is reported")
    notes.extend(check["messages"])
    for name in names:
        if not free[names.index(name)]:
            notes.append(f"'{name}' variance estimated as 0 (boundary): fixed effects are those of the "
                         f"model without it")
        elif share[name] < BOUNDARY_SHARE:
            notes.append(f"'{name}' variance is near 0 ({share[name]:.2g} of the total)")
    if at_upper:
        notes.append(f"variance ratio at its upper bound for: {', '.join(at_upper)}")

    last_fit = [a for a in attempts if a.get("optimizer") == optimizer and a.get("deviance") is not None]
    diagnostics = {
        "gradient_norm": gnorm,
        "gradient": {names[i]: float(g) for i, g in zip(np.flatnonzero(free), grad)},
        "max_scaled_gradient": check["max_scaled_gradient"],
        "scaled_gradient": check["scaled_gradient"],
        "theta_gradient": check["gradient"],
        "hessian_eigenvalues": check["hessian_eigenvalues"],
        "gradient_tol": GRADIENT_TOL,
        "singular": check["singular"],
        "singular_tol": SINGULAR_TOL,
        "last_step_rel_change": last_fit[-1]["last_step_rel_change"] if last_fit else None,
        "convergence_messages": check["messages"],
        "ddf": ddf,
        "satterthwaite_problem": satt_problem,
        "zero_slopes": zero_slopes,
        "boundary": {name: bool(not free[i]) for i, name in enumerate(names)},
        "near_boundary": {name: bool(share[name] < BOUNDARY_SHARE) for name in names},
        "at_upper_bound": at_upper,
        "variance_ratios": {name: float(psi[i]) for i, name in enumerate(names)},
        "theta": {name: float(math.sqrt(psi[i])) for i, name in enumerate(names)},
        "deviance": state.deviance,
        "evaluations": criterion.evaluations,
        "boundary_refits": refits,
        "engine": criterion.engine.kind,
    }
    return LmmResult(
        formula=data.formula, groups=data.factors[0].name,
        vc=data.vc_names, crossed=data.crossed_names,
        fixed_effects=fixed, cov_fixed=pd.DataFrame(cov, index=data.names, columns=data.names),
        variance_components=variances, variance_share=share, loglik=-0.5 * state.deviance,
        reml=criterion.reml, converged=converged, optimizer=optimizer, attempts=attempts,
        diagnostics=diagnostics, random_effects=random_effects, n_obs=data.n,
        n_levels={f.name: f.size for f in data.factors}, engine=criterion.engine.kind,
        alpha=float(alpha), ddf=ddf, notes=notes, _criterion=criterion, _psi=psi.copy(),
        _satterthwaite=satt,
    )


# =========================================================================== inference


def _test_row(estimate: float, se: float, df: float, alpha: float) -> dict[str, float]:
    """SE, df, t (z when df is inf), the 1 - alpha CI and the two-sided p of one estimate."""
    if not (math.isfinite(se) and se > 0):
        return {"se": math.nan, "df": df, "statistic": math.nan, "ci_low": math.nan, "ci_high": math.nan,
                "p": math.nan}
    stat = estimate / se
    if math.isfinite(df):
        q, p = float(stats.t.ppf(1.0 - alpha / 2.0, df)), float(2.0 * stats.t.sf(abs(stat), df))
    else:
        q, p = float(stats.norm.ppf(1.0 - alpha / 2.0)), float(2.0 * stats.norm.sf(abs(stat)))
    return {"se": se, "df": df, "statistic": stat, "ci_low": estimate - q * se, "ci_high": estimate + q * se,
            "p": p}


def _fd_hessian(f: Callable[[np.ndarray], float], x: np.ndarray, h: float) -> np.ndarray:
    """Central second differences with step h."""
    k = len(x)
    out = np.zeros((k, k))
    f0 = f(x)
    eye = np.eye(k) * h
    for i in range(k):
        out[i, i] = (f(x + eye[i]) - 2.0 * f0 + f(x - eye[i])) / (h * h)
        for j in range(i):
            out[i, j] = out[j, i] = (f(x + eye[i] + eye[j]) - f(x + eye[i] - eye[j]) - f(x - eye[i] + eye[j])
                                     + f(x - eye[i] - eye[j])) / (4.0 * h * h)
    return out


def _richardson(estimate: Callable[[float], Any], h: float) -> Any:
    """One Richardson step on a central difference: (4 D(h/2) - D(h)) / 3 (error O(h^4))."""
    coarse, fine = estimate(h), estimate(h / 2.0)
    if isinstance(coarse, list):
        return [(4.0 * b - a) / 3.0 for a, b in zip(coarse, fine)]
    return (4.0 * fine - coarse) / 3.0


@dataclass
class _SatterthwaiteParts:
    """What Satterthwaite's df of any contrast needs: C, dC/d theta_i and A = 2 H^-1."""

    cov: np.ndarray
    jacobian: list[np.ndarray]
    acov: np.ndarray
    parameters: list[str]
    variance_gradient: np.ndarray  # d variance_i / d parameter_i


def _satterthwaite_setup(criterion: _Criterion, psi: np.ndarray, sigma2: float, free: np.ndarray,
                         names: list[str], cov: np.ndarray) -> tuple[_SatterthwaiteParts | None, str | None]:
    """Hessian of the (REML) deviance and Jacobian of cov(beta) in the variance parameters.

    Parameters are the SDs of the non-zero components and of the residual, as lmerTest's
    "varpar" (Kuznetsova et al. 2017), each divided by a scale (its own value, at least a
    tenth of the residual SD) so one relative step suits all; a linear rescaling leaves df
    unchanged. Components at zero are left out, as on lmerTest's boundary. Derivatives are
    Richardson-extrapolated central differences.
    """
    index = np.flatnonzero(free)
    p = criterion.p
    sd = np.concatenate([np.sqrt(psi[index] * sigma2), [math.sqrt(sigma2)]])
    scale = np.maximum(sd, 0.1 * math.sqrt(sigma2))
    x0 = sd / scale

    def unpack(x: np.ndarray) -> tuple[np.ndarray, float]:
        values = x * scale
        s2 = float(values[-1] ** 2)
        ratios = psi.copy()
        ratios[index] = values[:-1] ** 2 / s2
        return ratios, s2

    def deviance(x: np.ndarray) -> float:
        ratios, s2 = unpack(x)
        return criterion.deviance_at(ratios, s2)

    def cov_beta(x: np.ndarray) -> np.ndarray:
        ratios, s2 = unpack(x)
        parts = criterion._parts(ratios)
        if parts is None:
            raise linalg.LinAlgError("criterion not finite")
        inv = linalg.solve_triangular(parts[3][:p, :p], np.eye(p), lower=True)
        return s2 * (inv.T @ inv)

    def jacobian(h: float) -> list[np.ndarray]:
        eye = np.eye(len(x0)) * h
        return [(cov_beta(x0 + eye[i]) - cov_beta(x0 - eye[i])) / (2.0 * h) for i in range(len(x0))]

    try:
        hessian = _richardson(lambda h: _fd_hessian(deviance, x0, h), SATTERTHWAITE_STEP)
        jac = _richardson(jacobian, SATTERTHWAITE_STEP)
    except (linalg.LinAlgError, ValueError, FloatingPointError):
        return None, "the deviance could not be differentiated at the estimate"
    if not np.all(np.isfinite(hessian)):
        return None, "the deviance could not be differentiated at the estimate"
    hessian = (hessian + hessian.T) / 2.0
    eigen = np.linalg.eigvalsh(hessian)
    if eigen.min() <= 1e-8 * max(abs(eigen.max()), 1e-300):
        return None, "the Hessian of the deviance in the variance parameters is singular"
    acov = 2.0 * np.linalg.inv(hessian)
    labels = [names[i] for i in index] + [RESIDUAL]
    return _SatterthwaiteParts(cov=cov, jacobian=jac, acov=acov, parameters=labels,
                               variance_gradient=2.0 * sd * scale), None


def _satterthwaite_df(parts: _SatterthwaiteParts, vector: np.ndarray) -> float:
    """lmerTest's contest1D: 2 (L C L')^2 / (g' A g), g_i = L dC/d theta_i L'."""
    var = float(vector @ parts.cov @ vector)
    grad = np.array([float(vector @ j @ vector) for j in parts.jacobian])
    denom = float(grad @ parts.acov @ grad)
    if not (denom > 0 and var > 0):
        return math.nan
    return 2.0 * var * var / denom


def _lme4_check(criterion: _Criterion, psi: np.ndarray, free: np.ndarray) -> dict[str, Any]:
    """lme4's checkConv on the optimized parameters theta (relative SDs) of the non-zero components.

    Gradient and Hessian of the profiled criterion by central differences (lme4's
    ``deriv12``, step 1e-4); converged when ``max(min(|solve(chol(H), g)|, |g|)) < 2e-3``.
    The Hessian check (``check.conv.hess``, tol 1e-6) and the singular-fit check
    (``isSingular``, any theta < 1e-4) are reported as messages.
    """
    index = np.flatnonzero(free)
    theta_all = np.sqrt(psi)
    singular = bool(np.any(theta_all < SINGULAR_TOL))
    out: dict[str, Any] = {"ok": True, "gradient": [], "scaled_gradient": [], "max_scaled_gradient": 0.0,
                           "hessian_eigenvalues": [], "singular": singular, "messages": []}
    if singular:
        out["messages"].append("boundary (singular) fit: a random-effect SD is below "
                               f"{SINGULAR_TOL:g} of the residual SD")
    if not index.size:
        return out
    theta = theta_all[index]

    def fun(t: np.ndarray) -> float:
        ratios = psi.copy()
        ratios[index] = t * t
        return criterion.deviance(ratios)

    h = CHECK_STEP
    eye = np.eye(len(theta)) * h
    grad = np.array([(fun(theta + eye[i]) - fun(theta - eye[i])) / (2.0 * h) for i in range(len(theta))])
    hess = _fd_hessian(fun, theta, h)
    out["gradient"] = [float(g) for g in grad]
    if not (np.all(np.isfinite(grad)) and np.all(np.isfinite(hess))):
        out.update(ok=False, max_scaled_gradient=math.inf)
        out["messages"].append("unable to evaluate the gradient of the criterion")
        return out
    try:
        upper = linalg.cholesky(hess, lower=False)
        scaled = linalg.solve_triangular(upper, grad, lower=False)
    except (linalg.LinAlgError, ValueError):
        scaled = None
    if scaled is None:
        # lme4: "unable to evaluate scaled gradient"; fall back to the raw gradient.
        worst = float(np.max(np.abs(grad)))
        out["messages"].append("unable to evaluate the scaled gradient (Hessian not positive definite)")
    else:
        out["scaled_gradient"] = [float(g) for g in scaled]
        worst = float(np.max(np.minimum(np.abs(scaled), np.abs(grad))))
    out["max_scaled_gradient"] = worst
    out["ok"] = bool(worst < GRADIENT_TOL)
    eigen = np.linalg.eigvalsh((hess + hess.T) / 2.0)
    out["hessian_eigenvalues"] = [float(e) for e in eigen]
    if eigen.min() < -HESSIAN_TOL:
        out["messages"].append(f"degenerate Hessian with {int((eigen < -HESSIAN_TOL).sum())} negative "
                               "eigenvalue(s)")
    elif eigen.min() <= 0 or eigen.max() / eigen.min() > 1.0 / HESSIAN_TOL:
        out["messages"].append("model is nearly unidentifiable: very large eigenvalue ratio of the Hessian")
    return out


# =========================================================================== profile CIs


@dataclass
class _ProfileBase:
    criterion: _Criterion
    names: list[str]
    psi: np.ndarray
    sigma2: float
    deviance: float


def _profile_base(result: LmmResult, reml: bool) -> _ProfileBase:
    """The optimum of the criterion to profile: the fit's own, or the ML one for a REML fit."""
    fitted: _Criterion = result._criterion
    names = list(result.n_levels)
    psi = np.asarray(result._psi, dtype=float)
    if reml == fitted.reml:
        return _ProfileBase(fitted, names, psi, result.variance_components[RESIDUAL], -2.0 * result.loglik)
    criterion = _Criterion(fitted.engine, fitted.n, fitted.p, reml)
    fun = lambda phi: criterion.deviance(np.exp(phi))  # noqa: E731
    start = np.log(np.maximum(psi, math.exp(LOG_RATIO_BOUNDS[0])))
    phi, dev, _, _, _ = _run_optimizers(fun, start, DEFAULT_OPTIMIZERS, [LOG_RATIO_BOUNDS] * len(psi),
                                        "profile base")
    psi = np.exp(phi)
    psi[psi <= math.exp(LOG_RATIO_BOUNDS[0]) * (1 + 1e-9)] = 0.0
    state = criterion.state(psi)
    if state is None:
        raise SitebenchError("cannot refit the model by ML for the profile")
    return _ProfileBase(criterion, names, psi, state.sigma2, state.deviance)


def _profile_interval(base: _ProfileBase, name: str, level: float) -> tuple[float, float]:
    criterion, names = base.criterion, base.names
    psi_hat = base.psi
    k = len(names)
    sigma2_hat = base.sigma2
    dev_hat = base.deviance
    crit = float(stats.chi2.ppf(level, 1))
    lo_b, hi_b = LOG_RATIO_BOUNDS
    log_s2 = math.log(sigma2_hat)
    phi_hat = np.log(np.maximum(psi_hat, math.exp(lo_b)))
    s_hat = math.sqrt(sigma2_hat if name == RESIDUAL else psi_hat[names.index(name)] * sigma2_hat)

    if name == RESIDUAL:
        bounds = [(lo_b, hi_b)] * k
        x_hat = phi_hat.copy()

        def objective(s: float) -> Callable[[np.ndarray], float]:
            return lambda phi: criterion.deviance_at(np.exp(phi), s * s)
    else:
        index = names.index(name)
        others = [i for i in range(k) if i != index]
        bounds = [(log_s2 - 40.0, log_s2 + 40.0)] + [(lo_b, hi_b)] * len(others)
        x_hat = np.concatenate([[log_s2], phi_hat[others]])

        def objective(s: float) -> Callable[[np.ndarray], float]:
            def fun(x: np.ndarray) -> float:
                s2 = math.exp(x[0])
                psi = np.zeros(k)
                psi[others] = np.exp(x[1:])
                psi[index] = s * s / s2
                return criterion.deviance_at(psi, s2)
            return fun

    # Continuation: each profile point starts from the solution at the nearest point already done.
    solutions: dict[float, np.ndarray] = {s_hat: x_hat}
    values: dict[float, float] = {s_hat: 0.0}

    def inner(s: float) -> float:
        if s in values:
            return values[s]
        nearest = min(solutions, key=lambda t: abs(t - s))
        res = _minimize(objective(s), solutions[nearest], "L-BFGS-B", bounds)
        value = float(res.fun) - dev_hat
        if math.isfinite(value):
            solutions[s] = np.asarray(res.x, dtype=float)
        values[s] = value
        return value

    def lower() -> float:
        if s_hat == 0.0:
            return 0.0
        high, low = s_hat, s_hat
        for _ in range(60):
            low = high * 0.5
            if inner(low) > crit:
                break
            high = low
            if name != RESIDUAL and low < s_hat * 1e-4:
                if inner(0.0) <= crit:
                    return 0.0
                low = 0.0
                break
        return optimize.brentq(lambda s: inner(s) - crit, low, high, xtol=1e-12 * s_hat, rtol=1e-10)

    def upper() -> float:
        step = s_hat if s_hat > 0 else math.sqrt(sigma2_hat) * 0.05
        low, high = s_hat, s_hat + 0.5 * step
        for _ in range(200):
            if inner(high) > crit:
                break
            low, high = high, high + (high - s_hat)
        else:
            return math.inf
        return optimize.brentq(lambda s: inner(s) - crit, low, high, xtol=1e-12 * high, rtol=1e-10)

    return float(lower()), float(upper())
