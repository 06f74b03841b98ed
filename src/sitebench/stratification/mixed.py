"""How much of a biomarker's variance is site and scanner: a linear mixed model.

Vendor and software upgrade are fixed effects (they are what a sponsor could act
on); site and scanner-within-site are random effects whose variances say how much
of the biomarker is scanner noise. The model is fitted by sitebench's own REML engine
(:func:`sitebench.stratification.lmm.fit_lmm`, checked against lme4 and lmerTest): this
module only chooses the terms the data can support and words the result for a report.
Fixed effects get t tests with Satterthwaite degrees of freedom (Kuznetsova et al. 2017,
lmerTest) unless ``ddf="wald"``.
"""

from __future__ import annotations

import math
import re
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
from sitebench.stratification.lmm import DEFAULT_OPTIMIZERS, ENGINE_ID, RESIDUAL, fit_lmm
from sitebench.stratification.validation import as_numeric, check_alpha

DEFAULT_FIXED: tuple[str, ...] = ("C(vendor)", SOFTWARE_UPGRADED, "age", "C(sex)", "C(group)")
FIXED_COLUMNS: tuple[str, ...] = ("term", "estimate", "se", "df", "ci_low", "ci_high", "p")
UPGRADE_COLUMNS: tuple[str, ...] = (
    "site", "n_before", "n_after", "mean_before", "mean_after", "difference",
    "se", "df", "ci_low", "ci_high", "p", "tost_ci_low", "tost_ci_high", "p_tost", "equivalent", "note",
)
#: The equivalence columns, present only when a margin was tested (older plans: none).
TOST_COLUMNS: tuple[str, ...] = ("tost_ci_low", "tost_ci_high", "p_tost", "equivalent")
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
    ddf: str = "satterthwaite"
    alpha: float = 0.05
    engine: str = ENGINE_ID
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """The fixed-effects table: term, estimate, se, df (inf = Wald z), ci_low, ci_high, p."""
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
            # Wall-clock seconds stay out: this record is locked and must re-derive byte for byte.
            "attempts": [{k: jsonable(v) for k, v in a.items() if k != "seconds"} for a in self.attempts],
            "boundary": bool(self.boundary),
            "boundary_check": jsonable(self.boundary_check),
            "n_obs": int(self.n_obs),
            "n_sites": int(self.n_sites),
            "n_scanners": jsonable(self.n_scanners),
            "n_dropped": int(self.n_dropped),
            "dropped_terms": list(self.dropped_terms),
            "notes": list(self.notes),
            "engine": self.engine,
            "ddf": self.ddf,
            "alpha": float(self.alpha),
            "diagnostics": jsonable(self.diagnostics),
        }

    def summary(self) -> str:
        """Readable report: model, fit status, fixed effects, variance components, notes."""
        pct = f"{(1.0 - self.alpha) * 100:g}%"
        lines = [
            f"Mixed model ({'REML' if self.reml else 'ML'}, {self.engine}): {self.formula}",
            f"{self.n_obs} scans, {self.n_sites} sites"
            + (f", {self.n_scanners} scanners" if self.n_scanners is not None else "")
            + (f"; {self.n_dropped} scans dropped (missing values)" if self.n_dropped else ""),
            f"optimizer {self.optimizer}, converged {self.converged}, log-likelihood "
            + (f"{self.loglik:.3f}" if self.loglik is not None else "n/a")
            + (", variance on the boundary" if self.boundary else ""),
            "CIs and p-values: " + ("t with Satterthwaite degrees of freedom" if self.ddf == "satterthwaite"
                                    else "Wald z"),
            "",
            f"{'term':<28} {'estimate':>10} {'se':>9} {'df':>8} {pct + ' CI':>23} {'p':>9}",
        ]
        for _, row in self.fixed_effects.iterrows():
            ci = (f"[{row['ci_low']:.4g}, {row['ci_high']:.4g}]"
                  if pd.notna(row["ci_low"]) else "n/a")
            p = f"{row['p']:.3g}" if pd.notna(row["p"]) else "n/a"
            se = f"{row['se']:.4g}" if pd.notna(row["se"]) else "n/a"
            df = f"{row['df']:.1f}" if pd.notna(row["df"]) and math.isfinite(row["df"]) else "inf"
            lines.append(f"{str(row['term']):<28} {row['estimate']:>10.4g} {se:>9} {df:>8} {ci:>23} {p:>9}")
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
    alpha: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    margin: float | None = None  # the equivalence margin tested (TOST columns only with one)

    @property
    def confidence(self) -> float:
        """Coverage of the intervals, ``1 - alpha`` (the old name)."""
        return 1.0 - self.alpha

    def to_frame(self) -> pd.DataFrame:
        """One row per site with scans both before and after its upgrade."""
        columns = [c for c in UPGRADE_COLUMNS if self.margin is not None or c not in TOST_COLUMNS]
        frame = pd.DataFrame(self.rows, columns=columns)
        for column in columns[3:-1]:
            if column != "equivalent":
                frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
        if "equivalent" in frame:
            frame["equivalent"] = frame["equivalent"].astype("boolean")
        return frame

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable record (plain types, NaN as None)."""
        return {
            "response": self.response,
            "site_column": self.site_column,
            "alpha": float(self.alpha),
            "confidence": float(self.confidence),
            "sites": [{k: jsonable(row[k]) for k in UPGRADE_COLUMNS} for row in self.rows],
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """Readable table of before/after means and the Welch CI of the difference."""
        pct = f"{(1.0 - self.alpha) * 100:g}%"
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
                        optimizers: Sequence[str] = DEFAULT_OPTIMIZERS,
                        ddf: str = "satterthwaite", alpha: float = 0.05) -> ScannerEffects:
    """Fit ``response ~ fixed + (1 | site) [+ (1 | site:scanner)]`` and report effects and variances.

    Fixed terms that name missing, empty or constant columns, or that are collinear
    with earlier terms, are dropped with a note. The scanner component is fitted when
    some site has more than one scanner. :func:`fit_lmm` does the fit (optimizer
    fallbacks, exact-zero boundary refits, lme4's convergence check, Satterthwaite df).
    """
    alpha = check_alpha(alpha)
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
    vc = {"scanner": scanner} if has_vc else {}
    if has_vc:
        shown += f" + (1 | {site}:{scanner})"

    fit = fit_lmm(data, formula, site, vc=vc, reml=reml, optimizers=optimizers, ddf=ddf, alpha=alpha)
    notes.extend(fit.notes)
    fixed_table = fit.to_frame()[list(FIXED_COLUMNS)]
    bad_se = ~(np.isfinite(fixed_table["se"]) & (fixed_table["se"] > 0))
    fixed_table.loc[bad_se, ["se", "ci_low", "ci_high", "p"]] = np.nan
    if bad_se.any():
        notes.append("standard error not available for: " + ", ".join(fixed_table.loc[bad_se, "term"]))

    # The fit's own components, shares and boundary flags, under the report's names (site, scanner, residual).
    fitted_name = {"site": site, "scanner": "scanner" if has_vc else None, "residual": RESIDUAL}
    components: dict[str, float | None] = {
        name: fit.variance_components[key] if key else None for name, key in fitted_name.items()}
    share: dict[str, float | None] = {
        name: fit.variance_share[key] if key else None for name, key in fitted_name.items()}
    on_boundary = [name for name in ("site", "scanner")
                   if fitted_name[name] and fit.diagnostics["near_boundary"][fitted_name[name]]]
    boundary_check: dict[str, Any] | None = None
    if on_boundary:
        exact = [name for name, key in (("site", site), ("scanner", "scanner"))
                 if fit.diagnostics["boundary"].get(key)]
        boundary_check = {"components": on_boundary, "exact_zero": exact,
                          "method": "components at ~0 refitted at exactly 0 and kept when the criterion is "
                                    "no worse (the fixed effects are then those of the model without them)",
                          "refits": fit.diagnostics["boundary_refits"]}

    diagnostics = {key: fit.diagnostics[key] for key in (
        "max_scaled_gradient", "scaled_gradient", "gradient_tol", "last_step_rel_change", "singular",
        "hessian_eigenvalues", "gradient_norm", "zero_slopes", "convergence_messages", "satterthwaite_problem")}
    return ScannerEffects(
        response=response, formula=shown, fixed_effects=fixed_table.reset_index(drop=True),
        variance_components=components, variance_share=share, loglik=float(fit.loglik), reml=bool(reml),
        converged=bool(fit.converged), optimizer=fit.optimizer, attempts=fit.attempts,
        boundary=bool(on_boundary), boundary_check=boundary_check, n_obs=n_obs, n_sites=n_sites,
        n_scanners=n_scanners, n_dropped=n_dropped, dropped_terms=dropped_terms, notes=notes,
        ddf=fit.ddf, alpha=alpha, engine=ENGINE_ID, diagnostics=diagnostics,
    )


def upgrade_effect(table: pd.DataFrame, response: str, site_column: str = SITE, alpha: float = 0.05, *,
                   confidence: float | None = None, margin: float | None = None) -> UpgradeEffect:
    """Within each site, compare scans after a software upgrade with those before (Welch).

    A within-site before/after difference is free of the between-site variation
    that dominates the mixed model, so it is the direct check of an upgrade. Welch CIs are
    ``1 - alpha``; ``confidence`` (the old name, = 1 - alpha) is still accepted.

    With an equivalence ``margin`` each site also gets Schuirmann's two one-sided Welch tests
    (TOST; Schuirmann 1987, J Pharmacokinet Biopharm 15:657): the upgrade is shown harmless
    when the ``1 - 2 alpha`` CI of the difference lies inside ±margin (``equivalent``), which
    is what re-validating a site after its upgrade asks. A non-significant Welch p is not that.
    """
    if confidence is not None:
        if not 0 < confidence < 1:
            raise SitebenchError(f"confidence must be between 0 and 1, got {confidence!r}")
        alpha = 1.0 - float(confidence)
    alpha = check_alpha(alpha)
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
    quantile = 1.0 - alpha / 2.0
    for site_name, group in sorted(frame.groupby("site"), key=lambda item: str(item[0])):
        before = group.loc[group["up"] == 0, "y"].to_numpy()
        after = group.loc[group["up"] == 1, "y"].to_numpy()
        if len(before) == 0 or len(after) == 0:
            continue
        row: dict[str, Any] = {
            "site": str(site_name), "n_before": len(before), "n_after": len(after),
            "mean_before": float(before.mean()), "mean_after": float(after.mean()),
            "difference": float(after.mean() - before.mean()),
            "se": None, "df": None, "ci_low": None, "ci_high": None, "p": None,
            "tost_ci_low": None, "tost_ci_high": None, "p_tost": None, "equivalent": None, "note": None,
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
                if margin is not None:
                    d, tost_half = row["difference"], float(stats.t.ppf(1.0 - alpha, df)) * se
                    p_tost = max(float(stats.t.sf((d + margin) / se, df)), float(stats.t.cdf((d - margin) / se, df)))
                    row.update(tost_ci_low=d - tost_half, tost_ci_high=d + tost_half, p_tost=p_tost,
                               equivalent=bool(p_tost < alpha))
        rows.append(row)
    if not rows:
        notes.append("no site has scans both before and after a software upgrade")
    return UpgradeEffect(response=response, site_column=site_column, alpha=alpha,
                         rows=rows, notes=notes, margin=margin)


# --------------------------------------------------------------------------- helpers


def _numeric_column(data: pd.DataFrame, column: str) -> np.ndarray:
    return as_numeric(data[column], f"column '{column}'")


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
