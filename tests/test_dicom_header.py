"""sitebench.qc.dicom_header against pydicom on the shared real series, the fuzz corpus and import cost."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from sitebench.qc.dicom_header import HeaderError, read_header

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not (DATA / "dicom").exists(), reason="needs ../shared/data/dicom")


def _series_sample() -> list[Path]:
    """Every series (folder) of both trees: its first, middle and last file, to stay well under 60 s."""
    out: list[Path] = []
    for tree in ("dicom", "dicom-more"):
        if not (DATA / tree).exists():
            continue
        folders: dict[Path, list[Path]] = {}
        for f in sorted((DATA / tree).rglob("*")):
            if f.is_file():
                folders.setdefault(f.parent, []).append(f)
        for files in folders.values():
            out += list(dict.fromkeys([files[0], files[len(files) // 2], files[-1]]))
    return out


def _norm(v):
    import pydicom

    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return [_norm(x) for x in v]
    if isinstance(v, pydicom.Dataset):
        return v
    if isinstance(v, str) or type(v).__name__ == "PersonName":
        return str(v)
    if isinstance(v, float):
        return float(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return int(v)
    return v


def _equal(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-9 * max(1.0, abs(a))
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return type(a) is type(b) and a == b


def _compare(p, h, where: str, problems: list[str]) -> None:
    ptags, htags = set(p.keys()), {int(t) for t in h.keys()}
    if ptags != htags:
        problems.append(f"{where}: tags differ {sorted(map(hex, ptags ^ htags))[:6]}")
        return
    for tag in sorted(ptags):
        try:
            pe = p[tag]
            pv = pe.value
        except Exception:  # noqa: BLE001 - pydicom refuses this value: so must we
            with pytest.raises(HeaderError):
                h[tag].value
            continue
        he = h[tag]
        if pe.VR != he.VR or pe.keyword != he.keyword:
            problems.append(f"{where} {tag:08X}: {pe.VR}/{pe.keyword} vs {he.VR}/{he.keyword}")
        elif pe.VR == "SQ":
            if len(pv) != len(he.value):
                problems.append(f"{where} {tag:08X}: {len(pv)} vs {len(he.value)} items")
            for i, (a, b) in enumerate(zip(pv, he.value)):
                _compare(a, b, f"{where}/{tag:08X}[{i}]", problems)
        elif not _equal(_norm(pv), he.value):
            problems.append(f"{where} {tag:08X} {pe.VR}: {_norm(pv)!r:.60} vs {he.value!r:.60}")


@pytest.mark.parametrize("path", _series_sample(), ids=lambda p: str(p.relative_to(DATA)))
def test_same_header_as_pydicom(path: Path) -> None:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            expected = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - pydicom rejects it: so must we
            with pytest.raises(HeaderError):
                read_header(path)
            return
        got = read_header(path)
        assert got.file_meta is not None and got.file_meta.get("TransferSyntaxUID") == expected.file_meta.get(
            "TransferSyntaxUID")
        assert (got.is_little_endian, got.is_implicit_VR) == (expected.is_little_endian, expected.is_implicit_VR)
        problems: list[str] = []
        _compare(expected, got, "", problems)
    assert not problems, problems[:10]


def test_covers_classic_and_enhanced() -> None:
    enhanced = [p for p in _series_sample() if "enh" in str(p) or "enhanced" in str(p)]
    assert enhanced and any("Philips" in str(p) for p in _series_sample())


SPECIFIC = ["SOPInstanceUID", "SeriesInstanceUID", "EchoTime", "ImagePositionPatient", "PatientName",
            "RepetitionTime", "PerFrameFunctionalGroupsSequence", (0x0019, 0x109C), (0x0043, 0x1083),
            0x2001100B, 0x00291010]


@pytest.mark.parametrize("path", [p for p in _series_sample() if p.suffix.lower() in (".dcm", "") or True][::9])
def test_specific_tags_give_the_full_values_and_their_creators(path: Path) -> None:
    try:
        full = read_header(path)
    except HeaderError:
        return
    part = read_header(path, specific_tags=SPECIFIC)
    for key in SPECIFIC:
        tag = key if isinstance(key, int) else (key[0] << 16 | key[1]) if isinstance(key, tuple) else None
        element = full.get_item(tag if tag is not None else key)
        got = part.get_item(tag if tag is not None else key)
        assert (element is None) == (got is None), key
        if element is not None:
            assert got.VR == element.VR
            assert repr(got.value) == repr(element.value) if got.VR != "SQ" else len(got.value) == len(element.value)
            if element.tag.is_private:
                creator = element.tag & 0xFFFF0000 | (element.tag & 0xFFFF) >> 8
                assert creator in part and part[creator].value == full[creator].value
    assert set(int(t) for t in part.keys()) <= set(int(t) for t in full.keys())


def test_fuzz_corpus_only_header_error(tmp_path: Path) -> None:
    from fuzz_corpus import SOURCE, make_corpus

    if not SOURCE.exists():
        pytest.skip("needs the GE T1 series")
    cases = make_corpus(tmp_path / "fuzz")
    assert len(cases) > 100
    for case in cases:
        try:
            ds = read_header(case.path)
        except HeaderError as exc:
            assert "\n" not in str(exc)
            continue
        for element in ds:  # every value converts or raises HeaderError
            try:
                value = element.value
                if element.VR == "SQ":
                    for item in value:
                        list(item)
            except HeaderError:
                pass


def test_no_pydicom_or_numpy_on_import() -> None:
    code = ("import sys, sitebench.qc.dicom_header as h; h.tag_for_keyword('PatientName'); h.keyword_for_tag(0x7FE00010); "
            "print('pydicom' in sys.modules or 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_not_dicom_and_missing(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"\0" * 200)
    for bad in (tmp_path / "x", tmp_path / "missing"):
        with pytest.raises(HeaderError):
            read_header(bad)


# --------------------------------------------------------------------------- the compiled walk
def _layout(ds) -> list:
    """Every element of a data set as the reader holds it (tag, VR, byte range, undefined length,
    implicit VR), sequence items followed down: two walks that agree here read the same values
    (a value is converted from exactly these)."""
    out = []
    for element in ds:
        row = [int(element.tag), element.VR, element._start, element._end, element.is_undefined_length,
               element._implicit]
        if element.VR == "SQ":
            try:
                row.append([_layout(item) for item in element.value])
            except HeaderError as exc:
                row.append(f"HeaderError: {exc}")
        out.append(row)
    return out


def _read_both(path: Path, tags) -> tuple:
    import sitebench.qc.dicom_header as header

    compiled = header._scan
    results = []
    try:
        for walk in (compiled, None):
            header._scan = walk
            try:
                ds = read_header(path, specific_tags=tags)
                results.append((ds.is_little_endian, ds.is_implicit_VR, _layout(ds.file_meta), _layout(ds)))
            except HeaderError as exc:
                results.append(f"HeaderError: {exc}")
    finally:
        header._scan = compiled
    return tuple(results)


def _compiled_walk():
    import sitebench.qc.dicom_header as header

    if header._scan is None:
        pytest.skip("the compiled walk is not built here (no C compiler at install)")
    return header


def test_compiled_walk_reads_every_shared_file_as_the_python_walk() -> None:
    """Every file of both trees (3,687 of seven vendors) with the tags `qc inspect` reads of every
    file, and the first, middle and last file of every series whole (as the first file of a series is)."""
    from sitebench.qc.dicom_params import PER_FILE_TAGS, _tag, vendor_per_file_tags

    _compiled_walk()
    per_file = sorted({_tag(k) for k in PER_FILE_TAGS + vendor_per_file_tags()})
    files = [f for tree in ("dicom", "dicom-more") for f in sorted((DATA / tree).rglob("*")) if f.is_file()]
    assert len(files) > 1000
    reads = [(f, per_file) for f in files] + [(f, None) for f in _series_sample()]
    differ = [f"{f.relative_to(DATA)} ({'whole' if tags is None else 'inspect tags'})"
              for f, tags in reads if len(set(map(repr, _read_both(f, tags)))) != 1]
    assert not differ, differ[:10]


def test_compiled_walk_reads_the_fuzz_corpus_as_the_python_walk(tmp_path: Path) -> None:
    """Damage included: where the Python walk raises, the compiled one hands back to it, so the same
    HeaderError (same line) comes out; where it reads past damage, the same elements come out."""
    from fuzz_corpus import SOURCE, make_corpus

    _compiled_walk()
    if not SOURCE.exists():
        pytest.skip("needs the GE T1 series")
    cases = make_corpus(tmp_path / "fuzz")
    errors = 0
    for case in cases:
        for tags in (None, SPECIFIC):
            compiled, python = _read_both(case.path, tags)
            assert repr(compiled) == repr(python), (case.family, case.path.name)
            errors += isinstance(python, str)
    assert errors > 20  # the corpus does reach the damaged paths


def test_compiled_walk_is_built_where_a_compiler_is() -> None:
    """`./run setup` (pip install -e .) compiles it where a C compiler and Python's headers are: a
    build that silently fell back would leave `qc inspect` at the Python walk's speed."""
    import shutil
    import sysconfig

    import sitebench.qc.dicom_header as header

    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not (shutil.which(sysconfig.get_config_var("CC").split()[0] if sysconfig.get_config_var("CC") else "cc")
            and headers.exists()):
        pytest.skip("no C compiler or Python headers here: the Python walk is the one installed")
    assert header._scan is not None, "setup.py's extension did not build: run `pip install -e .` to see why"


def test_dictionary_lookups_match_pydicoms_dictionary() -> None:
    """The standard dictionary is searched per tag and keyword (not parsed whole): every entry of
    pydicom's (the source it was generated from), repeating groups and a private tag, both ways."""
    import pydicom
    from pydicom.datadict import DicomDictionary, dictionary_keyword, dictionary_VR

    import sitebench.qc._dicom_dictionary as generated
    from sitebench.qc.dicom_header import _dictionary_entry, keyword_for_tag, tag_for_keyword

    if pydicom.__version__ != generated.PYDICOM_VERSION:
        pytest.skip(f"generated from pydicom {generated.PYDICOM_VERSION}, {pydicom.__version__} installed")
    for tag, entry in DicomDictionary.items():
        vr, keyword = entry[0], entry[4]
        assert keyword_for_tag(tag) == keyword, hex(tag)
        if keyword:
            assert tag_for_keyword(keyword) == tag, keyword
        if vr != "NONE":
            assert _dictionary_entry(tag)[0] == vr, hex(tag)
    for tag in (0x60020010, 0x50040005, 0x7F020010):  # overlays, curves, variable pixel data (repeaters)
        assert keyword_for_tag(tag) == dictionary_keyword(tag)
        assert _dictionary_entry(tag)[0] == dictionary_VR(tag)
    assert keyword_for_tag(0x00291010) == "" and tag_for_keyword("NoSuchKeyword") is None
    assert tag_for_keyword("00100010") is None  # a hex string is not a keyword (_to_tag reads it as a tag)
