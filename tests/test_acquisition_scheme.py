"""Slice order and diffusion scheme derived from real dcm2niix sidecars and real DICOM series.

The reference sidecars (dcm2niix's QA sets) name their slice order in the file or series name;
the derived order must say the same. Their .bval/.bvec give the diffusion schemes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sitebench.qc.acquisition_scheme import (
    angle_deg,
    derived_keys,
    diffusion_scheme,
    distinct_directions,
    slice_order,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GE = DATA / "dicom-more" / "dcm_qa_ge"
NIH = DATA / "dicom" / "dcm_qa_nih"
STC = DATA / "dicom" / "dcm_qa_stc"

needs_data = pytest.mark.skipif(not (GE.exists() and NIH.exists() and STC.exists()),
                                reason="needs ../shared/data/dicom and dicom-more (dcm2niix QA sets)")


def _sidecar(path: Path) -> dict:
    if not path.exists():
        pytest.skip(f"{path} not present")
    return json.loads(path.read_text())


def _bvals_bvecs(stem: Path) -> tuple[list[float], list[list[float]]]:
    bvals = [float(x) for x in stem.with_suffix(".bval").read_text().split()]
    rows = [[float(x) for x in line.split()] for line in stem.with_suffix(".bvec").read_text().strip().splitlines()]
    return bvals, [list(v) for v in zip(*rows)]


# the order each file or series name states, and where the name says it
NAMED_ORDERS = [
    (GE / "Ref" / "Ax_fMRI_HB3_48sl_int_asc_14.json", "interleaved-ascending"),
    (GE / "Ref" / "Ax_fMRI_HB8_80sl_int_asc_4.json", "interleaved-ascending"),  # GE HB swaps a pass's last two
    (GE / "Ref" / "Ax_fMRI_HB8_80sl_int_des_10.json", "interleaved-descending"),
    (GE / "Ref" / "epiRT_IntAsc_GD0_2.json", "interleaved-ascending"),
    (GE / "Ref" / "epiRT_IntAscHB3_GD0_5.json", "interleaved-ascending"),
    (GE / "Ref" / "epiRT_IntDesHB3_GD33_6.json", "interleaved-descending"),
    (GE / "Ref" / "epiRT_IntDesHB3_GD55_7.json", "interleaved-descending"),
    # SeriesDescription "Axial EPI-FMRI (Interleaved I to S)" etc.: I to S is ascending
    (NIH / "Ref" / "DCM2NIIX_regression_test_4.json", "interleaved-ascending"),
    (NIH / "Ref" / "DCM2NIIX_regression_test_5.json", "sequential-ascending"),
    (NIH / "Ref" / "DCM2NIIX_regression_test_6.json", "interleaved-descending"),
    (NIH / "Ref" / "DCM2NIIX_regression_test_7.json", "sequential-descending"),
    (STC / "Ref" / "Siemens_ep2d_Asc_2.json", "sequential-ascending"),
    (STC / "Ref" / "Siemens_ep2d_Asc_HF_10.json", "sequential-ascending"),
    (STC / "Ref" / "Siemens_ax_asc_35sl_6.json", "sequential-ascending"),
    (STC / "Ref" / "Siemens_FMRI_AX_ASC_2.json", "sequential-ascending"),
    # "Ascending" sagittal: dcm2niix stores the slices reversed (flipZ), so in its slice index it descends
    (DATA / "dicom-more" / "dcm_qa_sag" / "Ref" / "5001_Product_EPI_Sag_Ascending.json", "sequential-descending"),
    (DATA / "dicom-more" / "dcm_qa_sag" / "Ref" / "5_Product_EPI_Sag_Ascending.json", "sequential-descending"),
]


@needs_data
@pytest.mark.parametrize("path, order", NAMED_ORDERS, ids=[p.stem for p, _ in NAMED_ORDERS])
def test_slice_order_of_reference_sidecars_is_the_named_one(path, order):
    sidecar = _sidecar(path)
    assert slice_order(sidecar["SliceTiming"], sidecar.get("MultibandAccelerationFactor")) == order
    # the band is found from the repeating times alone too (a series whose multiband factor is unknown)
    assert slice_order(sidecar["SliceTiming"]) == order
    assert derived_keys(sidecar)["SliceOrder"] == order


@needs_data
def test_multiband_order_is_judged_within_one_band():
    sidecar = _sidecar(STC / "Ref" / "Siemens_Rest_fMRI_AP_7.json")  # MB3, 51 slices, 17 per band
    times = sidecar["SliceTiming"]
    assert slice_order(times, 3) == "interleaved-ascending"
    assert slice_order(times, 2) == "other"  # 51 slices do not split into 2 bands
    assert slice_order(times, 17) == "other"  # times do not repeat every 3 slices
    assert slice_order(times[:17]) == "interleaved-ascending"


def test_slice_order_edge_cases():
    assert slice_order(None) is None and slice_order([]) is None
    assert slice_order(["0", 1]) is None and slice_order([0.0, float("nan")]) is None
    assert slice_order([0.0]) == "single-slice"
    assert slice_order([0.0, 0.0, 0.0]) == "other"  # every slice at once
    assert slice_order([0.0, 0.2, 0.1, 0.4, 0.3]) == "other"
    assert slice_order([0.0, 0.5, 0.1, 0.6, 0.2, 0.7]) == "interleaved-ascending"  # GE: even first
    assert slice_order([0.3, 0.0, 0.4, 0.1, 0.5, 0.2]) == "interleaved-ascending"  # Siemens even count: odd first
    assert slice_order([0.2, 0.1, 0.0]) == "sequential-descending"


@needs_data
def test_diffusion_scheme_of_reference_bvals_and_bvecs():
    schemes = {
        GE / "Ref" / "Ax_DWI_TENSOR_R2_1": ([0, 1000], 7, 1, 6),
        GE / "Ref" / "Ax_DWI_TENSOR_R2MB2_4": ([0, 1000], 7, 1, 6),
        DATA / "dicom-more" / "dcm_qa_philips" / "Ref" / "WIP_dti_ax_601": ([0, 2000], 16, 1, 15),
        DATA / "dicom" / "dcm_qa_enh" / "Ref" / "Canon_DTI_PA-ortho_9000": ([0, 1500], 13, 1, 12),
        # UIH writes b=1.25 for its b=0 volume and 929.75 for the shell
        STC / "Ref" / "UIH_dti_tra_dir16_PA_rot_12": ([0, 930], 17, 1, 16),
    }
    for stem, (shells, volumes, b0, directions) in schemes.items():
        if not stem.with_suffix(".bval").exists():
            pytest.skip(f"{stem} not present")
        bvals, bvecs = _bvals_bvecs(stem)
        assert diffusion_scheme(bvals, bvecs) == {
            "DiffusionBValueShells": shells, "NumberOfDiffusionVolumes": volumes,
            "NumberOfB0Volumes": b0, "NumberOfDiffusionDirections": directions}, stem.name


def test_shells_absorb_jitter_and_directions_are_sign_invariant():
    bvals = [0, 5, 995, 1000, 1005, 1000, 2990, 3000, 3010, 3005]
    x, y, z = [1, 0, 0], [0, 1, 0], [0, 0, 1]
    vecs = [[0, 0, 0], [0, 0, 0], x, [-1, 0, 0], y, [0, -1, 0.01], x, y, z, [0, 0, -1]]
    scheme = diffusion_scheme(bvals, vecs)
    assert scheme["DiffusionBValueShells"] == [0, 1000, 3000]
    assert scheme["NumberOfB0Volumes"] == 2 and scheme["NumberOfDiffusionVolumes"] == 10
    assert scheme["NumberOfDiffusionDirections"] == 3
    assert angle_deg([1, 0, 0], [-1, 0, 0]) == pytest.approx(0)
    assert angle_deg([1, 0, 0], [0, 1, 0]) == pytest.approx(90)
    assert len(distinct_directions([[1, 0, 0], [0.9999, 0.01, 0], [0, 0, 0], "x"])) == 1
    assert diffusion_scheme([0, 1000], [[0, 0, 0]])  # vectors not one per volume: no direction count
    assert "NumberOfDiffusionDirections" not in diffusion_scheme([0, 1000], [[0, 0, 0]])
    assert diffusion_scheme(None, None) == {} and diffusion_scheme([0, "b"], None) == {}
    assert diffusion_scheme([0, -5], None) == {}


@needs_data
def test_real_ge_series_derive_the_named_order_and_scheme():
    """read_series (GE private tags, vendor_ge) gives SliceTiming and diffusion for these GE series today."""
    from sitebench.qc.dicom_params import read_series

    cases = {GE / "In" / "SliceTiming" / "4_Ax_fMRI_HB8_80sl_int_asc": "interleaved-ascending",
             GE / "In" / "SliceTiming" / "10_Ax_fMRI_HB8_80sl_int_des": "interleaved-descending",
             NIH / "In" / "20180918GE" / "mr_0005": "sequential-ascending",
             NIH / "In" / "20180918GE" / "mr_0006": "interleaved-descending"}
    for folder, order in cases.items():
        (series,) = read_series(folder)
        params = {**series.parameters, **derived_keys(series.parameters)}
        assert params.get("SliceTiming"), f"{folder.name}: read_series gives no SliceTiming"
        assert params["SliceOrder"] == order, folder.name
    (dwi,) = read_series(GE / "In" / "01_Ax_DWI_TENSOR_R2")
    scheme = derived_keys(dwi.parameters)
    assert scheme["DiffusionBValueShells"] == [0, 1000] and scheme["NumberOfDiffusionDirections"] == 6
