"""Every statistic follows the biomarker's kind; several biomarkers in one evaluation.

A seeded synthetic trial (6 sites, 2 vendors, 2 model versions) with two continuous biomarkers
(grey matter from a manifest column, hippocampus from the reference segmentation) and one
classification biomarker (probability of AD), plus per-label overlap scores. Numbers are checked
against independent computations: the single-biomarker analyses on each biomarker's rows, the
DeLong engine called directly, numpy for the overlap summaries, a hand-written Rao-Wu draw for the
bootstrap. A table without a ``biomarker`` column must give exactly the files it gave before.
"""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sitebench.errors import SitebenchError
from sitebench.stratification.classification import classification_by_stratum, delong
from sitebench.stratification.evaluation import (AnalysisPlan, Endpoint, evaluate_models, evaluation_csv, evaluation_table,
                                                 read_evaluation_csv, result_csv)
from sitebench.stratification.metrics import stratum_metrics
from sitebench.stratification.overlap import OVERLAP_BY_STRATUM_COLUMNS, overlap_by_stratum, overlap_table

ROOT = Path(__file__).resolve().parents[1]
#: The commit before biomarker kinds reached the statistics: what legacy reports were locked with.
LEGACY_COMMIT = "59cef1e"
SITES = ("S01", "S02", "S03", "S04", "S05", "S06")
VENDORS = {"S01": "GE", "S02": "GE", "S03": "GE", "S04": "SIEMENS", "S05": "SIEMENS", "S06": "SIEMENS"}
MODELS = ("seg@1", "seg@2")
GM = {"name": "gm", "kind": "label_volume", "analysis": "continuous", "unit": "ml", "description": "",
      "threshold": None, "reference_column": "gm_ml", "reference_positive": None, "reference_labels": [1],
      "equivalence_margin": None, "label_names": {"1": "grey matter"}}
HIPPO = {"name": "hippo", "kind": "label_volume", "analysis": "continuous", "unit": "ml", "description": "",
         "threshold": None, "reference_column": None, "reference_positive": None, "reference_labels": [17, 53],
         "equivalence_margin": 0.4, "label_names": {"17": "left", "53": "right"}}
AD = {"name": "ad", "kind": "class_probability", "analysis": "classification", "unit": "", "description": "",
      "threshold": 0.5, "reference_column": "diagnosis", "reference_positive": "AD", "reference_labels": None,
      "equivalence_margin": None, "label_names": {}}
BIOMARKERS = [GM, HIPPO, AD]
LEGACY_FILES = {"metrics_by_stratum.csv", "fixed_effects.csv", "variance_components.csv", "upgrade_effect.csv",
                "calibration.csv", "harmonization.csv", "equivalence.csv", "comparison.csv", "discrimination.csv",
                "mixed_models.json"}


def _trial(n: int = 8, seed: int = 3) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(manifest, predictions, overlap scores): seg@1 reads grey matter 30 ml high at S03."""
    rng = np.random.default_rng(seed)
    manifest, predictions, overlap = [], [], []
    for site in SITES:
        for i in range(n):
            scan = f"{site}-{i:02d}"
            upgraded = site == "S01" and i >= n // 2
            ad = i % 2 == 1
            gm = rng.normal(650, 40) - (30 if ad else 0)
            hippo = rng.normal(7.0, 0.5) - (0.8 if ad else 0)
            manifest.append({"scan_id": scan, "subject_id": f"sub-{scan}", "site": site, "scanner_id": f"{site}-A",
                             "vendor": VENDORS[site], "scanner_model": "M",
                             "software_version": "2.0" if upgraded else "1.0",
                             "acquisition_date": f"2025-01-{i + 1:02d}", "age": 60.0 + i,
                             "sex": "F" if i % 3 else "M", "group": "patient" if ad else "control",
                             "gm_ml": gm, "diagnosis": "AD" if ad else "CN"})
            for key in MODELS:
                bias = 30 if key == "seg@1" and site == "S03" else 0
                noise = 6 if key == "seg@1" else 4
                dice = float(np.clip(rng.normal(0.85 if key == "seg@2" else 0.8, 0.03), 0, 1))
                logit = (1.6 if key == "seg@2" else 0.8) * (1 if ad else -1) + rng.normal(0, 1)
                predictions += [
                    {"scan_id": scan, "model_key": key, "biomarker": "gm", "prediction": gm + bias + rng.normal(0, noise),
                     "dice": dice, "reference": np.nan},
                    {"scan_id": scan, "model_key": key, "biomarker": "hippo",
                     "prediction": hippo + rng.normal(0, 0.2), "dice": dice, "reference": hippo},
                    {"scan_id": scan, "model_key": key, "biomarker": "ad", "prediction": 1 / (1 + np.exp(-logit)),
                     "dice": np.nan, "reference": np.nan}]
                for label, name in (("17", "left"), ("53", "right")):
                    empty = site == "S02" and i == 0 and label == "53"  # both masks empty: no Dice, no HD95
                    error = rng.normal(0.05, 0.1)
                    overlap.append({"scan_id": scan, "model_key": key, "files_sha256": "0" * 64,
                                    "image_sha256": "1" * 64, "biomarker": "hippo", "label": label,
                                    "label_name": name, "dice": np.nan if empty else float(rng.uniform(0.7, 0.9)),
                                    "hd95_mm": np.nan if empty else float(rng.uniform(1, 4)),
                                    "volume_ml": 0.0 if empty else 3.5 + error,
                                    "reference_volume_ml": 0.0 if empty else 3.5,
                                    "volume_error_ml": 0.0 if empty else error})
    return pd.DataFrame(manifest), pd.DataFrame(predictions), pd.DataFrame(overlap)


def _plan(**changes) -> AnalysisPlan:
    plan = AnalysisPlan(strata=["site", "vendor", "software_version"], bootstrap=40, seed=0, equivalence_margin=25.0,
                        compare=[list(MODELS)], comparison_margin=5.0,
                        endpoint=Endpoint("group", "patient", higher_is_positive=False), biomarkers=[dict(b) for b in BIOMARKERS])
    return replace(plan, **changes)


@pytest.fixture(scope="module")
def trial():
    return _trial()


@pytest.fixture(scope="module")
def table(trial):
    manifest, predictions, _ = trial
    return evaluation_table(predictions, manifest, None, BIOMARKERS)


@pytest.fixture(scope="module")
def evaluation(trial, table):
    manifest, _, scores = trial
    return evaluate_models(table, _plan(), overlap=overlap_table(scores, manifest))


def _legacy_table(trial) -> pd.DataFrame:
    manifest, predictions, _ = trial
    gm = predictions[predictions.biomarker == "gm"].drop(columns=["biomarker", "reference"])
    return evaluation_table(gm, manifest, "gm_ml")


def _legacy_plan() -> AnalysisPlan:
    return _plan(biomarkers=[])


# --------------------------------------------------------------------------- legacy tables are untouched


def _module_at(commit: str):
    """evaluation.py as it was at ``commit`` (skips when the history is not here)."""
    try:
        source = subprocess.run(["git", "show", f"{commit}:src/sitebench/stratification/evaluation.py"], cwd=ROOT,
                                capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip(f"git history with {commit} not available")
    spec = importlib.util.spec_from_loader("sitebench_legacy_evaluation", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    exec(compile(source, f"evaluation.py@{commit}", "exec"), module.__dict__)
    return module


def test_a_legacy_table_gives_the_same_files_byte_for_byte_as_before(trial):
    legacy = _module_at(LEGACY_COMMIT)
    manifest, predictions, _ = trial
    gm = predictions[predictions.biomarker == "gm"].drop(columns=["biomarker", "reference"])
    old_table = legacy.evaluation_table(gm, manifest, "gm_ml")
    new_table = evaluation_table(gm, manifest, "gm_ml")
    assert evaluation_csv(new_table) == legacy.evaluation_csv(old_table)
    plan = _legacy_plan().to_dict()
    del plan["biomarkers"]  # as a plan locked before biomarkers were declared reads
    del plan["upgrade_equivalence"]  # ... and before upgrades were tested for equivalence
    old = legacy.evaluate_models(old_table, legacy.AnalysisPlan.from_dict(plan)).result_files()
    new = evaluate_models(new_table, AnalysisPlan.from_dict(plan)).result_files()
    assert set(new) == set(old) == LEGACY_FILES
    for name in old:
        assert new[name] == old[name], name


def test_a_legacy_table_keeps_its_columns_and_numbers(trial):
    table = _legacy_table(trial)
    assert "biomarker" not in table
    assert list(table.columns) == ["scan_id", "subject_id", "model_key", "site", "scanner_id", "vendor",
                                   "scanner_model", "software_version", "acquisition_date", "software_upgraded",
                                   "age", "sex", "group", "reference", "prediction", "error", "dice"]
    evaluation = evaluate_models(table, _legacy_plan())
    assert set(evaluation.result_files()) == LEGACY_FILES
    assert evaluation.classification.empty and evaluation.overlap_by_stratum.empty
    assert "biomarker" not in evaluation.metrics and all("biomarker" not in m for m in evaluation.mixed)
    assert list(evaluation.result_tables()["fixed_effects"].columns[:3]) == ["model_key", "response", "term"]
    assert list(evaluation.result_tables()["variance_components"].columns[:2]) == ["model_key", "response"]
    part = table[table.model_key == "seg@2"].reset_index(drop=True)
    direct = stratum_metrics(part, prediction="prediction", reference="reference", strata=_legacy_plan().strata,
                             dice="dice", n_boot=40, seed=0).to_frame()
    mine = evaluation.metrics[evaluation.metrics.model_key == "seg@2"].drop(columns="model_key")
    pd.testing.assert_frame_equal(mine.reset_index(drop=True), direct)


def test_a_plan_without_biomarkers_reads_back_and_a_table_with_them_needs_them(trial, table):
    plan = _legacy_plan().to_dict()
    del plan["biomarkers"]
    assert AnalysisPlan.from_dict(plan).biomarkers == []
    assert AnalysisPlan.from_dict(_plan().to_dict()).biomarkers == BIOMARKERS
    manifest, predictions, _ = trial
    with pytest.raises(SitebenchError, match="biomarker"):
        evaluation_table(predictions, manifest, "gm_ml")
    with pytest.raises(SitebenchError, match="declares none"):
        evaluate_models(table, _legacy_plan())


# --------------------------------------------------------------------------- the table


def test_the_table_has_one_row_per_scan_model_and_biomarker_in_plan_order(trial, table):
    manifest, predictions, _ = trial
    assert list(table.columns[:4]) == ["scan_id", "subject_id", "model_key", "biomarker"]
    assert list(dict.fromkeys(table.biomarker)) == ["gm", "hippo", "ad"]
    assert len(table) == len(predictions)
    for name, rows in table.groupby("biomarker", sort=False):
        keys = list(zip(rows.model_key, rows.scan_id))
        assert keys == sorted(keys)
    by_scan = manifest.set_index("scan_id")
    gm = table[table.biomarker == "gm"]
    np.testing.assert_array_equal(gm.reference.to_numpy(), by_scan.loc[gm.scan_id, "gm_ml"].to_numpy())
    hippo = table[table.biomarker == "hippo"].set_index(["scan_id", "model_key"])
    source = predictions[predictions.biomarker == "hippo"].set_index(["scan_id", "model_key"]).loc[hippo.index]
    np.testing.assert_array_equal(hippo.reference.to_numpy(), source.reference.to_numpy())
    ad = table[table.biomarker == "ad"]
    np.testing.assert_array_equal(ad.reference.to_numpy(),
                                  (by_scan.loc[ad.scan_id, "diagnosis"] == "AD").astype(float).to_numpy())
    np.testing.assert_allclose(table.error, table.prediction - table.reference)
    assert pd.api.types.is_string_dtype(read_evaluation_csv(io.StringIO(evaluation_csv(table))).biomarker)


def test_a_missing_class_stays_missing_and_numeric_classes_match(trial):
    manifest, predictions, _ = trial
    manifest = manifest.copy()
    manifest["code"] = np.where(manifest.diagnosis == "AD", 1.0, 0.0)
    manifest.loc[0, "code"] = np.nan
    entry = {**AD, "reference_column": "code", "reference_positive": "1"}
    table = evaluation_table(predictions[predictions.biomarker == "ad"], manifest, None, [entry])
    first = table[table.scan_id == manifest.scan_id[0]]
    assert first.reference.isna().all()
    rest = table[table.scan_id != manifest.scan_id[0]]
    truth = manifest.set_index("scan_id").loc[rest.scan_id, "diagnosis"].eq("AD").astype(float).to_numpy()
    np.testing.assert_array_equal(rest.reference.to_numpy(), truth)


# --------------------------------------------------------------------------- continuous biomarkers


@pytest.mark.parametrize("name, margin", [("gm", 25.0), ("hippo", 0.4)])
def test_each_continuous_biomarker_gets_exactly_the_single_biomarker_analyses(table, evaluation, name, margin):
    rows = table[table.biomarker == name].drop(columns="biomarker").reset_index(drop=True)
    primary = name == "gm"  # the plan's margins and endpoint are the first continuous biomarker's
    plan = _plan()
    single = evaluate_models(rows, replace(plan, biomarkers=[], equivalence_margin=margin,
                                           comparison_margin=plan.comparison_margin if primary else None,
                                           endpoint=plan.endpoint if primary else None))
    fields = ("metrics", "upgrade", "calibration", "harmonization", "equivalence", "comparison")
    for field_name in fields + (("discrimination",) if primary else ()):
        mine = getattr(evaluation, field_name)
        assert mine.columns[0] == "biomarker", field_name
        mine = mine[mine.biomarker == name].drop(columns="biomarker").reset_index(drop=True)
        # the locked bytes are the same (a column concatenated across biomarkers may widen its dtype)
        assert result_csv(mine) == result_csv(getattr(single, field_name)), field_name
        pd.testing.assert_frame_equal(mine, getattr(single, field_name), check_dtype=False, obj=field_name)
    mixed = [{k: v for k, v in m.items() if k != "biomarker"} for m in evaluation.mixed if m["biomarker"] == name]
    assert mixed == single.mixed
    assert [m["model_key"] for m in mixed] == ["seg@1", "seg@1", "seg@2", "seg@2", "reference"]
    if not primary:  # no comparison margin for a secondary biomarker (the plan's is in the primary's unit)
        assert evaluation.comparison[evaluation.comparison.biomarker == name].p_tost.isna().all()


def test_the_mixed_model_tables_carry_the_biomarker(evaluation):
    tables = evaluation.result_tables()
    for stem in ("fixed_effects", "variance_components"):
        assert tables[stem].columns[0] == "biomarker"
        assert list(dict.fromkeys(tables[stem].biomarker)) == ["gm", "hippo"]
    assert all(m["biomarker"] in ("gm", "hippo") for m in evaluation.mixed)


# --------------------------------------------------------------------------- the classification biomarker


def test_the_classification_biomarker_gets_auc_sensitivity_and_calibration(table, evaluation):
    frame = evaluation.classification
    assert list(frame.columns[:4]) == ["biomarker", "model_key", "stratum", "level"]
    assert set(frame.biomarker) == {"ad"} and set(frame.model_key) == set(MODELS)
    assert {"auc", "sensitivity", "specificity", "calibration_intercept"} <= set(frame.metric)
    assert not {"ad"} & set(evaluation.metrics.biomarker)  # no agreement metrics for a probability
    for key in MODELS:
        data = table[(table.biomarker == "ad") & (table.model_key == key)]
        overall = delong(data.reference, data.prediction)
        row = frame[(frame.model_key == key) & (frame.stratum == "overall") & (frame.metric == "auc")].iloc[0]
        assert row.estimate == pytest.approx(overall.auc, abs=1e-15)
        assert row.ci_low == pytest.approx(overall.ci_low, abs=1e-15)
        for site in ("S01", "S04"):
            at = data[data.site == site]
            found = frame[(frame.model_key == key) & (frame.stratum == "site") & (frame.level == site)
                          & (frame.metric == "auc")]
            if at.reference.sum() >= 5 and (1 - at.reference).sum() >= 5:
                assert found.estimate.iloc[0] == pytest.approx(delong(at.reference, at.prediction).auc)
            else:
                assert found.status.iloc[0] == "not estimable"
        direct = classification_by_stratum(data.reset_index(drop=True), "reference", "prediction",
                                           ["site", "vendor", "software_version"], threshold=0.5).to_frame()
        mine = frame[frame.model_key == key].drop(columns=["biomarker", "model_key"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, direct)
        sens = frame[(frame.model_key == key) & (frame.stratum == "overall") & (frame.metric == "sensitivity")]
        positives = data[data.reference == 1]
        assert sens.estimate.iloc[0] == pytest.approx((positives.prediction >= 0.5).mean())


def test_the_compared_versions_get_the_paired_delong_test_on_the_classification_biomarker(table, evaluation):
    frame = evaluation.discrimination
    assert frame.columns[0] == "biomarker"
    row = frame[frame.biomarker == "ad"]
    assert len(row) == 1 and (row.model_a.iloc[0], row.model_b.iloc[0]) == MODELS
    data = table[table.biomarker == "ad"]
    a = data[data.model_key == "seg@1"].set_index("scan_id").sort_index()
    b = data[data.model_key == "seg@2"].set_index("scan_id").sort_index()
    direct = delong(a.reference, b.prediction, a.prediction)
    assert row.difference.iloc[0] == pytest.approx(direct.difference, abs=1e-15)
    assert row.p.iloc[0] == pytest.approx(direct.p)
    assert row.auc_b.iloc[0] == pytest.approx(direct.auc) and row.auc_a.iloc[0] == pytest.approx(direct.auc2)


# --------------------------------------------------------------------------- overlap


def test_the_overlap_table_joins_the_strata(trial, evaluation):
    manifest, _, scores = trial
    joined = overlap_table(scores, manifest)
    assert list(joined.columns) == ["scan_id", "subject_id", "model_key", "biomarker", "label", "label_name", "site",
                                    "scanner_id", "vendor", "scanner_model", "software_version", "software_upgraded",
                                    "dice", "hd95_mm", "volume_ml", "reference_volume_ml", "volume_error_ml"]
    assert pd.api.types.is_string_dtype(joined.label) and len(joined) == len(scores)
    keys = list(zip(joined.model_key, joined.label, joined.scan_id))
    assert keys == sorted(keys)
    assert joined.software_upgraded.sum() == 2 * 2 * 4  # 4 upgraded scans x 2 models x 2 labels
    pd.testing.assert_frame_equal(evaluation.overlap, joined)
    with pytest.raises(SitebenchError, match="not in the manifest"):
        overlap_table(scores.assign(scan_id="nowhere"), manifest)


def test_overlap_by_stratum_summaries_equal_numpy(trial, evaluation):
    manifest, _, scores = trial
    joined = overlap_table(scores, manifest)
    frame = evaluation.overlap_by_stratum
    assert tuple(frame.columns) == OVERLAP_BY_STRATUM_COLUMNS
    assert "overlap_by_stratum.csv" in evaluation.result_files()
    for (key, label, stratum, level), row in frame.set_index(["model_key", "label", "stratum", "level"]).iterrows():
        part = joined[(joined.model_key == key) & (joined.label == label)]
        if stratum != "overall":
            part = part[part[stratum].astype(str) == level]
        dice = part.dice.dropna().to_numpy()
        assert row.n_scans == len(part) and row.n_dice_excluded == len(part) - len(dice)
        assert row.dice_mean == pytest.approx(np.mean(dice), abs=1e-15)
        assert row.hd95_median_mm == pytest.approx(np.median(part.hd95_mm.dropna()))
        assert row.hd95_p90_mm == pytest.approx(np.percentile(part.hd95_mm.dropna(), 90))
        assert row.volume_error_mean_ml == pytest.approx(part.volume_error_ml.mean())
        assert row.volume_error_sd_ml == pytest.approx(np.std(part.volume_error_ml, ddof=1))
        if stratum in ("overall", "vendor"):
            assert row.dice_ci_low <= row.dice_mean <= row.dice_ci_high
    s02 = frame[(frame.label == "53") & (frame.stratum == "site") & (frame.level == "S02")]
    assert (s02.n_dice_excluded == 1).all() and (s02.n_scans == 8).all()
    assert set(frame.label_name) == {"left", "right"}


def test_the_overlap_bootstrap_is_seeded_and_resamples_within_site():
    tiny = pd.DataFrame({"scan_id": ["a", "b", "c", "d", "e"], "model_key": "m", "biomarker": "x", "label": "1",
                         "label_name": "one", "site": ["S1", "S1", "S1", "S2", "S2"],
                         "dice": [0.5, 0.7, 0.9, 0.6, 0.8], "hd95_mm": 1.0, "volume_error_ml": 0.0})
    first = overlap_by_stratum(tiny, ["site"], n_boot=200, seed=7)
    pd.testing.assert_frame_equal(first, overlap_by_stratum(tiny, ["site"], n_boot=200, seed=7))
    # independent Rao-Wu draw: per site (sorted) k - 1 of k scans with replacement, each weighing k / (k - 1)
    rng = np.random.default_rng(7)
    dice = tiny.dice.to_numpy()
    weights = np.ones((200, 5))
    for rows in (np.arange(3), np.arange(3, 5)):
        k = len(rows)
        draws = rng.integers(0, k, size=(200, k - 1))
        for r in range(200):
            weights[r, rows] = np.bincount(draws[r], minlength=k) * k / (k - 1)
    replicates = weights @ dice / weights.sum(axis=1)
    overall = first[first.stratum == "overall"].iloc[0]
    assert overall.dice_mean == pytest.approx(0.7)
    low, high = np.quantile(replicates, [0.025, 0.975])
    assert (overall.dice_ci_low, overall.dice_ci_high) == pytest.approx((low, high), abs=1e-15)
    s2 = first[(first.stratum == "site") & (first.level == "S2")].iloc[0]
    s2_replicates = weights[:, 3:] @ dice[3:] / weights[:, 3:].sum(axis=1)
    assert (s2.dice_ci_low, s2.dice_ci_high) == pytest.approx(tuple(np.quantile(s2_replicates, [0.025, 0.975])))
    flat = overlap_by_stratum(tiny.assign(dice=0.8), ["site"], n_boot=50, seed=0)
    np.testing.assert_allclose(flat[["dice_mean", "dice_ci_low", "dice_ci_high"]].to_numpy(), 0.8, rtol=1e-12)


# --------------------------------------------------------------------------- what is locked


def test_the_result_files_survive_the_csv_round_trip(trial, table, evaluation):
    manifest, _, scores = trial
    again = evaluate_models(read_evaluation_csv(io.StringIO(evaluation_csv(table))), _plan(),
                            overlap=overlap_table(scores, manifest))
    files = evaluation.result_files()
    assert set(files) == LEGACY_FILES | {"classification_by_stratum.csv", "overlap_by_stratum.csv"}
    assert again.result_files() == files
    # the raw runner scores give the same as the joined ones (joined from the evaluation table's strata)
    raw = evaluate_models(table, _plan(), overlap=scores)
    assert raw.result_files()["overlap_by_stratum.csv"] == files["overlap_by_stratum.csv"]


def test_only_the_biomarkers_present_are_analysed(table):
    only = evaluate_models(table[table.biomarker != "ad"].reset_index(drop=True), _plan())
    assert only.classification.empty and "classification_by_stratum.csv" not in only.result_files()
    assert set(only.metrics.biomarker) == {"gm", "hippo"}
