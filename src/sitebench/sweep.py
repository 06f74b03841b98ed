r"""Acquisition tolerances derived from the biomarker: vary one parameter, score every model version.

A locked protocol's tolerances (``SliceThickness ± 0.05 mm``, ``coverage >= 95 %``...) are
usually set by habit. A sweep replaces habit with evidence: the same seeded simulated
subjects are imaged at a series of deviations of ONE acquisition parameter from the
protocol (a paired design: the subjects, their bias fields and noise streams are the same at
every level), every model version is scored on every scan by the benchmark runner, and the
largest deviation at which the biomarker error stays inside the equivalence margin becomes a
suggested rule for the locked protocol, in the protocol YAML's own syntax
(:mod:`sitebench.qc.protocol`).

Parameters (``--levels`` are deviations from the protocol, 0 = the protocol itself):

* ``slice_thickness`` – mm added to the protocol slice thickness (the simulation grid,
  2 mm): thicker slices average tissue along the slice axis (partial volume).
  Rule: ``SliceThickness: {kind: abs, value: 2.0, tol: <d>}``. Only thicker slices can be
  simulated on a 2 mm grid; the rule's symmetric tolerance assumes a thinner slice is no worse.
* ``noise`` – extra noise as a fraction of the protocol's noise sigma (0.5: sigma x 1.5,
  SNR / 1.5); the table's ``level`` is the SNR factor 1 / (1 + d). The gate cannot read
  noise from the DICOM header, so the rule is an image-quality rule on Dietrich's SNR
  (``snrd_total``: tissue mean over the air's noise sigma, :mod:`sitebench.qc.image_quality`),
  computed on every sweep image exactly as the gate computes it (no label map):
  ``snrd_total: {kind: range, min: <median snrd_total of the scans at the tolerated level>}``.
  ``snr_total`` (within-tissue mean/SD) is not used: in these images its SD is dominated by
  the bias field, so it barely moves with the noise.
* ``coverage_loss`` – mm of superior coverage lost (whole slices: multiples of the slice
  thickness). Rule: ``coverage: {min_mm: <full coverage - d>}``, full coverage being the
  protocol's field of view along the slice axis (160 mm here).
* ``contrast`` – a change of the repetition time, in percent of the protocol TR. The
  simulator has no TR; it has a GM/WM intensity ratio. The mapping is the spoiled gradient
  echo steady state (Ernst; Haacke et al. 1999, eq. 18.8),
  ``S(TR) ∝ PD sin(a) (1 - E1) / (1 - cos(a) E1)``, ``E1 = exp(-TR / T1)``, with T1 of
  grey and white matter at 3 T of 1331 and 832 ms (Wansapura et al. 1999, JMRI 9:531) and the
  example locked GE protocol's readout (TR 6.964 ms, flip angle 11°). The GM/WM ratio at the
  new TR is the vendor's ratio times ``rho(TR) / rho(TR0)``, ``rho = S_GM / S_WM``
  (proton density cancels in that quotient), and the difference is added to the scanner's
  GM/WM deviation. A longer TR weakens T1 weighting (GM brighter relative to WM). This models
  the readout's T1 weighting only; the inversion preparation of an IR-SPGR or MPRAGE, which
  dominates their contrast, is not modelled. Rule:
  ``RepetitionTime: {kind: rel, value: 0.006964, tol: <d / 100>}`` (seconds, as BIDS).

Criterion (:data:`CRITERION`). Per model version and level, the error is prediction minus the
simulated truth (the subject's whole-brain GM volume, so coverage loss counts as error). A
level is *within the margin* when the 90% confidence interval of the mean error lies inside
(-margin, +margin): the two one-sided tests' (TOST) equivalence decision at alpha = 0.05
through the interval-inclusion principle (Schuirmann 1987, J Pharmacokinet Biopharm 15:657).
The interval is the percentile bootstrap (Efron & Tibshirani 1993) of
:func:`sitebench.stratification.metrics.stratum_metrics`, run on the scans of that level
only (a within-level bootstrap; Rao & Wu's 1988 rescaled draw of subjects), which gives the
MAE and its interval from the same replicates. The suggested tolerance is the largest tested
|deviation| d such that every tested level with |deviation| <= d is within the margin (a
failing level closer to the protocol is never jumped over); it is only as fine as the grid of
levels, so the smallest failing deviation is reported beside it. No level within the margin,
not even the protocol itself, gives no rule.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import yaml

from sitebench.datasets import manifest as mf
from sitebench.datasets.simulator import (REFERENCE_COLUMN, Scanner, TrialConfig, acquire, load_template,
                                          make_subject)
from sitebench.errors import SitebenchError
from sitebench.provenance import code_version, jsonable, package_versions, sha256_file, utc_now

__all__ = ["PARAMETERS", "DEFAULT_MODELS", "CRITERION", "SweepResult", "run_sweep", "parse_levels",
           "protocol_fragment", "gm_wm_ratio_shift", "SWEEP_LEVEL"]

#: Manifest column: the index of a scan's sweep level (0 = the first level given).
SWEEP_LEVEL = "sweep_level"
#: Manifest column: the scan's deviation from the protocol, in the parameter's unit.
SWEEP_DEVIATION = "sweep_deviation"
#: The demo's own fast model versions (``pipeline.DEMO_MODELS`` without the slow published network).
DEFAULT_MODELS: tuple[str, ...] = ("classical", "builtin:gm_unet_v1", "builtin:gm_unet_v2")
DEFAULT_MARGIN = 50.0  # ml: the demo's equivalence margin
CONFIDENCE = 0.90
CRITERION = ("90% bootstrap CI of the mean error (model - truth) inside ±margin, i.e. TOST at alpha 0.05 "
             "(Schuirmann 1987), within-level percentile bootstrap of subjects; tolerance = largest tested "
             "|deviation| with it and every smaller tested deviation within the margin")
SWEEP_SITE = "SWEEP"
#: Image-quality metric the noise rule is written on (a key of sitebench.qc.image_quality.METRIC_KEYS).
NOISE_METRIC = "snrd_total"

# contrast: the spoiled-gradient-echo readout of the example locked GE protocol, 3 T tissue T1s
CONTRAST_TR_S = 0.006964
CONTRAST_FLIP_DEG = 11.0
T1_GM_MS = 1331.0
T1_WM_MS = 832.0

TABLE_COLUMNS = ("model", "parameter", "level", "deviation", "deviation_label", "n", "mean_error", "mean_error_lo",
                 "mean_error_hi", "mae", "mae_lo", "mae_hi", "within_margin", "margin")
TOLERANCE_COLUMNS = ("model", "parameter", "deviation_label", "unit", "largest_within_margin", "first_outside",
                     "largest_tested", "rule_key", "rule", "criterion", "margin")


# --------------------------------------------------------------------------- parameters


def _spgr(tr_ms: float, t1_ms: float, flip_deg: float) -> float:
    """Spoiled gradient echo steady-state signal per unit proton density."""
    e1 = math.exp(-tr_ms / t1_ms)
    a = math.radians(flip_deg)
    return math.sin(a) * (1.0 - e1) / (1.0 - math.cos(a) * e1)


def gm_wm_ratio_shift(tr_change_percent: float, base_ratio: float, tr_s: float = CONTRAST_TR_S,
                      flip_deg: float = CONTRAST_FLIP_DEG) -> float:
    """The GM/WM intensity-ratio change a TR change of ``tr_change_percent`` % makes (module docstring)."""
    tr0 = tr_s * 1000.0
    tr = tr0 * (1.0 + tr_change_percent / 100.0)
    rho = _spgr(tr, T1_GM_MS, flip_deg) / _spgr(tr, T1_WM_MS, flip_deg)
    rho0 = _spgr(tr0, T1_GM_MS, flip_deg) / _spgr(tr0, T1_WM_MS, flip_deg)
    return base_ratio * (rho / rho0 - 1.0)


@dataclass(frozen=True)
class Parameter:
    """One acquisition parameter a sweep can vary."""

    name: str
    unit: str
    deviation_label: str  # axis label of the deviation
    level_label: str  # what the ``level`` column holds
    default_levels: tuple[float, ...]
    allow_negative: bool = False
    minimum: float | None = None  # deviations must be greater than this


PARAMETERS: dict[str, Parameter] = {
    "slice_thickness": Parameter("slice_thickness", "mm", "slice thickness added (mm)", "slice thickness (mm)",
                                 (0.0, 1.0, 2.0, 3.0, 4.0)),
    "noise": Parameter("noise", "x extra noise sigma", "extra noise (fraction of the protocol noise sigma)",
                       "SNR factor", (0.0, 0.5, 1.0, 2.0, 3.0)),
    "coverage_loss": Parameter("coverage_loss", "mm", "superior coverage lost (mm)", "superior coverage (mm)",
                               (0.0, 10.0, 20.0, 30.0, 40.0)),
    "contrast": Parameter("contrast", "%", "repetition time change (%)", "repetition time (ms)",
                          (0.0, 25.0, 50.0, 100.0, 200.0), allow_negative=True, minimum=-100.0),
}


def parse_levels(text: str | Sequence[float] | None, parameter: str,
                 config: TrialConfig | None = None) -> list[float]:
    """The deviations to test, checked: numbers, unique, allowed for the parameter; 0 is added if absent."""
    spec = _parameter(parameter)
    if text is None:
        values = list(spec.default_levels)
    elif isinstance(text, str):
        values = []
        for item in text.split(","):
            item = item.strip()
            try:
                value = float(item)
            except ValueError:
                raise SitebenchError(f"--levels: '{item}' is not a number (give e.g. "
                                     f"{','.join(f'{v:g}' for v in spec.default_levels)})") from None
            values.append(value)
    else:
        values = [float(v) for v in text]
    if not values or not all(math.isfinite(v) for v in values):
        raise SitebenchError("--levels: give finite numbers, e.g. "
                             + ",".join(f"{v:g}" for v in spec.default_levels))
    if len(set(values)) != len(values):
        raise SitebenchError(f"--levels: a level is given twice ({', '.join(f'{v:g}' for v in values)})")
    for value in values:
        if value < 0 and not spec.allow_negative:
            raise SitebenchError(f"--levels: {parameter} deviations are 0 or more (0 = the protocol), got {value:g}")
        if spec.minimum is not None and value <= spec.minimum:
            raise SitebenchError(f"--levels: {parameter} deviations must be above {spec.minimum:g}, got {value:g}")
    config = config or TrialConfig()
    if parameter == "coverage_loss":
        for value in values:
            slices = value / config.voxel_mm
            if abs(slices - round(slices)) > 1e-6:
                raise SitebenchError(f"--levels: coverage is lost in whole slices of {config.voxel_mm:g} mm; "
                                     f"{value:g} mm is not a multiple")
        template = load_template(config.voxel_mm)
        full = template.p_gm.shape[2] * config.voxel_mm
        if max(values) >= full:
            raise SitebenchError(f"--levels: cannot lose {max(values):g} mm of a {full:g} mm field of view")
    if 0.0 not in values:
        values.append(0.0)  # the protocol itself: the baseline every curve starts from
    return sorted(values)


def _parameter(name: str) -> Parameter:
    if name not in PARAMETERS:
        raise SitebenchError(f"unknown sweep parameter '{name}' (choose: {', '.join(PARAMETERS)})")
    return PARAMETERS[name]


def protocol_scanner(config: TrialConfig, vendor: str | None = None) -> Scanner:
    """The protocol's scanner: a vendor's default contrast and SNR, the grid's slices, full coverage."""
    profiles = {v.name: v for v in config.vendors}
    if vendor is None:
        profile = config.vendors[0]
    elif vendor in profiles:
        profile = profiles[vendor]
    else:
        raise SitebenchError(f"unknown vendor '{vendor}' (have: {', '.join(profiles)})")
    return Scanner(scanner_id=f"{SWEEP_SITE}-A", site=SWEEP_SITE, vendor=profile, model=profile.models[0],
                   slice_mm=config.voxel_mm, intensity_scale=1000.0, gm_deviation=0.0, snr=profile.snr,
                   missing_superior_mm=0.0, upgrade_day=None)


def _vary(scanner: Scanner, parameter: str, deviation: float, config: TrialConfig) -> Scanner:
    """The protocol scanner with one attribute moved by ``deviation`` (``dataclasses.replace``)."""
    if parameter == "slice_thickness":
        return dataclasses.replace(scanner, slice_mm=config.voxel_mm + deviation)
    if parameter == "noise":
        return dataclasses.replace(scanner, snr=scanner.snr / (1.0 + deviation))
    if parameter == "coverage_loss":
        return dataclasses.replace(scanner, missing_superior_mm=deviation)
    if parameter == "contrast":
        base = scanner.vendor.gm + scanner.gm_deviation
        return dataclasses.replace(scanner, gm_deviation=scanner.gm_deviation + gm_wm_ratio_shift(deviation, base))
    raise SitebenchError(f"unknown sweep parameter '{parameter}'")  # pragma: no cover - checked before


def _level_value(parameter: str, deviation: float, config: TrialConfig, full_mm: float) -> float:
    """The acquisition setting at a deviation, as the ``level`` column holds it."""
    if parameter == "slice_thickness":
        return config.voxel_mm + deviation
    if parameter == "noise":
        return 1.0 / (1.0 + deviation)
    if parameter == "coverage_loss":
        return full_mm - deviation
    return CONTRAST_TR_S * 1000.0 * (1.0 + deviation / 100.0)


def _number(value: float) -> str:
    """A rule value as YAML writes it: rounded, never in exponent notation for these magnitudes."""
    text = f"{round(float(value), 6):.6f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _rule(parameter: str, tolerance: float, config: TrialConfig, full_mm: float,
          quality: dict[float, float]) -> tuple[str, str]:
    """(rule_key, one YAML line in its protocol block's syntax) for a tolerated deviation."""
    if parameter == "slice_thickness":
        return ("parameters.SliceThickness",
                f"SliceThickness: {{kind: abs, severity: fail, value: {_number(config.voxel_mm)}, "
                f"tol: {_number(tolerance)}}}")
    if parameter == "coverage_loss":
        return "coverage", f"coverage: {{min_mm: {_number(full_mm - tolerance)}, severity: fail}}"
    if parameter == "noise":
        value = quality.get(tolerance)
        if value is None or not math.isfinite(value):
            return f"image_quality.{NOISE_METRIC}", ""
        return (f"image_quality.{NOISE_METRIC}",
                f"{NOISE_METRIC}: {{kind: range, severity: fail, min: {_number(round(value, 2))}}}")
    return ("parameters.RepetitionTime",
            f"RepetitionTime: {{kind: rel, severity: fail, value: {_number(CONTRAST_TR_S)}, "
            f"tol: {_number(tolerance / 100.0)}}}")


def protocol_fragment(rule_key: str, rule: str) -> dict[str, Any]:
    """The protocol YAML a suggested rule stands for, as a dict to merge into a protocol's content.

    ``protocol_fragment("parameters.SliceThickness", "SliceThickness: {...}")`` ->
    ``{"parameters": {"SliceThickness": {...}}}``; ``coverage`` sits at the top level.
    """
    if not rule:
        return {}
    loaded = yaml.safe_load(rule)
    if "." in rule_key:
        block, _key = rule_key.split(".", 1)
        return {block: loaded}
    return loaded


# --------------------------------------------------------------------------- the result


@dataclass
class SweepResult:
    """Biomarker error against the deviation of one acquisition parameter, per model version."""

    parameter: str
    unit: str
    deviation_label: str
    level_label: str
    levels: list[float]
    margin: float
    biomarker_unit: str
    n_subjects: int
    n_boot: int
    seed: int
    vendor: str
    models: list[str]
    table: pd.DataFrame
    tolerances: pd.DataFrame
    scans: pd.DataFrame  # per scan and model: deviation, prediction, truth, error (and the IQM for noise)
    out_dir: Path
    manifest_path: Path
    predictions_path: Path
    seconds: dict[str, float] = field(default_factory=dict)
    criterion: str = CRITERION
    notes: list[str] = field(default_factory=list)
    created_utc: str = field(default_factory=utc_now)

    def to_frame(self) -> pd.DataFrame:
        """The tidy sweep table: one row per model version and level."""
        return self.table.copy()

    def plot(self, ax: Any = None) -> Any:
        """Error with its CI per model against the deviation, the margin shaded (a matplotlib Figure)."""
        from sitebench.reports.sweep_section import plot_error_vs_deviation

        return plot_error_vs_deviation(self.table, self.margin, ax=ax)

    def summary(self) -> str:
        pct = f"{CONFIDENCE * 100:g}%"
        u = self.biomarker_unit
        lines = [f"Sweep of {self.parameter}: {self.n_subjects} simulated subjects x {len(self.levels)} levels x "
                 f"{len(self.models)} model versions ({self.vendor} contrast), seed {self.seed}; "
                 f"{self.seconds.get('total', 0.0):.1f} s",
                 f"margin ±{self.margin:g} {u}; criterion: {pct} CI of the mean error inside the margin "
                 f"({self.n_boot} bootstrap replicates per level)",
                 f"{'model':<22}{'deviation':>10}{'mean error [' + pct + ' CI]':>30}{'MAE [' + pct + ' CI]':>28}"
                 "  within"]
        for row in self.table.itertuples(index=False):
            mean = f"{row.mean_error:.1f} [{row.mean_error_lo:.1f}, {row.mean_error_hi:.1f}]"
            mae = f"{row.mae:.1f} [{row.mae_lo:.1f}, {row.mae_hi:.1f}]"
            lines.append(f"{row.model:<22}{row.deviation:>10g}{mean:>30}{mae:>28}  "
                         f"{'yes' if row.within_margin else 'no'}")
        lines.append(f"suggested rules ({self.deviation_label}):")
        for row in self.tolerances.itertuples(index=False):
            if pd.isna(row.largest_within_margin):
                lines.append(f"  {row.model}: not within ±{self.margin:g} {u} even at the protocol; no rule")
            else:
                lines.append(f"  {row.model}: within up to {row.largest_within_margin:g} {self.unit}"
                             + ("" if pd.isna(row.first_outside) else f" (outside at {row.first_outside:g})")
                             + f" -> {row.rule or '(no value)'}")
        lines.append(f"table: {self.out_dir / 'sweep_table.csv'}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record: settings, the table, the tolerances, timings and provenance."""
        def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
            return [{k: jsonable(v) for k, v in row.items()} for row in frame.to_dict("records")]

        return {
            "parameter": self.parameter, "unit": self.unit, "deviation_label": self.deviation_label,
            "level_label": self.level_label, "levels": [float(v) for v in self.levels],
            "margin": float(self.margin), "biomarker": REFERENCE_COLUMN, "biomarker_unit": self.biomarker_unit,
            "confidence": CONFIDENCE, "criterion": self.criterion, "n_subjects": int(self.n_subjects),
            "n_boot": int(self.n_boot), "seed": int(self.seed), "vendor": self.vendor, "models": list(self.models),
            "table": records(self.table), "tolerances": records(self.tolerances),
            "seconds": {k: round(float(v), 3) for k, v in self.seconds.items()},
            "out_dir": str(self.out_dir), "manifest": str(self.manifest_path),
            "predictions": str(self.predictions_path), "notes": list(self.notes),
            "created_utc": self.created_utc,
            "provenance": {"seed": int(self.seed), "code_version": code_version(),
                           "packages": package_versions()},
        }


# --------------------------------------------------------------------------- the sweep


def _simulate(config: TrialConfig, parameter: str, levels: list[float], n_subjects: int, seed: int,
              vendor: str | None, out: Path, log: Callable[[str], None]) -> tuple[pd.DataFrame, float]:
    """Image the same seeded subjects at every level; write NIfTI files and the manifest rows."""
    import nibabel as nib

    template = load_template(config.voxel_mm)
    full_mm = template.p_gm.shape[2] * config.voxel_mm
    base = protocol_scanner(config, vendor)
    for folder in ("images", "labels"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    compute_quality = parameter == "noise"
    if compute_quality:
        from sitebench.qc.image_quality import image_quality
    rows = []
    log(f"imaging {n_subjects} subjects at {len(levels)} levels of {parameter}")
    for i in range(n_subjects):
        subject_id = f"sub-{SWEEP_SITE}{i + 1:03d}"
        subject = make_subject(config, template, subject_id, SWEEP_SITE,
                               np.random.default_rng(np.random.SeedSequence([seed, 2, i])))
        for k, deviation in enumerate(levels):
            scanner = _vary(base, parameter, deviation, config)
            # the same stream at every level: one bias field and one noise draw per subject (paired design)
            rng = np.random.default_rng(np.random.SeedSequence([seed, 3, i]))
            image, labels, affine, injected = acquire(config, subject, scanner, 0, rng, template.affine)
            scan_id = f"{subject_id}_lvl-{k:02d}"
            image_rel = Path("images") / f"{scan_id}_T1w.nii.gz"
            label_rel = Path("labels") / f"{scan_id}_dseg.nii.gz"
            img = nib.Nifti1Image(image, affine)
            img.header.set_xyzt_units("mm")
            nib.save(img, out / image_rel)
            nib.save(nib.Nifti1Image(labels, affine), out / label_rel)
            row = {mf.SCAN_ID: scan_id, mf.SUBJECT_ID: subject_id, mf.SESSION: f"lvl-{k:02d}",
                   mf.SITE: SWEEP_SITE, mf.SCANNER_ID: scanner.scanner_id, mf.VENDOR: scanner.vendor.name,
                   mf.SCANNER_MODEL: scanner.model.name, mf.SOFTWARE_VERSION: scanner.model.software,
                   mf.FIELD_STRENGTH: scanner.model.field_strength,
                   mf.ACQUISITION_DATE: config.start_date.isoformat(),
                   mf.IMAGE_PATH: image_rel.as_posix(), mf.IMAGE_SHA256: sha256_file(out / image_rel),
                   mf.LABEL_PATH: label_rel.as_posix(), mf.LABEL_SHA256: sha256_file(out / label_rel),
                   mf.AGE: subject.age, mf.SEX: subject.sex, mf.GROUP: subject.group,
                   REFERENCE_COLUMN: round(subject.gm_volume_ml, 3),
                   SWEEP_LEVEL: k, SWEEP_DEVIATION: deviation, "sweep_parameter": parameter,
                   "level_value": _level_value(parameter, deviation, config, full_mm),
                   "slice_thickness_mm": scanner.slice_mm,
                   "coverage_mm": round(image.shape[2] * float(np.linalg.norm(affine[:3, 2])), 3),
                   "gm_wm_ratio": injected["gm_wm_ratio"], "noise_sigma_rel": injected["noise_sigma_rel"]}
            if compute_quality:
                voxel = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
                row[NOISE_METRIC] = image_quality(image, voxel).metrics.get(NOISE_METRIC)
            rows.append(row)
    return pd.DataFrame(rows), full_mm


def _spec(parameter: str, models: Sequence[str], seed: int, n_boot: int) -> dict[str, Any]:
    """The benchmark spec of a sweep (the form ``pipeline.demo_spec`` writes), truth from the manifest."""
    biomarker = {"name": REFERENCE_COLUMN, "kind": "label_volume", "labels": [1], "unit": "ml",
                 "label_names": {1: "grey matter"}, "description": "total grey-matter volume",
                 "reference": {"column": REFERENCE_COLUMN}}
    return {"name": f"sweep-{parameter}", "manifest": "manifest.csv", "biomarkers": [biomarker],
            "models": [{"source": source, "biomarkers": [REFERENCE_COLUMN]} for source in models],
            "strata": [mf.SITE], "seed": seed, "bootstrap": n_boot, "results_dir": "results",
            "mlflow": {"experiment": f"sitebench-sweep-{parameter}", "register_models": False}}


def _level_statistics(scans: pd.DataFrame, n_boot: int, seed: int) -> dict[str, tuple[float, ...]]:
    """Mean error and MAE with their 90% CIs for the scans of one model at one level (one engine)."""
    from sitebench.stratification.metrics import stratum_metrics

    found = stratum_metrics(scans, prediction="prediction", reference="truth", strata=(), dice=None,
                            n_boot=n_boot, seed=seed, min_scans=2, confidence=CONFIDENCE).to_frame()
    out = {}
    for metric in ("bias", "mae"):
        row = found[found["metric"] == metric].iloc[0]
        out[metric] = (float(row["estimate"]), float(row["ci_low"]), float(row["ci_high"]))
    return out


def _tolerance(rows: pd.DataFrame) -> tuple[float, float, float]:
    """(largest tolerated |deviation|, smallest failing |deviation|, largest tested) for one model."""
    ordered = rows.assign(_abs=rows["deviation"].abs()).sort_values("_abs")
    tolerated, first_out = math.nan, math.nan
    for magnitude, group in ordered.groupby("_abs", sort=True):
        if bool(group["within_margin"].all()):
            tolerated = float(magnitude)
        else:
            first_out = float(magnitude)
            break
    return tolerated, first_out, float(ordered["_abs"].max())


def run_sweep(parameter: str, out: str | Path, *, levels: str | Sequence[float] | None = None,
              n_subjects: int = 8, models: Sequence[str] | None = None, margin: float = DEFAULT_MARGIN,
              seed: int = 0, n_boot: int = 2000, vendor: str | None = None, workers: int = 1,
              config: TrialConfig | None = None, progress: bool = False,
              log: Callable[[str], None] = lambda message: None) -> SweepResult:
    """Vary ``parameter`` over ``levels`` (deviations from the protocol) on ``n_subjects`` seeded simulated
    subjects, score ``models`` with the benchmark runner, and suggest a protocol rule per model version.

    Files go under ``out/<parameter>/``: images, labels, ``manifest.csv`` (with ``sweep_level``),
    ``benchmark.yaml``, ``results/predictions.csv``, ``sweep_table.csv``, ``sweep_tolerances.csv`` and
    ``sweep.json``. A rerun with the same settings reuses every prediction (same image hashes).
    """
    from sitebench.benchmarks.runner import run_benchmark
    from sitebench.benchmarks.spec import load_spec

    started = time.perf_counter()
    spec_p = _parameter(parameter)
    if not isinstance(n_subjects, int) or n_subjects < 3:
        raise SitebenchError(f"--subjects: at least 3 subjects are needed for a bootstrap CI, got {n_subjects}")
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin > 0):
        raise SitebenchError(f"--margin must be a positive number, got {margin!r}")
    if n_boot < 100:
        raise SitebenchError(f"--bootstrap: at least 100 replicates for a 90% CI, got {n_boot}")
    config = config or TrialConfig(seed=seed)
    chosen = parse_levels(levels, parameter, config)
    sources = list(models) if models else list(DEFAULT_MODELS)
    if not sources:
        raise SitebenchError("--models: name at least one model version")
    folder = Path(out) / parameter
    folder.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    mark = time.perf_counter()
    manifest, full_mm = _simulate(config, parameter, chosen, n_subjects, seed, vendor, folder, log)
    manifest_path = mf.write_manifest(manifest, folder / "manifest.csv")
    seconds["simulate"] = time.perf_counter() - mark

    mark = time.perf_counter()
    spec_path = folder / "benchmark.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(parameter, sources, seed, n_boot), sort_keys=False))
    log(f"scoring {len(manifest)} scans with {len(sources)} model versions")
    run = run_benchmark(load_spec(spec_path), workers=workers, progress=progress)
    seconds["score"] = time.perf_counter() - mark

    mark = time.perf_counter()
    predictions = run.predictions[run.predictions["biomarker"] == REFERENCE_COLUMN]
    keep = [mf.SCAN_ID, mf.SUBJECT_ID, mf.SITE, SWEEP_LEVEL, SWEEP_DEVIATION, "level_value", REFERENCE_COLUMN]
    if NOISE_METRIC in manifest:
        keep.append(NOISE_METRIC)
    scans = (predictions[["scan_id", "model_key", "prediction"]]
             .merge(manifest[keep], on=mf.SCAN_ID, how="inner", validate="many_to_one")
             .rename(columns={REFERENCE_COLUMN: "truth", "model_key": "model", SWEEP_DEVIATION: "deviation"}))
    scans["prediction"] = pd.to_numeric(scans["prediction"], errors="coerce")
    scans["error"] = scans["prediction"] - scans["truth"]
    keys = [card.key for card in run.models]
    rows = []
    for key in keys:
        for k, deviation in enumerate(chosen):
            part = scans[(scans["model"] == key) & (scans[SWEEP_LEVEL] == k)]
            stats = _level_statistics(part, n_boot, seed)
            (mean, mean_lo, mean_hi), (mae, mae_lo, mae_hi) = stats["bias"], stats["mae"]
            rows.append({"model": key, "parameter": parameter,
                         "level": _level_value(parameter, deviation, config, full_mm), "deviation": deviation,
                         "deviation_label": spec_p.deviation_label, "n": int(part["prediction"].notna().sum()),
                         "mean_error": mean, "mean_error_lo": mean_lo, "mean_error_hi": mean_hi,
                         "mae": mae, "mae_lo": mae_lo, "mae_hi": mae_hi,
                         "within_margin": bool(-margin < mean_lo and mean_hi < margin), "margin": float(margin)})
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    quality: dict[float, float] = {}
    if NOISE_METRIC in manifest:
        for deviation, group in manifest.groupby(SWEEP_DEVIATION):
            values = pd.to_numeric(group[NOISE_METRIC], errors="coerce").dropna()
            quality[float(deviation)] = float(values.median()) if len(values) else math.nan
    notes = []
    tolerance_rows = []
    for key in keys:
        tolerated, first_out, largest = _tolerance(table[table["model"] == key])
        rule_key, rule = ("", "") if math.isnan(tolerated) else _rule(parameter, tolerated, config, full_mm,
                                                                     quality)
        if not math.isnan(tolerated) and not rule:
            notes.append(f"{key}: {NOISE_METRIC} could not be computed at the tolerated level; no rule")
        tolerance_rows.append({"model": key, "parameter": parameter, "deviation_label": spec_p.deviation_label,
                               "unit": spec_p.unit, "largest_within_margin": tolerated,
                               "first_outside": first_out, "largest_tested": largest, "rule_key": rule_key,
                               "rule": rule, "criterion": CRITERION, "margin": float(margin)})
    tolerances = pd.DataFrame(tolerance_rows, columns=list(TOLERANCE_COLUMNS))
    seconds["statistics"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - started

    result = SweepResult(parameter=parameter, unit=spec_p.unit, deviation_label=spec_p.deviation_label,
                         level_label=spec_p.level_label, levels=chosen, margin=float(margin), biomarker_unit="ml",
                         n_subjects=n_subjects, n_boot=n_boot, seed=seed,
                         vendor=protocol_scanner(config, vendor).vendor.name, models=keys, table=table,
                         tolerances=tolerances, scans=scans, out_dir=folder, manifest_path=manifest_path,
                         predictions_path=run.predictions_path, seconds=seconds, notes=notes)
    table.to_csv(folder / "sweep_table.csv", index=False)
    tolerances.to_csv(folder / "sweep_tolerances.csv", index=False)
    scans.to_csv(folder / "sweep_scans.csv", index=False)
    (folder / "sweep.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    return result
