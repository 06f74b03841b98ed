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

Every instance counts, not only the first: the acquisition parameters intake kept per file
(``file_summary``'s ``acq``) are compared across the series, so one instance acquired
differently is a deviation naming its InstanceNumber. A file with damaged geometry leaves
the geometry checks undetermined. :meth:`Gate.check_received` raises nothing but
SitebenchError, whatever the summaries hold.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from sitebench.errors import SitebenchError
from sitebench.provenance import jsonable, utc_now
from sitebench.qc.dicom_files import FileCheck, check_file, volume_from_summaries
from sitebench.qc.dicom_params import (
    SeriesParameters,
    Spread,
    instance_label,
    instance_spread,
    is_multi_echo,
    series_from_summaries,
    tag_label,
)
from sitebench.qc.drift import DriftEvent, DriftMonitor, SiteHistory
from sitebench.qc.protocol import (
    Deviation,
    ExactRule,
    Protocol,
    check_series,
    check_values,
    format_value,
    match_protocol,
    overall_status,
)

__all__ = ["Gate", "SeriesOutcome", "Completeness", "series_completeness", "uid_key", "Pseudonyms", "OUTCOME_STATUSES"]

OUTCOME_STATUSES = ("pass", "warn", "fail", "undetermined", "unmatched")
UID_KEY_CHARS = 20


def uid_key(uid: str) -> str:
    """The unkeyed pseudonym of a DICOM UID (SHA-256): for stores made before keyed pseudonyms and
    for offline tools. Whoever holds a UID can confirm it; the gate uses :class:`Pseudonyms`."""
    return hashlib.sha256(str(uid).encode()).hexdigest()[:UID_KEY_CHARS]


class Pseudonyms:
    """Keyed pseudonyms of UIDs and scanners: HMAC-SHA256 (RFC 2104) with the trial's secret.

    A plain hash of a UID can be confirmed by anyone who holds the UID (a site, a PACS, a
    re-identification attempt); an HMAC cannot without the key (the keyed-hash pseudonymisation
    of ENISA's "Pseudonymisation techniques and best practices", 2019, 5.2.2). The HMAC is taken
    of the unkeyed pseudonym, so a store keyed the old way can be re-keyed from its own records,
    without the UIDs. ``key=None``: the unkeyed scheme, for stores made before this existed."""

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key

    def __call__(self, uid: str) -> str:
        legacy = uid_key(uid)
        return legacy if self.key is None else self.rekey(legacy)

    def rekey(self, legacy: str) -> str:
        return hmac.new(self.key or b"", legacy.encode(), hashlib.sha256).hexdigest()[:UID_KEY_CHARS]

    def scanner(self, scanner_id: str | None) -> str | None:
        """The keyed form of ``dicom_params``' unkeyed ``scanner-<sha256>`` label."""
        if not scanner_id or self.key is None:
            return scanner_id
        return "scanner-" + hmac.new(self.key, scanner_id.encode(), hashlib.sha256).hexdigest()[:12]


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
    subject_key: str = ""  # keyed pseudonym of ClinicalTrialSubjectID, for the visit schedule
    timepoint: str = ""  # ClinicalTrialTimePointID: the visit

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
                 require_locked: bool = True, match: bool = True, baseline: dict | None = None,
                 pseudonyms: Pseudonyms | None = None) -> None:
        unlocked = [f"{p.name} v{p.version}" for p in protocols if not p.locked]
        if require_locked and unlocked:
            raise SitebenchError(f"the gate only checks against locked protocols; not locked: {', '.join(unlocked)}")
        if not match and len(protocols) != 1:
            raise SitebenchError("checking without match rules needs exactly one protocol")
        self.protocols = list(protocols)
        self.pseudonyms = pseudonyms or Pseudonyms()
        self.match = match
        self.compute_image_quality = image_quality
        self.outlier_z = float(outlier_z)
        self.drift = DriftMonitor(drift_state)
        self.history = SiteHistory(history_state)
        #: parameters of a reference series qualified outside the gate (``qc check --baseline``): the
        #: baseline drift compares every series with, instead of the first passing one
        self.baseline = dict(baseline) if baseline is not None else None

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
                                 f"{len(files)} file(s): "
                                 f"{(checks[files[0]].problems or ['no problem recorded'])[0] if files else 'none'}")
        outcomes = []
        for members in groups.values():
            outcomes += self.check_received(members, [checks[f] for f in members], site)
        return outcomes

    def check_received(self, files: Sequence[str | Path], checks: Sequence[FileCheck], site: str) -> list[SeriesOutcome]:
        """One series whose files intake already parsed on receipt (``checks[i].summary``).

        Only one file's header is read again (the first without problems), so the verdict after
        the series completes costs one header read rather than one per file. Raises only
        SitebenchError: an unexpected error becomes one with a one-line reason, so the caller
        can quarantine the series instead of failing on it at every pass.
        """
        try:
            return self._check_received(files, checks, site)
        except SitebenchError:
            raise
        except RecursionError:
            raise SitebenchError("series could not be checked: RecursionError (nesting too deep)") from None
        except Exception as exc:  # noqa: BLE001 - one series' bad content must not stop the gate
            frames = traceback.extract_tb(exc.__traceback__)
            where = f" in {frames[-1].name}" if frames else ""
            raise SitebenchError(f"series could not be checked: {type(exc).__name__}{where}") from None

    def _check_received(self, files: Sequence[str | Path], checks: Sequence[FileCheck],
                        site: str) -> list[SeriesOutcome]:
        usable = [(Path(f), c) for f, c in zip(files, checks) if isinstance(c.summary, dict)]
        if not usable:
            raise SitebenchError(f"none of the series' {len(files)} file(s) has a readable header")
        clean = next((k for k, (_, c) in enumerate(usable) if not c.problems), 0)
        usable.insert(0, usable.pop(clean))  # the header read again: a file without problems
        series = series_from_summaries([f for f, _ in usable], [c.summary for _, c in usable])
        problems = sorted({p for c in checks for p in c.problems})
        return [self._check_series(series, site, problems)]

    def expected_instances(self, summaries: Sequence[dict | None]) -> int | None:
        """How many instances the series' protocol expects, if its NumberOfSlices rule is exact.

        The protocol is matched from the first summary's per-instance parameters (no file is
        read); the count is NumberOfSlices times the echoes seen (EchoNumbers), a lower bound
        for a series with several volumes. None when no protocol matches (or several do), the
        rule is not ``exact``, or the series is multi-frame (slices are frames there, not files).
        """
        usable = [s for s in summaries if isinstance(s, dict) and isinstance(s.get("acq"), dict)]
        if not usable or any(len(s.get("frames") or []) > 1 for s in usable):
            return None
        params = dict(usable[0]["acq"])
        try:
            protocol = match_protocol(params, self.protocols) if self.match else self.protocols[0]
        except SitebenchError:
            return None
        if protocol is None:
            return None
        rule = protocol.rules_for(params)[0].get("NumberOfSlices")
        if not isinstance(rule, ExactRule) or not isinstance(rule.value, int) or isinstance(rule.value, bool) \
                or rule.value <= 0:
            return None
        echoes = {(s.get("instance") or {}).get("EchoNumbers") for s in usable} - {None}
        return rule.value * max(1, len(echoes))

    # ------------------------------------------------------------------ one series
    def _check_series(self, series: SeriesParameters, site: str, file_problems: list[str]) -> SeriesOutcome:
        started = time.perf_counter()
        params = series.parameters
        outcome = SeriesOutcome(series_key=self.pseudonyms(series.series_uid), site=site, status="unmatched",
                                n_files=len(series.files), study_key=self.pseudonyms(series.study_uid) if series.study_uid
                                else "", scanner=self.pseudonyms.scanner(series.scanner_id) or _scanner_label(params),
                                parameters=dict(params), phi_present=list(series.phi_present),
                                file_problems=file_problems,
                                subject_key=self.pseudonyms(series.trial_subject) if series.trial_subject else "",
                                timepoint=series.trial_timepoint)
        protocol = match_protocol(params, self.protocols) if self.match else self.protocols[0]
        if protocol is None:
            outcome.seconds["header"] = time.perf_counter() - started
            return outcome
        verdict = check_series(params, protocol)
        rules, _, undecided = protocol.rules_for(params)
        summaries = [s for s in series.summaries if isinstance(s, dict)]
        checks = _with_instance_checks(list(verdict.checks), summaries, rules, undecided)
        checks = _with_value_findings(checks, summaries, rules)
        checks = _with_geometry(checks, summaries)
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
            drift_params["DeviceSerialNumber"] = self.pseudonyms.scanner(series.scanner_id)  # keys the scanner
        if self.baseline is not None:
            self._qualify_baseline(site, drift_params, protocol.name)
        outcome.drift = self.drift.observe(site, drift_params, outcome.status, outcome.series_key,
                                           when=outcome.checked_utc, series_type=protocol.name)
        outcome.seconds["total"] = time.perf_counter() - started
        return outcome

    def _qualify_baseline(self, site: str, series_params: dict[str, Any], series_type: str) -> None:
        """The reference series becomes its scanner's baseline; one without a scanner identity
        (DeviceSerialNumber / StationName, e.g. a JSON file) stands for the checked series' scanner."""
        reference = dict(self.baseline or {})
        if not (reference.get("DeviceSerialNumber") or reference.get("StationName")):
            for key in ("DeviceSerialNumber", "StationName"):
                if series_params.get(key):
                    reference[key] = series_params[key]
        uid = reference.get("SeriesInstanceUID")
        self.drift.qualify(site, reference, self.pseudonyms(uid) if uid else "baseline", series_type=series_type)

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
        except (ValueError, TypeError, IndexError, KeyError, ArithmeticError) as exc:  # odd geometry or pixels
            why = f"volume could not be built ({type(exc).__name__})"
            outcome.image_quality_notes.append(f"not computed: {why}")
            return _undetermined_iqm(protocol, why)
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


# ------------------------------------------------------------------ completeness
#: A step between neighbouring slice positions this many times the median step is a hole.
GAP_FACTOR = 1.5


@dataclass(frozen=True)
class Completeness:
    """Whether a series has all its instances: True / False on evidence, None when unknown.

    ``expected`` is the instance count the evidence points to (None when it gives none),
    ``received`` the summaries seen, ``why`` one line naming the evidence (no values).
    """

    complete: bool | None
    expected: int | None
    received: int
    why: str


def series_completeness(summaries: Sequence[dict | None]) -> Completeness:
    """Completeness of a series from its files' :func:`~sitebench.qc.dicom_params.file_summary` alone.

    Evidence, strongest first:

    1. NumberOfSeriesRelatedInstances (0020,1209; a PS3.4 C.3.4 query/retrieve attribute some
       senders copy into the files): fewer received is incomplete; as many is complete.
    2. A hole in the slice stack: single-frame instances with one orientation, their positions
       projected on the slice normal; a step between neighbouring positions over
       :data:`GAP_FACTOR` times the median step means slices are missing (incomplete).
    3. ImagesInAcquisition (0020,1002, PS3.3 C.7.6.1), when all instances carry one value and one
       AcquisitionNumber: fewer received is incomplete, as many is complete. (GE writes the
       images per volume here, so more received than it says is no evidence either way.)

    Gaps in InstanceNumber (C.7.6.1) are never evidence alone: scanners and PACS renumber,
    drop localisers or start at other numbers, so legitimate series have them. They are only
    named, as support, in ``why``. No evidence either way is ``complete=None``.
    """
    summaries = [s for s in summaries if isinstance(s, dict)]
    received = len(summaries)
    if not summaries:
        return Completeness(None, None, 0, "no readable instance")
    fields = [s.get("instance") or {} for s in summaries]
    numbers = sorted({f.get("InstanceNumber") for f in fields} - {None})
    absent = _number_gaps(numbers)
    support = f"; InstanceNumbers {_ranges(absent)} are absent too" if absent else ""
    incomplete: list[tuple[int | None, str]] = []
    complete: list[tuple[int, str]] = []

    declared = {f.get("NumberOfSeriesRelatedInstances") for f in fields} - {None}
    if declared:
        expected = max(declared)
        if received < expected:
            incomplete.append((expected, f"{received} of {expected} instances received "
                                         "(NumberOfSeriesRelatedInstances)"))
        else:
            complete.append((expected, f"all {expected} instances received (NumberOfSeriesRelatedInstances)"))

    hole = _slice_hole(summaries)
    if hole is not None:
        missing_positions, per_position = hole
        expected = received + missing_positions * per_position
        incomplete.append((expected, f"{missing_positions} slice position(s) missing from the slice stack "
                                     f"(a step over {GAP_FACTOR:g}x the median)"))

    in_acquisition = {f.get("ImagesInAcquisition") for f in fields}
    acquisitions = {f.get("AcquisitionNumber") for f in fields} - {None}
    if len(in_acquisition) == 1 and None not in in_acquisition and len(acquisitions) <= 1:
        (expected,) = in_acquisition
        if expected and received < expected:
            incomplete.append((expected, f"{received} of {expected} images received (ImagesInAcquisition)"))
        elif expected == received:
            complete.append((expected, f"all {expected} images received (ImagesInAcquisition)"))

    if incomplete:
        expected = max((e for e, _ in incomplete if e is not None), default=None)
        return Completeness(False, expected, received, "; ".join(w for _, w in incomplete) + support)
    if complete:
        return Completeness(True, complete[0][0], received, complete[0][1])
    why = "no evidence of the series' size"
    if absent:
        why += f" (InstanceNumbers {_ranges(absent)} absent, not evidence alone)"
    return Completeness(None, None, received, why)


def _slice_hole(summaries: list[dict]) -> tuple[int, int] | None:
    """(slice positions missing, instances per position) when the slice stack has a hole, else None."""
    import math

    frames = [s.get("frames") or [] for s in summaries]
    if any(len(f) != 1 for f in frames):
        return None  # multi-frame or frame-less: no per-instance slice stack
    placed = [(f[0][1], f[0][2]) for f in frames]
    if any(ipp is None or ori is None or len(ipp) != 3 or len(ori) != 6 for ipp, ori in placed):
        return None
    first = placed[0][1]
    if any(max(abs(a - b) for a, b in zip(ori, first)) > 1e-3 for _, ori in placed):
        return None  # several orientations (localiser-like): no single stack
    r, c = first[:3], first[3:]
    normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    proj = sorted({round(sum(a * b for a, b in zip(ipp, normal)), 2) for ipp, _ in placed})
    if len(proj) < 4:
        return None
    steps = [b - a for a, b in zip(proj, proj[1:])]
    median = sorted(steps)[len(steps) // 2]
    if not median > 0:
        return None
    missing = sum(max(1, round(step / median) - 1) for step in steps if step > GAP_FACTOR * median)
    if not missing:
        return None
    per_position = max(1, round(len(summaries) / len(proj)))
    return (missing, per_position) if math.isfinite(median) else None


def _number_gaps(numbers: list[int]) -> list[int]:
    """InstanceNumbers missing from a run that starts at 1 (none when the run starts elsewhere)."""
    if not numbers or numbers[0] != 1 or numbers[-1] > 10 * len(numbers) + 10:
        return []
    have = set(numbers)
    return [n for n in range(1, numbers[-1] + 1) if n not in have]


def _ranges(labels: Sequence[int | str], limit: int = 10) -> str:
    """57, 58, 59, 70 -> "57-59, 70"; at most ``limit`` entries, then "and N more"."""
    ints = sorted({x for x in labels if isinstance(x, int)})
    parts: list[str] = []
    for n in ints:
        if parts and isinstance(parts[-1], list) and parts[-1][1] == n - 1:
            parts[-1][1] = n
        else:
            parts.append([n, n])  # type: ignore[arg-type]
    text = [f"{a}" if a == b else f"{a}-{b}" for a, b in parts]  # type: ignore[misc]
    text += [str(x) for x in labels if not isinstance(x, int)]
    if len(text) > limit:
        text = text[:limit] + [f"and {len(text) - limit} more"]
    return ", ".join(text)


def _instances(labels: Sequence[int | str]) -> str:
    return ("instance " if len(labels) == 1 else "instances ") + _ranges(labels)


# ------------------------------------------------------------------ per-instance checks
#: Damaged geometry attribute -> the checks it leaves undetermined.
_GEOMETRY_AFFECTS = {
    "ImagePositionPatient": {"NumberOfSlices", "SliceCoverageMM", "SliceGapMM", "MaxSliceStepMM"},
    "ImageOrientationPatient": {"NumberOfSlices", "SliceCoverageMM", "SliceGapMM", "MaxSliceStepMM",
                                "ImageOrientationPatientDICOM"},
    "PixelSpacing": {"PixelSpacing"},
    "SliceThickness": {"SliceThickness", "SliceCoverageMM", "SliceGapMM"},
}


def _describe(spread: Spread) -> str:
    """"30 in instance 57 (195 other instances: 11)": the minorities, then the largest group."""
    value, majority = spread.groups[0]
    parts = [f"{format_value(v)} in {_instances(labels)}" for v, labels in spread.groups[1:]]
    if spread.unreadable:
        parts.append(f"not a number in {_instances(spread.unreadable)}")
    if spread.missing:
        parts.append(f"missing in {_instances(spread.missing)}")
    others = f"{len(majority)} other instance{'s' if len(majority) != 1 else ''}"
    return "; ".join(parts) + f" ({others}: {format_value(value)})"


def _instance_check(spread: Spread, rule: Any, multi_echo: bool) -> Deviation:
    """One deviation for a parameter that is not one value over the series' instances."""
    observed = _describe(spread)
    within = f" ({spread.within})" if spread.within else ""
    if rule is None or not hasattr(rule, "holds"):  # unconstrained or record-only
        return Deviation(spread.key, "one value across the series", observed, "consistency", "warn", "warn",
                         f"inconsistent within series{within}")
    if multi_echo and spread.key == "EchoTime":  # each echo's time must be one value
        return Deviation(spread.key, rule.describe(), observed, rule.kind, rule.severity, rule.severity,
                         f"inconsistent within series{within}")
    failing = [labels for value, labels in spread.groups if not rule.holds(value)]
    if failing:
        status, note = rule.severity, "inconsistent within series; outside the rule in " + _instances(
            [x for labels in failing for x in labels])
    elif spread.unreadable or spread.missing:
        status, note = "undetermined", "not readable in every instance: " + "; ".join(
            ([f"not a number in {_instances(spread.unreadable)}"] if spread.unreadable else [])
            + ([f"missing in {_instances(spread.missing)}"] if spread.missing else []))
    else:
        status, note = "warn", "inconsistent within series (every value within the rule)"
    return Deviation(spread.key, rule.describe(), observed, rule.kind, rule.severity, status, note + within)


def _with_instance_checks(checks: list[Deviation], summaries: list[dict], rules: dict[str, Any],
                          undecided: dict[str, str]) -> list[Deviation]:
    """Series-level checks (first file's values) replaced, per parameter, by one over every instance.

    A protocol-checked parameter that differs in some instance gets the rule's severity if any
    value breaks the rule, undetermined if some instance's value is missing or unreadable, warn
    if every value is within the rule; one the protocol does not check is a warn when instances
    hold different values (merely missing in some is left to the file and value findings).
    """
    echo_rule = rules.get("EchoTime")
    multi_echo = is_multi_echo(summaries) or isinstance(getattr(echo_rule, "value", None), list)
    spreads = instance_spread(summaries, multi_echo=multi_echo)
    replaced: set[str] = set()
    extra: list[Deviation] = []
    for spread in spreads:
        if spread.key in undecided:
            continue  # the rule itself cannot be placed: stays undetermined
        rule = rules.get(spread.key)
        checked = rule is not None and hasattr(rule, "holds")
        if not checked and len(spread.groups) == 1:
            continue  # an unchecked attribute merely absent in some files (their integrity says so), or
            # unreadable (a ValueIntegrity warning says so): not a second finding
        extra.append(_instance_check(spread, rule, multi_echo))
        if checked:
            replaced.add(spread.key)
    return [c for c in checks if c.parameter not in replaced] + extra


def _with_value_findings(checks: list[Deviation], summaries: list[dict], rules: dict[str, Any]) -> list[Deviation]:
    """Malformed DS/IS values (file_summary ``invalid``): a protocol check of that parameter that is
    undetermined says so; any other attribute is one warn naming it and the instances."""
    bad: dict[str, list] = {}
    for index, summary in enumerate(summaries):
        for keyword in summary.get("invalid") or ():
            bad.setdefault(keyword, []).append(instance_label(summary, index))
    if not bad:
        return checks
    keyword_of = {"PercentPhaseFOV": "PercentPhaseFieldOfView", "ManufacturersModelName": "ManufacturerModelName"}
    checked = {keyword_of.get(k, k): k for k, r in rules.items() if hasattr(r, "holds")}
    out = []
    for check in checks:
        keyword = keyword_of.get(check.parameter, check.parameter)
        if keyword in bad and check.status == "undetermined" and not check.note.startswith("not readable"):
            check = replace(check, note=f"{tag_label(keyword)} is not a number in {_instances(bad[keyword])}")
        out.append(check)
    for keyword, labels in bad.items():
        if keyword not in checked:
            out.append(Deviation("ValueIntegrity", "every DS/IS value a number",
                                 f"{tag_label(keyword)} in {_instances(labels)}", "integrity", "warn", "warn",
                                 "treated as missing"))
    return out


def _with_geometry(checks: list[Deviation], summaries: list[dict]) -> list[Deviation]:
    """Damaged geometry in any file: the geometry checks it feeds are undetermined, naming the instances."""
    damaged: dict[str, list] = {}
    for index, summary in enumerate(summaries):
        for line in summary.get("geometry") or ():
            damaged.setdefault(line.split(" ", 1)[0], []).append(instance_label(summary, index))
    if not damaged:
        return checks
    where = "; ".join(f"damaged {attr} in {_instances(labels)}" for attr, labels in damaged.items())
    out = []
    for check in checks:
        hit = [attr for attr in damaged if check.parameter in _GEOMETRY_AFFECTS.get(attr, ())]
        if hit:
            check = replace(check, status="undetermined", note="; ".join(
                f"damaged {attr} in {_instances(damaged[attr])}" for attr in hit))
        out.append(check)
    out.append(Deviation("Geometry", "every file placeable in the volume (PS3.3 C.7.6.2)", where, "geometry",
                         "fail", "undetermined", "re-send the damaged files"))
    return out


def _undetermined_iqm(protocol: Protocol, why: str) -> list[Deviation]:
    return [Deviation(f"iqm.{key}", rule.describe(), None, rule.kind, rule.severity, "undetermined", why)
            for key, rule in protocol.image_quality.items() if hasattr(rule, "holds")]


def _scanner_label(params: dict[str, Any]) -> str:
    return f"{params.get('Manufacturer') or 'unknown'}|{params.get('ManufacturersModelName') or 'unknown'}"

