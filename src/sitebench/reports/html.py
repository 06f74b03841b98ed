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
from sitebench.reports.qc_summary import QCSummary
from sitebench.stratification.evaluation import AnalysisPlan, Evaluation, evaluation_csv, result_csv

REPORT_FILE = "report.html"


@dataclass
class ReportContent:
    """Everything a validation report shows; built by the pipeline from results objects."""

    name: str
    title: str
    evaluation: Evaluation  # every result table, derived from evaluation.table
    plan: AnalysisPlan  # the pre-specified analysis, locked so a recompute can re-derive the results
    models: list[dict[str, Any]]  # model cards with lineage
    predictions: pd.DataFrame  # the runner's predictions the evaluation table was built from
    reference: str  # manifest column holding the reference value
    materials: dict[str, Path]  # what the results rest on, hashed into the lock
    seeds: dict[str, Any]
    unit: str = "ml"
    findings: list[str] = field(default_factory=list)
    truth: dict[str, Any] | None = None
    intended_use: str = ""
    population: str = ""
    limitations: list[str] = field(default_factory=list)
    qc: QCSummary | None = None


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


PREDICTION_COLUMNS = ("scan_id", "model_key", "weights_sha256", "image_sha256", "prediction", "dice")


def build_report(content: ReportContent, root: str | Path) -> Report:
    """Write ``report.html``, ``report.pdf``, their tables and ``lock.json`` into a new version folder."""
    root = Path(root)
    for name, path in content.materials.items():
        if not Path(path).exists():
            raise SitebenchError(f"report material '{name}' does not exist", path)
    report_dir, version = next_report_dir(root, content.name)
    tables_dir = report_dir / "tables"
    tables_dir.mkdir()
    ev = content.evaluation
    keys = list(dict.fromkeys(ev.table["model_key"]))
    predictions = content.predictions[content.predictions["model_key"].isin(keys)]
    predictions = predictions[[c for c in PREDICTION_COLUMNS if c in predictions]].sort_values(
        ["model_key", "scan_id"], kind="stable")
    subjects: dict[str, Path] = {}
    for name, text in (("predictions", evaluation_csv(predictions)), ("evaluation", evaluation_csv(ev.table))):
        path = tables_dir / f"{name}.csv"
        path.write_text(text)
        subjects[f"table:{name}"] = path
    for name, frame in ev.result_tables().items():
        path = tables_dir / f"{name}.csv"
        path.write_bytes(result_csv(frame))
        subjects[f"table:{name}"] = path
    (tables_dir / "mixed_models.json").write_text(json.dumps(ev.mixed, indent=2, sort_keys=True))
    subjects["table:mixed_models"] = tables_dir / "mixed_models.json"
    if content.qc is not None and content.qc.available:
        content.qc.table.to_csv(tables_dir / "qc_by_site.csv", index=False)
        subjects["table:qc_by_site"] = tables_dir / "qc_by_site.csv"
    previous = report_dir.parent / f"v{version - 1:03d}"
    supersedes = previous.name if version > 1 and (previous / LOCK_FILE).exists() else None
    html_text = render_html(content, version, supersedes)
    report_path = report_dir / REPORT_FILE
    report_path.write_text(html_text, encoding="utf-8")
    pdf_path = render_pdf(report_path, report_dir / "report.pdf")
    subjects = {"report.html": report_path, "report.pdf": pdf_path, **subjects}
    analysis = {"plan": content.plan.to_dict(), "reference": content.reference, "model_keys": keys,
                "unit": content.unit}
    lock_path = write_lock(report_dir, subjects, {k: Path(v) for k, v in content.materials.items()},
                           {"name": content.name, "title": content.title, "version": version,
                            "supersedes": supersedes, "created_utc": utc_now()}, content.seeds, analysis)
    return Report(path=report_path, report_dir=report_dir, version=version, lock_path=lock_path)


from sitebench.reports.sections import render_html  # noqa: E402  (sections use the helpers above)
