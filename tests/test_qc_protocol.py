"""Locked acquisition protocols checked against real dcm2niix sidecars (dcm2niix's own QA data sets)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from sitebench.errors import SitebenchError
from sitebench.qc.protocol import (
    Protocol,
    check_series,
    draft_protocol,
    load_protocol,
    lock_protocol,
    locked_file_name,
    match_protocol,
)

DICOM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
T1W = DICOM / "dcm_qa_xa30" / "Ref" / "5_anat-T1w_acq-tfl.json"
BOLD = DICOM / "dcm_qa_xa30" / "Ref" / "7_func-bold_task-fa_run-1.json"
EPI_VE11 = DICOM / "dcm_qa_nih" / "Ref" / "EPI_PE=AP_3.json"
PHILIPS_T1 = DICOM / "dcm_qa_enh" / "Ref" / "Philips_WIP_AnatBrain_T1W3D_301.json"

needs_data = pytest.mark.skipif(not T1W.exists(), reason="shared dcm2niix QA sidecars not present")


def _sidecar(path: Path, **geometry) -> dict:
    if not path.exists():
        pytest.skip(f"{path} not present")
    data = json.loads(path.read_text())
    data.update(geometry)
    return data


@pytest.fixture
def t1w() -> dict:
    # The geometry keys the DICOM reader adds (not in the sidecar): the matching .nii is
    # 2 mm isotropic with 96 partitions (PhaseEncodingStepsOutOfPlane) -> 192 mm coverage.
    return _sidecar(T1W, PixelSpacing=[2.0, 2.0], SliceCoverageMM=192.0)


@pytest.fixture
def t1w_protocol(t1w) -> Protocol:
    return draft_protocol(t1w, "t1w_volumetry", "3D T1w for volumetry")


def _dev(verdict, parameter):
    found = [d for d in verdict.deviations if d.parameter == parameter]
    assert found, f"no deviation for {parameter}: {verdict.summary()}"
    return found[0]


# --------------------------------------------------------------------------- drafting and verdicts


@needs_data
def test_draft_passes_its_own_reference_series(t1w, t1w_protocol):
    verdict = check_series(t1w, t1w_protocol)
    assert verdict.status == "pass", verdict.summary()
    assert verdict.deviations == []
    assert verdict.recorded["SoftwareVersions"] == "syngo MR XA30"
    assert verdict.recorded["ManufacturersModelName"] == "MAGNETOM Prisma Fit"
    assert verdict.recorded["ReceiveCoilName"] == "HeadNeck_64"
    rules = t1w_protocol.parameters
    assert rules["Manufacturer"].kind == "exact"
    assert rules["EchoTime"].kind == "abs" and rules["EchoTime"].tol == pytest.approx(0.001)
    assert rules["FlipAngle"].tol == 1
    assert rules["SliceThickness"].tol == pytest.approx(0.05)
    assert t1w_protocol.coverage.min_mm == pytest.approx(0.95 * 192.0)
    assert t1w_protocol.match.matches(t1w)
    json.dumps(verdict.to_dict())
    assert "PASS" in verdict.summary()


@needs_data
def test_draft_of_other_vendors_passes_itself():
    for path in (PHILIPS_T1, DICOM / "dcm_qa_deident" / "Ref" / "Accelerated_SAG_IR-SPGR_10.json", BOLD, EPI_VE11):
        series = _sidecar(path)
        assert check_series(series, draft_protocol(series, "ref")).status == "pass", path.name


@needs_data
@pytest.mark.parametrize("change, parameter, observed", [
    ({"RepetitionTime": 2.3}, "RepetitionTime", 2.3),
    ({"SliceThickness": 1.0}, "SliceThickness", 1.0),
    ({"PixelSpacing": [1.0, 1.0]}, "PixelSpacing", [1.0, 1.0]),
    ({"FlipAngle": 12}, "FlipAngle", 12),
    ({"SliceCoverageMM": 160.0}, "SliceCoverageMM", 160.0),
])
def test_changed_acquisition_fails_naming_parameter(t1w, t1w_protocol, change, parameter, observed):
    series = {**copy.deepcopy(t1w), **change}
    verdict = check_series(series, t1w_protocol)
    assert verdict.status == "fail"
    dev = _dev(verdict, parameter)
    assert dev.status == "fail" and dev.severity == "fail"
    assert dev.observed == observed
    assert dev.expected  # human-readable rule text
    assert parameter in verdict.summary()
    json.dumps(verdict.to_dict())


@needs_data
def test_deviation_text_for_tr_and_coverage(t1w, t1w_protocol):
    verdict = check_series({**t1w, "RepetitionTime": 2.3, "SliceCoverageMM": 160.0}, t1w_protocol)
    assert _dev(verdict, "RepetitionTime").expected == "1.8 ± 2%"
    assert _dev(verdict, "RepetitionTime").rule == "rel"
    assert _dev(verdict, "SliceCoverageMM").expected == ">= 182.4 mm"
    assert _dev(verdict, "SliceCoverageMM").rule == "coverage"


@needs_data
def test_missing_parameter_is_undetermined_not_pass(t1w, t1w_protocol):
    series = dict(t1w)
    del series["InversionTime"]
    verdict = check_series(series, t1w_protocol)
    assert verdict.status == "undetermined"
    dev = _dev(verdict, "InversionTime")
    assert dev.status == "undetermined" and dev.observed is None
    # a missing coverage value is undetermined too
    series.pop("SliceCoverageMM")
    assert _dev(check_series(series, t1w_protocol), "SliceCoverageMM").status == "undetermined"
    # fail outranks undetermined
    assert check_series({**series, "FlipAngle": 20}, t1w_protocol).status == "fail"


@needs_data
def test_warn_severity_gives_warn(t1w, t1w_protocol):
    # the draft makes acceleration a warning
    verdict = check_series({**t1w, "ParallelReductionFactorInPlane": 3}, t1w_protocol)
    assert verdict.status == "warn"
    assert _dev(verdict, "ParallelReductionFactorInPlane").status == "warn"
    # a missing warn-severity parameter is an undetermined warning, not an undetermined verdict
    series = dict(t1w)
    del series["PixelBandwidth"]
    verdict = check_series(series, t1w_protocol)
    assert verdict.status == "warn"
    assert _dev(verdict, "PixelBandwidth").status == "undetermined"


@needs_data
def test_slice_gap(t1w):
    series = {**t1w, "SliceThickness": 2.0, "SpacingBetweenSlices": 2.0}
    protocol = draft_protocol(series, "t1")
    assert protocol.slice_gap.max_gap_mm == pytest.approx(0.05)
    assert check_series(series, protocol).status == "pass"
    verdict = check_series({**series, "SpacingBetweenSlices": 2.5}, protocol)
    assert verdict.status == "fail"
    assert _dev(verdict, "SliceGapMM").observed == pytest.approx(0.5)
    no_spacing = dict(series)
    del no_spacing["SpacingBetweenSlices"]
    assert _dev(check_series(no_spacing, protocol), "SliceGapMM").status == "undetermined"


@needs_data
def test_software_version_override_replaces_rule(t1w, t1w_protocol):
    # VE11 (syngo MR E11) MPRAGE runs a longer minimum TE than XA30 at the same settings
    data = t1w_protocol.model_dump(mode="json")
    data["overrides"] = [{"when": {"Manufacturer": "Siemens", "SoftwareVersions": "syngo MR E11.*"},
                          "parameters": {"EchoTime": {"kind": "abs", "value": 0.00298, "tol": 0.0003}}}]
    protocol = Protocol.model_validate(data)
    ve11 = {**t1w, "SoftwareVersions": "syngo MR E11", "EchoTime": 0.00298}
    verdict = check_series(ve11, protocol)
    assert verdict.status == "pass", verdict.summary()
    assert verdict.overrides_applied == [0]
    # the XA30 series keeps the base rule: its own TE passes, the VE11 TE fails
    assert check_series(t1w, protocol).status == "pass"
    xa_long_te = check_series({**t1w, "EchoTime": 0.00298}, protocol)
    assert xa_long_te.status == "pass"  # within base abs 1 ms
    protocol_tight = Protocol.model_validate({**data, "parameters": {
        **data["parameters"], "EchoTime": {"kind": "abs", "value": 0.00241, "tol": 0.0003}}})
    assert check_series({**t1w, "EchoTime": 0.00298}, protocol_tight).status == "fail"
    assert check_series(ve11, protocol_tight).status == "pass"
    assert check_series({**ve11, "EchoTime": 0.00241}, protocol_tight).status == "fail"
    # without SoftwareVersions the rule in force cannot be known
    unknown = dict(ve11)
    del unknown["SoftwareVersions"]
    verdict = check_series(unknown, protocol_tight)
    assert verdict.status == "undetermined"
    assert "SoftwareVersions" in _dev(verdict, "EchoTime").note


# --------------------------------------------------------------------------- rule kinds


RULE_CASES = [
    # rule, passing value, failing value
    ({"kind": "exact", "value": "Siemens"}, "Siemens", "SIEMENS"),
    ({"kind": "exact", "value": 3}, 3.0, 1.5),
    ({"kind": "exact", "value": ["ORIGINAL", "PRIMARY"]}, ["ORIGINAL", "PRIMARY"], ["ORIGINAL", "DERIVED"]),
    ({"kind": "abs", "value": 0.00241, "tol": 0.001}, 0.0033, 0.0035),
    ({"kind": "abs", "value": [0.9, 0.9], "tol": 0.05}, [0.95, 0.86], [0.9, 1.0]),
    ({"kind": "rel", "value": 2.3, "tol": 0.05}, 2.4, 2.5),
    ({"kind": "range", "min": 1.0, "max": 2.0}, 1.0, 2.01),
    ({"kind": "range", "min": 1.0}, 100, 0.5),
    ({"kind": "range", "max": 1.2}, [1.0, 1.2], [1.0, 1.3]),
    ({"kind": "one_of", "values": ["GRAPPA", "SENSE", "ASSET"]}, "SENSE", "CAIPI"),
    ({"kind": "regex", "pattern": r"syngo MR (XA|E)\d+"}, "syngo MR XA30", "syngo MR B17"),
    ({"kind": "regex", "pattern": r"ORIGINAL\\PRIMARY\\.*"}, ["ORIGINAL", "PRIMARY", "M"], ["DERIVED", "PRIMARY"]),
]


@pytest.mark.parametrize("rule, good, bad", RULE_CASES)
def test_each_rule_kind_passes_and_fails(rule, good, bad):
    protocol = Protocol.model_validate({"name": "p", "version": 1, "parameters": {"X": rule}})
    assert check_series({"X": good}, protocol).status == "pass"
    verdict = check_series({"X": bad}, protocol)
    assert verdict.status == "fail"
    assert verdict.deviations[0].rule == rule["kind"]
    assert verdict.deviations[0].observed == bad


def test_wrong_type_fails_and_record_never_fails():
    protocol = Protocol.model_validate({"name": "p", "version": 1, "parameters": {
        "TR": {"kind": "abs", "value": 2.3, "tol": 0.1}, "Coil": {"kind": "record"}}})
    assert check_series({"TR": "2.3", "Coil": "x"}, protocol).status == "fail"
    verdict = check_series({"TR": 2.3, "Coil": ["anything", 1]}, protocol)
    assert verdict.status == "pass" and verdict.recorded == {"Coil": ["anything", 1]}
    verdict = check_series({"TR": 2.3}, protocol)
    assert verdict.status == "pass" and verdict.recorded == {"Coil": None}


# --------------------------------------------------------------------------- files and locking


@needs_data
def test_yaml_round_trip(tmp_path, t1w_protocol):
    path = t1w_protocol.save(tmp_path / "t1w.yaml")
    assert load_protocol(path) == t1w_protocol
    assert load_protocol(path).content_sha256() == t1w_protocol.content_sha256()


def test_unknown_key_is_one_line_error_naming_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: t1\nversion: 1\nparameters:\n  EchoTime: {kind: abs, value: 0.002, tolerance: 0.001}\n")
    with pytest.raises(SitebenchError) as info:
        load_protocol(path)
    text = str(info.value)
    assert "unknown key 'parameters.EchoTime.tolerance'" in text and str(path) in text and "\n" not in text
    path.write_text("name: t1\nversion: 1\nparameters:\n  EchoTime: {kind: absolute, value: 0.002}\n")
    with pytest.raises(SitebenchError, match="EchoTime"):
        load_protocol(path)
    path.write_text("name: t1\nversion: 1\ncoverge: {min_mm: 100}\n")
    with pytest.raises(SitebenchError, match="unknown key 'coverge'"):
        load_protocol(path)


@needs_data
def test_lock_load_edit_and_versions(tmp_path, t1w_protocol):
    draft = t1w_protocol.save(tmp_path / "t1w.yaml")
    locks = tmp_path / "locked"
    locked = lock_protocol(draft, "jdoe", "trial protocol sign-off", locks)
    assert locked.created
    assert locked.path == locks / locked_file_name("t1w_volumetry", 1) == locks / "t1w_volumetry.v1.locked.yaml"
    assert locked.content_sha256 == t1w_protocol.content_sha256()
    audit = locked.audit_record
    assert audit["who"] == "jdoe" and audit["what"] == "protocol locked" and audit["why"] == "trial protocol sign-off"
    assert audit["protocol"] == "t1w_volumetry" and audit["version"] == 1
    assert audit["content_sha256"] == locked.content_sha256 and audit["when"]
    json.dumps(audit)

    loaded = load_protocol(locked.path)
    assert loaded.locked and loaded.lock.locked_by == "jdoe"
    assert loaded.content() == t1w_protocol.content()

    # identical content again: idempotent
    again = lock_protocol(draft, "someone else", "re-run", locks)
    assert not again.created and again.content_sha256 == locked.content_sha256
    assert again.audit_record["who"] == "jdoe"

    # different content under the same name and version: refused
    changed = t1w_protocol.model_copy(deep=True)
    changed.parameters["FlipAngle"].tol = 2
    changed.save(draft)
    with pytest.raises(SitebenchError, match="new version"):
        lock_protocol(draft, "jdoe", "looser flip angle", locks)

    # as a new version it locks fine
    changed.version = 2
    changed.save(draft)
    v2 = lock_protocol(draft, "jdoe", "looser flip angle", locks)
    assert v2.created and v2.path.name == "t1w_volumetry.v2.locked.yaml"
    assert v2.content_sha256 != locked.content_sha256
    assert load_protocol(locked.path).parameters["FlipAngle"].tol == 1

    # editing the locked file after locking: load refuses, naming the file
    os.chmod(locked.path, 0o644)
    text = locked.path.read_text()
    assert "tol: 1" in text
    locked.path.write_text(text.replace("value: 9, tol: 1", "value: 9, tol: 3"))
    with pytest.raises(SitebenchError) as info:
        load_protocol(locked.path)
    assert str(locked.path) in str(info.value) and "edited after it was locked" in str(info.value)
    assert "\n" not in str(info.value)


def test_lock_needs_who_and_why(tmp_path):
    path = Protocol(name="p", version=1).save(tmp_path / "p.yaml")
    with pytest.raises(SitebenchError, match="reason"):
        lock_protocol(path, "jdoe", " ", tmp_path / "locks")
    with pytest.raises(SitebenchError, match="who"):
        lock_protocol(path, "", "why", tmp_path / "locks")


# --------------------------------------------------------------------------- matching


@needs_data
def test_match_t1w_not_bold(t1w, t1w_protocol):
    bold = _sidecar(BOLD)
    epi = _sidecar(EPI_VE11)
    assert match_protocol(t1w, [t1w_protocol]) is t1w_protocol
    assert match_protocol(bold, [t1w_protocol]) is None
    assert match_protocol(epi, [t1w_protocol]) is None
    bold_protocol = draft_protocol(bold, "bold")
    assert match_protocol(bold, [t1w_protocol, bold_protocol]) is bold_protocol
    assert match_protocol(t1w, [t1w_protocol, bold_protocol]) is t1w_protocol


@needs_data
def test_match_rules_all_must_hold_and_ambiguity_raises(t1w):
    rules = {"SeriesDescription": ".*T1w.*", "ImageType": ["ORIGINAL", "PRIMARY"],
             "MRAcquisitionType": "3D", "ScanningSequence": r"GR\\IR", "SequenceName": r"\*tfl3d.*"}
    broad = Protocol.model_validate({"name": "t1_any", "version": 1, "match": rules})
    assert match_protocol(t1w, [broad]) is broad
    for key, value in [("MRAcquisitionType", "2D"), ("ImageType", ["DERIVED", "PRIMARY"]),
                       ("SeriesDescription", "localizer"), ("PulseSequenceName", "*fl3d1")]:
        assert match_protocol({**t1w, key: value}, [broad]) is None, key
    no_desc = dict(t1w)
    del no_desc["SeriesDescription"]
    assert match_protocol(no_desc, [broad]) is None
    narrow = draft_protocol(t1w, "t1w_volumetry")
    with pytest.raises(SitebenchError, match="more than one protocol"):
        match_protocol(t1w, [broad, narrow])
    assert match_protocol(t1w, [Protocol(name="empty", version=1)]) is None


@needs_data
def test_suggested_names_follow_what_the_series_is():
    from sitebench.qc.protocol import suggest_name

    assert suggest_name(_sidecar(T1W)) == "t1w-3d"
    assert suggest_name(_sidecar(BOLD)) == "bold"
    assert suggest_name(_sidecar(PHILIPS_T1)) == "t1w-3d"
    t2 = {"ScanningSequence": "SE", "MRAcquisitionType": "2D", "RepetitionTime": 4.0, "EchoTime": 0.09}
    assert suggest_name(t2) == "t2w"
    assert suggest_name({**t2, "InversionTime": 2.5}) == "flair"
    assert suggest_name({**t2, "MRAcquisitionType": "3D", "InversionTime": 1.8}) == "flair-3d"
    assert suggest_name({"SeriesDescription": "Ax DWI 64 dir", "ScanningSequence": "EP"}) == "dwi"
    assert suggest_name({"ScanningSequence": "EP", "ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION"]}) == "dwi"
    assert suggest_name({"ProtocolName": "  Localizer (3-plane) "}) == "localizer-3-plane"
    assert suggest_name({"SeriesDescription": "***"}) == "protocol"
    for params in ({}, {"ProtocolName": "é"}, {"SeriesDescription": "-x-"}):
        Protocol(name=suggest_name(params), version=1)  # always a valid protocol name
