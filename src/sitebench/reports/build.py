"""Writing a validation report version: HTML and PDF (from ``sections``), its tables, and its lock.

A report folder is ``<root>/<name>/vNNN/`` and is created exclusively: a new run
writes a new version and never touches an old one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from sitebench.errors import SitebenchError
from sitebench.provenance import utc_now
from sitebench.reports.content import LOCKED_PREDICTION_COLUMNS, ReportContent
from sitebench.reports.lock import LOCK_FILE, write_lock
from sitebench.reports.pdf import render_pdf
from sitebench.reports.sections import render_html
from sitebench.stratification.evaluation import evaluation_csv, result_csv

REPORT_FILE = "report.html"


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
    predictions = predictions[[c for c in LOCKED_PREDICTION_COLUMNS if c in predictions]].sort_values(
        ["model_key", "scan_id"], kind="stable")
    subjects: dict[str, Path] = {}
    tables = [("predictions", evaluation_csv(predictions)), ("evaluation", evaluation_csv(ev.table))]
    if content.overlap_scores is not None and not content.overlap_scores.empty:
        tables.append(("overlap_scores", evaluation_csv(content.overlap_scores)))  # role table:overlap_scores
    for name, text in tables:
        path = tables_dir / f"{name}.csv"
        path.write_text(text)
        subjects[f"table:{name}"] = path
    for file_name, data in ev.result_files().items():
        path = tables_dir / file_name
        path.write_bytes(data)
        subjects[f"table:{path.stem}"] = path
    if content.gate_effect is not None:
        (tables_dir / "gate_effect.csv").write_bytes(result_csv(content.gate_effect))
        subjects["table:gate_effect"] = tables_dir / "gate_effect.csv"
    if content.sweeps:
        for stem, index in (("sweep_table", 0), ("sweep_tolerances", 1)):
            frame = pd.concat([pair[index] for pair in content.sweeps], ignore_index=True)
            (tables_dir / f"{stem}.csv").write_bytes(result_csv(frame))
            subjects[f"table:{stem}"] = tables_dir / f"{stem}.csv"
    for stem, table in (content.qc.tables() if content.qc is not None else {}).items():
        (tables_dir / f"{stem}.csv").write_text(evaluation_csv(table))
        subjects[f"table:{stem}"] = tables_dir / f"{stem}.csv"
    previous = report_dir.parent / f"v{version - 1:03d}"
    supersedes = previous.name if version > 1 and (previous / LOCK_FILE).exists() else None
    html_text = render_html(content, version, supersedes)
    report_path = report_dir / REPORT_FILE
    report_path.write_text(html_text, encoding="utf-8")
    pdf_path = render_pdf(report_path, report_dir / "report.pdf")
    subjects = {"report.html": report_path, "report.pdf": pdf_path, **subjects}
    analysis = {"plan": ev.plan.to_dict(), "reference": content.reference, "model_keys": keys,
                "unit": content.unit}
    lock_path = write_lock(report_dir, subjects, {k: Path(v) for k, v in content.materials.items()},
                           {"name": content.name, "title": content.title, "version": version,
                            "supersedes": supersedes, "created_utc": utc_now(),
                            **({"mlflow_run": dict(content.mlflow_run)} if content.mlflow_run else {})},
                           content.seeds, analysis)
    return Report(path=report_path, report_dir=report_dir, version=version, lock_path=lock_path)


