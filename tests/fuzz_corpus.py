"""A deterministic corpus of crafted, damaged and odd DICOM files for the upload-time QC gate.

Every file is derived from the real GE 3D T1 series (``dcm_qa_deident/In``, 196 slices of
256x256) with pydicom and raw byte surgery, driven by one seeded :class:`random.Random`, so the
same seed writes the same bytes. Derived files are *new instances*: each family gets its own
SeriesInstanceUID and every file its own SOPInstanceUID (``generate_uid`` with deterministic
``entropy_srcs``), so sending the corpus next to the real series never replaces a real instance;
the ``collide`` family is the explicit exception (it keeps a real slice's UIDs on purpose).

Most families crop the slice to its central 64x64 pixels (with ImagePositionPatient moved to
match) to keep the corpus small; ``collide`` and :func:`valid_series` keep the full slices.

``FuzzCase.expect`` is what a file-level check (``sitebench.qc.dicom_files.check_bytes``)
should conclude:

* ``usable``: a valid file that must be accepted (no problems, a summary);
* ``bad``: must be rejected with at least one problem (or has no series UID to group by);
* ``either``: damaged in a way that may still be readable; only "does not raise" is asked.

Reuse (end-to-end tests, manual runs via ``scripts/make_fuzz_corpus.py``)::

    cases = make_corpus(tmp / "fuzz", seed=12)          # stable order
    real = valid_series(tmp / "t1")                      # the real series under new UIDs
"""

from __future__ import annotations

import io
import random
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["FuzzCase", "make_corpus", "valid_series", "FAMILIES", "SOURCE", "IDENTIFYING_KEYWORDS"]

SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom" / "dcm_qa_deident" / "In"

#: family -> what it exercises (the order the cases are made in)
FAMILIES: dict[str, str] = {
    "trunc": "truncations at seeded offsets: preamble, meta header, mid-header, pixel element, mid-pixel",
    "flip": "single and multi byte flips at seeded positions (meta, header, pixel regions)",
    "value": "malformed DS/IS/UI/DA/TM values written raw",
    "vr": "wrong or invalid VRs in explicit VR little endian",
    "seq": "deep sequences (undefined and defined length) and sequences with bad delimiters",
    "length": "huge or lying element lengths",
    "geometry": "damaged image geometry (position, orientation, spacing, matrix, bits, samples)",
    "syntax": "transfer-syntax lies, broken deflate, missing or wrong file meta",
    "notdicom": "files that are not DICOM at all",
    "odd": "valid but unusual files that must be accepted",
    "collide": "explicit collisions with a real instance of the source series (same UIDs)",
}

#: attributes whose source values must never appear in a problem line
IDENTIFYING_KEYWORDS: tuple[str, ...] = ("PatientName", "PatientID", "AccessionNumber", "InstitutionName",
                                         "StationName", "DeviceSerialNumber", "OtherPatientIDs",
                                         "PatientBirthDate")

_CROP = 64
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UC", b"UR", b"UT", b"UN", b"SV", b"UV"}
_ITEM = (0xFFFE, 0xE000)
_ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
_SEQ_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
_UNDEFINED = 0xFFFFFFFF
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"
_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
_JPEG2000 = "1.2.840.10008.1.2.4.90"
_RLE = "1.2.840.10008.1.2.5"
_PRIVATE_GROUP = 0x7FD1  # odd group right before the pixel data: inserts go just in front of (7FE0,0010)
_CREATOR = b"SITEBENCH FUZZ"

# tags used by the byte surgery
T = {
    "TransferSyntaxUID": (0x0002, 0x0010), "MetaGroupLength": (0x0002, 0x0000),
    "ImplementationVersionName": (0x0002, 0x0013), "MediaStorageSOPInstanceUID": (0x0002, 0x0003),
    "SOPInstanceUID": (0x0008, 0x0018), "StudyDate": (0x0008, 0x0020), "StudyTime": (0x0008, 0x0030),
    "Modality": (0x0008, 0x0060), "StationName": (0x0008, 0x1010), "SeriesDescription": (0x0008, 0x103E),
    "SliceThickness": (0x0018, 0x0050), "RepetitionTime": (0x0018, 0x0080), "EchoTime": (0x0018, 0x0081),
    "FlipAngle": (0x0018, 0x1314), "SeriesInstanceUID": (0x0020, 0x000E), "InstanceNumber": (0x0020, 0x0013),
    "ImagePositionPatient": (0x0020, 0x0032), "ImageOrientationPatient": (0x0020, 0x0037),
    "SamplesPerPixel": (0x0028, 0x0002), "Rows": (0x0028, 0x0010), "Columns": (0x0028, 0x0011),
    "PixelSpacing": (0x0028, 0x0030), "BitsAllocated": (0x0028, 0x0100), "BitsStored": (0x0028, 0x0101),
    "HighBit": (0x0028, 0x0102), "PixelData": (0x7FE0, 0x0010),
}


@dataclass(frozen=True)
class FuzzCase:
    """One corpus file: ``kind`` is its family (a key of :data:`FAMILIES`), ``expect`` one of
    ``usable`` / ``bad`` / ``either`` (see the module docstring)."""

    name: str
    path: Path
    kind: str
    expect: str
    detail: str = ""


# --------------------------------------------------------------------------- raw element bytes
def _tag(tag: tuple[int, int]) -> bytes:
    return struct.pack("<HH", *tag)


def _element(tag: tuple[int, int], vr: bytes, value: bytes, *, length: int | None = None, pad: bool = True) -> bytes:
    """One explicit VR little-endian element; ``length`` overrides the declared length (a lie)."""
    if pad and len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB", b"UN") else b" "
    declared = len(value) if length is None else length
    if vr in _LONG_VRS:
        return _tag(tag) + vr + b"\x00\x00" + struct.pack("<I", declared) + value
    return _tag(tag) + vr + struct.pack("<H", declared & 0xFFFF) + value


def _header_len(data: bytes, offset: int) -> tuple[int, int]:
    """(header size, declared value length) of the explicit VR LE element at ``offset``."""
    if data[offset + 4:offset + 6] in _LONG_VRS:
        return 12, struct.unpack_from("<I", data, offset + 8)[0]
    return 8, struct.unpack_from("<H", data, offset + 6)[0]


@dataclass
class _Layout:
    """Where things are in one serialized explicit VR LE file."""

    meta_end: int  # first byte of the dataset
    pixel: int  # offset of the (7FE0,0010) element header
    pixel_value: int  # first pixel byte


def _layout(data: bytes) -> _Layout:
    (group_length,) = struct.unpack_from("<I", data, 132 + 8)
    meta_end = 132 + 12 + group_length
    pixel = data.rfind(_tag(T["PixelData"]) + b"OW")
    pixel = len(data) if pixel < 0 else pixel
    return _Layout(meta_end, pixel, pixel + 12)


def _find(data: bytes, tag: tuple[int, int], start: int, stop: int) -> int:
    """Offset of the one element ``tag`` (explicit VR: tag then two letters) in data[start:stop]."""
    needle = _tag(tag)
    at = data.find(needle, start, stop)
    while at >= 0 and not data[at + 4:at + 6].isalpha():
        at = data.find(needle, at + 1, stop)
    if at < 0:
        raise KeyError(f"{tag} not found")
    return at


def _span(data: bytes, tag: tuple[int, int]) -> tuple[int, int]:
    """[start, end) of a top-level element (meta or dataset, before the pixel data)."""
    lay = _layout(data)
    start, stop = (132, lay.meta_end) if tag[0] == 0x0002 else (lay.meta_end, lay.pixel)
    at = _find(data, tag, start, stop)
    head, length = _header_len(data, at)
    return at, at + head + length


def _fix_meta_length(data: bytes, delta: int) -> bytes:
    (old,) = struct.unpack_from("<I", data, 132 + 8)
    return data[:132 + 8] + struct.pack("<I", old + delta) + data[132 + 12:]


def _replace(data: bytes, tag: tuple[int, int], new: bytes) -> bytes:
    """Swap a top-level element for ``new`` (raw bytes); keeps the meta group length right."""
    start, end = _span(data, tag)
    out = data[:start] + new + data[end:]
    return _fix_meta_length(out, len(new) - (end - start)) if tag[0] == 0x0002 else out


def _set(data: bytes, tag: tuple[int, int], vr: bytes | None, value: bytes, **kw) -> bytes:
    """Rewrite a top-level element's value (and VR, if given) raw, bypassing all validation."""
    start, _ = _span(data, tag)
    return _replace(data, tag, _element(tag, vr or data[start + 4:start + 6], value, **kw))


def _remove(data: bytes, tag: tuple[int, int]) -> bytes:
    return _replace(data, tag, b"")


def _insert_before_pixels(data: bytes, raw: bytes) -> bytes:
    at = _layout(data).pixel
    return data[:at] + raw + data[at:]


def _insert_meta(data: bytes, raw: bytes) -> bytes:
    """Append ``raw`` (group 2 elements, ascending tags after the existing ones) to the file meta."""
    at = _layout(data).meta_end
    return _fix_meta_length(data[:at] + raw + data[at:], len(raw))


def _private_block(*elements: bytes) -> bytes:
    return _element((_PRIVATE_GROUP, 0x0010), b"LO", _CREATOR) + b"".join(elements)


def _us(v: int) -> bytes:
    return struct.pack("<H", v)


# --------------------------------------------------------------------------- sources
class _Source:
    """The real slices, parsed lazily; every derived file starts from one of them."""

    def __init__(self, folder: Path, seed: int):
        import pydicom

        self.folder = Path(folder)
        self.files = sorted(p for p in self.folder.iterdir() if p.is_file())
        if not self.files:
            raise FileNotFoundError(f"no DICOM files in {self.folder}")
        self.seed = seed
        self._cache: dict[int, bytes] = {}
        self._pydicom = pydicom

    def dataset(self, index: int):
        if index not in self._cache:
            self._cache[index] = self.files[index].read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self._pydicom.dcmread(io.BytesIO(self._cache[index]))

    def uid(self, *parts: object) -> str:
        from pydicom.uid import generate_uid

        return generate_uid(entropy_srcs=["sitebench-fuzz", str(self.seed), *map(str, parts)])


def _crop(ds, size: int = _CROP) -> None:
    """Keep the central ``size`` x ``size`` pixels, moving ImagePositionPatient to the new first pixel."""
    import numpy as np

    rows, cols = int(ds.Rows), int(ds.Columns)
    r0, c0 = (rows - size) // 2, (cols - size) // 2
    dtype = np.dtype("<i2" if int(ds.PixelRepresentation) else "<u2")
    pixels = np.frombuffer(ds.PixelData, dtype=dtype).reshape(rows, cols)[r0:r0 + size, c0:c0 + size]
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.Rows, ds.Columns = size, size
    row_cos = np.asarray([float(v) for v in ds.ImageOrientationPatient[:3]])
    col_cos = np.asarray([float(v) for v in ds.ImageOrientationPatient[3:]])
    row_mm, col_mm = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
    position = np.asarray([float(v) for v in ds.ImagePositionPatient])
    position = position + c0 * col_mm * row_cos + r0 * row_mm * col_cos
    ds.ImagePositionPatient = [f"{v:.4f}".rstrip("0").rstrip(".") for v in position]


def _serialize(ds, *, implicit: bool = False) -> bytes:
    import pydicom
    from pydicom.uid import ImplicitVRLittleEndian

    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


# --------------------------------------------------------------------------- the corpus
class _Builder:
    def __init__(self, out_dir: Path, source: _Source, rng: random.Random):
        self.out = out_dir
        self.src = source
        self.rng = rng
        self.cases: list[FuzzCase] = []
        self.counts: dict[str, int] = {}
        self.made: dict[str, int] = {}

    def base(self, family: str, *, crop: bool = True, implicit: bool = False, edit: Callable | None = None) -> bytes:
        """A fresh instance in ``family``'s own series: a seeded real slice, new UIDs, cropped."""
        n = self.made.get(family, 0)
        self.made[family] = n + 1
        index = self.rng.randrange(len(self.src.files))
        ds = self.src.dataset(index)
        ds.SeriesInstanceUID = self.src.uid(family, "series")
        ds.SOPInstanceUID = self.src.uid(family, n, "instance")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if crop:
            _crop(ds)
        if edit is not None:
            edit(ds)
        return _serialize(ds, implicit=implicit)

    def add(self, family: str, slug: str, data: bytes, expect: str, detail: str = "") -> None:
        assert family in FAMILIES and expect in ("usable", "bad", "either"), (family, expect)
        n = self.counts.get(family, 0)
        self.counts[family] = n + 1
        name = f"{family}-{n:03d}-{slug}.dcm"
        path = self.out / name
        path.write_bytes(data)
        self.cases.append(FuzzCase(name, path, family, expect, detail))


def make_corpus(out_dir: Path, seed: int = 12, source: Path = SOURCE) -> list[FuzzCase]:
    """Write the corpus into ``out_dir`` (created) and return its cases in a stable order.

    The same ``seed`` and ``source`` give byte-identical files: 197 files, about 3.5 MB, in 2-4 s.
    File names hold seeded offsets, so they differ between seeds.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    b = _Builder(out_dir, _Source(Path(source), seed), random.Random(seed))
    for family in FAMILIES:
        _MAKERS[family](b)
    return b.cases


def valid_series(out_dir: Path, seed: int = 12, source: Path = SOURCE) -> list[Path]:
    """The real source series copied unchanged but for new UIDs (one new SeriesInstanceUID,
    a new SOPInstanceUID per file, same study), for sending next to the corpus."""
    import pydicom

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = _Source(Path(source), seed)
    series = src.uid("valid-series", "series")
    paths = []
    for index, f in enumerate(src.files):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = src.uid("valid-series", index, "instance")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = out_dir / f.name
        path.write_bytes(_serialize(ds))
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- families
def _family_trunc(b: _Builder) -> None:
    rng = b.rng
    spots = [("preamble", 3), ("meta", 4), ("header", 6), ("pixel-element", 2), ("pixels", 4)]
    for where, count in spots:
        for _ in range(count):
            data = b.base("trunc")
            lay = _layout(data)
            lo, hi = {"preamble": (1, 128), "meta": (132, lay.meta_end), "header": (lay.meta_end + 1, lay.pixel),
                      "pixel-element": (lay.pixel + 1, lay.pixel_value),
                      "pixels": (lay.pixel_value + 1, len(data) - 2)}[where]
            cut = rng.randrange(lo, hi)
            b.add("trunc", f"{where}-at-{cut}", data[:cut], "bad", f"cut at byte {cut} of {len(data)}")
    data = b.base("trunc")
    b.add("trunc", "last-byte", data[:-1], "bad", "one pixel byte short")
    data = b.base("trunc")
    b.add("trunc", "before-pixel-element", data[:_layout(data).pixel], "bad", "header only, no pixel element")


def _family_flip(b: _Builder) -> None:
    rng = b.rng

    def flip(data: bytes, lo: int, hi: int, n: int) -> tuple[bytes, list[int]]:
        buf = bytearray(data)
        where = sorted(rng.sample(range(lo, hi), n))
        for at in where:
            buf[at] ^= rng.randrange(1, 256)
        return bytes(buf), where

    plan = [("meta", 1, 2, "either"), ("meta", 3, 2, "either"),
            ("header", 1, 8, "either"), ("header", 4, 4, "either"), ("header", 32, 4, "either"),
            ("pixels", 1, 5, "usable"), ("pixels", 64, 5, "usable")]
    for region, n, count, expect in plan:
        for _ in range(count):
            data = b.base("flip")
            lay = _layout(data)
            lo, hi = {"meta": (132, lay.meta_end), "header": (lay.meta_end, lay.pixel),
                      "pixels": (lay.pixel_value, len(data))}[region]
            out, where = flip(data, lo, hi, n)
            b.add("flip", f"{region}-{n}x-at-{where[0]}", out, expect, f"{n} byte(s) flipped at {where}")


def _family_value(b: _Builder) -> None:
    plan: list[tuple[str, bytes, bytes | None, str]] = [
        ("FlipAngle", b"abc", None, "either"), ("FlipAngle", b"nan", None, "either"),
        ("FlipAngle", b"inf", None, "either"), ("FlipAngle", b"1e999", None, "either"),
        ("FlipAngle", b"", None, "either"), ("FlipAngle", b"-inf", None, "either"),
        ("SliceThickness", b"abc", None, "either"), ("SliceThickness", b"", None, "either"),
        ("SliceThickness", b"1e999", None, "either"),
        ("EchoTime", b"inf", None, "either"), ("EchoTime", b"2,832", None, "either"),
        ("EchoTime", b"1e999", None, "either"),
        ("RepetitionTime", b"abc", None, "either"), ("RepetitionTime", b"nan", None, "either"),
        ("RepetitionTime", b"", None, "either"),
        ("PixelSpacing", b"abc\\1", None, "bad"), ("PixelSpacing", b"nan\\nan", None, "bad"),
        ("PixelSpacing", b"inf\\1e999", None, "bad"), ("PixelSpacing", b"", None, "either"),  # empty Type 1: warned
        ("InstanceNumber", b"x", None, "either"), ("InstanceNumber", b"3.5", None, "either"),
        ("InstanceNumber", b"", None, "either"), ("InstanceNumber", b"99999999999999999999", None, "either"),
        ("SOPInstanceUID", b"1.2.840.abc.7", None, "bad"), ("SOPInstanceUID", b"1." + b"2" * 63, None, "bad"),
        ("SOPInstanceUID", b"1.2.840.0113713.020.5", None, "either"), ("SOPInstanceUID", b"", None, "bad"),
        ("SeriesInstanceUID", b"1.2.840.xyz.9", None, "bad"), ("SeriesInstanceUID", b"1." + b"3" * 63, None, "bad"),
        ("SeriesInstanceUID", b"", None, "bad"),
        ("StudyDate", b"abc", None, "either"), ("StudyDate", b"20241341", None, "either"),
        ("StudyTime", b"256161", None, "either"), ("StudyTime", b"ab:cd", None, "either"),
    ]
    for keyword, raw, vr, expect in plan:
        data = _set(b.base("value"), T[keyword], vr, raw)
        slug = raw.decode("ascii").replace("\\", "_").replace(".", "p").replace(",", "c").replace(":", "")[:12] or "empty"
        b.add("value", f"{keyword}-{slug}", data, expect, f"{keyword} = {raw!r}")


def _family_vr(b: _Builder) -> None:
    def retag(keyword: str, vr: bytes, value: bytes | None = None) -> bytes:
        data = b.base("vr")
        start, end = _span(data, T[keyword])
        head, _ = _header_len(data, start)
        return _set(data, T[keyword], vr, data[start + head:end] if value is None else value, pad=False)

    plan = [
        ("Rows-as-DS-binary", lambda: retag("Rows", b"DS"), "bad"),
        ("Rows-as-DS-text", lambda: retag("Rows", b"DS", b"64"), "either"),
        ("Columns-as-SS", lambda: retag("Columns", b"SS"), "either"),
        ("PixelSpacing-as-US", lambda: retag("PixelSpacing", b"US", _us(1) + _us(1)), "either"),
        ("PixelSpacing-as-FD", lambda: retag("PixelSpacing", b"FD", struct.pack("<2d", 1.0547, 1.0547)), "either"),
        ("EchoTime-as-UN", lambda: retag("EchoTime", b"UN"), "either"),
        ("BitsAllocated-as-UN", lambda: retag("BitsAllocated", b"UN"), "either"),
        ("SeriesInstanceUID-as-UN", lambda: retag("SeriesInstanceUID", b"UN"), "either"),
        ("FlipAngle-as-ZZ", lambda: retag("FlipAngle", b"ZZ"), "either"),
        ("Rows-as-ZZ", lambda: retag("Rows", b"ZZ"), "either"),
        ("SliceThickness-as-NUL", lambda: retag("SliceThickness", b"\x00\x00"), "either"),
        ("SliceThickness-as-lowercase-ds", lambda: retag("SliceThickness", b"ds"), "either"),
        ("ImagePositionPatient-as-FL", lambda: retag("ImagePositionPatient", b"FL", struct.pack("<3f", 1, 2, 3)),
         "either"),
        ("SOPInstanceUID-as-OB", lambda: retag("SOPInstanceUID", b"OB"), "either"),
        ("StationName-as-SQ", lambda: retag("StationName", b"SQ"), "either"),
        ("Modality-as-US", lambda: retag("Modality", b"US"), "either"),
    ]
    for slug, make, expect in plan:
        b.add("vr", slug, make(), expect, slug.replace("-", " "))
    # the pixel element itself
    for vr, expect in ((b"OB", "usable"), (b"UN", "either"), (b"SQ", "bad")):
        data = b.base("vr")
        lay = _layout(data)
        out = data[:lay.pixel + 4] + vr + data[lay.pixel + 6:]
        b.add("vr", f"PixelData-as-{vr.decode()}", out, expect, f"pixel data VR {vr.decode()}")


def _nested_undefined(depth: int, *, leaf: bytes = b"") -> bytes:
    head = _tag((_PRIVATE_GROUP, 0x1001)) + b"SQ\x00\x00" + struct.pack("<I", _UNDEFINED)
    item = struct.pack("<HHI", *_ITEM, _UNDEFINED)
    return (head + item) * depth + leaf + (_ITEM_END + _SEQ_END) * depth


def _nested_defined(depth: int) -> bytes:
    parts = []
    for level in range(depth - 1, -1, -1):  # outermost first; content of level k is 20 * k bytes
        content = 20 * level
        parts.append(_tag((_PRIVATE_GROUP, 0x1001)) + b"SQ\x00\x00" + struct.pack("<I", 8 + content)
                     + struct.pack("<HHI", *_ITEM, content))
    return b"".join(parts)


def _family_seq(b: _Builder) -> None:
    leaf = _element((_PRIVATE_GROUP, 0x1002), b"LO", b"leaf")
    for depth in (50, 500, 5000):
        data = _insert_before_pixels(b.base("seq"), _private_block(_nested_undefined(depth, leaf=leaf)))
        b.add("seq", f"depth-{depth}-undefined", data, "either", f"SQ nested {depth} deep, undefined lengths")
    for depth in (500, 5000):
        data = _insert_before_pixels(b.base("seq"), _private_block(_nested_defined(depth)))
        b.add("seq", f"depth-{depth}-defined", data, "either", f"SQ nested {depth} deep, defined lengths")
    three = _nested_undefined(3, leaf=leaf)
    bad = {
        "no-sequence-delimiter": (three[:-8], "bad"),  # the outer sequence never ends: swallows the pixels
        "item-end-as-seq-end": (three.replace(_ITEM_END, _SEQ_END, 1), "either"),
        "seq-end-with-length": (three[:-8] + struct.pack("<HHI", 0xFFFE, 0xE0DD, 4) + b"JUNK", "either"),
        "element-where-item-expected": (
            _tag((_PRIVATE_GROUP, 0x1001)) + b"SQ\x00\x00" + struct.pack("<I", _UNDEFINED)
            + _element((0x0008, 0x0060), b"CS", b"MR") + _SEQ_END, "either"),
        "item-longer-than-sequence": (
            _tag((_PRIVATE_GROUP, 0x1001)) + b"SQ\x00\x00" + struct.pack("<I", 8 + 12)
            + struct.pack("<HHI", *_ITEM, 400) + leaf, "either"),
        "item-length-huge": (
            _tag((_PRIVATE_GROUP, 0x1001)) + b"SQ\x00\x00" + struct.pack("<I", _UNDEFINED)
            + struct.pack("<HHI", *_ITEM, 0xFFFFFFF0) + leaf + _ITEM_END + _SEQ_END, "either"),
    }
    for slug, (raw, expect) in bad.items():
        data = _insert_before_pixels(b.base("seq"), _private_block(raw))
        b.add("seq", slug, data, expect, slug.replace("-", " "))


def _family_length(b: _Builder) -> None:
    def pixel_length(data: bytes, declared: int) -> bytes:
        at = _layout(data).pixel
        return data[:at + 8] + struct.pack("<I", declared) + data[at + 12:]

    data = b.base("length")
    b.add("length", "UT-0xFFFFFFF0", _insert_before_pixels(
        data, _private_block(_element((_PRIVATE_GROUP, 0x1003), b"UT", b"text", length=0xFFFFFFF0))), "bad",
        "private UT element declares 0xFFFFFFF0 bytes")
    data = b.base("length")
    start, _ = _span(data, T["SeriesDescription"])
    b.add("length", "LO-0xFFFF", data[:start + 6] + b"\xff\xff" + data[start + 8:], "bad",
          "SeriesDescription declares 65535 bytes, swallowing the rest of the header")
    data = b.base("length")
    lay = _layout(data)
    b.add("length", "pixels-2-longer", pixel_length(data, len(data) - lay.pixel_value + 2), "bad",
          "pixel data declares 2 bytes more than the file holds")
    data = b.base("length")
    b.add("length", "pixels-0xFFFFFFF0", pixel_length(data, 0xFFFFFFF0), "bad", "pixel data declares 0xFFFFFFF0")
    data = b.base("length")
    half = (len(data) - _layout(data).pixel_value) // 2
    b.add("length", "pixels-half-of-geometry", pixel_length(data[:-half], half), "bad",
          "pixel data consistent with the file but half what Rows x Columns need")
    data = b.base("length")
    b.add("length", "pixels-undefined-native", pixel_length(data, _UNDEFINED), "bad",
          "native pixel data with undefined length")
    data = b.base("length")
    samples = data[slice(*_span(data, T["SamplesPerPixel"]))]
    group_length = _element((0x0028, 0x0000), b"UL", struct.pack("<I", 0xFFFFFFFF))
    b.add("length", "group-length-lies", _replace(data, T["SamplesPerPixel"], group_length + samples), "either",
          "a (0028,0000) group length of 0xFFFFFFFF")
    data = b.base("length")
    b.add("length", "UT-undefined", _insert_before_pixels(
        data, _private_block(_element((_PRIVATE_GROUP, 0x1003), b"UT", b"text", length=_UNDEFINED))), "bad",
        "non-SQ UT element with undefined length and no delimiter")
    data = b.base("length")
    b.add("length", "OB-undefined", _insert_before_pixels(
        data, _private_block(_element((_PRIVATE_GROUP, 0x1004), b"OB", b"\x01\x02", length=_UNDEFINED)
                             + _SEQ_END)), "either",
        "non-SQ OB element with undefined length ended by a sequence delimiter")
    data = b.base("length")
    start, _ = _span(data, T["ImplementationVersionName"])
    b.add("length", "meta-element-0xFFFF", data[:start + 6] + b"\xff\xff" + data[start + 8:], "bad",
          "a file meta element declares 65535 bytes")
    data = b.base("length")
    b.add("length", "SQ-0xFFFFFFF0", _insert_before_pixels(
        data, _private_block(_tag((_PRIVATE_GROUP, 0x1001)) + b"SQ\x00\x00" + struct.pack("<I", 0xFFFFFFF0))),
        "bad", "defined-length sequence declaring 0xFFFFFFF0 bytes")


def _family_geometry(b: _Builder) -> None:
    plan = [
        ("ImagePositionPatient", b"121.4\\-134.6", "bad"), ("ImagePositionPatient", b"nan\\inf\\1", "bad"),
        ("ImagePositionPatient", b"", "either"),  # empty Type 1: a warning (real derived MR lacks it)
        ("ImagePositionPatient", b"abc\\0\\0", "bad"),
        ("ImagePositionPatient", b"1e999\\0\\0", "bad"),
        ("ImageOrientationPatient", b"0\\1\\0\\0\\1\\0", "bad"),  # row == column
        ("ImageOrientationPatient", b"0\\0\\0\\0\\0\\0", "bad"),
        ("ImageOrientationPatient", b"0\\1\\0\\0\\0", "bad"),
        ("ImageOrientationPatient", b"nan\\1\\0\\0\\0\\-1", "bad"),
        ("ImageOrientationPatient", b"0\\2\\0\\0\\0\\-2", "either"),  # not unit length
        ("ImageOrientationPatient", b"0\\1\\0.001\\0\\0\\-1", "either"),  # nearly orthogonal
        ("PixelSpacing", b"0\\0", "bad"), ("PixelSpacing", b"-1.0547\\-1.0547", "bad"),
        ("PixelSpacing", b"1.0547", "bad"), ("PixelSpacing", b"0\\1.0547", "bad"),
    ]
    for keyword, raw, expect in plan:
        data = _set(b.base("geometry"), T[keyword], None, raw)
        slug = raw.decode().replace("\\", "_").replace(".", "p")[:16] or "empty"
        b.add("geometry", f"{keyword}-{slug}", data, expect, f"{keyword} = {raw!r}")
    for keyword, value, expect in (("Rows", 0, "bad"), ("Columns", 0, "bad"), ("Rows", 65535, "bad"),
                                   ("BitsAllocated", 7, "bad"), ("BitsAllocated", 0, "bad"),
                                   ("SamplesPerPixel", 0, "bad"), ("SamplesPerPixel", 3, "bad"),
                                   ("BitsStored", 17, "bad"), ("HighBit", 20, "either")):
        data = _set(b.base("geometry"), T[keyword], None, _us(value))
        b.add("geometry", f"{keyword}-{value}", data, expect, f"{keyword} = {value}")
    data = _remove(b.base("geometry"), T["ImagePositionPatient"])
    b.add("geometry", "no-ImagePositionPatient", data, "either",
          "ImagePositionPatient removed: a warning, as real derived MR (UIH diffusion VFRAME) has none")


def _family_syntax(b: _Builder) -> None:
    def with_ts(data: bytes, uid: str) -> bytes:
        return _set(data, T["TransferSyntaxUID"], b"UI", uid.encode())

    def deflated(data: bytes) -> bytes:
        meta_end = _layout(data).meta_end
        squeeze = zlib.compressobj(6, zlib.DEFLATED, -15)
        body = squeeze.compress(data[meta_end:]) + squeeze.flush()
        return with_ts(data[:meta_end], _DEFLATED) + body

    def encapsulated(data: bytes, fragment: bytes, *, end: bool = True) -> bytes:
        at = _layout(data).pixel
        frag = fragment + b"\x00" * (len(fragment) % 2)
        pixels = (_tag(T["PixelData"]) + b"OB\x00\x00" + struct.pack("<I", _UNDEFINED)
                  + struct.pack("<HHI", *_ITEM, 0) + struct.pack("<HHI", *_ITEM, len(frag)) + frag
                  + (_SEQ_END if end else b""))
        return data[:at] + pixels

    data = b.base("syntax")
    b.add("syntax", "deflate-ts-plain-body", with_ts(data, _DEFLATED), "bad", "deflated TS, body not deflated")
    data = deflated(b.base("syntax"))
    meta_end = 132 + 12 + struct.unpack_from("<I", data, 140)[0]
    b.add("syntax", "deflate-corrupt", data[:meta_end] + b"\xff\xff\xff\xff" + data[meta_end + 4:], "bad",
          "deflated TS, stream starts with an invalid block")
    data = deflated(b.base("syntax"))
    b.add("syntax", "deflate-truncated", data[:len(data) * 2 // 3], "bad", "deflated stream cut at two thirds")
    b.add("syntax", "deflate-valid", deflated(b.base("syntax")), "usable", "a correctly deflated file")
    b.add("syntax", "big-endian-ts-le-body", with_ts(b.base("syntax"), _BIG_ENDIAN), "bad",
          "big-endian TS over a little-endian body")
    b.add("syntax", "implicit-ts-explicit-body", with_ts(b.base("syntax"), _IMPLICIT_LE), "either",
          "implicit VR TS over an explicit VR body")
    b.add("syntax", "explicit-ts-implicit-body", with_ts(b.base("syntax", implicit=True), _EXPLICIT_LE), "either",
          "explicit VR TS over an implicit VR body")
    b.add("syntax", "jpeg-ts-native-pixels", with_ts(b.base("syntax"), _JPEG_BASELINE), "bad",
          "JPEG baseline TS, native (unencapsulated) pixel data")
    b.add("syntax", "rle-ts-native-pixels", with_ts(b.base("syntax"), _RLE), "bad", "RLE TS, native pixel data")
    data = with_ts(b.base("syntax"), _JPEG2000)
    b.add("syntax", "j2k-garbage-fragment", encapsulated(data, b.rng.randbytes(1000)), "either",
          "JPEG 2000 TS, one encapsulated fragment of random bytes")
    data = with_ts(b.base("syntax"), _JPEG2000)
    b.add("syntax", "j2k-no-sequence-end", encapsulated(data, b.rng.randbytes(1000), end=False), "bad",
          "JPEG 2000 TS, encapsulated pixel data without its sequence delimiter")
    b.add("syntax", "native-ts-encapsulated", encapsulated(b.base("syntax"), b.rng.randbytes(1000)), "bad",
          "explicit VR LE TS, pixel data encapsulated")
    data = b.base("syntax")
    b.add("syntax", "no-meta", data[:132] + data[_layout(data).meta_end:], "either",
          "preamble and DICM, then the dataset without a file meta group")
    data = b.base("syntax")
    b.add("syntax", "meta-length-too-big", data[:140] + struct.pack("<I", 0xFFFF) + data[144:], "either",
          "file meta group length 65535")
    data = b.base("syntax")
    b.add("syntax", "meta-length-too-small", data[:140] + struct.pack("<I", 10) + data[144:], "either",
          "file meta group length 10")
    b.add("syntax", "unknown-ts", with_ts(b.base("syntax"), "1.2.3.4.5.6"), "either", "unknown transfer syntax UID")
    b.add("syntax", "no-ts", _remove(b.base("syntax"), T["TransferSyntaxUID"]), "either",
          "file meta without a transfer syntax")


def _family_notdicom(b: _Builder) -> None:
    rng = b.rng
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as z:
        info = zipfile.ZipInfo("00001.dcm", date_time=(2024, 4, 25, 11, 30, 44))
        z.writestr(info, b.base("notdicom"))
    png = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 64, 64, 8, 0, 0, 0, 0))
    png += struct.pack(">I", zlib.crc32(png[12:]))
    html = b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>\n"
    nifti = struct.pack("<i", 348) + bytes(340) + b"n+1\x00"
    import gzip

    gz = gzip.compress(b.base("notdicom"), mtime=0)
    for slug, data in (("empty", b""), ("one-byte", b"\x00"), ("preamble-only", bytes(128)),
                       ("preamble-dicm-only", bytes(128) + b"DICM"), ("dicm-only", b"DICM"),
                       ("png-header", png), ("random-4k", rng.randbytes(4096)),
                       ("text", b"patient list\nthis is not an image\n"), ("zip-of-dicom", zipped.getvalue()),
                       ("dicm-then-random", bytes(128) + b"DICM" + rng.randbytes(2048)),
                       ("gzip-of-dicom", gz), ("html-error-page", html), ("nifti-header", nifti)):
        b.add("notdicom", slug, data, "bad", slug.replace("-", " "))


def _family_odd(b: _Builder) -> None:
    data = b.base("odd")
    b.add("odd", "control-cropped", data, "usable", "the derived slice, unchanged (control)")
    data = b.base("odd", crop=False)
    b.add("odd", "control-full", data, "usable", "a full-size slice under new UIDs (control)")
    data = b.base("odd")
    b.add("odd", "extra-private-tags", _insert_before_pixels(data, _private_block(
        _element((_PRIVATE_GROUP, 0x1010), b"LO", b"harmless"), _element((_PRIVATE_GROUP, 0x1011), b"US", _us(7)),
        _element((_PRIVATE_GROUP, 0x1012), b"OB", bytes(range(16))),
        _tag((_PRIVATE_GROUP, 0x1013)) + b"SQ\x00\x00" + struct.pack("<I", _UNDEFINED)
        + struct.pack("<HHI", *_ITEM, _UNDEFINED) + _element((_PRIVATE_GROUP, 0x1014), b"LO", b"x")
        + _ITEM_END + _SEQ_END)), "usable", "a private block with LO, US, OB and a sequence")
    data = b.base("odd")
    b.add("odd", "odd-length-string", _set(data, T["SeriesDescription"], b"LO", b"Accelerated SAG IR-SPGR", pad=False),
          "usable", "SeriesDescription of odd length, unpadded")
    data = b.base("odd")
    b.add("odd", "padded-strings", _set(_set(data, T["SeriesDescription"], b"LO", b"Accelerated SAG IR-SPGR      "),
                                        T["SOPInstanceUID"], b"UI",
                                        b.src.uid("odd", "padded", "instance").encode() + b"\x00\x00"), "usable",
          "strings padded with spaces, a UID padded with NULs")
    data = b.base("odd")
    b.add("odd", "extra-meta-element", _insert_meta(data, _element((0x0002, 0x0016), b"AE", b"FUZZ_SCU")),
          "usable", "file meta with SourceApplicationEntityTitle")
    data = b.base("odd")
    b.add("odd", "private-meta-elements", _insert_meta(
        data, _element((0x0002, 0x0100), b"UI", b"1.2.826.0.1.3680043.8.498.1")
        + _element((0x0002, 0x0102), b"OB", b"private meta")), "usable", "file meta with private information")
    data = b.base("odd", implicit=True)
    b.add("odd", "implicit-vr", data, "usable", "implicit VR little endian with file meta")
    data = b.base("odd", implicit=True)
    meta_end = 132 + 12 + struct.unpack_from("<I", data, 140)[0]
    b.add("odd", "raw-dataset-implicit", data[meta_end:], "usable", "no preamble, no meta: a bare implicit VR dataset")
    data = b.base("odd")
    b.add("odd", "tiff-preamble", b"II*\x00" + b.rng.randbytes(124) + data[128:], "usable",
          "non-zero preamble (a dual-personality TIFF header)")
    data = b.base("odd")
    b.add("odd", "trailing-padding", data + _element((0xFFFC, 0xFFFC), b"OB", bytes(64)), "usable",
          "DataSetTrailingPadding after the pixel data")
    data = b.base("odd")
    b.add("odd", "unknown-public-tag", _insert_before_pixels(data, _element((0x7FD0, 0x0002), b"UN", b"unknown!")),
          "usable", "an unknown (even group) tag as UN")
    data = b.base("odd")
    b.add("odd", "pixels-as-OB", data[:_layout(data).pixel + 4] + b"OB" + data[_layout(data).pixel + 6:],
          "usable", "native 16-bit pixel data with VR OB")


def _family_collide(b: _Builder) -> None:
    """Same UIDs as real slice 00001 of the source: a resend, a conflicting copy, a broken copy."""
    real = b.src.files[0].read_bytes()
    b.add("collide", "resend-identical", real, "usable", "byte-identical copy of the first real slice")
    ds = b.src.dataset(0)
    ds.EchoTime = "3.5"
    changed = _serialize(ds)
    b.add("collide", "same-uids-other-content", changed, "usable",
          "the first real slice's UIDs with a different EchoTime")
    b.add("collide", "same-uids-truncated", real[:len(real) // 2], "bad", "the first real slice cut in half")


#: each family's maker, called in :data:`FAMILIES` order
_MAKERS: dict[str, Callable[[_Builder], None]] = {
    "trunc": _family_trunc, "flip": _family_flip, "value": _family_value, "vr": _family_vr, "seq": _family_seq,
    "length": _family_length, "geometry": _family_geometry, "syntax": _family_syntax,
    "notdicom": _family_notdicom, "odd": _family_odd, "collide": _family_collide,
}
assert list(_MAKERS) == list(FAMILIES)
