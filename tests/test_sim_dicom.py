"""A simulated volume written as DICOM (sitebench.datasets.dicom_export) is read back by real tools:
dcm2niix (its BIDS sidecar and its NIfTI), the gate's own parameter reader (``sitebench qc inspect``),
the gate's NIfTI builder (``qc manifest``), the gate's file checker and completeness, for classic
(one file per slice) and enhanced (one multi-frame file) series, straight and oblique. No mocks.

Geometry the callers rely on (asserted in test_gate_nifti_gives_back_the_input): the gate's NIfTI
(series_nifti) of a right-handed input affine holds ``image.transpose(1, 0, 2)`` with the affine's
first two columns swapped. It stacks in DICOM (row, column) order, and any stack built that way is
left-handed, so it cannot keep a right-handed input's voxel order. Label maps on the simulator grid
therefore line up with the gate's NIfTI only after that transpose (or after both images are brought
to the closest canonical orientation).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime

import nibabel as nib
import numpy as np
import pytest

from sitebench.datasets.dicom_export import (
    ENHANCED_MR_IMAGE_STORAGE,
    MR_IMAGE_STORAGE,
    SeriesHeader,
    simulated_uid,
    write_series,
)
from sitebench.errors import SitebenchError

SHAPE = (40, 48, 36)


def _dcm2niix() -> str | None:
    return shutil.which("dcm2niix", path=os.path.dirname(sys.executable)) or shutil.which("dcm2niix")


def _volume(shape=SHAPE) -> np.ndarray:
    """Integer values up to ~2000 with structure that is asymmetric along every axis (a flip or
    transpose shows): an off-centre ellipsoid, a gradient along each axis and a block in one corner."""
    i, j, k = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    ellipsoid = ((i - 17) / 14) ** 2 + ((j - 26) / 18) ** 2 + ((k - 15) / 12) ** 2 < 1
    image = 300 + 7 * i + 3 * j + 11 * k + 900 * ellipsoid
    image[2:8, 3:6, 1:4] = 1990
    image[0, 0, 0] = 0
    return np.rint(image).astype(np.float32)


def _straight() -> np.ndarray:
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-40.5, -52.25, -30.0]
    return affine


def _oblique() -> np.ndarray:
    def rot(axis, degrees):
        c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
        m = np.eye(3)
        a, b = [x for x in range(3) if x != axis]
        m[a, a], m[a, b], m[b, a], m[b, b] = c, -s, s, c
        return m

    affine = np.eye(4)
    affine[:3, :3] = rot(0, 17.0) @ rot(2, -9.0) @ np.diag([2.0, 2.0, 3.0])
    affine[:3, 3] = [-35.0, -60.0, -12.5]
    return affine


AFFINES = {"straight": _straight, "oblique": _oblique}


def _header(enhanced: bool, name: str = "case") -> SeriesHeader:
    return SeriesHeader(
        manufacturer="SIEMENS", model="Prisma", software_versions="syngo MR E11",
        device_serial_number="166038", station_name="SIMMR01", institution_name="Simulated Site 03",
        field_strength=3.0, series_description="T1w_MPR", protocol_name="T1w_MPR_sag",
        repetition_time_ms=2300.0, echo_time_ms=2.98, inversion_time_ms=900.0, flip_angle_deg=9.0,
        scanning_sequence="GR\\IR", sequence_variant="SK\\SP\\MP", sequence_name="*tfl3d1_16ns",
        mr_acquisition_type="3D", patient_name="SIMULATED^SUBJECT^0042", patient_id="SIM-0042-XQ",
        patient_birth_date="19630417", patient_sex="F",
        study_uid=simulated_uid("test", name, "study"), series_uid=simulated_uid("test", name, "series"),
        frame_of_reference_uid=simulated_uid("test", name, "for"),
        acquisition_datetime=datetime(2024, 5, 6, 13, 14, 15, 250000), series_number=7,
        accession_number="", enhanced=enhanced, pixel_bandwidth=240.0, echo_train_length=1)


CASES = [(enhanced, geometry) for enhanced in (False, True) for geometry in AFFINES]
IDS = [f"{'enhanced' if e else 'classic'}-{g}" for e, g in CASES]


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def written(request, tmp_path_factory):
    enhanced, geometry = request.param
    image, affine = _volume(), AFFINES[geometry]()
    header = _header(enhanced, f"{enhanced}-{geometry}")
    out = tmp_path_factory.mktemp(f"dicom-{'enh' if enhanced else 'classic'}-{geometry}")
    files = write_series(image, affine, header, out)
    return {"image": image, "affine": affine, "header": header, "files": files, "dir": out}


@pytest.fixture(scope="module")
def converted(written, tmp_path_factory):
    """dcm2niix's NIfTI and sidecar of the written series."""
    exe = _dcm2niix()
    if exe is None:
        pytest.skip("dcm2niix not installed (pip install dcm2niix: it is in requirements.lock)")
    out = tmp_path_factory.mktemp("nii")
    run = subprocess.run([exe, "-b", "y", "-z", "n", "-f", "converted", "-o", str(out), str(written["dir"])],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    niftis = sorted(out.glob("*.nii"))
    assert len(niftis) == 1, (run.stdout, sorted(p.name for p in out.iterdir()))
    sidecar = json.loads(niftis[0].with_suffix(".json").read_text())
    return nib.load(niftis[0]), sidecar, run.stdout


def _canonical(image: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    canonical = nib.as_closest_canonical(image)
    return np.asarray(canonical.dataobj, dtype=np.float64), canonical.affine


def _assert_same_volume(image: nib.Nifti1Image, written) -> None:
    want_data, want_affine = _canonical(nib.Nifti1Image(written["image"], written["affine"]))
    got_data, got_affine = _canonical(image)
    assert got_data.shape == want_data.shape
    np.testing.assert_array_equal(got_data, want_data)
    np.testing.assert_allclose(got_affine, want_affine, atol=1e-3, rtol=0)


def _inspect(files):
    from sitebench.qc.dicom_params import read_series

    (series,) = read_series(files)  # what cmd_qc_inspect prints, record by record
    return series


# --------------------------------------------------------------------------- the files themselves
def test_valid_part10_files_with_the_scanner_headers(written):
    import pydicom

    header, files = written["header"], written["files"]
    assert len(files) == (1 if header.enhanced else SHAPE[2])
    for f in files:
        assert f.read_bytes()[128:132] == b"DICM"
    ds = pydicom.dcmread(files[0])
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == (
        ENHANCED_MR_IMAGE_STORAGE if header.enhanced else MR_IMAGE_STORAGE)
    assert (ds.Modality, ds.PatientPosition, ds.BodyPartExamined, ds.PhotometricInterpretation) == (
        "MR", "HFS", "BRAIN", "MONOCHROME2")
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
    assert (ds.Rows, ds.Columns) == (SHAPE[1], SHAPE[0])
    assert ds.Manufacturer == "SIEMENS" and ds.ManufacturerModelName == "Prisma"
    assert ds.StudyDate == ds.SeriesDate == ds.ContentDate == "20240506"
    assert ds.StudyTime == "131415.250000"
    if header.enhanced:
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "M", "NONE"]
        assert int(ds.NumberOfFrames) == SHAPE[2] == len(ds.PerFrameFunctionalGroupsSequence)
        shared = ds.SharedFunctionalGroupsSequence[0]
        assert float(shared.MRTimingAndRelatedParametersSequence[0].RepetitionTime) == 2300.0
        assert float(shared.MRTimingAndRelatedParametersSequence[0].FlipAngle) == 9.0
        assert shared.MREchoSequence[0].EffectiveEchoTime == pytest.approx(2.98)
        assert float(shared.MRModifierSequence[0].InversionTimes) == 900.0  # FD, one value
        assert ds.PulseSequenceName == "*tfl3d1_16ns" and ds.MRAcquisitionType == "3D"
        assert "SequenceName" not in ds and "RepetitionTime" not in ds  # where the standard puts them
        frames = ds.PerFrameFunctionalGroupsSequence
        assert [f.FrameContentSequence[0].InStackPositionNumber for f in frames] == list(range(1, SHAPE[2] + 1))
        assert ds.AcquisitionDateTime == "20240506131415.250000"
        pixels = ds.pixel_array  # (frames, rows, columns)
        np.testing.assert_array_equal(pixels, written["image"].transpose(2, 1, 0))
    else:
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "M", "ND"]
        assert [int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) for f in files] == \
            list(range(1, SHAPE[2] + 1))
        assert ds.SOPInstanceUID == simulated_uid(header.series_uid, 0)
        assert ds.ImagingFrequency == pytest.approx(127.732, abs=1e-3)
        assert (float(ds.RescaleIntercept), float(ds.RescaleSlope)) == (0.0, 1.0)
        assert int(ds.ImagesInAcquisition) == SHAPE[2]
        np.testing.assert_array_equal(ds.pixel_array, written["image"][:, :, 0].T)


def test_pydicom_reads_and_rewrites_the_same_bytes(written):
    """The pre-encoded bytes are well-formed: pydicom parses every element and writes the file back unchanged."""
    import pydicom

    for f in written["files"][:3] + written["files"][-1:]:
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, pydicom.dcmread(f), enforce_file_format=True)
        assert buffer.getvalue() == f.read_bytes(), f.name


def test_deterministic(written, tmp_path):
    again = write_series(written["image"], written["affine"], written["header"], tmp_path)
    assert [p.name for p in again] == [p.name for p in written["files"]]
    for a, b in zip(again, written["files"]):
        assert a.read_bytes() == b.read_bytes()


# --------------------------------------------------------------------------- 1. dcm2niix
def test_dcm2niix_sidecar_and_volume(written, converted):
    image, sidecar, log = converted
    header = written["header"]
    assert sidecar["RepetitionTime"] == pytest.approx(header.repetition_time_ms / 1000)
    assert sidecar["EchoTime"] == pytest.approx(header.echo_time_ms / 1000)
    assert sidecar["InversionTime"] == pytest.approx(header.inversion_time_ms / 1000)
    assert sidecar["FlipAngle"] == pytest.approx(header.flip_angle_deg)
    assert sidecar["Manufacturer"] == "Siemens"  # dcm2niix's vendor name, as the gate's reader gives it
    assert sidecar["ManufacturersModelName"] == header.model
    assert sidecar["SoftwareVersions"] == header.software_versions
    assert sidecar["MagneticFieldStrength"] == pytest.approx(header.field_strength)
    assert sidecar["SliceThickness"] == pytest.approx(3.0)
    assert sidecar["MRAcquisitionType"] == "3D"
    assert sidecar.get("SequenceName", sidecar.get("PulseSequenceName")) == header.sequence_name
    assert sidecar["PixelBandwidth"] == pytest.approx(header.pixel_bandwidth)
    if header.enhanced:  # the Enhanced MR IOD has no ScanningSequence / SequenceVariant (PS3.3 A.36.2)
        assert "ScanningSequence" not in sidecar and "SequenceVariant" not in sidecar
    else:
        assert sidecar["ScanningSequence"] == header.scanning_sequence
        assert sidecar["SequenceVariant"] == header.sequence_variant
    assert "warning" not in log.lower(), log
    _assert_same_volume(image, written)


# --------------------------------------------------------------------------- 2. qc inspect
def test_inspect_agrees_with_header_and_dcm2niix(written, converted):
    _, sidecar, _ = converted
    header = written["header"]
    series = _inspect(written["files"])
    p = series.parameters
    assert series.series_uid == header.series_uid and len(series.files) == len(written["files"])
    want = {"RepetitionTime": header.repetition_time_ms / 1000, "EchoTime": header.echo_time_ms / 1000,
            "InversionTime": header.inversion_time_ms / 1000, "FlipAngle": header.flip_angle_deg,
            "SliceThickness": 3.0, "MagneticFieldStrength": header.field_strength,
            "PixelBandwidth": header.pixel_bandwidth}
    for key, value in want.items():
        assert p[key] == pytest.approx(value), key
        assert p[key] == pytest.approx(sidecar[key]), key
    assert p["PixelSpacing"] == pytest.approx([2.0, 2.0])
    assert p["SpacingBetweenSlices"] == pytest.approx(3.0)
    for key, value in {"Manufacturer": "Siemens", "ManufacturersModelName": header.model,
                       "SoftwareVersions": header.software_versions, "MRAcquisitionType": "3D"}.items():
        assert p[key] == value == sidecar[key], key
    assert (p["Rows"], p["Columns"], p["NumberOfSlices"]) == (SHAPE[1], SHAPE[0], SHAPE[2])
    assert p["SliceCoverageMM"] == pytest.approx(SHAPE[2] * 3.0)
    assert p["ImageOrientationPatientDICOM"] == pytest.approx(sidecar["ImageOrientationPatientDICOM"], abs=1e-5)
    if header.enhanced:
        # (0018,9005) is the BIDS SequenceName, as dcm2niix writes it since 2024 (and as classic files give it)
        assert p["SequenceName"] == header.sequence_name == sidecar.get("SequenceName",
                                                                       sidecar.get("PulseSequenceName"))
        assert "ScanningSequence" not in p and "SequenceVariant" not in p and "PulseSequenceName" not in p
    else:
        for key in ("ScanningSequence", "SequenceVariant", "SequenceName"):
            assert p[key] == sidecar[key], key
        assert (p["ScanningSequence"], p["SequenceVariant"], p["SequenceName"]) == (
            header.scanning_sequence, header.sequence_variant, header.sequence_name)
    assert p["SeriesDescription"] == sidecar["SeriesDescription"] == header.series_description
    assert p["ProtocolName"] == sidecar["ProtocolName"] == header.protocol_name


# --------------------------------------------------------------------------- 3. the gate's NIfTI
def test_gate_nifti_gives_back_the_input(written):
    from sitebench.qc.dicom_files import series_nifti

    gate = series_nifti(written["files"])
    _assert_same_volume(gate, written)
    # voxel for voxel: the gate's grid is the input's with axes i and j swapped (see the module doc)
    assert np.linalg.det(written["affine"][:3, :3]) > 0
    np.testing.assert_array_equal(np.asarray(gate.dataobj), written["image"].transpose(1, 0, 2))
    np.testing.assert_allclose(gate.affine, written["affine"][:, [1, 0, 2, 3]], atol=1e-3, rtol=0)


def test_gate_nifti_of_a_left_handed_input(tmp_path):
    """A left-handed affine (i pointing left, as radiological NIfTI): slices come out reversed too."""
    from sitebench.qc.dicom_files import series_nifti

    affine = _straight()
    affine[:, 0] *= -1
    image = _volume()
    files = write_series(image, affine, _header(False, "left"), tmp_path)
    gate = series_nifti(files)
    np.testing.assert_array_equal(np.asarray(gate.dataobj), image.transpose(1, 0, 2)[:, :, ::-1])
    want = nib.as_closest_canonical(nib.Nifti1Image(image, affine))
    got = nib.as_closest_canonical(gate)
    np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj))
    np.testing.assert_allclose(got.affine, want.affine, atol=1e-3, rtol=0)


# --------------------------------------------------------------------------- 4. the gate's checker
def test_gate_checker_sees_a_complete_clean_series(written):
    from sitebench.qc.dicom_files import check_path
    from sitebench.qc.dicom_params import instance_spread
    from sitebench.qc.gate import series_completeness

    checks = [check_path(f) for f in written["files"]]
    for f, check in zip(written["files"], checks):
        assert check.problems == [], (f.name, check.problems)
        assert check.warnings == [], (f.name, check.warnings)
        assert check.series_uid == written["header"].series_uid
    summaries = [c.summary for c in checks]
    assert instance_spread(summaries) == []
    completeness = series_completeness(summaries)
    if written["header"].enhanced:
        # one multi-frame instance: the Enhanced MR IOD has no ImagesInAcquisition, so no evidence
        assert completeness.complete is None, completeness
    else:
        assert completeness.complete is True, completeness
        assert completeness.expected == completeness.received == SHAPE[2]


# --------------------------------------------------------------------------- 5. PHI
def test_phi_is_written_and_reported_by_name_only(written):
    import pydicom

    header = written["header"]
    ds = pydicom.dcmread(written["files"][0], stop_before_pixels=True)
    assert (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.PatientSex) == (
        header.patient_name, header.patient_id, header.patient_birth_date, header.patient_sex)
    series = _inspect(written["files"])
    assert {"PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "StationName",
            "DeviceSerialNumber"} <= set(series.phi_present)
    assert "AccessionNumber" not in series.phi_present  # written empty (Type 2)
    text = json.dumps(series.to_dict(), default=str)
    for value in (header.patient_name, "SIMULATED", header.patient_id, header.patient_birth_date,
                  header.institution_name, header.station_name, header.device_serial_number):
        assert value not in text, value


# --------------------------------------------------------------------------- edges
def test_fewer_slices_keep_their_positions(tmp_path):
    import pydicom

    image, affine = _volume(), _straight()
    full = write_series(image, affine, _header(False, "full"), tmp_path / "full")
    cut = write_series(image[:, :, :30], affine, _header(False, "cut"), tmp_path / "cut")
    assert len(cut) == 30
    for a, b in zip(full, cut):
        assert pydicom.dcmread(a, stop_before_pixels=True).ImagePositionPatient == \
            pydicom.dcmread(b, stop_before_pixels=True).ImagePositionPatient
    assert _inspect(cut).parameters["NumberOfSlices"] == 30


def test_integer_array_and_16_bit_values(tmp_path):
    import pydicom

    image = _volume().astype(np.int32)
    image[5, 5, 1] = 65535
    (f, *_) = write_series(image[:, :, :2], _straight(), _header(False, "wide"), tmp_path)
    ds = pydicom.dcmread(f)
    assert (ds.BitsStored, ds.HighBit) == (16, 15)
    np.testing.assert_array_equal(ds.pixel_array, image[:, :, 0].T)


@pytest.mark.parametrize("bad, why", [
    (lambda im, af: (im + 0.5, af), "non-integer"),
    (lambda im, af: (im - 10, af), "do not fit"),
    (lambda im, af: (im * 40, af), "do not fit"),
    (lambda im, af: (im[:, :, 0], af), "3-D"),
    (lambda im, af: (im, af + np.array([[0, 0, 0.5, 0], [0] * 4, [0] * 4, [0] * 4])), "perpendicular"),
    (lambda im, af: (im, af + np.array([[0, 0.5, 0, 0], [0] * 4, [0] * 4, [0] * 4])), "orthogonal"),
])
def test_refuses_what_dicom_cannot_hold(tmp_path, bad, why):
    image, affine = bad(_volume((6, 5, 4)), _straight())
    with pytest.raises(SitebenchError, match=why):
        write_series(image, affine, _header(False), tmp_path)
    assert not list(tmp_path.iterdir())


def test_simulated_uid_is_deterministic_and_valid():
    from pydicom.uid import UID

    a, b = simulated_uid("trial", 7, "scan-3"), simulated_uid("trial", 7, "scan-3")
    assert a == b != simulated_uid("trial", 7, "scan-4")
    assert UID(a).is_valid and len(a) <= 64
