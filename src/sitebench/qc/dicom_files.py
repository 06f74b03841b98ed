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

Also problems: for classic CT/MR/PET images (the Image Plane module mandatory), a missing or
empty ImagePositionPatient, ImageOrientationPatient or PixelSpacing (Type 1); impossible
Image Pixel values (PS3.3 C.7.6.3: Rows or Columns 0, BitsAllocated not 1 or a multiple of 8,
BitsStored above it, HighBit at or above it, SamplesPerPixel 0, an unreadable integer); an
instance key that is not a UID (PS3.5 9.1; a leading zero in a component only warns); pixel
data whose encapsulation disagrees with the transfer syntax, or with a VR other than OB/OW
(PS3.5 A.1, A.4). A bare dataset without preamble and file meta is read, with a warning, when
it holds the required tags. :func:`check_path` checks a file through a read-only mmap, so a
large upload costs its header, not its size.
"""

from __future__ import annotations

import io
import math
import mmap
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sitebench.errors import SitebenchError

__all__ = ["FileCheck", "check_file", "check_path", "check_bytes", "series_volume", "series_nifti", "REQUIRED_TAGS", "VOLUME_TAGS",
           "ENHANCED_MR_SOP_CLASSES"]

#: Tags without which a file cannot be placed in a series or turned into an image.
REQUIRED_TAGS: tuple[str, ...] = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                  "SeriesInstanceUID", "Modality", "Rows", "Columns", "BitsAllocated")

#: Enhanced MR Image, Enhanced MR Color Image, Legacy Converted Enhanced MR Image.
ENHANCED_MR_SOP_CLASSES: frozenset[str] = frozenset({
    "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.3", "1.2.840.10008.5.1.4.1.1.4.4"})


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


def check_bytes(data: Any) -> FileCheck:
    """Integrity of one file's bytes (see :func:`check_file`); never raises, whatever the bytes.

    ``data`` is the file's bytes, or any buffer (an ``mmap.mmap``, a ``memoryview``) or binary
    file-like object (``read``/``seek``/``tell``): buffers and file-likes are read piece by piece,
    never copied whole, so checking a 1 GiB upload held in an mmap costs its header, not its size
    (see :func:`check_path`).

    The header is parsed up to the pixel data; the pixel data element is then checked
    from its own header (declared length against the bytes present and against the
    image geometry, encapsulation against the transfer syntax, PS3.5 A.4) without decoding it,
    which keeps intake cheap. A deflated dataset (PS3.5 A.5) is inflated in bounded pieces and
    its pixel element checked in the inflated stream. Any error in parsing or
    summarising (pydicom raises many kinds on malformed input: RecursionError on deep
    sequences, zlib.error on a corrupt deflated stream, MemoryError on a huge declared
    length, ValueError on a malformed value) becomes one problem line naming the exception
    type, never its message (pydicom's messages can quote values).
    """
    check = FileCheck()
    source: _Input | None = None
    try:
        source = _Input(data)
        _check_input(source, check)
    except RecursionError:
        check.summary = None
        check.problems.append("unreadable header: RecursionError: sequences nested too deeply")
    except MemoryError:
        check.summary = None
        check.problems.append("unreadable header: MemoryError: a declared length is too large")
    except Exception as exc:  # noqa: BLE001 - any input must give a verdict, not an exception
        check.summary = None
        check.problems.append(f"unreadable header: {_type_name(exc)}: {_reason(exc)}")
    finally:
        if source is not None:
            source.close()
    return check


def check_path(path: str | os.PathLike) -> FileCheck:
    """Integrity of one file on disk, memory-mapped read-only (never read whole); never raises.

    The file is mapped, checked by :func:`check_bytes` and unmapped, so its cost in memory is
    the header and the few pages the pixel checks touch, whatever its size. An empty file (which
    cannot be mapped) is checked as ``b""``; a file that cannot be mapped (a pipe, a special
    file system) is read through its file object, still piece by piece. The file must not be
    truncated by another process while it is checked (reading a mapping past a shrunk end is
    SIGBUS): intake checks files it has stored itself.
    """
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                return check_bytes(b"")
            try:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError, OverflowError):
                return check_bytes(handle)
            try:
                return check_bytes(mapped)
            finally:
                try:
                    mapped.close()
                except BufferError:  # pragma: no cover - nothing here keeps a view of it
                    pass
    except OSError as exc:
        return FileCheck(problems=[f"cannot be read: {exc.strerror or type(exc).__name__}"])
    except Exception as exc:  # noqa: BLE001 - e.g. ValueError on a path with a NUL
        return FileCheck(problems=[f"cannot be read: {type(exc).__name__}"])


def _type_name(exc: BaseException) -> str:
    """``ValueError``, ``zlib.error``: builtins bare, others with their module (zlib's is just "error")."""
    kind = type(exc)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def _reason(exc: BaseException) -> str:
    """A short, value-free reason for a parse error (never ``str(exc)``: it can quote tag values)."""
    if isinstance(exc, zlib.error):
        return "corrupt deflated data"
    if isinstance(exc, (EOFError, struct.error, IndexError)):
        return "truncated or corrupt"
    if isinstance(exc, (ValueError, TypeError, KeyError, AttributeError)):
        return "malformed element"
    if isinstance(exc, NotImplementedError):
        return "unsupported encoding"
    return "truncated or corrupt"


class _BufferReader:
    """``read``/``seek``/``tell`` over a buffer (an mmap, a memoryview) with BytesIO's semantics
    (reads past the end give b"", seeks past it are allowed): each read copies only what it returns."""

    def __init__(self, buffer: Any, size: int, as_bytes: bool):
        self._buffer, self._size, self._pos, self._as_bytes = buffer, size, 0, as_bytes

    def read(self, n: int | None = -1) -> bytes:
        start = self._pos
        if start >= self._size:
            return b""
        end = self._size if n is None or n < 0 else min(self._size, start + n)
        self._pos = end
        piece = self._buffer[start:end]
        return bytes(piece) if self._as_bytes else piece

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


class _Input:
    """One file's bytes, whatever form they come in: ``fp`` for pydicom, ``pread(offset, n)`` for
    the byte-level checks, ``size``. Nothing here copies the whole input."""

    def __init__(self, data: Any):
        self._view: memoryview | None = None
        if isinstance(data, bytes):
            self.size = len(data)
            self.fp: Any = io.BytesIO(data)  # shares the bytes object, no copy
            self.pread = lambda offset, n: data[offset:offset + n]
        elif isinstance(data, mmap.mmap):
            self.size = len(data)
            self.fp = _BufferReader(data, self.size, as_bytes=False)  # mmap slices are bytes
            self.pread = lambda offset, n: data[offset:offset + n]
        elif hasattr(data, "read") and hasattr(data, "seek") and hasattr(data, "tell"):
            data.seek(0, 2)
            self.size = data.tell()
            data.seek(0)
            self.fp = data

            def pread(offset: int, n: int) -> bytes:
                data.seek(offset)
                return bytes(data.read(n))

            self.pread = pread
        else:  # any other buffer: bytearray, memoryview, array
            view = self._view = memoryview(data).cast("B")
            self.size = view.nbytes
            self.fp = _BufferReader(view, self.size, as_bytes=True)
            self.pread = lambda offset, n: bytes(view[offset:offset + n])

    def close(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None


#: values larger than this are not read while parsing the header (read if asked for): a huge
#: element before the pixel data costs nothing unless a check needs it
_DEFER_SIZE = 4 * 2**20
#: a deflated dataset: the inflated bytes kept for the header parse, and the most inflated at all
_DEFLATE_KEEP = 64 * 2**20
_DEFLATE_LIMIT = 4 * 2**30
_DEFLATED = "1.2.840.10008.1.2.1.99"
_IMPLICIT = "1.2.840.10008.1.2"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
#: native (unencapsulated) pixel data: PS3.5 A.1 (A.5 deflates the dataset, not the pixels)
_NATIVE = frozenset({_IMPLICIT, "1.2.840.10008.1.2.1", _BIG_ENDIAN, _DEFLATED})
#: JPIP referenced transfer syntaxes carry no pixel data (a provider URL instead)
_NO_PIXELS = frozenset({"1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95"})
#: classic single-frame image storage where the Image Plane module is mandatory (PS3.3 A.4 CT,
#: A.5 MR, A.21 PET): its Type 1 attributes must be present and non-empty (PS3.3 C.7.6.2)
_IMAGE_PLANE_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4",
                                      "1.2.840.10008.5.1.4.1.1.128"})
_IMAGE_PLANE_TYPE1 = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
_UID_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_UID_DIGITS = re.compile(r"[0-9]+(?:\.[0-9]+)*\Z")
_UID_CANONICAL = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*\Z")


def _check_input(source: _Input, check: FileCheck) -> None:
    """:func:`check_bytes`' work, filling ``check`` as it goes (so what was learnt before an error stays)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    meta_end, meta_syntax = _scan_meta(source)
    deflated = meta_syntax == _DEFLATED
    if deflated:
        read = _read_deflated(source, meta_end, check)
        if read is None:
            return
        ds, pread, size, offset = read
    else:
        source.fp.seek(0)
        try:
            ds = pydicom.dcmread(source.fp, force=False, stop_before_pixels=True, defer_size=_DEFER_SIZE)
        except InvalidDicomError:
            ds = _read_bare(source, check)
            if ds is None:
                check.problems.append("not a DICOM file (no DICM preamble or file meta)")
                return
        pread, size, offset = source.pread, source.size, source.fp.tell()
    syntax = _syntax(ds)
    check.series_uid = _uid(ds, "SeriesInstanceUID")
    check.study_uid = _uid(ds, "StudyInstanceUID")
    check.sop_uid = _uid(ds, "SOPInstanceUID")
    missing = [kw for kw in REQUIRED_TAGS if not _has_value(ds, kw)]
    if missing:
        check.problems.append(f"required tags missing: {', '.join(missing)}")
    _check_uids(ds, check)
    check.problems += _pixel_module_problems(ds, missing)
    from sitebench.qc.dicom_params import file_summary, tag_label

    summary = file_summary(ds)
    # (not where required tags are missing too: a header cut or garbled early says it already)
    if not missing and str(ds.get("SOPClassUID", "")).strip("\x00 ") in _IMAGE_PLANE_SOP_CLASSES:
        for keyword in _IMAGE_PLANE_TYPE1:
            label = tag_label(keyword)
            if any(line.startswith(label) for line in summary["geometry"]):
                continue
            # a warning, not a problem: real scanners write derived single-frame MR without a position
            # (UIH diffusion VFRAME images, say); the series' geometry checks are then undetermined
            if keyword not in ds:
                check.warnings.append(f"image plane incomplete: {label} missing (PS3.3 C.7.6.2)")
            elif not _present(ds, keyword):
                check.warnings.append(f"image plane incomplete: {label} empty (PS3.3 C.7.6.2)")
    check.problems += [f"damaged geometry: {line}" for line in summary["geometry"]]
    check.warnings += [f"{tag_label(kw)} is not a number: treated as missing" for kw in summary["invalid"]]
    check.summary = summary
    pixel_problem, pixel_offset = _pixel_element(ds, pread, size, offset, syntax, check.warnings)
    if pixel_problem:
        check.problems.append(pixel_problem)
    elif pixel_offset is not None and not deflated and not check.problems:
        try:  # offsets in the file: never for a deflated one (they would be in the inflated stream)
            layout = _native_layout(ds, pixel_offset, syntax)
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


def _present(ds, keyword: str) -> bool:
    from sitebench.qc.dicom_params import _present as present

    return present(ds, keyword)


def _scan_meta(source: _Input) -> tuple[int, str | None]:
    """(end of the file meta group, its TransferSyntaxUID) when the file has the DICM prefix; the
    meta is explicit VR little endian (PS3.10 7.1) and ends at the first element of another group."""
    if source.pread(128, 4) != b"DICM":
        return 0, None
    pos, syntax = 132, None
    for _ in range(4096):
        head = source.pread(pos, 12)
        if len(head) < 8 or struct.unpack_from("<H", head)[0] != 0x0002:
            break
        element = struct.unpack_from("<H", head, 2)[0]
        if head[4:6] in _LONG_VRS:
            if len(head) < 12:
                break
            length, value_at = struct.unpack_from("<I", head, 8)[0], pos + 12
        else:
            length, value_at = struct.unpack_from("<H", head, 6)[0], pos + 8
        if length == 0xFFFFFFFF:
            break
        if element == 0x0010:
            syntax = source.pread(value_at, min(length, 256)).decode("latin1").strip("\x00 ")
        pos = value_at + length
    return pos, syntax


def _inflate(source: _Input, start: int) -> tuple[bytes, int, bool]:
    """(the first inflated bytes, up to :data:`_DEFLATE_KEEP`; how many there are in all; whether
    the stream ended) of the deflated dataset from ``start``, inflated in pieces; raises zlib.error
    on a corrupt stream and MemoryError past :data:`_DEFLATE_LIMIT`."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    kept: list[bytes] = []
    have = total = 0
    pos = start
    piece = 1 << 20
    while pos < source.size and not inflater.eof:
        pending = source.pread(pos, piece)
        pos += len(pending)
        while True:
            out = inflater.decompress(pending, 4 * piece)
            total += len(out)
            if total > _DEFLATE_LIMIT:
                raise MemoryError("deflated dataset too large")
            if have < _DEFLATE_KEEP and out:
                kept.append(out[:_DEFLATE_KEEP - have])
                have += len(kept[-1])
            pending = inflater.unconsumed_tail
            if inflater.eof or (not pending and len(out) < 4 * piece):
                break
    return b"".join(kept), total, inflater.eof


def _at_pixels(tag, vr, length) -> bool:
    return tag in (0x7FE00010, 0x7FE00008, 0x7FE00009)


def _read_deflated(source: _Input, meta_end: int, check: FileCheck):
    """(dataset, pread, size, pixel element offset) of a Deflated Explicit VR Little Endian file
    (PS3.5 A.5), all in the inflated stream; None (with the problem recorded) when it cannot be read."""
    import pydicom
    from pydicom.filereader import read_dataset

    inflated, total, ended = _inflate(source, meta_end)
    if not ended:
        check.problems.append("deflated dataset truncated: the deflate stream ends early")
        return None
    meta = pydicom.dcmread(io.BytesIO(source.pread(0, meta_end)), stop_before_pixels=True)
    buffer = io.BytesIO(inflated)
    dataset = read_dataset(buffer, False, True, stop_when=_at_pixels)
    ds = pydicom.dataset.FileDataset(buffer, dataset, preamble=meta.preamble, file_meta=meta.file_meta,
                                     is_implicit_VR=False, is_little_endian=True)
    offset = buffer.tell()
    if total > len(inflated) and offset + 12 > len(inflated):
        check.problems.append(f"deflated dataset header larger than {_DEFLATE_KEEP // 2**20} MiB: not checked")
        return None

    def pread(at: int, n: int) -> bytes:
        return inflated[at:at + n]

    return ds, pread, total, offset


def _read_bare(source: _Input, check: FileCheck):
    """A dataset without preamble and file meta (PS3.10 7.1 requires both), read as pydicom guesses
    its encoding, when it holds every :data:`REQUIRED_TAGS`; else None. Only tried when the first
    element is in group 0002 or 0008 (where a dataset of an image starts), so blobs of another kind
    are not parsed as one."""
    import pydicom

    head = source.pread(0, 8)
    if len(head) < 8 or struct.unpack_from("<H", head)[0] not in (0x0002, 0x0008):
        return None
    source.fp.seek(0)
    try:
        ds = pydicom.dcmread(source.fp, force=True, stop_before_pixels=True, defer_size=_DEFER_SIZE)
    except Exception:  # noqa: BLE001 - not readable as a dataset either: not DICOM
        return None
    if not all(_has_value(ds, kw) for kw in REQUIRED_TAGS):
        return None
    if struct.unpack_from("<H", head)[0] == 0x0002:
        check.warnings.append("no DICM preamble (PS3.10 7.1): file meta read from the first byte")
    else:
        check.warnings.append(f"no DICOM file meta (PS3.10 7.1): read as a bare {_encoding_name(ds)} dataset")
    return ds


def _encoding_name(ds) -> str:
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        implicit, little = True, True
    return f"{'implicit' if implicit else 'explicit'} VR {'little' if little else 'big'} endian"


def _syntax(ds) -> str:
    """The transfer syntax the dataset is in: its file meta's, else the encoding pydicom read it in."""
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "").strip("\x00 ")
    if syntax:
        return syntax
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None or implicit:
        return _IMPLICIT
    return "1.2.840.10008.1.2.1" if little else _BIG_ENDIAN


def _uid_text(ds, keyword: str) -> str | None:
    try:
        value = ds[keyword].value if keyword in ds else None
    except Exception:  # noqa: BLE001 - a malformed UID is as good as none
        return None
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin1")
    return str(value or "").strip("\x00 ") or None


def _uid(ds, keyword: str) -> str | None:
    return _uid_text(ds, keyword)


def _check_uids(ds, check: FileCheck) -> None:
    """The instance keys must be UIDs (PS3.5 9.1: digits and dots, at most 64 characters, no
    leading zero in a component): a broken key cannot be trusted to group, a leading zero
    (common in the wild) only warns. Never quotes the value."""
    for keyword in _UID_KEYS:
        text = _uid_text(ds, keyword)
        if text is None:
            continue  # missing: a required tag
        if len(text) > 64 or not _UID_DIGITS.match(text):
            check.problems.append(f"{keyword} is not a valid UID (PS3.5 9.1)")
        elif not _UID_CANONICAL.match(text):
            check.warnings.append(f"{keyword} has a component with a leading zero (PS3.5 9.1)")


def _uint_value(ds, keyword: str) -> tuple[bool, int | None]:
    """(present, value) of an unsigned integer attribute; value None when present but unreadable
    (binary junk under a text VR, several values, not a whole number)."""
    if keyword not in ds:
        return False, None
    try:
        value = ds[keyword].value
    except Exception:  # noqa: BLE001 - an unknown VR, a malformed value
        return True, None
    if isinstance(value, bool) or value is None or value == "":
        return True, None
    if isinstance(value, int):
        return True, value
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return True, None
    return True, int(number) if math.isfinite(number) and number.is_integer() else None


def _pixel_module_problems(ds, missing: Sequence[str]) -> list[str]:
    """Impossible Image Pixel module values (PS3.3 C.7.6.3): an empty matrix, a BitsAllocated
    that is not 1 or a multiple of 8, BitsStored above it, HighBit at or above it, no samples.
    Numbers only, never an identifying value."""
    from sitebench.qc.dicom_params import tag_label

    problems: list[str] = []
    values: dict[str, int] = {}
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "SamplesPerPixel",
                    "PixelRepresentation"):
        present, value = _uint_value(ds, keyword)
        if not present:
            continue
        if value is None:
            if keyword not in missing:
                problems.append(f"{tag_label(keyword)} unreadable: not an integer")
            continue
        values[keyword] = value
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsStored"):
        if values.get(keyword) == 0:
            problems.append(f"{keyword} is 0")
    bits = values.get("BitsAllocated")
    if bits is not None and (bits <= 0 or (bits != 1 and bits % 8)):
        problems.append(f"BitsAllocated {bits} is not 1 or a multiple of 8")
        bits = None
    if bits is not None:
        stored = values.get("BitsStored")
        if stored is not None and stored > bits:
            problems.append(f"BitsStored {stored} exceeds BitsAllocated {bits}")
        high = values.get("HighBit")
        if high is not None and high >= bits:
            problems.append(f"HighBit {high} is not below BitsAllocated {bits}")
    if values.get("PixelRepresentation", 0) not in (0, 1):
        problems.append(f"PixelRepresentation {values['PixelRepresentation']} is not 0 or 1")
    return problems


def _has_value(ds, keyword: str) -> bool:
    try:
        return keyword in ds and ds[keyword].value not in (None, "")
    except Exception:  # noqa: BLE001 - present but unreadable counts as missing
        return False


def check_file(path: str | Path) -> FileCheck:
    """Integrity of one file on disk (:func:`check_path`: mapped, never read whole); unreadable
    files are a problem, not an exception."""
    return check_path(path)


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


_PIXEL_TAGS = {(0x7FE0, 0x0010): "PixelData", (0x7FE0, 0x0008): "FloatPixelData",
               (0x7FE0, 0x0009): "DoubleFloatPixelData"}
#: the VRs each pixel element may have (PS3.5 A.1; encapsulated PixelData is OB only, A.4)
_PIXEL_VRS = {(0x7FE0, 0x0010): (b"OB", b"OW"), (0x7FE0, 0x0008): (b"OF",), (0x7FE0, 0x0009): (b"OD",)}
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UC", b"UR", b"SV", b"UV"}
_MAX_FRAGMENTS = 1_000_000


def _encapsulated(syntax: str) -> bool | None:
    """Whether ``syntax`` encapsulates its pixel data (PS3.5 A.4): False for the native ones, True
    for the other known ones, None when unknown (private, unregistered) or without pixel data."""
    if syntax in _NATIVE:
        return False
    if syntax in _NO_PIXELS:
        return None
    try:
        from pydicom.uid import UID

        uid = UID(syntax)
        return True if uid.is_transfer_syntax and not uid.is_private else None
    except Exception:  # noqa: BLE001 - a malformed UID: unknown
        return None


def _pixel_element(ds, pread, size: int, offset: int, syntax: str,
                   warnings: list[str]) -> tuple[str | None, int | None]:
    """(problem, where the pixel bytes start), from the pixel element's header at ``offset``
    (where the header parse stopped); reads only element and item headers."""
    if offset > size:
        return "header truncated: an element runs past the end of the file", None
    big = syntax == _BIG_ENDIAN
    endian = ">" if big else "<"
    head = pread(offset, 12)
    if len(head) < 8:
        return "no pixel data", None
    tag = struct.unpack(endian + "HH", head[:4])
    if tag not in _PIXEL_TAGS:
        return "no pixel data", None
    name = f"{_PIXEL_TAGS[tag]} ({tag[0]:04X},{tag[1]:04X})"
    vr = None
    if syntax == _IMPLICIT:  # implicit VR: tag, 4-byte length
        (declared,), start = struct.unpack("<I", head[4:8]), offset + 8
    elif head[4:6] in _LONG_VRS:  # explicit VR: tag, VR, 2 reserved, 4-byte length
        if len(head) < 12:
            return "pixel data truncated: 0 bytes", None
        vr = head[4:6]
        (declared,), start = struct.unpack(endian + "I", head[8:12]), offset + 12
    else:
        vr = head[4:6]
        (declared,), start = struct.unpack(endian + "H", head[6:8]), offset + 8
    if vr is not None and vr not in _PIXEL_VRS[tag]:
        shown = f"VR {vr.decode('ascii')}" if vr.isalpha() and vr.isupper() else "an invalid VR"
        allowed = " or ".join(v.decode() for v in _PIXEL_VRS[tag])
        if vr != b"UN":
            return f"{name} has {shown}, not {allowed} (PS3.5 A.1)", None
        warnings.append(f"{name} has VR UN, not {allowed} (PS3.5 A.1): read by its dictionary VR")
    encapsulated = _encapsulated(syntax)
    if declared == 0xFFFFFFFF:  # encapsulated (compressed) frames: items, then a sequence delimiter
        if tag != (0x7FE0, 0x0010):
            return f"{name} with undefined length: only PixelData may be encapsulated (PS3.5 A.4)", None
        if encapsulated is False:
            return ("encapsulated (undefined length) pixel data under a native transfer syntax "
                    "(PS3.5 A.4)"), None
        if vr == b"OW":
            return f"encapsulated {name} has VR OW, not OB (PS3.5 A.4)", None
        return _walk_fragments(pread, size, start), None
    if encapsulated and tag == (0x7FE0, 0x0010):
        return ("native (defined length) pixel data under an encapsulated transfer syntax "
                f"{_syntax_name(syntax)} (PS3.5 A.4)"), None
    have = size - start
    if have < declared:
        return f"pixel data truncated: {have} of {declared} bytes", start
    if encapsulated is False:
        dims = [_int(ds.get(k)) for k in ("Rows", "Columns", "BitsAllocated")]
        if all(d is not None and d > 0 for d in dims):
            rows, cols, bits = dims  # type: ignore[misc]
            frames = _int(ds.get("NumberOfFrames")) or 1
            samples = _int(ds.get("SamplesPerPixel")) or 1
            need = math.ceil(rows * cols * frames * samples * bits / 8)
            if declared < need:
                return f"pixel data shorter than its geometry: {declared} of {need} bytes", start
    return None, start


def _syntax_name(syntax: str) -> str:
    try:
        from pydicom.uid import UID

        name = UID(syntax).name
    except Exception:  # noqa: BLE001
        name = ""
    return name if name and name != syntax and name.isprintable() else syntax


def _walk_fragments(pread, size: int, start: int) -> str | None:
    """Encapsulated pixel data (PS3.5 A.4): items (the offset table, then fragments), each inside
    the file, ended by a sequence delimiter. Reads 8 bytes per item."""
    pos = start
    for _ in range(_MAX_FRAGMENTS):
        head = pread(pos, 8)
        if len(head) < 8:
            return "pixel data truncated: encapsulated frames without their end delimiter"
        group, element, length = struct.unpack("<HHI", head)
        if (group, element) == (0xFFFE, 0xE0DD):
            return None
        if (group, element) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            return "encapsulated pixel data malformed: an element where an item (FFFE,E000) belongs"
        pos += 8 + length
        if pos > size:
            return "pixel data truncated: an encapsulated fragment runs past the end of the file"
    return f"encapsulated pixel data with more than {_MAX_FRAGMENTS} items"


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
            # force: a bare dataset (no file meta) that check_bytes accepted reads as well
            ds = pydicom.dcmread(f, specific_tags=list(VOLUME_TAGS), force=True)
            pixels = _native_pixels(ds)
            if pixels is None:  # compressed or unusual: let pydicom's decoders handle it
                ds = pydicom.dcmread(f, force=True)
                if not getattr(ds.file_meta, "TransferSyntaxUID", None):
                    ds.file_meta.TransferSyntaxUID = _syntax(ds)
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


def _simple_native(ds, syntax: str | None = None) -> tuple[int, int, int] | None:
    """(rows, columns, bits) when the pixels are one native little-endian frame of one 8/16-bit sample,
    which can be read straight from the bytes; None when a decoder is needed."""
    syntax = _syntax(ds) if syntax is None else syntax
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


def _native_layout(ds, pixel_offset: int, syntax: str | None = None) -> dict | None:
    """Where a single-frame native image's pixels sit in the file, so they can be read without parsing."""
    simple = _simple_native(ds, syntax)
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
