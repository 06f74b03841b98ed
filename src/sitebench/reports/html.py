"""The versioned validation report: one self-contained HTML file, its tables, and its lock.

A report folder is ``<root>/<name>/vNNN/`` and is created exclusively: a new run
writes a new version and never touches an old one.
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sitebench.errors import SitebenchError
from sitebench.provenance import code_version, package_versions, utc_now
from sitebench.reports import figures
from sitebench.reports.lock import LOCK_FILE, write_lock
from sitebench.reports.pdf import render_pdf

REPORT_FILE = "report.html"


@dataclass
class ReportContent:
    """Everything a validation report shows; built by the pipeline from results objects."""

    name: str
    title: str
    evaluation: pd.DataFrame  # one row per scan and model: prediction, reference, error, manifest columns
    metrics: pd.DataFrame  # tidy per-stratum metrics with model_key
    mixed: list[dict[str, Any]]  # ScannerEffects.to_dict() with model_key added
    upgrade: pd.DataFrame  # tidy upgrade-effect table with model_key
    models: list[dict[str, Any]]  # model cards
    materials: dict[str, Path]  # what the results rest on, hashed into the lock
    seeds: dict[str, Any]
    unit: str = "ml"
    findings: list[str] = field(default_factory=list)
    truth: dict[str, Any] | None = None


@dataclass
class Report:
    path: Path
    report_dir: Path
    version: int
    lock_path: Path

    def summary(self) -> str:
        return f"report v{self.version:03d}: {self.path}"


def next_report_dir(root: Path, name: str) -> tuple[Path, int]:
    """Create the next free ``vNNN`` folder exclusively (safe against two runs at once)."""
    base = root / name
    base.mkdir(parents=True, exist_ok=True)
    existing = [int(m.group(1)) for p in base.iterdir() if (m := re.fullmatch(r"v(\d{3,})", p.name))]
    version = max(existing, default=0) + 1
    while True:
        candidate = base / f"v{version:03d}"
        try:
            candidate.mkdir()
            return candidate, version
        except FileExistsError:
            version += 1


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


def build_report(content: ReportContent, root: str | Path) -> Report:
    """Write ``report.html``, its tables and ``lock.json`` into a new version folder."""
    root = Path(root)
    for name, path in content.materials.items():
        if not Path(path).exists():
            raise SitebenchError(f"report material '{name}' does not exist", path)
    report_dir, version = next_report_dir(root, content.name)
    tables_dir = report_dir / "tables"
    tables_dir.mkdir()
    table_files = {
        "metrics_by_stratum": content.metrics,
        "fixed_effects": pd.DataFrame([{"model_key": m["model_key"], "response": m["response"], "term": t, **v}
                                       for m in content.mixed for t, v in m["fixed_effects"].items()]),
        "variance_components": _shares(content.mixed),
        "upgrade_effect": content.upgrade,
        "evaluation": content.evaluation[[c for c in ("scan_id", "model_key", "site", "scanner_id", "vendor",
                                                      "software_version", "software_upgraded", "reference",
                                                      "prediction", "error", "dice") if c in content.evaluation]],
    }
    subjects: dict[str, Path] = {}
    for name, frame in table_files.items():
        path = tables_dir / f"{name}.csv"
        frame.to_csv(path, index=False, float_format="%.10g")
        subjects[f"table:{name}"] = path
    (tables_dir / "mixed_models.json").write_text(json.dumps(content.mixed, indent=2, sort_keys=True))
    subjects["table:mixed_models"] = tables_dir / "mixed_models.json"
    previous = report_dir.parent / f"v{version - 1:03d}"
    supersedes = previous.name if version > 1 and (previous / LOCK_FILE).exists() else None
    html_text = _render(content, version, table_files, supersedes)
    report_path = report_dir / REPORT_FILE
    report_path.write_text(html_text, encoding="utf-8")
    pdf_path = render_pdf(report_path, report_dir / "report.pdf")
    subjects = {"report.html": report_path, "report.pdf": pdf_path, **subjects}
    lock_path = write_lock(report_dir, subjects, {k: Path(v) for k, v in content.materials.items()},
                           {"name": content.name, "title": content.title, "version": version,
                            "supersedes": supersedes, "created_utc": utc_now()}, content.seeds)
    return Report(path=report_path, report_dir=report_dir, version=version, lock_path=lock_path)


def _shares(mixed: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for m in mixed:
        share = m.get("variance_share", {})
        rows.append({"model_key": m["model_key"], "response": m["response"],
                     **{f"var_{k}": v for k, v in m.get("variance_components", {}).items()},
                     "site": share.get("site"), "scanner": share.get("scanner"), "residual": share.get("residual"),
                     "converged": m.get("converged"), "optimizer": m.get("optimizer"),
                     "boundary": m.get("boundary")})
    return pd.DataFrame(rows)


def _render(content: ReportContent, version: int, tables: dict[str, pd.DataFrame],
            supersedes: str | None = None) -> str:
    ev, metrics, unit = content.evaluation, content.metrics, content.unit
    versions = code_version()
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(content.title)} "
             f"v{version:03d}</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(content.title)}</h1>",
             f"<p class='meta'>Report <b>{html.escape(content.name)}</b>, version <b>v{version:03d}</b> · "
             f"generated {utc_now()} · sitebench {html.escape(str(versions['package_version']))}, git "
             f"{html.escape(str(versions['git_commit']))}{' (dirty)' if versions['git_dirty'] else ''} · "
             f"the SHA-256 of every input is in <code>{LOCK_FILE}</code> beside this file; check it with "
             f"<code>sitebench report verify</code>.</p>"]
    if supersedes:
        parts.append(f"<p class='meta'>This version supersedes <b>{supersedes}</b> of the same report, which "
                     "is kept unchanged.</p>")
    n_scans = ev["scan_id"].nunique()
    parts.append(f"<p>{n_scans} scans from {ev['site'].nunique()} sites, {ev['vendor'].nunique()} vendors and "
                 f"{ev['software_version'].nunique()} scanner software versions; {len(content.models)} model "
                 f"versions; reference: <code>{html.escape(str(content.seeds.get('reference', 'reference')))}"
                 f"</code>.</p>")
    if content.findings:
        parts.append("<h2>Key findings</h2>" + "".join(f"<div class='finding'>{html.escape(f)}</div>"
                                                       for f in content.findings))
    parts.append("<h2>1. Model versions</h2>")
    parts.append(_table(pd.DataFrame([{"model": m["key"], "kind": m["kind"],
                                       "weights SHA-256": m["weights_sha256"],
                                       "trained on": m.get("training", {}).get("vendor", "-"),
                                       "augmentation": m.get("training", {}).get("augmentation", "-"),
                                       "registered": m.get("registered", "-")} for m in content.models])))
    parts.append("<h2>2. Data</h2>")
    scans = ev.drop_duplicates("scan_id")
    counts = scans.groupby(["site", "vendor", "scanner_model", "software_version"]).size().rename("scans")
    parts.append(_table(counts.reset_index()))
    parts.append("<h2>3. Performance across vendors</h2><p>How each model version does at each vendor. "
                 "A model trained on one vendor shows here whether it transfers.</p>")
    parts.append(_img(figures.vendor_transfer_plot(metrics, "mae", unit), "Mean absolute error by vendor"))
    if "dice" in set(metrics["metric"]):
        parts.append(_img(figures.vendor_transfer_plot(metrics, "dice", "Dice"), "Dice by vendor"))
    parts.append(_table(_pivot_metrics(metrics, "vendor", ("mae", "bias", "rmse", "pearson_r", "dice"))))
    parts.append("<h2>4. Bias per site</h2><p>Bias (model − reference) with 95% bootstrap CIs resampled within "
                 "site (by subject where subjects have repeat scans). n.e.: not estimable.</p>")
    parts.append(_img(figures.forest_plot(metrics, "bias", "site", unit), "Per-site bias, 95% CI"))
    parts.append(_table(_pivot_metrics(metrics, "site", ("mae", "bias", "rmse", "pearson_r", "dice"))))
    parts.append("<h2>5. Agreement (Bland–Altman)</h2>")
    parts.append(_img(figures.bland_altman(ev, unit), "Bland–Altman: difference vs mean, bias and 95% limits"))
    parts.append(_table(_pivot_metrics(metrics, "overall", ("mae", "bias", "rmse", "pearson_r", "dice"))))
    parts.append("<h2>6. Scanner software upgrade</h2><p>Within each site whose scanner software changed "
                 "during the study: error before vs after (Welch 95% CI), and the same effect as the "
                 "<code>software_upgraded</code> term of the mixed model below.</p>")
    parts.append(_img(figures.upgrade_plot(ev, unit=unit), "Error before and after the software change"))
    if len(content.upgrade):
        parts.append(_table(content.upgrade))
    parts.append("<h2>7. Scanner effects (mixed model)</h2><p>statsmodels MixedLM, REML: random intercept per "
                 "site, variance component for scanner within site; fixed effects for vendor, software "
                 "upgrade and covariates. Wald 95% CIs.</p>")
    parts.append(_img(figures.variance_components_plot(tables["variance_components"]),
                      "Share of variance by component"))
    parts.append(_table(tables["variance_components"]))
    for m in content.mixed:
        fe = pd.DataFrame([{"term": t, **v} for t, v in m["fixed_effects"].items()])
        parts.append(f"<h3>{html.escape(m['model_key'])} — response: {html.escape(m['response'])}</h3>"
                     f"<p class='meta'>{html.escape(m.get('formula', ''))}; converged={m.get('converged')}, "
                     f"optimizer={html.escape(str(m.get('optimizer')))}, n={m.get('n_obs')}, "
                     f"boundary={m.get('boundary')}</p>")
        parts.append(_table(fe))
    if content.truth:
        parts.append("<h2>8. Simulation truth</h2><p>This trial was simulated; the effects the simulator "
                     "injected, for comparison with the estimates above.</p>")
        parts.append(f"<pre>{html.escape(json.dumps(content.truth, indent=2))}</pre>")
    parts.append("<h2>Provenance</h2>")
    per_scan = [k for k in content.materials if k.startswith(("image ", "label "))]
    listed = [{"input": k, "path": str(v)} for k, v in content.materials.items() if k not in per_scan]
    if per_scan:
        listed.append({"input": f"{len(per_scan)} image and label files",
                       "path": "each hashed in lock.json (materials 'image <scan_id>', 'label <scan_id>')"})
    parts.append(_table(pd.DataFrame(listed)))
    parts.append(f"<p class='meta'>seeds: {html.escape(json.dumps(content.seeds))}</p>")
    parts.append(_table(pd.DataFrame(sorted(package_versions().items()), columns=["package", "version"])))
    parts.append("<h2>Signature block</h2><p>Electronic sign-offs (printed name, date and time, meaning: "
                 "authorship, review or approval) are Ed25519 signatures over the SHA-256 of this report's "
                 "<code>lock.json</code>, which hashes this document and everything listed above. They are kept "
                 "in <code>signatures.json</code>; check them with <code>sitebench report verify REPORT "
                 "--public-key KEY.pub</code>.</p>")
    parts.append(_table(pd.DataFrame([{"meaning": m, "printed name": "", "date and time (UTC)": "",
                                       "signature": "see signatures.json"} for m in
                                      ("authorship", "review", "approval")])))
    parts.append("</body></html>")
    return "\n".join(parts)
