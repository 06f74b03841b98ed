"""The command line as a user runs it: one-line errors, exit codes, and the demo end to end."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html import escape as html_escape
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from sitebench.datasets import manifest as mf
from sitebench.qc.records import QCRecords, database_url
from conftest import run_cli



def assert_clean_error(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("sitebench: error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("demo", "simulate", "benchmark", "report", "manifest"):
        assert command in result.stdout
    assert "--scheduler" in run_cli("benchmark", "run", "--help").stdout


@pytest.fixture
def trial_copy(small_trial, tmp_path):
    shutil.copytree(small_trial.out_dir, tmp_path / "trial")
    spec = {"name": "t", "manifest": "manifest.csv", "reference": "gm_volume_ml",
            "models": [{"source": "classical"}], "bootstrap": 50}
    (tmp_path / "trial" / "spec.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "trial"


def _edit_manifest(trial, edit):
    table = mf.read_table(trial / "manifest.csv")
    table = edit(table)
    table.to_csv(trial / "manifest.csv", index=False)


def test_missing_column(trial_copy):
    _edit_manifest(trial_copy, lambda t: t.drop(columns=["vendor"]))
    for args in (("manifest", "validate", trial_copy / "manifest.csv"),
                 ("benchmark", "run", trial_copy / "spec.yaml", "--workers", "1")):
        assert_clean_error(run_cli(*args), "manifest.csv", "missing column(s): vendor")


def test_duplicate_scan_id(trial_copy):
    _edit_manifest(trial_copy, lambda t: t.assign(scan_id=[t.scan_id[1]] + list(t.scan_id[1:])))
    assert_clean_error(run_cli("benchmark", "run", trial_copy / "spec.yaml"), "manifest.csv", "duplicate scan_id")


def test_path_that_does_not_exist(trial_copy):
    _edit_manifest(trial_copy, lambda t: t.assign(image_path=["images/nowhere.nii.gz"] + list(t.image_path[1:])))
    assert_clean_error(run_cli("benchmark", "run", trial_copy / "spec.yaml"), "manifest.csv",
                       "images/nowhere.nii.gz", "does not exist")


@pytest.mark.slow
def test_corrupt_nifti_keeps_what_was_written(trial_copy):
    from sitebench.provenance import sha256_file

    spec = yaml.safe_load((trial_copy / "spec.yaml").read_text())
    victim_row = -1
    table = mf.read_table(trial_copy / "manifest.csv")
    victim = trial_copy / table.image_path.iloc[victim_row]
    victim.write_bytes(b"this is not a NIfTI file")
    table.loc[table.index[victim_row], "image_sha256"] = sha256_file(victim)
    table.to_csv(trial_copy / "manifest.csv", index=False)
    (trial_copy / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = run_cli("benchmark", "run", trial_copy / "spec.yaml", "--workers", "1", "--no-progress")
    assert_clean_error(result, victim.name, "not a readable NIfTI")
    kept = pd.read_csv(trial_copy / "results" / "predictions.csv")
    assert len(kept) >= 16


def test_model_file_whose_hash_does_not_match(trial_copy):
    spec = yaml.safe_load((trial_copy / "spec.yaml").read_text())
    spec["models"] = [{"source": "builtin:gm_unet_v1", "sha256": "0" * 64}]
    (trial_copy / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert_clean_error(run_cli("benchmark", "run", trial_copy / "spec.yaml"), "model.pt", "SHA-256")


def test_unknown_spec_key(trial_copy):
    spec = yaml.safe_load((trial_copy / "spec.yaml").read_text())
    spec["refrence"] = "gm_volume_ml"
    (trial_copy / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert_clean_error(run_cli("benchmark", "run", trial_copy / "spec.yaml"), "spec.yaml", "unknown key 'refrence'")


@pytest.mark.slow
def test_comparison_naming_a_model_not_benchmarked(trial_copy):
    spec = yaml.safe_load((trial_copy / "spec.yaml").read_text())
    spec["report"] = {"compare": [["gm-tissue-gmm@1.0", "gm-unet@9.9.9"]]}
    (trial_copy / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert_clean_error(run_cli("benchmark", "run", trial_copy / "spec.yaml", "--no-progress"),
                       "report.compare names model(s) not in this benchmark: gm-unet@9.9.9")
    spec["report"] = {"equivalence_margin": -1}
    (trial_copy / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert_clean_error(run_cli("benchmark", "run", trial_copy / "spec.yaml"), "spec.yaml", "equivalence_margin")


def assert_no_patient_identifiers(out: Path) -> None:
    """Grep every file the demo wrote (report, tables, MLflow store and artifacts, manifests, NIfTI, gate logs,
    the QC database and audit trail) for the simulator's synthetic PatientName, PatientID and birth date.

    Only the simulator's own output (``trial/``) and the gate's stored DICOM objects (the data as received,
    kept unchanged) may hold them; the grep is first shown to find them there, so it can fail.
    """
    identities = json.loads((out / "trial" / "identifiers.json").read_text()).values()
    patterns = [re.compile(re.escape(v[key].encode())) for v in identities for key in ("PatientName", "PatientID")]
    patterns += [re.compile(re.escape(v["PatientName"].split("^")[0].encode() + b"^")) for v in identities]
    patterns += [re.compile(rb"(?<![\d.])" + v["PatientBirthDate"].encode() + rb"(?!\d)") for v in identities]
    objects = out / "gate" / "store" / "objects"
    stored = next(f for f in objects.rglob("*") if f.is_file() and f.parent.name != "tmp")
    assert any(p.search(stored.read_bytes()) for p in patterns), "the grep finds nothing even in the stored DICOM"
    leaks, checked = [], 0
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if not path.is_file() or rel.parts[0] == "trial" or path.is_relative_to(objects):
            continue
        data, checked = path.read_bytes(), checked + 1
        leaks += [f"{rel}: {m.group(0)!r}" for p in patterns if (m := p.search(data))]
    assert checked > 50 and (out / "results" / "mlflow.db").exists(), sorted(p.name for p in (out / "results").iterdir())
    assert not leaks, "patient identifiers outside the stored DICOM: " + "; ".join(leaks[:10])


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    first = run_cli("demo", "--out", out, "--sites", 6, "--scans-per-site", 5, "--bootstrap", 200, "--no-progress")
    assert first.returncode == 0, first.stderr[-3000:]
    report_dir = out / "reports" / "demo" / "v001"
    assert str(report_dir / "report.html") in first.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in first.stdout
    # every site's series went through the real gate, and the manifest holds only what it passed or warned
    assert "QC gate:" in first.stdout and "received over C-STORE" in first.stdout
    gated = pd.read_csv(out / "gated" / "manifest.csv")
    assert set(gated["qc_status"]) <= {"pass", "warn"} and gated["site"].nunique() == 6

    verify = run_cli("report", "verify", report_dir, "--recompute")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "tables re-derived and identical" in verify.stdout

    # the QC section is the gate's own records, locked with the report, and the gate's effect is shown
    tables = report_dir / "tables"
    verdicts = pd.read_csv(tables / "qc_verdicts.csv")
    gate_db = pd.DataFrame(QCRecords(database_url(out / "gate" / "store")).latest_verdicts())
    assert sorted(verdicts["series_key"]) == sorted(gate_db["series_key"])
    by_site = pd.read_csv(tables / "qc_by_site.csv").set_index("site")
    assert (by_site["failed"] == gate_db[gate_db.status == "fail"].groupby("site").size()
            .reindex(by_site.index, fill_value=0)).all()
    drift = pd.read_csv(tables / "qc_drift_events.csv")
    assert "software" in set(drift["kind"]), drift
    assert set(pd.read_csv(tables / "qc_deviations.csv")["parameter"]) >= {"SliceCoverageMM"}
    effect = pd.read_csv(tables / "gate_effect.csv")
    assert effect["n_failed"].max() > 0 and (effect["n_all"] >= effect["n_kept"]).all()
    html_text = (report_dir / "report.html").read_text()
    for heading in ("What the QC gate changed", "Drift events", "Protocol deviations", "Re-validation pending",
                    "Acquisition tolerances", "Tolerance of superior coverage", "Tolerance of image noise"):
        assert heading in html_text, heading
    tolerances = pd.read_csv(tables / "sweep_tolerances.csv")
    assert set(tolerances["parameter"]) == {"coverage_loss", "noise"}
    for rule in tolerances["rule"].dropna():  # every suggested rule is stated in the report
        assert html_escape(rule) in html_text, rule

    # no synthetic patient identifier the scanners wrote reaches anything but the stored DICOM themselves
    assert_no_patient_identifiers(out)

    # the report says, from the run itself, how the single-vendor model transfers
    html = (report_dir / "report.html").read_text()
    assert "gm-unet@1.0.0 (trained on SIEMENS only)" in html
    assert "(unseen in training), the augmented gm-unet@2.0.0 has" in html
    assert html.count("<img") >= 6
    # the published network is validated beside ours, with its licence and citation in the lineage
    assert "deepbet@1.0.2" in html and "MIT" in html and "10.1016/j.compbiomed.2024.108845" in html
    assert "brain_volume_ml" in html

    # the PDF has the same content: title, figure pages and the signature block (poppler-utils)
    assert_pdf_renders(report_dir / "report.pdf", tmp_path / "pages")

    # MLflow: parent run -> one run per model version -> one run per stratum level, tagged
    store = f"sqlite:///{out / 'results' / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["sitebench-demo"])
    parents = runs[runs["tags.sitebench.level"] == "benchmark"]
    models = runs[runs["tags.sitebench.level"] == "model"]
    strata = runs[runs["tags.sitebench.level"] == "stratum"]
    assert len(parents) == 1 and len(models) == 4  # three of ours and deepbet
    assert set(models["tags.mlflow.parentRunId"]) == set(parents.run_id)
    assert set(strata["tags.mlflow.parentRunId"]) == set(models.run_id)
    assert set(strata["tags.sitebench.stratum"]) == {"site", "vendor", "software_version"}
    assert len(strata[strata["tags.sitebench.stratum"] == "site"]) == 4 * 6  # deepbet's subsample covers every site
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)  # not whatever an earlier test set
    assert client.get_model_version_by_alias("gm-unet", "candidate").tags["model_version"] == "2.0.0"
    assert client.get_model_version_by_alias("gm-unet", "baseline").tags["model_version"] == "1.0.0"
    # registration writes the model card to the version as tags: files and their digest, biomarkers
    card = client.get_model_version_by_alias("gm-unet", "candidate").tags
    assert json.loads(card["sitebench.card.files"])["models/model.pt"] == card["weights_sha256"]
    assert card["sitebench.card.kind"] == "monai-bundle" and "sitebench.card.licence" in card
    parent = client.get_run(parents.run_id.iloc[0])
    assert parent.inputs.dataset_inputs, "the manifest is logged as a dataset input"

    # a rerun resumes every scan and writes a new version; the old one is untouched and still verifies
    second = run_cli("demo", "--out", out, "--sites", 6, "--scans-per-site", 5, "--bootstrap", 200, "--no-progress")
    assert second.returncode == 0, second.stderr[-3000:]
    reused = re.search(r"0 scored, (\d+) reused", second.stdout)
    assert reused and int(reused.group(1)) > 3 * len(gated), second.stdout  # 3 x the gated scans and deepbet's
    assert (out / "reports" / "demo" / "v002" / "report.html").exists()
    # a new version names the one it supersedes; the old one is never touched
    second_lock = json.loads((out / "reports" / "demo" / "v002" / "lock.json").read_text())
    assert second_lock["predicate"]["report"]["supersedes"] == "v001"
    assert "supersedes <b>v001</b>" in (out / "reports" / "demo" / "v002" / "report.html").read_text()
    assert run_cli("report", "verify", report_dir).returncode == 0
    # same inputs and seed: identical results, byte for byte
    for table_name in ("metrics_by_stratum.csv", "predictions.csv"):
        first_table, second_table = report_dir / "tables" / table_name, out / "reports" / "demo" / "v002" / "tables" / table_name
        if first_table.exists():
            assert first_table.read_bytes() == second_table.read_bytes(), table_name

    # any changed byte fails verification, and the message names what changed
    table = report_dir / "tables" / "metrics_by_stratum.csv"
    data = bytearray(table.read_bytes())
    data[200] = ord("9") if data[200] != ord("9") else ord("8")
    table.write_bytes(bytes(data))
    tampered = run_cli("report", "verify", report_dir)
    assert tampered.returncode == 1 and "metrics_by_stratum" in tampered.stdout
    html_file = out / "reports" / "demo" / "v002" / "report.html"
    html_file.write_bytes(html_file.read_bytes() + b" ")
    tampered = run_cli("report", "verify", html_file.parent)
    assert tampered.returncode == 1 and "report.html" in tampered.stdout
    # a swapped image file under the data manifest is named by its scan
    image = sorted((out / "gated" / "images").glob("*.nii.gz"))[0]
    image.write_bytes(image.read_bytes()[:-1] + bytes([image.read_bytes()[-1] ^ 1]))
    swapped = run_cli("report", "verify", html_file.parent)
    assert swapped.returncode == 1 and ("image " in swapped.stdout or "label " in swapped.stdout) and "changed" in swapped.stdout


def assert_pdf_renders(pdf: Path, pages: Path) -> None:
    import numpy as np
    from PIL import Image

    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    assert "Validation report" in text and "Signature block" in text and "approval" in text
    listing = subprocess.run(["pdfimages", "-list", str(pdf)], capture_output=True, text=True, check=True).stdout
    figure_pages = sorted({int(line.split()[0]) for line in listing.splitlines()[2:] if line.strip()})
    assert len(figure_pages) >= 2, listing
    pages.mkdir()
    subprocess.run(["pdftoppm", "-png", "-r", "40", "-f", str(figure_pages[0]), "-l", str(figure_pages[0]),
                    str(pdf), str(pages / "page")], check=True)
    (png,) = pages.glob("page*.png")
    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert pixels.std() > 10  # a rendered figure, not a blank page


def test_simulate_then_validate(tmp_path):
    result = run_cli("simulate", "--out", tmp_path / "t", "--sites", 3, "--scans-per-site", 2, "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "6 scans" in result.stdout and "3 sites" in result.stdout
    validate = run_cli("manifest", "validate", tmp_path / "t" / "manifest.csv")
    assert validate.returncode == 0 and "OK, 6 scans" in validate.stdout
    again = run_cli("simulate", "--out", tmp_path / "t", "--sites", 3, "--no-progress")
    assert_clean_error(again, "already here")


def test_report_verify_on_something_that_is_not_a_report(tmp_path):
    assert_clean_error(run_cli("report", "verify", tmp_path), "not a sitebench report")
