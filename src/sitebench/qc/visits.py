"""Expected against received: each site's visit schedule reconciled with the series that arrived.

The schedule is the sponsor's CSV, one row per expected visit: ``site, subject, visit,
window_start, window_end`` (ISO dates, the window inclusive). A series belongs to a visit through
the DICOM Clinical Trial Subject module (PS3.3 C.7.1.3): ClinicalTrialSubjectID (0012,0040) and
ClinicalTrialTimePointID (0012,0050), which trial imaging sites are asked to fill. The gate keeps
only a keyed pseudonym of the subject code (:class:`sitebench.qc.gate.Pseudonyms`); the schedule's
codes are pseudonymised the same way to be matched, so no subject code is stored by the gate.

A visit is *received* when a series of it has a verdict (*late* when the first arrived after the
window), *overdue* when its window has closed with nothing received, *due* while its window is
open, *upcoming* before it.
"""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sitebench.errors import SitebenchError

__all__ = ["Visit", "load_schedule", "reconcile", "VISIT_STATUSES"]

VISIT_STATUSES = ("received", "late", "overdue", "due", "upcoming")
COLUMNS = ("site", "subject", "visit", "window_start", "window_end")


@dataclass(frozen=True)
class Visit:
    site: str
    subject: str
    visit: str
    window_start: dt.date
    window_end: dt.date


def load_schedule(path: str | Path) -> list[Visit]:
    """The visit schedule CSV; a missing column, a bad date or a window that ends before it starts
    is one line naming the file and the row."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise SitebenchError(f"visit schedule lacks the column(s) {', '.join(missing)} "
                                     f"(needs {', '.join(COLUMNS)})", path)
            visits = []
            for n, row in enumerate(reader, start=2):
                try:
                    start = dt.date.fromisoformat(row["window_start"].strip())
                    end = dt.date.fromisoformat(row["window_end"].strip())
                except ValueError:
                    raise SitebenchError(f"row {n}: window dates must be YYYY-MM-DD", path) from None
                if end < start:
                    raise SitebenchError(f"row {n}: window_end is before window_start", path)
                if not row["subject"].strip() or not row["visit"].strip() or not row["site"].strip():
                    raise SitebenchError(f"row {n}: site, subject and visit must not be empty", path)
                visits.append(Visit(row["site"].strip(), row["subject"].strip(), row["visit"].strip(), start, end))
    except OSError as exc:
        raise SitebenchError(f"cannot read the visit schedule ({exc.strerror or exc})", path) from None
    return visits


def reconcile(schedule: list[Visit], verdicts: list[dict[str, Any]], pseudonym: Callable[[str], str],
              today: dt.date | None = None) -> list[dict[str, Any]]:
    """One row per expected visit: its status and the series received for it (pseudonyms only)."""
    today = today or dt.datetime.now(dt.timezone.utc).date()
    received: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for v in verdicts:
        if v.get("subject_key") and v.get("timepoint"):
            received.setdefault((v["site"], v["subject_key"], v["timepoint"]), []).append(v)
    out = []
    for visit in schedule:
        series = sorted(received.get((visit.site, pseudonym(visit.subject), visit.visit), []),
                        key=lambda r: r["checked_utc"])
        if series:
            first = dt.datetime.fromisoformat(series[0]["checked_utc"]).date()
            status = "late" if first > visit.window_end else "received"
        elif today > visit.window_end:
            status = "overdue"
        elif today >= visit.window_start:
            status = "due"
        else:
            status = "upcoming"
        out.append({"site": visit.site, "subject": visit.subject, "visit": visit.visit,
                    "window_start": visit.window_start.isoformat(), "window_end": visit.window_end.isoformat(),
                    "status": status, "series": [{"series_key": s["series_key"], "verdict": s["status"]} for s in series],
                    "days_overdue": (today - visit.window_end).days if status == "overdue" else 0})
    return out
