"""The validation report as an auditor meets it: its sections, its in-toto lock, `verify` against each kind
of tampering, `verify --recompute`, and identical results from identical inputs.

One real pipeline run on a copy of a small simulated trial (so tampering never touches shared files), with a
copied MONAI bundle as one model version and a real SQLite QC-gate store for the per-site QC summary.
"""

from __future__ import annotations

import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sitebench.models.registry import BUILTIN_DIR
from sitebench.pipeline import run_pipeline
from sitebench.qc.gate import SeriesOutcome
from sitebench.qc.protocol import Deviation
from sitebench.qc.records import QCRecords, database_url
from sitebench.reports.lock import PREDICATE_TYPE, STATEMENT_TYPE, locked_files, read_lock, write_lock
from sitebench.reports.qc_summary import qc_summary
from sitebench.reports.sections import SECTIONS, checklists
from sitebench.reports.signing import generate_key, sign_report
from conftest import run_cli

pytestmark = pytest.mark.slow  # builds and verifies whole reports (minutes)


def _qc_store(folder: Path) -> Path:
    """A gate store with real rows: S01 failed then passed a re-scan, S02 warns with two deviations."""
    folder.mkdir()
    records = QCRecords(database_url(folder))
    tr = Deviation("RepetitionTime", "2.3 ± 2%", 2.5, "rel", "fail", "fail")

    def outcome(key, study, status, site, deviations=()):
        return SeriesOutcome(series_key=key, site=site, status=status, n_files=10, study_key=study, scanner="x",
                             protocol="t1w", protocol_version=1, protocol_sha256="0" * 64,
                             deviations=list(deviations), checks=list(deviations))

    records.record_outcome(outcome("a1", "A", "fail", "S01", [tr]))
    records.record_outcome(outcome("a2", "A", "pass", "S01"))
    records.record_outcome(outcome("b1", "B", "warn", "S02", [tr, tr]))
    records.engine.dispose()
    return folder


@pytest.fixture(scope="module")
def built(small_trial, tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    trial = root / "trial"
    shutil.copytree(small_trial.out_dir, trial)
    bundle = root / "gm_unet_v1"
    shutil.copytree(BUILTIN_DIR / "gm_unet_v1", bundle)
    spec = {"name": "audit", "manifest": str(trial / "manifest.csv"), "reference": "gm_volume_ml",
            "reference_segmentation": "label_path", "bootstrap": 100, "seed": 3, "results_dir": str(root / "results"),
            "models": [{"source": "classical"}, {"source": str(bundle)}, {"source": "builtin:gm_unet_v2"}],
            "mlflow": {"experiment": "audit", "register_models": False},
            "report": {"intended_use": "Grey-matter volume as a trial endpoint.", "equivalence_margin": 60.0,
                       "compare": [["gm-unet@1.0.0", "gm-unet@2.0.0"]], "comparison_margin": 20.0,
                       "endpoint": {"column": "group", "positive": "patient", "higher_is_positive": False},
                       "qc_store": str(_qc_store(root / "qc")),
                       "limitations": ["Only 24 scans: a demonstration of the audit trail, not of the model."]}}
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    result = run_pipeline(spec_path, workers=1, progress=False)
    return {"root": root, "spec": spec_path, "report": result.report.report_dir, "trial": trial, "bundle": bundle,
            "run_id": result.mlflow_run_id}


@contextmanager
def flipped(path: Path, offset: int = -1):
    """Change one byte of a file, and put it back afterwards."""
    original = path.read_bytes()
    data = bytearray(original)
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    try:
        yield
    finally:
        path.write_bytes(original)


def test_report_has_every_section_and_the_checklist_points_at_them(built):
    page = (built["report"] / "report.html").read_text()
    ids = set(re.findall(r"<section id='([a-z-]+)'>", page))
    for section_id in ("title", "findings", "intended-use", "models", "data", "qc", "methods", "results-strata",
                       "results-agreement", "results-calibration", "results-variance", "results-harmonization",
                       "results-upgrade", "results-equivalence", "comparison", "limitations", "checklist",
                       "provenance", "signatures"):
        assert section_id in ids, section_id
    for guideline in checklists()["guidelines"].values():
        for item in guideline["items"]:
            assert item["section"] == "not-addressed" or item["section"] in ids, item
            assert item["section"] in {s for s, _, _ in SECTIONS} | {"not-addressed"}
    assert len(checklists()["guidelines"]["claim_2024"]["items"]) == 44
    # the QC gate summary comes from the gate's own records: S01 re-scanned once and resolved, S02 two open
    qc = pd.read_csv(built["report"] / "tables" / "qc_by_site.csv").set_index("site")
    assert (qc.loc["S01", "series"], qc.loc["S01", "failed"], qc.loc["S01", "passed"]) == (2, 1, 1)
    assert qc.loc["S01", "open_deviations"] == 0 and qc.loc["S02", "open_deviations"] == 2
    assert qc.loc["S01", "rescan_rate"] == pytest.approx(0.5)
    # the methods name their references; the spec's own words appear; the lineage names the training vendor
    assert "DeLong, DeLong &amp; Clarke-Pearson 1988" in page and "Johnson, Li &amp; Rabinovic 2007" in page
    assert "Grey-matter volume as a trial endpoint." in page and "Only 24 scans" in page
    assert "single-vendor baseline" in page  # the bundle's changelog
    comparison = pd.read_csv(built["report"] / "tables" / "comparison.csv")
    assert set(comparison["level"]) == {"S01", "S02", "S03", "S04", "S05", "S06", "overall"}
    assert (comparison["n_pairs"][comparison["level"] == "overall"] == 24).all()
    auc = pd.read_csv(built["report"] / "tables" / "discrimination.csv")
    assert auc.loc[0, "status"] == "ok" and 0 <= auc.loc[0, "auc_a"] <= 1


def test_lock_is_an_in_toto_statement(built):
    statement = read_lock(built["report"])
    assert statement["_type"] == STATEMENT_TYPE and statement["predicateType"] == PREDICATE_TYPE
    names = {s["name"] for s in statement["subject"]}
    assert {"report.html", "report.pdf", "tables/metrics_by_stratum.csv", "tables/evaluation.csv"} <= names
    for subject in statement["subject"]:
        assert (built["report"] / subject["name"]).is_file() and re.fullmatch(r"[0-9a-f]{64}",
                                                                              subject["digest"]["sha256"])
    predicate = statement["predicate"]
    roles = {m["name"] for m in predicate["materials"]}
    assert {"data manifest", "benchmark spec", "weights gm-unet@1.0.0", "weights gm-unet@2.0.0"} <= roles
    assert sum(r.startswith("image ") for r in roles) == 24
    assert predicate["code_version"]["git_commit"] and "torch" in predicate["packages"]
    assert predicate["analysis"]["plan"]["seed"] == 3 and predicate["analysis"]["reference"] == "gm_volume_ml"


def test_the_lock_names_its_mlflow_run_and_that_run_holds_the_locked_report(built, tmp_path):
    import mlflow

    from sitebench.reports.coverage import report_coverage

    named = read_lock(built["report"])["predicate"]["report"]["mlflow_run"]
    assert named["run_id"] == built["run_id"]
    client = mlflow.MlflowClient(named["tracking_uri"])
    run = client.get_run(named["run_id"])
    assert run.info.status == "FINISHED" and run.info.experiment_id == named["experiment_id"]
    assert run.data.tags["sitebench.level"] == "benchmark" and run.data.params["n_scans"] == "24"
    copy = client.download_artifacts(named["run_id"], f"report/{built['report'].name}/lock.json", str(tmp_path))
    assert Path(copy).read_bytes() == (built["report"] / "lock.json").read_bytes()
    assert named["run_id"] in (built["report"] / "report.html").read_text()
    assert report_coverage(built["report"]).mlflow_run == named


@pytest.mark.parametrize("what, needle", [
    ("report", "report.html"),
    ("table", "table:upgrade_effect"),
    ("weights", "weights gm-unet@1.0.0"),
    ("manifest", "data manifest"),
    ("image", "image sub-"),
])
def test_each_kind_of_tampering_is_named(built, what, needle):
    report = built["report"]
    target = {"report": report / "report.html", "table": report / "tables" / "upgrade_effect.csv",
              "weights": built["bundle"] / "models" / "model.pt", "manifest": built["trial"] / "manifest.csv",
              "image": sorted((built["trial"] / "images").glob("*.nii.gz"))[0]}[what]
    with flipped(target, offset=-2 if what != "image" else 100):
        result = run_cli("report", "verify", report)
        assert result.returncode == 1, result.stdout
        assert needle in result.stdout and "changed" in result.stdout
        problems = json.loads(run_cli("report", "verify", report, "--json").stdout)["problems"]
        assert len(problems) == 1, problems  # exactly the file that changed, nothing else
    assert run_cli("report", "verify", report).returncode == 0  # restored


def test_wrong_key_fails_the_signature_check(built, tmp_path):
    shutil.copytree(built["report"], built["report"].parent / "v900")  # same depth: material paths still resolve
    try:
        folder = built["report"].parent / "v900"
        key, pub = generate_key(tmp_path / "keys" / "author")
        _, stranger = generate_key(tmp_path / "keys" / "stranger")
        sign_report(folder, key, "A. Author", "authorship")
        assert run_cli("report", "verify", folder, "--public-key", pub).returncode == 0
        wrong = run_cli("report", "verify", folder, "--public-key", stranger)
        assert wrong.returncode == 1 and "not among the given keys" in wrong.stdout
    finally:
        shutil.rmtree(built["report"].parent / "v900")


def test_recompute_rederives_every_table_and_catches_relocked_numbers(built):
    report = built["report"]
    ok = run_cli("report", "verify", report, "--recompute", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    recomputed = json.loads(ok.stdout)["recomputed"]
    assert {"evaluation", "metrics_by_stratum", "calibration", "harmonization", "equivalence", "comparison",
            "discrimination", "mixed_models"} <= set(recomputed)

    # someone edits a number and writes a fresh lock over it: every hash matches, the recompute does not
    forged = report.parent / "v901"
    shutil.copytree(report, forged)
    try:
        statement = read_lock(forged)
        (forged / "lock.json").unlink()
        metrics = forged / "tables" / "metrics_by_stratum.csv"
        lines = metrics.read_text().splitlines()
        cells = lines[1].split(",")
        estimate = lines[0].split(",").index("estimate")
        cells[estimate] = str(float(cells[estimate]) + 1.0)  # the first estimate, plus one ml
        lines[1] = ",".join(cells)
        metrics.write_text("\n".join(lines) + "\n")
        subjects = {(s.get("annotations") or {}).get("role", s["name"]): forged / s["name"]
                    for s in statement["subject"]}
        predicate = statement["predicate"]
        materials = {m["name"]: (forged / m["uri"]).resolve() for m in predicate["materials"]}
        write_lock(forged, subjects, materials, predicate["report"], predicate["seeds"], predicate["analysis"])
        assert run_cli("report", "verify", forged).returncode == 0
        caught = run_cli("report", "verify", forged, "--recompute")
        assert caught.returncode == 1
        assert "metrics_by_stratum differs from the locked table" in caught.stdout
        assert "line 2" in caught.stdout
    finally:
        shutil.rmtree(forged)


def test_same_inputs_and_seed_give_identical_result_hashes(built):
    again = run_pipeline(built["spec"], workers=1, progress=False)
    first, second = read_lock(built["report"]), read_lock(again.report.report_dir)
    assert second["predicate"]["report"]["supersedes"] == built["report"].name

    def tables(statement):
        return {role: digest for role, _, digest in locked_files(statement) if role.startswith("table:")}

    assert tables(first) == tables(second) and len(tables(first)) >= 12
    assert {r: d for r, _, d in locked_files(first) if not r.startswith("table:") and r not in
            ("report.html", "report.pdf")} == {r: d for r, _, d in locked_files(second)
                                               if not r.startswith("table:") and r not in ("report.html", "report.pdf")}


def test_qc_summary_from_manifest_columns_and_its_absence():
    manifest = pd.DataFrame({"site": ["S01", "S01", "S02"], "qc_status": ["pass", "warn", "fail"],
                             "qc_deviations": [0, 1, 3]})
    summary = qc_summary(manifest)
    table = summary.table.set_index("site")
    assert (table.loc["S01", "passed"], table.loc["S01", "warned"], table.loc["S01", "open_deviations"]) == (1, 1, 1)
    assert table.loc["S02", "failed"] == 1 and "qc_status" in summary.source
    none = qc_summary(manifest.drop(columns=["qc_status"]))
    assert not none.available and none.source.startswith("none")


def test_a_scan_without_a_reference_is_left_out_of_every_analysis_not_a_crash(built):
    from sitebench.stratification.evaluation import AnalysisPlan, evaluate_models, read_evaluation_csv

    table = read_evaluation_csv(built["report"] / "tables" / "evaluation.csv")
    row = table.index[table["model_key"] == "gm-unet@1.0.0"][0]
    table.loc[row, ["reference", "error"]] = float("nan")
    plan = AnalysisPlan.from_dict(read_lock(built["report"])["predicate"]["analysis"]["plan"])
    plan.bootstrap = 20
    evaluation = evaluate_models(table, plan)
    overall = evaluation.metrics[(evaluation.metrics["stratum"] == "overall") & (evaluation.metrics["metric"] == "mae")]
    assert dict(zip(overall["model_key"], overall["n_scans"])) == {"gm-tissue-gmm@1.0": 24, "gm-unet@1.0.0": 23,
                                                                   "gm-unet@2.0.0": 24}
    pairs = evaluation.comparison.set_index("level").loc["overall", "n_pairs"]
    assert pairs == 23
    calibration = evaluation.calibration.set_index(["model_key", "stratum"]).loc[("gm-unet@1.0.0", "overall")]
    assert calibration["n_scans"] == 23 and calibration["slope"] == calibration["slope"]  # estimated, not NaN


def test_a_report_locked_in_the_earlier_layout_still_verifies(tmp_path):
    """Reports are verified years later: a sitebench.lock/v1 lock (before the in-toto layout) keeps working."""
    from sitebench.provenance import sha256_file, sha256_json

    folder = tmp_path / "reports" / "old" / "v001"
    folder.mkdir(parents=True)
    (folder / "report.html").write_text("<html>old</html>")
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights")
    lock = {"schema": "sitebench.lock/v1", "report": {"name": "old", "version": 1}, "locked_utc": "2026-11-01",
            "subjects": [{"name": "report.html", "path": "report.html",
                          "digest": {"sha256": sha256_file(folder / "report.html")}}],
            "materials": [{"name": "weights m@1", "path": "../../../model.pt",
                           "digest": {"sha256": sha256_file(weights)}}],
            "code_version": {}, "packages": {}, "seeds": {}}
    lock["lock_sha256"] = sha256_json(lock)
    (folder / "lock.json").write_text(json.dumps(lock))
    ok = run_cli("report", "verify", folder, "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["checked"] == 3, ok.stdout + ok.stderr  # lock + two files
    weights.write_bytes(b"weightz")
    changed = run_cli("report", "verify", folder)
    assert changed.returncode == 1 and "weights m@1 (../../../model.pt) changed" in changed.stdout
    lock["seeds"] = {"seed": 1}  # an edited lock no longer matches its own hash
    (folder / "lock.json").write_text(json.dumps(lock))
    assert "lock.json changed" in run_cli("report", "verify", folder).stdout


def test_report_mixed_models_are_the_stats_mixed_engine(built, tmp_path):
    """Every mixed-model number in the locked report is what `sitebench stats mixed` gives on the same
    rows: one engine (lmm), Satterthwaite df, the same variance components."""
    tables = built["report"] / "tables"
    evaluation = pd.read_csv(tables / "evaluation.csv")
    locked = json.loads((tables / "mixed_models.json").read_text())
    checked = 0
    for fit in locked:
        if fit["model_key"] == "reference" or fit["response"] != "error":
            continue
        fixed_part, *random_parts = fit["formula"].split(" + (1 | ")
        columns = ["error", "site", "scanner_id", "vendor", "software_upgraded", "age", "sex", "group"]
        rows = evaluation[evaluation["model_key"] == fit["model_key"]][columns].dropna()
        assert len(rows) == fit["n_obs"]
        path = tmp_path / f"{checked}.csv"
        rows.to_csv(path, index=False)
        vc = ["--vc", "scanner_id"] if any(p.startswith("site:scanner_id") for p in random_parts) else []
        result = run_cli("stats", "mixed", path, "--formula", fixed_part, "--groups", "site", *vc, "--json")
        assert result.returncode == 0, result.stderr
        cli = json.loads(result.stdout)
        assert cli["variance_components"]["site"] == pytest.approx(fit["variance_components"]["site"], rel=1e-6, abs=1e-9)
        assert cli["variance_components"]["residual"] == pytest.approx(fit["variance_components"]["residual"], rel=1e-6)
        for term, effect in fit["fixed_effects"].items():
            assert effect["df"] is not None and effect["df"] > 0  # Satterthwaite t, not Wald z
            for key in ("estimate", "se", "df", "p"):
                assert cli["fixed_effects"][term][key] == pytest.approx(effect[key], rel=1e-5), (term, key)
        checked += 1
    assert checked == 3
