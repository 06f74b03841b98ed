"""ComBat harmonization of site/scanner effects (Johnson et al. 2007; Fortin et al. 2017, 2018).

Written from the published algorithm (the R ``sva::ComBat`` / ``neuroCombat`` steps) in numpy,
and checked against the authors' reference outputs to 1e-6 (tests/test_combat.py):

1. OLS of every feature on [batch indicators | covariates] gives B-hat; the grand mean is the
   sample-size weighted mean of the batch coefficients (or the reference batch's coefficient),
   the covariate part of the fit is ``mod_mean``.
2. Data are standardized with the pooled residual variance (reference batch's only, when given).
3. Per batch location/scale estimates gamma-hat / delta-hat, shrunk by empirical Bayes:
   parametric (normal / inverse-gamma priors, iterative ``it.sol``) or non-parametric
   (``int.eprior``: leave-one-feature-out likelihood-weighted average), or not at all.
4. The batch effects are removed and the grand mean and covariate effects put back; the
   reference batch's data are returned unchanged.

Samples are ROWS here (scikit-learn style); the reference implementations take features x samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from sitebench.errors import SitebenchError

__all__ = ["ComBat", "CombatEfficacy", "combat_efficacy", "harmonize_table", "site_variance_share"]

#: Convergence tolerance of the parametric EB iteration (the published ``conv = 0.0001``).
CONVERGENCE = 1e-4
#: Safety stop for the parametric EB iteration (the reference loops without limit).
MAX_ITERATIONS = 10_000
#: Features per block in the non-parametric prior (bounds the features x features work array).
_NONPARAMETRIC_BLOCK = 512


def _as_matrix(features: pd.DataFrame | np.ndarray, what: str = "features") -> np.ndarray:
    """Samples x features float64 matrix; NaN/inf are refused because ComBat's moments need all values."""
    try:
        x = np.asarray(features, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SitebenchError(f"{what} must be numeric ({exc})") from None
    if x.ndim != 2:
        raise SitebenchError(f"{what} must be 2-D (samples x features), got {x.ndim}-D")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise SitebenchError(f"{what} is empty ({x.shape[0]} samples x {x.shape[1]} features)")
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise SitebenchError(
            f"{what} contain {int(bad.sum())} NaN/inf value(s) (first at sample {_row_name(features, row)}, "
            f"feature {_col_name(features, col)}); ComBat needs complete data"
        )
    return x


def _col_name(features: Any, j: int) -> str:
    if isinstance(features, pd.DataFrame):
        return repr(features.columns[j])
    return str(j)


def _row_name(features: Any, i: int) -> str:
    if isinstance(features, pd.DataFrame):
        return repr(features.index[i])
    return str(i)


def _as_labels(batch: Sequence, n: int) -> np.ndarray:
    """Batch labels as a 1-D object array of length n (mismatched lengths are a user error)."""
    labels = np.asarray(list(batch.tolist() if hasattr(batch, "tolist") else batch), dtype=object)
    if labels.ndim != 1:
        raise SitebenchError(f"batch must be 1-D, got shape {labels.shape}")
    if labels.shape[0] != n:
        raise SitebenchError(f"batch has {labels.shape[0]} labels but features have {n} samples")
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in labels):
        raise SitebenchError("batch has missing labels")
    return labels


def _levels(values: np.ndarray) -> list:
    """Sorted distinct values (first-appearance order when the labels do not sort, e.g. mixed types)."""
    distinct = list(dict.fromkeys(values.tolist()))
    try:
        return sorted(distinct)
    except TypeError:
        return distinct


def _check_covariates(covariates: pd.DataFrame | None, n: int) -> None:
    if covariates is None:
        return
    if not isinstance(covariates, pd.DataFrame):
        raise SitebenchError("covariates must be a pandas DataFrame (one row per sample)")
    if len(covariates) != n:
        raise SitebenchError(f"covariates have {len(covariates)} rows but features have {n} samples")


class ComBat(TransformerMixin, BaseEstimator):
    """ComBat batch (site/scanner) harmonization as a scikit-learn transformer: samples are rows.

    Every model option is set here, so ``sklearn.base.clone`` and ``Pipeline`` work:
    ``batch`` names the batch column and ``categorical`` / ``continuous`` the covariates
    whose effects are kept, all read from the table ``X`` given to ``fit``/``transform``;
    ``features`` the columns to harmonize (default: every other column). Arrays work too,
    with ``batch=`` (labels) and ``covariates=`` (a frame) passed to ``fit``/``transform``.

    ``parametric`` picks the EB prior, ``empirical_bayes=False`` uses the raw per-batch estimates,
    ``mean_only`` removes location effects only, ``ref_batch`` keeps that batch's data unchanged
    and maps the other batches onto it. ``conv`` is the parametric EB stop tolerance: 1e-4 as in
    R/Python (sva, neuroCombat); the authors' Matlab version uses 1e-3. Fitted attributes end in ``_``.
    """

    def __init__(self, *, batch: str = "site", categorical: Sequence[str] = (), continuous: Sequence[str] = (),
                 features: Sequence[str] | None = None, parametric: bool = True, empirical_bayes: bool = True,
                 mean_only: bool = False, ref_batch: Any = None, conv: float = CONVERGENCE) -> None:
        self.batch = batch
        self.categorical = categorical
        self.continuous = continuous
        self.features = features
        self.parametric = parametric
        self.empirical_bayes = empirical_bayes
        self.mean_only = mean_only
        self.ref_batch = ref_batch
        self.conv = conv

    # ------------------------------------------------------------------ inputs
    def _inputs(self, X: pd.DataFrame | np.ndarray, batch: Sequence | None,
                covariates: pd.DataFrame | None) -> tuple[Any, Sequence, pd.DataFrame | None]:
        """(features, batch labels, covariates): from the table ``X``, or as given with ``batch=``."""
        named = [*self.categorical, *self.continuous]
        if batch is not None:
            features = X[list(self.features)] if self.features is not None and isinstance(X, pd.DataFrame) else X
            return features, batch, covariates
        if not isinstance(X, pd.DataFrame):
            raise SitebenchError("ComBat on an array needs the batch labels: fit(X, batch=...)")
        if covariates is not None:
            raise SitebenchError("covariates= goes with batch=; otherwise ComBat reads them from the table")
        missing = [c for c in [self.batch, *named, *(self.features or ())] if c not in X.columns]
        if missing:
            raise SitebenchError(f"no column(s) {', '.join(map(str, missing))} "
                                 f"(have: {', '.join(map(str, X.columns))})")
        features = (X[list(self.features)] if self.features is not None
                    else X.drop(columns=[self.batch, *named]))
        return features, X[self.batch], (X[named] if named else None)

    # ------------------------------------------------------------------ design
    def _covariate_design(self, covariates: pd.DataFrame, n: int) -> np.ndarray:
        """Covariate columns of the design: one-hot (first level dropped) categoricals, then continuous."""
        blocks: list[np.ndarray] = []
        for name in self.categorical_:
            if name not in covariates.columns:
                raise SitebenchError(f"covariates lack the categorical column {name!r} used in fit")
            values = covariates[name].to_numpy(dtype=object)
            if pd.isna(covariates[name]).any():
                raise SitebenchError(f"categorical covariate {name!r} has missing values")
            levels = self.categorical_levels_[name]
            index = {level: k for k, level in enumerate(levels)}
            unknown = [v for v in dict.fromkeys(values.tolist()) if v not in index]
            if unknown:
                raise SitebenchError(f"categorical covariate {name!r} has level {unknown[0]!r} not seen in fit")
            codes = np.array([index[v] for v in values], dtype=np.intp)
            onehot = np.zeros((n, len(levels)))
            onehot[np.arange(n), codes] = 1.0
            blocks.append(onehot[:, 1:])
        for name in self.continuous_:
            if name not in covariates.columns:
                raise SitebenchError(f"covariates lack the continuous column {name!r} used in fit")
            try:
                values = covariates[name].to_numpy(dtype=np.float64)
            except (TypeError, ValueError):
                raise SitebenchError(f"continuous covariate {name!r} is not numeric") from None
            if not np.isfinite(values).all():
                raise SitebenchError(f"continuous covariate {name!r} has NaN/inf values")
            blocks.append(values.reshape(n, 1))
        return np.hstack(blocks) if blocks else np.zeros((n, 0))

    def _batch_codes(self, labels: np.ndarray) -> np.ndarray:
        index = {level: k for k, level in enumerate(self.batches_.tolist())}
        codes = np.empty(labels.shape[0], dtype=np.intp)
        for i, label in enumerate(labels.tolist()):
            k = index.get(label)
            if k is None:
                raise SitebenchError(f"unseen batch {label!r}: ComBat can only harmonize batches it was fitted on")
            codes[i] = k
        return codes

    # ------------------------------------------------------------------ fit
    def fit(self, X: pd.DataFrame | np.ndarray, y: Any = None, *, batch: Sequence | None = None,
            covariates: pd.DataFrame | None = None) -> "ComBat":
        """Estimate grand mean, pooled variance, covariate effects and EB batch effects.

        ``y`` is ignored (it is there so that ``Pipeline`` can pass it). With ``covariates=``
        but no ``categorical``/``continuous`` names, every covariate column is used: numeric
        columns as continuous, the others as categorical.
        """
        self._fit(*self._inputs(X, batch, covariates))
        return self

    def fit_transform(self, X: pd.DataFrame | np.ndarray, y: Any = None, *, batch: Sequence | None = None,
                      covariates: pd.DataFrame | None = None) -> np.ndarray | pd.DataFrame:
        """Fit and harmonize the same samples (the covariate effects of these samples are kept)."""
        features, labels, covariates = self._inputs(X, batch, covariates)
        return self._wrap(features, self._fit(features, labels, covariates))

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """The harmonized columns, as scikit-learn's ``set_output`` and ``Pipeline`` ask."""
        check_is_fitted(self, "gamma_star_")
        names = getattr(self, "feature_names_in_", None)
        return np.asarray(names if names is not None else [f"x{j}" for j in range(self.n_features_in_)],
                          dtype=object)

    def _fit(self, features: Any, batch: Sequence, covariates: pd.DataFrame | None) -> np.ndarray:
        x = _as_matrix(features)
        n, p = x.shape
        labels = _as_labels(batch, n)
        _check_covariates(covariates, n)

        spread = x.max(axis=0) - x.min(axis=0)
        flat = np.flatnonzero(spread == 0)
        if flat.size:
            raise SitebenchError(
                f"feature {_col_name(features, int(flat[0]))} has zero variance over all samples"
                + (f" ({flat.size} such features)" if flat.size > 1 else "")
                + "; drop constant features before ComBat"
            )

        levels = _levels(labels)
        self.batches_ = np.array(levels, dtype=object)
        codes = self._batch_codes(labels)
        counts = np.bincount(codes, minlength=len(levels))
        for level, count in zip(levels, counts):
            if count < 2:
                raise SitebenchError(f"batch {level!r} has {count} sample; ComBat needs at least 2 per batch")
        n_batch = len(levels)
        if self.ref_batch is not None:
            if self.ref_batch not in levels:
                raise SitebenchError(f"ref_batch {self.ref_batch!r} is not among the batches {levels}")
            ref = levels.index(self.ref_batch)
        else:
            ref = None
        self.ref_index_ = ref

        # covariates
        categorical, continuous = list(self.categorical), list(self.continuous)
        if covariates is not None and not categorical and not continuous:
            for name in covariates.columns:
                numeric = pd.api.types.is_numeric_dtype(covariates[name]) and not pd.api.types.is_bool_dtype(
                    covariates[name])
                (continuous if numeric else categorical).append(name)
        if (categorical or continuous) and covariates is None:
            raise SitebenchError("categorical/continuous covariates named but no covariates table given")
        self.categorical_ = tuple(categorical)
        self.continuous_ = tuple(continuous)
        self.categorical_levels_ = {}
        for name in self.categorical_:
            if name not in covariates.columns:
                raise SitebenchError(f"covariates lack the categorical column {name!r}")
            if pd.isna(covariates[name]).any():
                raise SitebenchError(f"categorical covariate {name!r} has missing values")
            self.categorical_levels_[name] = _levels(covariates[name].to_numpy(dtype=object))
        cov_design = (self._covariate_design(covariates, n) if covariates is not None
                      else np.zeros((n, 0)))
        self.covariate_columns_ = tuple(
            [f"{c}[{lvl!r}]" for c in self.categorical_ for lvl in self.categorical_levels_[c][1:]]
            + list(self.continuous_))

        batch_design = np.zeros((n, n_batch))
        batch_design[np.arange(n), codes] = 1.0
        if ref is not None:
            batch_design[:, ref] = 1.0  # ref column is the intercept: other batches become contrasts to it
        design = np.hstack([batch_design, cov_design])
        if np.linalg.matrix_rank(design) < design.shape[1]:
            raise SitebenchError("design matrix is singular: a covariate is constant or confounded with batch")

        # 1. OLS for all features at once
        b_hat = np.linalg.solve(design.T @ design, design.T @ x)  # (n_batch + k) x p
        if ref is not None:
            grand_mean = b_hat[ref]
        else:
            grand_mean = (counts / n) @ b_hat[:n_batch]
        beta = b_hat[n_batch:]
        mod_mean = cov_design @ beta  # n x p

        # 2. pooled variance (reference batch's only with a ref batch)
        resid = x - design @ b_hat
        if ref is not None:
            var_pooled = np.mean(resid[codes == ref] ** 2, axis=0)
        else:
            var_pooled = np.mean(resid ** 2, axis=0)
        zero = var_pooled == 0
        if zero.any():
            var_pooled[zero] = np.median(var_pooled[~zero]) if (~zero).any() else 1.0
        sd = np.sqrt(var_pooled)
        s_data = x - grand_mean
        s_data -= mod_mean
        s_data /= sd

        # 3. L/S estimates and priors
        gamma_hat = np.linalg.solve(batch_design.T @ batch_design, batch_design.T @ s_data)  # n_batch x p
        delta_hat = np.ones((n_batch, p))
        if not self.mean_only:
            for k in range(n_batch):
                delta_hat[k] = np.var(s_data[codes == k], axis=0, ddof=1)
        delta_hat[delta_hat == 0] = 1.0

        if not self.empirical_bayes:
            gamma_star, delta_star = gamma_hat.copy(), delta_hat.copy()
        elif self.parametric:
            gamma_star, delta_star = _parametric_eb(s_data, codes, gamma_hat, delta_hat, self.mean_only,
                                                    self.conv)
        else:
            gamma_star, delta_star = _nonparametric_eb(s_data, codes, gamma_hat, delta_hat)
        if ref is not None:
            gamma_star[ref] = 0.0
            delta_star[ref] = 1.0

        self.n_features_in_ = p
        if isinstance(features, pd.DataFrame):
            self.feature_names_in_ = np.asarray(features.columns, dtype=object)
        self.grand_mean_ = grand_mean
        self.var_pooled_ = var_pooled
        self.beta_ = beta
        self.mod_mean_training_ = mod_mean.mean(axis=0)
        self.gamma_hat_ = gamma_hat
        self.delta_hat_ = delta_hat
        self.gamma_star_ = gamma_star
        self.delta_star_ = delta_star

        # 4. adjust the training samples
        out = self._adjust(s_data, codes, grand_mean + mod_mean)
        if ref is not None:
            out[codes == ref] = x[codes == ref]
        return out

    # ------------------------------------------------------------------ transform
    def _adjust(self, s_data: np.ndarray, codes: np.ndarray, mean: np.ndarray) -> np.ndarray:
        """Remove the batch location/scale from standardized data and go back to the original scale."""
        adjusted = s_data - self.gamma_star_[codes]
        adjusted /= np.sqrt(self.delta_star_)[codes]
        adjusted *= np.sqrt(self.var_pooled_)
        adjusted += mean
        return adjusted

    def transform(self, X: pd.DataFrame | np.ndarray, *, batch: Sequence | None = None,
                  covariates: pd.DataFrame | None = None) -> np.ndarray | pd.DataFrame:
        """Apply the fitted estimates to (possibly new) samples of batches seen in fit.

        Without ``covariates`` the covariate effects are taken as their training average (as the
        authors' ``neuroCombatFromTraining`` does); with them, each sample's own effects are used.
        Samples of the reference batch come back unchanged.
        """
        if not hasattr(self, "gamma_star_"):
            raise SitebenchError("ComBat is not fitted yet: call fit() first")
        features, batch, covariates = self._inputs(X, batch, covariates)
        x = _as_matrix(features)
        n, p = x.shape
        if p != self.n_features_in_:
            raise SitebenchError(f"features have {p} columns but ComBat was fitted on {self.n_features_in_}")
        labels = _as_labels(batch, n)
        _check_covariates(covariates, n)
        codes = self._batch_codes(labels)
        if covariates is None or self.beta_.shape[0] == 0:
            mean = np.broadcast_to(self.grand_mean_ + self.mod_mean_training_, (n, p))
        else:
            mean = self.grand_mean_ + self._covariate_design(covariates, n) @ self.beta_
        s_data = (x - mean) / np.sqrt(self.var_pooled_)
        out = self._adjust(s_data, codes, mean)
        if self.ref_index_ is not None:
            keep = codes == self.ref_index_
            out[keep] = x[keep]
        return self._wrap(features, out)

    @staticmethod
    def _wrap(features: Any, out: np.ndarray) -> np.ndarray | pd.DataFrame:
        if isinstance(features, pd.DataFrame):
            return pd.DataFrame(out, index=features.index, columns=features.columns)
        return out


# ---------------------------------------------------------------------- empirical Bayes
def _priors(delta_hat: np.ndarray) -> tuple[float, float]:
    """Inverse-gamma hyper-parameters (a, b) by the method of moments over features."""
    m = delta_hat.mean()
    s2 = delta_hat.var(ddof=1)
    return (2 * s2 + m ** 2) / s2, (m * s2 + m ** 3) / s2


def _parametric_eb(s_data: np.ndarray, codes: np.ndarray, gamma_hat: np.ndarray, delta_hat: np.ndarray,
                   mean_only: bool, conv: float = CONVERGENCE) -> tuple[np.ndarray, np.ndarray]:
    """Parametric EB (``it.sol``), vectorized over features; one stop test per batch as published."""
    n_batch, p = gamma_hat.shape
    gamma_star = np.empty_like(gamma_hat)
    delta_star = np.ones_like(delta_hat)
    gamma_bar = gamma_hat.mean(axis=1)
    t2 = gamma_hat.var(axis=1, ddof=1)
    for k in range(n_batch):
        g_hat, g_bar, tau2 = gamma_hat[k], gamma_bar[k], t2[k]
        if mean_only:
            gamma_star[k] = (tau2 * g_hat + g_bar) / (tau2 + 1.0)  # postmean with n = 1, d* = 1
            continue
        a, b = _priors(delta_hat[k])
        sdat = s_data[codes == k]
        n = sdat.shape[0]
        centre = sdat.mean(axis=0)
        ss = ((sdat - centre) ** 2).sum(axis=0)  # sum((x - g)^2) = ss + n (mean - g)^2
        g_old, d_old = g_hat, delta_hat[k]
        for _ in range(MAX_ITERATIONS):
            g_new = (tau2 * n * g_hat + d_old * g_bar) / (tau2 * n + d_old)
            sum2 = ss + n * (centre - g_new) ** 2
            d_new = (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)
            with np.errstate(divide="ignore", invalid="ignore"):
                change = max(np.max(np.abs(g_new - g_old) / g_old), np.max(np.abs(d_new - d_old) / d_old))
            g_old, d_old = g_new, d_new
            if not change > conv:
                break
        gamma_star[k], delta_star[k] = g_old, d_old
    return gamma_star, delta_star


def _nonparametric_eb(s_data: np.ndarray, codes: np.ndarray, gamma_hat: np.ndarray,
                      delta_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-parametric EB (``int.eprior``): each feature's estimates are the other features'
    estimates weighted by the likelihood of its data under them (in log space, so it cannot underflow)."""
    n_batch, p = gamma_hat.shape
    gamma_star = np.empty_like(gamma_hat)
    delta_star = np.empty_like(delta_hat)
    for k in range(n_batch):
        sdat = s_data[codes == k]
        n = sdat.shape[0]
        g, d = gamma_hat[k], delta_hat[k]
        centre = sdat.mean(axis=0)
        ss = ((sdat - centre) ** 2).sum(axis=0)
        log_norm = -0.5 * n * np.log(2 * np.pi * d)  # per candidate feature j
        for start in range(0, p, _NONPARAMETRIC_BLOCK):
            rows = slice(start, min(start + _NONPARAMETRIC_BLOCK, p))
            # sum2[i, j] = sum_s (x_si - g_j)^2 for feature i in this block, candidate j
            sum2 = ss[rows, None] + n * (centre[rows, None] - g[None, :]) ** 2
            loglik = log_norm[None, :] - sum2 / (2 * d[None, :])
            idx = np.arange(rows.start, rows.stop)
            loglik[idx - rows.start, idx] = -np.inf  # leave the feature itself out
            loglik -= loglik.max(axis=1, keepdims=True)
            w = np.exp(loglik)
            total = w.sum(axis=1)
            gamma_star[k, rows] = (w @ g) / total
            delta_star[k, rows] = (w @ d) / total
    return gamma_star, delta_star


# ---------------------------------------------------------------------- efficacy
def site_variance_share(features: pd.DataFrame | np.ndarray, batch: Sequence) -> np.ndarray:
    """Per-feature share of variance explained by batch (one-way ANOVA R^2), to show what ComBat removed.

    0 means no site effect on the means; NaN for a feature with no variance at all.
    """
    x = _as_matrix(features)
    labels = _as_labels(batch, x.shape[0])
    levels = _levels(labels)
    index = {level: k for k, level in enumerate(levels)}
    codes = np.array([index[v] for v in labels.tolist()], dtype=np.intp)
    counts = np.bincount(codes, minlength=len(levels)).astype(np.float64)
    sums = np.zeros((len(levels), x.shape[1]))
    np.add.at(sums, codes, x)
    grand = x.mean(axis=0)
    between = (counts[:, None] * (sums / counts[:, None] - grand) ** 2).sum(axis=0)
    total = ((x - grand) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, between / total, np.nan)


EFFICACY_COLUMNS = ("feature", "site_share_before", "site_share_after", "term", "estimate_before", "ci_low_before",
                    "ci_high_before", "estimate_after", "preserved")


@dataclass
class CombatEfficacy:
    """Did harmonization remove site effects and keep the covariate effects? One row per feature and term."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    confidence: float = 0.95

    @property
    def all_preserved(self) -> bool:
        return all(r["preserved"] for r in self.rows)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=list(EFFICACY_COLUMNS))

    def to_dict(self) -> dict[str, Any]:
        frame = self.to_frame()
        shares = frame.drop_duplicates("feature")
        return {"median_site_share_before": float(shares["site_share_before"].median()),
                "median_site_share_after": float(shares["site_share_after"].median()),
                "all_covariate_effects_preserved": self.all_preserved, "confidence": self.confidence,
                "rows": [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in self.rows]}

    def summary(self) -> str:
        d = self.to_dict()
        lost = [f"{r['feature']}:{r['term']}" for r in self.rows if not r["preserved"]]
        return "\n".join([
            f"ComBat efficacy: median share of variance explained by site {d['median_site_share_before']:.3f} "
            f"before, {d['median_site_share_after']:.4f} after",
            f"covariate effects preserved (after estimate inside the before {100 * self.confidence:g}% CI): "
            + ("all" if not lost else f"NOT for {', '.join(lost[:10])}" + (" ..." if len(lost) > 10 else "")),
        ])


def combat_efficacy(before: pd.DataFrame, after: pd.DataFrame, batch: Sequence,
                    covariates: pd.DataFrame | None = None, confidence: float = 0.95) -> CombatEfficacy:
    """Site share of variance per feature before/after, and each covariate's OLS effect before/after.

    A covariate effect counts as preserved when the harmonized estimate lies inside the
    original estimate's CI (feature ~ covariates, site left out, as a reader would fit it).
    """
    import statsmodels.api as sm

    share_before = site_variance_share(before, batch)
    share_after = site_variance_share(after, batch)
    features = list(before.columns) if isinstance(before, pd.DataFrame) else [str(i) for i in range(before.shape[1])]
    result = CombatEfficacy(confidence=confidence)
    design = None
    if covariates is not None and covariates.shape[1]:
        design = sm.add_constant(pd.get_dummies(covariates, drop_first=True, dtype=float), has_constant="add")
    for j, feature in enumerate(features):
        base = {"feature": feature, "site_share_before": float(share_before[j]),
                "site_share_after": float(share_after[j])}
        if design is None:
            result.rows.append({**base, "term": None, "estimate_before": None, "ci_low_before": None,
                                "ci_high_before": None, "estimate_after": None, "preserved": True})
            continue
        y_before = np.asarray(before.iloc[:, j] if isinstance(before, pd.DataFrame) else before[:, j], float)
        y_after = np.asarray(after.iloc[:, j] if isinstance(after, pd.DataFrame) else after[:, j], float)
        fit_before = sm.OLS(y_before, design).fit()
        fit_after = sm.OLS(y_after, design).fit()
        ci = fit_before.conf_int(1 - confidence)
        for term in design.columns[1:]:
            low, high = float(ci.loc[term, 0]), float(ci.loc[term, 1])
            estimate_after = float(fit_after.params[term])
            result.rows.append({**base, "term": term, "estimate_before": float(fit_before.params[term]),
                                "ci_low_before": low, "ci_high_before": high, "estimate_after": estimate_after,
                                "preserved": low <= estimate_after <= high})
    return result


def harmonize_table(table: pd.DataFrame, model: ComBat) -> tuple[pd.DataFrame, CombatEfficacy]:
    """Harmonize ``model.features`` of a one-row-per-scan table; the same rows come back, and the efficacy.

    What ``sitebench stats combat`` does: batch labels are read as text (so ``ref_batch="1"``
    names site 1 whether the column holds numbers or not), feature values that are not numbers
    become NaN (and ComBat names the first), covariates are ``model.categorical`` and
    ``model.continuous``. The efficacy says whether site effects went and covariate effects stayed.
    """
    if not model.features:
        raise SitebenchError("name the feature columns to harmonize (ComBat(features=[...]))")
    named = [*model.categorical, *model.continuous]
    missing = [c for c in [model.batch, *model.features, *named] if c not in table.columns]
    if missing:
        raise SitebenchError(f"no column(s) {', '.join(map(str, missing))} "
                             f"(have: {', '.join(map(str, table.columns))})")
    features = table[list(model.features)].apply(pd.to_numeric, errors="coerce")
    batch = table[model.batch].astype(str).tolist()
    covariates = table[named] if named else None
    out = table.copy()
    out[list(model.features)] = model.fit_transform(features, batch=batch, covariates=covariates)
    return out, combat_efficacy(features, out[list(model.features)], batch, covariates)
