"""The upload-time QC gate's evidence for the report's data-provenance section.

Two sources, in order: the gate's own records (a :class:`~sitebench.reports.coverage.GateRows`
read from a ``sitebench qc serve`` store by the pipeline: reports read results, they do not
open the gate's database), or the ``qc_status`` / ``qc_deviations`` columns that
``sitebench qc manifest`` writes into the data manifest. A trial with neither gets an explicit
statement, never an empty table that reads like "no problems".

From the gate's records come, besides the per-site counts: every deviation with its
parameter, expected and observed value; every drift event; every re-scan with the time from
the failing verdict to the re-scan's verdict; the export of the verdict records themselves
(locked with the report, so a reader can trace each count to a series pseudonym); and each
site whose software or scanner changed, marked "re-validation pending" until a signed report
covers the change (:func:`~sitebench.reports.coverage.revalidation_pending`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from sitebench.datasets import manifest as mf
from sitebench.qc.records import rescan_groups, resolved_by_rescan
from sitebench.reports.coverage import GateRows, ReportCoverage, manifest_scans, revalidation_pending
from sitebench.reports.coverage import _key_ident, _shown  # how coverage reads drift events

COLUMNS = ("site", "series", "passed", "warned", "failed", "undetermined", "unmatched", "open_deviations",
           "drift_events", "rescans", "rescan_rate", "median_minutes_to_rescan", "rejected_files", "revalidation")
#: The verdict record export's columns (``tables/qc_verdicts.csv``): pseudonyms and acquisition facts only.
VERDICT_COLUMNS = ("verdict_id", "site", "series_key", "study_key", "scanner_key", "manufacturer", "model",
                   "software_version", "field_strength", "protocol", "protocol_version", "protocol_sha256",
                   "status", "checked_utc", "n_files", "deviations", "phi_attributes_present")
DEVIATION_COLUMNS = ("site", "series_key", "status", "parameter", "expected", "observed", "rule", "severity",
                     "resolved_by_rescan")
DRIFT_COLUMNS = ("site", "kind", "parameter", "baseline", "observed", "series_key", "scanner_key", "first_seen")
RESCAN_COLUMNS = ("site", "study_key", "protocol", "original_series", "original_status", "rescan_series",
                  "rescan_status", "original_checked_utc", "rescan_checked_utc", "minutes_to_rescan")
REVALIDATION_COLUMNS = ("site", "kind", "before", "after", "since_series", "since_utc", "this_report")


def _empty(columns: Iterable[str]) -> pd.DataFrame:
    return pd.DataFrame(columns=list(columns))


@dataclass
class QCSummary:
    """The gate's per-site table and the record frames behind it (each locked as ``tables/qc_*.csv``)."""

    source: str
    table: pd.DataFrame
    verdicts: pd.DataFrame = field(default_factory=lambda: _empty(VERDICT_COLUMNS))
    deviations: pd.DataFrame = field(default_factory=lambda: _empty(DEVIATION_COLUMNS))
    drift: pd.DataFrame = field(default_factory=lambda: _empty(DRIFT_COLUMNS))
    rescans: pd.DataFrame = field(default_factory=lambda: _empty(RESCAN_COLUMNS))
    revalidation: pd.DataFrame = field(default_factory=lambda: _empty(REVALIDATION_COLUMNS))
    from_gate: bool = False

    @property
    def available(self) -> bool:
        return not self.table.empty

    def tables(self) -> dict[str, pd.DataFrame]:
        """The files this evidence is locked as: the per-site table, and from a gate its record frames."""
        if not self.available:
            return {}
        out = {"qc_by_site": self.table}
        if self.from_gate:
            out.update(qc_verdicts=self.verdicts, qc_deviations=self.deviations, qc_drift_events=self.drift,
                       qc_rescans=self.rescans, qc_revalidation=self.revalidation)
        return out


def _row(status: Any) -> dict[str, Any]:
    """One gate row (a ``SiteStatus`` or a mapping) as a plain dict, with its derived re-scan rate."""
    row = asdict(status) if is_dataclass(status) and not isinstance(status, type) else dict(status)
    if "rescan_rate" not in row:
        row["rescan_rate"] = getattr(status, "rescan_rate", None)
    return row


def _text(value: Any) -> str:
    """A JSON value as one cell: lists joined with '\\', None as ''."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "\\".join(_text(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _minutes(start: str | None, end: str | None) -> float | None:
    try:
        return (datetime.fromisoformat(str(end).replace("Z", "+00:00")) -
                datetime.fromisoformat(str(start).replace("Z", "+00:00"))).total_seconds() / 60.0
    except (TypeError, ValueError):
        return None


def rescan_frame(verdicts: list[dict[str, Any]]) -> pd.DataFrame:
    """Every re-scan (the gate's definition, :func:`~sitebench.qc.records.rescan_groups`) with the series it
    repeats and the minutes from that series' verdict to the re-scan's verdict."""
    rows = []
    for (site, study, protocol), members in rescan_groups(verdicts).items():
        for before, after in zip(members, members[1:]):
            rows.append({"site": site, "study_key": study, "protocol": protocol,
                         "original_series": before["series_key"], "original_status": before["status"],
                         "rescan_series": after["series_key"], "rescan_status": after["status"],
                         "original_checked_utc": before["checked_utc"], "rescan_checked_utc": after["checked_utc"],
                         "minutes_to_rescan": _minutes(before["checked_utc"], after["checked_utc"])})
    return pd.DataFrame(rows, columns=list(RESCAN_COLUMNS))


def gate_frames(gate: GateRows, manifest: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The verdict export, deviations, drift events, re-scans and re-validation rows of one gate."""
    verdicts = gate.latest_verdicts
    by_id = {v["id"]: v for v in verdicts}
    counts: dict[int, int] = {}
    for d in gate.deviations:
        counts[d["verdict_id"]] = counts.get(d["verdict_id"], 0) + 1
    export = pd.DataFrame([{**{k: v.get(k) for k in VERDICT_COLUMNS}, "verdict_id": v["id"],
                            "deviations": counts.get(v["id"], 0), "scanner_key": v.get("scanner"),
                            "phi_attributes_present": _text(v.get("phi_attributes_present") or [])}
                           for v in verdicts], columns=list(VERDICT_COLUMNS))
    resolved = resolved_by_rescan(verdicts)
    deviations = pd.DataFrame([{"site": by_id[d["verdict_id"]]["site"],
                                "series_key": by_id[d["verdict_id"]]["series_key"],
                                "status": by_id[d["verdict_id"]]["status"], "parameter": d["parameter"],
                                "expected": d["expected"], "observed": _text(d["observed"]), "rule": d["rule"],
                                "severity": d["severity"], "resolved_by_rescan": d["verdict_id"] in resolved}
                               for d in gate.deviations if d["verdict_id"] in by_id], columns=list(DEVIATION_COLUMNS))
    def shown(event: dict[str, Any], key: str) -> str | None:
        value = _shown(event.get(key))
        if event["kind"] == "scanner" and value:  # scanner keys (vendor|pseudonym|protocol): the pseudonym says it
            value = ", ".join(_key_ident(k) or k for k in value.split(",") if k.strip())
        return value

    drift = pd.DataFrame([{"site": e["site"], "kind": e["kind"], "parameter": e["parameter"],
                           "baseline": shown(e, "baseline"), "observed": shown(e, "observed"),
                           "series_key": e["series_key"], "scanner_key": e["scanner"], "first_seen": e["first_seen"]}
                          for e in gate.drift_events], columns=list(DRIFT_COLUMNS))
    this_report = ReportCoverage(report_dir=Path("."), scans=manifest_scans(manifest) if mf.SITE in manifest else [])
    revalidation = pd.DataFrame([
        {"site": p.site, "kind": c.kind, "before": c.before, "after": c.after, "since_series": c.since_series,
         "since_utc": c.since_utc,
         "this_report": ("includes it: pending until this report is signed" if c.covered_by(this_report, False)
                         else "does not include it: needs a report on scans after the change")}
        for p in revalidation_pending(gate.drift_events, verdicts, []) for c in p.changes],
        columns=list(REVALIDATION_COLUMNS))
    return {"verdicts": export, "deviations": deviations, "drift": drift, "rescans": rescan_frame(verdicts),
            "revalidation": revalidation}


def qc_summary(manifest: pd.DataFrame, gate: GateRows | None = None) -> QCSummary:
    """Per-site verdict counts, deviations, re-scans, drift events and re-validation, from the best source at hand.

    ``gate`` holds the gate's own records (``GateRows.from_records``); without it the manifest's
    QC columns are used, and without those the summary says there are no QC records.
    """
    if gate is not None:
        frames = gate_frames(gate, manifest)
        rows = [_row(r) for r in gate.site_status]
        table = pd.DataFrame(rows, columns=[c for c in COLUMNS if c not in ("median_minutes_to_rescan",
                                                                            "revalidation")])
        rescans = frames["rescans"]
        median = rescans.groupby("site")["minutes_to_rescan"].median() if len(rescans) else pd.Series(dtype=float)
        table["median_minutes_to_rescan"] = table["site"].map(median)
        pending = set(frames["revalidation"]["site"])
        table["revalidation"] = ["pending" if s in pending else "" for s in table["site"]]
        return QCSummary(f"the upload-time QC gate's records ({gate.source or 'the QC gate store'})",
                         table[list(COLUMNS)], from_gate=True, **frames)
    if "qc_status" in manifest:
        status = manifest["qc_status"].astype(str).str.lower()
        frame = pd.DataFrame({"site": manifest[mf.SITE].astype(str), "status": status,
                              "deviations": pd.to_numeric(manifest.get("qc_deviations", 0), errors="coerce")})
        rows = []
        for site, part in frame.groupby("site", sort=True):
            rows.append({"site": site, "series": len(part), "passed": int((part.status == "pass").sum()),
                         "warned": int((part.status == "warn").sum()), "failed": int((part.status == "fail").sum()),
                         "undetermined": int((part.status == "undetermined").sum()), "unmatched": 0,
                         "open_deviations": int(part.deviations.fillna(0).sum()), "drift_events": None,
                         "rescans": None, "rescan_rate": None, "median_minutes_to_rescan": None,
                         "rejected_files": None, "revalidation": None})
        return QCSummary("the qc_status and qc_deviations columns of the data manifest (written by "
                         "sitebench qc manifest); drift and re-scans are in the gate's own records",
                         pd.DataFrame(rows, columns=list(COLUMNS)))
    return QCSummary("none: no upload-time QC records cover these scans (the manifest has no qc_status column "
                     "and the spec names no report.qc_store)", pd.DataFrame(columns=list(COLUMNS)))
