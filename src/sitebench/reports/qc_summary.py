"""The upload-time QC gate's summary per site, for the report's data-provenance section.

Two sources, in order: the gate's own per-site rows (``QCRecords.site_status()`` of a
``sitebench qc serve`` store, which the pipeline opens and passes in: reports reads
results, it does not open the gate's database), or the ``qc_status`` / ``qc_deviations``
columns that ``sitebench qc manifest`` writes into the data manifest. A trial with
neither gets an explicit statement, never an empty table that reads like "no problems".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

import pandas as pd

from sitebench.datasets import manifest as mf

COLUMNS = ("site", "series", "passed", "warned", "failed", "undetermined", "unmatched", "open_deviations",
           "drift_events", "rescan_rate", "rejected_files")


@dataclass
class QCSummary:
    source: str
    table: pd.DataFrame

    @property
    def available(self) -> bool:
        return not self.table.empty


def _row(status: Any) -> dict[str, Any]:
    """One gate row (a ``SiteStatus`` or a mapping) as a plain dict, with its derived re-scan rate."""
    row = asdict(status) if is_dataclass(status) and not isinstance(status, type) else dict(status)
    if "rescan_rate" not in row:
        row["rescan_rate"] = getattr(status, "rescan_rate", None)
    return row


def qc_summary(manifest: pd.DataFrame, site_status: Iterable[Any] | None = None,
               gate: str = "the QC gate store") -> QCSummary:
    """Per-site verdict counts, deviations, re-scan rate and drift events, from the best source at hand.

    ``site_status`` are the gate's own per-site rows (``QCRecords.site_status()``) and ``gate``
    says where they came from; without them the manifest's QC columns are used.
    """
    if site_status is not None:
        rows = [_row(r) for r in site_status]
        return QCSummary(f"the upload-time QC gate's records ({gate})", pd.DataFrame(rows, columns=list(COLUMNS)))
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
                         "rescan_rate": None, "rejected_files": None})
        return QCSummary("the qc_status and qc_deviations columns of the data manifest (written by "
                         "sitebench qc manifest); drift and re-scans are in the gate's own records",
                         pd.DataFrame(rows, columns=list(COLUMNS)))
    return QCSummary("none: no upload-time QC records cover these scans (the manifest has no qc_status column "
                     "and the spec names no report.qc_store)", pd.DataFrame(columns=list(COLUMNS)))
