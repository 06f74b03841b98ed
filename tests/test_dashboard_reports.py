"""The reports page and the re-validation column: locked reports under a real reports folder,
listed for a reader (who sees nothing else), through a real gate serving the dashboard."""

from __future__ import annotations

import json
from functools import partial

import pytest
import requests
from test_qc_stow import T1, free_port

from sitebench.dashboard import mount
from sitebench.qc.intake import IntakeConfig, IntakeService
from sitebench.reports.lock import write_lock

pytestmark = pytest.mark.skipif(not T1.exists(), reason="needs ../shared/data/dicom")


def test_a_reader_sees_the_reports_and_nothing_of_the_sites(tmp_path, t1_protocols):
    report = tmp_path / "reports" / "hippocampus" / "v001"
    report.mkdir(parents=True)
    (report / "report.html").write_text("<html><h1>validation</h1></html>")
    (tmp_path / "model.pt").write_bytes(b"weights")
    write_lock(report, {"report.html": report / "report.html"}, {"weights m": tmp_path / "model.pt"},
               {"name": "hippocampus", "version": 1}, {"seed": 0})
    port = free_port()
    config = IntakeConfig.model_validate({
        "store": tmp_path / "store", "protocols": t1_protocols, "dicom": None, "folder": None,
        "http": {"host": "127.0.0.1", "port": port}, "sites": {"S01": {}, "S02": {}}})
    service = IntakeService(config)
    service.http_extensions = [partial(mount, reports_root=tmp_path / "reports")]
    reader, monitor = service.users.create("stats", "reader"), service.users.create("monitor", "central_monitor")
    service.start()
    url = f"http://127.0.0.1:{port}"
    try:
        session = requests.Session()
        landed = session.post(f"{url}/login", data={"token": reader}, timeout=10)
        assert landed.url.endswith("/reports") and "report hippocampus v001" in landed.text
        assert "sign-offs cannot be checked" in landed.text  # no public key given: nothing counts as signed
        assert session.get(f"{url}/sites/S01", timeout=10).status_code == 403
        assert session.get(f"{url}/", timeout=10).url.endswith("/reports")
        watcher = requests.Session()
        overview = watcher.post(f"{url}/login", data={"token": monitor}, timeout=10).text
        assert "<th>Re-validation</th>" in overview and "pending" not in overview.split("<th>Re-validation</th>")[1]
        assert watcher.get(f"{url}/reports", timeout=10).status_code == 200
    finally:
        service.stop()
    trail = [json.loads(line) for line in (tmp_path / "store" / "audit.jsonl").read_text().splitlines()]
    assert any(r["what"] == "access refused" and r["details"]["user"] == "stats" and r["subject"] == "site page S01"
               for r in trail)
