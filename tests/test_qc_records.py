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
