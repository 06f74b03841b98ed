"""The QC gate: one series in, one verdict out (protocol, coverage, image quality, drift, PHI).

:class:`Gate` is pure decision logic over files on disk; it keeps the drift baselines and
the per-site image-quality history in memory (their ``state`` is JSON, so a caller can
persist them). Recording outcomes (database, audit trail) is :mod:`sitebench.qc.records`'
job, and getting files in is :mod:`sitebench.qc.intake`'s.

Outcome status is the protocol verdict's (pass / warn / fail / undetermined), after
image-quality thresholds and file-integrity problems are folded in, or ``unmatched``
when no locked protocol's match rules select the series.

Identifiers: series and studies are keyed by a SHA-256 pseudonym of their UID
(:func:`uid_key`), scanners by a pseudonym of their serial number. The names (never the
values) of PS3.15 identifying attributes present in a series are reported as a finding.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sitebench.errors import SitebenchError
from sitebench.provenance import jsonable, utc_now
from sitebench.qc.dicom_files import FileCheck, check_file, volume_from_summaries
from sitebench.qc.dicom_params import SeriesParameters, series_from_summaries
from sitebench.qc.drift import DriftEvent, DriftMonitor, SiteHistory
from sitebench.qc.protocol import Deviation, Protocol, check_series, check_values, match_protocol, overall_status

__all__ = ["Gate", "SeriesOutcome", "uid_key", "OUTCOME_STATUSES"]

OUTCOME_STATUSES = ("pass", "warn", "fail", "undetermined", "unmatched")
UID_KEY_CHARS = 20


def uid_key(uid: str) -> str:
    """A stable pseudonym of a DICOM UID: UIDs are PS3.15 attributes and never leave the gate."""
    return hashlib.sha256(str(uid).encode()).hexdigest()[:UID_KEY_CHARS]


@dataclass
class SeriesOutcome:
    """Everything the gate decided about one series (no identifier values)."""

    series_key: str
    site: str
    status: str
    n_files: int
    study_key: str = ""
    scanner: str = ""
    protocol: str | None = None
    protocol_version: int | None = None
    protocol_sha256: str | None = None
    deviations: list[Deviation] = field(default_factory=list)
    checks: list[Deviation] = field(default_factory=list)
    recorded: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    image_quality: dict[str, Any] = field(default_factory=dict)
    image_quality_notes: list[str] = field(default_factory=list)
    drift: list[DriftEvent] = field(default_factory=list)
    phi_present: list[str] = field(default_factory=list)
    file_problems: list[str] = field(default_factory=list)
    checked_utc: str = field(default_factory=utc_now)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return jsonable({
            "series_key": self.series_key, "site": self.site, "status": self.status, "n_files": self.n_files,
            "study_key": self.study_key, "scanner": self.scanner, "protocol": self.protocol,
            "protocol_version": self.protocol_version, "protocol_sha256": self.protocol_sha256,
            "deviations": [d.to_dict() for d in self.deviations],
            "n_checks": len(self.checks), "recorded": self.recorded,
            "image_quality": self.image_quality, "image_quality_notes": self.image_quality_notes,
            "drift": [e.to_dict() for e in self.drift], "phi_attributes_present": self.phi_present,
            "file_problems": self.file_problems, "checked_utc": self.checked_utc, "seconds": self.seconds,
        })

    def summary(self) -> str:
        where = f"protocol {self.protocol} v{self.protocol_version}" if self.protocol else "no protocol matched"
        head = f"{self.status.upper()} {self.site} series {self.series_key} ({self.n_files} files): {where}"
        lines = [head] + [f"  {d.line()}" for d in self.deviations]
        lines += [f"  DRIFT[{e.kind}] {e.parameter} {e.change}: {e.baseline!r} -> {e.observed!r}" for e in self.drift]
        if self.phi_present:
            lines.append(f"  FINDING identifying attributes present (values not read): {', '.join(self.phi_present)}")
        return "\n".join(lines)


class Gate:
    """Checks series against a set of locked protocols; remembers baselines and IQM history."""

    def __init__(self, protocols: Sequence[Protocol], *, image_quality: bool = True, outlier_z: float = 3.5,
                 drift_state: dict | None = None, history_state: dict | None = None,
                 require_locked: bool = True, match: bool = True) -> None:
        unlocked = [f"{p.name} v{p.version}" for p in protocols if not p.locked]
        if require_locked and unlocked:
            raise SitebenchError(f"the gate only checks against locked protocols; not locked: {', '.join(unlocked)}")
        if not match and len(protocols) != 1:
            raise SitebenchError("checking without match rules needs exactly one protocol")
        self.protocols = list(protocols)
        self.match = match
        self.compute_image_quality = image_quality
        self.outlier_z = float(outlier_z)
        self.drift = DriftMonitor(drift_state)
        self.history = SiteHistory(history_state)

    def check_files(self, files: Sequence[str | Path], site: str,
                    file_checks: dict[Path, FileCheck] | None = None) -> list[SeriesOutcome]:
        """Check every series among ``files`` (one outcome per SeriesInstanceUID, in arrival order).

        Every file is parsed once (:func:`check_file`: integrity, geometry, PHI names, pixel
        offsets); ``file_checks`` passes checks already run.
        """
        files = [Path(f) for f in files]
        checks = dict(file_checks or {})
        for f in files:
            if f not in checks:
                checks[f] = check_file(f)
        groups: dict[str, list[Path]] = {}
        for f in files:
            if checks[f].groupable and checks[f].summary is not None:
                groups.setdefault(checks[f].series_uid, []).append(f)
        if not groups:
            raise SitebenchError("no DICOM file with a SeriesInstanceUID among "
                                 f"{len(files)} file(s): {checks[files[0]].problems[0] if files else 'none'}")
        outcomes = []
        for members in groups.values():
            outcomes += self.check_received(members, [checks[f] for f in members], site)
        return outcomes

    def check_received(self, files: Sequence[str | Path], checks: Sequence[FileCheck], site: str) -> list[SeriesOutcome]:
        """One series whose files intake already parsed on receipt (``checks[i].summary``).

        Only the first file's header is read again, so the verdict after the series completes
        costs one header read rather than one per file.
        """
        usable = [(Path(f), c) for f, c in zip(files, checks) if c.summary is not None]
        if not usable:
            raise SitebenchError(f"none of the series' {len(files)} file(s) has a readable header")
        series = series_from_summaries([f for f, _ in usable], [c.summary for _, c in usable])
        problems = sorted({p for c in checks for p in c.problems})
        return [self._check_series(series, site, problems)]

    # ------------------------------------------------------------------ one series
    def _check_series(self, series: SeriesParameters, site: str, file_problems: list[str]) -> SeriesOutcome:
        started = time.perf_counter()
        params = series.parameters
        outcome = SeriesOutcome(series_key=uid_key(series.series_uid), site=site, status="unmatched",
                                n_files=len(series.files), study_key=uid_key(series.study_uid) if series.study_uid
                                else "", scanner=series.scanner_id or _scanner_label(params),
                                parameters=dict(params), phi_present=list(series.phi_present),
                                file_problems=file_problems)
        protocol = match_protocol(params, self.protocols) if self.match else self.protocols[0]
        if protocol is None:
            outcome.seconds["header"] = time.perf_counter() - started
            return outcome
        verdict = check_series(params, protocol)
        checks = list(verdict.checks)
        checks += [Deviation("FileIntegrity", "every file complete and readable", problem, "integrity", "fail",
                             "undetermined", "re-send the series") for problem in file_problems]
        outcome.seconds["header"] = time.perf_counter() - started
        if self.compute_image_quality:
            checks += self._image_quality(series, site, protocol, outcome, file_problems)
        outcome.status = overall_status(checks)
        outcome.checks = checks
        outcome.deviations = [c for c in checks if c.status != "pass"]
        outcome.protocol, outcome.protocol_version = protocol.name, protocol.version
        outcome.protocol_sha256 = verdict.content_sha256
        outcome.recorded = verdict.recorded
        drift_params = dict(params)
        if series.scanner_id:
            drift_params["DeviceSerialNumber"] = series.scanner_id  # a pseudonym: keys the physical scanner
        outcome.drift = self.drift.observe(site, drift_params, outcome.status, outcome.series_key,
                                           when=outcome.checked_utc, series_type=protocol.name)
        outcome.seconds["total"] = time.perf_counter() - started
        return outcome

    def _image_quality(self, series: SeriesParameters, site: str, protocol: Protocol,
                       outcome: SeriesOutcome, file_problems: list[str]) -> list[Deviation]:
        from sitebench.qc.image_quality import image_quality

        started = time.perf_counter()
        if file_problems:
            outcome.image_quality_notes.append("not computed: the series has damaged files")
            return _undetermined_iqm(protocol, "series has damaged files")
        try:
            volume, voxel = volume_from_summaries(series.files, series.summaries)
            quality = image_quality(volume, voxel)
        except SitebenchError as exc:
            outcome.image_quality_notes.append(f"not computed: {exc}")
            return _undetermined_iqm(protocol, str(exc))
        outcome.image_quality = {k: v for k, v in quality.metrics.items() if v is not None}
        outcome.image_quality_notes = list(quality.notes)
        checks = check_values(quality.metrics, protocol.image_quality, prefix="iqm.")
        for flag in self.history.flag(f"{site}|{protocol.name}", outcome.image_quality, self.outlier_z):
            checks.append(Deviation(
                f"iqm.{flag['metric']}", f"|robust z| <= {self.outlier_z:g} against this site's "
                f"{flag['n_history']} previous series (median {flag['median']:.4g})",
                round(flag["value"], 6), "site_outlier", "warn", "warn", f"z = {flag['z']:.1f}"))
        outcome.seconds["image_quality"] = time.perf_counter() - started
        return checks


def _undetermined_iqm(protocol: Protocol, why: str) -> list[Deviation]:
    return [Deviation(f"iqm.{key}", rule.describe(), None, rule.kind, rule.severity, "undetermined", why)
            for key, rule in protocol.image_quality.items() if hasattr(rule, "holds")]


def _scanner_label(params: dict[str, Any]) -> str:
    return f"{params.get('Manufacturer') or 'unknown'}|{params.get('ManufacturersModelName') or 'unknown'}"

