"""The upload-time QC gate's summary per site, for the report's data-provenance section.

Two sources, in order: the gate's own records (``sitebench qc serve`` store, via
``QCRecords.site_status``), or the ``qc_status`` / ``qc_deviations`` columns that
``sitebench qc manifest`` writes into the data manifest. A trial with neither gets an
explicit statement, never an empty table that reads like "no problems".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from sitebench.datasets import manifest as mf
from sitebench.errors import SitebenchError

COLUMNS = ("site", "series", "passed", "warned", "failed", "undetermined", "unmatched", "open_deviations",
           "drift_events", "rescan_rate", "rejected_files")


@dataclass
class QCSummary:
    source: str
    table: pd.DataFrame

    @property
    def available(self) -> bool:
        return not self.table.empty


def qc_summary(manifest: pd.DataFrame, qc_store: str | None = None) -> QCSummary:
    """Per-site verdict counts, deviations, re-scan rate and drift events, from the best source at hand."""
    if qc_store:
        from sitebench.qc.records import QCRecords, database_url

        if "://" not in qc_store and not (Path(qc_store) / "qc.db").exists():
            raise SitebenchError("report.qc_store: no QC gate store here (expected qc.db)", qc_store)
        url = qc_store if "://" in qc_store else database_url(Path(qc_store))
        rows = [{**asdict(r), "rescan_rate": r.rescan_rate} for r in QCRecords(url).site_status()]
        where = qc_store if "://" not in qc_store else qc_store.split("://", 1)[0] + " database"
        return QCSummary(f"the upload-time QC gate's records ({where})",
                         pd.DataFrame(rows, columns=list(COLUMNS)))
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
