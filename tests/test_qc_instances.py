"""Every instance counts: per-instance parameters, damaged geometry, malformed bytes and completeness,
on real copies of the GE 3D T1 (dcm_qa_deident, 196 single-frame files) changed with pydicom or
byte by byte. The gate must name the odd instance, never crash on a file, and never pass a check
it could not make."""

from __future__ import annotations

import io
import random
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.tag import Tag

from sitebench.errors import SitebenchError
from sitebench.qc.dicom_files import FileCheck, check_bytes, check_file
from sitebench.qc.gate import Gate, series_completeness
from sitebench.qc.protocol import Protocol, load_protocol

DICOM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
T1 = DICOM / "dcm_qa_deident" / "In"
pytestmark = pytest.mark.skipif(not T1.exists(), reason="needs ../shared/data/dicom")


@pytest.fixture(scope="module")
def locked(t1_protocols) -> Protocol:
    (path,) = sorted(t1_protocols.glob("*.yaml"))
    return load_protocol(path)


@pytest.fixture(scope="module")
def received() -> tuple[list[Path], list[FileCheck]]:
    """The reference series as intake leaves it: every file checked once on receipt."""
    files = sorted(T1.iterdir())
    return files, [check_file(f) for f in files]


def patch(data: bytes, keyword: str, value: bytes) -> bytes:
    """``data`` with the top-level explicit-VR element ``keyword`` holding ``value`` (raw bytes, padded)."""
    tag = Tag(keyword)
    key = struct.pack("<HH", tag.group, tag.element) + dictionary_VR(tag).encode()
    at = data.find(key)
    assert at > 0, keyword
    (length,) = struct.unpack("<H", data[at + 6:at + 8])
    value += b" " * (len(value) % 2)
    return data[:at + 6] + struct.pack("<H", len(value)) + value + data[at + 8 + length:]


def with_changed(tmp_path: Path, received, changes: dict[int, object]):
    """The series with file ``i`` replaced: a callable edits its dataset, bytes replace the file."""
    files, checks = list(received[0]), list(received[1])
    for index, change in changes.items():
        out = tmp_path / files[index].name
        if callable(change):
            ds = pydicom.dcmread(files[index])
            change(ds)
            ds.save_as(out)
        else:
            out.write_bytes(change)
        files[index], checks[index] = out, check_file(out)
    return files, checks


def deviation(outcome, parameter):
    return next(d for d in outcome.deviations if d.parameter == parameter)


def instance(number: int) -> int:
    """File index of InstanceNumber ``number`` (the files are named by it)."""
    return number - 1


# --------------------------------------------------------------------------- (a), (b) per instance
def test_one_instance_with_another_flip_angle_fails_naming_it(tmp_path, locked, received):
    files, checks = with_changed(tmp_path, received, {instance(57): lambda ds: setattr(ds, "FlipAngle", 30)})
    (outcome,) = Gate([locked], image_quality=False).check_received(files, checks, "S01")
    assert outcome.status == "fail"
    flip = deviation(outcome, "FlipAngle")
    assert flip.status == "fail" and flip.rule == "abs"
    assert flip.observed == "30 in instance 57 (195 other instances: 11)"
    assert [c.parameter for c in outcome.checks].count("FlipAngle") == 1  # replaces the first file's check


def test_one_instance_differing_in_an_unchecked_parameter_warns(tmp_path, locked, received):
    assert "NumberOfAverages" not in locked.parameters
    files, checks = with_changed(tmp_path, received, {instance(100): lambda ds: setattr(ds, "NumberOfAverages", 2)})
    (outcome,) = Gate([locked], image_quality=False).check_received(files, checks, "S01")
    assert outcome.status == "warn"
    averages = deviation(outcome, "NumberOfAverages")
    assert averages.status == "warn" and averages.note == "inconsistent within series"
    assert averages.observed == "2 in instance 100 (195 other instances: 1)"


def test_the_first_file_deviating_is_named_too(tmp_path, locked, received):
    files, checks = with_changed(tmp_path, received, {0: lambda ds: setattr(ds, "RepetitionTime", 8.0)})
    (outcome,) = Gate([locked], image_quality=False).check_received(files, checks, "S01")
    tr = deviation(outcome, "RepetitionTime")
    assert outcome.status == "fail" and tr.status == "fail" and "0.008 in instance 1" in tr.observed


def test_a_value_unreadable_in_one_instance_leaves_its_check_undetermined(tmp_path, locked, received):
    bad = patch(received[0][instance(57)].read_bytes(), "FlipAngle", b"abc")
    check = check_bytes(bad)
    assert not check.problems and check.summary is not None  # the file stays usable
    assert check.warnings == ["FlipAngle (0018,1314) is not a number: treated as missing"]
    files, checks = with_changed(tmp_path, received, {instance(57): bad})
    (outcome,) = Gate([locked], image_quality=False).check_received(files, checks, "S01")
    flip = deviation(outcome, "FlipAngle")
    assert outcome.status == "undetermined" and flip.status == "undetermined"
    assert "not a number in instance 57" in flip.note


# --------------------------------------------------------------------------- (c) damaged geometry
@pytest.mark.parametrize("value", [b"54.1937\\-134.594", b"nan\\inf\\1"], ids=["two-values", "nan-inf"])
def test_damaged_position_is_a_problem_and_the_series_undetermined(tmp_path, locked, received, value):
    bad = patch(received[0][instance(57)].read_bytes(), "ImagePositionPatient", value)
    check = check_bytes(bad)
    assert check.summary is not None and check.groupable
    assert len(check.problems) == 1 and check.problems[0].startswith(
        "damaged geometry: ImagePositionPatient (0020,0032)")
    assert "nan" not in check.problems[0] and "134" not in check.problems[0]  # no values
    files, checks = with_changed(tmp_path, received, {instance(57): bad})
    (outcome,) = Gate([locked]).check_received(files, checks, "S01")  # image quality on: skipped, not crashing
    assert outcome.status == "undetermined"
    geometry = deviation(outcome, "Geometry")
    assert geometry.status == "undetermined" and "instance 57" in geometry.observed
    for parameter in ("SliceCoverageMM", "SliceGapMM", "NumberOfSlices"):
        check_ = deviation(outcome, parameter)
        assert check_.status == "undetermined" and "instance 57" in check_.note


def test_check_received_raises_only_sitebench_errors_on_poisoned_summaries(tmp_path, locked, received):
    files, checks = received
    poisons = [
        lambda s: s.update(frames=[["x", [1.0], None]]),
        lambda s: s.update(frames=None),
        lambda s: s.update(acq={"FlipAngle": [1, "a", None], "Rows": {"x": 1}}),
        lambda s: s.update(instance="nonsense", geometry=[None, 3], invalid=5),
        lambda s: s.update(pixels={"offset": -5}),
        lambda s: s.clear(),
    ]
    gate = Gate([locked], image_quality=False)
    for poison in poisons:
        mangled = [FileCheck(c.series_uid, c.study_uid, c.sop_uid, list(c.problems), dict(c.summary)) for c in checks]
        poison(mangled[5].summary)
        try:
            (outcome,) = gate.check_received(files, mangled, "S01")
        except SitebenchError as exc:
            assert "\n" not in str(exc)
        else:
            assert outcome.status in ("pass", "warn", "fail", "undetermined", "unmatched")


# --------------------------------------------------------------------------- (d) malformed bytes
def file_meta(syntax: str) -> bytes:
    """Preamble, DICM and a file meta group for ``syntax`` (what a hand-built dataset follows)."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue()


def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value


def nested_sequences(depth: int) -> bytes:
    """``depth`` sequences each holding one item holding the next, undefined lengths throughout."""
    open_ = struct.pack("<HH", 0x0008, 0x1115) + b"SQ\0\0" + b"\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    close = b"\xfe\xff\x0d\xe0\0\0\0\0" + b"\xfe\xff\xdd\xe0\0\0\0\0"
    return open_ * depth + close * depth


def assert_verdict(check) -> None:
    assert isinstance(check, FileCheck)
    assert check.problems or check.summary is not None  # usable, or saying why not
    assert all(isinstance(p, str) and "\n" not in p for p in check.problems)


@pytest.mark.parametrize("keyword,value", [("FlipAngle", b"abc"), ("SliceThickness", b"abc"),
                                           ("InstanceNumber", b"x"), ("RepetitionTime", b"1e999")])
def test_malformed_numbers_never_raise(received, keyword, value):
    check = check_bytes(patch(received[0][0].read_bytes(), keyword, value))
    assert_verdict(check)
    said = " ".join(check.problems + check.warnings)
    assert keyword in said and value.decode() not in said
    if keyword == "SliceThickness":  # geometry: the file cannot be placed
        assert check.problems == ["damaged geometry: SliceThickness (0018,0050) needs 1 numbers, "
                                  "has a value that is not a number"]
    else:
        assert not check.problems


def test_hand_built_malformed_files_never_raise():
    explicit = file_meta("1.2.840.10008.1.2.1")
    sop = element(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.4\0")
    cases = {
        "2000-deep sequences": explicit + sop + nested_sequences(2000),
        "corrupt deflate": file_meta("1.2.840.10008.1.2.1.99") + bytes(range(256)) * 8,
        "huge declared length": explicit + sop + struct.pack("<HH", 0x0011, 0x1010) + b"OB\0\0"
        + struct.pack("<I", 0xFFFFFFF0) + b"\1" * 64,
        "huge sequence length": explicit + sop + struct.pack("<HH", 0x0008, 0x1115) + b"SQ\0\0"
        + struct.pack("<I", 0x7FFFFFF0) + b"\xfe\xff\x00\xe0" + struct.pack("<I", 0x7FFFFF00),
        "meta only": explicit,
        "empty": b"",
    }
    for name, data in cases.items():
        check = check_bytes(data)
        assert_verdict(check)
        assert check.problems, name
    deep = check_bytes(cases["2000-deep sequences"])
    assert any(p.startswith("unreadable header:") for p in deep.problems), deep.problems


def test_random_byte_flips_never_raise(received):
    data = received[0][instance(57)].read_bytes()
    pixels = data.find(b"\xe0\x7f\x10\x00")
    rng = random.Random(20260212)
    for _ in range(50):
        at = rng.randrange(0, pixels + 16)
        flipped = data[:at] + bytes(rng.randrange(256) for _ in range(16)) + data[at + 16:]
        assert_verdict(check_bytes(flipped))


# --------------------------------------------------------------------------- (e) completeness
def test_full_series_is_complete(received, locked):
    complete = series_completeness([c.summary for c in received[1]])
    assert complete.complete is True and complete.expected == 196 and complete.received == 196
    assert Gate([locked]).expected_instances([c.summary for c in received[1]]) == 196


def test_fewer_than_number_of_series_related_instances_is_incomplete(tmp_path, received):
    def declare(ds):
        ds.NumberOfSeriesRelatedInstances = 196
    files, checks = with_changed(tmp_path, received, {i: declare for i in range(12)})
    complete = series_completeness([c.summary for c in checks[:12]])
    assert complete.complete is False and complete.expected == 196 and complete.received == 12
    assert "NumberOfSeriesRelatedInstances" in complete.why


def test_missing_middle_slices_are_a_hole(tmp_path, received):
    summaries = [c.summary for i, c in enumerate(received[1]) if not 90 <= i < 100]
    complete = series_completeness(summaries)
    assert complete.complete is False and complete.expected == 196
    assert "10 slice position(s) missing" in complete.why and "InstanceNumbers 91-100 are absent too" in complete.why

    def anonymous(ds):  # without ImagesInAcquisition the hole alone says it
        del ds.ImagesInAcquisition
    part = {i: anonymous for i in range(40) if not 20 <= i < 25}
    files, checks = with_changed(tmp_path, received, part)
    complete = series_completeness([checks[i].summary for i in part])
    assert complete.complete is False and complete.expected == 40 and "5 slice position(s)" in complete.why


def test_no_evidence_is_unknown(tmp_path, received):
    def anonymous(ds):
        del ds.ImagesInAcquisition
    files, checks = with_changed(tmp_path, received, {i: anonymous for i in range(20)})
    complete = series_completeness([c.summary for c in checks[:20]])
    assert complete.complete is None and complete.expected is None and complete.received == 20
    siemens = sorted((DICOM / "dcm_qa_nih" / "In" / "20180918Si" / "mr_0003").iterdir())
    assert series_completeness([check_file(f).summary for f in siemens]).complete is None
