"""Protocol rules for the acquisition scheme, on real DICOM series of several vendors.

Each rule is checked with real series that must pass and real series that must fail:
multiband (GE HyperBand HB3 vs HB8), slice order (GE interleaved ascending vs descending,
sequential vs interleaved), phase encoding (dcm_qa_nih EPI PE=AP vs PA), the diffusion scheme
(GE DWI vs Philips DTI, GE R2 vs R2MB2), and one acquisition saved as classic and as enhanced
DICOM (dcm_qa_sag XA30) getting one verdict.

A real series that lacks a rule's input key fails naming the key: a rule never passes because
the parser gave it nothing to compare.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest

from sitebench.errors import SitebenchError
from sitebench.qc.protocol import (
    Protocol,
    _parse_protocol,
    check_series,
    comparable,
    draft_protocol,
    load_protocol,
    lock_protocol,
    match_protocol,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GE = DATA / "dicom-more" / "dcm_qa_ge"
NIH = DATA / "dicom" / "dcm_qa_nih"
SAG = DATA / "dicom-more" / "dcm_qa_sag"
PHILIPS = DATA / "dicom-more" / "dcm_qa_philips"
CLASSIC = SAG / "In" / "XA30" / "classic" / "5001_Product_EPI_Sag_Ascending"
ENHANCED = SAG / "In" / "XA30" / "enhanced" / "5_Product_EPI_Sag_Ascending"

HB3_ASC = GE / "In" / "SliceTiming" / "14_Ax_fMRI_HB3_48sl_int_asc"
HB8_ASC = GE / "In" / "SliceTiming" / "4_Ax_fMRI_HB8_80sl_int_asc"
HB8_DES = GE / "In" / "SliceTiming" / "10_Ax_fMRI_HB8_80sl_int_des"
GE_INTERLEAVED = NIH / "In" / "20180918GE" / "mr_0004"
GE_SEQUENTIAL = NIH / "In" / "20180918GE" / "mr_0005"
PE_AP = NIH / "In" / "20180918Si" / "mr_0003"
PE_PA = NIH / "In" / "20180918Si" / "mr_0004"
DWI_R2 = GE / "In" / "01_Ax_DWI_TENSOR_R2"
DWI_R2MB2 = GE / "In" / "04_Ax_DWI_TENSOR_R2MB2"
PHILIPS_DTI = PHILIPS / "In" / "Vanderbilt_2018" / "601_WIP_dti_ax"

needs_data = pytest.mark.skipif(not (GE.exists() and NIH.exists() and SAG.exists()),
                                reason="needs ../shared/data/dicom and dicom-more (dcm2niix QA sets)")


@lru_cache(maxsize=None)
def _read(folder: Path) -> dict:
    from sitebench.qc.dicom_params import read_series

    if not folder.exists():
        pytest.skip(f"{folder} not present")
    (series,) = read_series(folder)
    return series.parameters


def _series(folder: Path, *needed: str) -> dict:
    """The series' parameters; fails, naming them, when read_series lacks a needed key."""
    params = dict(_read(folder))
    lacking = [k for k in needed if params.get(k) is None]
    if lacking:
        pytest.fail(f"read_series gives no {', '.join(lacking)} for {folder.name}")
    return params


def _protocol(parameters: dict) -> Protocol:
    return _parse_protocol({"name": "rules", "version": 1, "parameters": parameters}, "test")


def _status(verdict, parameter: str) -> str:
    found = [c for c in verdict.checks if c.parameter == parameter]
    assert found, f"no check of {parameter}: {verdict.summary()}"
    return found[0].status


def _sidecar_with_diffusion(stem: Path) -> dict:
    if not stem.with_suffix(".json").exists():
        pytest.skip(f"{stem} not present")
    data = json.loads(stem.with_suffix(".json").read_text())
    bvals = [float(x) for x in stem.with_suffix(".bval").read_text().split()]
    rows = [[float(x) for x in line.split()] for line in stem.with_suffix(".bvec").read_text().strip().splitlines()]
    data["DiffusionBValues"], data["DiffusionGradientDirections"] = bvals, [list(v) for v in zip(*rows)]
    return data


# --------------------------------------------------------------------------- multiband


@needs_data
def test_multiband_factor_exact_and_failing_in_drafts():
    hb3 = _series(HB3_ASC, "MultibandAccelerationFactor")
    hb8 = _series(HB8_ASC, "MultibandAccelerationFactor")
    drafted = draft_protocol(hb3, "bold-hb3")
    rule = drafted.parameters["MultibandAccelerationFactor"]
    assert (rule.kind, rule.value, rule.severity) == ("exact", 3, "fail")
    assert _status(check_series(hb3, drafted), "MultibandAccelerationFactor") == "pass"
    verdict = check_series(hb8, drafted)
    assert verdict.status == "fail" and _status(verdict, "MultibandAccelerationFactor") == "fail"
    only = _protocol({"MultibandAccelerationFactor": {"kind": "exact", "value": 8}})
    assert check_series(hb8, only).status == "pass" and check_series(hb3, only).status == "fail"


# --------------------------------------------------------------------------- slice order


@needs_data
def test_slice_order_ge_interleaved_ascending_vs_descending():
    asc = _series(HB8_ASC, "SliceTiming")
    des = _series(HB8_DES, "SliceTiming")
    drafted = draft_protocol(asc, "bold-hb8")
    assert drafted.parameters["SliceOrder"].value == "interleaved-ascending"
    assert drafted.parameters["SliceOrder"].severity == "fail"
    assert check_series(asc, drafted).status == "pass"
    verdict = check_series(des, drafted)
    assert verdict.status == "fail" and _status(verdict, "SliceOrder") == "fail"
    assert [d.observed for d in verdict.deviations if d.parameter == "SliceOrder"] == ["interleaved-descending"]
    # the two series are the same protocol otherwise: slice order is the deviation that fails
    assert {d.parameter for d in verdict.deviations if d.status == "fail"} == {"SliceOrder"}


@needs_data
def test_slice_order_sequential_vs_interleaved():
    interleaved = _series(GE_INTERLEAVED, "SliceTiming")
    sequential = _series(GE_SEQUENTIAL, "SliceTiming")
    rule = _protocol({"SliceOrder": {"kind": "exact", "value": "sequential-ascending"}})
    assert check_series(sequential, rule).status == "pass"
    assert check_series(interleaved, rule).status == "fail"


@needs_data
def test_slice_order_rule_on_reference_sidecars():
    """The rule's logic on the sidecar SliceTiming (Siemens: read_series does not give it yet)."""
    stc = DATA / "dicom" / "dcm_qa_stc" / "Ref"
    asc = json.loads((stc / "Siemens_ep2d_Asc_2.json").read_text())
    interleaved = json.loads((NIH / "Ref" / "EPI_PE=AP_3.json").read_text())
    drafted = draft_protocol(asc, "siemens-asc")
    assert drafted.parameters["SliceOrder"].value == "sequential-ascending"
    assert check_series(asc, drafted).status == "pass"
    assert _status(check_series({**asc, "SliceTiming": interleaved["SliceTiming"]}, drafted), "SliceOrder") == "fail"


@needs_data
def test_slice_order_of_siemens_series_waits_for_slice_timing():
    params = _series(PE_AP, "SliceTiming")
    assert params["SliceOrder"] == "interleaved-ascending"


# --------------------------------------------------------------------------- phase encoding


@needs_data
def test_phase_encoding_ap_vs_pa_fails():
    ap = _series(PE_AP, "PhaseEncodingDirection")
    pa = _series(PE_PA, "PhaseEncodingDirection")
    assert (ap["PhaseEncodingDirection"], pa["PhaseEncodingDirection"]) == ("j-", "j")
    drafted = draft_protocol(ap, "epi-ap")
    rule = drafted.parameters["PhaseEncodingDirection"]
    assert (rule.kind, rule.value, rule.severity) == ("exact", "j-", "fail")
    assert check_series(ap, drafted).status == "pass"
    verdict = check_series(pa, drafted)
    assert verdict.status == "fail" and _status(verdict, "PhaseEncodingDirection") == "fail"
    assert "PhaseEncodingDirection" in verdict.summary()


@needs_data
def test_phase_encoding_rule_is_undetermined_where_the_vendor_records_no_polarity():
    """Canon and Philips write the phase-encoding axis but not its sign (dcm2niix vendor notes), so
    an AP/PA reversal is invisible in their headers: a locked polarity rule is undetermined on their
    series, saying why, and never passes. Real headers: the Philips DTI files; dcm2niix's sidecar of
    a Canon DTI series (no Canon DICOM in the shared data)."""
    ap = _series(PE_AP, "PhaseEncodingDirection")
    rule = draft_protocol(ap, "epi-ap")
    philips = _read(PHILIPS_DTI)
    canon = json.loads((DATA / "dicom" / "dcm_qa_enh" / "Ref" / "Canon_DTI_PA-ortho_9000.json").read_text())
    assert "PhaseEncodingDirection" not in philips and "PhaseEncodingDirection" not in canon
    assert philips["InPlanePhaseEncodingDirectionDICOM"] in ("ROW", "COL")
    for params, vendor in ((philips, "Philips"), ({**canon, "Manufacturer": "Canon"}, "Canon")):
        (check,) = [d for d in check_series(params, rule).checks if d.parameter == "PhaseEncodingDirection"]
        assert check.status == "undetermined", vendor
        assert f"{vendor} does not record phase-encoding polarity" in check.note
    (other,) = [d for d in check_series({"Manufacturer": "GE"}, rule).checks if d.parameter == "PhaseEncodingDirection"]
    assert other.status == "undetermined" and other.note == "parameter missing from the series"


# --------------------------------------------------------------------------- diffusion scheme


@needs_data
def test_diffusion_scheme_ge_r2_vs_r2mb2_and_philips_dti():
    r2 = _series(DWI_R2, "DiffusionBValues", "DiffusionGradientDirections")
    mb2 = _series(DWI_R2MB2, "DiffusionBValues", "DiffusionGradientDirections")
    drafted = draft_protocol(r2, "dwi-r2")
    rules = drafted.parameters
    assert rules["DiffusionBValueShells"].value == [0, 1000] and rules["DiffusionBValueShells"].kind == "rel"
    assert rules["NumberOfDiffusionDirections"].value == 6
    assert rules["DiffusionGradientDirections"].kind == "directions"
    assert len(rules["DiffusionGradientDirections"].values) == 6
    assert check_series(r2, drafted).status == "pass"
    # the same diffusion table with multiband 2 (and the PE polarity reversed): the scheme passes,
    # the series fails on what did change (GE writes no multiband factor without HyperBand, so a
    # draft from R2 has no multiband rule; one from R2MB2 has, and R2 is undetermined on it)
    verdict = check_series(mb2, drafted)
    for key in ("DiffusionBValueShells", "NumberOfDiffusionDirections", "DiffusionGradientDirections"):
        assert _status(verdict, key) == "pass", key
    assert verdict.status == "fail" and _status(verdict, "PhaseEncodingDirection") == "fail"
    assert _status(check_series(r2, draft_protocol(mb2, "dwi-mb2")), "MultibandAccelerationFactor") == "undetermined"
    philips = _series(PHILIPS_DTI, "DiffusionBValues", "DiffusionGradientDirections")
    other = check_series(philips, drafted)
    for key in ("DiffusionBValueShells", "NumberOfDiffusionDirections", "DiffusionGradientDirections"):
        assert _status(other, key) == "fail", key


@needs_data
def test_diffusion_rules_on_reference_bvals_ge_vs_philips_vs_canon():
    """The diffusion rules on dcm2niix's .bval/.bvec (Philips and Canon: read_series lacks them yet)."""
    ge = _sidecar_with_diffusion(GE / "Ref" / "Ax_DWI_TENSOR_R2_1")
    ge_mb = _sidecar_with_diffusion(GE / "Ref" / "Ax_DWI_TENSOR_R2MB2_4")
    philips = _sidecar_with_diffusion(PHILIPS / "Ref" / "WIP_dti_ax_601")
    canon = _sidecar_with_diffusion(DATA / "dicom" / "dcm_qa_enh" / "Ref" / "Canon_DTI_PA-ortho_9000")
    drafted = draft_protocol(ge, "dwi")
    assert _status(check_series(ge_mb, drafted), "DiffusionGradientDirections") == "pass"
    verdict = check_series(philips, drafted)
    assert verdict.status == "fail"
    for key in ("DiffusionBValueShells", "NumberOfDiffusionDirections", "NumberOfDiffusionVolumes",
                "DiffusionGradientDirections"):
        assert _status(verdict, key) == "fail", key
    # same count, other directions: Canon's 12 against Philips' first 12 directions (both real tables)
    canon_rule = _protocol({"DiffusionGradientDirections": {
        "kind": "directions", "values": [v for v in canon["DiffusionGradientDirections"] if any(v)], "tol_deg": 5}})
    twelve = {"DiffusionGradientDirections": [v for v in philips["DiffusionGradientDirections"] if any(v)][:12]}
    assert check_series(canon, canon_rule).status == "pass"
    assert check_series(twelve, canon_rule).status == "fail"
    # sign flips and reordering are the same scheme
    flipped = {"DiffusionGradientDirections": [[-x for x in v] for v in reversed(canon["DiffusionGradientDirections"])]}
    assert check_series(flipped, canon_rule).status == "pass"


def test_directions_rule_validation_and_lock_round_trip(tmp_path):
    with pytest.raises(SitebenchError, match="unknown key 'parameters.DiffusionGradientDirections.tol_degs'"):
        _protocol({"DiffusionGradientDirections": {"kind": "directions", "values": [[1, 0, 0]], "tol_degs": 5}})
    with pytest.raises(SitebenchError, match="non-zero"):
        _protocol({"DiffusionGradientDirections": {"kind": "directions", "values": [[0, 0, 0]]}})
    with pytest.raises(SitebenchError, match="DiffusionGradientDirections"):
        _protocol({"DiffusionGradientDirections": {"kind": "directions", "values": [[1, 0]]}})
    rule = _protocol({"DiffusionGradientDirections": {"kind": "directions", "values": [[1, 0, 0], [0, 1, 0]]}})
    assert rule.parameters["DiffusionGradientDirections"].tol_deg == 5
    wrong = check_series({"DiffusionGradientDirections": "1 0 0"}, rule)
    assert wrong.status == "fail"  # a value of the wrong type fails, it is not undetermined
    draft = rule.save(tmp_path / "dirs.yaml")
    locked = lock_protocol(draft, who="A. Physicist", why="test", lock_dir=tmp_path / "locked")
    assert load_protocol(locked.path).content_sha256() == rule.content_sha256()


# --------------------------------------------------------------------------- one acquisition, one verdict


def test_comparable_view_folds_the_dicom_format():
    assert comparable("ScanningSequence", "GR\\EP") == comparable("ScanningSequence", "EP") == "EP"
    assert comparable("ScanningSequence", "SE\\EP") == "EP"
    assert comparable("ScanningSequence", ["GR", "IR"]) == "GR\\IR"  # as written; compared as a set:
    gr_ir = _protocol({"ScanningSequence": {"kind": "exact", "value": "GR\\IR"}})
    assert check_series({"ScanningSequence": "IR\\GR"}, gr_ir).status == "pass"
    classic = ["ORIGINAL", "PRIMARY", "M", "ND", "MFSPLIT"]
    enhanced = ["ORIGINAL", "PRIMARY", "FMRI", "NONE", "MAGNITUDE"]
    assert comparable("ImageType", classic) == comparable("ImageType", enhanced) == ["ORIGINAL", "PRIMARY", "MAGNITUDE"]
    assert comparable("ImageType", ["ORIGINAL", "PRIMARY", "P", "ND"])[-1] == "PHASE"
    assert comparable("EchoTime", 0.03) == 0.03  # keys that do not depend on the format are unchanged
    rules = _protocol({"ScanningSequence": {"kind": "exact", "value": "GR\\EP"},
                       "ImageType": {"kind": "exact", "value": classic}})
    assert check_series({"ScanningSequence": "EP", "ImageType": ["ORIGINAL", "PRIMARY", "FMRI", "NONE"]},
                        rules).status == "pass"
    assert check_series({"ScanningSequence": "GR", "ImageType": classic}, rules).status == "fail"
    assert check_series({"ScanningSequence": "EP", "ImageType": ["ORIGINAL", "PRIMARY", "P", "ND"]},
                        rules).status == "fail"  # phase is not magnitude
    matched = _parse_protocol({"name": "m", "version": 1, "match": {"ScanningSequence": "GR\\\\EP",
                                                                    "ImageType": ["ORIGINAL", "M"]}}, "test")
    assert matched.match.matches({"ScanningSequence": "EP", "ImageType": enhanced})
    assert not matched.match.matches({"ScanningSequence": "SE", "ImageType": enhanced})


@needs_data
def test_classic_and_enhanced_files_of_one_acquisition_get_one_verdict():
    classic = _read(CLASSIC)
    enhanced = _read(ENHANCED)
    # the parameters keep dcm2niix's values; only the comparison folds the format out
    assert (classic["ScanningSequence"], enhanced["ScanningSequence"]) == ("GR\\EP", "EP")
    from_classic = draft_protocol(classic, "bold-sag")
    from_enhanced = draft_protocol(enhanced, "bold-sag")
    assert "AcquisitionMatrix" not in from_classic.parameters
    assert from_classic.parameters["AcquisitionMatrixPE"].value == 86
    assert from_classic.parameters["ScanningSequence"].value == from_enhanced.parameters["ScanningSequence"].value
    on_enhanced = check_series(enhanced, from_classic)
    assert on_enhanced.status == "pass", on_enhanced.summary()
    lacking = [k for k in from_enhanced.parameters if classic.get(k) is None and enhanced.get(k) is not None]
    assert not lacking, f"read_series gives no {', '.join(lacking)} for the classic files"
    on_classic = check_series(classic, from_enhanced)
    assert on_classic.status == "pass", on_classic.summary()
    assert from_classic.content() == {**from_enhanced.content(), "name": from_classic.name}
    assert [d.to_dict() for d in on_classic.deviations] == [d.to_dict() for d in on_enhanced.deviations]


@needs_data
def test_classic_and_enhanced_get_one_verdict_through_the_gate():
    from sitebench.qc.dicom_params import dicom_files
    from sitebench.qc.gate import Gate

    for reference, other in ((CLASSIC, ENHANCED), (ENHANCED, CLASSIC)):
        protocol = draft_protocol(_read(reference), "bold-sag")
        gate = Gate([protocol], image_quality=False, require_locked=False, match=False)
        (outcome,) = gate.check_files(dicom_files(other), site="S1")
        assert outcome.status == "pass", outcome.summary()
        assert not [e for e in outcome.drift if e.parameter in ("ScanningSequence", "ImageType")]


@needs_data
def test_a_different_acquisition_still_fails_whatever_the_format():
    enhanced_bold = DATA / "dicom" / "dcm_qa_xa30" / "In" / "7_func-bold_task-fa_run-1"
    other = _read(enhanced_bold)
    for reference in (CLASSIC, ENHANCED):
        verdict = check_series(other, draft_protocol(_read(reference), "bold-sag"))
        assert verdict.status == "fail", verdict.summary()
        failing = {d.parameter for d in verdict.deviations if d.status == "fail"}
        assert {"RepetitionTime", "PixelSpacing"} <= failing
    # a real change of the echo type is still seen where it is written: GR vs SE EPI sequence names
    ge_bold, ge_dwi = _read(HB3_ASC), _read(DWI_R2)
    assert check_series(ge_dwi, draft_protocol(ge_bold, "bold")).status == "fail"


@needs_data
def test_drafted_match_rules_select_the_acquisition_in_either_format():
    classic, enhanced = _read(CLASSIC), _read(ENHANCED)
    protocol = draft_protocol(classic, "bold-sag")
    assert match_protocol(enhanced, [protocol]) is protocol
    assert match_protocol(_read(HB3_ASC), [protocol]) is None


@needs_data
def test_drift_sees_no_change_between_the_classic_and_enhanced_files():
    from sitebench.qc.drift import DriftMonitor

    monitor = DriftMonitor()
    classic, enhanced = _read(CLASSIC), _read(ENHANCED)
    monitor.qualify("S1", classic, "classic", series_type="bold")
    events = monitor.observe("S1", enhanced, "pass", "enhanced", series_type="bold")
    changed = {e.parameter for e in events}
    assert not changed & {"ScanningSequence", "ImageType", "AcquisitionMatrix"}, changed
    # a real change of a format-dependent key is still drift
    events = monitor.observe("S1", {**enhanced, "ScanningSequence": "SE"}, "pass", "other", series_type="bold")
    assert [e.parameter for e in events if e.parameter == "ScanningSequence"] == ["ScanningSequence"]
