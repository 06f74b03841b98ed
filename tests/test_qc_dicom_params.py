"""read_series against dcm2niix's reference sidecars (dcm_qa* validation sets)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sitebench.errors import SitebenchError
from sitebench.qc.dicom_params import read_series

DICOM_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
pytestmark = pytest.mark.skipif(not DICOM_ROOT.is_dir(), reason="shared DICOM test data absent")

COMPARED = (
    "Manufacturer", "ManufacturersModelName", "SoftwareVersions", "MagneticFieldStrength",
    "ReceiveCoilName", "MRAcquisitionType", "ScanningSequence", "SequenceVariant",
    "SequenceName", "PulseSequenceName", "RepetitionTime", "EchoTime", "InversionTime",
    "FlipAngle", "SliceThickness", "SpacingBetweenSlices", "AcquisitionMatrixPE",
    "ReconMatrixPE", "ImageOrientationPatientDICOM", "PercentPhaseFOV", "PercentSampling",
    "NumberOfAverages", "EchoTrainLength", "PixelBandwidth", "PhaseEncodingDirection",
    "InPlanePhaseEncodingDirectionDICOM", "ParallelReductionFactorInPlane",
    "MultibandAccelerationFactor", "ImageType",
)
# dcm2niix appends the complex component (and Philips map type) to ImageType.
IMAGE_TYPE_SUFFIXES = {"MAGNITUDE", "PHASE", "REAL", "IMAGINARY", "FIELDMAPHZ"}
# Keys excluded per vendor, each with its reason.
EXCLUDED: dict[str, set[str]] = {
    # UIH R002 stores several slices tiled in one frame (a private mosaic
    # layout, 0065 group) that we do not unpack, so Rows/Columns are the tiled size.
    "UIH": {"ReconMatrixPE"},
    # Philips enhanced: every ScanningSequence in the header says "GR"; the
    # sidecar's "RM" comes from dcm2niix's own handling of the private items.
    "Philips": {"ScanningSequence"},
}


def _series_dirs() -> list[Path]:
    """Leaf folders holding one series each (folders with files, below */In)."""
    out = []
    for in_dir in sorted(DICOM_ROOT.glob("*/In")):
        for d in sorted({f.parent for f in in_dir.rglob("*") if f.is_file() and f.suffix != ".txt"}):
            out.append(d)
    return out


def _refs_for(series) -> list[dict]:
    """Sidecars of the same set with the same SeriesNumber and SeriesDescription."""
    set_dir = next(p for p in series.files[0].parents if p.parent == DICOM_ROOT)
    import pydicom

    ds = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    refs = []
    for j in sorted((set_dir / "Ref").glob("*.json")):
        ref = json.loads(j.read_text())
        if (str(ref.get("SeriesNumber")) == str(ds.get("SeriesNumber"))
                and ref.get("SeriesDescription", "").strip() == str(ds.get("SeriesDescription", "")).strip()):
            ref["_file"] = j.name
            refs.append(ref)
    return refs


def _close(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-4)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


def _compare(ours: dict, ref: dict) -> tuple[int, list[str]]:
    n, bad = 0, []
    excluded = EXCLUDED.get(ours.get("Manufacturer", ""), set())
    for key in COMPARED:
        if key not in ref or key in excluded:
            continue
        want = ref[key]
        if key in ("SequenceName", "PulseSequenceName"):
            # dcm2niix versions and vendors file the same name under either key
            got = [ours[k] for k in ("SequenceName", "PulseSequenceName") if k in ours]
            if not got:
                continue
            n += 1
            if want not in got:
                bad.append(f"{ref['_file']}: {key} ours={got} ref={want!r}")
            continue
        if key not in ours:
            continue
        got = ours[key]
        n += 1
        if key == "EchoTime" and isinstance(got, list):
            ok = any(_close(g, want) for g in got)  # dcm2niix writes one sidecar per echo
        elif key == "ImageType":
            trimmed = list(want)
            while trimmed and trimmed[-1] in IMAGE_TYPE_SUFFIXES and trimmed != got:
                trimmed.pop()
            ok = got == trimmed
        else:
            ok = _close(got, want)
        if not ok:
            bad.append(f"{ref['_file']}: {key} ours={got!r} ref={want!r}")
    return n, bad


SERIES_DIRS = _series_dirs() if DICOM_ROOT.is_dir() else []


@pytest.mark.parametrize("series_dir", SERIES_DIRS,
                         ids=[str(d.relative_to(DICOM_ROOT)) for d in SERIES_DIRS])
def test_matches_dcm2niix_sidecars(series_dir):
    series = read_series(series_dir)
    assert len(series) == 1
    refs = _refs_for(series[0])
    if not refs:
        pytest.skip("no reference sidecar for this series")
    ours = series[0].to_dict()
    total, mismatches = 0, []
    for ref in refs:
        n, bad = _compare(ours, ref)
        total += n
        mismatches += bad
    print(f"{series_dir.relative_to(DICOM_ROOT)}: {total} comparisons against {len(refs)} sidecar(s)")
    assert total >= 10
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.parametrize("series_dir", SERIES_DIRS[::3], ids=[str(d.relative_to(DICOM_ROOT)) for d in SERIES_DIRS[::3]])
def test_intake_path_gives_the_same_parameters(series_dir):
    """Intake parses each header once on receipt; rebuilding from those summaries changes nothing."""
    from sitebench.qc.dicom_files import check_file
    from sitebench.qc.dicom_params import series_from_summaries

    from sitebench.qc.dicom_files import series_volume, volume_from_summaries

    (series,) = read_series(series_dir)
    checks = [check_file(f) for f in series.files]
    rebuilt = series_from_summaries(series.files, [c.summary for c in checks])
    assert rebuilt.parameters == series.parameters
    assert rebuilt.phi_present == series.phi_present and rebuilt.series_uid == series.series_uid
    if not any(c.problems for c in checks):  # pixels read from recorded offsets equal pydicom's decoding
        fast, fast_voxel = volume_from_summaries(series.files, rebuilt.summaries)
        slow, slow_voxel = series_volume(series.files)
        assert np.array_equal(fast, slow) and np.allclose(fast_voxel, slow_voxel)


def test_phi_reported_by_name_only(tmp_path):
    import pydicom

    src = next(f for f in sorted((DICOM_ROOT / "dcm_qa_deident" / "In").iterdir()))
    ds = pydicom.dcmread(src)
    ds.PatientName = "Doe^Jane"
    ds.save_as(tmp_path / "one.dcm")
    (tmp_path / "notes.txt").write_text("not a dicom file")
    (series,) = read_series(tmp_path)
    assert "PatientName" in series.phi_present
    assert len(series.files) == 1
    text = json.dumps(series.to_dict())
    assert "Doe" not in text and "Jane" not in text
    assert "PatientName" in text


def test_no_dicom_raises(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(SitebenchError, match=str(tmp_path)):
        read_series(tmp_path)


def test_reading_in_worker_processes_gives_the_one_process_result():
    """`read_series(workers=)` forks readers over slices of the files; every shared series (and both
    trees at once, series interleaved across slices) must come out exactly as read in one process."""
    import marshal

    from sitebench.qc.dicom_params import _FILES_PER_WORKER, file_summary, read_series
    from sitebench.qc.dicom_header import HeaderError, read_header

    data = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    trees = [data / "dicom", data / "dicom-more"]
    if not all(t.exists() for t in trees):
        pytest.skip("needs ../shared/data/dicom and dicom-more")
    files = sorted(f for t in trees for f in t.rglob("*") if f.is_file())
    assert len(files) >= 4 * _FILES_PER_WORKER
    one = read_series(files, workers=1)
    for workers in (2, 3):
        assert read_series(files, workers=workers) == one
    # the workers' summaries travel in marshal: every file's must (else a worker falls back to this process)
    dumped = 0
    for f in files[::7]:
        try:
            ds = read_header(f)
        except HeaderError:  # the trees' sidecars and notes
            continue
        marshal.dumps(file_summary(ds))
        dumped += 1
    assert dumped > 300


def test_folder_files_come_in_rglobs_order_and_number(tmp_path):
    from sitebench.qc.dicom_params import dicom_files

    for name in ("a-b/x", "a/b", "a/c/d", ".hidden", "z", "A/q", "a b/y"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    expected = sorted(f for f in tmp_path.rglob("*") if f.is_file())
    assert dicom_files(tmp_path) == expected and len(expected) == 7
    (tmp_path / "a" / "c" / "up").symlink_to(tmp_path / "a")  # a link to a folder: rglob does not descend
    (tmp_path / "a" / "link").symlink_to(tmp_path / "z")  # a link to a file: rglob lists it
    (tmp_path / "unreadable").mkdir(mode=0)
    expected = sorted(f for f in tmp_path.rglob("*") if f.is_file())
    assert dicom_files(tmp_path) == expected and tmp_path / "a" / "link" in expected
    assert dicom_files(str(tmp_path / "z")) == [tmp_path / "z"]
