"""The report's sections, in order; each has a stable id the reporting checklist points at.

Each builder takes the :class:`ReportContent` and returns HTML. Methods name their
reference here, once, so the methods section and the results agree on what was done.
"""

from __future__ import annotations

import base64
import html
import json
from functools import lru_cache
from importlib import resources
from typing import Any, Callable

import pandas as pd
import yaml

from sitebench.provenance import code_version, package_versions, utc_now
from sitebench.reports import figures
from sitebench.reports.content import ReportContent
from sitebench.reports.lock import LOCK_FILE
from sitebench.stratification.evaluation import variance_shares

METRIC_NAMES = ("mae", "bias", "rmse", "pearson_r", "dice")
COMPARISON_SHOWN = ("level", "n_pairs", "mean_a", "mean_b", "difference", "ci_low", "ci_high", "p", "p_wilcoxon",
                    "p_tost", "p_holm", "equivalent_holm")


# --------------------------------------------------------------------------- page primitives


def _img(png: bytes, alt: str) -> str:
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"/>' \
           f"<figcaption>{html.escape(alt)}</figcaption></figure>"


def _table(frame: pd.DataFrame, floatfmt: str = "{:.3g}") -> str:
    def fmt(value: Any) -> str:
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return "n.e."
        if isinstance(value, float):
            return floatfmt.format(value)
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f'<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


CSS = """
body{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;color:#222;font-size:14px}
h1{font-size:1.6em;margin-bottom:0}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:12px}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}figure{margin:1em 0}img{max-width:100%}
figcaption{font-size:12px;color:#555}.meta{color:#555;font-size:12px}.finding{background:#f6f8fa;border-left:4px solid #1b6ca8;padding:.4em .8em;margin:.4em 0}
code{font-size:11px}
"""


def _pivot_metrics(metrics: pd.DataFrame, stratum: str, metric_names: tuple[str, ...]) -> pd.DataFrame:
    rows = metrics[(metrics["stratum"] == stratum) & metrics["metric"].isin(metric_names)].copy()

    def cell(r: pd.Series) -> str:
        if not r["estimable"] or pd.isna(r["estimate"]):
            return "n.e."
        if pd.isna(r["ci_low"]):
            return f"{r['estimate']:.3g}"
        return f"{r['estimate']:.3g} [{r['ci_low']:.3g}, {r['ci_high']:.3g}]"

    rows["value"] = rows.apply(cell, axis=1)
    wide = rows.pivot_table(index=["model_key", "level", "n_scans"], columns="metric", values="value",
                            aggfunc="first").reset_index()
    wide.columns.name = None
    return wide[["model_key", "level", "n_scans"] + [m for m in metric_names if m in wide]]


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
        rows.append({"model": m["key"], "kind": m["kind"], "source": m.get("source", "-"),
                     "trained on": training.get("vendor", "-"),
                     "augmentation": training.get("augmentation", "-"),
                     "training scans": training.get("scans", "-"),
                     "training code": str((training.get("code_version") or {}).get("git_commit", "-"))[:12],
                     "weights SHA-256": m["weights_sha256"], "registry": m.get("registered", "-")})
    body = _table(pd.DataFrame(rows))
    lineage = []
    for m in c.models:
        changes = "; ".join(f"{v}: {t}" for v, t in (m.get("changelog") or {}).items())
        if m.get("description") or changes:
            lineage.append(f"<li><b>{html.escape(m['key'])}</b>: {html.escape(m.get('description', ''))}"
                           f"{' — changelog: ' + html.escape(changes) if changes else ''}</li>")
    if lineage:
        body += "<p>Lineage:</p><ul>" + "".join(lineage) + "</ul>"
    body += ("<p class='meta'>The weights SHA-256 is the identity of a version: the lock binds this report to "
             "exactly these files, and promotion to <code>@validated</code> checks it.</p>")
    return _section("models", "2. Model versions and lineage", body)


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
        chars["age, mean (SD)"] = scans.groupby("site")["age"].agg(lambda a: f"{a.mean():.1f} ({a.std():.1f})")
    for column in ("sex", "group"):
        if column in scans:
            chars[column] = scans.groupby("site")[column].agg(
                lambda v: ", ".join(f"{k} {n}" for k, n in v.value_counts().sort_index().items()))
    if chars:
        body += "<h3>Participant characteristics per site</h3>" + _table(pd.DataFrame(chars).reset_index())
    body += _qc(c)
    return _section("data", "3. Data provenance", body)


def _qc(c: ReportContent) -> str:
    body = "<section id='qc'><h3>Upload-time QC gate, per site</h3>"
    if c.qc is None or not c.qc.available:
        source = c.qc.source if c.qc is not None else "none supplied"
        return body + _p(f"Source: {source}.") + "</section>"
    body += _p(f"Source: {c.qc.source}. Counts are of series checked against the locked acquisition "
               "protocol; open deviations are those not resolved by a later passing re-scan.")
    table = c.qc.table.copy()
    if "rescan_rate" in table:
        table["rescan_rate"] = table["rescan_rate"].map(lambda r: "-" if pd.isna(r) else f"{100 * r:.1f}%")
    return body + _table(table) + "</section>"


def _methods(c: ReportContent) -> str:
    plan = c.evaluation.plan
    body = _p(f"Pre-specified analysis (locked in {LOCK_FILE}, re-derivable with `sitebench report verify "
              f"--recompute`): strata {', '.join(plan.strata)}; {plan.bootstrap} bootstrap replicates, seed "
              f"{plan.seed}; alpha {plan.alpha}; equivalence margin "
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
    body += _table(pd.DataFrame(list(METHODS), columns=["statistic", "how", "reference"]))
    return _section("methods", "4. Methods", body)


def _strata(c: ReportContent) -> str:
    metrics, unit = c.evaluation.metrics, c.unit
    body = ("<p>How each model version does at each vendor (a model trained on one vendor shows here whether "
            "it transfers), then bias per site with 95% CIs. n.e.: not estimable.</p>")
    body += _img(figures.vendor_transfer_plot(metrics, "mae", unit), "Mean absolute error by vendor")
    if "dice" in set(metrics["metric"]):
        body += _img(figures.vendor_transfer_plot(metrics, "dice", "Dice"), "Dice by vendor")
    body += _table(_pivot_metrics(metrics, "vendor", METRIC_NAMES))
    body += _img(figures.forest_plot(metrics, "bias", "site", unit), "Per-site bias, 95% CI")
    body += _table(_pivot_metrics(metrics, "site", METRIC_NAMES))
    if "software_version" in set(metrics["stratum"]):
        body += "<h3>By scanner software version</h3>" + _table(_pivot_metrics(metrics, "software_version",
                                                                              METRIC_NAMES))
    return _section("results-strata", "5. Performance per site, vendor and software version", body)


def _agreement(c: ReportContent) -> str:
    body = _img(figures.bland_altman(c.evaluation.table, c.unit),
                "Bland–Altman: difference vs mean, bias and 95% limits")
    body += _table(_pivot_metrics(c.evaluation.metrics, "overall", METRIC_NAMES))
    return _section("results-agreement", "6. Agreement with the reference (Bland–Altman)", body)


def _calibration(c: ReportContent) -> str:
    table = c.evaluation.calibration
    body = _p("Slope 1 and intercept 0 mean the model's number can be read at face value; a slope below 1 "
              "means the model spreads values out more than the reference does.")
    body += _img(figures.calibration_plot(c.evaluation.table, c.unit), "Reference against prediction")
    body += _table(table)
    return _section("results-calibration", "7. Calibration", body)


def _variance(c: ReportContent) -> str:
    shares = variance_shares(c.evaluation.mixed)
    body = _img(figures.variance_components_plot(shares), "Share of variance by component")
    body += _table(shares)
    for m in c.evaluation.mixed:
        fe = pd.DataFrame([{"term": t, **v} for t, v in m["fixed_effects"].items()])
        body += (f"<h3>{html.escape(m['model_key'])} — response: {html.escape(m['response'])}</h3>"
                 f"<p class='meta'>{html.escape(m.get('formula', ''))}; converged={m.get('converged')}, "
                 f"optimizer={html.escape(str(m.get('optimizer')))}, n={m.get('n_obs')}, "
                 f"boundary={m.get('boundary')}</p>") + _table(fe)
    return _section("results-variance", "8. Scanner effects (variance components)", body)


def _harmonization(c: ReportContent) -> str:
    table = c.evaluation.harmonization
    body = _p("Would ComBat harmonization across sites remove the site effect on the model's output without "
              "removing the biological effects the trial measures? Site share of variance before and after, "
              "and each covariate's effect before and after (preserved = inside its original 95% CI).")
    body += _table(table)
    for note in c.evaluation.notes:
        body += f"<p class='meta'>{html.escape(note)}</p>"
    return _section("results-harmonization", "9. Effect of harmonization", body)


def _upgrade(c: ReportContent) -> str:
    body = _p("Within each site whose scanner software changed during the study: error before vs after "
              "(Welch 95% CI), and the same effect as the software_upgraded term of the mixed model above.")
    body += _img(figures.upgrade_plot(c.evaluation.table, unit=c.unit), "Error before and after the software change")
    if len(c.evaluation.upgrade):
        body += _table(c.evaluation.upgrade)
    else:
        body += _p("No site changed its scanner software during this study.")
    return _section("results-upgrade", "10. Effect of the scanner software upgrade", body)


def _equivalence(c: ReportContent) -> str:
    table, margin = c.evaluation.equivalence, c.evaluation.plan.equivalence_margin
    if margin is None or table.empty:
        body = _p("No equivalence margin was pre-specified (report.equivalence_margin in the spec), so no "
                  "equivalence decision is made.")
        return _section("results-equivalence", "11. Equivalence decisions", body)
    decisions = []
    for key, part in table.groupby("model_key", sort=False):
        verdict = "every site within" if bool(part["all_within_margin"].iloc[0]) else "not shown for every site"
        decisions.append({"model": key, "margin": margin, "decision (intersection–union)": verdict,
                          "sites equivalent (Holm)": f"{int(part['equivalent_holm'].sum())} of {len(part)}"})
    body = _p(f"Is each site's mean error within ±{margin:g} {c.unit} of the other sites'? Two one-sided "
              f"tests per site at alpha {c.evaluation.plan.alpha}; a site is equivalent when its "
              f"{100 * (1 - 2 * c.evaluation.plan.alpha):g}% CI lies inside the margin.")
    body += _table(pd.DataFrame(decisions)) + _table(table.drop(columns=["all_within_margin"]))
    return _section("results-equivalence", "11. Equivalence decisions", body)


def _comparison(c: ReportContent) -> str:
    table, auc = c.evaluation.comparison, c.evaluation.discrimination
    if table.empty:
        body = _p("No pair of model versions was named for comparison (report.compare in the spec).")
        return _section("comparison", "12. Model versions side by side", body)
    body = _p("Absolute error of two versions on the same scans (difference = second − first; negative "
              "favours the second). Per site and overall: paired-t 95% CI, Wilcoxon signed-rank p and, with "
              "a margin, paired TOST.")
    body += _img(figures.comparison_plot(table, c.unit, c.evaluation.plan.comparison_margin),
                 "Paired difference in absolute error per site, 95% CI (dotted: the equivalence margin)")
    for (a, b), part in table.groupby(["model_a", "model_b"], sort=False):
        body += f"<h3>{html.escape(b)} − {html.escape(a)}</h3>"
        body += _table(part[[col for col in COMPARISON_SHOWN if col in part]])
    body += "<p class='meta'>Every column (one-sided p-values, TOST intervals) is in tables/comparison.csv.</p>"
    if not auc.empty:
        ep = c.evaluation.plan.endpoint
        body += (f"<h3>Discrimination of {html.escape(ep.column)} = {html.escape(ep.positive)} "
                 "(paired DeLong)</h3>") + _table(auc)
    return _section("comparison", "12. Model versions side by side", body)


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
    return _section("limitations", "13. Limitations", "<ul>" + "".join(f"<li>{html.escape(i)}</li>"
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
    titles = {sid: title for sid, title, _ in SECTIONS}
    for guideline in data["guidelines"].values():
        rows = []
        for item in guideline["items"]:
            where = item["section"]
            answered = (f"<a href='#{where}'>{html.escape(titles.get(where, where))}</a>"
                        if where != "not-addressed" else f"not in this report: {html.escape(item.get('reason', ''))}")
            rows.append(f"<tr><td>{html.escape(item['id'])}</td><td>{html.escape(item['topic'])}</td>"
                        f"<td>{html.escape(item['item'])}</td><td>{answered}</td></tr>")
        body += (f"<h3>{html.escape(guideline['title'])}</h3><table class='checklist'><thead><tr><th>item</th>"
                 "<th>topic</th><th>asks for</th><th>answered in</th></tr></thead><tbody>" + "".join(rows) +
                 "</tbody></table>")
    return _section("checklist", "14. Reporting checklist (TRIPOD+AI, CLAIM 2024)", body)


def _provenance(c: ReportContent) -> str:
    per_scan = [k for k in c.materials if k.startswith(("image ", "label "))]
    listed = [{"input": k, "path": str(v)} for k, v in c.materials.items() if k not in per_scan]
    if per_scan:
        listed.append({"input": f"{len(per_scan)} image and label files",
                       "path": "each hashed in lock.json (materials 'image <scan_id>', 'label <scan_id>')"})
    body = _table(pd.DataFrame(listed))
    body += f"<p class='meta'>seeds: {html.escape(json.dumps(c.seeds))}</p>"
    body += _table(pd.DataFrame(sorted(package_versions().items()), columns=["package", "version"]))
    return _section("provenance", "15. Provenance", body)


def _signatures(c: ReportContent) -> str:
    body = ("<p>Electronic sign-offs (printed name, date and time, meaning: authorship, review or approval) are "
            "Ed25519 signatures over the SHA-256 of this report's <code>lock.json</code>, which hashes this "
            "document and everything listed above. They are kept in <code>signatures.json</code>; check them "
            "with <code>sitebench report verify REPORT --public-key KEY.pub</code>.</p>")
    body += _table(pd.DataFrame([{"meaning": m, "printed name": "", "date and time (UTC)": "",
                                  "signature": "see signatures.json"} for m in ("authorship", "review", "approval")]))
    return _section("signatures", "Signature block", body)


#: (id, title, builder) in reading order; the checklist links to these ids.
SECTIONS: tuple[tuple[str, str, Callable[[ReportContent], str]], ...] = (
    ("intended-use", "1. Intended use", _intended_use),
    ("models", "2. Model versions and lineage", _models),
    ("data", "3. Data provenance", _data),
    ("qc", "3. Data provenance: QC gate", lambda c: ""),
    ("methods", "4. Methods", _methods),
    ("results-strata", "5. Performance per stratum", _strata),
    ("results-agreement", "6. Agreement", _agreement),
    ("results-calibration", "7. Calibration", _calibration),
    ("results-variance", "8. Scanner effects", _variance),
    ("results-harmonization", "9. Harmonization", _harmonization),
    ("results-upgrade", "10. Software upgrade", _upgrade),
    ("results-equivalence", "11. Equivalence", _equivalence),
    ("comparison", "12. Versions side by side", _comparison),
    ("simulation-truth", "Simulation truth", _truth),
    ("limitations", "13. Limitations", _limitations),
    ("checklist", "14. Reporting checklist", _checklist),
    ("provenance", "15. Provenance", _provenance),
    ("signatures", "Signature block", _signatures),
    ("title", "Title and version", lambda c: ""),
    ("findings", "Key findings", lambda c: ""),
)


def render_html(content: ReportContent, version: int, supersedes: str | None = None) -> str:
    """The whole report as one self-contained HTML page (figures embedded as PNG data URIs)."""
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
    if content.findings:
        parts.append("<section id='findings'><h2>Key findings</h2>" + "".join(
            f"<div class='finding'>{html.escape(f)}</div>" for f in content.findings) + "</section>")
    parts += [builder(content) for _, _, builder in SECTIONS]
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)
