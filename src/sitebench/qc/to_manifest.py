"""Checked series into the scan manifest the benchmarks read: one NIfTI and one row per series.

Only series whose latest verdict is in ``statuses`` (default pass and warn) enter; each
row carries its QC verdict (``qc_status``, ``qc_protocol``, ``qc_protocol_version``,
``qc_deviations``) and image-quality metrics (``qc_<metric>``), so a benchmark can
stratify or filter by them, and ``software_upgraded`` from the gate's software drift events. Identifiers stay pseudonyms: ``scan_id`` is the series key,
``subject_id`` the study key (join clinical covariates on it), ``acquisition_date`` the
day the gate checked the series (the scan date is a PS3.15 attribute and is never read).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pandas as pd

from sitebench.datasets import manifest as mf
from sitebench.errors import SitebenchError
from sitebench.provenance import sha256_file
from sitebench.qc.dicom_files import series_nifti
from sitebench.qc.dicom_params import vendor_group
from sitebench.qc.records import QCRecords

__all__ = ["upgraded_by_drift", "verdicts_to_manifest"]


def verdicts_to_manifest(records: QCRecords, store: str | Path, out: str | Path,
                         statuses: Sequence[str] = ("pass", "warn")) -> mf.Manifest:
    """Write ``out`` (CSV/TSV/Parquet) with a NIfTI per series under ``<out folder>/images``."""
    out = Path(out)
    images = out.parent / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for verdict in records.latest_verdicts():
        if verdict["status"] not in statuses or verdict["protocol"] is None:
            continue
        files = [Path(store) / rel for rel, _, _ in records.series_files(verdict["series_key"])]
        image_path = images / f"{verdict['series_key']}.nii.gz"
        if not image_path.exists():
            series_nifti(files).to_filename(str(image_path))
        row = {
            mf.SCAN_ID: verdict["series_key"], mf.SUBJECT_ID: verdict["study_key"] or verdict["series_key"],
            mf.SESSION: "1", mf.SITE: verdict["site"], mf.SCANNER_ID: verdict["scanner"],
            mf.VENDOR: vendor_group(verdict["manufacturer"]) or "unknown", mf.SCANNER_MODEL: verdict["model"] or "unknown",
            mf.SOFTWARE_VERSION: verdict["software_version"] or "unknown",
            mf.FIELD_STRENGTH: verdict["field_strength"], mf.ACQUISITION_DATE: verdict["checked_utc"][:10],
            mf.IMAGE_PATH: str(image_path.relative_to(out.parent)), mf.IMAGE_SHA256: sha256_file(image_path),
            "qc_status": verdict["status"], "qc_protocol": verdict["protocol"],
            "qc_protocol_version": verdict["protocol_version"],
            "qc_deviations": len(records.deviations_of(verdict["id"])),
        }
        row.update({f"qc_{k}": v for k, v in verdict["image_quality"].items()})
        rows.append(row)
    if not rows:
        raise SitebenchError(f"no checked series with status {' or '.join(statuses)} to put in a manifest")
    table = pd.DataFrame(rows)
    table[mf.SOFTWARE_UPGRADED] = upgraded_by_drift(table, records.drift_events())
    mf.write_manifest(table, out)
    return mf.read_manifest(out)


def upgraded_by_drift(table: pd.DataFrame, drift_events: list[dict]) -> list[int]:
    """``software_upgraded`` keyed by the gate's own software drift events: 1 for a series on a scanner
    the gate saw change software, running other software than the event's baseline; else 0.

    The upgrade analysis then compares before and after exactly where the gate raised the event,
    rather than re-deriving upgrades from the manifest's software versions.
    """
    flag = pd.Series(0, index=table.index)
    for event in drift_events:
        if event.get("kind") != "software" or event.get("parameter") != "SoftwareVersions":
            continue
        key = str(event.get("scanner") or "")
        scanner = key.split("|")[1] if key.count("|") >= 1 else key  # Manufacturer|pseudonym[|protocol]
        baseline = event.get("baseline")
        try:
            baseline = json.loads(baseline) if isinstance(baseline, str) else baseline
        except ValueError:
            pass
        if isinstance(baseline, list):
            baseline = "\\".join(map(str, baseline))
        on = (table[mf.SCANNER_ID].astype(str) == scanner) & (table[mf.SITE].astype(str) == str(event["site"]))
        flag[on & (table[mf.SOFTWARE_VERSION].astype(str) != str(baseline))] = 1
    return flag.astype(int).tolist()
