"""`qc status` arithmetic on real databases (SQLite, and a PostgreSQL server started for the test run):
re-scans, open deviations, drift, rejected files."""

from __future__ import annotations

import pytest

from sitebench.qc.drift import DriftEvent
from sitebench.qc.gate import SeriesOutcome
from sitebench.qc.protocol import Deviation
from sitebench.qc.records import QCRecords, database_url

TR = Deviation("RepetitionTime", "2.3 ± 2%", 2.5, "rel", "fail", "fail")


def outcome(key: str, study: str, status: str, site: str = "S01", deviations=(), drift=()) -> SeriesOutcome:
    return SeriesOutcome(series_key=key, site=site, status=status, n_files=10, study_key=study, scanner="GE|x",
                         protocol="t1w", protocol_version=1, protocol_sha256="0" * 64,
                         deviations=list(deviations), checks=list(deviations), drift=list(drift))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def records(request, tmp_path) -> QCRecords:
    if request.param == "sqlite":
        return QCRecords(database_url(tmp_path))
    url = request.getfixturevalue("postgres_url")
    schema_free = QCRecords(url)
    from sitebench.qc.records import metadata

    metadata.drop_all(schema_free.engine)  # each test starts from empty tables
    return QCRecords(url)


def test_site_status_counts_rescans_open_deviations_and_drift(records):
    event = DriftEvent(site="S02", scanner="GE|x|t1w", series_uid="c1", parameter="SoftwareVersions",
                       baseline="27", observed="30", kind="software", change="changed", first_seen="2026-11-28",
                       baseline_series_uid="b0")
    # S01: study A failed, re-scanned and passed (deviation resolved); study B warns (open)
    records.record_outcome(outcome("a1", "A", "fail", deviations=[TR]))
    records.record_outcome(outcome("a2", "A", "pass"))
    records.record_outcome(outcome("b1", "B", "warn", deviations=[TR, TR]))
    # S02: one pass with a drift event, one unmatched; a rejected file
    records.record_outcome(outcome("c1", "C", "pass", site="S02", drift=[event]))
    records.record_outcome(SeriesOutcome(series_key="d1", site="S02", status="unmatched", n_files=3))
    records.record_file(sha256="f" * 64, size=4, stored_path="objects/S02/ff/x", site="S02", source="http",
                        transfer="t", series_key=None, study_key=None, problems=["not a DICOM file"])
    s01, s02 = records.site_status()
    assert (s01.series, s01.passed, s01.failed, s01.warned) == (3, 1, 1, 1)
    assert s01.rescans == 1 and abs(s01.rescan_rate - 1 / 3) < 1e-12
    assert s01.open_deviations == 2  # a1's TR deviation was resolved by the passing re-scan a2
    assert (s02.series, s02.passed, s02.unmatched, s02.drift_events, s02.rejected_files) == (2, 1, 1, 1, 1)
    # a re-check of the same series replaces its verdict as "latest"
    records.record_outcome(outcome("b1", "B", "pass"))
    assert records.site_status()[0].open_deviations == 0
    # resending the same bytes is counted, not duplicated
    assert records.record_file(sha256="f" * 64, size=4, stored_path="objects/S02/ff/x", site="S02", source="http",
                               transfer="t2", series_key=None, study_key=None, problems=[]) is False
    assert records.file_count() == 1


def _received(records: QCRecords, sha: str, site: str = "S01") -> None:
    assert records.record_received(sha256=sha, size=4, stored_path=f"objects/{site}/{sha[:2]}/{sha}", site=site,
                                   source="dicom", transfer="t1")


def test_series_belong_to_their_site_and_other_bytes_are_a_conflict(records):
    """record_index's rules on both databases: cross-site quarantine, repair by a clean resend, conflict."""
    index = dict(study_key="st", header_summary={"frames": []})
    _received(records, "a" * 64)
    assert records.record_index(sha256="a" * 64, site="S01", series_key="ser", sop_key="i1", problems=["truncated"],
                                **index).status == "stored"
    _received(records, "b" * 64)  # a clean resend of the damaged instance replaces it
    result = records.record_index(sha256="b" * 64, site="S01", series_key="ser", sop_key="i1", problems=[], **index)
    assert result.status == "stored" and result.replaced == ["a" * 64]
    assert [p for _, p, _ in records.series_files("ser")] == [[]]
    _received(records, "c" * 64, site="S02")  # another site's copy of that instance changes nothing of S01's
    result = records.record_index(sha256="c" * 64, site="S02", series_key="other", sop_key="i1", problems=[], **index)
    assert result.status == "quarantined" and "another site" in result.reason
    _received(records, "d" * 64, site="S02")  # nor does a file of S02 joining S01's series
    assert records.record_index(sha256="d" * 64, site="S02", series_key="ser", sop_key="i9", problems=[],
                                **index).status == "quarantined"
    assert len(records.series_files("ser")) == 1 and records.series_site("ser") == "S01"
    _received(records, "e" * 64)  # two clean copies that differ: a conflict, both kept
    result = records.record_index(sha256="e" * 64, site="S01", series_key="ser", sop_key="i1", problems=[],
                                  instance_number=7, **index)
    assert result.status == "conflict" and result.conflict_with == "b" * 64
    assert all(any("conflict" in p for p in problems) for _, problems, _ in records.series_files("ser"))
    status = {s.site: s for s in records.site_status()}
    assert status["S01"].conflicts == 1 and status["S02"].quarantined_files == 2
    resolved = records.resolve_conflict("bbbb")
    assert resolved["kept"] == "b" * 64 and resolved["superseded"] == ["e" * 64]
    assert [p for _, p, _ in records.series_files("ser")] == [[]] and records.conflicts() == []
    with pytest.raises(Exception, match="not in an unresolved conflict"):
        records.resolve_conflict("b" * 64)


def test_failed_indexing_and_checks_back_off_then_quarantine(records):
    _received(records, "f" * 64)
    assert records.index_failed("f" * 64, "could not be indexed: OSError", max_attempts=2) is False
    assert records.unindexed(due_only=True) == []  # waiting for its backed-off retry
    assert records.index_failed("f" * 64, "could not be indexed: OSError", max_attempts=2) is True
    assert records.unindexed() == [] and records.file_state("f" * 64)["quarantine"].endswith("OSError")
    _received(records, "1" * 64)
    records.record_index(sha256="1" * 64, site="S01", series_key="s", study_key=None, sop_key="x", problems=[],
                         header_summary=None)
    assert records.check_failed("s", "boom", max_attempts=2) is False
    assert records.check_failed("s", "boom", max_attempts=2) is True
    assert records.open_series() == [] and records.site_status()[0].quarantined_series == 1
    records.begin_transfer("t-cut", "S01", "dicom", "S01_MR1")
    (cut,) = records.interrupted_transfers()
    assert cut["transfer"] == "t-cut" and cut["files"] == 0


def test_an_older_database_gains_the_new_columns(tmp_path):
    import sqlalchemy

    url = database_url(tmp_path)
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:  # received_files as the first release made it
        conn.execute(sqlalchemy.text(
            "CREATE TABLE received_files (id INTEGER PRIMARY KEY, sha256 VARCHAR(64) NOT NULL UNIQUE, "
            "size BIGINT NOT NULL, stored_path TEXT NOT NULL, site VARCHAR(64) NOT NULL, source VARCHAR(16) NOT NULL, "
            "transfer VARCHAR(64) NOT NULL, series_key VARCHAR(32), sop_key VARCHAR(32), problems TEXT NOT NULL, "
            "header_summary TEXT, indexed BOOLEAN NOT NULL, first_received_utc VARCHAR(40) NOT NULL, "
            "times_received INTEGER NOT NULL)"))
        conn.execute(sqlalchemy.text(
            "INSERT INTO received_files (sha256, size, stored_path, site, source, transfer, problems, indexed, "
            "first_received_utc, times_received) VALUES ('" + "9" * 64 + "', 1, 'x', 'S01', 'dicom', 't', '[]', 1, "
            "'2026-01-01T00:00:00+00:00', 1)"))
    records = QCRecords(url)
    state = records.file_state("9" * 64)
    assert state["attempts"] == 0 and state["conflict"] in (0, False) and state["quarantine"] is None
    _received(records, "8" * 64)
    index_names = {i["name"] for i in sqlalchemy.inspect(records.engine).get_indexes("received_files")}
    assert any("sop_key" in name for name in index_names)
    assert "ix_received_files_site_received" in index_names  # an older store gains the per-site index too
    assert records.last_received_by_site(["S01", "S02"])["S01"] >= "2026-01-01T00:00:00+00:00"


def test_each_sites_last_upload_is_its_newest_file(records):
    import time

    assert records.last_received_by_site(["S01", "S02"]) == {}
    for i, site in enumerate(["S01", "S02", "S01"]):
        records.record_received(sha256=f"{i}" * 64, size=1, stored_path=f"x{i}", site=site, source="http",
                                transfer=f"t{i}")
        time.sleep(1.1)  # the times are ISO seconds
    last = records.last_received_by_site(["S01", "S02", "S03"])
    assert set(last) == {"S01", "S02"} and last["S01"] > last["S02"]


def test_upload_to_verdict_times_are_read_out_of_each_latest_verdict(records):
    """The database reads the one number out of the JSON (SQLite json_extract, PostgreSQL ->>)."""
    for key, seconds in (("a", {"header": 0.2, "upload_to_verdict": 4.5}), ("b", {"header": 0.1}), ("c", {})):
        done = outcome(key * 20, key, "pass", site="S02" if key == "c" else "S01")
        done.seconds = seconds
        records.record_outcome(done)
    timing = sorted(records.verdict_timing(), key=lambda t: (t[0], t[2] is None))
    assert [(site, wait) for site, _, wait in timing] == [("S01", 4.5), ("S01", None), ("S02", None)]
    assert all(checked for _, checked, _ in timing)
