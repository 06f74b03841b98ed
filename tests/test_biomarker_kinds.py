"""Several biomarkers of different kinds in one spec, from a team's own model, end to end; and bad specs.

The team's model is a Python entry point written here, as a team would wrap its own network:
a segmentation, a regression output and a class probability from one call. The run goes through
the command line a user types (`sitebench benchmark run`, then `sitebench report verify
--recompute`), on the real simulated scans of the shared `small_trial` fixture.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

TEAM_MODULE = textwrap.dedent('''
    """A team's model wrapped as sitebench expects: predict(data) -> Prediction."""
    import numpy as np

    from sitebench.models.base import Prediction


    class TeamModel:
        name = "team-net"
        licence = "Apache-2.0"
        citation = "Team et al. 2026"
        biomarkers = ("gm_ml", "brain_age", "p_patient")
        training_data = "300 scans of one academic site"
        output_labels = {0: "background", 1: "csf-like", 2: "grey-matter-like", 3: "white-matter-like"}

        def __init__(self, version, cut):
            self.version, self.cut = version, cut

        def predict(self, data):
            image = np.asarray(data["image"])[0]
            scale = np.percentile(image[image > 0], 99)
            x = image / scale
            labels = np.digitize(x, [0.12, 0.35, self.cut]).astype(np.int32)
            gm_fraction = float((labels == 2).sum()) / max(1, int((labels > 0).sum()))
            logit = 40.0 * (0.36 - gm_fraction)
            p = 1.0 / (1.0 + np.exp(-logit))
            return Prediction(values={"brain_age": 120.0 - 120.0 * gm_fraction}, segmentation=labels,
                              arrays={"probabilities": np.array([1.0 - p, p])})


    def make_v1():
        return TeamModel("1.0", 0.80)


    def make_v2():
        return TeamModel("2.0", 0.78)
''')

BIOMARKERS = [
    {"name": "gm_ml", "kind": "label_volume", "labels": [2], "label_names": {2: "grey matter"},
     "description": "grey-matter volume", "reference": {"labels": [2]}},
    {"name": "brain_age", "kind": "regression", "output": "brain_age", "unit": "years",
     "description": "predicted age", "reference": {"column": "age"}},
    {"name": "p_patient", "kind": "class_probability", "output": "probabilities", "index": 1, "threshold": 0.5,
     "description": "probability of being a patient", "reference": {"column": "group", "positive": "patient"}},
]


@pytest.fixture(scope="module")
def team_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("team")
    (root / "team_models.py").write_text(TEAM_MODULE)
    return root, {"PYTHONPATH": f"{root}:{Path(__file__).resolve().parents[1]}"}


def _spec(path: Path, trial, biomarkers, models, **extra) -> Path:
    spec = {"name": "kinds", "manifest": str(trial.manifest_path), "reference_segmentation": "label_path",
            "biomarkers": biomarkers, "models": models, "bootstrap": 50, "seed": 4,
            "results_dir": str(path.parent / "results"), **extra}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def kinds_run(small_trial, team_env, tmp_path_factory):
    root, env = team_env
    work = tmp_path_factory.mktemp("kinds")
    spec = _spec(work / "spec.yaml", small_trial, BIOMARKERS,
                 [{"source": "entrypoint:team_models:make_v1"}, {"source": "entrypoint:team_models:make_v2"}],
                 report={"compare": [["team-net@1.0", "team-net@2.0"]]})
    done = run_cli("benchmark", "run", spec, "--workers", "1", "--no-progress", cwd=work, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = sorted((work / "reports").glob("*/v*"))
    assert reports, done.stdout
    return work, reports[-1], env


def test_three_kinds_run_end_to_end_with_a_section_each(kinds_run):
    work, report_dir, _ = kinds_run
    predictions = pd.read_csv(work / "results" / "predictions.csv")
    assert set(predictions["biomarker"]) == {"gm_ml", "brain_age", "p_patient"}
    assert predictions.groupby(["model_key", "biomarker"]).size().eq(24).all()
    overlap = pd.read_csv(work / "results" / "overlap_scores.csv")
    assert set(overlap["label_name"]) == {"grey matter"} and overlap["hd95_mm"].notna().any()
    html = (report_dir / "report.html").read_text().lower()
    for marker in ("gm_ml", "brain_age", "p_patient"):
        assert marker in html
    assert "years" in html  # the regression biomarker's own unit
    assert "classification" in html and "auc" in html
    assert "dice" in html and "hd95" in html or "hausdorff" in html
    assert "apache-2.0" in html  # the model card's licence
    classification = pd.read_csv(report_dir / "tables" / "classification_by_stratum.csv") \
        if (report_dir / "tables" / "classification_by_stratum.csv").exists() else \
        pd.read_csv(next(report_dir.rglob("classification_by_stratum.csv")))
    overall = classification[(classification["stratum"] == "overall") & (classification["metric"] == "auc")]
    assert len(overall) == 2 and overall["estimate"].between(0, 1).all()


def test_class_probability_auc_matches_an_independent_computation(kinds_run, small_trial):
    """AUC of the team's probability against group, by the Mann-Whitney statistic (scipy), per version."""
    from scipy.stats import mannwhitneyu

    work, report_dir, _ = kinds_run
    predictions = pd.read_csv(work / "results" / "predictions.csv")
    manifest = small_trial.manifest.set_index("scan_id")
    table = pd.read_csv(next(report_dir.rglob("classification_by_stratum.csv")))
    for key, part in predictions[predictions["biomarker"] == "p_patient"].groupby("model_key"):
        truth = (manifest.loc[part["scan_id"], "group"] == "patient").to_numpy()
        scores = part["prediction"].to_numpy()
        u = mannwhitneyu(scores[truth], scores[~truth]).statistic
        expected = u / (truth.sum() * (~truth).sum())
        row = table[(table["model_key"] == key) & (table["stratum"] == "overall") & (table["metric"] == "auc")]
        assert float(row["estimate"].iloc[0]) == pytest.approx(expected, abs=1e-9)


def test_the_multi_kind_report_recomputes(kinds_run):
    work, report_dir, env = kinds_run
    verified = run_cli("report", "verify", report_dir, "--recompute", cwd=work, env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr


# --------------------------------------------------------------------------- bad specs


def _one_line_error(done, spec: Path, key: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert lines and "Traceback" not in done.stderr, done.stderr
    assert str(spec) in lines[-1] and key in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def earlier_run(small_trial, team_env, tmp_path_factory):
    """A good run first, so each bad spec is shown to lose nothing already written (none may touch it)."""
    _, env = team_env
    tmp_path = tmp_path_factory.mktemp("earlier")
    spec = _spec(tmp_path / "good.yaml", small_trial, BIOMARKERS[:1], [{"source": "entrypoint:team_models:make_v1"}])
    done = run_cli("benchmark", "run", spec, "--workers", "1", "--no-progress", "--no-report", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp_path, (tmp_path / "results" / "predictions.csv").read_text(), env


BAD_CASES = {
    "label never output": ([{"name": "x", "kind": "label_volume", "labels": [7], "reference": {"labels": [2]}}],
                           "entrypoint:team_models:make_v1", "biomarkers[0].labels"),
    "unknown output": ([{"name": "x", "kind": "regression", "output": "nope", "reference": {"column": "age"}}],
                       "entrypoint:team_models:make_v1", "biomarkers[0].output"),
    "shape mismatch": ([{"name": "x", "kind": "class_probability", "output": "probabilities", "index": 3,
                         "reference": {"column": "group", "positive": "patient"}}],
                       "entrypoint:team_models:make_v1", "biomarkers[0].index"),
    "entry point does not import": (BIOMARKERS[:1], "entrypoint:no_such_team_package.models:make",
                                    "models[0].source"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_spec_is_one_line_exit_2_and_loses_nothing(case, earlier_run, small_trial):
    work, before, env = earlier_run
    biomarkers, source, key = BAD_CASES[case]
    spec = _spec(work / "bad.yaml", small_trial, biomarkers, [{"source": source}])
    done = run_cli("benchmark", "run", spec, "--workers", "1", "--no-progress", "--no-report", cwd=work, env=env)
    _one_line_error(done, spec, key)
    after = (work / "results" / "predictions.csv").read_text()
    assert after.startswith(before)


def test_torchscript_that_does_not_load_and_bundle_without_network(earlier_run, small_trial, tmp_path):
    work, before, env = earlier_run
    broken = tmp_path / "broken.ts"
    broken.write_bytes(b"not a torchscript archive")
    (tmp_path / "broken.ts.yaml").write_text("name: broken\nversion: '1'\n")
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "inference.json").write_text(json.dumps({"preprocessing": {"_target_": "Compose",
                                                                                     "transforms": []}}))
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"name": "nonet", "version": "1"}))
    (bundle / "models" / "model.pt").write_bytes(b"")
    for source, key in ((broken, "broken.ts"), (bundle, "network_def")):
        spec = _spec(work / "bad.yaml", small_trial, BIOMARKERS[:1], [{"source": str(source)}])
        done = run_cli("benchmark", "run", spec, "--workers", "1", "--no-progress", "--no-report", cwd=work,
                       env=env)
        _one_line_error(done, spec, "models[0].source")
        assert key in done.stderr, done.stderr
    assert (work / "results" / "predictions.csv").read_text().startswith(before)


def test_a_derived_biomarker_names_only_earlier_ones(small_trial, tmp_path):
    spec = _spec(tmp_path / "s.yaml", small_trial,
                 [{"name": "r", "kind": "ratio", "numerator": "a", "denominator": "b", "reference": {"column": "age"}}],
                 [{"source": "classical"}])
    done = run_cli("benchmark", "run", spec, "--no-progress", cwd=tmp_path)
    assert done.returncode == 2 and "biomarkers[0].numerator" in done.stderr and str(spec) in done.stderr
