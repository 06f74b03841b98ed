"""Append-only, hash-chained audit trail stored as JSON lines.

Every line is one record: ``seq`` (0, 1, 2, ...), ``when`` (UTC ISO 8601), ``who``,
``what``, ``why``, ``subject``, ``details``, ``prev_sha256`` (the previous record's
``sha256``; :data:`GENESIS_SHA256` for the first) and ``sha256``, the SHA-256 of the
canonical JSON of all the other fields. Editing, removing, reordering, inserting or
truncating records breaks the chain and :meth:`AuditTrail.verify` names the record.

Appends hold an exclusive ``fcntl.flock`` on the file while they read the last record
and write the new line, and are flushed and ``fsync``-ed before returning, so two
processes can append at once and a returned record survives a crash.

Patient identifiers are never written: any key in ``details`` (at any depth) that is a
DICOM PS3.15 Basic Profile identifier attribute name is refused; the error names the
key, never the value.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sitebench.durable import fsync_dir
from sitebench.errors import SitebenchError
from sitebench.provenance import canonical_json, jsonable, sha256_json, utc_now

GENESIS_SHA256 = "0" * 64

FIELDS = ("seq", "when", "who", "what", "why", "subject", "details", "prev_sha256", "sha256")
_HASHED_FIELDS = FIELDS[:-1]
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_TAIL_CHUNK = 1 << 16

# DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile: attributes that
# identify a patient (or lead back to one). Compared case- and separator-insensitively,
# so ``patient_name`` and ``Patient Name`` are refused as well as ``PatientName``.
PHI_KEYS = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientBirthName",
    "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientAddress",
    "PatientMotherBirthName", "PatientTelephoneNumbers", "PatientTelecomInformation",
    "MedicalRecordLocator", "IssuerOfPatientID", "PatientInsurancePlanCodeSequence",
    "MilitaryRank", "BranchOfService", "CountryOfResidence", "RegionOfResidence",
    "EthnicGroup", "Occupation", "PatientReligiousPreference", "AdditionalPatientHistory",
    "PatientComments", "ResponsiblePerson", "PersonName",
    "AccessionNumber", "ReferringPhysicianName", "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers", "ReferringPhysicianIdentificationSequence",
    "PerformingPhysicianName", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy",
    "OperatorsName", "RequestingPhysician", "ScheduledPerformingPhysicianName",
    "InstitutionAddress", "InstitutionalDepartmentName",
})
_PHI_NORMALISED = frozenset(re.sub(r"[^a-z0-9]", "", k.lower()) for k in PHI_KEYS)


def _normalise_key(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(key).lower())


def find_phi_keys(obj: Any, where: str = "details") -> list[str]:
    """Dotted paths of every key in ``obj`` (nested dicts and lists) that names a patient identifier."""
    found: list[str] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            here = f"{where}.{key}"
            if _normalise_key(key) in _PHI_NORMALISED:
                found.append(here)
            found.extend(find_phi_keys(value, here))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found.extend(find_phi_keys(value, f"{where}[{i}]"))
    return found


@dataclass(frozen=True)
class AuditRecord:
    """One decision in the trail."""

    seq: int
    when: str
    who: str
    what: str
    why: str
    subject: str | None
    details: dict[str, Any]
    prev_sha256: str
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS}

    def hashed_part(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _HASHED_FIELDS}

    def expected_sha256(self) -> str:
        return sha256_json(self.hashed_part())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditRecord:
        return cls(**{name: data[name] for name in FIELDS})


@dataclass(frozen=True)
class AuditVerification:
    """Outcome of checking a trail: ``ok`` only when every record and link is intact."""

    path: str
    ok: bool
    n_records: int
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.ok:
            return f"audit trail {self.path}: OK, {self.n_records} records, hash chain intact"
        head = (f"audit trail {self.path}: FAILED, {len(self.problems)} problem(s) "
                f"in {self.n_records} readable records")
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "n_records": self.n_records,
                "problems": list(self.problems)}


class AuditTrail:
    """A JSON-lines audit trail at ``path``; the file is created on the first append."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- writing ---------------------------------------------------------------------------
    def append(self, *, who: str, what: str, why: str = "", subject: str | None = None,
               details: dict | None = None) -> AuditRecord:
        """Record one decision; durable (fsync) and safe against concurrent appenders."""
        who = _required_text(who, "who", self.path)
        what = _required_text(what, "what", self.path)
        if not isinstance(why, str):
            raise SitebenchError(f"audit record 'why' must be text, got {type(why).__name__}", self.path)
        if subject is not None and not isinstance(subject, str):
            raise SitebenchError(f"audit record 'subject' must be text or None, got {type(subject).__name__}",
                                 self.path)
        if details is None:
            details = {}
        if not isinstance(details, dict):
            raise SitebenchError(f"audit record 'details' must be a mapping, got {type(details).__name__}",
                                 self.path)
        phi = find_phi_keys(details)  # before conversion: report the caller's own keys
        if phi:
            raise SitebenchError(
                f"refusing to write patient identifier key(s) to the audit trail: {', '.join(phi)}",
                self.path)
        # Round-trip through JSON so the hashed form is exactly what is read back later.
        details = json.loads(canonical_json(jsonable(details)))

        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        with open(self.path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                last = self._last_record(handle)
                body = {
                    "seq": 0 if last is None else last.seq + 1,
                    "when": utc_now(),
                    "who": who,
                    "what": what,
                    "why": why,
                    "subject": subject,
                    "details": details,
                    "prev_sha256": GENESIS_SHA256 if last is None else last.sha256,
                }
                record = AuditRecord(**body, sha256=sha256_json(body))
                handle.seek(0, os.SEEK_END)
                handle.write(canonical_json(record.to_dict()) + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        if created:
            fsync_dir(self.path.parent)
        return record

    def _last_record(self, handle) -> AuditRecord | None:
        """The last record, read from the file's tail; refuses to extend a damaged tail."""
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size == 0:
            return None
        tail = b""
        pos = size
        while pos > 0:
            step = min(_TAIL_CHUNK, pos)
            pos -= step
            handle.seek(pos)
            tail = handle.read(step) + tail
            if tail.count(b"\n") >= 2 or (pos == 0):
                break
        if not tail.endswith(b"\n"):
            raise SitebenchError(
                "audit trail's last line is truncated (no newline); refusing to append - run verify", self.path)
        line = tail[:-1].rsplit(b"\n", 1)[-1]
        problem, record = _parse_line(line)
        if record is None:
            raise SitebenchError(f"audit trail's last line is damaged ({problem}); refusing to append - run verify",
                                 self.path)
        if record.expected_sha256() != record.sha256:
            raise SitebenchError(
                f"audit trail's last record (seq {record.seq}) fails its hash check; refusing to append - run verify",
                self.path)
        return record

    # -- reading ---------------------------------------------------------------------------
    def records(self) -> list[AuditRecord]:
        """Every record in file order; a line that cannot be read is an error naming the line."""
        if not self.path.exists():
            return []
        out: list[AuditRecord] = []
        for lineno, line in enumerate(self.path.read_bytes().splitlines(), start=1):
            if not line.strip():
                continue
            problem, record = _parse_line(line)
            if record is None:
                raise SitebenchError(f"audit trail line {lineno}: {problem}", self.path)
            out.append(record)
        return out

    def verify(self) -> AuditVerification:
        """Check every record's own hash and every link of the chain."""
        return verify_trail(self.path)


def verify_trail(path: str | Path) -> AuditVerification:
    """Check an audit trail file: self-hashes, ``seq`` order and ``prev_sha256`` links."""
    path = Path(path)
    if not path.exists():
        return AuditVerification(str(path), True, 0, [])
    data = path.read_bytes()
    problems: list[str] = []
    lines = data.split(b"\n")
    truncated = not data.endswith(b"\n") and data != b""
    if not truncated:
        lines = lines[:-1]  # the empty piece after the final newline

    n_records = 0
    expected_seq = 0
    prev_sha = GENESIS_SHA256
    seen: dict[str, int] = {}
    for index, line in enumerate(lines):
        lineno = index + 1
        last_line = index == len(lines) - 1
        if not line.strip():
            problems.append(f"line {lineno}: blank line inside the trail")
            continue
        problem, record = _parse_line(line)
        if record is None:
            what = "truncated or garbled" if last_line else "garbled"
            problems.append(f"line {lineno} (expected seq {expected_seq}): {what} record - {problem}")
            # Keep checking the rest against what the damaged record should have been.
            expected_seq += 1
            prev_sha = None
            continue
        n_records += 1
        name = f"record seq {record.seq} (line {lineno})"
        if last_line and truncated:
            problems.append(f"{name}: last line has no final newline (truncated write)")
        if record.expected_sha256() != record.sha256:
            problems.append(f"{name}: sha256 mismatch - record contents were edited after writing")
        if record.seq != expected_seq:
            if record.seq < expected_seq:
                kind = "repeated or out of order (record duplicated, inserted or reordered)"
            else:
                kind = "skips ahead (record removed or reordered)"
            problems.append(f"{name}: seq {record.seq} where {expected_seq} was expected - {kind}")
        if prev_sha is not None and record.prev_sha256 != prev_sha:
            problems.append(f"{name}: prev_sha256 does not match the previous record's sha256 "
                            f"- chain broken (record removed, inserted, reordered or forged)")
        if record.sha256 in seen:
            problems.append(f"{name}: duplicate of the record on line {seen[record.sha256]}")
        else:
            seen[record.sha256] = lineno
        phi = find_phi_keys(record.details)
        if phi:
            problems.append(f"{name}: holds patient identifier key(s) {', '.join(phi)}")
        expected_seq = record.seq + 1
        prev_sha = record.sha256
    return AuditVerification(str(path), not problems, n_records, problems)


def _parse_line(line: bytes) -> tuple[str, AuditRecord | None]:
    """(problem, None) for an unreadable line, ("", record) otherwise."""
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return "not valid JSON", None
    if not isinstance(data, dict):
        return "not a JSON object", None
    missing = [name for name in FIELDS if name not in data]
    if missing:
        return f"missing field(s) {', '.join(missing)}", None
    extra = sorted(set(data) - set(FIELDS))
    if extra:
        return f"unexpected field(s) {', '.join(extra)}", None
    if not isinstance(data["seq"], int) or isinstance(data["seq"], bool) or data["seq"] < 0:
        return "seq is not a non-negative integer", None
    for name in ("when", "who", "what", "why", "prev_sha256", "sha256"):
        if not isinstance(data[name], str):
            return f"{name} is not text", None
    if data["subject"] is not None and not isinstance(data["subject"], str):
        return "subject is not text or null", None
    if not isinstance(data["details"], dict):
        return "details is not an object", None
    for name in ("prev_sha256", "sha256"):
        if not _SHA_RE.match(data[name]):
            return f"{name} is not a 64-digit hex SHA-256", None
    return "", AuditRecord.from_dict(data)


def _required_text(value: Any, name: str, path: Path) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SitebenchError(f"audit record '{name}' must be non-empty text", path)
    return value
