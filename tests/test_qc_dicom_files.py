"""check_bytes / check_path on inputs built here (no shared data): every input form gives the same
verdict, a big file is checked without reading it whole, and the DICOM rules the fuzz corpus
exercises hold on minimal files too."""

from __future__ import annotations

import io
import mmap
import struct
import subprocess
import sys
import textwrap
import zlib

import pytest

from sitebench.qc.dicom_files import check_bytes, check_file, check_path

MR = "1.2.840.10008.5.1.4.1.1.4"
SC = "1.2.840.10008.5.1.4.1.1.7"


def _dataset(sop_class: str = MR, rows: int = 8, cols: int = 8, frames: int | None = None, pixels: bool = True):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["sop", str(rows)])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["series"])
    ds.Modality = "MR"
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1, 1]
    ds.SliceThickness = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if frames:
        ds.NumberOfFrames = frames
    if pixels:
        ds.PixelData = bytes(rows * cols * 2 * (frames or 1))
    return ds


def _bytes(ds, implicit: bool = False) -> bytes:
    import pydicom
    from pydicom.uid import ImplicitVRLittleEndian

    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _verdict(check):
    return check.problems, check.warnings, check.series_uid, check.sop_uid, check.summary


def test_every_input_form_gives_the_same_verdict(tmp_path):
    data = _bytes(_dataset())
    path = tmp_path / "one.dcm"
    path.write_bytes(data)
    want = check_bytes(data)
    assert not want.problems and want.summary and want.summary.get("pixels")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert _verdict(check_bytes(mapped)) == _verdict(want)
        handle.seek(0)
        assert _verdict(check_bytes(handle)) == _verdict(want)
    assert _verdict(check_bytes(bytearray(data))) == _verdict(want)
    assert _verdict(check_bytes(memoryview(data))) == _verdict(want)
    assert _verdict(check_path(path)) == _verdict(want) == _verdict(check_file(path))


def test_check_path_never_raises(tmp_path):
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    assert check_path(empty).problems == ["not a DICOM file (no DICM preamble or file meta)"]
    assert check_path(tmp_path / "absent.dcm").problems[0].startswith("cannot be read")
    assert check_path(tmp_path).problems[0].startswith("cannot be read")  # a folder
    assert check_path("bad\x00path").problems[0].startswith("cannot be read")


def test_deflated_file_is_checked_on_the_inflated_dataset():
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    data = _bytes(_dataset())
    meta_end = 132 + 12 + struct.unpack_from("<I", data, 140)[0]
    plain_ts = b"1.2.840.10008.1.2.1\x00"
    squeeze = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = squeeze.compress(data[meta_end:]) + squeeze.flush()
    meta = data[:meta_end]
    at = meta.index(plain_ts)
    new_ts = DeflatedExplicitVRLittleEndian.encode() + b"\x00"
    meta = meta[:at - 2] + struct.pack("<H", len(new_ts)) + new_ts + meta[at + len(plain_ts):]
    meta = meta[:140] + struct.pack("<I", len(meta) - 144) + meta[144:]
    check = check_bytes(meta + body)
    assert not check.problems and check.summary and "pixels" not in check.summary
    short = check_bytes(meta + body[:len(body) // 2])
    assert short.problems == ["deflated dataset truncated: the deflate stream ends early"]


def test_bare_implicit_dataset_accepted_with_a_warning_and_blobs_are_not():
    data = _bytes(_dataset(), implicit=True)
    meta_end = 132 + 12 + struct.unpack_from("<I", data, 140)[0]
    check = check_bytes(data[meta_end:])
    assert not check.problems
    assert check.warnings == ["no DICOM file meta (PS3.10 7.1): read as a bare implicit VR little endian dataset"]
    for blob in (b"", b"\x08", b"\x08\x00" * 40, bytes(4096), b"PK\x03\x04" + bytes(100)):
        assert check_bytes(blob).problems == ["not a DICOM file (no DICM preamble or file meta)"]


@pytest.mark.parametrize("keyword,value,expected", [
    ("SOPInstanceUID", "1.2.840.abc.7", "SOPInstanceUID is not a valid UID (PS3.5 9.1)"),
    ("StudyInstanceUID", "1." + "2" * 63, "StudyInstanceUID is not a valid UID (PS3.5 9.1)"),
    ("Rows", 0, "Rows is 0"),
    ("BitsAllocated", 12, "BitsAllocated 12 is not 1 or a multiple of 8"),
    ("HighBit", 16, "HighBit 16 is not below BitsAllocated 16"),
])
def test_impossible_values_are_problems(keyword, value, expected):
    import warnings

    ds = _dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setattr(ds, keyword, value)
        check = check_bytes(_bytes(ds))
    assert expected in check.problems


def test_leading_zero_uid_warns_and_image_plane_applies_to_classic_images_only():
    ds = _dataset()
    ds.SeriesInstanceUID = "1.2.840.0113.5"
    check = check_bytes(_bytes(ds))
    assert not check.problems and check.warnings == [
        "SeriesInstanceUID has a component with a leading zero (PS3.5 9.1)"]
    for sop_class, warned in ((MR, True), (SC, False)):
        ds = _dataset(sop_class)
        del ds.ImagePositionPatient
        ds.PixelSpacing = None
        check = check_bytes(_bytes(ds))
        assert not check.problems  # real scanners write derived MR without a position: usable, warned
        assert bool(check.warnings) is warned, check.warnings
        if warned:
            assert check.warnings == ["image plane incomplete: ImagePositionPatient (0020,0032) missing (PS3.3 C.7.6.2)",
                                      "image plane incomplete: PixelSpacing (0028,0030) empty (PS3.3 C.7.6.2)"]


_MEASURE = textwrap.dedent("""
    import json, resource, sys
    from sitebench.qc.dicom_files import check_path
    import sitebench.qc.dicom_params  # noqa: F401 - imported before the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    check = check_path(sys.argv[1])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_kb": after - before, "problems": check.problems}))
""")


def _growth(path) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_300_mb_file_is_checked_without_reading_it_whole(tmp_path):
    """Peak RSS growth of check_path on a 300 MB DICOM file and a 300 MB blob stays under 50 MB."""
    rows = cols = 512
    frames = 300 * 2**20 // (rows * cols * 2)
    big = tmp_path / "big.dcm"
    blob = tmp_path / "blob.bin"
    try:
        header = _bytes(_dataset(rows=rows, cols=cols, frames=frames, pixels=False))
        length = rows * cols * 2 * frames
        with open(big, "wb") as handle:  # a valid file: header, then a 300 MB native PixelData
            handle.write(header + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
            handle.truncate(len(header) + 12 + length)
        assert big.stat().st_size > 300 * 10**6
        with open(blob, "wb") as handle:
            handle.write(bytes(range(256)) * 16)
            handle.truncate(300 * 2**20)
        result = _growth(big)
        print(f"check_path peak RSS growth: 300 MB DICOM {result['growth_kb'] / 1024:.1f} MB", end="; ")
        assert result["problems"] == []
        assert result["growth_kb"] < 50 * 1024, result
        result = _growth(blob)
        print(f"300 MB blob {result['growth_kb'] / 1024:.1f} MB")
        assert result["problems"] == ["not a DICOM file (no DICM preamble or file meta)"]
        assert result["growth_kb"] < 50 * 1024, result
    finally:
        big.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
