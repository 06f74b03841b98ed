"""The audit trail against whoever can write its file: keyed MACs, a head kept in a database, repair.

Every trail here is written through :class:`AuditTrail` with a key and an :class:`SqlAuditHead`
on a real SQLite file, then tampered with the way a tester did: the last records removed
cleanly, a forged record appended with recomputed hashes, a middle record edited and every
record after it re-chained. A hash chain alone passes all three; these tests fail on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sitebench.audit import (AuditTrail, SqlAuditHead, create_audit_key, load_audit_key, repair_trail,
                             verify_trail)
from sitebench.audit.trail import GENESIS_SHA256
from sitebench.errors import SitebenchError
from sitebench.provenance import canonical_json, sha256_json

KEY = bytes(range(32))


@pytest.fixture
def store(tmp_path: Path) -> Path:
    folder = tmp_path / "store"
    folder.mkdir()
    return folder


def _head(store: Path) -> SqlAuditHead:
    return SqlAuditHead(f"sqlite:///{store / 'qc.db'}")


def _trail(store: Path, n: int = 6) -> AuditTrail:
    trail = AuditTrail(store / "audit.jsonl", key=KEY, head=_head(store))
    trail.append(who="qc-gate", what="intake started", why="service start")
    for i in range(1, n):
        trail.append(who="qc-gate", what="verdict", why=f"scan {i} checked", subject=f"series {i}",
                     details={"status": "pass" if i % 2 else "fail", "score": i / 4})
    return trail


def _dicts(trail: AuditTrail) -> list[dict]:
    return [json.loads(line) for line in trail.path.read_text().splitlines()]


def _write(trail: AuditTrail, records: list[dict]) -> None:
    trail.path.write_bytes(b"".join(canonical_json(r) + b"\n" for r in records))


def _rechain(records: list[dict], start: int) -> None:
    """What a forger without the key does: recompute sha256 and prev links from ``start`` on (MACs left as is)."""
    for i in range(start, len(records)):
        rec = records[i]
        rec["prev_sha256"] = GENESIS_SHA256 if i == 0 else records[i - 1]["sha256"]
        body = {k: v for k, v in rec.items() if k not in ("sha256", "mac")}
        rec["sha256"] = sha256_json(body)


def _verify(store: Path, key: bytes | None = KEY, head: bool = True):
    return verify_trail(store / "audit.jsonl", key=key, head=_head(store) if head else None)


def test_a_correct_trail_verifies_with_key_and_head(store):
    trail = _trail(store)
    records = _dicts(trail)
    assert all(len(r["mac"]) == 64 for r in records)
    assert _head(store).read() == (5, records[-1]["sha256"])
    result = _verify(store)
    assert result.ok and result.n_records == 6 and result.problems == [] and result.notes == []
    assert result.macs_checked and result.head_checked and result.head_seq == 5
    assert "OK, 6 records, hash chain intact; MACs valid; head at seq 5 agrees" in result.summary()
    assert trail.verify().ok
    # without the key the chain still verifies, and the result says what it did not check
    plain = verify_trail(trail.path)
    assert plain.ok and not plain.macs_checked
    assert "hash chain intact; MACs not checked (no key)" in plain.summary()
    assert any("6 of 6 records carry a MAC" in n for n in plain.notes)
    # another key: every MAC is named
    wrong = verify_trail(trail.path, key=b"another key, 32 bytes long......")
    assert not wrong.ok and sum("MAC does not verify" in p for p in wrong.problems) == 6


def test_last_two_records_removed_cleanly_is_named(store):
    trail = _trail(store)
    lines = trail.path.read_text().splitlines(keepends=True)
    trail.path.write_text("".join(lines[:-2]))
    assert verify_trail(trail.path).ok  # the hash chain alone cannot tell
    result = _verify(store)
    assert not result.ok
    assert any("2 record(s) after seq 3 are missing" in p for p in result.problems), result.problems
    with pytest.raises(SitebenchError, match="missing"):  # and nothing is appended over the evidence
        trail.append(who="qc-gate", what="verdict")
    assert _head(store).read()[0] == 5


def test_forged_append_with_recomputed_hash_is_named(store):
    trail = _trail(store)
    records = _dicts(trail)
    body = {"seq": 6, "when": records[-1]["when"], "who": "qc-gate", "what": "verdict", "why": "re-checked",
            "subject": "series 2", "details": {"status": "pass"}, "prev_sha256": records[-1]["sha256"]}
    forged = dict(body, sha256=sha256_json(body))
    with open(trail.path, "ab") as handle:
        handle.write(canonical_json(forged) + b"\n")
    assert verify_trail(trail.path).ok  # the hash chain alone cannot tell
    result = _verify(store)
    text = "\n".join(result.problems)
    assert not result.ok
    assert "record seq 6 (line 7)" in text and "no MAC" in text and "after the head's seq 5" in text
    # with a MAC copied from another record it is named too
    forged["mac"] = records[-1]["mac"]
    _write(trail, records + [forged])
    text = "\n".join(_verify(store).problems)
    assert "record seq 6 (line 7): MAC does not verify" in text and "forged append" in text
    with pytest.raises(SitebenchError, match="MAC"):
        trail.append(who="qc-gate", what="verdict")


def test_edited_middle_record_rechained_is_named_by_mac_and_head(store):
    trail = _trail(store)
    records = _dicts(trail)
    records[2]["why"] = "scan 2 looked fine after all"
    _rechain(records, 2)
    _write(trail, records)
    assert verify_trail(trail.path).ok  # the hash chain alone cannot tell
    result = _verify(store)
    text = "\n".join(result.problems)
    assert not result.ok
    for seq in range(2, 6):
        assert f"record seq {seq} (line {seq + 1}): MAC does not verify" in text
    assert "record seq 0" not in text and "record seq 1 " not in text
    assert "record seq 5 (line 6): sha256 differs from the one the head records" in text
    # the head alone (no key) still catches it; the MACs alone (no head) too
    assert any("differs from the one the head records" in p for p in _verify(store, key=None).problems)
    assert not _verify(store, head=False).ok
    # stripping the MACs instead does not help the forger
    for rec in records[2:]:
        del rec["mac"]
    _write(trail, records)
    text = "\n".join(_verify(store, head=False).problems)
    assert "4 records seq 2-5 (lines 3-6) carry no MAC though earlier records do" in text


def test_head_lagging_by_one_is_the_crash_window(store):
    trail = _trail(store, n=4)
    # the crash between the line's fsync and the head write: a line written, the head not
    AuditTrail(trail.path, key=KEY).append(who="qc-gate", what="verdict", subject="series 4")
    assert _head(store).read()[0] == 3
    result = _verify(store)
    assert result.ok, result.summary()
    assert result.problems == []
    assert any("one record behind" in n and "crash window" in n and "MAC verifies" in n for n in result.notes)
    assert "note: the head is one record behind" in result.summary()
    # without the key it passes too, and says it could not tell
    plain = _verify(store, key=None)
    assert plain.ok and any("cannot be told from a forged append" in n for n in plain.notes)
    # the next append moves the head on
    trail.append(who="qc-gate", what="intake stopped")
    assert _head(store).read()[0] == 5
    assert _verify(store).notes == []
    # two beyond the head is a problem
    unheaded = AuditTrail(trail.path, key=KEY)
    unheaded.append(who="qc-gate", what="verdict")
    unheaded.append(who="qc-gate", what="verdict")
    result = _verify(store)
    assert not result.ok and any("2 record(s) after the head's seq 5" in p for p in result.problems)


def test_torn_last_line_is_repaired_and_the_repair_audited(store):
    trail = _trail(store)
    data = trail.path.read_bytes()
    torn = b'{"details":{"status":"pass"},"mac":"ab'
    trail.path.write_bytes(data + torn)  # a crash while writing seq 6: neither fsync-ed nor in the head
    result = _verify(store)
    assert not result.ok and any("line 7" in p and "truncated" in p for p in result.problems)
    with pytest.raises(SitebenchError, match="sitebench audit repair"):
        trail.append(who="qc-gate", what="intake started")

    repaired = repair_trail(trail.path, who="A. Physicist", why="power cut during intake", key=KEY,
                            head=_head(store))
    assert repaired.removed_bytes == len(torn) and repaired.last_good_seq == 5
    kept = Path(repaired.kept_in)
    assert kept.parent == trail.path.parent and kept.name.startswith("audit.jsonl.torn-")
    assert kept.read_bytes() == torn
    assert trail.path.read_bytes().startswith(data)  # nothing before the torn line changed
    last = trail.records()[-1]
    assert (last.seq, last.what, last.who, last.why) == (6, "audit repaired", "A. Physicist",
                                                          "power cut during intake")
    assert last.details == {"removed_bytes": len(torn), "kept_in": kept.name, "last_good_seq": 5}
    assert last.mac is not None
    after = _verify(store)
    assert after.ok and after.n_records == 7 and after.notes == [], after.summary()
    trail.append(who="qc-gate", what="intake started")  # the service starts again
    assert _verify(store).ok
    with pytest.raises(SitebenchError, match="nothing to repair"):
        repair_trail(trail.path, who="A. Physicist", why="again", key=KEY, head=_head(store))


def test_unparseable_last_line_with_newline_is_repaired(store):
    trail = _trail(store, n=3)
    trail.path.write_bytes(trail.path.read_bytes() + b'{"seq": 3, "garbage\n')
    repaired = trail.repair(who="A. Physicist", why="garbled last line")
    assert repaired.removed_bytes == len(b'{"seq": 3, "garbage\n') and repaired.last_good_seq == 2
    assert _verify(store).ok


def test_damage_in_a_middle_line_is_not_repaired(store):
    trail = _trail(store)
    lines = trail.path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2][:20] + b"\n"
    damaged = b"".join(lines) + b'{"seq":'
    trail.path.write_bytes(damaged)
    with pytest.raises(SitebenchError, match="not confined to the last line") as info:
        repair_trail(trail.path, who="A. Physicist", why="try", key=KEY, head=_head(store))
    assert "\n" not in str(info.value) and "line 3" in str(info.value)
    assert trail.path.read_bytes() == damaged and not list(store.glob("audit.jsonl.torn-*"))
    # a middle line damaged while the last line is intact: refused as well
    trail.path.write_bytes(b"".join(lines))
    with pytest.raises(SitebenchError, match="nothing to repair"):
        repair_trail(trail.path, who="A. Physicist", why="try", key=KEY)


def test_a_complete_last_record_the_head_knows_is_not_repaired_away(store):
    trail = _trail(store)
    data = trail.path.read_bytes()
    trail.path.write_bytes(data[:-1] + b"X\n")  # the last record, known to the head, damaged
    with pytest.raises(SitebenchError, match="was a complete record"):
        repair_trail(trail.path, who="A. Physicist", why="try", key=KEY, head=_head(store))
    assert trail.path.read_bytes() == data[:-1] + b"X\n"


def test_a_trail_started_without_a_key_names_its_unauthenticated_records(store):
    path = store / "audit.jsonl"
    AuditTrail(path).append(who="qc-gate", what="intake started")
    AuditTrail(path).append(who="qc-gate", what="verdict")
    none_keyed = verify_trail(path, key=KEY)
    assert not none_keyed.ok and "no record carries a MAC" in none_keyed.problems[0]
    assert "seq 0-1" in none_keyed.problems[0]
    keyed = AuditTrail(path, key=KEY, head=_head(store))
    keyed.append(who="qc-gate", what="key in use")
    result = _verify(store)
    assert result.ok, result.summary()
    assert any("2 records seq 0-1 (lines 1-2) carry no MAC of their own" in n for n in result.notes)
    with pytest.raises(SitebenchError, match="no key was given"):  # a keyed trail takes no un-keyed append
        AuditTrail(path).append(who="qc-gate", what="verdict")


def test_old_records_and_unkeyed_trails_still_read(store):
    path = store / "audit.jsonl"
    AuditTrail(path).append(who="qc-gate", what="verdict", details={"n": 1})
    assert "mac" not in json.loads(path.read_text())
    assert AuditTrail(path).records()[0].mac is None
    result = verify_trail(path)
    assert result.ok and "MACs not checked (no key)" in result.summary()


def test_head_without_entry_and_missing_trail(store):
    trail = AuditTrail(store / "audit.jsonl", key=KEY)
    trail.append(who="qc-gate", what="verdict")
    result = _verify(store)
    assert not result.ok and "the head has no entry for this trail" in result.problems[0]
    assert not (store / "qc.db").exists()  # verifying created no database
    other = store / "other"
    other.mkdir()
    _trail(other, n=2)
    (other / "audit.jsonl").unlink()
    gone = _verify(other)
    assert not gone.ok and "2 record(s) after seq -1 are missing" in gone.problems[0]


def test_head_table_lives_beside_other_tables(store):
    import sqlalchemy as sa

    url = f"sqlite:///{store / 'qc.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE verdicts (id INTEGER PRIMARY KEY, status TEXT)"))
        conn.execute(sa.text("INSERT INTO verdicts (status) VALUES ('pass')"))
    one, two = SqlAuditHead(url, "audit"), SqlAuditHead(url, "other")
    assert one.read() is None
    one.write(3, "a" * 64)
    two.write(7, "b" * 64)
    one.write(4, "c" * 64)
    assert one.read() == (4, "c" * 64) and two.read() == (7, "b" * 64)
    assert sorted(sa.inspect(engine).get_table_names()) == ["audit_head", "verdicts"]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM verdicts")).scalar_one() == "pass"


def test_key_files(tmp_path):
    path = tmp_path / "audit.key"
    key = create_audit_key(path)
    assert len(key) == 32 and (path.stat().st_mode & 0o777) == 0o600
    assert path.read_text().strip() == key.hex()
    assert load_audit_key(path) == key
    with pytest.raises(SitebenchError, match="refusing to overwrite"):
        create_audit_key(path)
    assert load_audit_key(path) == key
    os.chmod(path, 0o644)
    with pytest.raises(SitebenchError, match="group or others") as info:
        load_audit_key(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    os.chmod(path, 0o640)
    with pytest.raises(SitebenchError, match="group or others"):
        load_audit_key(path)
    with pytest.raises(SitebenchError, match="not found"):
        load_audit_key(tmp_path / "none.key")
    bad = tmp_path / "bad.key"
    bad.write_text("not hex at all")
    bad.chmod(0o600)
    with pytest.raises(SitebenchError, match="hex"):
        load_audit_key(bad)


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sitebench.cli", "audit", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_cli_verify_and_repair(store):
    trail = _trail(store, n=3)
    key_file = store / "audit.key"
    key_file.write_text(KEY.hex() + "\n")
    key_file.chmod(0o600)
    database = f"sqlite:///{store / 'qc.db'}"

    ok = _cli("verify", trail.path, "--key-file", key_file, "--database", database)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK, 3 records" in ok.stdout and "MACs valid" in ok.stdout and "Traceback" not in ok.stderr

    # the intake YAML shortcut: store relative to the YAML, qc.db and audit.key found in it
    config = store.parent / "intake.yaml"
    config.write_text("store: store\nprotocols: protocols\nsites: {}\n")
    via_config = _cli("verify", "--config", config, "--json")
    assert via_config.returncode == 0, via_config.stdout + via_config.stderr
    document = json.loads(via_config.stdout)
    assert document["ok"] and document["macs_checked"] and document["head_checked"] and document["head_seq"] == 2

    lines = trail.path.read_text().splitlines(keepends=True)
    trail.path.write_text("".join(lines[:-1]))
    failed = _cli("verify", "--config", config)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "1 record(s) after seq 1 are missing" in failed.stdout and "Traceback" not in failed.stderr
    trail.path.write_text("".join(lines))

    trail.path.write_text("".join(lines) + '{"seq":3,')
    torn = _cli("verify", "--config", config)
    assert torn.returncode == 1 and "Traceback" not in torn.stderr
    fixed = _cli("repair", "--config", config, "--who", "A. Physicist", "--why", "power cut")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "repaired, removed 9 byte(s)" in fixed.stdout
    assert _cli("verify", "--config", config).returncode == 0

    refused = _cli("repair", "--config", config, "--who", "A. Physicist", "--why", "again")
    assert refused.returncode == 2 and "nothing to repair" in refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1

    key_file.chmod(0o644)
    open_key = _cli("verify", trail.path, "--key-file", key_file)
    assert open_key.returncode == 2 and "group or others" in open_key.stderr and "Traceback" not in open_key.stderr


def _append_keyed(path: str, url: str, worker: int, n: int, start) -> None:
    start.wait(30)
    trail = AuditTrail(path, key=KEY, head=SqlAuditHead(url))
    for i in range(n):
        trail.append(who=f"worker-{worker}", what="verdict", subject=f"{worker}-{i}")


def test_two_processes_append_with_key_and_head(store):
    import multiprocessing

    path, url = str(store / "audit.jsonl"), f"sqlite:///{store / 'qc.db'}"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_append_keyed, args=(path, url, w, 15, start)) for w in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    result = _verify(store)
    assert result.ok and result.n_records == 30 and result.notes == [], result.summary()
    assert _head(store).read()[0] == 29
