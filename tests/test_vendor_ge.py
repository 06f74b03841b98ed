"""vendor_ge against dcm2niix's own sidecars and .bval/.bvec files for every GE series in the shared data
(dcm_qa_ge, dcm_qa_nih, dcm_qa_stc, dcm_qa_deident): real scanner files, no mocks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sitebench.qc import vendor_ge

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ROOTS = [DATA / "dicom-more" / "dcm_qa_ge", DATA / "dicom" / "dcm_qa_nih", DATA / "dicom" / "dcm_qa_stc",
         DATA / "dicom" / "dcm_qa_deident"]
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="shared DICOM data not present")

KEYS = ("RepetitionTime", "MultibandAccelerationFactor", "PhaseEncodingDirection", "ParallelReductionFactorInPlane")


def _ge_series() -> list[tuple[str, list[Path], list[Path]]]:
    """(label, sorted files, matching sidecars) per GE series folder; sidecars by SeriesNumber + SeriesDescription."""
    import pydicom

    out = []
    for root in ROOTS:
        if not (root / "In").is_dir():
            continue
        sidecars = []
        for js in sorted((root / "Ref").glob("*.json")):
            meta = json.loads(js.read_text())
            if meta.get("Manufacturer") == "GE":
                sidecars.append((js, meta))
        folders = sorted({f.parent for f in (root / "In").rglob("*") if f.is_file() and f.suffix != ".txt"})
        for folder in folders:
            files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix != ".txt")
            try:
                ds = pydicom.dcmread(files[0], stop_before_pixels=True,
                                     specific_tags=["Manufacturer", "SeriesNumber", "SeriesDescription"])
            except Exception:  # noqa: BLE001 - not DICOM
                continue
            if not str(ds.get("Manufacturer", "")).upper().startswith("GE"):
                continue
            refs = [js for js, meta in sidecars if meta.get("SeriesNumber") == int(ds.SeriesNumber)
                    and meta.get("SeriesDescription") == str(ds.get("SeriesDescription", ""))]
            out.append((str(folder.relative_to(DATA)), files, refs))
    return out


SERIES = _ge_series() if DATA.is_dir() else []


def _close(a, b, tol: float) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), abs_tol=tol, rel_tol=0)
    return a == b


def _compare(label: str, got: dict, ref_json: Path) -> list[str]:
    ref = json.loads(ref_json.read_text())
    bad = []
    for key in KEYS:
        if not _close(got.get(key), ref.get(key), 1e-6):
            bad.append(f"{label} vs {ref_json.name}: {key} got {got.get(key)!r} want {ref.get(key)!r}")
    st, want = got.get("SliceTiming"), ref.get("SliceTiming")
    if (st is None) != (want is None) or (st is not None and (
            len(st) != len(want) or any(abs(a - b) > 1e-3 for a, b in zip(st, want)))):
        bad.append(f"{label} vs {ref_json.name}: SliceTiming got {st} want {want}")
    bval, bvec = ref_json.with_suffix(".bval"), ref_json.with_suffix(".bvec")
    if bval.exists():
        want_b = [float(x) for x in bval.read_text().split()]
        rows = [[float(x) for x in line.split()] for line in bvec.read_text().splitlines() if line.strip()]
        want_g = [list(v) for v in zip(*rows)]
        got_b, got_g = got.get("DiffusionBValues"), got.get("DiffusionGradientDirections")
        if got_b is None or len(got_b) != len(want_b) or any(abs(a - b) > 1e-3 for a, b in zip(got_b, want_b)):
            bad.append(f"{label} vs {bval.name}: bval got {got_b} want {want_b}")
        if got_g is None or len(got_g) != len(want_g) or any(
                abs(a - b) > 1e-3 for u, v in zip(got_g, want_g) for a, b in zip(u, v)):
            bad.append(f"{label} vs {bvec.name}: bvec got {got_g} want {want_g}")
    elif got.get("DiffusionBValues") is not None:
        bad.append(f"{label}: diffusion reported but dcm2niix wrote no .bval")
    return bad


@pytest.mark.skipif(not SERIES, reason="no GE series found")
def test_every_ge_series_agrees_with_dcm2niix():
    import pydicom

    problems, compared, reported = [], 0, {}
    for label, files, refs in SERIES:
        datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        got = vendor_ge.series_fields(datasets[0], [vendor_ge.file_fields(d) for d in datasets])
        if not refs:
            problems.append(f"{label}: no dcm2niix sidecar matched")
        for ref in refs:
            compared += 1
            problems.extend(_compare(label, got, ref))
            meta = json.loads(ref.read_text())
            for key in (*KEYS, "SliceTiming"):
                reported[key] = reported.get(key, 0) + (key in meta)
            reported[".bval/.bvec"] = reported.get(".bval/.bvec", 0) + ref.with_suffix(".bval").exists()
    print(f"{compared} GE series compared with dcm2niix; sidecars reporting each key: {reported}")
    for line in problems:
        print(line)
    assert compared >= 20
    assert not problems, f"{len(problems)} disagreements with dcm2niix (printed above)"


@pytest.mark.skipif(not SERIES, reason="no GE series found")
def test_file_fields_from_a_partial_read_equal_the_full_read():
    import pydicom
    from pydicom.tag import Tag

    tags = [Tag(t) for t in vendor_ge.PER_FILE_TAGS]
    checked = 0
    for _label, files, _refs in SERIES:
        for f in (files[0], files[-1]):
            full = vendor_ge.file_fields(pydicom.dcmread(f, stop_before_pixels=True))
            part = vendor_ge.file_fields(pydicom.dcmread(f, specific_tags=tags))
            assert part == full, f
            checked += 1
    assert checked > 0


def test_odd_input_never_raises():
    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    assert vendor_ge.file_fields(None) == {}
    assert vendor_ge.series_fields(None, []) == {}
    ds = pydicom.Dataset()
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    damaged = ((0x00180080, "DS", b"oops"), (0x00181312, "CS", b"COL "), (0x00430010, "LO", b"GEMS_PARM_01"),
               (0x0043102A, "OB", b"\xff" * 1000), (0x004310B6, "LO", b"x\\y "), (0x00200032, "DS", b"1\\2"),
               (0x00430039, "IS", b"a\\b"))
    for tag, vr, value in damaged:
        ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    assert vendor_ge.series_fields(ds, [{"pos": "x"}, None, vendor_ge.file_fields(ds)]) == {}
