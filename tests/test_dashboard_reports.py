"""The reports page and the re-validation column: locked reports under a real reports folder,
listed for a reader (who sees nothing else), through a real gate serving the dashboard."""

from __future__ import annotations

import json
from functools import partial

import pytest
import requests
from test_qc_stow import T1, free_port

from sitebench.dashboard import mount
from sitebench.errors import SitebenchError
from sitebench.qc.intake import IntakeConfig, IntakeService
from sitebench.reports.lock import write_lock

pytestmark = pytest.mark.skipif(not T1.exists(), reason="needs ../shared/data/dicom")


def test_a_reader_sees_the_reports_and_nothing_of_the_sites(tmp_path, t1_protocols):
    report = tmp_path / "reports" / "hippocampus" / "v001"
    report.mkdir(parents=True)
    (report / "report.html").write_text("<html><h1>validation</h1></html>")
    (tmp_path / "model.pt").write_bytes(b"weights")
    write_lock(report, {"report.html": report / "report.html"}, {"weights m": tmp_path / "model.pt"},
               {"name": "hippocampus", "version": 1,
                "mlflow_run": {"tracking_uri": "sqlite:///m.db", "experiment_id": "3", "run_id": "0a1b2c3d4e5f6071"}},
               {"seed": 0})
    port = free_port()
    config = IntakeConfig.model_validate({
        "store": tmp_path / "store", "protocols": t1_protocols, "dicom": None, "folder": None,
        "http": {"host": "127.0.0.1", "port": port}, "sites": {"S01": {}, "S02": {}}})
    service = IntakeService(config)
    service.http_extensions = [partial(mount, reports_root=tmp_path / "reports", mlflow_ui="http://mlflow.trial:5000/")]
    reader, monitor = service.users.create("stats", "reader"), service.users.create("monitor", "central_monitor")
    service.start()
    url = f"http://127.0.0.1:{port}"
    try:
        session = requests.Session()
        landed = session.post(f"{url}/login", data={"token": reader}, timeout=10)
        assert landed.url.endswith("/reports") and "report hippocampus v001" in landed.text
        assert "sign-offs cannot be checked" in landed.text  # no public key given: nothing counts as signed
        assert 'href="http://mlflow.trial:5000/#/experiments/3/runs/0a1b2c3d4e5f6071"' in landed.text
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


def test_only_an_http_mlflow_ui_is_linked():
    from sitebench.dashboard.app import mlflow_run_url

    run = {"tracking_uri": "sqlite:///m.db", "experiment_id": "1", "run_id": "ab/../c"}
    assert mlflow_run_url("https://ml.example", run) == "https://ml.example/#/experiments/1/runs/ab%2F..%2Fc"
    assert mlflow_run_url(None, run) is None and mlflow_run_url("https://ml.example", None) is None
    with pytest.raises(SitebenchError, match="http:// or https://"):
        mlflow_run_url("javascript:alert(1)", run)


def test_the_site_page_charts_a_biomarker_the_reports_locked_for_monitors_not_for_site_staff(tmp_path, t1_protocols):
    """The real T1 checked once by the real gate, recorded as 24 series of one scanner; a locked report's
    predictions table holds a biomarker for them, stepping up from series 20 (the truth)."""
    import dataclasses

    from sitebench.qc.gate import Gate
    from sitebench.qc.protocol import load_protocol

    (protocol_path,) = sorted(t1_protocols.glob("*.yaml"))
    (checked,) = Gate([load_protocol(protocol_path)], image_quality=False).check_files(sorted(T1.iterdir()), site="S01")
    port = free_port()
    config = IntakeConfig.model_validate({
        "store": tmp_path / "store", "protocols": t1_protocols, "dicom": None, "folder": None,
        "http": {"host": "127.0.0.1", "port": port}, "sites": {"S01": {}}})
    service = IntakeService(config)
    keys = [f"{i:04d}" + checked.series_key[4:] for i in range(24)]
    for key in keys:
        service.records.record_outcome(dataclasses.replace(checked, series_key=key))
    report = tmp_path / "reports" / "hippocampus" / "v001"
    (report / "tables").mkdir(parents=True)
    rows = [f"{key},seg@1.0,hippocampus_ml,{3.5 + (0.01 * (i % 3)) + (0.5 if i >= 20 else 0):.3f}"
            for i, key in enumerate(keys)]
    (report / "tables" / "predictions.csv").write_text("scan_id,model_key,biomarker,prediction\n" + "\n".join(rows))
    (tmp_path / "model.pt").write_bytes(b"weights")
    write_lock(report, {"table:predictions": report / "tables" / "predictions.csv"}, {"weights": tmp_path / "model.pt"},
               {"name": "hippocampus", "version": 1}, {"seed": 0})
    service.http_extensions = [partial(mount, reports_root=tmp_path / "reports")]
    monitor = service.users.create("monitor", "central_monitor")
    coordinator = service.users.create("coord", "site_coordinator", site="S01")
    service.start()
    url = f"http://127.0.0.1:{port}"
    try:
        pages = {}
        for name, token in (("monitor", monitor), ("coordinator", coordinator)):
            session = requests.Session()
            session.post(f"{url}/login", data={"token": token}, timeout=10)
            pages[name] = session.get(f"{url}/sites/S01", timeout=10).text
    finally:
        service.stop()
    assert "hippocampus_ml · seg@1.0" in pages["monitor"] and 'class="chart-biomarker"' in pages["monitor"]
    chart = pages["monitor"].split("hippocampus_ml · seg@1.0")[1].split("<h3")[0]
    flagged = chart.split('class="chart-flags"')[1].split("</p>")[0]
    assert [key[:12] for key in keys[20:]] == [k for k in (key[:12] for key in keys) if f">{k}</a>" in flagged]
    assert "hippocampus_ml" not in pages["coordinator"] and "Site S01" in pages["coordinator"]


def test_predictions_tables_that_cannot_be_read_are_one_line_at_start_or_left_out(tmp_path, t1_protocols):
    from conftest import run_cli

    from sitebench.dashboard.biomarkers import BiomarkerValues

    good = tmp_path / "reports" / "gm" / "v001"
    bad = tmp_path / "reports" / "gm" / "v002"
    for folder, text in ((good, "scan_id,model_key,biomarker,prediction\nabc,m@1,gm_ml,612.5\nabd,m@1,gm_ml,seg.nii.gz\n"),
                         (bad, "scan_id,weights\nabc,1\n")):
        (folder / "tables").mkdir(parents=True)
        (folder / "tables" / "predictions.csv").write_text(text)
        write_lock(folder, {"table:predictions": folder / "tables" / "predictions.csv"}, {}, {"name": "gm"}, {})
    values = BiomarkerValues(tmp_path / "reports")
    assert values.for_series(["abc", "abd", "zzz"]) == {"abc": {"gm_ml · m@1": 612.5}}  # v002 left out
    with pytest.raises(SitebenchError, match="needs scan_id, model_key and prediction"):
        BiomarkerValues(None, [bad / "tables" / "predictions.csv"])
    config = tmp_path / "intake.yaml"
    config.write_text(f"store: {tmp_path / 'store'}\nprotocols: {t1_protocols}\nsites: {{S01: {{}}}}\n"
                      f"dicom: null\nhttp: {{host: 127.0.0.1, port: {free_port()}}}\n")
    done = run_cli("qc", "serve", "--config", config, "--predictions", bad / "tables" / "predictions.csv", timeout=60)
    assert done.returncode == 2 and "needs scan_id" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    done = run_cli("qc", "serve", "--config", config, "--mlflow-ui", "javascript:alert(1)", timeout=60)
    assert done.returncode == 2 and "http:// or https://" in done.stderr and "Traceback" not in done.stderr
