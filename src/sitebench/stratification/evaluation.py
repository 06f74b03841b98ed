"""Every result a validation report shows, derived from one per-scan evaluation table.

The report and ``sitebench report verify --recompute`` both call :func:`evaluate_models`
on the same table read back from CSV, with the same :class:`AnalysisPlan`, so an auditor
re-deriving the results gets the locked tables byte for byte.

The evaluation table has one row per (scan, model version): the manifest columns the
analyses need, the reference value, the prediction and the error (prediction - reference).

A plan that declares several biomarkers (``AnalysisPlan.biomarkers``, the entries of
:meth:`sitebench.models.biomarkers.BiomarkerSpec.plan_entry`) gives a table with one row per
(scan, model version, biomarker) and a ``biomarker`` column; every statistic then follows the
biomarker's kind: a continuous biomarker gets exactly the single-biomarker analyses on its own
rows, a classification biomarker (a class probability) gets AUC, sensitivity/specificity and
calibration per stratum and the paired DeLong test between compared versions, and the
per-label segmentation overlap scores are summarised per stratum
(:mod:`sitebench.stratification.overlap`). A table without a ``biomarker`` column is analysed,
and written, exactly as before biomarkers were declared, so reports locked then still recompute.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sitebench.datasets import manifest as mf
from sitebench.errors import SitebenchError
from sitebench.provenance import jsonable
from sitebench.stratification.combat import ComBat, combat_efficacy
from sitebench.stratification.equivalence import site_equivalence
from sitebench.stratification.lmm import ENGINE_ID
from sitebench.stratification.metrics import stratum_metrics
from sitebench.stratification.mixed import fit_scanner_effects, upgrade_effect

MODEL_KEY = "model_key"
BIOMARKER = "biomarker"
REFERENCE = "reference"
PREDICTION = "prediction"
ERROR = "error"
ABS_ERROR = "abs_error"
#: The reference itself, fitted like a model: the covariate effects a faithful biomarker reproduces.
REFERENCE_KEY = "reference"

#: Columns kept in the locked evaluation table, in this order (those present).
EVALUATION_COLUMNS = (mf.SCAN_ID, mf.SUBJECT_ID, MODEL_KEY, BIOMARKER, mf.SITE, mf.SCANNER_ID, mf.VENDOR,
                      mf.SCANNER_MODEL,
                      mf.SOFTWARE_VERSION, mf.ACQUISITION_DATE, mf.SOFTWARE_UPGRADED, mf.AGE, mf.SEX, mf.GROUP,
                      REFERENCE, PREDICTION, ERROR, "dice")
_TEXT = (mf.SCAN_ID, mf.SUBJECT_ID, MODEL_KEY, BIOMARKER, mf.SITE, mf.SCANNER_ID, mf.VENDOR,
         mf.SCANNER_MODEL,
         mf.SOFTWARE_VERSION, mf.ACQUISITION_DATE, mf.SEX, mf.GROUP)
#: The engine named by plans locked before AnalysisPlan recorded one.
LEGACY_MIXED_MODEL_ENGINE = "statsmodels.MixedLM"
#: Covariates adjusted for in harmonization (those present).
COVARIATES = (mf.AGE, mf.SEX, mf.GROUP)
#: ``analysis`` of a plan biomarker entry.
CONTINUOUS = "continuous"
CLASSIFICATION = "classification"


@dataclass
class Endpoint:
    """A binary clinical endpoint the biomarker should discriminate (for AUC and paired DeLong)."""

    column: str
    positive: str
    higher_is_positive: bool = True


@dataclass
class AnalysisPlan:
    """The pre-specified analysis: what a reader must know to re-derive every number."""

    strata: list[str] = field(default_factory=lambda: list(mf.DEFAULT_STRATA))
    bootstrap: int = 1000
    seed: int = 0
    equivalence_margin: float | None = None
    compare: list[list[str]] = field(default_factory=list)
    comparison_margin: float | None = None
    endpoint: Endpoint | None = None
    alpha: float = 0.05
    #: The mixed-model engine and version of its numbers (plans written before it existed: statsmodels).
    mixed_model_engine: str = ENGINE_ID
    #: Denominator df of the mixed-model fixed-effect tests: "satterthwaite" or "wald" (z).
    df_method: str = "satterthwaite"
    #: The declared biomarkers, in spec order (``BiomarkerSpec.plan_entry()`` dicts); empty for a
    #: single-biomarker plan. ``equivalence_margin``, ``comparison_margin`` and ``endpoint`` above are
    #: the primary (first continuous) biomarker's; an entry's own ``equivalence_margin`` wins for it.
    biomarkers: list[dict[str, Any]] = field(default_factory=list)
    #: Test each site's software upgrade for equivalence within ``equivalence_margin`` (TOST); plans locked
    #: before it existed did not, so their recompute gives the same bytes.
    upgrade_equivalence: bool = True

    def biomarker(self, name: str) -> dict[str, Any]:
        """The plan entry of biomarker ``name``."""
        for entry in self.biomarkers:
            if entry.get("name") == name:
                return entry
        raise SitebenchError(f"biomarker '{name}' is not in the analysis plan (have: "
                             f"{', '.join(str(e.get('name')) for e in self.biomarkers) or 'none'})")

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AnalysisPlan":
        data = dict(data)
        if "mixed_model_engine" not in data:  # locked before the engine was recorded: statsmodels, Wald z
            data["mixed_model_engine"] = LEGACY_MIXED_MODEL_ENGINE
            data.setdefault("df_method", "wald")
        if data.get("endpoint"):
            data["endpoint"] = Endpoint(**data["endpoint"])
        data["biomarkers"] = [dict(entry) for entry in data.get("biomarkers") or []]
        data.setdefault("upgrade_equivalence", False)  # locked before upgrades were tested for equivalence
        return cls(**data)


@dataclass
class Evaluation:
    """Every number the report shows; each table tidy, one row per model (and stratum) and quantity."""

    table: pd.DataFrame
    plan: AnalysisPlan
    metrics: pd.DataFrame
    mixed: list[dict[str, Any]]
    upgrade: pd.DataFrame
    calibration: pd.DataFrame
    harmonization: pd.DataFrame
    equivalence: pd.DataFrame
    comparison: pd.DataFrame
    discrimination: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    #: Classification biomarkers: AUC, sensitivity/specificity, calibration per model and stratum.
    classification: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: The per-scan, per-label overlap scores joined to the manifest strata (the input of the next).
    overlap: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: Dice, HD95 and volume error per biomarker, model, label and stratum level.
    overlap_by_stratum: pd.DataFrame = field(default_factory=pd.DataFrame)

    def result_tables(self) -> dict[str, pd.DataFrame]:
        """The locked CSV tables, by file stem (the classification and overlap ones only when there are any)."""
        tables = {
            "metrics_by_stratum": self.metrics,
            "fixed_effects": pd.DataFrame([{**({BIOMARKER: m[BIOMARKER]} if BIOMARKER in m else {}),
                                            MODEL_KEY: m[MODEL_KEY], "response": m["response"], "term": t, **v}
                                           for m in self.mixed for t, v in m["fixed_effects"].items()]),
            "variance_components": variance_shares(self.mixed),
            "upgrade_effect": self.upgrade,
            "calibration": self.calibration,
            "harmonization": self.harmonization,
            "equivalence": self.equivalence,
            "comparison": self.comparison,
            "discrimination": self.discrimination,
        }
        if not self.classification.empty:
            tables["classification_by_stratum"] = self.classification
        if not self.overlap_by_stratum.empty:
            tables["overlap_by_stratum"] = self.overlap_by_stratum
        return tables

    def result_files(self) -> dict[str, bytes]:
        """Every locked result file's bytes, by file name: what a report writes and a recompute compares."""
        files = {f"{stem}.csv": result_csv(frame) for stem, frame in self.result_tables().items()}
        files["mixed_models.json"] = json.dumps(self.mixed, indent=2, sort_keys=True).encode()
        return files


# --------------------------------------------------------------------------- the table


def evaluation_table(predictions: pd.DataFrame, manifest: pd.DataFrame, reference: str | None,
                     biomarkers: list[dict[str, Any]] | None = None) -> pd.DataFrame:
    """Predictions joined to the manifest, one row per scan and model (and biomarker), in canonical form.

    Without ``biomarkers`` (a single-biomarker trial) the reference is the manifest column
    ``reference``. With them (the plan's entries), predictions have one row per scan, model and
    ``biomarker``; each biomarker's reference is its ``reference_column`` of the manifest (a
    classification biomarker: 1.0 where the value is ``reference_positive``, else 0.0, missing
    stays missing), else the predictions' ``reference`` column (derived from the reference
    segmentation's labels); ``reference`` is then not used. Rows are sorted by biomarker in
    plan order, then model and scan.
    """
    if biomarkers:
        return _biomarker_table(predictions, manifest, biomarkers)
    if BIOMARKER in predictions:
        raise SitebenchError("the predictions hold several biomarkers (a 'biomarker' column) but no biomarker "
                             "declarations were given: pass the plan's biomarkers")
    if reference not in manifest:
        raise SitebenchError(f"reference column '{reference}' is not in the manifest")
    table = predictions.merge(mf.add_software_upgraded(manifest), on=mf.SCAN_ID, suffixes=("", "_manifest"))
    table[REFERENCE] = table[reference].astype(float)
    table[ERROR] = table[PREDICTION] - table[REFERENCE]
    keep = [c for c in EVALUATION_COLUMNS if c in table]
    ordered = table[keep].sort_values([MODEL_KEY, mf.SCAN_ID], kind="stable").reset_index(drop=True)
    return canonical(ordered)


def _biomarker_table(predictions: pd.DataFrame, manifest: pd.DataFrame,
                     biomarkers: list[dict[str, Any]]) -> pd.DataFrame:
    if BIOMARKER not in predictions:
        raise SitebenchError("biomarkers are declared but the predictions have no 'biomarker' column")
    names = [str(entry["name"]) for entry in biomarkers]
    table = predictions.merge(mf.add_software_upgraded(manifest), on=mf.SCAN_ID, suffixes=("", "_manifest"))
    table = table[table[BIOMARKER].isin(names)].copy()
    by_scan = manifest.drop_duplicates(mf.SCAN_ID).set_index(mf.SCAN_ID)
    values = pd.Series(np.nan, index=table.index, dtype=float)
    for entry in biomarkers:
        rows = table[BIOMARKER] == str(entry["name"])
        column = entry.get("reference_column")
        if column:
            if column not in by_scan:
                raise SitebenchError(f"biomarker '{entry['name']}': reference column '{column}' is not in the "
                                     "manifest")
            raw = table.loc[rows, mf.SCAN_ID].map(by_scan[column])
            if entry.get("analysis") == CLASSIFICATION:
                values[rows] = _positive(raw, entry.get("reference_positive"))
            else:
                values[rows] = pd.to_numeric(raw, errors="coerce").astype(float)
        elif rows.any():
            if REFERENCE not in predictions:
                raise SitebenchError(f"biomarker '{entry['name']}' names no manifest reference column and the "
                                     "predictions have no 'reference' column")
            values[rows] = pd.to_numeric(table.loc[rows, REFERENCE], errors="coerce").astype(float)
    table[REFERENCE] = values
    table[ERROR] = table[PREDICTION] - table[REFERENCE]
    table["_order"] = table[BIOMARKER].map({name: i for i, name in enumerate(names)})
    keep = [c for c in EVALUATION_COLUMNS if c in table]
    ordered = table.sort_values(["_order", MODEL_KEY, mf.SCAN_ID], kind="stable")[keep].reset_index(drop=True)
    return canonical(ordered)


def _positive(values: pd.Series, positive: Any) -> np.ndarray:
    """1.0 where a class value is ``positive`` (as text, or as the same number), 0.0 otherwise, NaN if missing."""
    text = str(positive)
    try:
        number = float(text)
    except ValueError:
        number = None

    def one(value: Any) -> float:
        if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
            return np.nan
        if str(value) == text:
            return 1.0
        if number is not None and isinstance(value, (int, float, np.integer, np.floating)) \
                and not isinstance(value, bool):
            return 1.0 if float(value) == number else 0.0
        return 0.0

    return np.array([one(v) for v in values.to_numpy(dtype=object)], dtype=float)


def evaluation_csv(table: pd.DataFrame) -> str:
    """The evaluation table as CSV text (floats written shortest-exact, so a read-back is lossless)."""
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    return buffer.getvalue()


def result_csv(frame: pd.DataFrame) -> bytes:
    """A locked result table's bytes (10 significant digits: what the report shows, and what is hashed)."""
    return frame.to_csv(index=False, float_format="%.10g").encode()


def read_evaluation_csv(source: str | Path | io.StringIO) -> pd.DataFrame:
    """Read an evaluation table with the dtypes the analyses expect (codes stay text)."""
    try:
        return pd.read_csv(source, dtype={c: str for c in _TEXT}, keep_default_na=False,
                           na_values=[""], float_precision="round_trip")
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        raise SitebenchError(f"cannot read the evaluation table ({exc})", source if isinstance(source, Path) else None) \
            from None


def canonical(table: pd.DataFrame) -> pd.DataFrame:
    """The table as it reads back from its CSV: the report and a recompute then see the same data."""
    return read_evaluation_csv(io.StringIO(evaluation_csv(table)))


# --------------------------------------------------------------------------- the analyses


def evaluate_models(table: pd.DataFrame, plan: AnalysisPlan, model_keys: list[str] | None = None,
                    overlap: pd.DataFrame | None = None) -> Evaluation:
    """Per-stratum metrics, mixed models, upgrade, calibration, harmonization, equivalence and comparisons.

    A table with a ``biomarker`` column is analysed biomarker by biomarker, each by its kind in
    the plan (see the module docstring); every result table then starts with a ``biomarker``
    column. ``overlap`` is the per-scan, per-label segmentation overlap table (the runner's
    scores, or :func:`~sitebench.stratification.overlap.overlap_table`); it is summarised per
    stratum into ``overlap_by_stratum``.
    """
    if BIOMARKER in table:
        evaluation = _evaluate_biomarkers(table, plan, model_keys)
    else:
        evaluation = _evaluate_single(table, plan, model_keys)
    if overlap is not None and not overlap.empty:
        _add_overlap(evaluation, overlap)
    return evaluation


def _evaluate_single(table: pd.DataFrame, plan: AnalysisPlan, model_keys: list[str] | None) -> Evaluation:
    """The single-biomarker analyses (a table without a ``biomarker`` column, or one biomarker's rows)."""
    model_keys = model_keys or list(dict.fromkeys(table[MODEL_KEY]))
    missing = [k for k in model_keys if k not in set(table[MODEL_KEY])]
    if missing:
        raise SitebenchError(f"model(s) {', '.join(missing)} not in the evaluation table")
    metric_frames, mixed, upgrades, calibrations, harmonized, equivalences = [], [], [], [], [], []
    notes: list[str] = []
    for key in model_keys:
        part = table[table[MODEL_KEY] == key].reset_index(drop=True)
        metrics = stratum_metrics(part, prediction=PREDICTION, reference=REFERENCE, strata=plan.strata,
                                  dice="dice" if "dice" in part else None, n_boot=plan.bootstrap,
                                  seed=plan.seed).to_frame()
        metrics.insert(0, MODEL_KEY, key)
        metric_frames.append(metrics)
        for response in (ERROR, PREDICTION):
            mixed.append({MODEL_KEY: key, **_scanner_effects(part, response, plan, f"{key} ({response})", notes)})
        complete = part.dropna(subset=[REFERENCE, PREDICTION]).reset_index(drop=True)  # as the metrics do
        up = upgrade_effect(complete, ERROR, alpha=plan.alpha,
                            margin=plan.equivalence_margin if plan.upgrade_equivalence else None).to_frame()
        up.insert(0, MODEL_KEY, key)
        upgrades.append(up)
        calibrations.append(continuous_calibration(complete, key, plan.alpha))
        harmonized.append(harmonization_effect(complete, key, notes))
        if plan.equivalence_margin is not None:
            eq = site_equivalence(complete, ERROR, mf.SITE, plan.equivalence_margin, alpha=plan.alpha)
            frame = eq.to_frame()
            frame.insert(0, MODEL_KEY, key)
            frame["all_within_margin"] = eq.all_within_margin
            equivalences.append(frame)
    first = table[table[MODEL_KEY] == model_keys[0]].reset_index(drop=True)
    mixed.append({MODEL_KEY: REFERENCE_KEY, **_scanner_effects(first, REFERENCE, plan, "the reference", notes)})
    comparison, discrimination = compare_versions(table, plan)
    return Evaluation(table=table, plan=plan, metrics=pd.concat(metric_frames, ignore_index=True), mixed=jsonable(mixed),
                      upgrade=pd.concat(upgrades, ignore_index=True),
                      calibration=pd.concat(calibrations, ignore_index=True),
                      harmonization=pd.concat(harmonized, ignore_index=True),
                      equivalence=pd.concat(equivalences, ignore_index=True) if equivalences else pd.DataFrame(),
                      comparison=comparison, discrimination=discrimination, notes=notes)


def _scanner_effects(part: pd.DataFrame, response: str, plan: AnalysisPlan, what: str,
                     notes: list[str]) -> dict[str, Any]:
    """The mixed model's record; a design it cannot be fitted on (a model scored on a small subsample,
    a site that explains a vendor) is a note and an empty record, not the end of the whole evaluation."""
    try:
        return fit_scanner_effects(part, response, ddf=plan.df_method).to_dict()
    except SitebenchError as exc:
        notes.append(f"mixed model of {what} not fitted: {exc}")
        return {"response": response, "formula": "", "fixed_effects": {}, "variance_components": {},
                "variance_share": {}, "loglik": None, "converged": None, "optimizer": None, "boundary": None,
                "notes": [f"not fitted: {exc}"]}


def _evaluate_biomarkers(table: pd.DataFrame, plan: AnalysisPlan, model_keys: list[str] | None) -> Evaluation:
    """Each plan biomarker present in the table, analysed by its kind; frames gain a leading ``biomarker``."""
    if not plan.biomarkers:
        raise SitebenchError("the evaluation table holds biomarkers (a 'biomarker' column) but the analysis plan "
                             "declares none")
    model_keys = model_keys or list(dict.fromkeys(table[MODEL_KEY]))
    missing = [k for k in model_keys if k not in set(table[MODEL_KEY])]
    if missing:
        raise SitebenchError(f"model(s) {', '.join(missing)} not in the evaluation table")
    present = set(table[BIOMARKER])
    declared = [str(entry["name"]) for entry in plan.biomarkers]
    notes = [f"biomarker '{name}' is in the evaluation table but not in the plan; not analysed"
             for name in dict.fromkeys(table[BIOMARKER]) if name not in declared]
    parts: dict[str, list[pd.DataFrame]] = {name: [] for name in (
        "metrics", "upgrade", "calibration", "harmonization", "equivalence", "comparison", "discrimination",
        "classification")}
    mixed: list[dict[str, Any]] = []
    first_continuous = True
    for entry in plan.biomarkers:
        name = str(entry["name"])
        if name not in present:
            continue
        rows = table[table[BIOMARKER] == name]
        keys = [k for k in model_keys if k in set(rows[MODEL_KEY])]
        if not keys:
            continue
        pairs = [list(pair) for pair in plan.compare if pair[0] in keys and pair[1] in keys]
        part = rows[rows[MODEL_KEY].isin(keys)].drop(columns=BIOMARKER).reset_index(drop=True)
        if entry.get("analysis") == CLASSIFICATION:
            parts["classification"].extend(_classification(part, entry, keys, plan, notes))
            parts["discrimination"].extend(_paired_delong(part, name, pairs, plan, notes))
            continue
        reference_column = entry.get("reference_column")
        if reference_column in COVARIATES and reference_column in part:
            # a biomarker that estimates a covariate (brain age against age) cannot also be adjusted for it
            part = part.drop(columns=reference_column)
            notes.append(f"{name}: its reference is the covariate '{reference_column}', which is therefore left "
                         "out of its mixed models and harmonization")
        margin = entry.get("equivalence_margin")
        sub_plan = replace(plan, biomarkers=[], compare=pairs,
                           equivalence_margin=margin if margin is not None
                           else (plan.equivalence_margin if first_continuous else None),
                           comparison_margin=plan.comparison_margin if first_continuous else None,
                           endpoint=plan.endpoint if first_continuous else None)
        first_continuous = False
        single = _evaluate_single(part, sub_plan, keys)
        for field_name in ("metrics", "upgrade", "calibration", "harmonization", "equivalence", "comparison",
                           "discrimination"):
            frame = getattr(single, field_name)
            if not frame.empty:
                parts[field_name].append(_labelled(frame, name))
        mixed.extend({BIOMARKER: name, **m} for m in single.mixed)
        notes.extend(f"{name}: {note}" for note in single.notes)

    def joined(field_name: str) -> pd.DataFrame:
        frames = parts[field_name]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    return Evaluation(table=table, plan=plan, metrics=joined("metrics"), mixed=jsonable(mixed),
                      upgrade=joined("upgrade"), calibration=joined("calibration"),
                      harmonization=joined("harmonization"), equivalence=joined("equivalence"),
                      comparison=joined("comparison"), discrimination=joined("discrimination"), notes=notes,
                      classification=joined("classification"))


def _labelled(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    frame = frame.copy()
    frame.insert(0, BIOMARKER, name)
    return frame


def _classification(part: pd.DataFrame, entry: dict[str, Any], keys: list[str], plan: AnalysisPlan,
                    notes: list[str]) -> list[pd.DataFrame]:
    """AUC (DeLong), sensitivity/specificity at the biomarker's threshold and calibration, per model and stratum."""
    from sitebench.stratification.classification import classification_by_stratum

    name = str(entry["name"])
    threshold = entry.get("threshold")
    strata = [s for s in plan.strata if s in part]
    frames = []
    for key in keys:
        data = part[part[MODEL_KEY] == key].dropna(subset=[REFERENCE, PREDICTION]).reset_index(drop=True)
        try:
            result = classification_by_stratum(data, REFERENCE, PREDICTION, strata,
                                               threshold=0.5 if threshold is None else threshold, alpha=plan.alpha)
        except SitebenchError as exc:
            notes.append(f"{name}: {key}: classification not estimable ({exc})")
            continue
        notes.extend(f"{name}: {key}: {note}" for note in result.notes)
        frame = result.to_frame()
        frame.insert(0, MODEL_KEY, key)
        frames.append(_labelled(frame, name))
    return frames


def _paired_delong(part: pd.DataFrame, name: str, pairs: list[list[str]], plan: AnalysisPlan,
                   notes: list[str]) -> list[pd.DataFrame]:
    """The paired DeLong test (auc_b - auc_a) of each compared pair on a classification biomarker."""
    from sitebench.stratification.paired import paired_auc

    frames = []
    complete = part.dropna(subset=[REFERENCE, PREDICTION])
    for a, b in pairs:
        try:
            result = paired_auc(complete, model=MODEL_KEY, a=a, b=b, truth=REFERENCE, score=PREDICTION,
                                scan=mf.SCAN_ID, alpha=plan.alpha)
        except SitebenchError as exc:
            notes.append(f"{name}: {a} vs {b}: paired DeLong not estimable ({exc})")
            continue
        notes.extend(f"{name}: {a} vs {b}: {note}" for note in result.notes)
        frame = result.to_frame()
        frame.insert(0, "model_b", b)
        frame.insert(0, "model_a", a)
        frames.append(_labelled(frame, name))
    return frames


def _add_overlap(evaluation: Evaluation, overlap: pd.DataFrame) -> None:
    """Join the overlap scores to the evaluation table's strata (when not joined yet) and summarise them."""
    from sitebench.stratification.overlap import STRATA_COLUMNS, canonical_overlap, overlap_by_stratum

    plan, table = evaluation.plan, evaluation.table
    scores = overlap
    if plan.biomarkers and BIOMARKER in scores:
        scores = scores[scores[BIOMARKER].isin([str(e["name"]) for e in plan.biomarkers])]
    if mf.SITE not in scores:
        strata = [c for c in (mf.SUBJECT_ID, *STRATA_COLUMNS) if c in table]
        per_scan = table[[mf.SCAN_ID, *strata]].drop_duplicates(mf.SCAN_ID)
        scores = scores.merge(per_scan, on=mf.SCAN_ID, how="left")
    evaluation.overlap = canonical_overlap(scores)
    evaluation.overlap_by_stratum = overlap_by_stratum(evaluation.overlap, plan.strata, n_boot=plan.bootstrap,
                                                       seed=plan.seed, alpha=plan.alpha)


def variance_shares(mixed: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for m in mixed:
        share = m.get("variance_share", {})
        rows.append({**({BIOMARKER: m[BIOMARKER]} if BIOMARKER in m else {}),
                     MODEL_KEY: m[MODEL_KEY], "response": m["response"],
                     **{f"var_{k}": v for k, v in m.get("variance_components", {}).items()},
                     "site": share.get("site"), "scanner": share.get("scanner"), "residual": share.get("residual"),
                     "converged": m.get("converged"), "optimizer": m.get("optimizer"),
                     "boundary": m.get("boundary")})
    return pd.DataFrame(rows)


def continuous_calibration(part: pd.DataFrame, key: str, alpha: float = 0.05) -> pd.DataFrame:
    """Calibration of a continuous biomarker: reference = a + b * prediction, overall and per vendor.

    Slope 1 and intercept 0 mean a reader can take the number at face value; the
    calibration-in-the-large is mean(reference - prediction). Standard errors are
    cluster-robust by site, because scans within a site share its scanner.
    """
    import statsmodels.api as sm

    rows = []
    levels = [("overall", "all", part)] + [(mf.VENDOR, v, g) for v, g in part.groupby(mf.VENDOR, sort=True)]
    for stratum, level, data in levels:
        row: dict[str, Any] = {MODEL_KEY: key, "stratum": stratum, "level": level, "n_scans": len(data)}
        y, x = data[REFERENCE].to_numpy(float), data[PREDICTION].to_numpy(float)
        large = y - x
        row["calibration_in_the_large"] = float(large.mean())
        if len(data) < 3 or np.ptp(x) == 0:
            row.update(slope=None, slope_ci_low=None, slope_ci_high=None, intercept=None, note="too few scans")
            rows.append(row)
            continue
        groups = pd.factorize(data[mf.SITE])[0]
        design = sm.add_constant(x - x.mean())
        if len(np.unique(groups)) >= 2:
            fit = sm.OLS(y, design).fit(cov_type="cluster", cov_kwds={"groups": groups})
        else:
            fit = sm.OLS(y, design).fit()
        ci = fit.conf_int(alpha)
        slope = float(fit.params[1])
        row.update(slope=slope, slope_ci_low=float(ci[1, 0]), slope_ci_high=float(ci[1, 1]),
                   intercept=float(fit.params[0] - slope * x.mean()), r_squared=float(fit.rsquared), note="")
        rows.append(row)
    return pd.DataFrame(rows)


def harmonization_effect(part: pd.DataFrame, key: str, notes: list[str]) -> pd.DataFrame:
    """ComBat on the model's output across sites: site share of variance before/after, covariates kept?

    One feature per model, so the location/scale estimates are used without the
    empirical-Bayes pooling (EB borrows strength across features; there is none to borrow).
    """
    covariates = [c for c in COVARIATES if c in part and part[c].nunique() > 1]
    features = part[[PREDICTION]].astype(float)
    counts = part[mf.SITE].value_counts()
    if (counts < 2).any() or part[mf.SITE].nunique() < 2:
        notes.append(f"{key}: harmonization not estimable (a site has fewer than 2 scans)")
        return pd.DataFrame([{MODEL_KEY: key, "feature": PREDICTION, "note": "not estimable"}])
    cov = part[covariates] if covariates else None
    after = ComBat(empirical_bayes=False).fit_transform(features, batch=part[mf.SITE].to_numpy(), covariates=cov)
    frame = combat_efficacy(features, after, part[mf.SITE].to_numpy(), cov).to_frame()
    frame.insert(0, MODEL_KEY, key)
    return frame


def compare_versions(table: pd.DataFrame, plan: AnalysisPlan) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Paired per-site differences in absolute error (TOST when a margin is set), and paired DeLong."""
    from sitebench.stratification.paired import paired_auc, paired_comparison

    comparisons, discriminations = [], []
    complete = table.dropna(subset=[REFERENCE, PREDICTION])  # a scan missing one side is unpaired, and noted
    data = complete.assign(**{ABS_ERROR: complete[ERROR].abs()})
    for a, b in plan.compare:
        result = paired_comparison(data, model=MODEL_KEY, a=a, b=b, value=ABS_ERROR, scan=mf.SCAN_ID, by=mf.SITE,
                                   margin=plan.comparison_margin, alpha=plan.alpha)
        frame = result.to_frame()
        frame.insert(0, "model_b", b)
        frame.insert(0, "model_a", a)
        comparisons.append(frame)
        if plan.endpoint is not None and plan.endpoint.column in data:
            ep = plan.endpoint
            scored = data.assign(_truth=(data[ep.column].astype(str) == str(ep.positive)).astype(int),
                                 _score=data[PREDICTION] if ep.higher_is_positive else -data[PREDICTION])
            auc = paired_auc(scored, model=MODEL_KEY, a=a, b=b, truth="_truth", score="_score", scan=mf.SCAN_ID,
                             alpha=plan.alpha).to_frame()
            auc.insert(0, "model_b", b)
            auc.insert(0, "model_a", a)
            discriminations.append(auc)
    return (pd.concat(comparisons, ignore_index=True) if comparisons else pd.DataFrame(),
            pd.concat(discriminations, ignore_index=True) if discriminations else pd.DataFrame())
