"""How a result column reads in the report: one registry of human headers, units and rounding.

The locked CSVs keep their code names (``p_holm``, ``ci_low``); a regulatory writer reads the
report, so every HTML table goes through :func:`readable`, which looks each column up here.
The same registry is printed as the column glossary in the appendix, so a reader who opens a
CSV can find what each code name means.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd

__all__ = ["Column", "COLUMNS", "CI", "fmt_value", "fmt_p", "fmt_ci", "header", "readable", "is_code_name",
           "term_label", "response_label", "MAX_COLUMNS"]

#: The widest table the report prints; wider results stay in their CSV.
MAX_COLUMNS = 8


@dataclass(frozen=True)
class Column:
    """A result column as a reader sees it. ``header`` may say ``{unit}``; ``kind`` picks the rounding."""

    header: str
    kind: str = "num"  # text | int | num (in the report's unit) | ratio | p | bool | share | percent | auc
    meaning: str = ""


#: code name -> how it reads. Every table of the report (and the appendix glossary) uses this.
COLUMNS: dict[str, Column] = {
    # identifiers and strata
    "model_key": Column("Model version", "text", "model name @ version"),
    "model_a": Column("First version", "text", "the version compared against"),
    "model_b": Column("Second version", "text", "the version compared"),
    "stratum": Column("Stratum", "text", "what the rows are grouped by: overall, site, vendor, software version"),
    "level": Column("Level", "text", "the site, vendor or software version of the row"),
    "site": Column("Site", "text", "trial site (in variance_components.csv: the site share of variance)"),
    "vendor": Column("Vendor", "text", "scanner manufacturer"),
    "scanner_model": Column("Scanner model", "text", "scanner model name"),
    "scanner_id": Column("Scanner", "text", "scanner identifier within the site"),
    "software_version": Column("Software version", "text", "scanner software version"),
    "response": Column("Response", "text", "what the mixed model explains: the error, the model output or the "
                                              "reference"),
    "term": Column("Term", "text", "fixed effect of the mixed model"),
    "feature": Column("Feature", "text", "the harmonized quantity"),
    "metric": Column("Metric", "text", "agreement statistic"),
    "note": Column("Note", "text", "why a value is missing"),
    "status": Column("Status", "text", "ok, or why the AUC is not estimable (in the QC tables: the gate's verdict)"),
    "reason": Column("Reason", "text", "why not estimable"),
    # counts
    "n_scans": Column("Scans", "int", "number of scans"),
    "scans": Column("Scans", "int", "number of scans"),
    "n_subjects": Column("Subjects", "int", "number of participants"),
    "n_sites": Column("Sites", "int", "number of sites"),
    "n_site": Column("Scans at site", "int", "scans at this site"),
    "n_rest": Column("Scans elsewhere", "int", "scans at all other sites"),
    "n_pairs": Column("Paired scans", "int", "scans scored by both versions"),
    "n_before": Column("Scans before", "int", "scans before the software change"),
    "n_after": Column("Scans after", "int", "scans after the software change"),
    "n": Column("Scans", "int", "scans with an endpoint"),
    "n_positive": Column("Positives", "int", "scans with the endpoint"),
    "n_negative": Column("Negatives", "int", "scans without the endpoint"),
    "n_obs": Column("Observations", "int", "scans in the fit"),
    "df": Column("df", "ratio", "degrees of freedom"),
    # estimates in the biomarker's unit
    "estimate": Column("Estimate ({unit})", "num", "point estimate"),
    "difference": Column("Difference ({unit})", "num", "second minus first (or site minus other sites, or after "
                                                       "minus before)"),
    "mean_site": Column("Mean error at site ({unit})", "num", "mean error (model − reference) at the site"),
    "mean_rest": Column("Mean error elsewhere ({unit})", "num", "mean error at all other sites"),
    "mean_a": Column("Mean |error|, first ({unit})", "num", "mean absolute error of the first version"),
    "mean_b": Column("Mean |error|, second ({unit})", "num", "mean absolute error of the second version"),
    "mean_before": Column("Mean error before ({unit})", "num", "mean error before the software change"),
    "mean_after": Column("Mean error after ({unit})", "num", "mean error after the software change"),
    "sd_difference": Column("SD of difference ({unit})", "num", "standard deviation of the paired differences"),
    "se": Column("SE", "num", "standard error"),
    "ci_low": Column("CI lower", "num", "lower confidence limit (95%, or 90% for an equivalence test)"),
    "ci_high": Column("CI upper", "num", "upper confidence limit"),
    "tost_ci_low": Column("90% CI lower (TOST)", "num", "lower limit of the (1 − 2α) interval of the TOST"),
    "tost_ci_high": Column("90% CI upper (TOST)", "num", "upper limit of the (1 − 2α) interval of the TOST"),
    "calibration_in_the_large": Column("Calibration-in-the-large ({unit})", "num", "mean(reference − prediction)"),
    "intercept": Column("Intercept ({unit})", "num", "reference at prediction 0 on the fitted line"),
    "slope": Column("Slope", "ratio", "reference per unit of prediction; 1 is ideal"),
    "slope_ci_low": Column("Slope CI lower", "ratio", "lower 95% limit of the slope"),
    "slope_ci_high": Column("Slope CI upper", "ratio", "upper 95% limit of the slope"),
    "r_squared": Column("R²", "ratio", "share of reference variance explained by the fitted line"),
    "estimate_before": Column("Effect before ({unit})", "num", "covariate effect before harmonization"),
    "ci_low_before": Column("CI lower before", "num", "lower 95% limit before harmonization"),
    "ci_high_before": Column("CI upper before", "num", "upper 95% limit before harmonization"),
    "estimate_after": Column("Effect after ({unit})", "num", "covariate effect after harmonization"),
    "var_site": Column("Site variance ({unit}²)", "num", "between-site variance (REML)"),
    "var_scanner": Column("Scanner variance ({unit}²)", "num", "between-scanner variance within site"),
    "var_residual": Column("Residual variance ({unit}²)", "num", "scan-to-scan variance"),
    # shares
    "site_share_before": Column("Site share before", "percent", "share of variance explained by site, before"),
    "site_share_after": Column("Site share after", "percent", "share of variance explained by site, after"),
    "site_share": Column("Site share", "percent", "share of variance between sites"),
    "scanner": Column("Scanner share", "percent", "in variance_components.csv: share of variance between scanners "
                                                  "within site"),
    "residual": Column("Residual share", "percent", "in variance_components.csv: share of variance left scan to "
                                                    "scan"),
    "scanner_share": Column("Scanner share", "percent", "share of variance between scanners within site "
                                                        "(column 'scanner' of variance_components.csv)"),
    "residual_share": Column("Residual share", "percent", "share of variance left scan to scan (column "
                                                          "'residual' of variance_components.csv)"),
    "rescan_rate": Column("Re-scan rate", "percent", "share of series re-acquired"),
    # AUC
    "auc_a": Column("AUC, first", "auc", "area under the ROC curve of the first version"),
    "auc_b": Column("AUC, second", "auc", "area under the ROC curve of the second version"),
    "z": Column("z", "ratio", "DeLong z statistic"),
    # tests
    "p": Column("p", "p", "two-sided p-value"),
    "p_wilcoxon": Column("p (Wilcoxon)", "p", "Wilcoxon signed-rank p-value"),
    "p_lower": Column("p (lower one-sided)", "p", "one-sided p of the TOST against −margin"),
    "p_upper": Column("p (upper one-sided)", "p", "one-sided p of the TOST against +margin"),
    "p_tost": Column("p (TOST)", "p", "larger of the two one-sided p-values"),
    "p_holm": Column("p (TOST, Holm)", "p", "TOST p-value, Holm-adjusted across sites"),
    "equivalent": Column("Within margin?", "bool", "TOST rejects at alpha, unadjusted"),
    "equivalent_holm": Column("Within margin? (Holm)", "bool", "TOST rejects at alpha after Holm adjustment"),
    "all_within_margin": Column("Every site within margin?", "bool", "intersection–union decision over sites"),
    "estimable": Column("Estimable?", "bool", "enough scans to estimate"),
    "preserved": Column("Effect preserved?", "bool", "effect after harmonization inside its original 95% CI"),
    "converged": Column("Converged?", "bool", "optimizer reported convergence"),
    "boundary": Column("Variance on boundary?", "bool", "a variance component is estimated at zero"),
    "optimizer": Column("Optimizer", "text", "optimizer of the fit that was kept"),
    # QC gate
    "series": Column("Series", "int", "series checked at upload"),
    "passed": Column("Passed", "int", "series that passed the QC gate"),
    "warned": Column("Warned", "int", "series that passed with a warning"),
    "failed": Column("Failed", "int", "series that failed"),
    "undetermined": Column("Undetermined", "int", "series the gate could not judge"),
    "unmatched": Column("No protocol", "int", "series that matched no locked protocol"),
    "open_deviations": Column("Open deviations", "int", "deviations not resolved by a passing re-scan"),
    "drift_events": Column("Drift events", "int", "protocol drift events"),
    "rejected_files": Column("Rejected files", "int", "files rejected at intake"),
    "n_failed": Column("Failed series", "int", "series the QC gate failed (scored for this comparison only)"),
    "n_kept": Column("Scans, gate passed", "int", "scans the gate passed: the report's analysis set"),
    "n_all": Column("Scans, with failed", "int", "scans the gate passed plus those it failed"),
    "mae_kept": Column("MAE, gate passed ({unit})", "num", "mean absolute error on the scans the gate passed (in "
                                                          "the between-site row: empty)"),
    "mae_kept_ci_low": Column("MAE CI lower, gate passed", "num", "lower 95% bootstrap limit"),
    "mae_kept_ci_high": Column("MAE CI upper, gate passed", "num", "upper 95% bootstrap limit"),
    "bias_kept": Column("Mean error, gate passed ({unit})", "num", "mean error (model − reference) on the scans "
                                                                  "the gate passed; between-site row: SD of the "
                                                                  "per-site mean errors"),
    "mae_all": Column("MAE, with failed ({unit})", "num", "mean absolute error with the failed series added"),
    "mae_all_ci_low": Column("MAE CI lower, with failed", "num", "lower 95% bootstrap limit"),
    "mae_all_ci_high": Column("MAE CI upper, with failed", "num", "upper 95% bootstrap limit"),
    "bias_all": Column("Mean error, with failed ({unit})", "num", "mean error with the failed series added; "
                                                                 "between-site row: SD of the per-site mean errors"),
    "mae_change": Column("MAE change ({unit})", "num", "MAE with the failed series minus MAE without them"),
    "rescans": Column("Re-scans", "int", "series that repeat an earlier series of the same study and protocol"),
    "median_minutes_to_rescan": Column("Median time to re-scan (min)", "num", "median minutes from the verdict "
                                                                              "on a series to its re-scan's verdict"),
    "revalidation": Column("Re-validation", "text", "'pending' while a software or scanner change the gate "
                                                   "recorded at the site is not covered by a signed report"),
    "verdict_id": Column("Verdict record", "int", "number of the gate's verdict record"),
    "series_key": Column("Series pseudonym", "text", "keyed pseudonym of the DICOM SeriesInstanceUID"),
    "study_key": Column("Study pseudonym", "text", "keyed pseudonym of the DICOM StudyInstanceUID"),
    "scanner_key": Column("Scanner", "text", "the gate's scanner key: vendor and serial-number pseudonym"),
    "field_strength": Column("Field strength (T)", "ratio", "DICOM MagneticFieldStrength"),
    "manufacturer": Column("Manufacturer", "text", "DICOM Manufacturer as the scanner wrote it"),
    "model": Column("Scanner model", "text", "DICOM ManufacturerModelName"),
    "protocol": Column("Protocol", "text", "the locked acquisition protocol the series matched"),
    "protocol_version": Column("Protocol version", "int", "version of the locked protocol"),
    "protocol_sha256": Column("Protocol SHA-256", "text", "identity of the locked protocol file"),
    "checked_utc": Column("Checked (UTC)", "text", "when the gate gave its verdict"),
    "n_files": Column("Files", "int", "DICOM files in the series"),
    "deviations": Column("Deviations", "int", "protocol deviations of the verdict"),
    "phi_attributes_present": Column("Identifying attributes present", "text", "names (never values) of the "
                                                                             "patient-identifying DICOM attributes "
                                                                             "the files carried"),
    "parameter": Column("Parameter", "text", "acquisition parameter (BIDS name)"),
    "expected": Column("Expected", "text", "the locked protocol's value and tolerance"),
    "observed": Column("Observed", "text", "the value in the series"),
    "rule": Column("Rule", "text", "how the protocol compares the parameter"),
    "severity": Column("Severity", "text", "fail or warn"),
    "resolved_by_rescan": Column("Resolved by re-scan?", "bool", "a later series of the same study passed"),
    "kind": Column("Kind", "text", "what changed: software, scanner, model, or an acquisition parameter"),
    "baseline": Column("Baseline", "text", "the value on the site's qualified scanner before the change"),
    "first_seen": Column("First seen (UTC)", "text", "when the gate first saw the change"),
    "original_series": Column("Original series", "text", "pseudonym of the series the re-scan repeats"),
    "original_status": Column("Original verdict", "text", "the gate's verdict on the original series"),
    "rescan_series": Column("Re-scan series", "text", "pseudonym of the re-scan"),
    "rescan_status": Column("Re-scan verdict", "text", "the gate's verdict on the re-scan"),
    "original_checked_utc": Column("Original checked (UTC)", "text", "when the original series was judged"),
    "rescan_checked_utc": Column("Re-scan checked (UTC)", "text", "when the re-scan was judged"),
    "minutes_to_rescan": Column("Time to re-scan (min)", "num", "minutes from the original's verdict to the "
                                                                "re-scan's verdict"),
    "before": Column("Before", "text", "software version or scanner before the change"),
    "after": Column("After", "text", "software version or scanner after the change"),
    "since_series": Column("First series after", "text", "pseudonym of the first series after the change"),
    "since_utc": Column("Since (UTC)", "text", "when the gate checked that series"),
    "this_report": Column("This report", "text", "whether this report's scans include the change"),
    # the evaluation and predictions tables (glossary only)
    "scan_id": Column("Scan", "text", "scan identifier"),
    "subject_id": Column("Subject", "text", "participant identifier"),
    "acquisition_date": Column("Acquisition date", "text", "date of the scan"),
    "software_upgraded": Column("After software upgrade", "bool", "1 when the scan is after its scanner's software "
                                                                  "change"),
    "age": Column("Age (years)", "ratio", "participant age"),
    "sex": Column("Sex", "text", "participant sex"),
    "group": Column("Group", "text", "clinical group"),
    "reference": Column("Reference ({unit})", "num", "reference-standard value"),
    "prediction": Column("Model output ({unit})", "num", "the model's measurement"),
    "error": Column("Error ({unit})", "num", "model output − reference"),
    "dice": Column("Dice", "ratio", "overlap of the model's and the reference segmentation"),
    "weights_sha256": Column("Weights SHA-256", "text", "identity of the model version's weights"),
    "image_sha256": Column("Image SHA-256", "text", "identity of the scored image"),
    # several biomarkers in one report: classification and segmentation overlap
    "biomarker": Column("Biomarker", "text", "the declared biomarker the row is about"),
    "label": Column("Label", "text", "label number in the segmentation"),
    "label_name": Column("Structure", "text", "name of the segmentation label"),
    "dice_mean": Column("Mean Dice", "auc", "mean Dice overlap of the model's and the reference label (1 is "
                                            "perfect)"),
    "dice_ci_low": Column("Dice CI lower", "auc", "lower 95% limit of the mean Dice"),
    "dice_ci_high": Column("Dice CI upper", "auc", "upper 95% limit of the mean Dice"),
    "hd95_median_mm": Column("HD95 median (mm)", "ratio", "median over scans of the 95th-percentile Hausdorff "
                                                          "distance between the model's and the reference label"),
    "hd95_p90_mm": Column("HD95 90th percentile (mm)", "ratio", "90th percentile over scans of the HD95"),
    "hd95_mm": Column("HD95 (mm)", "ratio", "95th-percentile Hausdorff distance between the model's and the "
                                            "reference label"),
    "volume_ml": Column("Label volume (ml)", "ratio", "volume of the model's label"),
    "reference_volume_ml": Column("Reference label volume (ml)", "ratio", "volume of the reference label"),
    "volume_error_ml": Column("Volume error (ml)", "ratio", "model's label volume − reference label volume"),
    "volume_error_mean_ml": Column("Mean volume error (ml)", "ratio", "mean of model − reference label volume"),
    "volume_error_sd_ml": Column("SD of volume error (ml)", "ratio", "standard deviation of the volume error"),
    "threshold": Column("Threshold", "ratio", "the pre-specified decision threshold of a class probability"),
    "n_dice_excluded": Column("Scans without a Dice", "int", "scans where both the model's and the reference label "
                                                             "are empty (Dice undefined), left out of the Dice summary"),
}


@dataclass(frozen=True)
class CI:
    """Two columns shown as one ``[low, high]`` column, with the interval's level in its header."""

    low: str
    high: str
    label: str = "95% CI"
    kind: str | None = None  # rounding; by default that of the ``low`` column


def fmt_p(p: Any) -> str:
    """p-values to two significant digits, floored at <0.001 (what a reader compares with alpha)."""
    if _missing(p):
        return "n.e."
    p = float(p)
    return "<0.001" if p < 0.001 else f"{p:.2g}" if p < 0.1 else f"{p:.2f}"


def fmt_value(value: Any, kind: str = "num") -> str:
    """One cell, rounded for reading: the CSV keeps every digit."""
    if _missing(value):
        return "n.e."
    if kind == "bool":
        return "Yes" if _truthy(value) else "No"
    if kind == "text":
        return str(value)
    if kind == "int":
        return f"{int(round(float(value)))}"
    if kind == "p":
        return fmt_p(value)
    if kind in ("percent", "share"):
        return f"{100 * float(value):.1f}%"
    if kind == "auc":
        return f"{float(value):.3f}"
    v = float(value)
    if kind == "ratio":
        return f"{v:.3g}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"
    # in the biomarker's unit: one decimal, three significant digits for small values
    return f"{v:.1f}" if abs(v) >= 1 or v == 0 else f"{v:.2g}"


def fmt_ci(low: Any, high: Any, kind: str = "num") -> str:
    if _missing(low) or _missing(high):
        return "n.e."
    return f"[{fmt_value(low, kind)}, {fmt_value(high, kind)}]"


def header(name: str, unit: str = "") -> str:
    """The human header of a column; an unregistered one is spelled out, never shown as a code name."""
    column = COLUMNS.get(name)
    text = column.header if column else name.replace("_", " ").strip().capitalize()
    return text.replace(" ({unit})", f" ({unit})" if unit else "").replace("{unit}", unit)


def readable(frame: pd.DataFrame, columns: Sequence[str | CI] | None = None, unit: str = "",
             headers: dict[str, str] | None = None, kinds: dict[str, str] | None = None) -> pd.DataFrame:
    """``frame``'s chosen columns as formatted text under human headers (CIs combined into one column).

    ``headers`` (and ``kinds``) override the registry for this table (e.g. "Within ±50 ml?"). At most
    :data:`MAX_COLUMNS` columns: a wider choice is a bug in the section, not a reader's problem.
    """
    headers, kinds = headers or {}, kinds or {}
    chosen = list(columns) if columns is not None else list(frame.columns)
    chosen = [c for c in chosen if (c.low in frame and c.high in frame if isinstance(c, CI) else c in frame)]
    if len(chosen) > MAX_COLUMNS:
        raise ValueError(f"a report table shows at most {MAX_COLUMNS} columns, got {len(chosen)}")
    out: dict[str, list[str]] = {}
    for c in chosen:
        if isinstance(c, CI):
            kind = c.kind or COLUMNS.get(c.low, Column("", "num")).kind
            title = headers.get(c.low, c.label if not unit or kind != "num" else f"{c.label} ({unit})")
            out[title] = [fmt_ci(lo, hi, kind) for lo, hi in zip(frame[c.low], frame[c.high])]
        else:
            kind = kinds.get(c, COLUMNS.get(c, Column("", "text")).kind)
            out[headers.get(c, header(c, unit))] = [fmt_value(v, kind) for v in frame[c]]
    return pd.DataFrame(out, index=range(len(frame)))


_SNAKE = re.compile(r"^[a-z0-9]+(_[a-z0-9]+)+$")


def is_code_name(text: str) -> bool:
    """True for a raw snake_case column name (what a header must never be)."""
    text = text.strip()
    return bool(_SNAKE.match(text)) or (text in COLUMNS and COLUMNS[text].header != text)


_TERM = re.compile(r"^C\((?P<var>[^)]+)\)\[T\.(?P<level>.+)\]$")
RESPONSES = {"error": "error (model − reference)", "prediction": "model output", "reference": "reference"}


def term_label(term: str) -> str:
    """A mixed-model term as a reader says it: ``C(vendor)[T.GE]`` -> "vendor GE (vs reference level)"."""
    if term == "Intercept":
        return "Intercept"
    if term == "software_upgraded":
        return "After the software upgrade"
    match = _TERM.match(term)
    if match:
        return f"{match['var'].replace('_', ' ')}: {match['level']}"
    return term.replace("_", " ")


def response_label(response: str) -> str:
    return RESPONSES.get(response, response.replace("_", " "))


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value) and not (isinstance(value, float) and math.isnan(value))
