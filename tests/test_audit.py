"""The audit trail: append-only, hash-chained, tamper-evident, free of patient identifiers."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from sitebench.audit import AuditRecord, AuditTrail, AuditVerification, verify_trail
from sitebench.audit.trail import GENESIS_SHA256
from sitebench.errors import SitebenchError
from sitebench.provenance import canonical_json, sha256_json


def _five(tmp_path: Path) -> AuditTrail:
    trail = AuditTrail(tmp_path / "audit" / "trail.jsonl")
    trail.append(who="qc-gate", what="protocol_lock", why="site S01 baseline", subject="S01",
                 details={"protocol_sha256": "ab" * 32, "n_params": 12})
    for i in range(1, 5):
        trail.append(who="qc-gate", what="verdict", why=f"scan {i} checked", subject=f"scan-{i}",
                     details={"verdict": "pass" if i % 2 else "fail", "score": i / 3, "tags": ["a", i]})
    return trail


def _lines(trail: AuditTrail) -> list[str]:
    return trail.path.read_text().splitlines(keepends=True)


def _write(trail: AuditTrail, lines: list[str]) -> None:
    trail.path.write_text("".join(lines))


def _problems(trail: AuditTrail) -> str:
    result = trail.verify()
    assert not result.ok
    assert result.problems
    return "\n".join(result.problems)


def test_append_five_and_verify(tmp_path):
    trail = _five(tmp_path)
    records = trail.records()
    assert [r.seq for r in records] == [0, 1, 2, 3, 4]
    assert records[0].prev_sha256 == GENESIS_SHA256
    for prev, rec in zip(records, records[1:]):
        assert rec.prev_sha256 == prev.sha256
    for rec in records:
        body = rec.to_dict()
        del body["sha256"]
        assert rec.sha256 == sha256_json(body)
        assert rec.when.endswith("+00:00")
    assert records[0].details == {"protocol_sha256": "ab" * 32, "n_params": 12}
    assert records[3].details["tags"] == ["a", 3]
    result = trail.verify()
    assert isinstance(result, AuditVerification)
    assert result.ok and result.n_records == 5 and result.problems == []
    assert "OK" in result.summary() and "5 records" in result.summary()
    assert result.to_dict()["ok"] is True
    assert verify_trail(trail.path).ok
    # each line is canonical JSON of the record
    first = json.loads(_lines(trail)[0])
    assert canonical_json(first) + b"\n" == trail.path.read_bytes().split(b"\n", 1)[0] + b"\n"
    assert isinstance(records[0], AuditRecord)


def test_missing_file_is_empty_and_created_on_first_append(tmp_path):
    trail = AuditTrail(tmp_path / "new.jsonl")
    assert trail.records() == [] and trail.verify().ok and not trail.path.exists()
    rec = trail.append(who="me", what="x")
    assert trail.path.exists() and rec.seq == 0 and rec.why == "" and rec.subject is None and rec.details == {}


def test_edited_value_detected(tmp_path):
    trail = _five(tmp_path)
    lines = _lines(trail)
    data = json.loads(lines[2])
    data["details"]["verdict"] = "pass" if data["details"]["verdict"] == "fail" else "fail"
    lines[2] = json.dumps(data) + "\n"
    _write(trail, lines)
    text = _problems(trail)
    assert "seq 2" in text and "sha256 mismatch" in text
    assert "seq 3" not in text  # no cascade onto the next record


def test_deleted_middle_line_detected(tmp_path):
    trail = _five(tmp_path)
    lines = _lines(trail)
    del lines[2]
    _write(trail, lines)
    text = _problems(trail)
    assert "seq 3" in text and "2 was expected" in text and "prev_sha256" in text


def test_swapped_lines_detected(tmp_path):
    trail = _five(tmp_path)
    lines = _lines(trail)
    lines[1], lines[2] = lines[2], lines[1]
    _write(trail, lines)
    text = _problems(trail)
    assert "seq 2 (line 2)" in text and "seq 1 (line 3)" in text


def test_truncated_last_line_detected(tmp_path):
    trail = _five(tmp_path)
    data = trail.path.read_bytes()
    trail.path.write_bytes(data[:-40])
    result = trail.verify()
    assert not result.ok and result.n_records == 4
    assert any("line 5" in p and "truncated" in p for p in result.problems)
    with pytest.raises(SitebenchError, match="truncated"):
        trail.append(who="qc-gate", what="verdict")
    with pytest.raises(SitebenchError, match="line 5"):
        trail.records()


def test_duplicated_line_detected(tmp_path):
    trail = _five(tmp_path)
    lines = _lines(trail)
    lines.insert(3, lines[2])
    _write(trail, lines)
    text = _problems(trail)
    assert "seq 2 (line 4)" in text and "duplicate" in text


def test_forged_appended_line_detected(tmp_path):
    trail = _five(tmp_path)
    body = {"seq": 5, "when": "2024-01-01T00:00:00+00:00", "who": "mallory", "what": "verdict",
            "why": "", "subject": None, "details": {}, "prev_sha256": "f" * 64}
    forged = dict(body, sha256=sha256_json(body))  # self-hash is right, the link is not
    with open(trail.path, "ab") as handle:
        handle.write(canonical_json(forged) + b"\n")
    text = _problems(trail)
    assert "seq 5" in text and "prev_sha256" in text and "sha256 mismatch" not in text


def test_inserted_middle_record_detected(tmp_path):
    trail = _five(tmp_path)
    lines = _lines(trail)
    prev = json.loads(lines[1])
    body = {"seq": 2, "when": prev["when"], "who": "mallory", "what": "verdict", "why": "",
            "subject": None, "details": {}, "prev_sha256": prev["sha256"]}
    lines.insert(2, canonical_json(dict(body, sha256=sha256_json(body))).decode() + "\n")
    _write(trail, lines)
    text = _problems(trail)
    assert "line 4" in text


@pytest.mark.parametrize("key", ["PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs",
                                 "PatientAddress", "AccessionNumber", "ReferringPhysicianName",
                                 "patient_name"])
def test_phi_key_refused_without_value(tmp_path, key):
    trail = AuditTrail(tmp_path / "t.jsonl")
    secret = "DOE^JANE-8675309"
    with pytest.raises(SitebenchError) as info:
        trail.append(who="qc-gate", what="verdict", details={"scan": {"header": {key: secret}}})
    assert key in str(info.value) and secret not in str(info.value)
    assert not trail.path.exists() or trail.path.read_text() == ""


def test_empty_who_or_what_refused(tmp_path):
    trail = AuditTrail(tmp_path / "t.jsonl")
    with pytest.raises(SitebenchError, match="who"):
        trail.append(who="", what="verdict")
    with pytest.raises(SitebenchError, match="who"):
        trail.append(who="   ", what="verdict")
    with pytest.raises(SitebenchError, match="what"):
        trail.append(who="qc-gate", what="")


def _append_many(path: str, worker: int, n: int, start) -> None:
    start.wait(30)
    trail = AuditTrail(path)
    for i in range(n):
        trail.append(who=f"worker-{worker}", what="verdict", subject=f"{worker}-{i}", details={"i": i})


def test_two_processes_append_concurrently(tmp_path):
    path = str(tmp_path / "shared.jsonl")
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_append_many, args=(path, w, 25, start)) for w in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    result = verify_trail(path)
    assert result.ok, result.summary()
    assert result.n_records == 50
    records = AuditTrail(path).records()
    assert [r.seq for r in records] == list(range(50))
    assert sorted(r.subject for r in records) == sorted(f"{w}-{i}" for w in range(2) for i in range(25))
