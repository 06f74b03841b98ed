"""`sitebench qc` as a site physicist runs it, on a real GE 3D T1 series (dcm_qa_deident)."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from conftest import run_cli

DICOM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
T1 = DICOM / "dcm_qa_deident" / "In"

pytestmark = pytest.mark.skipif(not T1.exists(), reason="needs ../shared/data/dicom")


def test_inspect_draft_lock_check(tmp_path):
    inspect = run_cli("qc", "inspect", T1, "--json")
    assert inspect.returncode == 0, inspect.stderr
    (record,) = json.loads(inspect.stdout)  # one document: a list with one record per series
    assert record["n_files"] == 196 and record["Manufacturer"] == "GE" and record["MRAcquisitionType"] == "3D"
    first = pydicom.dcmread(next(T1.iterdir()), stop_before_pixels=True)
    for keyword in ("PatientName", "PatientID"):
        value = str(first.get(keyword, "")).strip()
        if value:
            assert keyword in record["_phi_attributes_present"]
            assert value not in inspect.stdout  # reported by name only

    draft = tmp_path / "t1.yaml"
    assert run_cli("qc", "protocol", "init", T1, "--out", draft, "--name", "ge-t1w").returncode == 0
    again = run_cli("qc", "protocol", "init", T1, "--out", draft)
    assert again.returncode == 2 and "never overwritten" in again.stderr

    trail = tmp_path / "audit.jsonl"
    lock = run_cli("qc", "protocol", "lock", draft, "--who", "A. Physicist", "--why", "qualification",
                   "--lock-dir", tmp_path / "locked", "--json", "--audit", trail)
    assert lock.returncode == 0, lock.stderr
    locked_info = json.loads(lock.stdout)
    assert locked_info["created"] and len(locked_info["content_sha256"]) == 64
    audit = locked_info["audit_record"]
    assert audit["who"] == "A. Physicist" and audit["what"] == "protocol locked"
    locked = tmp_path / "locked" / "ge-t1w.v1.locked.yaml"
    assert run_cli("audit", "verify", trail).returncode == 0
    line = trail.read_text()
    trail.write_text(line.replace("qualification", "qualificatiom"))  # an edited record
    tampered = run_cli("audit", "verify", trail)
    assert tampered.returncode == 1 and "seq 0" in tampered.stdout

    passed = run_cli("qc", "check", T1, "--protocol", locked, "--json")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert json.loads(passed.stdout)[0]["status"] == "pass"

    # an EPI series is not this protocol's series: it fails, and the exit code says so
    epi = next(p for p in (DICOM / "dcm_qa_nih" / "In").iterdir() if p.is_dir())
    failed = run_cli("qc", "check", epi, "--protocol", locked, "--json")
    assert failed.returncode == 1
    assert all(v["status"] == "fail" for v in json.loads(failed.stdout))

    # a locked protocol edited in place is refused
    locked.chmod(0o644)
    locked.write_text(locked.read_text().replace("min_mm:", "min_mm: 1 #", 1))
    edited = run_cli("qc", "check", T1, "--protocol", locked)
    assert edited.returncode == 2 and "Traceback" not in edited.stderr and locked.name in edited.stderr


def test_inspect_on_a_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("not DICOM")
    result = run_cli("qc", "inspect", tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr and str(tmp_path) in result.stderr


def test_iqm_on_a_simulated_scan(small_trial):
    row = small_trial.manifest.iloc[0]
    result = run_cli("qc", "iqm", small_trial.out_dir / row.image_path, "--labels",
                     small_trial.out_dir / row.label_path, "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["snr_wm"] > 1 and 0 < metrics["efc"] < 1 and metrics["cjv"] > 0
