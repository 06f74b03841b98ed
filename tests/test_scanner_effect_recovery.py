"""The mixed model recovers what the simulator injected: vendor contrast and the software upgrade.

The simulator injects each vendor's grey/white intensity ratio and the upgrade's
shift of it; they are recorded in truth.json. Here the ratio is measured from the
written images (eroded tissue cores from the label maps, so partial volume does not
enter) and the scanner-effect model must put each injected effect inside its 95% CI.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from sitebench.datasets import manifest as mf
from sitebench.datasets.simulator import GM, WM, TrialConfig, simulate_trial
from sitebench.stratification import fit_scanner_effects

pytestmark = pytest.mark.slow  # simulates a trial and fits it end to end


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    config = TrialConfig(n_sites=20, scans_per_site=6, seed=11, workers=2, coverage=None)
    trial = simulate_trial(config, tmp_path_factory.mktemp("recovery"))
    ratios = []
    for row in trial.manifest.itertuples():
        image = np.asarray(nib.load(trial.out_dir / row.image_path).dataobj, dtype=np.float32)
        labels = np.asarray(nib.load(trial.out_dir / row.label_path).dataobj)
        gm = ndimage.binary_erosion(labels == GM)
        wm = ndimage.binary_erosion(labels == WM, iterations=2)
        ratios.append(float(np.median(image[gm]) / np.median(image[wm])))
    table = mf.add_software_upgraded(trial.manifest.assign(gm_wm_ratio=ratios))
    return table, trial.truth


def test_vendor_and_upgrade_effects_inside_their_95_ci(measured):
    table, truth = measured
    fit = fit_scanner_effects(table, "gm_wm_ratio", fixed=["C(vendor)", "software_upgraded"])
    effects = fit.to_dict()["fixed_effects"]
    ratio = truth["vendor_gm_wm_ratio"]
    reference = sorted(ratio)[0]  # treatment coding: first level alphabetically
    expected = {f"C(vendor)[T.{v}]": ratio[v] - ratio[reference] for v in ratio if v != reference}
    expected["software_upgraded"] = truth["upgrade"]["gm_wm_ratio_shift"]
    for term, value in expected.items():
        est = effects[term]
        assert est["ci_low"] <= value <= est["ci_high"], (term, est, value)
    # and the estimates are informative: every injected effect is distinguished from zero
    for term in expected:
        assert effects[term]["ci_low"] > 0 or effects[term]["ci_high"] < 0, (term, effects[term])
    assert fit.to_dict()["converged"]


def test_site_variance_is_of_the_injected_size(measured):
    table, truth = measured
    fit = fit_scanner_effects(table, "gm_wm_ratio", fixed=["C(vendor)", "software_upgraded"]).to_dict()
    injected = truth["site_gm_wm_ratio_sd"] ** 2 + truth["scanner_gm_wm_ratio_sd"] ** 2
    between = (fit["variance_components"]["site"] or 0) + (fit["variance_components"]["scanner"] or 0)
    # 20 sites give a rough estimate: within a factor of 4 of the injected between-scanner variance
    assert injected / 4 <= between <= injected * 4, (between, injected)


def test_ignoring_the_upgrade_biases_the_vendor_estimate_at_that_vendor(measured):
    """A negative control: the test above can fail. Drop the upgrade term and the SIEMENS estimate moves."""
    table, truth = measured
    full = fit_scanner_effects(table, "gm_wm_ratio", fixed=["C(vendor)", "software_upgraded"]).to_dict()
    naive = fit_scanner_effects(table, "gm_wm_ratio", fixed=["C(vendor)"]).to_dict()
    term = "C(vendor)[T.SIEMENS]"
    shift = naive["fixed_effects"][term]["estimate"] - full["fixed_effects"][term]["estimate"]
    assert shift > 0  # the upgraded SIEMENS site's brighter GM leaks into the vendor effect
    assert not pd.isna(shift)
