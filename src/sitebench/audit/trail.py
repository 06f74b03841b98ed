"""Append-only, hash-chained and (with a key) MAC-chained audit trail stored as JSON lines.

Every line is one record: ``seq`` (0, 1, 2, ...), ``when`` (UTC ISO 8601), ``who``,
``what``, ``why``, ``subject``, ``details``, ``prev_sha256`` (the previous record's
``sha256``; :data:`GENESIS_SHA256` for the first), ``sha256``, the SHA-256 of the
canonical JSON of those fields, and, when the trail is written with a key, ``mac``.
Editing, removing, reordering, inserting or tearing records breaks the chain and
:func:`verify_trail` names the record.

A hash chain alone cannot stop whoever can write the file: they can cut records off the
end, append a record with a recomputed hash, or edit a record and recompute every hash
after it. Two things added here close that:

* **Keyed MAC chain.** With a key (a per-trial secret, see :func:`create_audit_key` and
  :func:`load_audit_key`) every new record carries ``mac`` = HMAC-SHA256(key, canonical
  JSON of the hashed fields, ``prev_sha256`` included) (HMAC: RFC 2104, H. Krawczyk,
  M. Bellare, R. Canetti, 1997; compared with :func:`hmac.compare_digest`). A forged
  append or a re-chained edit has no valid MAC without the key. ``sha256`` is computed as
  before (without ``mac``), so a trail verifies its hash chain with or without the key.
  Records written before a key was used carry no ``mac``; a keyed verify names them in a
  note when they all come before the first keyed record (the first keyed record's MAC
  covers their hash chain; a keyed writer only extends an un-keyed last record that the
  head knows, or when there is no head), and as a problem when an un-keyed record follows
  a keyed one, or when no record carries a MAC at all.
* **The head kept elsewhere** (:class:`~sitebench.audit.head.AuditHead`, e.g.
  :class:`~sitebench.audit.head.SqlAuditHead` in the QC database): the last ``seq`` and
  its ``sha256``, written by every append. Verify with the head detects a cut tail (the
  file ends before the head's seq), appends the head does not know, and re-chaining (the
  file's record at the head's seq has another sha256).

**Write order and the crash window.** An append writes and ``fsync``-s the line first, then
writes the head. The two are not atomic together: a crash between them leaves the head one
record behind the file. :func:`verify_trail` therefore accepts *exactly one* record beyond
the head as that crash window (``ok``, with a note) when it links to the head's record and,
with a key, has a valid MAC; without a key it is still accepted, and the note says it could
not be told from a forged append. Two or more records beyond the head, or one without a
valid MAC when a key is given, are problems. The next append moves the head on. An append
refuses to extend a tail that verify would flag this way (cut, rewritten, unknown to the
head, failing its MAC), so it never writes a head over the evidence.

Appends hold an exclusive ``fcntl.flock`` on the file while they read the last record (from
the end of the file, never the whole file), write the new line and update the head, and are
flushed and ``fsync``-ed before returning, so two processes can append at once and a
returned record survives a crash. A torn last line (a crash while writing it) makes append
refuse; :func:`repair_trail` (``sitebench audit repair``) cuts off that line only, keeps its
bytes beside the trail and records the repair in the trail.

Patient identifiers are never written: any key in ``details`` (at any depth) that is a
DICOM PS3.15 Basic Profile identifier attribute name is refused; the error names the
key, never the value.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sitebench.audit.head import AuditHead
from sitebench.durable import fsync_dir
from sitebench.errors import SitebenchError
from sitebench.provenance import canonical_json, jsonable, sha256_json, utc_now

GENESIS_SHA256 = "0" * 64

FIELDS = ("seq", "when", "who", "what", "why", "subject", "details", "prev_sha256", "sha256")
#: Fields a record may carry besides :data:`FIELDS`: ``mac`` only on records written with a key.
OPTIONAL_FIELDS = ("mac",)
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
    """One decision in the trail; ``mac`` is None for a record written without a key."""

    seq: int
    when: str
    who: str
    what: str
    why: str
    subject: str | None
    details: dict[str, Any]
    prev_sha256: str
    sha256: str
    mac: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in FIELDS}
        if self.mac is not None:
            out["mac"] = self.mac
        return out

    def hashed_part(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _HASHED_FIELDS}

    def expected_sha256(self) -> str:
        return sha256_json(self.hashed_part())

    def expected_mac(self, key: bytes) -> str:
        """HMAC-SHA256 (RFC 2104) of the canonical JSON of the hashed fields under ``key``."""
        return compute_mac(key, self.hashed_part())

    def mac_ok(self, key: bytes) -> bool:
        """True when the record carries a MAC and it is the right one for ``key`` (constant-time compare)."""
        return self.mac is not None and hmac.compare_digest(self.mac, self.expected_mac(key))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditRecord:
        return cls(**{name: data[name] for name in FIELDS}, mac=data.get("mac"))


def compute_mac(key: bytes, hashed_fields: dict[str, Any]) -> str:
    """``mac`` of a record: hex HMAC-SHA256 (RFC 2104) under ``key`` of the canonical JSON of its hashed fields."""
    return hmac.new(key, canonical_json(hashed_fields), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class AuditVerification:
    """Outcome of checking a trail: ``ok`` only when every record, link, MAC (with a key) and the head agree.

    ``notes`` say what was accepted but is worth knowing (records without a MAC of their own
    before the first keyed one, the head lagging by one record after a crash); ``macs_checked``
    and ``head_checked`` say what could be checked at all.
    """

    path: str
    ok: bool
    n_records: int
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    macs_checked: bool = False
    head_checked: bool = False
    head_seq: int | None = None

    def checks(self) -> str:
        """What was checked, in words: hash chain, MACs, head."""
        macs = "MACs valid" if self.macs_checked else "MACs not checked (no key)"
        if not self.head_checked:
            head = "head not checked (no head given)"
        elif self.head_seq is None:
            head = "no head recorded"
        else:
            head = f"head at seq {self.head_seq} agrees"
        if not self.ok:
            macs = "MACs checked" if self.macs_checked else "MACs not checked (no key)"
            head = "head checked" if self.head_checked else "head not checked (no head given)"
            return f"{macs}; {head}"
        return f"hash chain intact; {macs}; {head}"

    def summary(self) -> str:
        notes = [f"  note: {n}" for n in self.notes]
        if self.ok:
            return "\n".join([f"audit trail {self.path}: OK, {self.n_records} records, {self.checks()}", *notes])
        head = (f"audit trail {self.path}: FAILED, {len(self.problems)} problem(s) "
                f"in {self.n_records} readable records ({self.checks()})")
        return "\n".join([head, *(f"  - {p}" for p in self.problems), *notes])

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "n_records": self.n_records,
                "problems": list(self.problems), "notes": list(self.notes),
                "macs_checked": self.macs_checked, "head_checked": self.head_checked, "head_seq": self.head_seq}


@dataclass(frozen=True)
class RepairResult:
    """What :func:`repair_trail` did: the bytes cut off, where they are kept, and the audited repair record."""

    path: str
    removed_bytes: int
    kept_in: str
    last_good_seq: int | None
    record: AuditRecord

    def summary(self) -> str:
        after = "no intact record before it" if self.last_good_seq is None else f"after seq {self.last_good_seq}"
        return (f"audit trail {self.path}: repaired, removed {self.removed_bytes} byte(s) of a torn last line "
                f"({after}), kept in {self.kept_in}; recorded as seq {self.record.seq} 'audit repaired'")

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "removed_bytes": self.removed_bytes, "kept_in": self.kept_in,
                "last_good_seq": self.last_good_seq, "record": self.record.to_dict()}


_VERIFY_HINT = "refusing to append - run `sitebench audit verify`"
_REPAIR_HINT = "refusing to append - run `sitebench audit repair`"


class AuditTrail:
    """A JSON-lines audit trail at ``path``; the file is created on the first append.

    ``key``: the trail's secret; every appended record then carries a ``mac`` (see the module
    docstring). ``head``: where the last ``(seq, sha256)`` is kept besides the file; every
    append updates it after the line is on disk.
    """

    def __init__(self, path: str | Path, key: bytes | None = None, head: AuditHead | None = None) -> None:
        self.path = Path(path)
        self.key = _checked_key(key, self.path)
        self.head = head

    # -- writing ---------------------------------------------------------------------------
    def append(self, *, who: str, what: str, why: str = "", subject: str | None = None,
               details: dict | None = None) -> AuditRecord:
        """Record one decision; durable (fsync, then the head) and safe against concurrent appenders."""
        fields = _checked_fields(self.path, who, what, why, subject, details)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        with open(self.path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                return self._append_locked(handle, self._last_record(handle), fields, created)
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _append_locked(self, handle, last: AuditRecord | None, fields: dict[str, Any],
                       created: bool) -> AuditRecord:
        """Write one record after ``last`` while the caller holds the lock: line, fsync, then the head."""
        self._check_tail(last)
        body = {
            "seq": 0 if last is None else last.seq + 1,
            "when": utc_now(),
            **fields,
            "prev_sha256": GENESIS_SHA256 if last is None else last.sha256,
        }
        mac = None if self.key is None else compute_mac(self.key, body)
        record = AuditRecord(**body, sha256=sha256_json(body), mac=mac)
        handle.seek(0, os.SEEK_END)
        handle.write(canonical_json(record.to_dict()) + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
        if created:
            fsync_dir(self.path.parent)
        if self.head is not None:  # after the line is durable: a crash here leaves the head one behind
            self.head.write(record.seq, record.sha256)
        return record

    def _check_tail(self, last: AuditRecord | None) -> None:
        """Refuse to extend a tail that verify would flag: failing MAC, cut, rewritten, unknown to the head."""
        if last is not None and last.mac is not None:
            if self.key is None:
                raise SitebenchError(
                    f"audit trail is keyed (its last record, seq {last.seq}, carries a MAC) but no key was given; "
                    f"an append without the key would be unauthenticated - pass the trail's key", self.path)
            if not last.mac_ok(self.key):
                raise SitebenchError(
                    f"audit trail's last record (seq {last.seq}) fails its MAC check (forged, or written with "
                    f"another key); {_VERIFY_HINT}", self.path)
        if self.head is None:
            return
        known = self.head.read()
        if known is None:
            return
        head_seq, head_sha = known
        if last is None:
            raise SitebenchError(f"audit trail is empty but its head records seq {head_seq}: {head_seq + 1} "
                                 f"record(s) are missing; {_VERIFY_HINT}", self.path)
        if head_seq > last.seq:
            raise SitebenchError(f"{head_seq - last.seq} record(s) after seq {last.seq} are missing (the head "
                                 f"records seq {head_seq}); {_VERIFY_HINT}", self.path)
        if head_seq == last.seq:
            if head_sha != last.sha256:
                raise SitebenchError(f"audit trail's last record (seq {last.seq}) is not the one its head records: "
                                     f"the trail was rewritten; {_VERIFY_HINT}", self.path)
        elif head_seq == last.seq - 1:  # the crash window between a line's fsync and its head write
            if last.prev_sha256 != head_sha:
                raise SitebenchError(f"audit trail's record seq {head_seq} is not the one its head records: the trail "
                                     f"was rewritten; {_VERIFY_HINT}", self.path)
            if self.key is not None and last.mac is None:
                raise SitebenchError(f"audit trail's last record (seq {last.seq}) is beyond its head and has no MAC "
                                     f"(forged, or written without the key); {_VERIFY_HINT}", self.path)
        else:
            raise SitebenchError(f"audit trail has {last.seq - head_seq} record(s) after its head's seq {head_seq} "
                                 f"that the head does not know (forged, or appended without the head); "
                                 f"{_VERIFY_HINT}", self.path)

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
            raise SitebenchError(f"audit trail's last line is truncated (no newline, a torn write); {_REPAIR_HINT}",
                                 self.path)
        line = tail[:-1].rsplit(b"\n", 1)[-1]
        problem, record = _parse_line(line)
        if record is None:
            raise SitebenchError(f"audit trail's last line is damaged ({problem}); {_REPAIR_HINT}", self.path)
        if record.expected_sha256() != record.sha256:
            raise SitebenchError(f"audit trail's last record (seq {record.seq}) fails its hash check; {_VERIFY_HINT}",
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
        """Check every record's own hash, every link of the chain, and (given) the MACs and the head."""
        return verify_trail(self.path, key=self.key, head=self.head)

    def repair(self, *, who: str, why: str) -> RepairResult:
        """:func:`repair_trail` with this trail's key and head."""
        return repair_trail(self.path, who=who, why=why, key=self.key, head=self.head)


# -- verifying ---------------------------------------------------------------------------------
def verify_trail(path: str | Path, key: bytes | None = None, head: AuditHead | None = None) -> AuditVerification:
    """Check an audit trail file: self-hashes, ``seq`` order, ``prev_sha256`` links; MACs with ``key``; ``head``.

    Without a key the result says MACs were not checked; without a head, that truncation of
    the tail and re-chaining could not be told (see the module docstring for the crash window).
    """
    path = Path(path)
    key = _checked_key(key, path)
    data = path.read_bytes() if path.exists() else b""
    known = head.read() if head is not None else None
    return _verify_bytes(data, path, key, head is not None, known)


def _verify_bytes(data: bytes, path: Path, key: bytes | None, head_checked: bool,
                  known: tuple[int, str] | None) -> AuditVerification:
    problems: list[str] = []
    notes: list[str] = []
    lines = data.split(b"\n")
    truncated = not data.endswith(b"\n") and data != b""
    if not truncated:
        lines = lines[:-1]  # the empty piece after the final newline

    good: list[tuple[int, AuditRecord]] = []  # (line number, record) of every readable record
    expected_seq = 0
    prev_sha: str | None = GENESIS_SHA256
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
        good.append((lineno, record))
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

    mac_valid: set[int] = set()  # line numbers of records whose MAC verifies
    if key is not None:
        mac_valid = _check_macs(good, key, problems, notes)
    else:
        n_mac = sum(1 for _, r in good if r.mac is not None)
        if n_mac:
            notes.append(f"{n_mac} of {len(good)} records carry a MAC; MACs not checked (no key)")
    if head_checked:
        _check_head(good, known, key, mac_valid, problems, notes)
    return AuditVerification(str(path), not problems, len(good), problems, notes, macs_checked=key is not None,
                             head_checked=head_checked, head_seq=None if known is None else known[0])


def _check_macs(good: list[tuple[int, AuditRecord]], key: bytes, problems: list[str], notes: list[str]) -> set[int]:
    """Check every record's MAC; returns the line numbers of those that verify."""
    valid: set[int] = set()
    first_keyed = next((i for i, (_, r) in enumerate(good) if r.mac is not None), None)
    unkeyed_prefix: list[tuple[int, AuditRecord]] = []
    unkeyed_later: list[tuple[int, AuditRecord]] = []
    for i, (lineno, record) in enumerate(good):
        if record.mac is None:
            (unkeyed_prefix if first_keyed is not None and i < first_keyed else unkeyed_later).append((lineno, record))
        elif record.mac_ok(key):
            valid.add(lineno)
        else:
            problems.append(f"record seq {record.seq} (line {lineno}): MAC does not verify - forged or rewritten "
                            f"without the key (or written with another key)")
    if first_keyed is None and unkeyed_later:
        problems.append(f"no record carries a MAC: none authenticated - {_span(unkeyed_later)} "
                        f"(written without the key, or forged)")
    else:
        if unkeyed_later:
            problems.append(f"{_span(unkeyed_later)} {_carry(unkeyed_later)} no MAC though earlier records do: "
                            f"unauthenticated (forged, or appended by a writer without the key)")
        if unkeyed_prefix:
            notes.append(f"{_span(unkeyed_prefix)} {_carry(unkeyed_prefix)} no MAC of their own (written before "
                         f"the key was used); they are covered only through the hash chain by the MAC of seq "
                         f"{good[first_keyed][1].seq}")
    return valid


def _check_head(good: list[tuple[int, AuditRecord]], known: tuple[int, str] | None, key: bytes | None,
                mac_valid: set[int], problems: list[str], notes: list[str]) -> None:
    """Compare the file's tail with the head kept elsewhere (cut tail, unknown appends, re-chaining)."""
    if known is None:
        if good:
            problems.append(f"the head has no entry for this trail though the file holds {len(good)} record(s) "
                            f"- the head was never written or was removed; truncation and re-chaining not checked")
        return
    head_seq, head_sha = known
    last_seq = good[-1][1].seq if good else -1
    if last_seq < head_seq:
        problems.append(f"{head_seq - last_seq} record(s) after seq {last_seq} are missing (the head records seq "
                        f"{head_seq}) - the end of the trail was cut off")
        return
    at_head = [(lineno, r) for lineno, r in good if r.seq == head_seq]
    if not at_head:
        problems.append(f"the trail has no record seq {head_seq}, the one its head records")
    elif all(r.sha256 != head_sha for _, r in at_head):
        lineno, r = at_head[0]
        problems.append(f"record seq {head_seq} (line {lineno}): sha256 differs from the one the head records "
                        f"- the trail was rewritten (edited and re-chained) up to here")
    beyond = [(lineno, r) for lineno, r in good if r.seq > head_seq]
    if not beyond:
        return
    if len(beyond) >= 2:
        problems.append(f"{len(beyond)} record(s) after the head's seq {head_seq} that the head does not know "
                        f"({_span(beyond)}) - forged, or appended without updating the head")
        return
    lineno, r = beyond[0]
    if key is None:
        notes.append(f"the head is one record behind (seq {head_seq}; the file ends at seq {r.seq}): the crash "
                     f"window between a line's fsync and its head write; MACs not checked, so it cannot be told "
                     f"from a forged append")
    elif lineno in mac_valid:
        notes.append(f"the head is one record behind (seq {head_seq}; the file ends at seq {r.seq}, whose MAC "
                     f"verifies): the crash window between a line's fsync and its head write; the next append "
                     f"moves the head on")
    else:
        problems.append(f"record seq {r.seq} (line {lineno}): after the head's seq {head_seq} and without a valid "
                        f"MAC - forged append, not the crash window")


def _span(items: list[tuple[int, AuditRecord]]) -> str:
    """'record seq 3 (line 4)' or 'records seq 3-7, 9 (lines 4-8, 10)'."""
    seqs = _ranges([r.seq for _, r in items])
    lines = _ranges([lineno for lineno, _ in items])
    if len(items) == 1:
        return f"record seq {seqs} (line {lines})"
    return f"{len(items)} records seq {seqs} (lines {lines})"


def _carry(items: list) -> str:
    return "carries" if len(items) == 1 else "carry"


def _ranges(numbers: list[int]) -> str:
    out: list[str] = []
    for n in numbers:
        if out and out[-1][1] == n - 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))  # type: ignore[arg-type]
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)  # type: ignore[misc]


# -- repairing ---------------------------------------------------------------------------------
def repair_trail(path: str | Path, *, who: str, why: str, key: bytes | None = None,
                 head: AuditHead | None = None) -> RepairResult:
    """Cut off a torn last line (and only that), keep its bytes in ``<trail>.torn-<utc>``, audit the repair.

    The torn part is the bytes after the last newline, or, when the file ends with a newline,
    a last line that does not parse. Everything before it must verify (hash chain, and MACs
    with ``key``); otherwise the damage is not confined to the last line and nothing is
    changed. With a ``head`` that already records a seq past the last intact record, the
    damaged line was a complete record, not a torn write, and the repair is refused too.
    Order: the torn bytes are written and fsync-ed beside the trail, then the trail is cut
    and fsync-ed, then the record ``what="audit repaired"`` (details ``removed_bytes``,
    ``kept_in``, ``last_good_seq``) is appended (with ``key`` and ``head``), all under the
    trail's lock.
    """
    trail = AuditTrail(path, key=key, head=head)
    path = trail.path
    if not path.exists():
        raise SitebenchError("no audit trail here", path)
    fields = _checked_fields(path, who, "audit repaired", why, None, {})
    with open(path, "r+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            data = handle.read()
            cut = _torn_tail_start(data, path)
            kept = data[:cut]
            check = _verify_bytes(kept, path, key, False, None)
            if not check.ok:
                raise SitebenchError(f"the damage is not confined to the last line ({check.problems[0]}; "
                                     f"{len(check.problems)} problem(s) before it); not repairing - run "
                                     f"`sitebench audit verify`", path)
            last = None
            if kept:
                _, last = _parse_line(kept[:-1].rsplit(b"\n", 1)[-1])
            last_good = None if last is None else last.seq
            if head is not None:
                known = head.read()
                if known is not None and known[0] > (-1 if last_good is None else last_good):
                    raise SitebenchError(f"the head records seq {known[0]}, so the damaged last line was a complete "
                                         f"record, not a torn write; not repairing - run `sitebench audit verify`",
                                         path)
            trail._check_tail(last)  # refuse before changing anything
            torn = data[cut:]
            kept_in = _keep_torn(path, torn)
            handle.truncate(cut)
            handle.flush()
            os.fsync(handle.fileno())
            fields["details"] = {"removed_bytes": len(torn), "kept_in": kept_in.name, "last_good_seq": last_good}
            record = trail._append_locked(handle, last, fields, created=False)
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return RepairResult(str(path), len(torn), str(kept_in), last_good, record)


def _torn_tail_start(data: bytes, path: Path) -> int:
    """Offset where the torn last line starts; an error when the last line is intact."""
    if not data.endswith(b"\n"):
        return data.rfind(b"\n") + 1  # 0 when the only line is torn
    start = data.rfind(b"\n", 0, len(data) - 1) + 1
    problem, record = _parse_line(data[start:-1])
    if record is not None:
        raise SitebenchError("nothing to repair: the last line is a complete record "
                             "- run `sitebench audit verify` for other damage", path)
    return start


def _keep_torn(path: Path, torn: bytes) -> Path:
    """Write the cut-off bytes to ``<trail>.torn-<utc>`` beside the trail (never over another file)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target = path.with_name(f"{path.name}.torn-{stamp}")
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SitebenchError("a file of this name already exists; not repairing", target) from None
    with os.fdopen(fd, "wb") as out:
        out.write(torn)
        out.flush()
        os.fsync(out.fileno())
    fsync_dir(path.parent)
    return target


# -- keys --------------------------------------------------------------------------------------
MIN_KEY_BYTES = 16
KEY_BYTES = 32


def create_audit_key(path: str | Path) -> bytes:
    """Make a new trail key: 32 random bytes (:mod:`secrets`), hex, in a new file of mode 0600; never overwrites."""
    path = Path(path)
    key = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SitebenchError("audit key file already exists; refusing to overwrite it", path) from None
    except OSError as exc:
        raise SitebenchError(f"cannot create the audit key file: {exc.strerror}", path) from None
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(key.hex() + "\n")
        out.flush()
        os.fsync(out.fileno())
    fsync_dir(path.parent)
    return key


def load_audit_key(path: str | Path) -> bytes:
    """The key in ``path`` (hex text, as :func:`create_audit_key` writes it); refuses a file group or others can use."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise SitebenchError("audit key file not found", path) from None
    except OSError as exc:
        raise SitebenchError(f"cannot read the audit key file: {exc.strerror}", path) from None
    if not stat.S_ISREG(mode):
        raise SitebenchError("audit key file is not a regular file", path)
    if mode & 0o077:
        raise SitebenchError(f"audit key file is readable or writable by group or others (mode "
                             f"{stat.S_IMODE(mode):04o}); refusing it - make it private: chmod 600", path)
    try:
        text = path.read_text(encoding="ascii").strip()
        key = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError):
        raise SitebenchError("audit key file does not hold a hex key", path) from None
    if len(key) < MIN_KEY_BYTES:
        raise SitebenchError(f"audit key is too short ({len(key)} bytes; at least {MIN_KEY_BYTES})", path)
    return key


def _checked_key(key: Any, path: Path) -> bytes | None:
    if key is None:
        return None
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise SitebenchError("audit key must be non-empty bytes", path)
    return bytes(key)


def _checked_fields(path: Path, who: Any, what: Any, why: Any, subject: Any, details: Any) -> dict[str, Any]:
    """The caller's fields, checked (types, no patient identifiers) and JSON-normalised."""
    who = _required_text(who, "who", path)
    what = _required_text(what, "what", path)
    if not isinstance(why, str):
        raise SitebenchError(f"audit record 'why' must be text, got {type(why).__name__}", path)
    if subject is not None and not isinstance(subject, str):
        raise SitebenchError(f"audit record 'subject' must be text or None, got {type(subject).__name__}", path)
    if details is None:
        details = {}
    if not isinstance(details, dict):
        raise SitebenchError(f"audit record 'details' must be a mapping, got {type(details).__name__}", path)
    phi = find_phi_keys(details)  # before conversion: report the caller's own keys
    if phi:
        raise SitebenchError(
            f"refusing to write patient identifier key(s) to the audit trail: {', '.join(phi)}", path)
    # Round-trip through JSON so the hashed form is exactly what is read back later.
    details = json.loads(canonical_json(jsonable(details)))
    return {"who": who, "what": what, "why": why, "subject": subject, "details": details}


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
    extra = sorted(set(data) - set(FIELDS) - set(OPTIONAL_FIELDS))
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
        if not _SHA_RE.fullmatch(data[name]):
            return f"{name} is not a 64-digit hex SHA-256", None
    if "mac" in data and not (isinstance(data["mac"], str) and _SHA_RE.fullmatch(data["mac"])):
        return "mac is not a 64-digit hex HMAC-SHA256", None
    return "", AuditRecord.from_dict(data)


def _required_text(value: Any, name: str, path: Path) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SitebenchError(f"audit record '{name}' must be non-empty text", path)
    return value
