"""`sitebench qc` as a site physicist runs it, on a real GE 3D T1 series (dcm_qa_deident)."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import yaml
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


# --------------------------------------------------------------------------- qc check --baseline, default names

STC = DICOM / "dcm_qa_stc" / "In"
D13_ASC = STC / "Siemens" / "D13" / "ep2d_Asc_2"  # syngo MR D13D
D13_ASC_HF = STC / "Siemens" / "D13" / "ep2d_Asc_HF_10"  # the same scanner and software
E11_REST = STC / "Siemens" / "E11" / "7_Rest_fMRI_AP"  # the same scanner (serial) after the E11 upgrade
GE_DV24 = STC / "GE" / "RTIA" / "2_epiRT_ascending"
GE_DV24_SAME = STC / "GE" / "TriggerTime" / "4_epi_ascending"  # same scanner, same DV24 software
GE_DV26 = STC / "GE" / "ProtocolDataBlock" / "mr_0004"  # DV26, another scanner
needs_stc = pytest.mark.skipif(not D13_ASC.exists(), reason="needs dcm_qa_stc")


def _drift(result) -> list[dict]:
    assert result.returncode in (0, 1), result.stderr
    (outcome,) = json.loads(result.stdout)
    return outcome["drift"]


@needs_stc
def test_check_with_a_dicom_baseline_reports_a_software_upgrade_and_not_the_same_software(tmp_path):
    protocol = tmp_path / "bold.yaml"
    assert run_cli("qc", "protocol", "init", D13_ASC, "--out", protocol).returncode == 0
    upgraded = _drift(run_cli("qc", "check", E11_REST, "--protocol", protocol, "--baseline", D13_ASC, "--json"))
    software = [e for e in upgraded if e["parameter"] == "SoftwareVersions"]
    assert software and software[0]["kind"] == "software" and software[0]["change"] == "changed"
    assert (software[0]["baseline"], software[0]["observed"]) == ("syngo MR D13D", "syngo MR E11")
    # the other differences follow the upgrade; the coil keeps its own kind (hardware)
    assert {e["kind"] for e in upgraded} <= {"software", "coil"}
    same = _drift(run_cli("qc", "check", D13_ASC_HF, "--protocol", protocol, "--baseline", D13_ASC, "--json"))
    assert not [e for e in same if e["kind"] == "software"]
    itself = _drift(run_cli("qc", "check", D13_ASC, "--protocol", protocol, "--baseline", D13_ASC, "--json"))
    assert itself == []
    text = run_cli("qc", "check", E11_REST, "--protocol", protocol, "--baseline", D13_ASC)
    assert text.returncode == 1 and "DRIFT[software] SoftwareVersions changed: 'syngo MR D13D' -> 'syngo MR E11'" \
        in text.stdout
    quiet = run_cli("qc", "check", D13_ASC, "--protocol", protocol, "--baseline", D13_ASC)
    assert "no drift against the baseline" in quiet.stdout


@needs_stc
def test_check_with_a_json_baseline_from_inspect(tmp_path):
    protocol = tmp_path / "bold.yaml"
    assert run_cli("qc", "protocol", "init", GE_DV24, "--out", protocol).returncode == 0
    inspect = run_cli("qc", "inspect", GE_DV24, "--json")
    assert inspect.returncode == 0, inspect.stderr
    baseline = tmp_path / "baseline.json"
    baseline.write_text(inspect.stdout)
    same = _drift(run_cli("qc", "check", GE_DV24_SAME, "--protocol", protocol, "--baseline", baseline, "--json"))
    assert not [e for e in same if e["kind"] in ("software", "scanner")]
    # DV26 on another scanner: a new scanner, raised as such (its own baseline comes later)
    other = _drift(run_cli("qc", "check", GE_DV26, "--protocol", protocol, "--baseline", baseline, "--json"))
    assert [e["kind"] for e in other] == ["scanner"]
    # a JSON baseline without the scanner pseudonym stands for the checked series' scanner
    (record,) = json.loads(inspect.stdout)
    record.pop("_scanner_id")
    anonymous = tmp_path / "anonymous.json"
    anonymous.write_text(json.dumps(record))
    upgraded = _drift(run_cli("qc", "check", GE_DV26, "--protocol", protocol, "--baseline", anonymous, "--json"))
    software = [e for e in upgraded if e["parameter"] == "SoftwareVersions"]
    assert software and software[0]["kind"] == "software"


@needs_stc
def test_bad_baselines_are_one_line_errors(tmp_path):
    protocol = tmp_path / "bold.yaml"
    assert run_cli("qc", "protocol", "init", GE_DV24, "--out", protocol).returncode == 0
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    two = tmp_path / "two.json"
    two.write_text(json.dumps([{"Manufacturer": "GE"}, {"Manufacturer": "GE"}]))
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"RepetitionTime": 2}))
    for path, words in ((tmp_path / "absent", "does not exist"), (broken, "not readable JSON"),
                        (two, "2 series records"), (empty, "Manufacturer"), (STC / "GE", "series")):
        result = run_cli("qc", "check", GE_DV24, "--protocol", protocol, "--baseline", path)
        assert result.returncode == 2, (path, result.stdout, result.stderr)
        assert words in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_protocol_init_names_the_protocol_after_the_series(tmp_path):
    cases = {T1: "t1w-3d",
             DICOM / "dcm_qa_xa30" / "In" / "7_func-bold_task-fa_run-1": "bold",
             DICOM.parent / "dicom-more" / "dcm_qa_ge" / "In" / "01_Ax_DWI_TENSOR_R2": "dwi",
             DICOM.parent / "dicom-more" / "dcm_qa_philips" / "In" / "Vanderbilt_2018" / "601_WIP_dti_ax": "dwi",
             DICOM / "dcm_qa_xa30" / "In" / "9_gre_field_mapping": "gre_field_mapping"}
    for index, (series, name) in enumerate(cases.items()):
        if not series.exists():
            pytest.skip(f"{series} not present")
        out = tmp_path / f"{index}.yaml"
        result = run_cli("qc", "protocol", "init", series, "--out", out)
        assert result.returncode == 0, result.stderr
        assert f"draft protocol '{name}'" in result.stdout
        assert yaml.safe_load(out.read_text())["name"] == name
    named = run_cli("qc", "protocol", "init", T1, "--out", tmp_path / "named.yaml", "--name", "my-t1")
    assert "'my-t1'" in named.stdout


def test_inspect_keeps_heavy_modules_out_of_its_process():
    """`qc inspect` reads headers with our reader and the standard library: no pydicom, numpy,
    OpenSSL-backed hashlib or logging on any vendor's series (each costs it time and memory that
    the goal of dcm2niix's time and 1.5x its memory cannot spare; perf/bench_gate.py --inspect-only)."""
    import subprocess
    import sys

    data = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    trees = [p for tree in ("dicom", "dicom-more") for p in sorted((data / tree).iterdir()) if p.is_dir()]
    if not trees:
        pytest.skip("needs ../shared/data/dicom")
    code = ("import contextlib, io, sys\n"
            "from sitebench.cli import main\n"
            "for tree in sys.argv[1:]:\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        assert main(['qc', 'inspect', tree, '--json']) == 0, tree\n"
            "    assert out.getvalue().startswith('['), tree\n"
            "print(sorted(m for m in ('pydicom', 'numpy', '_hashlib', 'logging') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code, *map(str, trees)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_scanner_pseudonym_digest_is_sha256():
    import hashlib

    from sitebench.qc.dicom_params import _sha256_hex

    for data in (b"", b"SN 12345", "Ströme".encode(), bytes(range(256)) * 40):
        assert _sha256_hex(data) == hashlib.sha256(data).hexdigest()
