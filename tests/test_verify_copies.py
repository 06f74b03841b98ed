"""A report verifies wherever it travels: the copy MLflow holds, one attached to a submission.

One real pipeline run on a copy of the small simulated trial, logged to its real SQLite MLflow
store; the report is downloaded back from MLflow as an auditor would get it, without the
images it rests on. Three answers stay apart: the report's own files, its sign-offs, and
which materials could not be checked here (and ``--materials DIR`` checks them elsewhere).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from sitebench.models.registry import BUILTIN_DIR
from sitebench.pipeline import run_pipeline
from sitebench.reports.lock import read_lock, write_lock
from sitebench.reports.recompute import mixed_model_engines
from sitebench.stratification.evaluation import LEGACY_MIXED_MODEL_ENGINE
from sitebench.reports.signing import generate_key, sign_report
from sitebench.reports.verify import EXIT_ENGINE_CHANGED, EXIT_FAILED, EXIT_MATERIALS_NOT_HERE, verify_report

pytestmark = pytest.mark.slow  # a whole demo, its MLflow copy and every verify answer (minutes)


@pytest.fixture(scope="module")
def logged(small_trial, tmp_path_factory):
    """A pipeline run on a trial copy, and its report as downloaded from the run's MLflow artifacts."""
    import mlflow

    root = tmp_path_factory.mktemp("copies")
    trial = root / "trial"
    shutil.copytree(small_trial.out_dir, trial)
    # The team's own bundles, kept beside the trial (as the materials an auditor is sent would be):
    # every material then lies under `root`, wherever this test's folders are.
    bundles = [root / "bundles" / name for name in ("gm_unet_v1", "gm_unet_v2")]
    for bundle in bundles:
        shutil.copytree(BUILTIN_DIR / bundle.name, bundle)
    spec = {"name": "travel", "manifest": str(trial / "manifest.csv"), "reference": "gm_volume_ml",
            "reference_segmentation": "label_path", "bootstrap": 50, "seed": 5, "results_dir": str(root / "results"),
            "models": [{"source": str(bundle)} for bundle in bundles],
            "mlflow": {"experiment": "travel", "register_models": False}}
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    result = run_pipeline(spec_path, workers=1, progress=False)
    assert result.store.tracking_uri.startswith("sqlite:///") and str(root) in result.store.tracking_uri
    downloaded = Path(mlflow.artifacts.download_artifacts(run_id=result.mlflow_run_id, artifact_path="report",
                                                          dst_path=str(tmp_path_factory.mktemp("download")),
                                                          tracking_uri=result.store.tracking_uri))
    copy = downloaded / result.report.report_dir.name
    return {"root": root, "trial": trial, "report": result.report.report_dir, "copy": copy}


def test_the_mlflow_copy_is_intact_with_its_materials_not_available_here(logged):
    copy = logged["copy"]
    assert (copy / "lock.json").exists() and logged["root"] not in copy.parents
    result = run_cli("report", "verify", copy)
    lines = result.stdout.strip().splitlines()
    print("\n" + result.stdout)
    assert result.returncode == EXIT_MATERIALS_NOT_HERE, result.stdout + result.stderr
    assert len(lines) <= 10 and max(map(len, lines)) < 300, lines
    assert "report files: intact" in result.stdout and "materials not available here:" in result.stdout
    assert "--json lists all" in result.stdout and "check them with --materials DIR" in result.stdout

    data = json.loads(run_cli("report", "verify", copy, "--json").stdout)
    missing = data["materials"]["not_available_here"]
    images = sum(1 for _ in (logged["trial"] / "images").glob("*.nii.gz"))
    labels = sum(1 for _ in (logged["trial"] / "labels").glob("*.nii.gz"))
    # every image, every label, the data manifest and the spec (the weights may be reachable from here)
    roles = {m["role"] for m in missing}
    assert {"data manifest", "benchmark spec"} <= roles and images + labels + 2 <= len(missing) <= images + labels + 8
    assert sum(r.startswith("image ") for r in roles) == images and sum(r.startswith("label ") for r in roles) == labels
    assert data["report_files"]["intact"] and data["problems"] == [] and data["exit_code"] == 3
    assert data["materials"]["matched"] == data["materials"]["total"] - len(missing)


def test_materials_elsewhere_are_found_by_their_recorded_path(logged):
    result = run_cli("report", "verify", logged["copy"], "--materials", logged["root"])  # the trial's parent
    assert result.returncode == 0, result.stdout + result.stderr
    # 24 images, 24 labels, the manifest, the spec, and each bundle's weights, inference and metadata configs
    assert "materials: 56 of 56 match" in result.stdout and "not available" not in result.stdout
    # the trial folder itself: every image, label and the manifest; the spec and weights lie beside it
    trial_only = run_cli("report", "verify", logged["copy"], "--materials", logged["trial"])
    assert trial_only.returncode == EXIT_MATERIALS_NOT_HERE, trial_only.stdout
    assert "materials not available here: 7 (" in trial_only.stdout, trial_only.stdout  # spec and bundle files
    assert all(name in trial_only.stdout for name in ("benchmark spec", "weights gm-unet@1.0.0"))
    # a changed image in that other copy of the materials fails and is named
    other = logged["root"] / "other_trial"
    shutil.copytree(logged["trial"], other)
    image = sorted((other / "images").glob("*.nii.gz"))[0]
    data = bytearray(image.read_bytes())
    data[100] ^= 0x01
    image.write_bytes(bytes(data))
    changed = run_cli("report", "verify", logged["copy"], "--materials", other)
    assert changed.returncode == EXIT_FAILED and f"images/{image.name}) changed" in changed.stdout, changed.stdout
    assert "materials FAILED" in changed.stdout
    missing_dir = run_cli("report", "verify", logged["copy"], "--materials", logged["root"] / "nowhere")
    assert missing_dir.returncode == 2 and "--materials: not a folder" in missing_dir.stderr
    assert "Traceback" not in missing_dir.stderr


def test_a_changed_byte_in_the_copy_still_fails_and_names_the_file(logged, tmp_path):
    copy = tmp_path / "attached" / logged["copy"].name
    shutil.copytree(logged["copy"], copy)
    table = copy / "tables" / "metrics_by_stratum.csv"
    data = bytearray(table.read_bytes())
    data[-2] ^= 0x01
    table.write_bytes(bytes(data))
    result = run_cli("report", "verify", copy)
    assert result.returncode == EXIT_FAILED
    assert "report files: FAILED: table:metrics_by_stratum (tables/metrics_by_stratum.csv) changed" in result.stdout
    assert len(result.stdout.strip().splitlines()) <= 10


def test_sign_offs_verify_on_a_copy_without_materials(logged, tmp_path):
    signed = logged["report"].parent / "v950"  # signed beside the materials, then sent away
    shutil.copytree(logged["report"], signed)
    try:
        key, pub = generate_key(tmp_path / "keys" / "qa")
        _, stranger = generate_key(tmp_path / "keys" / "stranger")
        sign_report(signed, key, "A. Approver", "approval")
        attached = tmp_path / "submission" / "report"
        shutil.copytree(signed, attached)
    finally:
        shutil.rmtree(signed)
    ok = run_cli("report", "verify", attached, "--public-key", pub)
    assert ok.returncode == EXIT_MATERIALS_NOT_HERE and "sign-offs: 1 valid" in ok.stdout, ok.stdout
    wrong = run_cli("report", "verify", attached, "--public-key", stranger)
    assert wrong.returncode == EXIT_FAILED and "sign-offs: FAILED" in wrong.stdout
    assert "report files: intact" in wrong.stdout  # the three answers stay apart
    # a copy of the materials being out of reach does not stop a reviewer's sign-off of the copy
    sign_report(attached, key, "B. Reviewer", "review")
    assert verify_report(attached, public_keys=[pub]).signoffs == 2


def _relocked(report: Path, folder: Path, plan_edit, fixed_effects_edit) -> Path:
    """The report re-locked (real write_lock) with an edited analysis plan and fixed-effects table."""
    shutil.copytree(report, folder)
    statement = read_lock(folder)
    (folder / "lock.json").unlink()
    fixed = folder / "tables" / "fixed_effects.csv"
    fixed.write_text(fixed_effects_edit(fixed.read_text()))
    subjects = {(s.get("annotations") or {}).get("role", s["name"]): folder / s["name"] for s in statement["subject"]}
    predicate = statement["predicate"]
    materials = {m["name"]: (report / m["uri"]).resolve() for m in predicate["materials"]}
    analysis = json.loads(json.dumps(predicate["analysis"]))
    plan_edit(analysis["plan"])
    write_lock(folder, subjects, materials, predicate["report"], predicate["seeds"], analysis)
    return folder


def _older_numbers(text: str) -> str:
    """A fixed-effects table as another engine would have written it: the first estimate differs."""
    lines = text.splitlines()
    header = lines[0].split(",")
    cells = lines[1].split(",")
    column = header.index("estimate")
    cells[column] = repr(float(cells[column]) + 0.001)
    return "\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n"


def test_recompute_reproduces_the_report_from_its_copy_and_materials(logged):
    """This code reproduces its own report, byte for byte, from the MLflow copy and the materials elsewhere."""
    found = run_cli("report", "verify", logged["copy"], "--recompute", "--materials", logged["root"], "--json")
    data = json.loads(found.stdout)
    assert "evaluation" in data["recompute"]["identical"] and not data["recompute"]["not_done"]
    assert data["recompute"]["problems"] == [] and found.returncode == 0, data["recompute"]


def test_recompute_names_a_mixed_model_engine_change(logged):
    report = logged["report"]
    locked, current = mixed_model_engines({})
    assert locked == LEGACY_MIXED_MODEL_ENGINE
    old = _relocked(report, report.parent / "v960", lambda plan: (plan.pop("mixed_model_engine", None),
                                                                  plan.pop("df_method", None)), _older_numbers)
    forged = _relocked(report, report.parent / "v961", lambda plan: None, _older_numbers)
    try:
        assert verify_report(old).ok and verify_report(forged).ok  # every hash matches in both
        again = run_cli("report", "verify", old, "--recompute")
        print("\n" + again.stdout)
        if current != locked:
            assert again.returncode in (EXIT_ENGINE_CHANGED, EXIT_FAILED), again.stdout
            assert ("mixed-model tables differ (fixed_effects" in again.stdout
                    and f"locked with {LEGACY_MIXED_MODEL_ENGINE}, recomputed with {current}" in again.stdout)
            assert "fixed_effects differs from the locked table" not in again.stdout
        # a plan naming this very engine: the same difference is a plain mismatch, with its line
        caught = run_cli("report", "verify", forged, "--recompute")
        assert caught.returncode == EXIT_FAILED and "fixed_effects differs from the locked table (line 2" in caught.stdout
        assert "mixed-model tables differ" not in caught.stdout
    finally:
        shutil.rmtree(old)
        shutil.rmtree(forged)


def test_recompute_on_the_mlflow_copy_says_what_it_could_not_do(logged):
    away = run_cli("report", "verify", logged["copy"], "--recompute", "--json")
    data = json.loads(away.stdout)
    # not rebuilding the evaluation table is "not checked here" (3), unless a table also differs (1 wins)
    assert away.returncode == (EXIT_FAILED if data["recompute"]["problems"] else EXIT_MATERIALS_NOT_HERE), data
    assert "evaluation" not in data["recompute"]["identical"] and len(data["recompute"]["identical"]) >= 8
    assert "data manifest" in data["recompute"]["not_done"][0]
