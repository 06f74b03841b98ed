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

Fixed-effect p-values and CIs are Wald z (lme4 reports none). Variance components get
profile-likelihood CIs on the SD scale, like lme4's ``confint(method = "profile")``.
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

__all__ = ["LmmResult", "LrtResult", "fit_lmm", "lrt"]

DEFAULT_OPTIMIZERS: tuple[str, ...] = ("L-BFGS-B", "Nelder-Mead", "Powell")
FIXED_COLUMNS: tuple[str, ...] = ("term", "estimate", "se", "ci_low", "ci_high", "z", "p")
RESIDUAL = "residual"
#: Bounds of the optimized log variance ratios log(s_k^2 / s^2).
LOG_RATIO_BOUNDS: tuple[float, float] = (-30.0, 20.0)
#: Largest projected gradient of the criterion (per unit log ratio) counted as converged.
GRADIENT_TOL = 2e-3
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
    confidence: float
    notes: list[str] = field(default_factory=list)
    _criterion: Any = field(default=None, repr=False, compare=False)
    _psi: Any = field(default=None, repr=False, compare=False)
    _profile_cache: dict = field(default_factory=dict, repr=False, compare=False)

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
    def boundary(self) -> bool:
        """Whether any random-effect variance is estimated as exactly 0."""
        return any(self.diagnostics["boundary"].values())

    def to_frame(self) -> pd.DataFrame:
        """Tidy fixed effects: term, estimate, se, ci_low, ci_high, z, p."""
        return self.fixed_effects.copy()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable record (plain types, NaN as None)."""
        fixed = {
            str(row["term"]): {key: jsonable(row[key]) for key in ("estimate", "se", "ci_low", "ci_high", "p")}
            for _, row in self.fixed_effects.iterrows()
        }
        return {
            "formula": self.formula,
            "groups": self.groups,
            "vc": list(self.vc),
            "crossed": list(self.crossed),
            "fixed_effects": fixed,
            "fixed_effects_z": {str(t): jsonable(z) for t, z in zip(self.fixed_effects["term"],
                                                                    self.fixed_effects["z"])},
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
            "confidence": float(self.confidence),
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """Readable report: fit status, random effects (variance and SD), fixed effects, notes."""
        pct = f"{self.confidence * 100:g}%"
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
            f"converged {self.converged} (gradient {self.diagnostics['gradient_norm']:.2g})",
            "",
            "Random effects:",
            f"  {'component':<22} {'variance':>12} {'std.dev.':>12} {'share':>8}",
        ]
        for name, value in self.variance_components.items():
            flag = "  (boundary)" if self.diagnostics["boundary"].get(name) else ""
            lines.append(f"  {name:<22} {value:>12.5g} {math.sqrt(value):>12.5g} "
                         f"{self.variance_share[name]:>8.1%}{flag}")
        lines += ["", f"Fixed effects (Wald z {pct} CIs and p-values; lme4 reports no p-values):",
                  f"  {'term':<28} {'estimate':>11} {'se':>10} {pct + ' CI':>25} {'z':>8} {'p':>9}"]
        for _, row in self.fixed_effects.iterrows():
            ci = f"[{row['ci_low']:.5g}, {row['ci_high']:.5g}]"
            lines.append(f"  {str(row['term']):<28} {row['estimate']:>11.5g} {row['se']:>10.4g} "
                         f"{ci:>25} {row['z']:>8.3f} {row['p']:>9.3g}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    # ------------------------------------------------------------------ variance CIs

    def profile_ci(self, level: float = 0.95, components: Sequence[str] | None = None,
                   criterion: str = "ml") -> pd.DataFrame:
        """Profile-likelihood CIs of the SDs of the variance components (lme4's method="profile").

        For each component the deviance is minimized over all other parameters with
        that SD held fixed; the interval is where it stays within ``chi2_1(level)`` of
        its minimum. A lower limit of 0 means the profile never rises that far towards
        zero. ``criterion="ml"`` (default) profiles the ML deviance even for a REML fit,
        as lme4 does (lme4 issue #838); ``criterion="reml"`` profiles the REML criterion
        of a REML fit.
        """
        if not 0 < level < 1:
            raise SitebenchError(f"level must be between 0 and 1, got {level!r}")
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
            optimizers: Sequence[str] = DEFAULT_OPTIMIZERS, *, confidence: float = 0.95,
            engine: str = "auto") -> LmmResult:
    """Fit ``formula`` with random intercepts for ``groups``, nested ``vc`` and ``crossed`` factors.

    ``formula`` is a patsy fixed-effects formula (``"y ~ age + C(vendor)"``). ``vc``
    names columns whose levels are nested in ``groups`` (scanner within site; as in
    statsmodels, a label is taken within its group); ``crossed`` names columns whose
    levels are shared across groups (a subject scanned at several sites). Either may
    be a mapping ``component name -> column``. Optimizers are tried in order until one
    converges; ``engine`` is ``"auto"``, ``"nested"`` or ``"sparse"``.
    """
    if not 0 < confidence < 1:
        raise SitebenchError(f"confidence must be between 0 and 1, got {confidence!r}")
    methods = _optimizer_names(optimizers)
    with _single_thread():
        return _fit_lmm(table, formula, groups, vc, crossed, bool(reml), methods, confidence, engine)


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
             methods: list[str], confidence: float, engine: str) -> LmmResult:
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
    return _fit(criterion, data, methods, confidence)


def lrt(table: pd.DataFrame, full_formula: str, reduced_formula: str, groups: str,
        vc: Sequence[str] | Mapping[str, str] = (), crossed: Sequence[str] | Mapping[str, str] = (),
        optimizers: Sequence[str] = DEFAULT_OPTIMIZERS, *, engine: str = "auto") -> LrtResult:
    """ML likelihood-ratio test for dropping a block of fixed effects (both models refitted by ML)."""
    full = fit_lmm(table, full_formula, groups, vc, crossed, reml=False, optimizers=optimizers, engine=engine)
    reduced = fit_lmm(table, reduced_formula, groups, vc, crossed, reml=False, optimizers=optimizers,
                      engine=engine)
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
    return _Data(formula=formula, y_name=y_name, names=names, zaug=np.column_stack([x, y]),
                 factors=factors, vc_names=tuple(n for n, _ in vc_map),
                 crossed_names=tuple(n for n, _ in crossed_map), n=n, p=p, notes=notes)


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
    if method == "L-BFGS-B":
        return optimize.minimize(fun, x0, method="L-BFGS-B", jac=lambda x: _gradient(fun, x), bounds=bounds,
                                 options={"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-8})
    if method == "Nelder-Mead":
        return optimize.minimize(fun, x0, method="Nelder-Mead", bounds=bounds,
                                 options={"maxiter": 5000, "maxfev": 5000, "xatol": 1e-7, "fatol": 1e-9,
                                          "adaptive": len(x0) > 2})
    return optimize.minimize(fun, x0, method="Powell", bounds=bounds,
                             options={"maxiter": 20000, "xtol": 1e-10, "ftol": 1e-14})


def _run_optimizers(fun: Callable[[np.ndarray], float], x0: np.ndarray, methods: Sequence[str],
                    bounds: Sequence[tuple[float, float]], stage: str
                    ) -> tuple[np.ndarray, float, str | None, bool, list[dict[str, Any]]]:
    """Try the optimizers in order until one converges; else keep the best point found."""
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
        ok = math.isfinite(f) and gnorm < GRADIENT_TOL
        attempts.append({"stage": stage, "optimizer": method, "success": bool(res.success), "converged": ok,
                         "message": str(res.message), "nfev": int(getattr(res, "nfev", 0) or 0),
                         "deviance": f if math.isfinite(f) else None,
                         "gradient_norm": gnorm if math.isfinite(gnorm) else None,
                         "seconds": time.perf_counter() - began})
        if ok:
            return x, f, method, True, attempts
        if math.isfinite(f) and (best_method is None or not math.isfinite(best_f) or f < best_f):
            best_x, best_f, best_method = x, f, method
        if math.isfinite(best_f):
            start = best_x
    return best_x, best_f, best_method, converged, attempts


def _fit(criterion: _Criterion, data: _Data, methods: list[str], confidence: float) -> LmmResult:
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

    free = ~zero
    phi, dev, optimizer, converged, attempts = _run_optimizers(
        objective(free), np.zeros(k), methods, bounds_all, "fit")
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
            f"boundary refit ({names[index]} = 0)")
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
    # One-sided slope of the criterion in the variance ratio at each zero component (>= 0 at an optimum).
    zero_slopes: dict[str, float] = {}
    for index in np.flatnonzero(~free):
        bumped = psi.copy()
        bumped[index] = 1e-7
        zero_slopes[names[index]] = (criterion.deviance(bumped) - state.deviance) / 1e-7
    converged = bool(converged and gnorm < GRADIENT_TOL
                     and all(s > -GRADIENT_TOL for s in zero_slopes.values()))

    sigma2 = state.sigma2
    variances = {name: float(psi[i] * sigma2) for i, name in enumerate(names)}
    variances[RESIDUAL] = float(sigma2)
    total = sum(variances.values())
    share = {key: value / total for key, value in variances.items()}
    at_upper = [names[i] for i in range(k) if free[i] and math.log(psi[i]) >= LOG_RATIO_BOUNDS[1] - 1e-6]

    # Fixed effects: Wald z with cov = s^2 (X'V^-1 X)^-1.
    p = criterion.p
    inv_lower = linalg.solve_triangular(state.chol_x, np.eye(p), lower=True)
    cov = sigma2 * (inv_lower.T @ inv_lower)
    se = np.sqrt(np.diag(cov))
    z_crit = float(stats.norm.ppf(0.5 + confidence / 2.0))
    z = state.beta / se
    fixed = pd.DataFrame({"term": data.names, "estimate": state.beta, "se": se,
                          "ci_low": state.beta - z_crit * se, "ci_high": state.beta + z_crit * se,
                          "z": z, "p": 2.0 * stats.norm.sf(np.abs(z))}, columns=list(FIXED_COLUMNS))

    blups = criterion.engine.blups(psi, state.beta)
    random_effects = {f.name: pd.Series(blups[i], index=pd.Index(f.labels, name=f.column), name=f.name)
                      for i, f in enumerate(data.factors)}

    notes = list(data.notes)
    if not converged:
        notes.append("no optimizer met the gradient tolerance; the best point found is reported")
    for name in names:
        if not free[names.index(name)]:
            notes.append(f"'{name}' variance estimated as 0 (boundary): fixed effects are those of the "
                         f"model without it")
        elif share[name] < BOUNDARY_SHARE:
            notes.append(f"'{name}' variance is near 0 ({share[name]:.2g} of the total)")
    if at_upper:
        notes.append(f"variance ratio at its upper bound for: {', '.join(at_upper)}")

    diagnostics = {
        "gradient_norm": gnorm,
        "gradient": {names[i]: float(g) for i, g in zip(np.flatnonzero(free), grad)},
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
        confidence=float(confidence), notes=notes, _criterion=criterion, _psi=psi.copy(),
    )


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
