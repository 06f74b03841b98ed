"""Segmentation overlap of each model with the reference segmentation, per label and stratum.

The runner scores every (scan, model, biomarker, label): Dice, the 95th-percentile Hausdorff
distance (HD95, mm) and the volume error (model - reference, ml). :func:`overlap_table` joins
those scores to the manifest's strata; :func:`overlap_by_stratum` summarises them overall and
per site / vendor / software version:

* ``dice_mean`` with a percentile bootstrap CI. Replicates resample *within site* (by subject
  within site when subjects repeat) with Rao & Wu's rescaling, exactly the scheme of the
  agreement metrics (:func:`sitebench.stratification.metrics._bootstrap_counts`), so the site
  mix is held fixed and repeat scans of one person are not counted as independent evidence.
  Seeded: the same table, ``n_boot`` and ``seed`` give the same CI.
* ``hd95_median_mm`` and ``hd95_p90_mm`` (linear-interpolated quantiles of the finite values),
* ``volume_error_mean_ml`` and ``volume_error_sd_ml`` (SD with n - 1).

A Dice that is undefined (both masks empty) is left out of the Dice summary and counted in
``n_dice_excluded``; an HD95 that is undefined (either mask empty) is left out of the HD95
summary. A level with no value for a quantity gives NaN for it, never a crash.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
import pandas as pd

from sitebench.datasets import manifest as mf
from sitebench.errors import SitebenchError
from sitebench.stratification.metrics import _bootstrap_counts, _clusters

__all__ = ["OVERLAP_BY_STRATUM_COLUMNS", "canonical_overlap", "overlap_by_stratum", "overlap_table"]

MODEL_KEY = "model_key"
BIOMARKER = "biomarker"
LABEL = "label"
LABEL_NAME = "label_name"
DICE = "dice"
HD95 = "hd95_mm"
VOLUME = "volume_ml"
REFERENCE_VOLUME = "reference_volume_ml"
VOLUME_ERROR = "volume_error_ml"
OVERALL = "overall"
OVERALL_LEVEL = "all"
#: The manifest columns joined to the scores (those present): the strata and the resampling units.
STRATA_COLUMNS = (mf.SITE, mf.SCANNER_ID, mf.VENDOR, mf.SCANNER_MODEL, mf.SOFTWARE_VERSION, mf.SOFTWARE_UPGRADED)
#: Columns of the joined per-scan overlap table, in this order (those present).
OVERLAP_COLUMNS = (mf.SCAN_ID, mf.SUBJECT_ID, MODEL_KEY, BIOMARKER, LABEL, LABEL_NAME, *STRATA_COLUMNS,
                   DICE, HD95, VOLUME, REFERENCE_VOLUME, VOLUME_ERROR)
_TEXT = (mf.SCAN_ID, mf.SUBJECT_ID, MODEL_KEY, BIOMARKER, LABEL, LABEL_NAME, mf.SITE, mf.SCANNER_ID, mf.VENDOR,
         mf.SCANNER_MODEL, mf.SOFTWARE_VERSION)
_REQUIRED = (mf.SCAN_ID, MODEL_KEY, BIOMARKER, LABEL, DICE)
#: Columns of :func:`overlap_by_stratum`.
OVERLAP_BY_STRATUM_COLUMNS = (BIOMARKER, MODEL_KEY, LABEL, LABEL_NAME, "stratum", "level", "n_scans",
                              "n_dice_excluded", "dice_mean", "dice_ci_low", "dice_ci_high", "hd95_median_mm",
                              "hd95_p90_mm", "volume_error_mean_ml", "volume_error_sd_ml")


def _check(scores: pd.DataFrame) -> None:
    if not isinstance(scores, pd.DataFrame):
        raise SitebenchError(f"the overlap scores must be a table, got {type(scores).__name__}")
    absent = [c for c in _REQUIRED if c not in scores]
    if absent:
        raise SitebenchError(f"the overlap scores have no column(s) {', '.join(absent)} "
                             f"(have: {', '.join(map(str, scores.columns))})")


def canonical_overlap(scores: pd.DataFrame) -> pd.DataFrame:
    """The joined overlap table in its kept columns, sorted, as it reads back from its CSV.

    Sorted by biomarker (in order of first appearance: the runner writes plan order), model,
    label and scan.
    """
    _check(scores)
    keep = [c for c in OVERLAP_COLUMNS if c in scores]
    order = {name: i for i, name in enumerate(dict.fromkeys(scores[BIOMARKER].astype(str)))}
    data = scores.assign(_order=scores[BIOMARKER].astype(str).map(order), _label=scores[LABEL].astype(str))
    data = data.sort_values(["_order", MODEL_KEY, "_label", mf.SCAN_ID], kind="stable")[keep]
    buffer = io.StringIO()
    data.to_csv(buffer, index=False)
    buffer.seek(0)
    return pd.read_csv(buffer, dtype={c: str for c in _TEXT if c in keep}, keep_default_na=False, na_values=[""],
                       float_precision="round_trip")


def overlap_table(scores: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """The runner's per-scan, per-label overlap scores joined to the manifest strata, in canonical form.

    Joins subject, site, scanner, vendor, scanner model, software version and
    ``software_upgraded`` (:func:`sitebench.datasets.manifest.add_software_upgraded`).
    """
    _check(scores)
    if mf.SCAN_ID not in manifest:
        raise SitebenchError(f"the manifest has no '{mf.SCAN_ID}' column")
    joined = [c for c in (mf.SUBJECT_ID, *STRATA_COLUMNS) if c != mf.SOFTWARE_UPGRADED and c in manifest]
    per_scan = manifest
    if mf.SOFTWARE_VERSION in manifest and mf.ACQUISITION_DATE in manifest \
            and (mf.SCANNER_ID in manifest or mf.SITE in manifest):
        per_scan = mf.add_software_upgraded(manifest)
        joined.append(mf.SOFTWARE_UPGRADED)
    per_scan = per_scan[[mf.SCAN_ID, *joined]].drop_duplicates(mf.SCAN_ID)
    data = scores.drop(columns=[c for c in joined if c in scores]).merge(per_scan, on=mf.SCAN_ID, how="left")
    unknown = data[mf.SITE].isna() if mf.SITE in data else pd.Series(False, index=data.index)
    if unknown.any():
        raise SitebenchError(f"{int(unknown.sum())} overlap score row(s) name a scan that is not in the manifest, "
                             f"e.g. {data.loc[unknown, mf.SCAN_ID].iloc[0]!r}")
    return canonical_overlap(data)


def _finite(values: pd.Series) -> np.ndarray:
    array = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    return array[np.isfinite(array)]


def _dice_interval(dice: np.ndarray, idx: np.ndarray, counts: np.ndarray | None, alpha: float,
                   units: np.ndarray) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean Dice of the scans ``idx`` (NaN when it cannot be estimated)."""
    if counts is None or len(idx) == 0 or np.unique(units[idx]).size < 2:
        return np.nan, np.nan
    weights = counts[:, idx]
    total = weights.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        replicates = (weights @ dice[idx]) / total
    replicates = replicates[np.isfinite(replicates)]
    if replicates.size == 0:
        return np.nan, np.nan
    low, high = np.quantile(replicates, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def overlap_by_stratum(table: pd.DataFrame, strata: Sequence[str] = mf.DEFAULT_STRATA, n_boot: int = 1000,
                       seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """Dice (mean, bootstrap CI), HD95 (median, 90th percentile) and volume error per label and stratum.

    ``table`` is the joined per-scan overlap table (:func:`overlap_table`). One row per
    (biomarker, model, label) and level: ``overall``/``all`` first, then each level of each
    stratum column present, sorted. ``n_scans`` counts the level's scans,
    ``n_dice_excluded`` those whose Dice is undefined (both masks empty; not in the Dice mean).
    The Dice CI is the percentile interval at ``alpha`` of ``n_boot`` replicates seeded with
    ``seed``, resampled within site as the agreement metrics are (see the module docstring).
    """
    _check(table)
    if isinstance(strata, str):
        strata = (strata,)
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise SitebenchError(f"n_boot must be a non-negative integer, got {n_boot!r}")
    if not 0 < alpha < 1:
        raise SitebenchError(f"alpha must be between 0 and 1, got {alpha!r}")
    used = [s for s in strata if s in table]
    rows: list[dict[str, Any]] = []
    groups = table.groupby([BIOMARKER, MODEL_KEY, LABEL], sort=False, dropna=False)
    for (biomarker, key, label), group in groups:
        group = group.reset_index(drop=True)
        name = group[LABEL_NAME].dropna().iloc[0] if LABEL_NAME in group and group[LABEL_NAME].notna().any() \
            else ""
        dice_all = pd.to_numeric(group[DICE], errors="coerce").to_numpy(dtype=float)
        valid = np.isfinite(dice_all)
        scored = group.loc[valid].reset_index(drop=True)
        dice = dice_all[valid]
        sites = (scored[mf.SITE].astype(object).where(scored[mf.SITE].notna(), "<missing>").astype(str)
                 if mf.SITE in scored else pd.Series(["<all>"] * len(scored), dtype=object))
        site_codes = pd.factorize(sites, sort=True)[0]
        units, _ = _clusters(sites, scored[mf.SUBJECT_ID] if mf.SUBJECT_ID in scored else None)
        counts = _bootstrap_counts(site_codes, units, int(n_boot), seed) if n_boot > 0 and len(scored) else None
        levels: list[tuple[str, str, np.ndarray, np.ndarray]] = [
            (OVERALL, OVERALL_LEVEL, np.ones(len(group), dtype=bool), np.arange(len(scored)))]
        for stratum in used:
            values = group[stratum]
            present = values.notna().to_numpy()
            text = values.astype(object).where(values.notna(), "").astype(str)
            scored_text = text[valid].reset_index(drop=True)
            for level in sorted(set(text[present])):
                mask = present & (text == level).to_numpy()
                idx = np.flatnonzero(present[valid] & (scored_text == level).to_numpy())
                levels.append((stratum, level, mask, idx))
        for stratum, level, mask, idx in levels:
            part = group.loc[mask]
            hd95 = _finite(part[HD95]) if HD95 in part else np.array([])
            error = _finite(part[VOLUME_ERROR]) if VOLUME_ERROR in part else np.array([])
            low, high = _dice_interval(dice, idx, counts, alpha, units)
            rows.append({
                BIOMARKER: biomarker, MODEL_KEY: key, LABEL: label, LABEL_NAME: name, "stratum": stratum,
                "level": level, "n_scans": int(mask.sum()), "n_dice_excluded": int(mask.sum() - len(idx)),
                "dice_mean": float(dice[idx].mean()) if len(idx) else np.nan, "dice_ci_low": low,
                "dice_ci_high": high,
                "hd95_median_mm": float(np.median(hd95)) if hd95.size else np.nan,
                "hd95_p90_mm": float(np.quantile(hd95, 0.9)) if hd95.size else np.nan,
                "volume_error_mean_ml": float(error.mean()) if error.size else np.nan,
                "volume_error_sd_ml": float(error.std(ddof=1)) if error.size >= 2 else np.nan,
            })
    frame = pd.DataFrame(rows, columns=list(OVERLAP_BY_STRATUM_COLUMNS))
    for column in OVERLAP_BY_STRATUM_COLUMNS[8:]:
        frame[column] = frame[column].astype(float)
    for column in ("n_scans", "n_dice_excluded"):
        frame[column] = frame[column].astype(int)
    return frame
