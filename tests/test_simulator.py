"""The simulator is the project's independent reference, so its truth must be exact and seeded."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf

from sitebench.datasets import manifest as mf
from sitebench.datasets.simulator import GM, TrialConfig, simulate_trial


def test_manifest_validates_and_matches_files(small_trial):
    manifest = mf.read_manifest(small_trial.manifest_path)  # checks paths and every SHA-256
    table = manifest.table
    assert len(table) == 24
    assert set(table[mf.VENDOR]) == {"SIEMENS", "GE", "Philips"}
    assert table[mf.SCAN_ID].is_unique


@pytest.mark.slow
def test_same_seed_same_images(small_trial, tmp_path):
    settings = dict(small_trial.truth["config"], workers=1)  # the fixture's own trial, inline
    again = simulate_trial(TrialConfig(**settings), tmp_path / "again")
    assert list(again.manifest[mf.IMAGE_SHA256]) == list(small_trial.manifest[mf.IMAGE_SHA256])
    other = simulate_trial(TrialConfig(**dict(settings, seed=8)), tmp_path / "other")
    assert list(other.manifest[mf.IMAGE_SHA256]) != list(small_trial.manifest[mf.IMAGE_SHA256])


def test_label_maps_carry_the_true_gm_volume(small_trial):
    truth = {s["scan_id"]: s for s in small_trial.truth["scans"]}
    for row in small_trial.manifest.itertuples():
        label = nib.load(small_trial.out_dir / row.label_path)
        image = nib.load(small_trial.out_dir / row.image_path)
        assert label.shape == image.shape
        np.testing.assert_allclose(label.affine, image.affine)
        voxel_ml = abs(np.linalg.det(label.affine[:3, :3])) / 1000
        measured = float((np.asarray(label.dataobj) == GM).sum()) * voxel_ml
        assert measured == pytest.approx(truth[row.scan_id]["label_gm_volume_ml"], abs=1e-3)
        if row.slice_thickness_mm == 2.0 and row.site != "S05":
            # at the native grid with full coverage, the label map is the biological truth
            assert measured == pytest.approx(row.gm_volume_ml, rel=1e-6)


def test_coverage_site_misses_superior_slices(small_trial):
    table = small_trial.manifest
    shapes = {row.scan_id: nib.load(small_trial.out_dir / row.image_path).shape for row in table.itertuples()}
    s05 = table[table.site == "S05"].scan_id
    s02 = table[table.site == "S02"].scan_id  # same vendor, 2 mm, full coverage
    missing = small_trial.truth["coverage"]["missing_superior_mm"]
    assert {shapes[s][2] for s in s05} == {shapes[s][2] - int(round(missing / 2.0)) for s in s02}
    truth = {s["scan_id"]: s for s in small_trial.truth["scans"]}
    assert all(truth[s]["label_gm_volume_ml"] < truth[s]["gm_volume_ml"] for s in s05)


def test_story_events_follow_the_sites(tmp_path):
    """The default story folds into a small trial; short-coverage scans are re-scanned complete; explicit sites outside
    the trial are an error."""
    trial = simulate_trial(TrialConfig(n_sites=6, scans_per_site=4, seed=7, workers=1), tmp_path / "story")
    events = trial.truth["events"]
    assert {k: v["site"] for k, v in events.items()} == {
        "software_upgrade": "S01", "coverage_loss": "S06", "protocol_drift": "S03", "unmatched_series": "S03",
        "scanner_swap": "S04"}
    table = trial.manifest
    shapes = {row.scan_id: nib.load(trial.out_dir / row.image_path).shape[2] for row in table.itertuples()}
    short, rescans = set(events["coverage_loss"]["scans"]), events["coverage_loss"]["rescans"]
    assert short and rescans and len(table) == 24 + len(rescans)
    full = {shapes[s] for s in table[table.site == "S02"].scan_id}  # same 2 mm grid, full coverage
    assert {shapes[s] for s in short} == {f - 10 for f in full}
    assert all(original in short and shapes[rescan] in full for rescan, original in rescans.items())
    truth = {s["scan_id"]: s for s in trial.truth["scans"]}
    drifted = events["protocol_drift"]["scans"]
    assert drifted and all(truth[s]["protocol_drift"] for s in drifted)
    with pytest.raises(Exception, match="not one of the 6 sites"):
        TrialConfig(n_sites=6, upgrade={"site": "S07"})


def test_upgrade_changes_software_after_the_date(small_trial):
    table = mf.add_software_upgraded(small_trial.manifest)
    upgrade = small_trial.truth["upgrade"]
    site = table[table.site == upgrade["site"]]
    after = site[site.acquisition_date >= upgrade["date"]]
    before = site[site.acquisition_date < upgrade["date"]]
    assert set(after.software_version) == {"syngo MR XA30"}
    assert "syngo MR XA30" not in set(before.software_version)
    assert (table[table.site != upgrade["site"]].software_upgraded == 0).all()


@pytest.mark.slow
def test_injected_age_and_group_effects_are_in_the_truth(tmp_path):
    """Regressing the true GM fraction on age and group recovers the injected coefficients."""
    config = TrialConfig(n_sites=2, scans_per_site=30, sessions_per_subject=1, seed=3, workers=2,
                         coverage=None)
    trial = simulate_trial(config, tmp_path / "t")
    truth = pd.DataFrame(trial.truth["scans"]).merge(trial.manifest, on="scan_id")
    fit = smf.ols("gm_fraction ~ I(age - 70) + C(group)", truth).fit()
    effects = config.effects
    for term, value in (("I(age - 70)", effects.age_per_year), ("C(group)[T.patient]", effects.patient)):
        low, high = fit.conf_int().loc[term]
        assert low <= value <= high, (term, low, value, high)


def test_truth_file_lists_every_injected_effect(small_trial):
    truth = json.loads(small_trial.truth_path.read_text())
    for key in ("vendor_gm_wm_ratio", "vendor_effect_on_gm_wm_ratio", "upgrade", "coverage", "subject_effects",
                "scanners", "scans", "config", "code_version"):
        assert key in truth
    assert {s["scanner_id"] for s in truth["scanners"]} == set(small_trial.manifest[mf.SCANNER_ID])
