"""The gate on real DICOM copies: a protocol drafted from the GE 3D T1 passes it and catches
a changed TR, missing slices, image quality under a protocol threshold and a software upgrade."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from sitebench.qc.gate import Gate
from sitebench.qc.protocol import Protocol, load_protocol, lock_protocol

T1 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom" / "dcm_qa_deident" / "In"
pytestmark = pytest.mark.skipif(not T1.exists(), reason="needs ../shared/data/dicom")


@pytest.fixture(scope="module")
def locked(t1_protocols) -> Protocol:
    (path,) = sorted(t1_protocols.glob("*.yaml"))
    return load_protocol(path)


def copy_series(out: Path, edit=None, keep=None) -> Path:
    """A real copy of the T1 (new series UID), each kept file passed through ``edit``."""
    out.mkdir(parents=True)
    files = sorted(T1.iterdir())
    new_uid = pydicom.uid.generate_uid()
    for index, f in enumerate(files):
        if keep is not None and not keep(index, len(files)):
            continue
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = new_uid
        if edit is not None:
            edit(ds)
        ds.save_as(out / f.name)
    return out


def deviation(outcome, parameter):
    return next(d for d in outcome.deviations if d.parameter == parameter)


def test_reference_series_passes_with_image_quality(locked):
    (outcome,) = Gate([locked]).check_files(sorted(T1.iterdir()), site="S01")
    assert outcome.status == "pass" and outcome.protocol == "ge-t1w" and not outcome.deviations
    assert outcome.n_files == 196 and len(outcome.checks) >= 15
    for metric in ("snr_total", "cnr", "cjv", "efc", "fber", "fwhm_avg", "qi_1", "wm2max"):
        assert metric in outcome.image_quality
    assert outcome.image_quality["fwhm_avg"] > 1.0  # mm, at least one voxel
    # identifiers: names as a finding, values nowhere
    first = pydicom.dcmread(next(T1.iterdir()), stop_before_pixels=True)
    assert "PatientName" in outcome.phi_present
    text = repr(outcome.to_dict())
    for keyword in ("PatientName", "PatientID", "SeriesInstanceUID", "StudyInstanceUID", "DeviceSerialNumber"):
        value = str(first.get(keyword, "")).strip()
        if value:
            assert value not in text


def test_changed_tr_fails(tmp_path, locked):
    copy = copy_series(tmp_path / "tr", edit=lambda ds: setattr(ds, "RepetitionTime", float(ds.RepetitionTime) * 1.1))
    (outcome,) = Gate([locked], image_quality=False).check_files(sorted(copy.iterdir()), site="S01")
    assert outcome.status == "fail"
    tr = deviation(outcome, "RepetitionTime")
    assert tr.status == "fail" and tr.rule == "rel"


def test_removed_slices_fail_gap_count_and_coverage(tmp_path, locked):
    middle = copy_series(tmp_path / "middle", keep=lambda i, n: i != n // 2)
    (outcome,) = Gate([locked], image_quality=False).check_files(sorted(middle.iterdir()), site="S01")
    assert outcome.status == "fail"
    gap = deviation(outcome, "SliceGapMM")
    assert gap.status == "fail" and gap.observed == pytest.approx(float(pydicom.dcmread(
        next(T1.iterdir()), stop_before_pixels=True).SliceThickness), abs=0.01)  # one slice missing: a 1-slice gap
    assert deviation(outcome, "NumberOfSlices").observed == 195

    top_cut = copy_series(tmp_path / "top", keep=lambda i, n: i < int(0.9 * n))
    (outcome,) = Gate([locked], image_quality=False).check_files(sorted(top_cut.iterdir()), site="S01")
    coverage = deviation(outcome, "SliceCoverageMM")
    assert outcome.status == "fail" and coverage.status == "fail" and coverage.rule == "coverage"


def test_software_upgrade_is_drift_on_first_upgraded_series(tmp_path, locked):
    gate = Gate([locked], image_quality=False)
    (baseline,) = gate.check_files(sorted(T1.iterdir()), site="S01")
    assert baseline.status == "pass" and not baseline.drift
    upgraded = copy_series(tmp_path / "upgraded", edit=lambda ds: setattr(ds, "SoftwareVersions", "29\\LX\\MR SW 30"))
    (first,) = gate.check_files(sorted(upgraded.iterdir()), site="S01")
    assert first.status == "pass"  # SoftwareVersions is record-only: the verdict passes, drift still fires
    (event,) = [e for e in first.drift if e.parameter == "SoftwareVersions"]
    assert event.kind == "software" and event.observed == "29\\LX\\MR SW 30"
    again = copy_series(tmp_path / "again", edit=lambda ds: setattr(ds, "SoftwareVersions", "29\\LX\\MR SW 30"))
    (second,) = gate.check_files(sorted(again.iterdir()), site="S01")
    assert not second.drift  # raised once, on the first upgraded series
    # another site's scanner has its own baseline
    (other,) = gate.check_files(sorted(upgraded.iterdir()), site="S02")
    assert not other.drift


def test_image_quality_threshold_from_the_protocol(tmp_path, locked):
    data = locked.content()
    data.update(version=2, image_quality={"snr_total": {"kind": "range", "min": 1000.0, "severity": "warn"},
                                          "efc": {"kind": "range", "max": 0.9}})
    strict = Protocol.model_validate(data).save(tmp_path / "v2.yaml")
    v2 = lock_protocol(strict, who="A. Physicist", why="add IQM floors", lock_dir=tmp_path / "locked").protocol
    assert load_protocol(tmp_path / "locked" / "ge-t1w.v2.locked.yaml").image_quality
    (outcome,) = Gate([v2]).check_files(sorted(T1.iterdir()), site="S01")
    assert outcome.status == "warn"
    snr = deviation(outcome, "iqm.snr_total")
    assert snr.status == "warn" and snr.observed == pytest.approx(outcome.image_quality["snr_total"])
    assert all(d.parameter != "iqm.efc" for d in outcome.deviations)


def test_unlocked_protocols_are_refused(locked):
    draft = locked.model_copy(update={"lock": None})
    with pytest.raises(Exception, match="locked"):
        Gate([draft])
