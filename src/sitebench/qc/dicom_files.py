"""File-level integrity of received DICOM, and a series' pixels as one 3-D volume.

The gate must say *why* a file cannot be used (not DICOM, truncated, no pixels,
tags missing, an enhanced file without its functional groups) rather than drop
it: a dropped file is a lost file. :func:`check_file` and :func:`check_bytes` never raise,
whatever the input; they return the problems, one short line each, never a tag value.
Damaged geometry (PS3.3 C.7.6.2 Image Plane: ImagePositionPatient needs 3 finite numbers,
ImageOrientationPatient 6 forming two orthogonal unit vectors, PixelSpacing 2 positive
ones, SliceThickness one) is a problem: such a file cannot be placed in a volume. A
malformed number elsewhere (FlipAngle 'abc') is a warning: the parameter counts as missing,
so its protocol check is undetermined, and the file stays usable.
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sitebench.errors import SitebenchError

__all__ = ["FileCheck", "check_file", "check_bytes", "series_volume", "series_nifti", "REQUIRED_TAGS", "VOLUME_TAGS",
           "ENHANCED_MR_SOP_CLASSES"]

#: Tags without which a file cannot be placed in a series or turned into an image.
REQUIRED_TAGS: tuple[str, ...] = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                  "SeriesInstanceUID", "Modality", "Rows", "Columns", "BitsAllocated")

#: Enhanced MR Image, Enhanced MR Color Image, Legacy Converted Enhanced MR Image.
ENHANCED_MR_SOP_CLASSES: frozenset[str] = frozenset({
    "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.3", "1.2.840.10008.5.1.4.1.1.4.4"})

_UNCOMPRESSED = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})


@dataclass
class FileCheck:
    """What one received file is, and what is wrong with it (empty ``problems`` = usable)."""

    series_uid: str | None = None
    study_uid: str | None = None
    sop_uid: str | None = None
    problems: list[str] = field(default_factory=list)
    #: :func:`sitebench.qc.dicom_params.file_summary` of the header (None when unreadable)
    summary: dict | None = None
    #: value-level findings that leave the file usable (a malformed DS/IS value, named, never quoted)
    warnings: list[str] = field(default_factory=list)

    @property
    def groupable(self) -> bool:
        """Whether the file can join a series at all (it has a SeriesInstanceUID)."""
        return bool(self.series_uid)


def check_bytes(data: bytes) -> FileCheck:
    """Integrity of one file's bytes (see :func:`check_file`); never raises, whatever the bytes.

    The header is parsed up to the pixel data; the pixel data element is then checked
    from its own header (declared length against the bytes present and against the
    image geometry) without decoding it, which keeps intake cheap. Any error in parsing or
    summarising (pydicom raises many kinds on malformed input: RecursionError on deep
    sequences, zlib.error on a corrupt deflated stream, MemoryError on a huge declared
    length, ValueError on a malformed value) becomes one problem line naming the exception
    type, never its message (pydicom's messages can quote values).
    """
    check = FileCheck()
    try:
        _check_bytes(data, check)
    except RecursionError:
        check.summary = None
        check.problems.append("unreadable header: RecursionError: sequences nested too deeply")
    except MemoryError:
        check.summary = None
        check.problems.append("unreadable header: MemoryError: a declared length is too large")
    except Exception as exc:  # noqa: BLE001 - any input must give a verdict, not an exception
        check.summary = None
        check.problems.append(f"unreadable header: {_type_name(exc)}: {_reason(exc)}")
    return check


def _type_name(exc: BaseException) -> str:
    """``ValueError``, ``zlib.error``: builtins bare, others with their module (zlib's is just "error")."""
    kind = type(exc)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def _reason(exc: BaseException) -> str:
    """A short, value-free reason for a parse error (never ``str(exc)``: it can quote tag values)."""
    import zlib

    if isinstance(exc, zlib.error):
        return "corrupt deflated data"
    if isinstance(exc, (EOFError, struct.error, IndexError)):
        return "truncated or corrupt"
    if isinstance(exc, (ValueError, TypeError, KeyError, AttributeError)):
        return "malformed element"
    if isinstance(exc, NotImplementedError):
        return "unsupported encoding"
    return "truncated or corrupt"


def _check_bytes(data: bytes, check: FileCheck) -> None:
    """:func:`check_bytes`' work, filling ``check`` as it goes (so what was learnt before an error stays)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    buffer = io.BytesIO(data)
    try:
        ds = pydicom.dcmread(buffer, force=False, stop_before_pixels=True)
    except InvalidDicomError:
        check.problems.append("not a DICOM file (no DICM preamble or file meta)")
        return
    check.series_uid = _uid(ds, "SeriesInstanceUID")
    check.study_uid = _uid(ds, "StudyInstanceUID")
    check.sop_uid = _uid(ds, "SOPInstanceUID")
    missing = [kw for kw in REQUIRED_TAGS if not _has_value(ds, kw)]
    if missing:
        check.problems.append(f"required tags missing: {', '.join(missing)}")
    from sitebench.qc.dicom_params import file_summary, tag_label

    summary = file_summary(ds)
    check.problems += [f"damaged geometry: {line}" for line in summary["geometry"]]
    check.warnings += [f"{tag_label(kw)} is not a number: treated as missing" for kw in summary["invalid"]]
    check.summary = summary
    pixel_problem, pixel_offset = _pixel_element(ds, data, buffer.tell())
    if pixel_problem:
        check.problems.append(pixel_problem)
    elif pixel_offset is not None and not summary["geometry"]:
        try:
            layout = _native_layout(ds, pixel_offset)
        except Exception:  # noqa: BLE001 - e.g. a malformed RescaleSlope: no fast path, pydicom decodes later
            layout = None
        if layout is not None:
            summary["pixels"] = layout
    if str(ds.get("SOPClassUID", "")) in ENHANCED_MR_SOP_CLASSES:
        for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            if not ds.get(group):
                check.problems.append(f"enhanced MR image without {group}")
        frames = _int(ds.get("NumberOfFrames")) or 1
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame and len(per_frame) != frames:
            check.problems.append(f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items "
                                  f"for {frames} frames")


def _uid(ds, keyword: str) -> str | None:
    try:
        return str(ds.get(keyword) or "").strip() or None
    except Exception:  # noqa: BLE001 - a malformed UID is as good as none
        return None


def _has_value(ds, keyword: str) -> bool:
    try:
        return keyword in ds and ds[keyword].value not in (None, "")
    except Exception:  # noqa: BLE001 - present but unreadable counts as missing
        return False


def check_file(path: str | Path) -> FileCheck:
    """Integrity of one file on disk; unreadable files are a problem, not an exception."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return FileCheck(problems=[f"cannot be read: {exc.strerror or type(exc).__name__}"])
    except Exception as exc:  # noqa: BLE001 - e.g. MemoryError on a huge file, ValueError on a bad path
        return FileCheck(problems=[f"cannot be read: {type(exc).__name__}"])
    return check_bytes(data)


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UC", b"UR"}
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def _pixel_element(ds, data: bytes, offset: int) -> tuple[str | None, int | None]:
    """(problem, where the pixel bytes start), from the pixel element's header at ``offset``
    (where the header parse stopped)."""
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    big = syntax == "1.2.840.10008.1.2.2"
    endian = ">" if big else "<"
    if len(data) - offset < 8:
        return "no pixel data", None
    group, element = struct.unpack(endian + "HH", data[offset:offset + 4])
    if (group, element) not in _PIXEL_TAGS:
        return "no pixel data", None
    if syntax == "1.2.840.10008.1.2":  # implicit VR: tag, 4-byte length
        (declared,), start = struct.unpack("<I", data[offset + 4:offset + 8]), offset + 8
    elif data[offset + 4:offset + 6] in _LONG_VRS:  # explicit VR: tag, VR, 2 reserved, 4-byte length
        (declared,), start = struct.unpack(endian + "I", data[offset + 8:offset + 12]), offset + 12
    else:
        (declared,), start = struct.unpack(endian + "H", data[offset + 6:offset + 8]), offset + 8
    have = len(data) - start
    if declared == 0xFFFFFFFF:  # encapsulated (compressed) frames end with a sequence delimiter
        ended = data.rstrip(b"\x00")[-4:] == _SEQUENCE_END[:4] or data.endswith(_SEQUENCE_END)
        return (None if ended else "pixel data truncated: encapsulated frames without their end delimiter"), None
    if have < declared:
        return f"pixel data truncated: {have} of {declared} bytes", start
    if syntax in _UNCOMPRESSED:
        dims = [_int(ds.get(k)) for k in ("Rows", "Columns", "BitsAllocated")]
        if all(d is not None and d > 0 for d in dims):
            rows, cols, bits = dims  # type: ignore[misc]
            frames = _int(ds.get("NumberOfFrames")) or 1
            samples = _int(ds.get("SamplesPerPixel")) or 1
            need = math.ceil(rows * cols * frames * samples * bits / 8)
            if declared < need:
                return f"pixel data shorter than its geometry: {declared} of {need} bytes", start
    return None, start


def series_volume(files: Sequence[str | Path]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Stack a series' slices (classic) or frames (enhanced) along the slice normal (see :func:`_stack`)."""
    volume, voxel, _ = _stack(files)
    return volume, voxel


def series_nifti(files: Sequence[str | Path]):
    """The series as a NIfTI image in RAS+ world coordinates (what the benchmarks' MONAI loaders read)."""
    import nibabel as nib

    volume, _, affine_lps = _stack(files)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps  # DICOM LPS -> NIfTI RAS
    image = nib.Nifti1Image(volume.astype(np.float32), affine)
    image.header.set_xyzt_units("mm")
    return image


def _stack(files: Sequence[str | Path]) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """Stack a series' slices (classic) or frames (enhanced) along the slice normal.

    Returns the volume (rows, columns, slices) in stored units after rescale, and the voxel
    size in mm (row spacing, column spacing, slice spacing from positions). Raises
    SitebenchError naming the first file whose pixels cannot be decoded. The third value is
    the voxel-to-patient (LPS) affine of array index (row, column, slice).
    """
    import pydicom

    slices: list[tuple[float, np.ndarray, Any]] = []
    orientation_first: Any = None
    spacing: tuple[float, float] | None = None
    normal: np.ndarray | None = None
    for f in files:
        try:
            ds = pydicom.dcmread(f, specific_tags=list(VOLUME_TAGS))
            pixels = _native_pixels(ds)
            if pixels is None:  # compressed or unusual: let pydicom's decoders handle it
                ds = pydicom.dcmread(f)
                pixels = np.asarray(ds.pixel_array, dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad pixels
            raise SitebenchError(f"pixels cannot be decoded ({type(exc).__name__})", f) from None
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        frames = pixels if pixels.ndim == 3 and _int(ds.get("NumberOfFrames")) else pixels[None]
        geometry = _frame_geometry(ds, len(frames))
        for (position, orientation, pixel_spacing), frame in zip(geometry, frames):
            if normal is None and orientation is not None:
                row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:6], float)
                normal = np.cross(row, col)
                orientation_first = (row, col)
            if spacing is None and pixel_spacing is not None:
                spacing = (float(pixel_spacing[0]), float(pixel_spacing[1]))
            where = float(np.dot(normal, position)) if normal is not None and position is not None \
                else float(len(slices))
            slices.append((where, frame * slope + intercept, position))
    if not slices:
        raise SitebenchError("series holds no image frames")
    shapes = {s.shape for _, s, _ in slices}
    if len(shapes) != 1:
        raise SitebenchError(f"series mixes image sizes {sorted(shapes)}")
    slices.sort(key=lambda item: item[0])
    positions = np.array([w for w, _, _ in slices])
    steps = np.diff(positions)
    slice_mm = float(np.median(steps)) if len(steps) and np.median(steps) > 0 else 1.0
    volume = np.stack([s for _, s, _ in slices], axis=-1)
    row_mm, col_mm = spacing or (1.0, 1.0)
    affine = np.diag([row_mm, col_mm, slice_mm, 1.0])
    if orientation_first is not None and slices[0][2] is not None:
        row_cosine, col_cosine = orientation_first
        # index i (row number) moves down a column, j (column number) along a row
        affine[:3, 0] = col_cosine * row_mm
        affine[:3, 1] = row_cosine * col_mm
        affine[:3, 2] = normal * slice_mm
        affine[:3, 3] = np.asarray(slices[0][2], float)
    return volume, (row_mm, col_mm, slice_mm), affine


VOLUME_TAGS: tuple[str, ...] = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
                "NumberOfFrames", "RescaleSlope", "RescaleIntercept", "ImagePositionPatient",
                "ImageOrientationPatient", "PixelSpacing", "PerFrameFunctionalGroupsSequence",
                "SharedFunctionalGroupsSequence", "PixelData")


def _simple_native(ds) -> tuple[int, int, int] | None:
    """(rows, columns, bits) when the pixels are one native little-endian frame of one 8/16-bit sample,
    which can be read straight from the bytes; None when a decoder is needed."""
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    bits, rows, cols = _int(ds.get("BitsAllocated")), _int(ds.get("Rows")), _int(ds.get("Columns"))
    if (syntax not in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1") or bits not in (8, 16) or not rows or not cols
            or (_int(ds.get("NumberOfFrames")) or 1) != 1 or (_int(ds.get("SamplesPerPixel")) or 1) != 1
            or (_int(ds.get("BitsStored")) or bits) != bits):  # masked high bits: pydicom knows how
        return None
    return rows, cols, bits


def _native_dtype(ds, bits: int) -> np.dtype:
    return np.dtype(f"{'i' if _int(ds.get('PixelRepresentation')) else 'u'}{bits // 8}").newbyteorder("<")


def _native_pixels(ds) -> np.ndarray | None:
    """Single-frame, single-sample native pixels straight from the buffer (no decoder round trip)."""
    simple = _simple_native(ds)
    if simple is None or "PixelData" not in ds:
        return None
    rows, cols, bits = simple
    raw = np.frombuffer(ds.PixelData, dtype=_native_dtype(ds, bits), count=rows * cols)
    return raw.reshape(rows, cols).astype(np.float32)


def _native_layout(ds, pixel_offset: int) -> dict | None:
    """Where a single-frame native image's pixels sit in the file, so they can be read without parsing."""
    simple = _simple_native(ds)
    if simple is None or ds.get("PixelSpacing") is None:
        return None
    rows, cols, bits = simple
    return {"offset": pixel_offset, "rows": rows, "columns": cols, "bits": bits,
            "signed": bool(_int(ds.get("PixelRepresentation"))),
            "slope": float(ds.get("RescaleSlope", 1) or 1), "intercept": float(ds.get("RescaleIntercept", 0) or 0),
            "spacing": [float(v) for v in ds.PixelSpacing]}  # validated by file_summary first


def volume_from_summaries(files: Sequence[Path], summaries: Sequence[dict]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The series volume from pixel offsets recorded on receipt (no header parsing); falls back to pydicom."""
    layouts = [s.get("pixels") for s in summaries]
    frames = [s["frames"][0] if len(s["frames"]) == 1 else None for s in summaries]
    if any(l is None for l in layouts) or any(f is None or f[1] is None or f[2] is None for f in frames) \
            or len({(l["rows"], l["columns"]) for l in layouts}) != 1:
        return series_volume(files)
    orientation = np.asarray(frames[0][2], float)
    normal = np.cross(orientation[:3], orientation[3:6])
    order = sorted(range(len(files)), key=lambda i: float(np.dot(normal, frames[i][1])))
    first = layouts[0]
    volume = np.empty((first["rows"], first["columns"], len(files)), dtype=np.float32)
    for k, i in enumerate(order):
        layout = layouts[i]
        dtype = np.dtype(f"{'i' if layout['signed'] else 'u'}{layout['bits'] // 8}").newbyteorder("<")
        count = layout["rows"] * layout["columns"]
        try:
            raw = np.fromfile(files[i], dtype=dtype, count=count, offset=layout["offset"])
        except (OSError, ValueError) as exc:
            raise SitebenchError(f"pixels cannot be read ({type(exc).__name__})", files[i]) from None
        if raw.size != count:
            raise SitebenchError("pixel data shorter than recorded on receipt", files[i])
        volume[:, :, k] = raw.reshape(layout["rows"], layout["columns"]) * layout["slope"] + layout["intercept"]
    steps = np.diff([float(np.dot(normal, frames[i][1])) for i in order])
    slice_mm = float(np.median(steps)) if len(steps) and np.median(steps) > 0 else 1.0
    return volume, (first["spacing"][0], first["spacing"][1], slice_mm)


def _frame_geometry(ds, n_frames: int) -> list[tuple]:
    """(position, orientation, pixel spacing) per frame; enhanced files keep them in functional groups."""
    top = (ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"), ds.get("PixelSpacing"))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    if not per_frame and shared is None:
        return [top] * n_frames

    def find(groups, seq, keyword):
        for group in groups:
            if group is not None and group.get(seq):
                value = group.get(seq)[0].get(keyword)
                if value is not None:
                    return value
        return None

    out = []
    for index in range(n_frames):
        frame = per_frame[index] if index < len(per_frame) else None
        groups = (frame, shared)
        out.append((find(groups, "PlanePositionSequence", "ImagePositionPatient") or top[0],
                    find(groups, "PlaneOrientationSequence", "ImageOrientationPatient") or top[1],
                    find(groups, "PixelMeasuresSequence", "PixelSpacing") or top[2]))
    return out
