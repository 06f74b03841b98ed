"""Expected against received: a visit schedule CSV against real uploads coded with the DICOM
Clinical Trial Subject module, through a real `sitebench qc serve`, its dashboard and its alerts."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pydicom
import pytest
import requests
from test_qc_notify import Mailbox
from test_qc_queries import upload, user, wait_for
from test_qc_stow import T1, Service

from sitebench.errors import SitebenchError
from sitebench.qc.gate import Pseudonyms
from sitebench.qc.visits import load_schedule, reconcile

pytestmark = pytest.mark.skipif(not T1.exists(), reason="needs ../shared/data/dicom")
TODAY = dt.datetime.now(dt.timezone.utc).date()


@pytest.fixture(scope="module")
def protocols(t1_protocols):
    return t1_protocols


def schedule(path: Path, rows: list[tuple]) -> Path:
    path.write_text("site,subject,visit,window_start,window_end\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def test_the_schedule_is_checked_row_by_row(tmp_path):
    bad = {"site,subject,visit,window_start\nS01,A,V1,2026-01-01\n": "lacks the column.s. window_end",
           "site,subject,visit,window_start,window_end\nS01,A,V1,2026-13-01,2026-12-01\n": "row 2: window dates",
           "site,subject,visit,window_start,window_end\nS01,A,V1,2026-02-01,2026-01-01\n": "before window_start",
           "site,subject,visit,window_start,window_end\nS01,,V1,2026-01-01,2026-01-02\n": "must not be empty"}
    for text, message in bad.items():
        (tmp_path / "s.csv").write_text(text)
        with pytest.raises(SitebenchError, match=message):
            load_schedule(tmp_path / "s.csv")
    with pytest.raises(SitebenchError, match="cannot read"):
        load_schedule(tmp_path / "none.csv")


def test_each_visit_gets_its_status():
    keyed = Pseudonyms(b"k" * 32)
    day = dt.date(2026, 6, 15)
    visits = load_schedule_rows([("S01", "A", "V1", "2026-06-01", "2026-06-10"), ("S01", "B", "V1", "2026-06-01", "2026-06-10"),
                                 ("S01", "C", "V1", "2026-06-01", "2026-06-10"), ("S01", "D", "V2", "2026-06-10", "2026-06-20"),
                                 ("S01", "E", "V3", "2026-07-01", "2026-07-10"), ("S02", "A", "V1", "2026-06-01", "2026-06-10")])
    verdicts = [{"site": "S01", "subject_key": keyed("A"), "timepoint": "V1", "checked_utc": "2026-06-05T10:00:00+00:00",
                 "series_key": "s1", "status": "pass"},
                {"site": "S01", "subject_key": keyed("B"), "timepoint": "V1", "checked_utc": "2026-06-12T10:00:00+00:00",
                 "series_key": "s2", "status": "fail"},
                {"site": "S01", "subject_key": keyed("C"), "timepoint": "V2", "checked_utc": "2026-06-05T10:00:00+00:00",
                 "series_key": "s3", "status": "pass"}]  # C came for another visit
    rows = reconcile(visits, verdicts, keyed, today=day)
    assert [r["status"] for r in rows] == ["received", "late", "overdue", "due", "upcoming", "overdue"]
    assert rows[0]["series"] == [{"series_key": "s1", "verdict": "pass"}] and rows[2]["days_overdue"] == 5


def load_schedule_rows(rows, folder=None):
    import tempfile

    folder = Path(folder or tempfile.mkdtemp())
    return load_schedule(schedule(folder / "schedule.csv", rows))


def coded_series(out: Path, subject: str, visit: str) -> list[bytes]:
    """The T1 series as a new series, coded with the Clinical Trial Subject module."""
    out.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    parts = []
    for i, path in enumerate(sorted(T1.iterdir())):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.SOPInstanceUID = series_uid, study_uid, pydicom.uid.generate_uid()
        ds.ClinicalTrialSubjectID, ds.ClinicalTrialTimePointID = subject, visit
        ds.save_as(out / f"{i:04d}.dcm", enforce_file_format=True)
        parts.append((out / f"{i:04d}.dcm").read_bytes())
    return parts


def test_expected_against_received_on_the_dashboard_and_by_alert(tmp_path, protocols):
    day = dt.timedelta(days=1)
    plan = schedule(tmp_path / "visits.csv", [
        ("S01", "SUBJ-001", "V1", TODAY - 2 * day, TODAY + 2 * day),   # arrives now: received
        ("S01", "SUBJ-002", "V1", TODAY - 20 * day, TODAY - 6 * day),  # never sent: overdue by 6 days
        ("S01", "SUBJ-003", "V2", TODAY + 10 * day, TODAY + 20 * day),  # upcoming
        ("S02", "SUBJ-101", "V1", TODAY - 2 * day, TODAY + 2 * day)])   # another site's: due
    mailbox = Mailbox()
    alerts = {"smtp": {"host": "127.0.0.1", "port": mailbox.port}, "backoff_s": 0,
              "routes": [{"kinds": ["visit_overdue"], "sites": ["S01"], "email": ["coord-s01@site.example"]}]}
    svc = Service(tmp_path, protocols, http={"max_requests_per_minute": 100000}, visit_schedule=str(plan), alerts=alerts)
    tokens = {"up": user(svc, "up-s01", "site_uploader", "S01"), "monitor": user(svc, "monitor", "central_monitor"),
              "coord2": user(svc, "coord-s02", "site_coordinator", "S02")}
    svc.start()
    try:
        upload(svc, "S01", coded_series(tmp_path / "subj1", "SUBJ-001", "V1"), tokens["up"])
        assert wait_for(lambda: svc.records.latest_verdicts("S01"))
        monitor = requests.Session()
        assert monitor.post(f"{svc.url}/login", data={"token": tokens["monitor"]}, timeout=10).status_code == 200
        page = monitor.get(f"{svc.url}/sites/S01/visits", timeout=10).text
        rows = {line.split("<td>")[1].split("</td>")[0]: line for line in page.split("<tr>")[2:]}
        assert "received" in rows["SUBJ-001"] and "(pass)" in rows["SUBJ-001"]
        assert "overdue by 6 days" in rows["SUBJ-002"] and "upcoming" in rows["SUBJ-003"]
        assert "SUBJ-101" not in page
        overview = monitor.get(f"{svc.url}/", timeout=10).text
        assert "<th>Overdue visits</th>" in overview
        coord2 = requests.Session()
        coord2.post(f"{svc.url}/login", data={"token": tokens["coord2"]}, timeout=10)
        assert coord2.get(f"{svc.url}/sites/S01/visits", timeout=10).status_code == 403
        assert wait_for(lambda: mailbox.messages, timeout=30)
        (recipients, content), = mailbox.messages
        text = content.decode()
        assert recipients == ["coord-s01@site.example"] and "visit V1" in text and "6 days past its window" in text
        assert "SUBJ-00" not in text  # the subject code itself never leaves in an alert
    finally:
        svc.stop()
        mailbox.stop()
    stored = (svc.store / "qc.db").read_bytes() + (svc.store / "audit.jsonl").read_bytes()
    assert b"SUBJ-001" not in stored  # only its keyed pseudonym is kept
