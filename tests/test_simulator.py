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
    rescans = small_trial.truth["events"]["coverage_loss"]["rescans"]
    assert len(table) == 24 + len(rescans) and rescans  # every planned scan, and each re-scan beside it
    assert set(table[mf.VENDOR]) == {"SIEMENS", "GE", "Philips"}
    assert table[mf.SCAN_ID].is_unique


@pytest.mark.slow
def test_same_seed_same_images(small_trial, tmp_path):
    again = simulate_trial(TrialConfig(n_sites=6, scans_per_site=4, seed=7, workers=1), tmp_path / "again")
    assert list(again.manifest[mf.IMAGE_SHA256]) == list(small_trial.manifest[mf.IMAGE_SHA256])
    other = simulate_trial(TrialConfig(n_sites=6, scans_per_site=4, seed=8, workers=1), tmp_path / "other")
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
        if row.slice_thickness_mm == 2.0 and truth[row.scan_id]["missing_superior_mm"] == 0:
            # at the native grid with full coverage, the label map is the biological truth
            assert measured == pytest.approx(row.gm_volume_ml, rel=1e-6)


def test_coverage_site_misses_superior_slices(small_trial):
    """S12's technologist (S06 in a 6-site trial) misses superior coverage on most scans; re-scans are complete."""
    table = small_trial.manifest
    shapes = {row.scan_id: nib.load(small_trial.out_dir / row.image_path).shape for row in table.itertuples()}
    event = small_trial.truth["events"]["coverage_loss"]
    site = table[table.site == event["site"]]
    short = set(event["scans"])
    assert short and short <= set(site.scan_id)
    full = int(round(event["missing_superior_mm"] / 2.0))
    reference = {shapes[s][2] for s in table[(table.site == "S02")].scan_id}  # same 2 mm grid, full coverage
    assert {shapes[s][2] for s in short} == {r - full for r in reference}
    for rescan, original in event["rescans"].items():
        assert original in short and shapes[rescan][2] in reference
    truth = {s["scan_id"]: s for s in small_trial.truth["scans"]}
    assert all(truth[s]["label_gm_volume_ml"] < truth[s]["gm_volume_ml"] for s in short)


def test_story_events_follow_the_sites(small_trial):
    """Default event sites fold into a small trial; explicit ones outside it are an error."""
    events = small_trial.truth["events"]
    assert {k: v["site"] for k, v in events.items()} == {
        "software_upgrade": "S01", "coverage_loss": "S06", "protocol_drift": "S03", "unmatched_series": "S03",
        "scanner_swap": "S04"}
    drifted = events["protocol_drift"]["scans"]
    truth = {s["scan_id"]: s for s in small_trial.truth["scans"]}
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
    # every scanner that scanned is in the truth (a swapped-out one may have had no scan in a small trial)
    assert set(small_trial.manifest[mf.SCANNER_ID]) <= {s["scanner_id"] for s in truth["scanners"]}
