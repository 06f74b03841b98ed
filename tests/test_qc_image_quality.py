"""Image-quality metrics against analytically known truth (synthetic phantoms, simulator noise)."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.stats import norm

from sitebench.errors import SitebenchError
from sitebench.qc.image_quality import METRIC_KEYS, ImageQuality, efc, image_quality, image_quality_nifti

N = 64
MU = {"csf": 30.0, "gm": 60.0, "wm": 100.0}
SIGMA_T = 4.0  # Gaussian noise in tissue
SIGMA_BG = 3.0  # Rician (Rayleigh) noise of zero signal in the air
RAYLEIGH_STD = math.sqrt((4 - math.pi) / 2)  # std of a Rayleigh(sigma=1)
GE_REF = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom" / "dcm_qa_deident" / "Ref"


def _labels(n: int = N) -> np.ndarray:
    g = np.indices((n, n, n)).astype(float) - (n - 1) / 2
    r = np.sqrt((g ** 2).sum(0))
    lab = np.zeros((n, n, n), np.uint8)
    lab[r < 26] = 1
    lab[r < 20] = 2
    lab[r < 13] = 3
    return lab


def _phantom(seed: int = 0, sigma_bg: float = SIGMA_BG, sigma_t: float = SIGMA_T):
    rng = np.random.default_rng(seed)
    lab = _labels()
    lut = np.array([0.0, MU["csf"], MU["gm"], MU["wm"]])
    tissue = lut[lab] + sigma_t * rng.standard_normal(lab.shape)
    air = sigma_bg * np.hypot(rng.standard_normal(lab.shape), rng.standard_normal(lab.shape))
    return np.where(lab > 0, tissue, air).astype(np.float32), lab


@pytest.fixture(scope="module")
def phantom():
    return _phantom()


@pytest.fixture(scope="module")
def phantom_iq(phantom):
    img, lab = phantom
    return image_quality(img, (1.0, 1.0, 1.0), labels=lab)


def test_api_shape(phantom_iq):
    assert isinstance(phantom_iq, ImageQuality)
    assert set(phantom_iq.metrics) == set(METRIC_KEYS)
    d = phantom_iq.to_dict()
    assert set(d) == {"metrics", "notes"} and d["metrics"] == phantom_iq.metrics
    assert "snr_total" in phantom_iq.summary()
    assert all(v is not None and math.isfinite(v) for v in phantom_iq.metrics.values())


def test_snr_cnr_cjv_match_formulas(phantom_iq):
    m = phantom_iq.metrics
    for t in ("csf", "gm", "wm"):
        assert m[f"snr_{t}"] == pytest.approx(MU[t] / SIGMA_T, rel=0.05)
    assert m["snr_total"] == pytest.approx(np.mean([MU[t] / SIGMA_T for t in MU]), rel=0.05)
    sigma_air = SIGMA_BG * RAYLEIGH_STD  # std of the air voxels
    cnr = abs(MU["gm"] - MU["wm"]) / math.sqrt(sigma_air ** 2 + 2 * SIGMA_T ** 2)
    assert m["cnr"] == pytest.approx(cnr, rel=0.05)
    assert m["cjv"] == pytest.approx(2 * SIGMA_T / (MU["wm"] - MU["gm"]), rel=0.05)
    # Dietrich: the Rayleigh air std, corrected, gives back the Gaussian noise sigma
    assert m["snrd_total"] == pytest.approx(np.mean([MU[t] / SIGMA_BG for t in MU]), rel=0.05)


def test_wm2max_matches_analytic_percentile(phantom, phantom_iq):
    _, lab = phantom
    wm_frac = float((lab == 3).mean())
    # the top 0.05% of the image lies in the WM tail: P(WM voxel > p) = 0.0005 / wm_frac
    p9995 = MU["wm"] + SIGMA_T * norm.ppf(1 - 0.0005 / wm_frac)
    assert phantom_iq.metrics["wm2max"] == pytest.approx(MU["wm"] / p9995, rel=0.02)


def test_fber_matches_energy_ratio_and_prefers_clean_background(phantom, phantom_iq):
    _, lab = phantom
    lut = np.array([0.0, MU["csf"], MU["gm"], MU["wm"]])
    fg = float(np.mean(lut[lab[lab > 0]] ** 2)) + SIGMA_T ** 2
    bg = 2 * SIGMA_BG ** 2  # E[R^2] of a Rayleigh(sigma)
    assert phantom_iq.metrics["fber"] == pytest.approx(fg / bg, rel=0.10)
    noisy_img, noisy_lab = _phantom(seed=1, sigma_bg=10.0)
    noisy = image_quality(noisy_img, (1, 1, 1), labels=noisy_lab)
    assert phantom_iq.metrics["fber"] > 5 * noisy.metrics["fber"]
    assert noisy.metrics["snrd_total"] < phantom_iq.metrics["snrd_total"]


def test_gmm_masks_without_labels(phantom, phantom_iq):
    img, _ = phantom
    auto = image_quality(img, (1.0, 1.0, 1.0))
    assert any("Gaussian mixture" in n for n in auto.notes)
    assert auto.metrics["snr_wm"] == pytest.approx(MU["wm"] / SIGMA_T, rel=0.05)
    assert auto.metrics["cjv"] == pytest.approx(2 * SIGMA_T / (MU["wm"] - MU["gm"]), rel=0.10)
    assert auto.metrics["cnr"] == pytest.approx(phantom_iq.metrics["cnr"], rel=0.10)


def test_efc_bounds_and_monotonic(phantom):
    assert efc(np.ones((8, 8, 8))) == pytest.approx(1.0)  # all energy spread evenly: max entropy
    spike = np.zeros((8, 8, 8))
    spike[4, 4, 4] = 10
    assert efc(spike) == pytest.approx(0.0, abs=1e-12)  # all energy in one voxel
    img, lab = phantom
    sharp = image_quality(img, (1, 1, 1), labels=lab).metrics["efc"]
    blurred = image_quality(ndimage.gaussian_filter(img, 3.0), (1, 1, 1), labels=lab).metrics["efc"]
    assert 0 < sharp < blurred < 1


@pytest.mark.parametrize("voxel, fwhm_mm", [((1.0, 1.0, 1.0), 2.0), ((1.0, 1.0, 2.0), 4.0)])
def test_fwhm_of_smoothed_noise(voxel, fwhm_mm):
    rng = np.random.default_rng(3)
    lab = _labels()
    sigma_vox = [fwhm_mm / (2 * math.sqrt(2 * math.log(2))) / v for v in voxel]
    noise = ndimage.gaussian_filter(rng.standard_normal(lab.shape), sigma_vox, mode="wrap")
    noise *= 5.0 / noise.std()
    air = SIGMA_BG * np.hypot(rng.standard_normal(lab.shape), rng.standard_normal(lab.shape))
    img = np.where(lab > 0, 100.0 + noise, air)
    m = image_quality(img, voxel, labels=lab).metrics
    for key in ("fwhm_x", "fwhm_y", "fwhm_z", "fwhm_avg"):
        assert m[key] == pytest.approx(fwhm_mm, rel=0.15), key


def test_qi1_rises_with_background_artefact(phantom, phantom_iq):
    img, lab = phantom
    assert phantom_iq.metrics["qi_1"] < 0.001  # pure Rayleigh noise: no artefact
    ghost = img.copy()
    ghost[:, :4, :] += 40.0  # a bright band in the air (e.g. a ghost / fold-over)
    m = image_quality(ghost, (1, 1, 1), labels=lab).metrics
    # the band lies wholly in the air (head radius 26 + 3 voxels dilation ends at y = 2.5)
    n_air = N ** 3 - 4 / 3 * math.pi * 29 ** 3
    expected = 4 * N * N / n_air
    assert 0.8 * expected < m["qi_1"] < 1.1 * expected


def test_zero_filled_background_gives_none_with_note(phantom):
    img, lab = phantom
    zf = np.where(lab > 0, img, 0.0)
    iq = image_quality(zf, (1, 1, 1), labels=lab)
    for key in ("snrd_total", "fber", "qi_1"):
        assert iq.metrics[key] is None
    assert any("zero-filled" in n for n in iq.notes)
    assert iq.metrics["snr_wm"] == pytest.approx(MU["wm"] / SIGMA_T, rel=0.05)
    assert iq.metrics["cnr"] == pytest.approx(40 / math.sqrt(2 * SIGMA_T ** 2), rel=0.05)
    assert iq.metrics["efc"] is not None and 0 < iq.metrics["efc"] < 1


def test_partly_zero_filled_background_uses_nonzero_air(phantom, phantom_iq):
    img, lab = phantom
    part = img.copy()
    part[:, :, :8] = np.where(lab[:, :, :8] > 0, part[:, :, :8], 0.0)  # zeroed slab outside the head
    iq = image_quality(part, (1, 1, 1), labels=lab)
    assert any("exactly 0" in n for n in iq.notes)
    assert iq.metrics["snrd_total"] == pytest.approx(phantom_iq.metrics["snrd_total"], rel=0.05)
    assert iq.metrics["fber"] == pytest.approx(phantom_iq.metrics["fber"], rel=0.05)


def test_bad_inputs_raise_sitebench_error(phantom, tmp_path):
    img, lab = phantom
    with pytest.raises(SitebenchError):
        image_quality(img[0], (1, 1, 1))
    with pytest.raises(SitebenchError):
        image_quality(np.zeros((8, 8, 8)), (1, 1, 1))
    with pytest.raises(SitebenchError):
        image_quality(img, (1, 1, 1), labels=lab[:-1])
    with pytest.raises(SitebenchError):
        image_quality_nifti(tmp_path / "missing.nii.gz")


def test_simulator_noise_ordering(tmp_path):
    """Same subject on S01 before and after the software upgrade (noise x1.6)."""
    from sitebench.datasets.simulator import TrialConfig, simulate_trial

    trial = simulate_trial(TrialConfig(n_sites=1, scans_per_site=2, seed=7, workers=1, coverage=None, scanner_swap=None,
                                       protocol_drift=None), tmp_path)
    scans = {s["upgraded"]: s for s in trial.truth["scans"]}
    assert set(scans) == {False, True}, "seed 7 should give one scan before and one after the upgrade"
    noise_ratio = scans[True]["noise_sigma_rel"] / scans[False]["noise_sigma_rel"]
    assert noise_ratio == pytest.approx(1.6, rel=0.01)
    iq = {}
    for upgraded, s in scans.items():
        sid = s["scan_id"]
        iq[upgraded] = image_quality_nifti(tmp_path / "images" / f"{sid}_T1w.nii.gz",
                                           labels_path=tmp_path / "labels" / f"{sid}_dseg.nii.gz").metrics
    before, after = iq[False], iq[True]
    # background noise is untouched by bias field and anatomy: snrd tracks the injected noise
    assert before["snrd_total"] / after["snrd_total"] == pytest.approx(noise_ratio, rel=0.15)
    assert before["snr_wm"] > after["snr_wm"]
    assert before["snr_total"] > after["snr_total"]
    assert before["cnr"] > after["cnr"] and before["cjv"] < after["cjv"]
    assert before["fber"] > after["fber"]


XA30_T1 = GE_REF.parents[1] / "dcm_qa_xa30" / "Ref" / "5_anat-T1w_acq-tfl.nii"


@pytest.mark.skipif(not XA30_T1.exists(), reason="needs ../shared/data/dicom")
def test_real_siemens_xa30_t1():
    """The dcm2niix conversion of a real 3D T1 (dcm_qa_xa30) gives finite, plausible metrics."""
    iq = image_quality_nifti(XA30_T1)
    m = iq.metrics
    for key in ("snr_total", "cnr", "cjv", "efc"):
        assert m[key] is not None and math.isfinite(m[key]), key
    assert m["snr_total"] > 3
    assert 0 < m["efc"] < 1
    assert m["cjv"] < 2
    if m["fber"] is None:
        assert any("zero-filled" in n for n in iq.notes)
    else:
        assert m["fber"] > 1


def test_nifti_roundtrip(phantom, phantom_iq, tmp_path):
    img, lab = phantom
    nib.save(nib.Nifti1Image(img, np.eye(4)), tmp_path / "t1.nii.gz")
    nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "dseg.nii.gz")
    iq = image_quality_nifti(tmp_path / "t1.nii.gz", labels_path=tmp_path / "dseg.nii.gz")
    assert iq.metrics["snr_wm"] == pytest.approx(phantom_iq.metrics["snr_wm"], rel=1e-4)
