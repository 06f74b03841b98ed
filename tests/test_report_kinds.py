"""A validation report follows the biomarkers it holds: continuous ones (each in its own unit), a classification
biomarker (AUC per site with DeLong CIs, sensitivity/specificity at its threshold), segmentation overlap per label,
the model cards, and a checklist that says "not applicable" for a kind the report does not hold.

The evaluation is real: ``evaluate_models`` on a seeded synthetic trial of 6 sites, 2 vendors and 2 model
versions, with two continuous biomarkers in different units, one class probability and per-label overlap
scores; the report content is built by hand from it, as the pipeline would.
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from sitebench.reports import figures
from sitebench.reports.content import LOCKED_PREDICTION_COLUMNS, ReportContent
from sitebench.reports.findings import findings
from sitebench.reports.sections import SECTIONS, _locked_tables, checklists, render_html
from sitebench.reports.summary import decisions
from sitebench.reports.tables import MAX_COLUMNS, is_code_name
from sitebench.stratification.evaluation import AnalysisPlan, evaluate_models, evaluation_table
from test_report_readable import _Page

SITES = ("S01", "S02", "S03", "S04", "S05", "S06")
VENDORS = {"S01": "GE", "S02": "GE", "S03": "GE", "S04": "Siemens", "S05": "Siemens", "S06": "Siemens"}
MODELS = ("hippo@1", "hippo@2")
LABELS = {17: "left hippocampus", 53: "right hippocampus"}
BIOMARKERS = [
    {"name": "hippocampus_volume", "kind": "label_volume", "analysis": "continuous", "unit": "ml",
     "description": "left + right hippocampus", "threshold": None, "reference_column": "hippo_ml",
     "reference_positive": None, "reference_labels": [17, 53], "equivalence_margin": 0.5,
     "label_names": {"17": "left hippocampus", "53": "right hippocampus"}},
    {"name": "brain_age", "kind": "regression", "analysis": "continuous", "unit": "years",
     "description": "predicted brain age", "threshold": None, "reference_column": "age_ref",
     "reference_positive": None, "reference_labels": None, "equivalence_margin": None, "label_names": {}},
    {"name": "ad_probability", "kind": "class_probability", "analysis": "classification", "unit": "",
     "description": "probability of Alzheimer's disease", "threshold": 0.4, "reference_column": "diagnosis",
     "reference_positive": "AD", "reference_labels": None, "equivalence_margin": None, "label_names": {}},
]
FULL_HASH = "ab12cd34ef56" + "0" * 52


def _trial(n: int = 10, seed: int = 7) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Manifest, predictions (one row per scan, model and biomarker) and per-scan overlap scores."""
    rng = np.random.default_rng(seed)
    manifest, predictions, overlap = [], [], []
    for site in SITES:
        for i in range(n):
            scan = f"{site}-{i:02d}"
            upgraded = site == "S02" and i >= n // 2
            ad = i % 2 == 0
            row = {"scan_id": scan, "subject_id": f"sub-{scan}", "session": "1", "site": site,
                   "scanner_id": f"{site}-A", "vendor": VENDORS[site], "scanner_model": "M",
                   "software_version": "2.0" if upgraded else "1.0", "field_strength": 3.0,
                   "acquisition_date": f"2025-01-{i + 1:02d}", "image_path": f"{scan}.nii.gz",
                   "image_sha256": "0" * 64, "age": 60 + i, "sex": "F" if i % 3 else "M",
                   "group": "patient" if ad else "control", "hippo_ml": rng.normal(7.0, 0.6) - (1.0 if ad else 0),
                   "age_ref": 60 + i + rng.normal(0, 2), "diagnosis": "AD" if ad else "CN"}
            manifest.append(row)
            for k, model in enumerate(MODELS):
                bias = 0.8 if (model == "hippo@1" and site == "S05") else 0.0
                logit = (2.2 if ad else -1.6) + rng.normal(0, 1.3 if site != "S06" else 2.5)
                values = {"hippocampus_volume": row["hippo_ml"] + bias + rng.normal(0, 0.15),
                          "brain_age": row["age_ref"] + rng.normal(0, 3) + (2 if k == 0 else 0),
                          "ad_probability": 1 / (1 + np.exp(-logit))}
                for name, value in values.items():
                    predictions.append({"scan_id": scan, "model_key": model, "biomarker": name,
                                        "weights_sha256": f"{k}" * 64, "image_sha256": "0" * 64,
                                        "prediction": value, "dice": None})
                for label, label_name in LABELS.items():
                    dice = float(np.clip(rng.normal(0.86 - (0.1 if site == "S03" else 0) + 0.02 * k, 0.03), 0, 1))
                    volume = row["hippo_ml"] / 2 + rng.normal(0, 0.1)
                    overlap.append({"scan_id": scan, "model_key": model, "biomarker": "hippocampus_volume",
                                    "label": label, "label_name": label_name, "dice": dice,
                                    "hd95_mm": float(abs(rng.normal(2.0, 0.5))), "volume_ml": volume,
                                    "reference_volume_ml": row["hippo_ml"] / 2,
                                    "volume_error_ml": volume - row["hippo_ml"] / 2})
    return pd.DataFrame(manifest), pd.DataFrame(predictions), pd.DataFrame(overlap)


def _plan(**extra) -> AnalysisPlan:
    return AnalysisPlan(strata=["site", "vendor", "software_version"], bootstrap=30, seed=0, equivalence_margin=None,
                        compare=[list(MODELS)], comparison_margin=0.3, **extra)


@pytest.fixture(scope="module")
def trial():
    return _trial()


@pytest.fixture(scope="module")
def evaluation(trial):
    manifest, predictions, overlap = trial
    table = evaluation_table(predictions, manifest, None, biomarkers=BIOMARKERS)
    return evaluate_models(table, _plan(biomarkers=BIOMARKERS), list(MODELS), overlap=overlap)


def _models() -> list[dict]:
    return [{"key": key, "name": "hippo", "version": key.split("@")[1], "kind": "bundle",
             "weights_sha256": FULL_HASH, "source": "zoo:hippo", "licence": "Apache-2.0",
             "citation": "Doe et al. 2025, Hippocampus segmentation, J Imaging 1:1",
             "biomarkers": ["hippocampus_volume", "brain_age", "ad_probability"],
             "files": {"models/model.pt": FULL_HASH, "configs/inference.json": "9" * 64},
             "files_sha256": "7" * 64, "training_data": "ADNI-like cohort, 800 scans, GE and Siemens",
             "training": {}, "registered": "-"} for key in MODELS]


def _content(evaluation, trial, **changes) -> ReportContent:
    manifest, predictions, overlap = trial
    content = ReportContent(name="kinds", title="Validation report: kinds", evaluation=evaluation, models=_models(),
                            predictions=predictions, reference="hippo_ml", materials={}, seeds={"seed": 0},
                            unit="ml", biomarkers=[dict(b) for b in BIOMARKERS], overlap_scores=overlap)
    return replace(content, **changes)


def _section_html(page: str, section_id: str) -> str:
    match = re.search(rf"<section id='{section_id}'>(.*?)</section>(?=\s*<section|\s*</body>)", page, re.S)
    assert match, section_id
    return match.group(1)


@pytest.fixture(scope="module")
def page(evaluation, trial):
    return render_html(_content(evaluation, trial), 1)


def test_each_continuous_biomarker_has_its_sections_in_its_own_unit(page):
    ids = re.findall(r"<section id='([a-z-]+)'>", page)
    for sid in ("results-strata", "results-agreement", "results-calibration", "results-variance",
                "results-harmonization", "results-upgrade", "results-equivalence", "comparison",
                "results-classification", "results-overlap"):
        assert sid in ids, sid
    assert ids.index("comparison") < ids.index("results-classification") < ids.index("results-overlap") \
        < ids.index("limitations")
    strata = _section_html(page, "results-strata")
    assert "Biomarker hippocampus_volume (ml): left + right hippocampus" in strata
    assert "Biomarker brain_age (years): predicted brain age" in strata
    assert "MAE (years), 95% CI" in strata and "MAE (ml), 95% CI" in strata
    assert "ad_probability" not in strata  # the classification biomarker is not a measurement
    # the hippocampus margin is the biomarker's own (±0.5 ml); brain age declares none
    equivalence = _section_html(page, "results-equivalence")
    assert "±0.5 ml" in equivalence and "No equivalence margin was pre-specified" in equivalence
    # numbering: the kind sections are 13 and 14, the rest move down
    assert "13. Classification" in page and "14. Segmentation overlap" in page and "15. Limitations" in page
    assert "17. Provenance" in page


def test_classification_section_shows_auc_per_site_with_cis_and_the_threshold(page, evaluation):
    section = _section_html(page, "results-classification")
    assert "Biomarker ad_probability (no unit): probability of Alzheimer" in section
    assert "at least 0.4 (pre-specified threshold)" in section and "Sensitivity at ≥ 0.4 (95% CI)" in section
    assert "diagnosis = AD" in section and "AUC by site" in section and "<img" in section
    per_site = section.split("<h4>Per site</h4>")[1].split("</table>")[0]
    table = evaluation.classification
    auc = table[(table["biomarker"] == "ad_probability") & (table["metric"] == "auc")]
    for site in SITES:
        for key in MODELS:
            row = auc[(auc["stratum"] == "site") & (auc["level"] == site) & (auc["model_key"] == key)].iloc[0]
            assert pd.notna(row["estimate"]), (site, key)
            assert f"{row['estimate']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]" in per_site, (site, key)
    assert "Per scanner software version" in section and "paired DeLong" in section


def test_overlap_section_shows_dice_per_label(page, evaluation):
    section = _section_html(page, "results-overlap")
    assert "left hippocampus (label 17)" in section and "right hippocampus (label 53)" in section
    assert "Mean Dice (95% CI)" in section and "HD95 median (mm)" in section and "Dice by site" in section
    overall = evaluation.overlap_by_stratum
    row = overall[(overall["stratum"] == "overall") & (overall["label"].astype(str) == "17") &
                  (overall["model_key"] == MODELS[1])].iloc[0]
    assert f"{row['dice_mean']:.3f} [{row['dice_ci_low']:.3f}, {row['dice_ci_high']:.3f}]" in section


def test_tables_stay_narrow_with_human_headers_and_figures_are_captioned(page):
    parsed = _Page()
    parsed.feed(page)
    for table in parsed.tables:
        assert max(table["widths"], default=0) <= MAX_COLUMNS, table["headers"]
        for head in table["headers"]:
            assert head and not is_code_name(head), head
    for image in parsed.images:
        assert image["in_figure"] and image["caption"], image


def test_model_card_shows_licence_citation_biomarkers_training_data_and_hashes(page):
    models = _section_html(page, "models")
    assert "Model cards" in models and "Apache-2.0" in models and "Doe et al. 2025" in models
    assert "hippocampus_volume, brain_age, ad_probability" in models and "ADNI-like cohort" in models
    assert "models/model.pt ab12cd34ef56…" in models and FULL_HASH not in models.split("Model cards")[1]
    appendix = _section_html(page, "appendix-tables")
    assert "Model files" in appendix and FULL_HASH in appendix and "configs/inference.json" in appendix


def test_checklist_follows_the_kinds_present(evaluation, trial, page):
    by_kind = [(g, item) for g, guideline in checklists()["guidelines"].items() for item in guideline["items"]
               if item.get("by_kind")]
    ids = {s for s, _, _ in SECTIONS}
    assert by_kind and all(target in ids for _, item in by_kind for target in item["by_kind"].values())
    checklist = _section_html(page, "checklist")
    row = re.search(r"<td>23a</td>.*?</tr>", checklist).group(0)
    assert "href='#results-classification'" in row and "href='#results-overlap'" in row
    assert "href='#results-strata'" in row and "not applicable" not in row
    # no segmentation and no classification: those items say so instead of pointing nowhere
    no_overlap = replace(evaluation)
    no_overlap.overlap_by_stratum, no_overlap.overlap = pd.DataFrame(), pd.DataFrame()
    bare = render_html(_content(no_overlap, trial, biomarkers=[dict(b) for b in BIOMARKERS[:2]],
                                overlap_scores=None), 1)
    assert "id='results-classification'" not in bare and "id='results-overlap'" not in bare
    checklist = _section_html(bare, "checklist")
    row = re.search(r"<td>23a</td>.*?</tr>", checklist).group(0)
    assert "href='#results-strata'" in row
    assert "not applicable: no classification biomarker in this report" in row
    assert "no segmentation biomarker in this report" in row
    assert "13. Limitations" in bare  # no kind sections: the legacy numbering
    # only a classification biomarker: the continuous sections say so, the checklist too
    only_class = render_html(_content(no_overlap, trial, biomarkers=[dict(BIOMARKERS[2])], overlap_scores=None), 1)
    assert "Not applicable: no continuous biomarker in this report." in _section_html(only_class, "results-strata")
    row = re.search(r"<td>23b</td>.*?</tr>", _section_html(only_class, "checklist")).group(0)
    assert "href='#results-classification'" in row and "no continuous biomarker in this report" in row


def test_first_page_and_findings_give_each_biomarkers_headline(evaluation, trial, page):
    found = decisions(evaluation, "ml", biomarkers=BIOMARKERS)
    topics = {d.topic for d in found}
    assert "hippocampus_volume (ml): Equivalence across sites" in topics
    assert "brain_age (years): Version comparison" in topics
    auc = [d for d in found if d.topic == "ad_probability: discrimination"]
    assert {d.model for d in auc} == set(MODELS)
    table = evaluation.classification
    cell = table[(table["biomarker"] == "ad_probability") & (table["stratum"] == "overall") &
                 (table["metric"] == "auc") & (table["model_key"] == MODELS[0])].iloc[0]
    first = next(d for d in auc if d.model == MODELS[0])
    assert first.estimate == cell["estimate"] and first.ci == (cell["ci_low"], cell["ci_high"])
    assert "threshold 0.4" in first.criterion and "sensitivity" in first.detail
    (paired,) = [d for d in found if d.topic == "ad_probability: version comparison"]
    assert paired.model == "hippo@2 vs hippo@1" and "paired DeLong" in paired.criterion
    assert any(d.topic == "Segmentation overlap: left hippocampus" for d in found)
    brain = next(d for d in found if d.topic.startswith("brain_age") and d.kind == "num" and d.estimate is not None)
    assert brain.unit == "years"
    summary = _section_html(page, "summary")
    assert "ad_probability: discrimination" in summary and "Segmentation overlap: left hippocampus" in summary
    assert "3 biomarkers" in summary
    notes = findings([], evaluation, biomarkers=BIOMARKERS)
    assert any(n.startswith("ad_probability: hippo@1 discriminates diagnosis = AD with AUC") for n in notes)
    assert any("mean Dice" in n and "left hippocampus" in n for n in notes)
    assert any(n.startswith("brain_age (years): Largest site bias") and n.endswith("years.") for n in notes)


def test_locked_tables_list_overlap_scores_and_the_new_results(evaluation, trial):
    content = _content(evaluation, trial)
    tables = {name: (what, cols) for name, what, _, cols in _locked_tables(content)}
    assert "overlap_scores.csv" in tables and "label_name" in tables["overlap_scores.csv"][1]
    assert "Dice" in tables["overlap_scores.csv"][0]
    predictions = tables["predictions.csv"][1]
    assert predictions == ["scan_id", "model_key", "biomarker", "weights_sha256", "image_sha256", "prediction",
                           "dice"]
    for name, (what, _) in tables.items():
        assert what, name
    legacy = [c for c in LOCKED_PREDICTION_COLUMNS if c in ("scan_id", "model_key", "weights_sha256",
                                                           "image_sha256", "prediction", "dice")]
    assert legacy == ["scan_id", "model_key", "weights_sha256", "image_sha256", "prediction", "dice"]


def test_new_figures_draw_on_given_axes_and_return_the_figure(evaluation, trial):
    plt = figures.pyplot()
    fig, ax = plt.subplots()
    assert figures.auc_forest_plot(evaluation.classification, "site", ax=ax) is fig and ax.has_data()
    plt.close(fig)
    manifest, _, overlap = trial
    scans = overlap.merge(manifest[["scan_id", "site"]], on="scan_id")
    fig, axes = plt.subplots(1, 2)
    assert figures.dice_by_site_plot(scans, axes=axes) is fig and all(a.has_data() for a in axes)
    plt.close("all")


def test_a_legacy_report_renders_without_the_new_sections(trial):
    manifest, predictions, _ = trial
    preds = predictions[predictions["biomarker"] == "hippocampus_volume"].drop(columns="biomarker")
    table = evaluation_table(preds, manifest, "hippo_ml")
    legacy = evaluate_models(table, replace(_plan(), bootstrap=20, equivalence_margin=0.5), list(MODELS))
    models = [{k: v for k, v in m.items() if k not in ("licence", "citation", "biomarkers", "files", "files_sha256",
                                                      "training_data")} for m in _models()]
    content = ReportContent(name="legacy", title="Validation report: legacy", evaluation=legacy, models=models,
                            predictions=preds, reference="hippo_ml", materials={}, seeds={})
    page = render_html(content, 1)
    for absent in ("id='results-classification'", "id='results-overlap'", "Model cards", "Biomarker ",
                   "not applicable", "Model files", "overlap_scores.csv"):
        assert absent not in page, absent
    for title in ("12. Model versions side by side", "13. Limitations", "14. Reporting checklist", "15. Provenance",
                  "5. Performance per site, vendor and software version"):
        assert title in page, title
    assert "MAE (ml), 95% CI" in page and "±0.5 ml" in page
    assert "against the reference standard (manifest column hippo_ml)" in page


def test_recompute_rederives_a_multi_biomarker_lock_with_its_overlap_scores(evaluation, trial, tmp_path):
    """verify --recompute on a lock with declared biomarkers: the table is rebuilt with them, overlap re-read."""
    from sitebench.reports.lock import write_lock
    from sitebench.reports.recompute import recompute_report
    from sitebench.stratification.evaluation import evaluation_csv

    manifest, predictions, overlap = trial
    report = tmp_path / "reports" / "kinds" / "v001"
    tables = report / "tables"
    tables.mkdir(parents=True)
    manifest_path = tmp_path / "manifest.csv"
    manifest.to_csv(manifest_path, index=False)
    locked = predictions[[c for c in LOCKED_PREDICTION_COLUMNS if c in predictions]].sort_values(
        ["model_key", "scan_id"], kind="stable")
    subjects = {}
    for name, text in (("predictions", evaluation_csv(locked)), ("evaluation", evaluation_csv(evaluation.table)),
                       ("overlap_scores", evaluation_csv(overlap))):
        (tables / f"{name}.csv").write_text(text)
        subjects[f"table:{name}"] = tables / f"{name}.csv"
    for file_name, data in evaluation.result_files().items():
        (tables / file_name).write_bytes(data)
        subjects[f"table:{file_name.rsplit('.', 1)[0]}"] = tables / file_name
    analysis = {"plan": evaluation.plan.to_dict(), "reference": "hippo_ml", "model_keys": list(MODELS), "unit": "ml"}
    write_lock(report, subjects, {"data manifest": manifest_path}, {"name": "kinds", "version": 1}, {}, analysis)
    result = recompute_report(report)
    assert not result.problems and not result.not_done, result.problems + result.not_done
    assert {"evaluation", "metrics_by_stratum", "classification_by_stratum", "overlap_by_stratum",
            "discrimination", "mixed_models"} <= set(result.checked)
    # a changed overlap score is caught: the per-stratum Dice no longer reproduces
    scores = (tables / "overlap_scores.csv").read_text().splitlines()
    cells = scores[1].split(",")
    dice = scores[0].split(",").index("dice")
    cells[dice] = str(float(cells[dice]) - 0.2)
    scores[1] = ",".join(cells)
    (tables / "overlap_scores.csv").write_text("\n".join(scores) + "\n")
    assert any("overlap_by_stratum differs" in p for p in recompute_report(report).problems)


def test_every_new_locked_column_has_a_human_header(evaluation, trial):
    from sitebench.reports.tables import COLUMNS, header

    frames = {**evaluation.result_tables(), "evaluation": evaluation.table, "overlap_scores": trial[2],
              "overlap": evaluation.overlap}
    assert {"classification_by_stratum", "overlap_by_stratum"} <= set(frames)
    for stem, frame in frames.items():
        for column in frame.columns:
            assert column in COLUMNS, f"{stem}.{column} has no entry in the header registry"
            assert not is_code_name(header(column, "ml")), (stem, column)
