"""How much of a biomarker's variance is site and scanner: a linear mixed model.

Vendor and software upgrade are fixed effects (they are what a sponsor could act
on); site and scanner-within-site are random effects whose variances say how much
of the biomarker is scanner noise. statsmodels' MixedLM is fitted with several
optimizers because single optimizers fail silently on these data, and fits on the
variance boundary are checked against OLS (statsmodels issue #10239).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from sitebench.datasets.manifest import (
    ACQUISITION_DATE,
    SCAN_ID,
    SCANNER_ID,
    SITE,
    SOFTWARE_UPGRADED,
    SOFTWARE_VERSION,
    add_software_upgraded,
)
from sitebench.errors import SitebenchError
from sitebench.provenance import jsonable

DEFAULT_FIXED: tuple[str, ...] = ("C(vendor)", SOFTWARE_UPGRADED, "age", "C(sex)", "C(group)")
DEFAULT_OPTIMIZERS: tuple[str, ...] = ("lbfgs", "bfgs", "powell", "nm")
#: A variance component below this share of the total variance is "on the boundary".
BOUNDARY_SHARE = 1e-4
#: Largest |mixed - reference| fixed-effect difference, in reference SEs, counted as agreement.
BOUNDARY_TOLERANCE_SE = 0.05
FIXED_COLUMNS: tuple[str, ...] = ("term", "estimate", "se", "ci_low", "ci_high", "p")
UPGRADE_COLUMNS: tuple[str, ...] = (
    "site", "n_before", "n_after", "mean_before", "mean_after", "difference",
    "se", "df", "ci_low", "ci_high", "p", "note",
)
_Z95 = float(stats.norm.ppf(0.975))
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class ScannerEffects:
    """Fixed vendor/upgrade/covariate effects and site/scanner/residual variances."""

    response: str
    formula: str
    fixed_effects: pd.DataFrame
    variance_components: dict[str, float | None]
    variance_share: dict[str, float | None]
    loglik: float | None
    reml: bool
    converged: bool
    optimizer: str | None
    attempts: list[dict[str, Any]]
    boundary: bool
    boundary_check: dict[str, Any] | None
    n_obs: int
    n_sites: int
    n_scanners: int | None
    n_dropped: int
    dropped_terms: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_frame(self) -> pd.DataFrame:
        """The fixed-effects table: term, estimate, se, ci_low, ci_high, p."""
        return self.fixed_effects.copy()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable record (plain types, NaN as None)."""
        fixed = {
            str(row["term"]): {key: jsonable(row[key]) for key in FIXED_COLUMNS[1:]}
            for _, row in self.fixed_effects.iterrows()
        }
        return {
            "response": self.response,
            "formula": self.formula,
            "fixed_effects": fixed,
            "variance_components": {k: jsonable(v) for k, v in self.variance_components.items()},
            "variance_share": {k: jsonable(v) for k, v in self.variance_share.items()},
            "loglik": jsonable(self.loglik),
            "reml": bool(self.reml),
            "converged": bool(self.converged),
            "optimizer": self.optimizer,
            "attempts": [{k: jsonable(v) for k, v in a.items()} for a in self.attempts],
            "boundary": bool(self.boundary),
            "boundary_check": jsonable(self.boundary_check),
            "n_obs": int(self.n_obs),
            "n_sites": int(self.n_sites),
            "n_scanners": jsonable(self.n_scanners),
            "n_dropped": int(self.n_dropped),
            "dropped_terms": list(self.dropped_terms),
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """Readable report: model, fit status, fixed effects, variance components, notes."""
        lines = [
            f"Mixed model ({'REML' if self.reml else 'ML'}): {self.formula}",
            f"{self.n_obs} scans, {self.n_sites} sites"
            + (f", {self.n_scanners} scanners" if self.n_scanners is not None else "")
            + (f"; {self.n_dropped} scans dropped (missing values)" if self.n_dropped else ""),
            f"optimizer {self.optimizer}, converged {self.converged}, log-likelihood "
            + (f"{self.loglik:.3f}" if self.loglik is not None else "n/a")
            + (", variance on the boundary" if self.boundary else ""),
            "",
            f"{'term':<28} {'estimate':>10} {'se':>9} {'95% CI':>23} {'p':>9}",
        ]
        for _, row in self.fixed_effects.iterrows():
            ci = (f"[{row['ci_low']:.4g}, {row['ci_high']:.4g}]"
                  if pd.notna(row["ci_low"]) else "n/a")
            p = f"{row['p']:.3g}" if pd.notna(row["p"]) else "n/a"
            se = f"{row['se']:.4g}" if pd.notna(row["se"]) else "n/a"
            lines.append(f"{str(row['term']):<28} {row['estimate']:>10.4g} {se:>9} {ci:>23} {p:>9}")
        lines += ["", f"{'variance component':<20} {'variance':>10} {'share':>8}"]
        for name, value in self.variance_components.items():
            share = self.variance_share.get(name)
            lines.append(f"{name:<20} " + (f"{value:>10.4g}" if value is not None else f"{'n/e':>10}")
                         + (f" {share:>8.1%}" if share is not None else f" {'n/e':>8}"))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


@dataclass
class UpgradeEffect:
    """Per-site change in the biomarker after a scanner software upgrade (after - before)."""

    response: str
    site_column: str
    confidence: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_frame(self) -> pd.DataFrame:
        """One row per site with scans both before and after its upgrade."""
        frame = pd.DataFrame(self.rows, columns=list(UPGRADE_COLUMNS))
        for column in UPGRADE_COLUMNS[3:-1]:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
        return frame

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable record (plain types, NaN as None)."""
        return {
            "response": self.response,
            "site_column": self.site_column,
            "confidence": float(self.confidence),
            "sites": [{k: jsonable(row[k]) for k in UPGRADE_COLUMNS} for row in self.rows],
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """Readable table of before/after means and the Welch CI of the difference."""
        pct = f"{self.confidence * 100:g}%"
        lines = [f"Software upgrade effect on '{self.response}' within {self.site_column} "
                 f"(after - before, Welch {pct} CI)"]
        if not self.rows:
            lines.append("no site has scans both before and after an upgrade")
        else:
            lines.append(f"{'site':<14} {'n0':>4} {'n1':>4} {'mean0':>10} {'mean1':>10} "
                         f"{'diff':>10} {pct + ' CI':>24} {'p':>9}")
            for r in self.rows:
                ci = (f"[{r['ci_low']:.4g}, {r['ci_high']:.4g}]" if r["ci_low"] is not None else "n/e")
                p = f"{r['p']:.3g}" if r["p"] is not None else "n/e"
                lines.append(f"{str(r['site']):<14} {r['n_before']:>4} {r['n_after']:>4} "
                             f"{r['mean_before']:>10.4g} {r['mean_after']:>10.4g} "
                             f"{r['difference']:>10.4g} {ci:>24} {p:>9}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def fit_scanner_effects(table: pd.DataFrame, response: str, *,
                        fixed: Sequence[str] = DEFAULT_FIXED,
                        site: str = SITE, scanner: str | None = SCANNER_ID,
                        reml: bool = True,
                        optimizers: Sequence[str] = DEFAULT_OPTIMIZERS) -> ScannerEffects:
    """Fit ``response ~ fixed + (1 | site) + (1 | site:scanner)`` and report effects and variances.

    Fixed terms that name missing, empty or constant columns, or that are collinear
    with earlier terms, are dropped with a note. Every optimizer is tried and the
    converged fit with the highest log-likelihood is kept. When a variance lands on
    zero the fixed effects are checked against the model without that component.
    """
    import statsmodels.formula.api as smf

    if isinstance(fixed, str):
        fixed = (fixed,)
    if isinstance(optimizers, str):
        optimizers = (optimizers,)
    if not optimizers:
        raise SitebenchError("no optimizers given")
    for column, what in ((response, "response"), (site, "site")):
        if column not in table.columns:
            raise SitebenchError(f"{what} column '{column}' not in the table")

    notes: list[str] = []
    dropped_terms: list[str] = []
    data = table.reset_index(drop=True)
    _numeric_column(data, response)

    # Which fixed terms can be fitted at all, and which columns they need.
    terms: list[tuple[str, list[str]]] = []
    for term in fixed:
        names = [n for n in dict.fromkeys(_IDENT.findall(term))
                 if n in data.columns or n == SOFTWARE_UPGRADED]
        if SOFTWARE_UPGRADED in names and SOFTWARE_UPGRADED not in data.columns:
            need = [c for c in (SOFTWARE_VERSION, ACQUISITION_DATE, SCAN_ID) if c not in data.columns]
            if need:
                dropped_terms.append(term)
                notes.append(f"term '{term}' dropped: cannot derive '{SOFTWARE_UPGRADED}' "
                             f"without column(s) {', '.join(need)}")
                continue
            data = add_software_upgraded(data)
            notes.append(f"'{SOFTWARE_UPGRADED}' derived from software versions per scanner")
        if not names:
            dropped_terms.append(term)
            notes.append(f"term '{term}' dropped: it names no column of the table")
            continue
        empty = [n for n in names if data[n].isna().all()]
        if empty:
            dropped_terms.append(term)
            notes.append(f"term '{term}' dropped: column '{empty[0]}' has no values")
            continue
        terms.append((term, names))

    use_scanner = scanner is not None and scanner in data.columns and data[scanner].notna().any()
    if scanner is not None and not use_scanner:
        notes.append(f"no '{scanner}' values: scanner variance not estimated")

    used = [response, site] + [n for _, names in terms for n in names]
    if use_scanner:
        used.append(scanner)
    used = list(dict.fromkeys(used))
    complete = data[used].notna().all(axis=1) & np.isfinite(_numeric_column(data, response))
    n_dropped = int((~complete).sum())
    if n_dropped:
        notes.append(f"{n_dropped} scan(s) with missing values in {', '.join(used)} dropped")
    data = data.loc[complete, used].reset_index(drop=True)
    data[response] = _numeric_column(data, response)
    for column in used[1:]:
        if isinstance(data[column].dtype, pd.StringDtype):
            data[column] = data[column].astype(object)

    kept: list[str] = []
    for term, names in terms:
        constant = [n for n in names if data[n].nunique() < 2]
        if constant:
            dropped_terms.append(term)
            value = data[constant[0]].iloc[0] if len(data) else "no rows"
            notes.append(f"term '{term}' dropped: '{constant[0]}' is constant ({value}) in the data")
            continue
        if not _adds_rank(data, kept, term):
            dropped_terms.append(term)
            notes.append(f"term '{term}' dropped: collinear with the intercept or earlier terms")
            continue
        kept.append(term)

    n_obs = len(data)
    n_sites = int(data[site].nunique())
    if n_sites < 2:
        raise SitebenchError(f"a site random effect needs at least 2 sites, the data have {n_sites}")
    if n_obs <= len(kept) + 3:
        raise SitebenchError(f"too few complete scans ({n_obs}) for {len(kept)} fixed term(s)")

    n_scanners: int | None = None
    has_vc = False
    if use_scanner:
        n_scanners = int(data.groupby(site)[scanner].nunique().sum())
        has_vc = bool((data.groupby(site)[scanner].nunique() > 1).any())
        if not has_vc:
            notes.append("no site has more than one scanner: scanner variance cannot be separated "
                         "from site variance and is not estimated")

    rhs = " + ".join(kept) if kept else "1"
    formula = f"{_quote(response)} ~ {rhs}"
    shown = f"{response} ~ {' + '.join(kept) if kept else '1'} + (1 | {site})"
    vc_formula = None
    if has_vc:
        vc_formula = {"scanner": f"0 + C({_quote(scanner)})"}
        shown += f" + (1 | {site}:{scanner})"

    model = smf.mixedlm(formula, data, groups=data[site], re_formula="1", vc_formula=vc_formula)
    result, attempts, optimizer = _fit_best(model, reml, optimizers)
    converged = bool(result.converged)
    if not converged:
        notes.append("no optimizer converged; the fit with the highest log-likelihood is reported")

    names = list(result.fe_params.index)
    fe = np.asarray(result.fe_params, dtype=float)
    with np.errstate(invalid="ignore"):  # a singular covariance gives NaN SEs, reported below as not available
        se = np.asarray(result.bse_fe, dtype=float)[: len(fe)]
    scale = float(result.scale)
    site_var = float(np.asarray(result.cov_re)[0, 0])
    scanner_var = float(np.asarray(result.vcomp)[0]) if has_vc else None
    loglik = float(result.llf)

    total = site_var + (scanner_var or 0.0) + scale
    on_boundary = [name for name, value in (("site", site_var), ("scanner", scanner_var))
                   if value is not None and value < BOUNDARY_SHARE * total]
    boundary_check: dict[str, Any] | None = None
    if on_boundary:
        reference = _boundary_reference(smf, formula, data, site, scanner, has_vc, on_boundary,
                                        reml, optimizers)
        boundary_check, replace = _check_boundary(model, names, fe, site_var, scanner_var, scale,
                                                  reference, has_vc)
        boundary_check["components"] = on_boundary
        if replace:
            fe, se = reference["fe"], reference["se"]
            site_var, scale = reference["site"], reference["residual"]
            if has_vc:
                scanner_var = reference["scanner"]
            loglik = boundary_check["loglik_reference"]
            notes.append(f"fixed effects at the variance boundary disagreed with {reference['label']} "
                         f"(max {boundary_check['max_abs_diff_se']:.3g} SE); its estimates are used")
        notes.append(f"{' and '.join(on_boundary)} variance estimated as ~0 (boundary)")

    with np.errstate(divide="ignore", invalid="ignore"):
        z = fe / se
    fixed_table = pd.DataFrame({
        "term": names,
        "estimate": fe,
        "se": np.where(se > 0, se, np.nan),
        "ci_low": fe - _Z95 * se,
        "ci_high": fe + _Z95 * se,
        "p": 2.0 * stats.norm.sf(np.abs(z)),
    }, columns=list(FIXED_COLUMNS))
    bad_se = ~(np.isfinite(se) & (se > 0))
    fixed_table.loc[bad_se, ["se", "ci_low", "ci_high", "p"]] = np.nan
    if bad_se.any():
        notes.append("standard error not available for: " + ", ".join(np.array(names)[bad_se]))

    components: dict[str, float | None] = {"site": site_var, "scanner": scanner_var, "residual": scale}
    total = sum(v for v in components.values() if v is not None)
    share = {k: (v / total if v is not None and total > 0 else None) for k, v in components.items()}

    return ScannerEffects(
        response=response, formula=shown, fixed_effects=fixed_table,
        variance_components=components, variance_share=share, loglik=loglik, reml=bool(reml),
        converged=converged, optimizer=optimizer, attempts=attempts,
        boundary=bool(on_boundary), boundary_check=boundary_check, n_obs=n_obs, n_sites=n_sites,
        n_scanners=n_scanners, n_dropped=n_dropped, dropped_terms=dropped_terms, notes=notes,
    )


def upgrade_effect(table: pd.DataFrame, response: str, site_column: str = SITE, *,
                   confidence: float = 0.95) -> UpgradeEffect:
    """Within each site, compare scans after a software upgrade with those before (Welch).

    A within-site before/after difference is free of the between-site variation
    that dominates the mixed model, so it is the direct check of an upgrade.
    """
    if not 0 < confidence < 1:
        raise SitebenchError(f"confidence must be between 0 and 1, got {confidence!r}")
    for column in (response, site_column):
        if column not in table.columns:
            raise SitebenchError(f"column '{column}' not in the table")
    notes: list[str] = []
    data = table
    if SOFTWARE_UPGRADED not in data.columns:
        need = [c for c in (SOFTWARE_VERSION, ACQUISITION_DATE, SCAN_ID) if c not in data.columns]
        if need:
            raise SitebenchError(f"no '{SOFTWARE_UPGRADED}' column and cannot derive it without "
                                 f"column(s) {', '.join(need)}")
        data = add_software_upgraded(data)
        notes.append(f"'{SOFTWARE_UPGRADED}' derived from software versions per scanner")
    y = _numeric_column(data, response)
    flag = pd.to_numeric(data[SOFTWARE_UPGRADED], errors="coerce").to_numpy(dtype=float)
    keep = np.isfinite(y) & np.isin(flag, (0.0, 1.0)) & data[site_column].notna().to_numpy()
    if (~keep).any():
        notes.append(f"{int((~keep).sum())} scan(s) with missing values dropped")
    frame = pd.DataFrame({"site": data[site_column].to_numpy()[keep], "y": y[keep], "up": flag[keep]})

    rows: list[dict[str, Any]] = []
    quantile = 1.0 - (1.0 - confidence) / 2.0
    for site_name, group in sorted(frame.groupby("site"), key=lambda item: str(item[0])):
        before = group.loc[group["up"] == 0, "y"].to_numpy()
        after = group.loc[group["up"] == 1, "y"].to_numpy()
        if len(before) == 0 or len(after) == 0:
            continue
        row: dict[str, Any] = {
            "site": str(site_name), "n_before": len(before), "n_after": len(after),
            "mean_before": float(before.mean()), "mean_after": float(after.mean()),
            "difference": float(after.mean() - before.mean()),
            "se": None, "df": None, "ci_low": None, "ci_high": None, "p": None, "note": None,
        }
        if len(before) < 2 or len(after) < 2:
            row["note"] = "Welch CI needs at least 2 scans before and after"
        else:
            v0, v1 = before.var(ddof=1) / len(before), after.var(ddof=1) / len(after)
            se = math.sqrt(v0 + v1)
            if se <= 0:
                row["note"] = "no variation before or after: CI not estimable"
            else:
                df = (v0 + v1) ** 2 / (v0 ** 2 / (len(before) - 1) + v1 ** 2 / (len(after) - 1))
                half = float(stats.t.ppf(quantile, df)) * se
                row.update(se=se, df=float(df), ci_low=row["difference"] - half,
                           ci_high=row["difference"] + half,
                           p=float(2.0 * stats.t.sf(abs(row["difference"]) / se, df)))
        rows.append(row)
    if not rows:
        notes.append("no site has scans both before and after a software upgrade")
    return UpgradeEffect(response=response, site_column=site_column, confidence=float(confidence),
                         rows=rows, notes=notes)


# --------------------------------------------------------------------------- helpers


def _numeric_column(data: pd.DataFrame, column: str) -> np.ndarray:
    try:
        return pd.to_numeric(data[column], errors="raise").to_numpy(dtype=float, na_value=np.nan)
    except (TypeError, ValueError):
        raise SitebenchError(f"column '{column}' is not numeric") from None


def _quote(name: str) -> str:
    return name if name.isidentifier() else f'Q("{name}")'


def _adds_rank(data: pd.DataFrame, kept: list[str], term: str) -> bool:
    """Whether ``term`` adds full-rank columns to the design built from ``kept``."""
    import patsy

    try:
        design = np.asarray(patsy.dmatrix(" + ".join(["1", *kept, term]), data,
                                          return_type="matrix", NA_action="raise"))
    except Exception as exc:  # patsy raises many types for a bad term
        raise SitebenchError(f"cannot build fixed term '{term}' ({exc.__class__.__name__}: {exc})") from None
    return int(np.linalg.matrix_rank(design)) == design.shape[1]


def _fit_best(model: Any, reml: bool, optimizers: Sequence[str]) -> tuple[Any, list[dict[str, Any]], str]:
    """Fit with each optimizer; keep the converged fit with the highest log-likelihood."""
    attempts: list[dict[str, Any]] = []
    fits: list[tuple[str, Any]] = []
    for optimizer in optimizers:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = model.fit(reml=reml, method=[optimizer])
                loglik = float(result.llf)
                ok = bool(result.converged) and math.isfinite(loglik)
            except Exception as exc:  # record any optimizer failure and try the next one
                attempts.append({"optimizer": optimizer, "converged": False, "loglik": None,
                                 "warning": f"error: {exc.__class__.__name__}: {exc}"})
                continue
        text = "; ".join(dict.fromkeys(" ".join(str(w.message).split()) for w in caught)) or None
        attempts.append({"optimizer": optimizer, "converged": ok,
                         "loglik": loglik if math.isfinite(loglik) else None, "warning": text})
        if math.isfinite(loglik):
            fits.append((optimizer, result))
    if not fits:
        detail = "; ".join(f"{a['optimizer']}: {a['warning']}" for a in attempts)
        raise SitebenchError(f"mixed model could not be fitted with any optimizer ({detail})")
    converged = [(o, r) for o, r in fits if r.converged]
    pool = converged or fits
    optimizer, best = max(pool, key=lambda item: float(item[1].llf))
    return best, attempts, optimizer


def _boundary_reference(smf: Any, formula: str, data: pd.DataFrame, site: str, scanner: str | None,
                        has_vc: bool, on_boundary: list[str], reml: bool,
                        optimizers: Sequence[str]) -> dict[str, Any]:
    """Fit the model without the zero variance component(s): OLS, or one random intercept."""
    site_zero = "site" in on_boundary
    scanner_zero = "scanner" in on_boundary or not has_vc
    if site_zero and scanner_zero:
        fit = smf.ols(formula, data).fit()
        df_resid = float(fit.df_resid)
        residual = float(fit.ssr / (df_resid if reml else fit.nobs))
        se = np.asarray(fit.bse, dtype=float) * (1.0 if reml else math.sqrt(df_resid / fit.nobs))
        return {"label": "OLS", "fe": np.asarray(fit.params, dtype=float), "se": se,
                "names": list(fit.params.index), "site": 0.0, "scanner": 0.0, "residual": residual}
    if site_zero:
        groups = data[site].astype(str) + "\x00" + data[scanner].astype(str)
        label = "a random intercept per scanner (site variance 0)"
    else:
        groups = data[site]
        label = "a random intercept per site (scanner variance 0)"
    model = smf.mixedlm(formula, data, groups=groups, re_formula="1")
    fit, _, _ = _fit_best(model, reml, optimizers)
    var = float(np.asarray(fit.cov_re)[0, 0])
    with np.errstate(invalid="ignore"):
        se = np.asarray(fit.bse_fe, dtype=float)[: len(fit.fe_params)]
    return {"label": label, "fe": np.asarray(fit.fe_params, dtype=float), "se": se,
            "names": list(fit.fe_params.index),
            "site": 0.0 if site_zero else var, "scanner": var if site_zero else 0.0,
            "residual": float(fit.scale)}


def _check_boundary(model: Any, names: list[str], fe: np.ndarray, site_var: float,
                    scanner_var: float | None, scale: float, reference: dict[str, Any],
                    has_vc: bool) -> tuple[dict[str, Any], bool]:
    """Compare boundary fixed effects with the reference fit; say whether to use the reference."""
    if reference["names"] != names:
        raise SitebenchError("internal: reference model has different fixed-effect terms")
    ref_fe, ref_se = reference["fe"], reference["se"]
    unit = np.where(np.isfinite(ref_se) & (ref_se > 0), ref_se, np.maximum(np.abs(ref_fe), 1.0))
    diff = np.abs(fe - ref_fe) / unit
    max_diff = float(np.nanmax(diff)) if diff.size else 0.0
    check: dict[str, Any] = {
        "reference": reference["label"],
        "max_abs_diff_se": max_diff,
        "worst_term": names[int(np.nanargmax(diff))] if diff.size else None,
        "tolerance_se": BOUNDARY_TOLERANCE_SE,
        "agree": bool(max_diff <= BOUNDARY_TOLERANCE_SE),
        "loglik_fit": None,
        "loglik_reference": None,
        "action": "kept mixed-model estimates",
    }
    if check["agree"]:
        return check, False
    # Both candidates evaluated in the full model, same floor on zero variances.
    ll_fit = _loglike_at(model, fe, site_var, scanner_var, scale, has_vc)
    ll_ref = _loglike_at(model, ref_fe, reference["site"], reference["scanner"],
                         reference["residual"], has_vc)
    check["loglik_fit"], check["loglik_reference"] = ll_fit, ll_ref
    better = math.isfinite(ll_ref) and (not math.isfinite(ll_fit)
                                        or ll_ref >= ll_fit - 1e-6 * max(1.0, abs(ll_fit)))
    if better:
        check["action"] = "used reference estimates"
    else:
        check["action"] = "kept mixed-model estimates (higher log-likelihood than reference)"
    return check, better


def _loglike_at(model: Any, fe: np.ndarray, site_var: float, scanner_var: float | None,
                scale: float, has_vc: bool) -> float:
    """The model's (REML or ML) log-likelihood at given fixed effects and variances."""
    from statsmodels.regression.mixed_linear_model import MixedLMParams

    floor = 1e-8
    params = MixedLMParams.from_components(
        fe_params=np.asarray(fe, dtype=float),
        cov_re=np.array([[max(site_var / scale, floor)]]),
        vcomp=np.array([max((scanner_var or 0.0) / scale, floor)]) if has_vc else None,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(model.loglike(params, profile_fe=False))
    except (np.linalg.LinAlgError, ValueError, FloatingPointError):
        return float("nan")




