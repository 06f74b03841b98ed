"""The report's sections, in order; each has a stable id the reporting checklist points at.

Each builder takes the :class:`ReportContent` and returns HTML. Methods name their
reference here, once, so the methods section and the results agree on what was done.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import replace
from functools import lru_cache
from importlib import resources
from typing import Any, Callable

import pandas as pd
import yaml

from sitebench.provenance import code_version, package_versions, utc_now
from sitebench.reports import figures
from sitebench.reports.content import (CLASSIFICATION, CONTINUOUS, LOCKED_PREDICTION_COLUMNS, SEGMENTATION,
                                       ReportContent, biomarker_label, evaluation_for, frame, only)
from sitebench.reports.lock import LOCK_FILE
from sitebench.reports.summary import Decision, decisions
from sitebench.reports.sweep_section import (TITLES, number_text, plot_error_vs_deviation, sweep_margin,
                                             tolerance_sentence)
from sitebench.reports.tables import (CI, COLUMNS, MAX_COLUMNS, fmt_ci, fmt_p, fmt_value, readable, response_label,
                                      term_label)
from sitebench.stratification.evaluation import variance_shares
from sitebench.stratification.metrics import METRICS



# --------------------------------------------------------------------------- page primitives


def _png(fig: Any) -> bytes:
    """Encode a figure as PNG for embedding, then close it (a report draws dozens of figures)."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", bbox_inches="tight", metadata={"Software": None})
    finally:
        figures.pyplot().close(fig)
    return buffer.getvalue()


def _figure(fig: Any, alt: str, caption: str) -> str:
    """A figure with its caption: the caption says what the reader should look for."""
    data = base64.b64encode(_png(fig)).decode()
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"/>'
            f"<figcaption><b>{html.escape(alt)}.</b> {html.escape(caption)}</figcaption></figure>")


def _html_table(frame: pd.DataFrame, css_class: str = "") -> str:
    """An already readable frame (text cells, human headers) as an HTML table."""
    if len(frame.columns) > MAX_COLUMNS:
        raise ValueError(f"a report table shows at most {MAX_COLUMNS} columns, got {len(frame.columns)}")
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    cls = f" class='{css_class}'" if css_class else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _table(frame: pd.DataFrame, columns: list[str | CI] | None = None, unit: str = "",
           headers: dict[str, str] | None = None, kinds: dict[str, str] | None = None, css_class: str = "") -> str:
    """A result table as a reader sees it: chosen columns, human headers with units, rounded cells."""
    return _html_table(readable(frame, columns, unit, headers, kinds), css_class)


#: Screen styles; sizes are under ``@media screen`` so that the PDF's page styles (``pdf.PAGE_CSS``) govern print.
CSS = """
body{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;color:#222}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}figure{margin:1em 0}
figcaption{color:#444}.meta{color:#555}
.finding{background:#f6f8fa;border-left:4px solid #1b6ca8;padding:.4em .8em;margin:.4em 0}
td{overflow-wrap:anywhere}
table.decisions td,table.decisions th{text-align:left;vertical-align:top}
table.decisions td.met{color:#1d6b2a;font-weight:bold}table.decisions td.not-met{color:#a3271f;font-weight:bold}
table.decisions tr.topic td{background:#f6f8fa}
table.text td,table.text th,table.checklist td{text-align:left;vertical-align:top}
.glossary p{margin:0 0 .2em 0;break-inside:avoid}table.files td:first-child{white-space:nowrap}
@media screen{
body{max-width:1100px;margin:2em auto;font-size:14px}h1{font-size:1.6em;margin-bottom:0}h2{margin-top:2em}
table{font-size:12px}td,th{padding:2px 6px}img{max-width:100%}figcaption{font-size:12px;max-width:60em}
.meta{font-size:12px}code{font-size:11px}.glossary{columns:2;font-size:11px}}
"""

#: How each agreement metric reads in a table, and how its cells are rounded.
METRIC_LABELS: dict[str, tuple[str, str]] = {
    "mae": ("MAE ({unit})", "num"), "bias": ("Bias ({unit})", "num"), "rmse": ("RMSE ({unit})", "num"),
    "pearson_r": ("Pearson r", "ratio"), "dice": ("Dice", "auc")}


def _pivot_metrics(metrics: pd.DataFrame, stratum: str, metric_names: tuple[str, ...], unit: str) -> pd.DataFrame:
    """One row per model and level, one ``estimate [95% CI]`` column per metric, human headers."""
    rows = metrics[(metrics["stratum"] == stratum) & metrics["metric"].isin(metric_names)].copy()

    def cell(r: pd.Series) -> str:
        kind = METRIC_LABELS.get(r["metric"], ("", "num"))[1]
        if not r["estimable"] or pd.isna(r["estimate"]):
            return "n.e."
        if pd.isna(r["ci_low"]):
            return fmt_value(r["estimate"], kind)
        return f"{fmt_value(r['estimate'], kind)} {fmt_ci(r['ci_low'], r['ci_high'], kind)}"

    rows["value"] = rows.apply(cell, axis=1) if len(rows) else pd.Series(dtype=str)
    wide = rows.pivot_table(index=["model_key", "level", "n_scans"], columns="metric", values="value",
                            aggfunc="first").reset_index()
    wide.columns.name = None
    shown = [m for m in metric_names if m in wide]
    level = {"vendor": "Vendor", "site": "Site", "software_version": "Software version", "overall": "Level"}
    out = readable(wide, ["model_key", "level", "n_scans"], unit, {"level": level.get(stratum, "Level")})
    for m in shown:
        label = METRIC_LABELS.get(m, (m, "num"))[0].replace("{unit}", unit)
        out[f"{label}, 95% CI"] = wide[m].fillna("n.e.").to_numpy()
    return out


# --------------------------------------------------------------------------- sections

#: (statistic, how it is computed here, reference) — printed in the methods section.
METHODS: tuple[tuple[str, str, str], ...] = (
    ("Per-stratum agreement (MAE, bias, RMSE, Pearson r, Dice)",
     "point estimates per site, vendor and software version; 95% percentile bootstrap CIs resampling scans "
     "within site (by subject where subjects repeat), Rao–Wu rescaled (k−1 of k draws); levels with fewer "
     "than 3 scans are not estimable",
     "Efron & Tibshirani 1993, An Introduction to the Bootstrap; Rao & Wu 1988, JASA 83:231"),
    ("Bland–Altman agreement",
     "difference (model − reference) against the mean, bias and 95% limits of agreement",
     "Bland & Altman 1986, Lancet 327:307"),
    ("Calibration of a continuous biomarker",
     "reference = a + b·prediction by least squares, overall and per vendor; calibration-in-the-large is "
     "mean(reference − prediction); standard errors cluster-robust by site",
     "Van Calster et al. 2019, BMC Med 17:230; Liang & Zeger 1986, Biometrika 73:13"),
    ("Scanner effects (variance components)",
     "linear mixed model by REML: random intercept per site, variance component for scanner within site, "
     "fixed effects for vendor, software upgrade, age, sex and group; Wald 95% CIs; the fitting code is "
     "checked against lme4 in the test suite",
     "Patterson & Thompson 1971, Biometrika 58:545; Bates et al. 2015, J Stat Softw 67(1)"),
    ("Scanner software upgrade",
     "within each site whose scanner software changed: error after vs before, Welch 95% CI; the same "
     "effect as the software_upgraded term of the mixed model",
     "Welch 1947, Biometrika 34:28"),
    ("Harmonization",
     "ComBat location/scale adjustment of the model output across sites, keeping age, sex and group; "
     "site share of variance before and after, and whether each covariate effect stays inside its "
     "pre-harmonization 95% CI (one feature, so no empirical-Bayes pooling); checked against the authors' "
     "reference outputs in the test suite",
     "Johnson, Li & Rabinovic 2007, Biostatistics 8:118; Fortin et al. 2018, NeuroImage 167:104"),
    ("Per-site equivalence",
     "each site's mean error against the other sites' by two one-sided Welch t-tests with the pre-specified "
     "margin; all sites within the margin by intersection–union; per-site claims Holm-adjusted",
     "Schuirmann 1987, J Pharmacokinet Biopharm 15:657; Berger 1982, Technometrics 24:295; "
     "Holm 1979, Scand J Stat 6:65"),
    ("Comparison of two model versions",
     "absolute error paired by scan: per-site mean difference with paired-t 95% CI, paired TOST with the "
     "pre-specified margin, Wilcoxon signed-rank p; discrimination of the endpoint by paired DeLong test "
     "(checked against pROC in the test suite)",
     "DeLong, DeLong & Clarke-Pearson 1988, Biometrics 44:837; Wilcoxon 1945, Biometrics Bull 1:80"),
    ("Quantitative imaging biomarker terms",
     "bias, linearity, repeatability and reproducibility in the QIBA sense",
     "Raunig et al. 2015, Stat Methods Med Res 24:27"),
)

STANDARD_LIMITATIONS = (
    "Per-stratum CIs come from a bootstrap over few scans per site; with under about 10 scans per site they "
    "are approximate and tend to be slightly narrow.",
    "The reference standard is itself a measurement; disagreement is model − reference, not model − truth.",
    "The mixed model has random intercepts only: sites and scanners shift the biomarker, but their effect is "
    "assumed not to depend on age, sex or group.",
    "Harmonization is reported, not applied: the performance tables are of the unharmonized output.",
    "Results hold for the scanners, software versions and population of this trial; another vendor, "
    "software version or population needs its own evidence.",
)


def _section(section_id: str, title: str, body: str) -> str:
    return f"<section id='{section_id}'><h2>{html.escape(title)}</h2>{body}</section>"


def _p(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def _summary(c: ReportContent) -> str:
    """The first page: intended use and every pre-specified decision with its number (from ``summary``).

    Decisions sharing a question and criterion are one group: the question once, then a row per version.
    """
    ev = c.evaluation
    plan = ev.plan
    body = (f"<p><b>Intended use.</b> {html.escape(c.intended_use)}</p>" if c.intended_use
            else _p("Intended use: not stated in the benchmark spec (report.intended_use)."))
    scans = ev.table.drop_duplicates("scan_id")
    models = list(dict.fromkeys(ev.table["model_key"]))
    markers = c.biomarker_entries()
    if markers:
        described = "; ".join(f"{biomarker_label(m)}, {_analysis_words(m)}" for m in markers)
        body += _p(f"{len(models)} model versions ({', '.join(models)}) on {len(scans)} scans from "
                   f"{scans['site'].nunique()} sites and {scans['vendor'].nunique()} scanner vendors, for "
                   f"{len(markers)} biomarker{'s' if len(markers) != 1 else ''}: {described}. Errors are "
                   "model − reference. Margins, thresholds and "
                   f"tests were pre-specified (alpha {plan.alpha:g}) in the locked analysis plan.")
        found = decisions(ev, c.unit, biomarkers=markers, overlap=overlap_by_stratum(c))
    else:
        body += _p(f"{len(models)} model versions ({', '.join(models)}) on {len(scans)} scans from "
                   f"{scans['site'].nunique()} sites and {scans['vendor'].nunique()} scanner vendors, against the "
                   f"reference standard (manifest column {c.reference}); errors are model − reference. Margins and tests were pre-specified "
                   f"(alpha {plan.alpha:g}) in the locked analysis plan.")
        found = decisions(ev, c.unit)
    rows, group = [], None
    for d in found:
        if (d.topic, d.claim, d.criterion) != group:
            group = (d.topic, d.claim, d.criterion)
            link = f" <a href='#{d.section}'>→ details</a>" if d.section else ""
            rows.append(f"<tr class='topic'><td colspan='4'><b>{html.escape(d.topic)}.</b> {html.escape(d.claim)} "
                        f"<i>{'Pre-specified' if d.prespecified else 'Chosen as'}: {html.escape(d.criterion)}.</i>{link}"
                        "</td></tr>")
        cls = {True: "met", False: "not-met"}.get(d.met, "")
        rows.append(f"<tr><td>{html.escape(d.model)}</td><td class='{cls}'>{html.escape(_result_word(d))}</td>"
                    f"<td>{html.escape(d.number())}</td><td>{html.escape(d.detail)}</td></tr>")
    body += ("<table class='decisions'><colgroup><col style='width:16%'/><col style='width:11%'/>"
             "<col style='width:22%'/><col style='width:51%'/></colgroup><thead><tr><th>Model version</th>"
             "<th>Result</th><th>Estimate (CI)</th><th>Detail</th></tr></thead><tbody>" + "".join(rows) +
             "</tbody></table>")
    body += ("<p class='meta'>Met / not met: the claim against its pre-specified margin. Equivalence intervals "
             f"are {100 * (1 - 2 * plan.alpha):g}% (two one-sided tests at alpha {plan.alpha:g}); other intervals "
             "95%. Every number is a cell of a locked table in tables/ (see the appendix).</p>")
    return _section("summary", "Summary of pre-specified decisions", body)


def _analysis_words(marker: dict[str, Any]) -> str:
    """What a biomarker is compared with, in words (for the first page and the methods)."""
    column, positive = marker.get("reference_column"), marker.get("reference_positive")
    if (marker.get("analysis") or CONTINUOUS) == CLASSIFICATION:
        target = f"{column} = {positive}" if column and positive is not None else column or "the reference class"
        threshold = marker.get("threshold")
        return f"a class probability against {target}" + (f", threshold {threshold:g}" if threshold is not None
                                                           else "")
    if column:
        return f"measured against manifest column {column}"
    labels = marker.get("reference_labels")
    return "measured against the reference segmentation" + (f" (labels {', '.join(map(str, labels))})"
                                                             if labels else "")


def _result_word(d: Decision) -> str:
    return {True: "Met", False: "Not met"}.get(d.met, d.result[:1].upper() + d.result[1:])


def _findings(c: ReportContent) -> str:
    if not c.findings:
        return ""
    return "<section id='findings'><h2>Key findings</h2>" + "".join(
        f"<div class='finding'>{html.escape(f)}</div>" for f in c.findings) + "</section>"


def _intended_use(c: ReportContent) -> str:
    body = _p(c.intended_use) if c.intended_use else _p("Not stated in the benchmark spec (report.intended_use).")
    if c.population:
        body += f"<p><b>Population and setting.</b> {html.escape(c.population)}</p>"
    body += ("<p><b>What this report is for.</b> External validation of locked model versions on this trial's "
             "data: does each version measure the biomarker consistently across sites, scanner vendors and "
             "scanner software versions, and is that enough for its intended use? No model is trained or "
             "tuned on these data.</p>")
    return _section("intended-use", "1. Intended use", body)


def _models(c: ReportContent) -> str:
    rows = []
    for m in c.models:
        training = m.get("training") or {}
        trained = [str(training["vendor"])] if training.get("vendor") else []
        if training.get("n_scans"):
            trained.append(f"{training['n_scans']} scans")
        if training.get("augmentation"):
            trained.append(f"augmentation: {training['augmentation']}")
        rows.append({"Model version": m["key"], "Kind": m["kind"], "Source": m.get("source", "-"),
                     "Trained on": ", ".join(trained) or "-",
                     "Training code (git)": str(training.get("code_commit") or "-")[:12],
                     "Weights SHA-256": m["weights_sha256"], "Registry": m.get("registered", "-")})
    body = _html_table(pd.DataFrame(rows), "text")
    lineage = []
    for m in c.models:
        changes = "; ".join(f"{v}: {t}" for v, t in (m.get("changelog") or {}).items())
        if m.get("description") or changes:
            lineage.append(f"<li><b>{html.escape(m['key'])}</b>: {html.escape(m.get('description', ''))}"
                           f"{' — changelog: ' + html.escape(changes) if changes else ''}</li>")
    if lineage:
        body += "<p>Lineage:</p><ul>" + "".join(lineage) + "</ul>"
    body += _model_cards(c)
    body += ("<p class='meta'>The weights SHA-256 is the identity of a version: the lock binds this report to "
             "exactly these files, and promotion to <code>@validated</code> checks it.</p>")
    return _section("models", "2. Model versions and lineage", body)


#: Lineage keys that make a model card (a lineage dict without any of them is from before model cards).
CARD_KEYS = ("licence", "citation", "biomarkers", "files", "training_data", "package")


def _short(digest: Any) -> str:
    text = str(digest or "")
    return text[:12] + "…" if len(text) > 12 else text or "-"


def _model_cards(c: ReportContent) -> str:
    """Each version's card: name, version, source, licence, citation, intended biomarkers, training data, files."""
    if not any(m.get(k) not in (None, "", [], {}) for m in c.models for k in CARD_KEYS):
        return ""
    body = "<h3>Model cards</h3>"
    for m in c.models:
        training = m.get("training") or {}
        known = [f"{training['n_scans']} scans" if training.get("n_scans") else "",
                 f"vendor {training['vendor']}" if training.get("vendor") else "",
                 "cross-vendor augmentation" if training.get("augmentation") else ""]
        data = m.get("training_data") or "; ".join(k for k in known if k) or "not stated"
        files = m.get("files") or {}
        shown = ", ".join(f"{path} {_short(d)}" for path, d in sorted(files.items())[:6])
        if len(files) > 6:
            shown += f", and {len(files) - 6} more"
        package = " ".join(str(v) for v in (m.get("package"), m.get("package_version")) if v)
        rows = [("Name", m.get("name") or m["key"]), ("Version", m.get("version") or "-"),
                ("Source", m.get("source") or "-"), ("Licence", m.get("licence") or "not stated"),
                ("Citation", m.get("citation") or "not stated"),
                ("Intended biomarkers", ", ".join(map(str, m.get("biomarkers") or [])) or "not stated"),
                ("Training data", data)]
        if package:
            rows.append(("Package", package))
        rows.append(("Files (SHA-256, shortened; in full in the appendix)",
                     shown or f"weights {_short(m.get('weights_sha256'))}"))
        if m.get("files_sha256"):
            rows.append(("All files, one digest", _short(m["files_sha256"])))
        body += _html_table(pd.DataFrame(rows, columns=["Model card", m["key"]]), "text")
    return body


def _data(c: ReportContent) -> str:
    ev = c.evaluation.table
    scans = ev.drop_duplicates("scan_id")
    cols = [x for x in ("site", "vendor", "scanner_model", "software_version") if x in scans]
    counts = scans.groupby(cols).size().rename("scans").reset_index()
    body = _p(f"{len(scans)} scans of {scans['subject_id'].nunique() if 'subject_id' in scans else 'n/a'} "
              f"subjects from {scans['site'].nunique()} sites, {scans['vendor'].nunique()} vendors and "
              f"{scans['software_version'].nunique()} scanner software versions; reference standard: "
              f"{c.reference}.")
    if "acquisition_date" in scans:
        dates = scans["acquisition_date"].dropna().astype(str)
        if len(dates):
            body += _p(f"Scans acquired from {dates.min()} to {dates.max()}.")
    body += "<h3>Scans per site, vendor, scanner model and software version</h3>" + _table(counts)
    chars = {}
    if "age" in scans:
        chars["Age (years), mean (SD)"] = scans.groupby("site")["age"].agg(
            lambda a: f"{a.mean():.1f} ({a.std():.1f})")
    for column in ("sex", "group"):
        if column in scans:
            chars[column.capitalize()] = scans.groupby("site")[column].agg(
                lambda v: ", ".join(f"{k} {n}" for k, n in v.value_counts().sort_index().items()))
    if chars:
        frame = pd.DataFrame(chars).reset_index().rename(columns={"site": "Site"})
        body += "<h3>Participant characteristics per site</h3>" + _html_table(frame)
    body += _qc(c)
    return _section("data", "3. Data provenance", body)


def _qc(c: ReportContent) -> str:
    body = "<section id='qc'><h3>Upload-time QC gate, per site</h3>"
    if c.qc is None or not c.qc.available:
        source = c.qc.source if c.qc is not None else "none supplied"
        return body + _p(f"Source: {source}.") + "</section>"
    body += _p(f"Source: {c.qc.source}. Counts are of series checked against the locked acquisition "
               "protocol; open deviations are those not resolved by a later passing re-scan. Every column is in "
               "tables/qc_by_site.csv.")
    table = c.qc.table.copy()

    def joined(*names: str) -> pd.Series:
        present = [n for n in names if n in table]
        return table[present].apply(lambda r: " / ".join(fmt_value(v, "int") for v in r), axis=1) if present \
            else pd.Series(["-"] * len(table))

    table["verdicts"] = joined("passed", "warned", "failed")
    table["not_judged"] = joined("undetermined", "unmatched")
    table["problems"] = joined("open_deviations", "drift_events")

    def rescans(row: pd.Series) -> str:
        if pd.isna(row.get("rescan_rate")):
            return "-"
        text = f"{fmt_value(row.get('rescans'), 'int')} ({fmt_value(row['rescan_rate'], 'percent')})"
        minutes = row.get("median_minutes_to_rescan")
        return text + (f", median {fmt_value(minutes, 'num')} min" if minutes is not None and pd.notna(minutes)
                       else "")

    table["rescan_summary"] = table.apply(rescans, axis=1)
    body += _table(table, ["site", "series", "verdicts", "not_judged", "problems", "rescan_summary",
                           "rejected_files", "revalidation"],
                   headers={"verdicts": "Passed / warned / failed", "not_judged": "Undetermined / no protocol",
                            "problems": "Open deviations / drift events",
                            "rescan_summary": "Re-scans (rate), median time to re-scan"},
                   kinds={"rescan_summary": "text", "problems": "text"})
    if c.qc.from_gate:
        body += _qc_records(c)
    return body + "</section>"


def _qc_records(c: ReportContent) -> str:
    """The gate's own records behind the per-site counts: re-validation, drift, deviations, re-scans."""
    qc = c.qc
    body = ""
    if len(qc.revalidation):
        body += "<h3>Re-validation pending</h3>" + _p(
            "The gate recorded a software or scanner change at these sites. Until a signed validation report "
            "covers the site's new software version (or new scanner), the site is marked re-validation pending; "
            "the before/after comparison at the site is in section 10. Every row is in "
            "tables/qc_revalidation.csv.")
        body += _table(qc.revalidation, ["site", "kind", "before", "after", "since_utc", "this_report"])
    body += "<h3>Drift events</h3>"
    if len(qc.drift):
        body += _p("Each change the gate's drift monitor raised against the site's qualified baseline, on the first "
                   "series that showed it (series are named by pseudonym). Every row is in "
                   "tables/qc_drift_events.csv.")
        drift = qc.drift.assign(series_key=qc.drift["series_key"].astype(str).str[:12])
        body += _table(drift, ["site", "kind", "parameter", "baseline", "observed", "series_key", "first_seen"])
    else:
        body += _p("The gate raised no drift events.")
    body += "<h3>Protocol deviations</h3>"
    deviations = qc.deviations
    if len(deviations):
        grouped = (deviations.assign(observed=deviations["observed"].astype(str))
                   .groupby(["site", "parameter", "rule", "severity"], sort=True)
                   .agg(series=("series_key", "nunique"), expected=("expected", "first"),
                        observed=("observed", lambda v: ", ".join(sorted(set(v))[:3]) + (" …" if v.nunique() > 3
                                                                                          else "")),
                        resolved_by_rescan=("resolved_by_rescan", "sum"))
                   .reset_index())
        body += _p(f"{len(deviations)} deviations on {deviations['series_key'].nunique()} series, grouped by site "
                   "and parameter (each with the protocol's expected value and the values observed); a deviation "
                   "is resolved when a later series of the same study passed. Every deviation is in "
                   "tables/qc_deviations.csv, and every verdict record the counts come from is in "
                   "tables/qc_verdicts.csv.")
        body += _table(grouped, ["site", "parameter", "expected", "observed", "rule", "severity", "series",
                                 "resolved_by_rescan"],
                       headers={"series": "Series", "resolved_by_rescan": "Resolved by re-scan"},
                       kinds={"resolved_by_rescan": "int"})
    else:
        body += _p("The gate recorded no protocol deviations.")
    rescans = qc.rescans
    if len(rescans):
        per_site = (rescans.assign(passed=rescans["rescan_status"].isin(["pass", "warn"]))
                    .groupby("site", sort=True)
                    .agg(rescans=("rescan_series", "size"), passed=("passed", "sum"),
                         median_minutes_to_rescan=("minutes_to_rescan", "median")).reset_index())
        body += "<h3>Re-scans</h3>" + _p(
            "A re-scan repeats an earlier series of the same study and protocol; its time is from the gate's "
            "verdict on the series it repeats to the verdict on the re-scan. Every re-scan is in "
            "tables/qc_rescans.csv.")
        body += _table(per_site, ["site", "rescans", "passed", "median_minutes_to_rescan"],
                       headers={"passed": "Re-scans passed"})
    return body


def _gate_effect(c: ReportContent) -> str:
    """The biomarker's error with and without the series the gate failed (``stratification.gate_effect``)."""
    effect = c.gate_effect
    if effect is None:
        if c.qc is not None and c.qc.from_gate:
            return _section("gate-effect", "3a. What the QC gate changed", _p(
                "The series the gate failed were not scored (the spec names no report.failed_manifest), so their "
                "effect on the biomarker is not shown."))
        return ""
    if effect.empty:
        return _section("gate-effect", "3a. What the QC gate changed", _p(
            "The gate failed no series of the trial's protocol, so the analysis set is every series received."))
    body = _p("The series the gate failed were scored too, by every model version that scores every scan. Each "
              "row compares the error on the scans the gate passed (the analysis set of this report) with the "
              "error on those plus the failed ones. A site's mean error is its site effect; the last row of each "
              "version is the spread of the site effects (SD of the per-site mean errors). The failed series are "
              "the ones the gate stopped, not a random sample, so the comparison is descriptive. Every column is in "
              "tables/gate_effect.csv.")
    affected = set(effect.loc[(effect["stratum"] == "site") & (effect["n_failed"] > 0), "level"])
    shown = effect[(effect["stratum"] != "site") | effect["level"].isin(affected)].copy()
    shown["where"] = [("Between-site SD of mean error" if s == "site_bias_sd" else "All sites" if s == "overall"
                       else str(level)) for s, level in zip(shown["stratum"], shown["level"])]
    markers = {m["name"]: m for m in c.biomarker_entries()}
    for (key, name), part in shown.groupby(["model_key", "biomarker"], sort=False):
        unit = (markers.get(name) or {}).get("unit") or c.unit
        body += f"<h3>{html.escape(str(key))}{' — ' + html.escape(str(name)) if name else ''}</h3>"
        body += _table(part, ["where", "n_failed", "n_kept", "mae_kept", "bias_kept", "n_all", "mae_all", "bias_all"],
                       unit, headers={"where": "Where"})
    return _section("gate-effect", "3a. What the QC gate changed", body)


def sweep_section_html(table: pd.DataFrame, tolerances: pd.DataFrame, unit: str) -> str:
    """The sweep as a report section body: what was varied, one sentence per model version, the figure
    and the table of mean error and MAE per level, all under human headers."""
    if table.empty:
        return _p("No acquisition sweep was run.")
    parameter = str(table["parameter"].iloc[0])
    label = str(table["deviation_label"].iloc[0]) if "deviation_label" in table else "deviation"
    margin = sweep_margin(table, tolerances)
    n = int(table["n"].max())
    levels = ", ".join(number_text(d) for d in sorted(table["deviation"].astype(float).unique()))
    title = TITLES.get(parameter, parameter.replace("_", " "))
    criterion = str(tolerances["criterion"].iloc[0]) if "criterion" in tolerances and len(tolerances) else ""
    parts = [
        f"<h3>{html.escape('Tolerance of ' + title)}</h3>",
        _p(f"The same {n} simulated subjects were imaged at each deviation of {label}: {levels} (0 is the "
           f"locked protocol), and every model version measured each scan. A deviation is tolerated when the "
           f"90% confidence interval of the mean error against the simulated truth lies inside "
           f"±{number_text(margin)} {unit}, at that deviation and every smaller one tested."),
    ]
    parts += [f"<p class='finding'>{html.escape(tolerance_sentence(row, margin, unit))}</p>"
              for row in tolerances.to_dict("records")]
    fig = plot_error_vs_deviation(table, margin, unit=unit)
    parts.append(_figure(fig, f"Error against {label}",
                         f"Mean error (model − truth) per model version with its 90% bootstrap CI; the shaded "
                         f"band is the ±{number_text(margin)} {unit} margin. A curve leaving the band marks the "
                         "deviation the biomarker no longer tolerates."))
    shown = table.assign(within=lambda f: f["within_margin"].map({True: "yes", False: "no"}))
    parts.append(_table(shown, ["model", "deviation", "n", "mean_error", CI("mean_error_lo", "mean_error_hi",
                                                                             "90% CI of mean error"),
                                "mae", CI("mae_lo", "mae_hi", "90% CI of MAE"), "within"], unit=unit,
                        headers={"model": "Model version", "deviation": label[:1].upper() + label[1:],
                                 "n": "Scans", "mean_error": f"Mean error ({unit})", "mae": f"MAE ({unit})",
                                 "within": f"Within ±{number_text(margin)} {unit}?"},
                        kinds={"deviation": "ratio", "within": "text", "mean_error": "num", "mae": "num"}))
    rules = tolerances.assign(
        tolerated=[("none" if pd.isna(v) else number_text(v)) for v in tolerances["largest_within_margin"]],
        rule_text=[r or "-" for r in tolerances["rule"].fillna("")])
    parts.append(_html_table(pd.DataFrame({
        "Model version": rules["model"], f"Largest tolerated ({label})": rules["tolerated"],
        "Suggested protocol rule": rules["rule_text"]}), "text"))
    note = ("The suggestion is only as fine as the deviations tested, and rests on simulated subjects; a "
            "model biased at the protocol can look tolerant in the direction that offsets its bias, so read the "
            "curve as well as the number. A physicist reviews a suggested rule before it enters a locked protocol.")
    if criterion:
        note += f" Criterion: {criterion}."
    parts.append(_p(note))
    return "".join(parts)



def _tolerances(c: ReportContent) -> str:
    """Tolerances derived from the biomarker: each acquisition sweep's error curve and suggested rule."""
    if not c.sweeps:
        return ""
    body = _p("How far an acquisition parameter may deviate from the locked protocol before the biomarker's error "
              "leaves the equivalence margin, from seeded simulations with known truth (sitebench simulate sweep). "
              "Each suggested rule is written in the locked protocol's syntax, for the gate's tolerances to rest on "
              "evidence about the biomarker. Every row is in tables/sweep_table.csv and "
              "tables/sweep_tolerances.csv.")
    units = {m.get("unit") for m in c.biomarker_entries() if m.get("name") == "gm_volume_ml"}
    unit = next(iter(units - {None}), c.unit)
    for table, tolerances in c.sweeps:
        body += sweep_section_html(table, tolerances, unit)
    return _section("tolerances", "Acquisition tolerances", body)


def _methods(c: ReportContent) -> str:
    plan = c.evaluation.plan
    body = _p(f"Pre-specified analysis (locked in {LOCK_FILE}, re-derivable with `sitebench report verify "
              f"--recompute`): strata {', '.join(s.replace('_', ' ') for s in plan.strata)}; {plan.bootstrap} "
              f"bootstrap replicates, seed {plan.seed}; alpha {plan.alpha}; equivalence margin "
              f"{plan.equivalence_margin if plan.equivalence_margin is not None else 'not pre-specified'} {c.unit}; "
              f"comparison margin {plan.comparison_margin if plan.comparison_margin is not None else 'none'} "
              f"{c.unit}.")
    table = c.evaluation.table
    missing = table[table["reference"].isna() | table["prediction"].isna()].groupby("model_key").size()
    dropped = ("none" if missing.empty else
               ", ".join(f"{key}: {n} scan(s)" for key, n in missing.items()))
    body += _p(f"Missing data: scans without a reference value or a prediction are left out of that model's "
               f"analyses, not imputed; left out: {dropped}. Sample size: the trial's scans as they are; "
               "strata too small to estimate are marked n.e. (not estimable), never filled in.")
    methods = list(METHODS)
    markers = c.biomarker_entries()
    if markers:
        rows = [{"Biomarker": m["name"], "Analysis": m.get("analysis") or CONTINUOUS,
                 "Unit": m.get("unit") or "-", "Reference standard": _analysis_words(m),
                 "Threshold": fmt_value(m.get("threshold"), "ratio") if m.get("threshold") is not None else "-",
                 "Equivalence margin": (f"±{m['equivalence_margin']:g} {m.get('unit') or ''}".strip()
                                        if m.get("equivalence_margin") is not None else "-"),
                 "Description": m.get("description") or "-"} for m in markers]
        body += "<h3>Biomarkers (pre-specified)</h3>" + _html_table(pd.DataFrame(rows), "text")
        kinds = kinds_present(c)
        methods = [row for row in methods if CONTINUOUS in kinds or row[0].startswith("Quantitative")]
        if CLASSIFICATION in kinds:
            methods += list(CLASSIFICATION_METHODS)
        if SEGMENTATION in kinds:
            methods += list(OVERLAP_METHODS)
    body += _html_table(pd.DataFrame(methods, columns=["Statistic", "How it is computed here", "Reference"]),
                        "text")
    return _section("methods", "4. Methods", body)


#: Methods of a classification biomarker (printed when the report has one).
CLASSIFICATION_METHODS: tuple[tuple[str, str, str], ...] = (
    ("Discrimination (AUC)",
     "area under the ROC curve of the class probability, overall and per site, vendor and software version; "
     "DeLong 95% CI; levels with too few scans of a class are not estimable; two versions on the same scans by "
     "the paired DeLong test",
     "DeLong, DeLong & Clarke-Pearson 1988, Biometrics 44:837; Sun & Xu 2014, IEEE Signal Process Lett 21:1389"),
    ("Sensitivity and specificity",
     "at the pre-specified threshold (positive when the probability is at least the threshold); exact "
     "Clopper–Pearson 95% CIs",
     "Clopper & Pearson 1934, Biometrika 26:404"),
    ("Calibration of a probability",
     "logistic recalibration: calibration intercept (logit(y) ~ offset(logit(p))) and slope (logit(y) ~ "
     "logit(p)), Wald 95% CIs; intercept 0 and slope 1 are ideal",
     "Van Calster et al. 2019, BMC Med 17:230; Cox 1958, Biometrika 45:562"),
)
#: Methods of the segmentation overlap (printed when the report has overlap scores).
OVERLAP_METHODS: tuple[tuple[str, str, str], ...] = (
    ("Segmentation overlap",
     "per label and scan: Dice coefficient, 95th-percentile Hausdorff distance (HD95, mm) and volume error "
     "(model − reference, ml); per stratum the mean Dice with its 95% CI, the median and 90th percentile of "
     "HD95, and the mean and SD of the volume error",
     "Dice 1945, Ecology 26:297; Maier-Hein et al. 2024, Nat Methods 21:195 (Metrics Reloaded)"),
)


def _strata_body(c: ReportContent) -> str:
    metrics, unit = c.evaluation.metrics, c.unit
    body = ("<p>How each model version does at each vendor (a model trained on one vendor shows here whether "
            "it transfers), then bias per site with 95% CIs. MAE: mean absolute error; bias: mean error "
            "(model − reference); RMSE: root mean squared error. n.e.: not estimable.</p>")
    body += _figure(figures.vendor_transfer_plot(metrics, "mae", unit), "Mean absolute error by vendor",
                    "Each bar is one version's mean absolute error at one vendor, with its 95% CI. A version that "
                    "transfers across vendors has bars of similar height; a bar well above the others marks a "
                    "vendor that version does not handle.")
    if "dice" in set(metrics["metric"]):
        body += _figure(figures.vendor_transfer_plot(metrics, "dice", "Dice"), "Dice by vendor",
                        "Each bar is one version's mean Dice overlap with the reference segmentation at one vendor "
                        "(1 is perfect), with its 95% CI; a lower bar marks a vendor where the segmentation "
                        "degrades.")
    body += _html_table(_pivot_metrics(metrics, "vendor", METRICS, unit))
    body += _figure(figures.forest_plot(metrics, "bias", "site", unit), "Bias per site",
                    "Each point is one version's mean error (model − reference) at a site, with its 95% CI. Points "
                    "right of the dashed zero line over-estimate, left under-estimate; an interval that does not "
                    "cross zero is a site bias, and points far from the others mark a site that differs.")
    body += _html_table(_pivot_metrics(metrics, "site", METRICS, unit))
    if "software_version" in set(metrics["stratum"]):
        body += "<h3>By scanner software version</h3>" + _html_table(
            _pivot_metrics(metrics, "software_version", METRICS, unit))
    return body


def _agreement_body(c: ReportContent) -> str:
    body = _figure(figures.bland_altman(c.evaluation.table, c.unit), "Bland–Altman agreement",
                   "Each point is a scan: its difference (model − reference) against the mean of the two, coloured "
                   "by vendor; one panel per version. The solid line is the mean bias and the dashed lines the 95% "
                   "limits of agreement. A sloping cloud means the error grows with the volume; one vendor's points "
                   "away from the others mean a vendor effect.")
    body += _html_table(_pivot_metrics(c.evaluation.metrics, "overall", METRICS, c.unit))
    return body


def _calibration_body(c: ReportContent) -> str:
    table = c.evaluation.calibration.copy()
    body = _p("Slope 1 and intercept 0 mean the model's number can be read at face value; a slope below 1 "
              "means the model spreads values out more than the reference does.")
    body += _figure(figures.calibration_plot(c.evaluation.table, c.unit), "Reference against model output",
                    "Each point is a scan, coloured by vendor; one panel per version. Points on the dashed identity "
                    "line are read at face value; a solid fitted line flatter than the identity (slope below 1) "
                    "means the model spreads values out, a line shifted up or down a constant offset.")
    if "level" in table and "stratum" in table:
        table["level"] = [("all vendors" if s == "overall" else lv) for s, lv in zip(table["stratum"], table["level"])]
    body += _table(table, ["model_key", "level", "n_scans", "calibration_in_the_large",
                           "slope", CI("slope_ci_low", "slope_ci_high", "Slope 95% CI"), "r_squared", "note"],
                   c.unit, {"level": "Vendor"})
    return body


def _variance_body(c: ReportContent) -> str:
    if not c.evaluation.mixed:
        return _p("No mixed model was fitted for this biomarker.")
    shares = variance_shares(c.evaluation.mixed).rename(
        columns={"site": "site_share", "scanner": "scanner_share", "residual": "residual_share"})
    shares["response"] = shares["response"].map(response_label)
    body = _p("How much of the biomarker's variation comes from the site and the scanner, by a linear mixed model "
              "(REML) of each version's error, of its output, and of the reference itself (the reference fit shows "
              "the biology and site mix a faithful biomarker reproduces). Variances are in tables/"
              "variance_components.csv, every fixed effect in tables/fixed_effects.csv.")
    body += _figure(figures.variance_components_plot(shares.rename(columns={
        "site_share": "site", "scanner_share": "scanner", "residual_share": "residual"})),
        "Share of variance by component",
        "Each bar splits the variance of one fit into the share between sites, between scanners within a site, "
        "and left scan to scan. A large site or scanner share in an error bar means where a scan was acquired "
        "changes the version's error.")
    body += _table(shares, ["model_key", "response", "site_share", "scanner_share", "residual_share", "converged",
                            "boundary"])
    if c.evaluation.mixed:
        formula = c.evaluation.mixed[0].get("formula", "")
        body += (f"<p class='meta'>Model: <code>{html.escape(formula)}</code> (shown for the first fit; each "
                 "response takes its own left-hand side). Estimates in " + html.escape(c.unit) +
                 ", Wald 95% CIs.</p>")
    for key in dict.fromkeys(m["model_key"] for m in c.evaluation.mixed):
        fits = [m for m in c.evaluation.mixed if m["model_key"] == key]
        body += f"<h3>Fixed effects: {html.escape(key)}</h3>" + _fixed_effects_table(fits, c.unit)
        notes = [f"{response_label(m['response'])}: {'converged' if m.get('converged') else 'NOT converged'}, "
                 f"optimizer {m.get('optimizer')}, {m.get('n_obs')} scans"
                 f"{', a variance component at zero (boundary)' if m.get('boundary') else ''}" for m in fits]
        body += f"<p class='meta'>{html.escape('; '.join(notes))}.</p>"
    return body


def _fixed_effects_table(fits: list[dict[str, Any]], unit: str) -> str:
    """One row per term, per response an ``estimate [95% CI]`` and a p column (and df where the engine gives it)."""
    terms = list(dict.fromkeys(t for m in fits for t in m["fixed_effects"]))
    terms.sort(key=lambda t: t != "Intercept")  # the intercept first, the rest as fitted
    has_df = any("df" in v for m in fits for v in m["fixed_effects"].values())
    rows = []
    for term in terms:
        row = {"Term": term_label(term)}
        for m in fits:
            e = m["fixed_effects"].get(term) or {}
            label = response_label(m["response"])
            estimate = fmt_value(e.get("estimate"))
            row[f"{label}: estimate ({unit}), 95% CI"] = (f"{estimate} {fmt_ci(e.get('ci_low'), e.get('ci_high'))}"
                                                          if estimate != "n.e." else "n.e.")
            if has_df:
                row[f"{label}: df"] = fmt_value(e.get("df"), "ratio")
            row[f"{label}: p"] = fmt_p(e.get("p"))
        rows.append(row)
    frame = pd.DataFrame(rows)
    if len(frame.columns) > MAX_COLUMNS:  # many responses: one table per response instead
        return "".join(_fixed_effects_table([m], unit) for m in fits)
    return _html_table(frame)


def _harmonization_body(c: ReportContent) -> str:
    table = c.evaluation.harmonization.copy()
    body = _p("Would ComBat harmonization across sites remove the site effect on the model's output without "
              "removing the biological effects the trial measures? Site share of variance before and after, "
              "and each covariate's effect before and after (preserved = inside its original 95% CI).")
    if "term" in table:
        table["term"] = table["term"].map(lambda t: t if pd.isna(t) else str(t).replace("_", " "))
    body += _table(table, ["model_key", "term", "site_share_before", "site_share_after", "estimate_before",
                           CI("ci_low_before", "ci_high_before", "95% CI before"), "estimate_after", "preserved"],
                   c.unit, {"term": "Covariate"})
    if "note" in table and table["note"].notna().any():
        body += _table(table[table["note"].notna()], ["model_key", "note"])
    for note in c.evaluation.notes:
        body += f"<p class='meta'>{html.escape(note)}</p>"
    return body


def _upgrade_body(c: ReportContent) -> str:
    body = _p("Within each site whose scanner software changed during the study: error before vs after "
              "(Welch 95% CI), and the same effect as the software-upgrade term of the mixed model (section 8).")
    body += _figure(figures.upgrade_plot(c.evaluation.table, unit=c.unit), "Error before and after the software change",
                    "Each point is a scan's error (model − reference) at a site whose scanner software changed, "
                    "before and after the change, per version; black bars are the means. A jump between the "
                    "before and after bars of a version is the upgrade's effect on that version.")
    upgrade = c.evaluation.upgrade.copy()
    if len(upgrade):
        upgrade["before_after"] = [f"{fmt_value(b, 'int')} / {fmt_value(a, 'int')}"
                                   for b, a in zip(upgrade["n_before"], upgrade["n_after"])]
        margin = c.evaluation.plan.equivalence_margin
        alpha = c.evaluation.plan.alpha
        if c.qc is not None and c.qc.from_gate:
            gate_sites = sorted(set(c.qc.drift.loc[c.qc.drift["kind"].isin(["software", "scanner"]), "site"]))
            body += _p("The QC gate recorded a software or scanner change at "
                       f"{', '.join(gate_sites) if gate_sites else 'no site'}; each such site is re-validated here "
                       "for every model version, and stays re-validation pending (section 3) until a signed report "
                       "covers its new software version.")
        if margin is not None and "p_tost" in upgrade:
            body += _p(f"Re-validation decision: the upgrade is shown not to move the error by more than "
                       f"±{margin:g} {c.unit} when the {100 * (1 - 2 * alpha):g}% CI of the difference lies inside "
                       "the margin (two one-sided Welch tests, TOST); a site with too few scans on either side "
                       "cannot be decided.")
        body += _table(upgrade, ["model_key", "site", "before_after", "difference", CI("ci_low", "ci_high"),
                                 CI("tost_ci_low", "tost_ci_high", f"{100 * (1 - 2 * alpha):g}% CI"), "p",
                                 "equivalent"], c.unit,
                       {"before_after": "Scans before / after",
                        "equivalent": f"Within ±{margin:g} {c.unit}?" if margin is not None else "Within margin?"})
        notes = upgrade["note"].dropna().unique() if "note" in upgrade else []
        for note in notes:
            body += f"<p class='meta'>n.e.: {html.escape(str(note))}.</p>"
    else:
        body += _p("No site changed its scanner software during this study.")
    return body


def _equivalence_body(c: ReportContent) -> str:
    table, margin = c.evaluation.equivalence, c.evaluation.plan.equivalence_margin
    if margin is None or table.empty:
        body = _p("No equivalence margin was pre-specified (report.equivalence_margin in the spec), so no "
                  "equivalence decision is made.")
        return body
    alpha = c.evaluation.plan.alpha
    level = f"{100 * (1 - 2 * alpha):g}% CI"
    body = _p(f"Is each site's mean error within ±{margin:g} {c.unit} of the other sites'? Two one-sided "
              f"tests per site at alpha {alpha}; a site is equivalent when its {level} lies inside the margin. "
              "Every site within (intersection–union) is the pre-specified claim; claims about single sites are "
              "Holm-adjusted.")
    body += _figure(figures.equivalence_plot(table, margin, c.unit, alpha), "Equivalence of sites",
                    f"Each point is a site's mean error minus the other sites', with its {level}, one colour per "
                    f"version. Sites whose interval leaves the shaded ±{margin:g} {c.unit} band (marked x) are not "
                    "shown to be within the equivalence margin.")
    decided = []
    for key, part in table.groupby("model_key", sort=False):
        within = bool(str(part["all_within_margin"].iloc[0]).lower() in ("true", "1"))
        decided.append({"model_key": key, "every": within,
                        "sites": f"{int(part['equivalent_holm'].astype(str).str.lower().isin(['true', '1']).sum())} "
                                 f"of {len(part)}"})
    body += _table(pd.DataFrame(decided), ["model_key", "every", "sites"],
                   headers={"every": f"Every site within ±{margin:g} {c.unit}? (intersection–union)",
                            "sites": "Sites within (Holm)"}, kinds={"every": "bool"})
    for key, part in table.groupby("model_key", sort=False):
        body += f"<h3>{html.escape(key)}</h3>" + _table(
            part, ["site", "n_site", "mean_site", "difference", CI("ci_low", "ci_high", level), "p_tost", "p_holm",
                   "equivalent_holm"], c.unit,
            {"difference": f"Difference from other sites ({c.unit})",
             "equivalent_holm": f"Within ±{margin:g} {c.unit}? (Holm)"})
    return body


def _comparison_body(c: ReportContent) -> str:
    table, auc, plan = c.evaluation.comparison, c.evaluation.discrimination, c.evaluation.plan
    if table.empty:
        body = _p("No pair of model versions was named for comparison (report.compare in the spec).")
        return body
    margin = plan.comparison_margin
    body = _p("Absolute error of two versions on the same scans (difference = second − first; negative "
              "favours the second). Per site and overall: paired-t 95% CI, Wilcoxon signed-rank p and, with "
              "a margin, paired TOST (per site Holm-adjusted).")
    body += _figure(figures.comparison_plot(table, c.unit, margin), "Paired difference in absolute error",
                    "Each point is the mean paired difference in absolute error (second − first version) at a site, "
                    "with its 95% CI; the square is all scans. Left of the dashed zero line favours the second "
                    "version" + (f"; dotted lines are the ±{margin:g} {c.unit} comparison margin, and an interval "
                                 "inside them shows the versions equivalent there." if margin else "."))
    for (a, b), part in table.groupby(["model_a", "model_b"], sort=False):
        part = part.copy()
        overall = part["level"] == "overall"
        part["level"] = part["level"].where(~overall, "all scans")
        columns: list[str | CI] = ["level", "n_pairs", "mean_a", "mean_b", "difference", CI("ci_low", "ci_high"),
                                   "p_wilcoxon"]
        headers = {"level": "Site", "mean_a": f"Mean |error|, {a} ({c.unit})",
                   "mean_b": f"Mean |error|, {b} ({c.unit})"}
        if margin is not None:
            part["within"] = part["equivalent_holm"].where(~overall, part["equivalent"])
            columns.append("within")
            headers["within"] = f"Within ±{margin:g} {c.unit}? (sites: Holm)"
        body += f"<h3>{html.escape(b)} − {html.escape(a)}</h3>" + _table(part, columns, c.unit, headers,
                                                                          {"within": "bool"})
    body += ("<p class='meta'>Every column (paired-t and one-sided p-values, TOST intervals) is in "
             "tables/comparison.csv.</p>")
    if not auc.empty and plan.endpoint is not None:
        ep = plan.endpoint
        body += (f"<h3>Discrimination of {html.escape(ep.column)} = {html.escape(ep.positive)} "
                 "(paired DeLong)</h3>")
        body += _paired_delong_tables(auc, "With / without endpoint")
    return body


def _paired_delong_tables(auc: pd.DataFrame, cases_header: str) -> str:
    """One table per compared pair of versions: each version's AUC and the paired DeLong difference."""
    body = ""
    for (a, b), part in auc.groupby(["model_a", "model_b"], sort=False):
        part = part.copy()
        part["level"] = part["level"].where(part["level"] != "overall", "all scans")
        part["cases"] = [f"{fmt_value(p, 'int')} / {fmt_value(n, 'int')}"
                         for p, n in zip(part["n_positive"], part["n_negative"])]
        body += _table(part, ["level", "cases", "auc_a", "auc_b", "difference",
                              CI("ci_low", "ci_high", kind="auc"), "p", "status"], "",
                       {"level": "Scans", "cases": cases_header, "auc_a": f"AUC, {a}",
                        "auc_b": f"AUC, {b}", "difference": f"AUC difference ({b} − {a})"},
                       {"difference": "auc"})
    return body


# --------------------------------------------------------------------------- several biomarkers

#: The continuous-biomarker sections: (id, title, body builder); each is repeated per continuous biomarker.
CONTINUOUS_SECTIONS: tuple[tuple[str, str, Callable[[ReportContent], str]], ...] = (
    ("results-strata", "5. Performance per site, vendor and software version", _strata_body),
    ("results-agreement", "6. Agreement with the reference (Bland–Altman)", _agreement_body),
    ("results-calibration", "7. Calibration", _calibration_body),
    ("results-variance", "8. Scanner effects (variance components)", _variance_body),
    ("results-harmonization", "9. Effect of harmonization", _harmonization_body),
    ("results-upgrade", "10. Effect of the scanner software upgrade", _upgrade_body),
    ("results-equivalence", "11. Equivalence decisions", _equivalence_body),
    ("comparison", "12. Model versions side by side", _comparison_body),
)
#: Sections that exist only when a biomarker of their kind does (numbered after section 12, in this order).
KIND_SECTIONS: tuple[tuple[str, str, str], ...] = (
    ("results-classification", CLASSIFICATION, "Classification"),
    ("results-overlap", SEGMENTATION, "Segmentation overlap"),
)
#: Which kind of result each results section shows (the checklist says "not applicable" when it is absent).
SECTION_KINDS: dict[str, str] = {**{sid: CONTINUOUS for sid, _, _ in CONTINUOUS_SECTIONS},
                                 **{sid: kind for sid, kind, _ in KIND_SECTIONS}}


def _markers(c: ReportContent, analysis: str) -> list[dict[str, Any]]:
    return [m for m in c.biomarker_entries() if (m.get("analysis") or CONTINUOUS) == analysis]


def overlap_by_stratum(c: ReportContent) -> pd.DataFrame:
    """The per-label, per-stratum overlap summary (from the evaluation; else summarised from the per-scan scores)."""
    summary = _declared(c, frame(c.evaluation, "overlap_by_stratum"))
    if len(summary):
        return summary
    scans = overlap_scans(c)
    return _summarise_overlap(scans) if len(scans) else pd.DataFrame()


def overlap_scans(c: ReportContent) -> pd.DataFrame:
    """Per-scan, per-label overlap scores joined to the scans' site, vendor and software version."""
    scans = c.overlap_scores if isinstance(c.overlap_scores, pd.DataFrame) and len(c.overlap_scores) else \
        frame(c.evaluation, "overlap_scores", "overlap")
    scans = _declared(c, scans)
    if not len(scans) or "dice" not in scans:
        return pd.DataFrame()
    strata = [s for s in ("site", "vendor", "software_version") if s not in scans and s in c.evaluation.table]
    if strata and "scan_id" in scans:
        where = c.evaluation.table.drop_duplicates("scan_id")[["scan_id", *strata]]
        scans = scans.merge(where, on="scan_id", how="left")
    return scans


def _declared(c: ReportContent, table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the biomarkers this report declares (a table without a biomarker column: all of it)."""
    if not len(table) or "biomarker" not in table or not c.biomarker_entries():
        return table
    names = {str(m["name"]) for m in c.biomarker_entries()}
    return table[table["biomarker"].astype(str).isin(names)].reset_index(drop=True)


def _summarise_overlap(scans: pd.DataFrame) -> pd.DataFrame:
    """Means (no CI) per model, label and stratum: what the section shows when only per-scan scores are known."""
    keys = [k for k in ("biomarker", "model_key", "label", "label_name") if k in scans]
    rows = []
    for stratum in ("overall", "site", "vendor", "software_version"):
        if stratum != "overall" and stratum not in scans:
            continue
        by = keys + ([stratum] if stratum != "overall" else [])
        for group, part in scans.groupby(by, sort=True, dropna=False):
            group = group if isinstance(group, tuple) else (group,)
            row = dict(zip(keys, group))
            errors = part["volume_error_ml"] if "volume_error_ml" in part else pd.Series(dtype=float)
            hd = part["hd95_mm"].dropna() if "hd95_mm" in part else pd.Series(dtype=float)
            row.update(stratum=stratum, level=group[-1] if stratum != "overall" else "all", n_scans=len(part),
                       dice_mean=part["dice"].mean(), dice_ci_low=None, dice_ci_high=None,
                       hd95_median_mm=hd.median() if len(hd) else None,
                       hd95_p90_mm=hd.quantile(0.9) if len(hd) else None,
                       volume_error_mean_ml=errors.mean() if len(errors) else None,
                       volume_error_sd_ml=errors.std() if len(errors) > 1 else None)
            rows.append(row)
    return pd.DataFrame(rows)


def kinds_present(c: ReportContent) -> set[str]:
    """The kinds of result this report holds: continuous, classification, segmentation (overlap)."""
    if not c.biomarker_entries():
        return {CONTINUOUS}
    kinds = {m.get("analysis") or CONTINUOUS for m in c.biomarker_entries()}
    if len(overlap_by_stratum(c)):
        kinds.add(SEGMENTATION)
    return kinds & {CONTINUOUS, CLASSIFICATION, SEGMENTATION}


def _kind_sections(c: ReportContent) -> list[str]:
    present = kinds_present(c) if c.biomarker_entries() else set()
    return [sid for sid, kind, _ in KIND_SECTIONS if kind in present]


def _numbered(c: ReportContent, number: int, title: str) -> str:
    """Sections after 12 move down by one for each kind section the report holds (a legacy report: as ever)."""
    return f"{number + len(_kind_sections(c))}. {title}"


def section_titles(c: ReportContent) -> dict[str, str]:
    """Each section id's title as this report numbers it (what the checklist links say)."""
    titles = {sid: title for sid, title, _ in SECTIONS}
    for i, sid in enumerate(_kind_sections(c)):
        titles[sid] = f"{13 + i}. {dict((k, t) for k, _, t in KIND_SECTIONS)[sid]}"
    for sid, number, title in (("limitations", 13, "Limitations"), ("checklist", 14, "Reporting checklist"),
                               ("provenance", 15, "Provenance")):
        titles[sid] = _numbered(c, number, title)
    return titles


def _marker_heading(marker: dict[str, Any], section_id: str) -> str:
    description = marker.get("description") or ""
    unit = marker.get("unit") or ""
    text = f"Biomarker {marker['name']}" + (f" ({unit})" if unit else " (no unit)")
    anchor = f"{section_id}-{marker['name']}".replace(".", "-")
    return (f"<h3 class='biomarker' id='{html.escape(anchor)}'>{html.escape(text)}"
            f"{': ' + html.escape(description) if description else ''}</h3>")


def _demote(body: str) -> str:
    """Sub-headings of a per-biomarker part sit one level below the biomarker's heading."""
    return body.replace("<h3>", "<h4>").replace("</h3>", "</h4>")


def _continuous_section(section_id: str, title: str, body: Callable[[ReportContent], str]
                        ) -> Callable[[ReportContent], str]:
    """A legacy report: the section as ever. Several biomarkers: the section once per continuous biomarker."""
    def build(c: ReportContent) -> str:
        if not c.biomarker_entries():
            return _section(section_id, title, body(c))
        markers = _markers(c, CONTINUOUS)
        if not markers:
            return _section(section_id, title, _p("Not applicable: no continuous biomarker in this report."))
        parts = []
        for marker in markers:
            view = replace(c, evaluation=evaluation_for(c.evaluation, marker, c.biomarker_entries()),
                           unit=marker.get("unit") or "", reference=marker.get("reference_column") or c.reference)
            parts.append(_marker_heading(marker, section_id) + _demote(body(view)))
        return _section(section_id, title, "".join(parts))
    return build


_strata = _continuous_section(*CONTINUOUS_SECTIONS[0])
_agreement = _continuous_section(*CONTINUOUS_SECTIONS[1])
_calibration = _continuous_section(*CONTINUOUS_SECTIONS[2])
_variance = _continuous_section(*CONTINUOUS_SECTIONS[3])
_harmonization = _continuous_section(*CONTINUOUS_SECTIONS[4])
_upgrade = _continuous_section(*CONTINUOUS_SECTIONS[5])
_equivalence = _continuous_section(*CONTINUOUS_SECTIONS[6])
_comparison = _continuous_section(*CONTINUOUS_SECTIONS[7])

#: Level headers per stratum.
LEVEL_HEADERS = {"overall": "Level", "vendor": "Vendor", "site": "Site", "software_version": "Software version"}


def _level_text(stratum: str, level: Any) -> str:
    return "all scans" if stratum == "overall" else str(level)


def _estimate_cell(row: pd.Series, kind: str = "auc") -> str:
    if str(row.get("status", "ok")) not in ("ok", "nan") and pd.isna(row.get("estimate")):
        return "n.e."
    if pd.isna(row.get("estimate")):
        return "n.e."
    if pd.isna(row.get("ci_low")) or pd.isna(row.get("ci_high")):
        return fmt_value(row["estimate"], kind)
    return f"{fmt_value(row['estimate'], kind)} {fmt_ci(row['ci_low'], row['ci_high'], kind)}"


def _classification_table(rows: pd.DataFrame, strata: tuple[str, ...], metrics: dict[str, str]) -> str:
    """One row per model and level; a column per metric, ``estimate [95% CI]``; positives and negatives."""
    part = rows[rows["stratum"].isin(strata) & rows["metric"].isin(list(metrics))]
    if part.empty:
        return ""
    out = []
    for (key, stratum, level), group in part.groupby(["model_key", "stratum", "level"], sort=False):
        first = group.iloc[0]
        row = {"Model version": key, LEVEL_HEADERS.get(strata[-1], "Level"): _level_text(stratum, level),
               "Positives / negatives": f"{fmt_value(first.get('n_positive'), 'int')} / "
                                        f"{fmt_value(first.get('n_negative'), 'int')}"}
        by_metric = group.set_index("metric")
        for metric, label in metrics.items():
            row[label] = _estimate_cell(by_metric.loc[metric]) if metric in by_metric.index else "-"
        out.append(row)
    return _html_table(pd.DataFrame(out))


def _classification(c: ReportContent) -> str:
    markers = _markers(c, CLASSIFICATION)
    if not c.biomarker_entries() or not markers:
        return ""
    table = frame(c.evaluation, "classification")
    alpha = c.evaluation.plan.alpha
    body = _p("How well each version's class probability discriminates the reference class, overall and per "
              "site, vendor and scanner software version: area under the ROC curve (AUC) with its DeLong 95% "
              "CI; sensitivity and specificity at the pre-specified threshold with exact (Clopper–Pearson) 95% "
              "CIs; calibration of the probability by logistic recalibration (intercept 0 and slope 1 are "
              "ideal). A level with too few scans of either class is marked n.e. (not estimable), with the "
              "reason below its table. Every number is in tables/classification_by_stratum.csv.")
    for marker in markers:
        name = str(marker["name"])
        threshold = marker.get("threshold")
        rows = only(table, name) if len(table) else table
        body += _marker_heading(marker, "results-classification")
        reference = marker.get("reference_column") or c.reference
        positive = marker.get("reference_positive")
        rule = (f"a scan is called positive when its probability is at least {threshold:g} (pre-specified "
                "threshold)" if threshold is not None else "no decision threshold was pre-specified")
        body += _p(f"Reference class: {reference}" + (f" = {positive}" if positive is not None else "") +
                   f"; {rule}.")
        if rows.empty or "metric" not in rows:
            body += _p("No classification results were computed for this biomarker.")
            continue
        cut = f" at ≥ {threshold:g}" if threshold is not None else ""
        metrics = {"auc": "AUC (DeLong 95% CI)", "sensitivity": f"Sensitivity{cut} (95% CI)",
                   "specificity": f"Specificity{cut} (95% CI)"}
        if (rows["stratum"] == "site").any():
            body += _figure(figures.auc_forest_plot(rows, "site"), f"AUC by site: {name}",
                            "Each point is one version's AUC at a site with its DeLong 95% CI; the square is all "
                            "scans. The dashed line is chance (0.5); a site whose interval sits well left of the "
                            "others is one where the version discriminates worse.")
        body += "<h4>Overall and per vendor</h4>" + _classification_table(rows, ("overall", "vendor"), metrics)
        if (rows["stratum"] == "site").any():
            body += "<h4>Per site</h4>" + _classification_table(rows, ("site",), metrics)
        if (rows["stratum"] == "software_version").any():
            body += "<h4>Per scanner software version</h4>" + _classification_table(rows, ("software_version",),
                                                                                   metrics)
        calibration = {"calibration_intercept": "Calibration intercept (95% CI)",
                       "calibration_slope": "Calibration slope (95% CI)"}
        if rows["metric"].isin(list(calibration)).any():
            body += "<h4>Calibration of the probability</h4>" + _classification_table(
                rows, ("overall", "vendor"), calibration)
        reasons = rows[rows["estimate"].isna() & rows["reason"].notna()] if "reason" in rows else rows.iloc[:0]
        for (stratum, reason), part in reasons.groupby(["stratum", "reason"], sort=False):
            levels = ", ".join(dict.fromkeys(str(v) for v in part["level"]))
            body += (f"<p class='meta'>n.e. at {html.escape(LEVEL_HEADERS.get(stratum, stratum).lower())} "
                     f"{html.escape(levels)}: {html.escape(str(reason))}.</p>")
        paired = only(c.evaluation.discrimination, name) if "biomarker" in c.evaluation.discrimination else \
            pd.DataFrame()
        if len(paired) and {"model_a", "model_b", "auc_a", "auc_b"} <= set(paired.columns):
            body += f"<h4>Versions compared: paired DeLong test (alpha {alpha:g})</h4>"
            body += _paired_delong_tables(paired, "Positives / negatives")
    title = section_titles(c)["results-classification"]
    return _section("results-classification", title, body)


#: How the overlap columns read (mean Dice with its CI is one column).
OVERLAP_COLUMNS: list[str | CI] = ["model_key", "level", "n_scans", "dice", "hd95_median_mm", "hd95_p90_mm",
                                   "volume_error_mean_ml", "volume_error_sd_ml"]


def _overlap_table(rows: pd.DataFrame, strata: tuple[str, ...]) -> str:
    part = rows[rows["stratum"].isin(strata)].copy()
    if part.empty:
        return ""
    part["level"] = [_level_text(s, lv) for s, lv in zip(part["stratum"], part["level"])]
    part["dice"] = [_estimate_cell(pd.Series({"estimate": m, "ci_low": lo, "ci_high": hi}))
                    for m, lo, hi in zip(part["dice_mean"], part.get("dice_ci_low", pd.Series([None] * len(part))),
                                         part.get("dice_ci_high", pd.Series([None] * len(part))))]
    return _table(part, OVERLAP_COLUMNS, "", {"level": LEVEL_HEADERS.get(strata[-1], "Level"),
                                              "dice": "Mean Dice (95% CI)"}, {"dice": "text"})


def _overlap(c: ReportContent) -> str:
    if not c.biomarker_entries() or SEGMENTATION not in kinds_present(c):
        return ""
    rows = overlap_by_stratum(c)
    body = _p("How well each version's segmentation overlaps the reference segmentation, per label: Dice "
              "(2·|A∩B| / (|A| + |B|), 1 is perfect) as the mean over scans with its 95% CI, the 95th-percentile "
              "Hausdorff distance (HD95, mm: how far the boundaries stray) as the median and 90th percentile over "
              "scans, and the error in the label's volume (model − reference, ml). Per scan in "
              "tables/overlap_scores.csv, per stratum in tables/overlap_by_stratum.csv.")
    scans = overlap_scans(c)
    if len(scans) and "site" in scans:
        body += _figure(figures.dice_by_site_plot(scans), "Dice by site",
                        "Each point is a scan's Dice for one label, one colour per version; black bars are the "
                        "site means, one panel per label. A site whose points sit low is one where the "
                        "segmentation degrades there.")
    markers = {str(m["name"]): m for m in c.biomarker_entries()}
    keys = [k for k in ("biomarker", "label") if k in rows]
    for group, part in rows.groupby(keys, sort=False) if keys else [((), rows)]:
        group = group if isinstance(group, tuple) else (group,)
        values = dict(zip(keys, group))
        name = part["label_name"].dropna().astype(str).iloc[0] if "label_name" in part and \
            part["label_name"].notna().any() else ""
        label = values.get("label")
        marker = markers.get(str(values.get("biomarker")), {})
        if not name and label is not None:
            name = (marker.get("label_names") or {}).get(str(label), "")
        heading = (name or f"Label {label}") + (f" (label {label})" if name and label is not None else "")
        if values.get("biomarker") is not None:
            heading += f" — biomarker {values['biomarker']}"
        body += f"<h3>{html.escape(heading)}</h3>"
        body += "<h4>Overall and per vendor</h4>" + _overlap_table(part, ("overall", "vendor"))
        if (part["stratum"] == "site").any():
            body += "<h4>Per site</h4>" + _overlap_table(part, ("site",))
        if (part["stratum"] == "software_version").any():
            body += "<h4>Per scanner software version</h4>" + _overlap_table(part, ("software_version",))
    return _section("results-overlap", section_titles(c)["results-overlap"], body)


def _truth(c: ReportContent) -> str:
    if not c.truth:
        return ""
    body = _p("This trial was simulated; the effects the simulator injected, for comparison with the estimates.")
    body += f"<pre>{html.escape(json.dumps(c.truth, indent=2))}</pre>"
    return _section("simulation-truth", "Simulation truth", body)


def _limitations(c: ReportContent) -> str:
    items = list(c.limitations) + list(STANDARD_LIMITATIONS)
    if c.truth:
        items.insert(0, "The trial is simulated: its scanner and biological effects are the simulator's, chosen "
                        "to be realistic; they are known, which is what lets this report be checked.")
    if c.qc is None or not c.qc.available:
        items.append("No upload-time QC records cover these scans; scans that a gate would have failed may be "
                     "included.")
    return _section("limitations", _numbered(c, 13, "Limitations"), "<ul>" + "".join(f"<li>{html.escape(i)}</li>"
                                                                       for i in items) + "</ul>")


@lru_cache(maxsize=1)
def checklists() -> dict[str, Any]:
    """TRIPOD+AI and CLAIM 2024 items mapped to section ids (``checklists.yaml``, paraphrased items)."""
    text = resources.files("sitebench.reports").joinpath("checklists.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def _checklist(c: ReportContent) -> str:
    data = checklists()
    body = _p("Where this report answers each item of the reporting guidelines. Items marked 'not in this "
              "report' belong to the trial protocol or the manuscript. Item texts are paraphrased; see the "
              "guidelines for their wording.")
    titles = section_titles(c)
    for guideline in data["guidelines"].values():
        rows = []
        for item in guideline["items"]:
            answered = checklist_answer(c, item, titles)
            rows.append(f"<tr><td>{html.escape(item['id'])}</td><td>{html.escape(item['topic'])}</td>"
                        f"<td>{html.escape(item['item'])}</td><td>{answered}</td></tr>")
        body += (f"<h3>{html.escape(guideline['title'])}</h3><table class='checklist'><thead><tr><th>Item</th>"
                 "<th>Topic</th><th>Asks for</th><th>Answered in</th></tr></thead><tbody>" + "".join(rows) +
                 "</tbody></table>")
    return _section("checklist", _numbered(c, 14, "Reporting checklist (TRIPOD+AI, CLAIM 2024)"), body)


def checklist_answer(c: ReportContent, item: dict[str, Any], titles: dict[str, str] | None = None) -> str:
    """Where the report answers a checklist item, as HTML: links, 'not in this report', or 'not applicable'.

    A legacy report answers in ``section``. A report with declared biomarkers answers in the section of each
    kind present that the item's ``by_kind`` names (``all``: whatever the kinds); a kind absent from the report
    is "not applicable: no <kind> biomarker in this report". An item without ``by_kind`` whose section shows
    one kind of result is treated as ``by_kind: {<that kind>: section}``.
    """
    titles = titles or section_titles(c)

    def link(where: str) -> str:
        return f"<a href='#{where}'>{html.escape(titles.get(where, where))}</a>"

    where = item["section"]
    by_kind = dict(item.get("by_kind") or {})
    if not c.biomarker_entries():
        return link(where) if where != "not-addressed" else f"not in this report: {html.escape(item.get('reason', ''))}"
    if not by_kind and where in SECTION_KINDS:
        by_kind = {SECTION_KINDS[where]: where}
    if not by_kind:
        return link(where) if where != "not-addressed" else f"not in this report: {html.escape(item.get('reason', ''))}"
    present = kinds_present(c)
    always = by_kind.pop("all", None)
    if always is None and where != "not-addressed" and where not in SECTION_KINDS:
        always = where  # the legacy answer still holds (e.g. the methods), the kinds add to it
    links = [link(always)] if always else []
    links += [link(s) for k, s in by_kind.items() if k in present and s != always]
    absent = [k for k in by_kind if k not in present]
    parts = list(dict.fromkeys(links))
    if not parts and where == "not-addressed":  # the item's own reason still holds
        return f"not in this report: {html.escape(item.get('reason', ''))}"
    if absent and not always:  # a section that answers whatever the kinds needs no "not applicable"
        parts.append("not applicable: " + "; ".join(f"no {html.escape(k)} biomarker in this report" for k in absent))
    return "; ".join(parts)


def _provenance(c: ReportContent) -> str:
    per_scan = [k for k in c.materials if k.startswith(("image ", "label "))]
    listed = [{"Input": k, "Path": str(v)} for k, v in c.materials.items() if k not in per_scan]
    if per_scan:
        listed.append({"Input": f"{len(per_scan)} image and label files",
                       "Path": "each hashed in lock.json (materials 'image <scan_id>', 'label <scan_id>')"})
    body = _html_table(pd.DataFrame(listed), "text")
    body += f"<p class='meta'>Seeds: {html.escape(json.dumps(c.seeds))}</p>"
    if c.mlflow_run:
        run = c.mlflow_run
        body += (f"<p class='meta'>MLflow run {html.escape(run['run_id'])} (experiment "
                 f"{html.escape(run['experiment_id'])}) in {html.escape(run['tracking_uri'])}: the per-site, "
                 "per-vendor and per-software metrics of every model version, and a copy of this report.</p>")
    packages = ", ".join(f"{name} {version}" for name, version in sorted(package_versions().items()))
    body += f"<p class='meta'>Software: {html.escape(packages)}.</p>"
    return _section("provenance", _numbered(c, 15, "Provenance"), body)


#: What each locked table holds, for the appendix (file name -> description).
TABLE_FILES: dict[str, str] = {
    "predictions.csv": "each model version's raw output per scan, with the weights and image hashes it came from",
    "evaluation.csv": "one row per scan and model version: the manifest columns the analyses use, reference, "
                      "prediction and error; every other table is re-derived from it",
    "metrics_by_stratum.csv": "MAE, bias, RMSE, Pearson r and Dice with bootstrap 95% CIs, overall and per site, "
                              "vendor and software version (sections 5–6)",
    "fixed_effects.csv": "every fixed effect of every mixed model (section 8)",
    "variance_components.csv": "variance components and their shares per mixed model (section 8)",
    "upgrade_effect.csv": "within-site error before and after each software change (section 10)",
    "calibration.csv": "calibration slope, intercept and calibration-in-the-large, overall and per vendor "
                       "(section 7)",
    "harmonization.csv": "site share of variance and covariate effects before and after ComBat (section 9)",
    "equivalence.csv": "per-site two one-sided tests against the other sites, with Holm adjustment (section 11)",
    "comparison.csv": "paired comparison of two versions' absolute error per site and overall (section 12)",
    "discrimination.csv": "paired DeLong test of the endpoint AUC (section 12)",
    "qc_by_site.csv": "upload-time QC gate counts per site (section 3)",
    "sweep_table.csv": "simulated acquisition sweep: error per model version and deviation (Acquisition "
                       "tolerances section)",
    "sweep_tolerances.csv": "largest tolerated deviation and the suggested protocol rule per model version "
                            "(Acquisition tolerances section)",
    "gate_effect.csv": "error with and without the series the QC gate failed, overall and per site (section 3)",
    "qc_verdicts.csv": "export of the QC gate's verdict records this report used, one per series (section 3)",
    "qc_deviations.csv": "every protocol deviation the QC gate recorded, with expected and observed values "
                         "(section 3)",
    "qc_drift_events.csv": "every drift event the QC gate raised (section 3)",
    "qc_rescans.csv": "every re-scan with the series it repeats and the time to re-scan (section 3)",
    "qc_revalidation.csv": "sites whose software or scanner changed, pending re-validation (section 3)",
    "mixed_models.json": "every mixed-model fit in full: formula, optimizer, convergence, boundary check",
    "classification_by_stratum.csv": "per classification biomarker and version: AUC (DeLong 95% CI), sensitivity "
                                     "and specificity at the pre-specified threshold, calibration, overall and per "
                                     "site, vendor and software version (Classification section)",
    "overlap_by_stratum.csv": "per segmentation label and version: mean Dice with 95% CI, HD95 median and 90th "
                              "percentile, volume error, overall and per site, vendor and software version "
                              "(Segmentation overlap section)",
    "overlap_scores.csv": "each scan's overlap of the model's and the reference segmentation, per label: Dice, "
                          "HD95, label volumes and volume error",
}
#: A result table this code does not describe yet still gets words in the appendix.
UNDESCRIBED_TABLE = "a locked result table (every column is in the glossary below)"


def _locked_tables(c: ReportContent) -> list[tuple[str, str, str, list[str]]]:
    """(file, what it holds, rows, columns) of each file in tables/, as ``build`` writes them."""
    ev = c.evaluation
    keys = set(ev.table["model_key"])
    predictions = c.predictions[c.predictions["model_key"].isin(keys)]
    frames: dict[str, pd.DataFrame] = {
        "predictions.csv": predictions[[col for col in LOCKED_PREDICTION_COLUMNS if col in predictions]],
        "evaluation.csv": ev.table,
        **{f"{stem}.csv": frame for stem, frame in ev.result_tables().items()}}
    if isinstance(c.overlap_scores, pd.DataFrame) and len(c.overlap_scores.columns):
        frames["overlap_scores.csv"] = c.overlap_scores
    if c.gate_effect is not None:
        frames["gate_effect.csv"] = c.gate_effect
    if c.sweeps:
        frames["sweep_table.csv"] = pd.concat([pair[0] for pair in c.sweeps], ignore_index=True)
        frames["sweep_tolerances.csv"] = pd.concat([pair[1] for pair in c.sweeps], ignore_index=True)
    if c.qc is not None:
        frames.update({f"{stem}.csv": table for stem, table in c.qc.tables().items()})
    out = [(name, TABLE_FILES.get(name, UNDESCRIBED_TABLE), str(len(table)), [str(col) for col in table.columns])
           for name, table in frames.items()]
    out.append(("mixed_models.json", TABLE_FILES["mixed_models.json"], f"{len(ev.mixed)} fits", []))
    return out


def _appendix(c: ReportContent) -> str:
    body = _p("The report shows the columns a reader needs, rounded; the locked tables beside it in tables/ hold "
              "every column at full precision (they are what lock.json hashes and what `sitebench report verify "
              "--recompute` re-derives). The glossary says what each column name means.")
    tables = _locked_tables(c)
    rows = [{"File": f"tables/{name}", "What it holds": what, "Rows": rows,
             "Columns": f"{len(cols)}: {', '.join(cols)}" if cols else "-"} for name, what, rows, cols in tables]
    body += _html_table(pd.DataFrame(rows), "text files")
    used = list(dict.fromkeys(col for _, _, _, cols in tables for col in cols))
    entries = []
    units = {m.get("unit") or "" for m in c.biomarker_entries() if (m.get("analysis") or CONTINUOUS) == CONTINUOUS}
    unit = c.unit if len(units) <= 1 else "in the biomarker's unit"
    for name in used:
        column = COLUMNS.get(name)
        if column is None:
            continue
        label = column.header.replace("{unit}", unit) if unit else column.header.replace(" ({unit})", "")
        meaning = f"{label}: {column.meaning}" if column.meaning else label
        entries.append(f"<p><code>{html.escape(name)}</code> — {html.escape(meaning)}</p>")
    body += _model_files(c)
    body += "<h3>Column glossary</h3><div class='glossary'>" + "".join(entries) + "</div>"
    return _section("appendix-tables", "Appendix: locked tables", body)


def _model_files(c: ReportContent) -> str:
    """Every file each model version loads, with its full SHA-256 (the body shows them shortened)."""
    rows = [{"Model version": m["key"], "File": path, "SHA-256": digest}
            for m in c.models for path, digest in sorted((m.get("files") or {}).items())]
    rows += [{"Model version": m["key"], "File": "all files (one digest over the list above)",
              "SHA-256": m["files_sha256"]} for m in c.models if m.get("files") and m.get("files_sha256")]
    if not rows:
        return ""
    return ("<h3>Model files</h3>" + _p("Every file each model version loads, with its full SHA-256; a "
                                       "resumed run or a worker must load exactly these.") +
            _html_table(pd.DataFrame(rows), "text files"))


def _signatures(c: ReportContent) -> str:
    body = ("<p>Electronic sign-offs (printed name, date and time, meaning: authorship, review or approval) are "
            "Ed25519 signatures over the SHA-256 of this report's <code>lock.json</code>, which hashes this "
            "document and everything listed above. They are kept in <code>signatures.json</code>; check them "
            "with <code>sitebench report verify REPORT --public-key KEY.pub</code>.</p>")
    body += _html_table(pd.DataFrame([{"Meaning": m, "Printed name": "", "Date and time (UTC)": "",
                                       "Signature": "see signatures.json"} for m in ("authorship", "review",
                                                                                     "approval")]))
    return _section("signatures", "Signature block", body)


#: (id, title, builder) in reading order; the checklist links to these ids.
SECTIONS: tuple[tuple[str, str, Callable[[ReportContent], str]], ...] = (
    ("summary", "Summary of pre-specified decisions", _summary),
    ("findings", "Key findings", _findings),
    ("intended-use", "1. Intended use", _intended_use),
    ("models", "2. Model versions and lineage", _models),
    ("data", "3. Data provenance", _data),
    ("qc", "3. Data provenance: QC gate", lambda c: ""),
    ("gate-effect", "3a. What the QC gate changed", _gate_effect),
    ("methods", "4. Methods", _methods),
    ("results-strata", "5. Performance per stratum", _strata),
    ("results-agreement", "6. Agreement", _agreement),
    ("results-calibration", "7. Calibration", _calibration),
    ("results-variance", "8. Scanner effects", _variance),
    ("results-harmonization", "9. Harmonization", _harmonization),
    ("results-upgrade", "10. Software upgrade", _upgrade),
    ("results-equivalence", "11. Equivalence", _equivalence),
    ("comparison", "12. Versions side by side", _comparison),
    ("results-classification", "Classification", _classification),
    ("results-overlap", "Segmentation overlap", _overlap),
    ("simulation-truth", "Simulation truth", _truth),
    ("tolerances", "Acquisition tolerances", _tolerances),
    ("limitations", "13. Limitations", _limitations),
    ("checklist", "14. Reporting checklist", _checklist),
    ("provenance", "15. Provenance", _provenance),
    ("appendix-tables", "Appendix: locked tables", _appendix),
    ("signatures", "Signature block", _signatures),
    ("title", "Title and version", lambda c: ""),
)


def render_html(content: ReportContent, version: int, supersedes: str | None = None) -> str:
    """The whole report as one self-contained HTML page (figures embedded as PNG data URIs).

    The title and the summary of decisions make the first page; everything else follows.
    """
    versions = code_version()
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(content.title)} "
             f"v{version:03d}</title><style>{CSS}</style></head><body>",
             f"<section id='title'><h1>{html.escape(content.title)}</h1>",
             f"<p class='meta'>Report <b>{html.escape(content.name)}</b>, version <b>v{version:03d}</b> · "
             f"generated {utc_now()} · sitebench {html.escape(str(versions['package_version']))}, git "
             f"{html.escape(str(versions['git_commit']))}{' (dirty)' if versions['git_dirty'] else ''} · "
             f"the SHA-256 of every input is in <code>{LOCK_FILE}</code> beside this file; check it with "
             f"<code>sitebench report verify</code>.</p>"]
    if supersedes:
        parts.append(f"<p class='meta'>This version supersedes <b>{supersedes}</b> of the same report, which "
                     "is kept unchanged.</p>")
    parts.append("</section>")
    parts += [builder(content) for _, _, builder in SECTIONS]
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)
