"""Acquisition parameters from DICOM headers, one record per series.

Keys and units follow the BIDS sidecars that dcm2niix writes (times in
seconds, angles in degrees, lengths in mm); keys dcm2niix does not report use
the DICOM keyword (``PixelSpacing``, ``AcquisitionMatrix``, ``Rows``,
``Columns``) or a plain name (``NumberOfSlices``, ``SliceCoverageMM``).

Sources, in order of preference:

* enhanced multi-frame MR: the shared, then the first per-frame functional
  group (MRTimingAndRelatedParameters, MREcho, PixelMeasures, MRFOVGeometry,
  MRModifier, MRReceiveCoil, MRAverages, MRImageFrameType, ...), then the top
  level. Top-level TR/TE in these files are absent or -1.
* classic MR: the top level.
* Siemens V-series: the CSA image header (0029,1010) for
  ``PhaseEncodingDirectionPositive`` and the ASCCONV text of the series
  header (0029,1020) for acceleration and coil. Siemens XA keeps the same
  ASCCONV text in (0021,1019) and the polarity in per-frame (0021,111C).
* GE: private tags for the pulse-sequence name (0019,109C), ASSET factor
  (0043,1083) and the gzip "protocol data block" (0025,101B) VIEWORDER for
  the phase-encoding polarity.

Not extracted (left out to keep the parser small): slice timing, echo
spacing / total readout time, diffusion, Philips private scale factors,
Canon/UIH private tags, GE multiband, Siemens B0 shim / TxRefAmp.

Patient identifiers are never read into the output: only the *names* of the
PS3.15 Basic Profile attributes that are present (non-empty) are reported.

Series parameters come from the first file's whole header; every file also gets a small
:func:`file_summary` on receipt (geometry per frame, its own :data:`INSTANCE_KEYS` values,
InstanceNumber and the counts completeness needs), so a check can compare every instance
(:func:`instance_spread`) without reading the files again. A malformed DS/IS value counts
as missing and is named (keyword and tag, never the value) in the summary's ``invalid``;
damaged geometry is named in its ``geometry``.
"""

from __future__ import annotations

import math
import os
import re
import struct
import sys
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from sitebench.errors import SitebenchError

__all__ = ["SeriesParameters", "read_series", "series_from_summaries", "file_summary", "dicom_files", "PARAMETER_KEYS",
           "PHI_KEYWORDS", "INSTANCE_KEYS", "Spread", "instance_spread", "instance_label", "is_multi_echo", "tag_label"]

#: Every key read_series looks for (``missing`` lists those not found).
PARAMETER_KEYS: tuple[str, ...] = (
    "Manufacturer", "Vendor", "ManufacturersModelName", "SoftwareVersions",
    "MagneticFieldStrength", "ReceiveCoilName", "MRAcquisitionType",
    "ScanningSequence", "SequenceVariant", "SequenceName", "PulseSequenceName",
    "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle",
    "SliceThickness", "SpacingBetweenSlices", "PixelSpacing", "Rows", "Columns",
    "AcquisitionMatrix", "AcquisitionMatrixPE", "ReconMatrixPE",
    "ImageOrientationPatientDICOM", "NumberOfSlices", "SliceCoverageMM", "MaxSliceStepMM",
    "PercentPhaseFOV", "PercentSampling", "NumberOfAverages", "EchoTrainLength",
    "PixelBandwidth", "PhaseEncodingDirection",
    "InPlanePhaseEncodingDirectionDICOM", "ParallelReductionFactorInPlane",
    "MultibandAccelerationFactor", "ImageType", "SeriesDescription", "ProtocolName",
)

#: PS3.15 Annex E Basic Profile identifiers we check for (names only).
PHI_KEYWORDS: tuple[str, ...] = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime",
    "OtherPatientIDs", "OtherPatientNames", "OtherPatientIDsSequence",
    "PatientBirthName", "PatientMotherBirthName", "PatientAddress",
    "PatientTelephoneNumbers", "MedicalRecordLocator", "EthnicGroup",
    "PatientComments", "AccessionNumber", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy", "RequestingPhysician", "InstitutionName",
    "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "DeviceSerialNumber", "StudyID", "AdmissionID", "MilitaryRank",
    "BranchOfService", "Occupation", "PatientInsurancePlanCodeSequence",
    "RegionOfResidence", "CountryOfResidence", "AdditionalPatientHistory",
)

#: DICOM Manufacturer prefix -> the name dcm2niix writes in the BIDS sidecar. It keeps what the
#: scanner wrote: a TOSHIBA file says "Toshiba", never "Canon" (dcm2niix nii_dicom_batch.cpp).
_MANUFACTURERS = (("SIEMENS", "Siemens"), ("GE", "GE"), ("PHILIPS", "Philips"),
                  ("TOSHIBA", "Toshiba"), ("CANON", "Canon"), ("UIH", "UIH"),
                  ("UNITED IMAGING", "UIH"), ("HITACHI", "Hitachi"), ("FUJIFILM", "Fujifilm"),
                  ("BRUKER", "Bruker"), ("MEDISO", "Mediso"), ("MRSOLUTIONS", "MRSolutions"))
#: Manufacturer -> the vendor statistics group by: Canon Medical Systems is Toshiba Medical renamed
#: (2018), the same scanner lines; Fujifilm bought Hitachi's MR business (2021).
_VENDOR_GROUPS = {"Toshiba": "Canon", "Hitachi": "Fujifilm"}
#: Version of what :func:`read_series` extracts. A drift baseline records the version it was read
#: with, and a key first extracted by a later version is adopted into an older baseline instead of
#: being reported as having appeared (the scanner did not change; the parser learnt to read it).
PARSER_VERSION = 2
#: Version -> the keys that version started to extract (1: everything before it).
KEYS_ADDED_IN: dict[int, tuple[str, ...]] = {
    2: ("Vendor", "SliceTiming", "SliceOrder", "DiffusionBValues", "DiffusionGradientDirections",
        "DiffusionBValueShells", "NumberOfDiffusionVolumes", "NumberOfB0Volumes", "NumberOfDiffusionDirections",
        "MultibandAccelerationFactor", "PhaseEncodingDirection", "ParallelReductionFactorInPlane",
        "SequenceName"),
}


def keys_added_since(version: int) -> frozenset[str]:
    """Keys :func:`read_series` extracts now that a reader of ``version`` never did."""
    return frozenset(k for v, keys in KEYS_ADDED_IN.items() if v > version for k in keys)


#: Vendor -> the module that reads what only that vendor's private tags hold (see each module).
_VENDOR_MODULES = {"GE": "vendor_ge", "Siemens": "vendor_siemens", "Philips": "vendor_philips",
                   "UIH": "vendor_uih", "Canon": "vendor_canon"}


class _Record:
    """A plain record: keyword-or-positional ``__init__`` from :attr:`_FIELDS` (name, default factory),
    value equality and a repr. Not a dataclass because :mod:`dataclasses` imports :mod:`inspect`,
    which costs ``qc inspect`` 10 ms and 1.4 MiB, more than reading a 200-file series' headers."""

    _FIELDS: tuple[tuple[str, Any], ...] = ()
    _HIDDEN: frozenset[str] = frozenset()  # left out of the repr

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = [name for name, _ in self._FIELDS]
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes at most {len(names)} positional arguments")
        given = dict(zip(names, args))
        for name, value in kwargs.items():
            if name not in names or name in given:
                raise TypeError(f"{type(self).__name__}: unexpected or repeated argument {name!r}")
            given[name] = value
        for name, default in self._FIELDS:
            if name in given:
                setattr(self, name, given[name])
            elif default is _REQUIRED:
                raise TypeError(f"{type(self).__name__} needs {name!r}")
            else:
                setattr(self, name, default() if callable(default) else default)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n, _ in self._FIELDS)

    __hash__ = None  # type: ignore[assignment]  # mutable, as a dataclass without frozen=True

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}={getattr(self, n)!r}" for n, _ in self._FIELDS if n not in self._HIDDEN)
        return f"{type(self).__name__}({shown})"


_REQUIRED = object()


class SeriesParameters(_Record):
    """Acquisition parameters of one series (SeriesInstanceUID).

    ``series_uid``, ``files``; ``parameters`` (BIDS keys); ``missing``, ``phi_present``; ``study_uid``
    (kept for grouping re-scans; never written out, PHI profile); ``scanner_id`` (pseudonym of
    DeviceSerialNumber / StationName); ``trial_subject`` and ``trial_timepoint``, from the Clinical
    Trial Subject module (PS3.3 C.7.1.3: ClinicalTrialSubjectID (0012,0040) and
    ClinicalTrialTimePointID (0012,0050); the gate keeps a keyed pseudonym of the subject only, for
    expected-against-received reconciliation); ``summaries``, the per-file :func:`file_summary` (intake).
    """

    _FIELDS = (("series_uid", _REQUIRED), ("files", _REQUIRED), ("parameters", dict), ("missing", list),
               ("phi_present", list), ("study_uid", ""), ("scanner_id", None), ("trial_subject", ""),
               ("trial_timepoint", ""), ("summaries", list))
    _HIDDEN = frozenset({"summaries"})
    series_uid: str
    files: list[Path]
    parameters: dict[str, Any]
    missing: list[str]
    phi_present: list[str]
    study_uid: str
    scanner_id: str | None
    trial_subject: str
    trial_timepoint: str
    summaries: list

    def to_dict(self) -> dict:
        return {"SeriesInstanceUID": self.series_uid, "n_files": len(self.files),
                **self.parameters, "_missing": list(self.missing),
                "_phi_attributes_present": list(self.phi_present), "_parser_version": PARSER_VERSION}


# --------------------------------------------------------------------------- small helpers
def _num(v: Any) -> float | int | None:
    """DICOM DS/IS/float -> int when integral, else float; None if unusable."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(f):
        return None
    return int(f) if f.is_integer() else f


def _nums(v: Any) -> list | None:
    if v is None:
        return None
    vals = list(v) if isinstance(v, (list, tuple)) or hasattr(v, "__iter__") and not isinstance(v, (str, bytes)) else [v]
    out = [_num(x) for x in vals]
    return None if not out or any(x is None for x in out) else out


def _text(v: Any) -> str | None:
    """Multi-valued strings joined with a backslash, as dcm2niix writes them."""
    if v is None:
        return None
    if isinstance(v, (list, tuple)) or (hasattr(v, "__iter__") and not isinstance(v, (str, bytes))):
        s = "\\".join(str(x).strip() for x in v)
    else:
        s = str(v).strip()
    return s or None


def _private(ds, group: int, creator: str, elem: int) -> Any:
    """Value of private element (group, creator, 0xXX) or None."""
    try:
        return ds.private_block(group, creator)[elem].value
    except (KeyError, ValueError, AttributeError):
        return None


# --------------------------------------------------------------------------- Siemens CSA / ASCCONV
def _csa_tags(raw: bytes | None) -> dict[str, list[str]]:
    """Minimal Siemens CSA1/CSA2 header parser -> {name: [item strings]}."""
    if not raw or len(raw) < 16:
        return {}
    out: dict[str, list[str]] = {}
    try:
        csa2 = raw[:4] == b"SV10"
        pos = 8 if csa2 else 0
        n_tags = struct.unpack_from("<I", raw, pos)[0]
        pos += 8
        if not 0 < n_tags <= 1000:
            return {}
        for _ in range(n_tags):
            name = raw[pos:pos + 64].split(b"\0", 1)[0].decode("latin1")
            n_items = struct.unpack_from("<i", raw, pos + 76)[0]
            pos += 84
            items = []
            for _ in range(n_items):
                x = struct.unpack_from("<4i", raw, pos)
                length = x[1] if csa2 else x[0] - 0  # CSA1 length in x[0]; good enough for text
                length = max(0, min(length, len(raw) - pos - 16))
                val = raw[pos + 16:pos + 16 + length].split(b"\0", 1)[0].decode("latin1").strip()
                if val:
                    items.append(val)
                pos += 16 + ((length + 3) // 4) * 4
            out[name] = items
    except struct.error:
        pass
    return out


_ASC_LINE = re.compile(r"^\s*([A-Za-z_][\w.\[\]]*)\s*=\s*(.*?)\s*$")


def _ascconv(raw: bytes | str | None) -> dict[str, str]:
    """The ``### ASCCONV BEGIN ... END`` block of a Siemens protocol -> {key: value}."""
    if raw is None:
        return {}
    text = raw.decode("latin1", "replace") if isinstance(raw, bytes) else str(raw)
    start = text.find("### ASCCONV BEGIN")
    if start < 0:
        return {}
    end = text.find("### ASCCONV END", start)
    out = {}
    for line in text[start:end if end > 0 else None].splitlines()[1:]:
        m = _ASC_LINE.match(line.split("#", 1)[0])
        if m:
            out[m.group(1)] = m.group(2).strip().strip('"')
    return out


def _asc_num(asc: dict[str, str], key: str) -> float | int | None:
    v = asc.get(key)
    if v is None:
        return None
    try:
        return _num(int(v, 16) if v.lower().startswith("0x") else float(v))
    except ValueError:
        return None


# --------------------------------------------------------------------------- GE protocol data block
def _ge_protocol_block(ds) -> dict[str, str]:
    raw = _private(ds, 0x0025, "GEMS_SERS_01", 0x1B)
    if not isinstance(raw, bytes) or len(raw) < 8:
        return {}
    try:
        text = zlib.decompress(raw[4:], 16 + zlib.MAX_WBITS).decode("latin1")
    except zlib.error:
        return {}
    return {m.group(1): m.group(2) for m in re.finditer(r'^(\w+)\s+"([^"]*)"', text, re.M)}


# --------------------------------------------------------------------------- enhanced MR lookup
def _items(ds, seq_kw: str) -> list:
    seq = getattr(ds, seq_kw, None) if seq_kw in ds else None
    return list(seq) if seq else []


def _fg_find(ds, keyword: str, frame: int = 0) -> Any:
    """First value of ``keyword`` in the shared group, then per-frame item ``frame``.

    Searches the standard macro sequences first, then (for Philips, which
    repeats many values in private nested items) any nested item.
    """
    groups = _items(ds, "SharedFunctionalGroupsSequence")[:1]
    pf = _items(ds, "PerFrameFunctionalGroupsSequence")
    if pf:
        groups.append(pf[min(frame, len(pf) - 1)])
    for private in (False, True):
        for g in groups:
            v = _deep_find(g, keyword, private, depth=0)
            if v is not None:
                return v
    return None


def _deep_find(item, keyword: str, private: bool, depth: int) -> Any:
    if depth > 3:
        return None
    if depth > 0 and keyword in item:
        v = item[keyword].value
        if v is not None and v != "":
            return v
    for el in item:
        if el.VR == "SQ" and el.value and (private or not el.tag.is_private):
            for sub in el.value[:1]:
                v = _deep_find(sub, keyword, private, depth + 1)
                if v is not None:
                    return v
    return None


# --------------------------------------------------------------------------- per-series extraction
def _is_enhanced(ds) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def _get(ds, keyword: str, enhanced: bool) -> Any:
    """Functional groups first for enhanced files (their top level may hold -1)."""
    if enhanced:
        v = _fg_find(ds, keyword)
        if v is not None:
            return v
    v = ds.get(keyword)
    if v is None or v == "":
        return None
    if enhanced and _num(v) is not None and _num(v) < 0:
        return None
    return v


def _frame_values(ds, enhanced: bool) -> Iterable[tuple[Any, Any, Any]]:
    """(echo time ms, image position, orientation) for each frame of one file."""
    if not enhanced:
        yield ds.get("EchoTime"), ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        return
    shared = _items(ds, "SharedFunctionalGroupsSequence")[:1]
    for fr in _items(ds, "PerFrameFunctionalGroupsSequence") or [None]:
        def find(seq_kw, kw):
            for g in ([fr] if fr is not None else []) + shared:
                for it in _items(g, seq_kw)[:1]:
                    if kw in it:
                        return it[kw].value
            return None
        yield (find("MREchoSequence", "EffectiveEchoTime"),
               find("PlanePositionSequence", "ImagePositionPatient"),
               find("PlaneOrientationSequence", "ImageOrientationPatient"))


def _tag(keyword: Any) -> int:
    """The tag of a keyword (or a tag already), from our own dictionary when it is there, so a
    header read without pydicom (:mod:`sitebench.qc.dicom_header`) never imports it."""
    if not isinstance(keyword, str):
        return int(keyword) if not isinstance(keyword, tuple) else (keyword[0] << 16) | keyword[1]
    tag = _TAG_CACHE.get(keyword)
    if tag is None:
        try:
            from sitebench.qc.dicom_header import tag_for_keyword

            tag = tag_for_keyword(keyword)
        except ImportError:
            tag = None
        if tag is None:
            from pydicom.tag import Tag

            tag = int(Tag(keyword))
        _TAG_CACHE[keyword] = tag
    return tag


_PHI_TAGS: list[tuple[str, int]] | None = None


def _phi_present(datasets: list) -> list[str]:
    """Names of the PHI attributes with a non-empty value in any file (values never leave here)."""
    global _PHI_TAGS
    if _PHI_TAGS is None:
        _PHI_TAGS = [(kw, _tag(kw)) for kw in PHI_KEYWORDS]
    found = set()
    for ds in datasets:
        for kw, tag in _PHI_TAGS:
            if kw in found:
                continue
            raw = ds.get_item(tag)  # undecoded where possible: cheap, and nothing is converted
            if raw is None:
                continue
            value = getattr(raw, "value", None)
            if isinstance(value, (bytes, bytearray)):
                value = bytes(value).strip(b" \x00\\")
            if value is not None and str(value).strip() not in ("", "[]", "b''"):
                found.add(kw)
    return [k for k in PHI_KEYWORDS if k in found]


#: Per-instance acquisition parameters kept in every file's summary (same keys and units as the
#: series parameters) and compared across the series: a series is acquired with one set of these,
#: so an instance that differs is a deviation (see :func:`instance_spread`). Values that
#: legitimately vary per instance (positions, InstanceNumber, acquisition time, window centre, and
#: EchoTime across echoes of a multi-echo series) are not here or are handled apart.
INSTANCE_KEYS: tuple[str, ...] = (
    "Manufacturer", "ManufacturersModelName", "SoftwareVersions", "MagneticFieldStrength",
    "MRAcquisitionType", "ScanningSequence", "SequenceVariant", "SequenceName", "PulseSequenceName",
    "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle", "SliceThickness", "SpacingBetweenSlices",
    "PixelSpacing", "Rows", "Columns", "AcquisitionMatrix", "PercentPhaseFOV", "PercentSampling",
    "NumberOfAverages", "EchoTrainLength", "PixelBandwidth", "InPlanePhaseEncodingDirectionDICOM",
    "ReceiveCoilName", "ImageType", "SeriesDescription", "ProtocolName",
)

#: Attributes whose DICOM keyword differs from the parameter key they feed.
_SOURCE_KEYWORD = {"ManufacturersModelName": "ManufacturerModelName",
                   "InPlanePhaseEncodingDirectionDICOM": "InPlanePhaseEncodingDirection"}

#: Geometry attributes validated on receipt: (keyword, number of values); PS3.3 C.7.6.2 (Image
#: Plane: IPP, IOP, PixelSpacing, SliceThickness). A file failing these cannot be placed in a volume.
_GEOMETRY = (("ImagePositionPatient", 3), ("ImageOrientationPatient", 6), ("PixelSpacing", 2),
             ("SliceThickness", 1))


def tag_label(keyword: str) -> str:
    """``Keyword (gggg,eeee)`` for problem lines: names the attribute, never its value."""
    try:
        tag = _tag(_SOURCE_KEYWORD.get(keyword, keyword))
    except (ValueError, TypeError, OverflowError, KeyError):
        return keyword
    return f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _safe(fn, *args) -> Any:
    """``fn(*args)``, or None when pydicom raises converting a malformed value (validation mode RAISE)."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - any conversion error means "no usable value"
        return None


_TAG_CACHE: dict[str, int] = {}
_TEXT_VRS = frozenset({"CS", "LO", "SH", "ST", "LT", "UT", "UC"})
_CODECS = {None: "latin1", "": "latin1", "ISO_IR 6": "latin1", "ISO_IR 100": "latin1", "ISO_IR 192": "utf-8"}


def _raw_value(ds, keyword: Any) -> Any:
    """A top-level value straight from its undecoded bytes (numbers as text, as DS/IS store them),
    skipping pydicom's conversion: intake summarises every received file, and converting the
    few dozen values per file through pydicom costs more than the rest of the parse. Falls back
    to pydicom for anything unusual (other VRs, other character sets, already converted)."""
    tag = _TAG_CACHE.get(keyword)  # the keywords asked of every file: no call for the common case
    if tag is None:
        tag = _tag(keyword)
    element = ds.get_item(tag)
    if element is None:
        return None
    if not getattr(element, "is_raw", False):  # converted already (pydicom's, or dicom_header's)
        return element.value
    from pydicom.datadict import dictionary_VR

    raw = element.value
    if raw is None:
        return None
    vr = element.VR or dictionary_VR(tag)
    if vr in ("DS", "IS") or vr in _TEXT_VRS:
        codec = "latin1"
        if vr in _TEXT_VRS:
            charset = _raw_value(ds, "SpecificCharacterSet") if keyword != "SpecificCharacterSet" else None
            charset = charset if isinstance(charset, str) or charset is None else "?"
            codec = _CODECS.get(charset)  # type: ignore[assignment]
            if codec is None:
                return ds.get(tag).value if tag in ds else None
        parts = [p.strip(" \x00") for p in bytes(raw).decode(codec, "replace").split("\\")]
        if not any(parts):
            return None
        return parts[0] if len(parts) == 1 else parts
    if vr in ("US", "SS") and len(raw) in (2, 4):
        return struct.unpack(("<" if element.is_little_endian else ">") + ("H" if vr == "US" else "h"), raw[:2])[0]
    return ds[tag].value


def _private_fast(ds, group: int, creator: str, elem: int) -> Any:
    """:func:`_private` by direct lookup of the creator's block (pydicom's private_block slices the
    whole dataset, which costs more than the rest of a file's summary)."""
    wanted = creator.encode()
    for block in range(0x10, 0x100):
        found = _raw_value(ds, (group << 16) | block)
        if found is None:
            continue
        name = found if isinstance(found, str) else found[0] if isinstance(found, list) else str(found)
        if name.encode("latin1", "replace").strip(b" \x00") == wanted:
            return _raw_value(ds, (group << 16) | (block << 8) | elem)
    return None


def _fast_get(ds, keyword: str, enh: bool) -> Any:
    """:func:`_get` through :func:`_raw_value` for classic files (functional groups stay pydicom's)."""
    if enh:
        return _get(ds, keyword, enh)
    value = _raw_value(ds, keyword)
    return None if value == "" else value


def _present(ds, keyword: str) -> bool:
    """Whether ``keyword`` is in ``ds`` with a non-empty value, looked at without converting it."""
    element = _safe(ds.get_item, keyword)
    value = getattr(element, "value", None)
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).strip(b" \x00\\")
    return value not in (None, "", b"")


def _vendor(manufacturer: Any) -> str | None:
    """The BIDS ``Manufacturer``: dcm2niix's spelling of what the scanner wrote."""
    manu = _text(manufacturer) or ""
    return next((name for k, name in _MANUFACTURERS if manu.upper().startswith(k)), manu or None)


def vendor_group(manufacturer: Any) -> str | None:
    """The vendor a scanner's statistics are grouped under (``Vendor``): Toshiba with Canon,
    Hitachi with Fujifilm; every other manufacturer is its own group."""
    name = _vendor(manufacturer)
    return _VENDOR_GROUPS.get(name, name) if name else None


_MODULE_CACHE: dict[str, Any] = {}


def _vendor_module(vendor: str | None) -> Any:
    """The vendor module (``file_fields``, ``series_fields``, ``PER_FILE_TAGS``) for a vendor group, or None."""
    name = _VENDOR_MODULES.get(_VENDOR_GROUPS.get(vendor, vendor) if vendor else "")
    if name is None:
        return None
    if name not in _MODULE_CACHE:
        import importlib

        try:
            _MODULE_CACHE[name] = importlib.import_module(f"sitebench.qc.{name}")
        except ImportError:
            _MODULE_CACHE[name] = None
    return _MODULE_CACHE[name]


def vendor_per_file_tags() -> tuple:
    """Every tag any vendor module reads from each file (read_series adds them to its partial reads)."""
    tags: list = []
    for vendor in _VENDOR_MODULES:
        module = _vendor_module(vendor)
        tags += list(getattr(module, "PER_FILE_TAGS", ()) or ())
    return tuple(dict.fromkeys(tags))


def _image_type(raw: Any) -> list[str]:
    """ImageType values split at underscores too, as dcm2niix does ("ECHO_00" -> "ECHO", "00")."""
    raw = [] if raw is None else [raw] if isinstance(raw, str) else list(raw)
    return [part for x in raw for part in str(x).split("_") if part]


def _numeric(ds, keyword: str, enh: bool, invalid: list[str], many: bool = False) -> Any:
    """A DS/IS value as a number (or list), recording ``keyword`` in ``invalid`` when it is present
    but not a finite number; the value itself never leaves here."""
    raw = _safe(_fast_get, ds, keyword, enh)
    if raw is None or raw == "":
        if not enh and _present(ds, keyword):  # present, but pydicom refused to convert it
            invalid.append(keyword)
        return None
    value = _nums(raw) if many else _num(raw)
    if value is None and keyword not in invalid:
        invalid.append(keyword)
    return value


def _instance_parameters(ds, enh: bool, te: Any, invalid: list[str]) -> dict[str, Any]:
    """This file's value of each :data:`INSTANCE_KEYS` parameter, normalised as the series' are."""
    p: dict[str, Any] = {}

    def put(key, value):
        if value is not None and value != [] and value != "":
            p[key] = value

    text = lambda kw: _text(_safe(_fast_get, ds, kw, enh))  # noqa: E731
    vendor = _vendor(_safe(_raw_value, ds, "Manufacturer"))
    put("Manufacturer", vendor)
    put("ManufacturersModelName", _text(_safe(_raw_value, ds, "ManufacturerModelName")))
    put("SoftwareVersions", _text(_safe(_raw_value, ds, "SoftwareVersions")))
    put("MagneticFieldStrength", _numeric(ds, "MagneticFieldStrength", False, invalid))
    put("MRAcquisitionType", text("MRAcquisitionType"))
    put("ScanningSequence", _text(_safe(_raw_value, ds, "ScanningSequence")) or text("ScanningSequence"))
    put("SequenceVariant", _text(_safe(_raw_value, ds, "SequenceVariant")) or text("SequenceVariant"))
    sequence_name = _text(_safe(_raw_value, ds, "SequenceName"))
    psn = _text(_safe(_raw_value, ds, "PulseSequenceName")) or (_text(_safe(_fg_find, ds, "PulseSequenceName")) if enh else None)
    if vendor == "GE":
        psn = _text(_safe(_private_fast, ds, 0x0019, "GEMS_ACQU_01", 0x9C)) or psn
    elif sequence_name is None or sequence_name == psn:  # as the series does (see _series_parameters)
        sequence_name, psn = sequence_name or psn, None
    put("SequenceName", sequence_name)
    put("PulseSequenceName", psn)
    tr = _numeric(ds, "RepetitionTime", enh, invalid)
    put("RepetitionTime", None if tr is None else _num(round(tr / 1000.0, 9)))
    if not enh and _num(te) is not None and _num(te) >= 0:
        put("EchoTime", _num(round(float(te) / 1000.0, 9)))
    ti = _numeric(ds, "InversionTime", enh, invalid)
    put("InversionTime", None if ti is None else _num(round(ti / 1000.0, 9)))
    put("FlipAngle", _numeric(ds, "FlipAngle", enh, invalid))
    put("SliceThickness", _numeric(ds, "SliceThickness", enh, invalid))
    put("SpacingBetweenSlices", _numeric(ds, "SpacingBetweenSlices", enh, invalid))
    put("PixelSpacing", _numeric(ds, "PixelSpacing", enh, invalid, many=True))
    image_type = _image_type(_safe(_raw_value, ds, "ImageType"))
    if "MOSAIC" not in image_type:  # mosaic tiles: the series divides Rows/Columns by the tile count
        put("Rows", _num(_safe(_raw_value, ds, "Rows")))
        put("Columns", _num(_safe(_raw_value, ds, "Columns")))
    put("AcquisitionMatrix", _numeric(ds, "AcquisitionMatrix", enh, invalid, many=True))
    put("PercentPhaseFOV", _numeric(ds, "PercentPhaseFieldOfView", enh, invalid))
    put("PercentSampling", _numeric(ds, "PercentSampling", enh, invalid))
    put("NumberOfAverages", _numeric(ds, "NumberOfAverages", enh, invalid))
    put("EchoTrainLength", _numeric(ds, "EchoTrainLength", enh, invalid))
    put("PixelBandwidth", _numeric(ds, "PixelBandwidth", enh, invalid))
    ped = {"COLUMN": "COL", "COL": "COL", "ROW": "ROW"}.get((text("InPlanePhaseEncodingDirection") or "").upper())
    put("InPlanePhaseEncodingDirectionDICOM", ped)
    put("ReceiveCoilName", text("ReceiveCoilName"))
    put("ImageType", image_type or None)
    put("SeriesDescription", text("SeriesDescription"))
    put("ProtocolName", text("ProtocolName"))
    return p


def _geometry(value: Any, keyword: str, n: int) -> tuple[list[float] | None, str | None]:
    """(values, why damaged): ``n`` finite numbers, positive for spacing and thickness, unit and
    orthogonal direction cosines for the orientation. Absent is (None, None): not damage."""
    if value is None or value == "":
        return None, None
    try:
        items = list(value) if isinstance(value, (list, tuple)) or (
            hasattr(value, "__iter__") and not isinstance(value, (str, bytes))) else [value]
        numbers = [float(x) for x in items]
    except (TypeError, ValueError, OverflowError):
        return None, f"needs {n} numbers, has a value that is not a number"
    if len(numbers) != n:
        return None, f"needs {n} values, has {len(numbers)}"
    if not all(math.isfinite(x) for x in numbers):
        return None, "has a value that is not a finite number"
    if keyword in ("PixelSpacing", "SliceThickness") and not all(x > 0 for x in numbers):
        return None, "must be positive"
    if keyword == "ImageOrientationPatient":
        r, c = numbers[:3], numbers[3:]
        norms = [math.sqrt(sum(x * x for x in v)) for v in (r, c)]
        if any(abs(norm - 1.0) > 0.02 for norm in norms) or abs(sum(a * b for a, b in zip(r, c))) > 0.02:
            return None, "is not a pair of orthogonal unit vectors"
    return numbers, None


def _instance_fields(ds, invalid: list[str]) -> dict[str, int | None]:
    """What completeness needs from each file: InstanceNumber, AcquisitionNumber (PS3.3 C.7.6.1
    General Image), EchoNumbers (C.8.3.1 MR Image), ImagesInAcquisition (C.7.6.1) and
    NumberOfSeriesRelatedInstances (0020,1209), a PS3.4 C.3.4 query/retrieve count some senders copy
    into the files."""
    out: dict[str, int | None] = {}
    for keyword in ("InstanceNumber", "AcquisitionNumber", "EchoNumbers", "ImagesInAcquisition",
                    "NumberOfSeriesRelatedInstances"):
        raw = _safe(_raw_value, ds, keyword)
        if raw is None or raw == "":
            if _present(ds, keyword):
                invalid.append(keyword)
            out[keyword] = None
            continue
        if not isinstance(raw, (str, bytes)) and hasattr(raw, "__iter__"):  # multi-valued: the first
            items = list(raw)
            raw = items[0] if items else None
        value = _num(raw)
        if not isinstance(value, int):
            invalid.append(keyword)
            value = None
        out[keyword] = value
    return out


def file_summary(ds) -> dict[str, Any]:
    """What a series' parameters need from every file beyond the first, kept from the one header
    parse intake does on receipt (JSON-able):

    * ``frames``: per frame [echo time ms, position, orientation]; a damaged position or
      orientation is None there and named in ``geometry``;
    * ``phi``: names of PHI attributes present;
    * ``acq``: this instance's :data:`INSTANCE_KEYS` parameters (so the check compares every
      instance without reading the files again);
    * ``instance``: InstanceNumber, AcquisitionNumber, EchoNumbers, ImagesInAcquisition,
      NumberOfSeriesRelatedInstances (:func:`series_completeness` works from these alone);
    * ``geometry``: "Keyword (gggg,eeee) why" per damaged geometry attribute;
    * ``invalid``: keywords whose DS/IS value is present but not a finite number;
    * ``vendor``: what the vendor module needs from every file (slice timing, diffusion), when any.
    """
    enh = bool(_safe(_is_enhanced, ds))
    invalid: list[str] = []
    geometry: list[str] = []

    def valid(value, keyword, n, where=""):
        numbers, why = _geometry(value, keyword, n)
        if why:
            line = f"{tag_label(keyword)}{where} {why}"
            if line not in geometry:
                geometry.append(line)
        return numbers

    if enh:
        raw_frames = _safe(lambda: list(_frame_values(ds, enh))) or [(None, None, None)]
    else:  # undecoded, then validated below: cheaper than pydicom's conversion, and never raises
        raw_frames = [tuple(_safe(_raw_value, ds, kw) for kw in ("EchoTime", "ImagePositionPatient",
                                                                 "ImageOrientationPatient"))]
    frames = []
    for index, (te, ipp, ori) in enumerate(raw_frames):
        where = f" of frame {index + 1}" if len(raw_frames) > 1 else ""
        frames.append([None if _num(te) is None else float(te), valid(ipp, "ImagePositionPatient", 3, where),
                       valid(ori, "ImageOrientationPatient", 6, where)])
    for keyword, n in _GEOMETRY[2:]:
        valid(_safe(_fast_get, ds, keyword, enh), keyword, n)
    acq = _instance_parameters(ds, enh, raw_frames[0][0], invalid)
    module = _vendor_module(acq.get("Manufacturer"))
    vendor_fields = (_safe(module.file_fields, ds) or {}) if module is not None else {}
    for line in geometry:  # damaged geometry is a file problem, not also a parameter one
        keyword = line.split(" ", 1)[0]
        if keyword in invalid:
            invalid.remove(keyword)
    summary = {"frames": frames, "phi": _phi_present([ds]), "acq": acq,
               "instance": _instance_fields(ds, invalid), "geometry": geometry, "invalid": invalid}
    if vendor_fields:
        summary["vendor"] = vendor_fields
    return summary


#: Parameter key -> the DICOM keyword its value is read from, where they differ (and back).
_KEYWORD_OF = {**_SOURCE_KEYWORD, "PercentPhaseFOV": "PercentPhaseFieldOfView"}
_KEY_OF = {keyword: key for key, keyword in _KEYWORD_OF.items()}
_NONE = object()


class Spread(_Record):
    """How one per-instance parameter is spread over a series' instances.

    ``groups``: (value, instance labels) largest group first; ``unreadable``: instances whose
    value is present but not a number; ``missing``: instances without it while others have it;
    ``within``: "echo 2" when compared within one echo of a multi-echo series.
    Labels are InstanceNumbers, or "file k" for an instance without a usable one.
    """

    _FIELDS = (("key", _REQUIRED), ("groups", list), ("unreadable", list), ("missing", list), ("within", ""))
    key: str
    groups: list[tuple[Any, list]]
    unreadable: list
    missing: list
    within: str

    @property
    def n(self) -> int:
        return sum(len(labels) for _, labels in self.groups) + len(self.unreadable) + len(self.missing)


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def instance_label(summary: dict[str, Any], index: int) -> int | str:
    """An instance's InstanceNumber (PS3.3 C.7.6.1), or "file k" (k = its place in the series)."""
    number = (summary.get("instance") or {}).get("InstanceNumber")
    return number if isinstance(number, int) else f"file {index + 1}"


def is_multi_echo(summaries: list[dict[str, Any]]) -> bool:
    """Several EchoNumbers (PS3.3 C.8.3.1) among the instances: EchoTime varies by design."""
    return len({(s.get("instance") or {}).get("EchoNumbers") for s in summaries} - {None}) > 1


def instance_spread(summaries: list[dict[str, Any]], multi_echo: bool | None = None) -> list[Spread]:
    """Every :data:`INSTANCE_KEYS` parameter that is not one value over all instances.

    Summaries from before per-instance parameters were kept (no ``acq``) are left out. In a
    multi-echo series (``multi_echo``; by default: several EchoNumbers) EchoTime is compared
    within each echo number and ImageType not at all.
    """
    indexed = [(i, s) for i, s in enumerate(summaries) if s and isinstance(s.get("acq"), dict)]
    if len(indexed) < 2:
        return []
    if multi_echo is None:
        multi_echo = is_multi_echo([s for _, s in indexed])
    # most series are one value everywhere: find the keys that differ from the first instance at
    # dict-comparison speed, and group instances only for those (keeps a 196-file check ~1 ms)
    reference = indexed[0][1]["acq"]
    differing: set[str] = set()
    for _, s in indexed:
        acq = s["acq"]
        if acq != reference:
            differing.update(k for k in reference.keys() | acq.keys() if reference.get(k, _NONE) != acq.get(k, _NONE))
        for keyword in s.get("invalid") or ():
            differing.add(_KEY_OF.get(keyword, keyword))
    if not differing:
        return []
    labels = {i: instance_label(s, i) for i, s in indexed}
    out: list[Spread] = []
    for key in INSTANCE_KEYS:
        if key not in differing or (multi_echo and key == "ImageType"):
            continue
        if multi_echo and key == "EchoTime":
            by_echo: dict[Any, list] = defaultdict(list)
            for i, s in indexed:
                by_echo[(s.get("instance") or {}).get("EchoNumbers")].append((i, s))
            partitions = [(f"echo {e}" if e is not None else "no echo number", members)
                          for e, members in sorted(by_echo.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))]
        else:
            partitions = [("", indexed)]
        keyword = _KEYWORD_OF.get(key, key)
        for within, members in partitions:
            groups: dict[Any, tuple[Any, list]] = {}
            spread = Spread(key, within=within)
            for i, s in members:
                acq = s["acq"]
                if key in acq:
                    groups.setdefault(_freeze(acq[key]), (acq[key], []))[1].append(labels[i])
                elif keyword in (s.get("invalid") or ()):
                    spread.unreadable.append(labels[i])
                else:
                    spread.missing.append(labels[i])
            if not groups or (len(groups) == 1 and not spread.unreadable and not spread.missing):
                continue  # one value everywhere, or absent everywhere: the series-level check covers it
            spread.groups = sorted(groups.values(), key=lambda g: -len(g[1]))  # stable: first seen wins ties
            out.append(spread)
    return out


def _series_parameters(datasets: list, summaries: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Parameters from the first file's full header plus every file's :func:`file_summary`."""
    ds = datasets[0]
    if summaries is None:
        summaries = [file_summary(d) for d in datasets]
    enh = _is_enhanced(ds)
    p: dict[str, Any] = {}

    def put(key, value):
        if value is not None and value != [] and value != "":
            p[key] = value

    vendor = _vendor(ds.get("Manufacturer"))
    put("Manufacturer", vendor)
    put("Vendor", vendor_group(vendor))
    put("ManufacturersModelName", _text(ds.get("ManufacturerModelName")))
    put("SoftwareVersions", _text(ds.get("SoftwareVersions")))
    put("MagneticFieldStrength", _num(ds.get("MagneticFieldStrength")))

    # Siemens: CSA image header + ASCCONV protocol (V-series 0029,1020; XA 0021,1019)
    csa: dict[str, list[str]] = {}
    asc: dict[str, str] = {}
    if vendor == "Siemens":
        csa = _csa_tags(_private(ds, 0x0029, "SIEMENS CSA HEADER", 0x10))
        asc = _ascconv(_private(ds, 0x0029, "SIEMENS CSA HEADER", 0x20))
        if not asc:
            for g in _items(ds, "SharedFunctionalGroupsSequence")[:1]:
                for el in g:
                    if el.VR == "SQ" and el.tag.group == 0x0021 and el.value:
                        asc = _ascconv(_private(el.value[0], 0x0021, "SIEMENS MR SDS 01", 0x19))
            if not asc:
                asc = _ascconv(_private(ds, 0x0021, "SIEMENS MR SDS 01", 0x19))

    coil = _get(ds, "ReceiveCoilName", enh)
    if coil is None and asc:
        coil = next((v for k, v in asc.items() if re.fullmatch(
            r"(?:sCoilSelectMeas\.aRxCoilSelectData\[0\]|asCoilSelectMeas\[0\])"
            r"\.asList\[0\]\.sCoilElementID\.tCoilID", k)), None)
    put("ReceiveCoilName", _text(coil))
    acq_type = _text(_get(ds, "MRAcquisitionType", enh))
    put("MRAcquisitionType", acq_type)
    # top level first: Philips repeats per-frame variants in private items
    scan_seq = ds.get("ScanningSequence") or _get(ds, "ScanningSequence", enh)
    variant = ds.get("SequenceVariant") or _get(ds, "SequenceVariant", enh)
    if vendor == "Siemens" and enh and scan_seq is None:  # XA: private (0021,105A/105B)
        for g in _items(ds, "SharedFunctionalGroupsSequence")[:1]:
            for el in g:
                if el.VR == "SQ" and el.tag.group == 0x0021 and el.value:
                    scan_seq = _private(el.value[0], 0x0021, "SIEMENS MR SDS 01", 0x5A)
                    variant = variant or _private(el.value[0], 0x0021, "SIEMENS MR SDS 01", 0x5B)
    put("ScanningSequence", _text(scan_seq))
    put("SequenceVariant", _text(variant))
    # SequenceName (0018,0024) of classic files is PulseSequenceName (0018,9005) in enhanced ones
    # (PS3.3 C.8.13.1): one BIDS SequenceName either way, as dcm2niix writes since 2024, so one
    # acquisition keeps one key whatever its format. GE's PulseSequenceName is its own thing: the
    # pulse-sequence (psd) name in private (0019,109C).
    sequence_name = _text(ds.get("SequenceName"))
    psn = _text(ds.get("PulseSequenceName")) or (_text(_fg_find(ds, "PulseSequenceName")) if enh else None)
    if vendor == "GE":
        psn = _text(_private(ds, 0x0019, "GEMS_ACQU_01", 0x9C)) or psn
    elif sequence_name is None or sequence_name == psn:
        sequence_name, psn = sequence_name or psn, None
    put("SequenceName", sequence_name)
    put("PulseSequenceName", psn)

    tr = _num(_get(ds, "RepetitionTime", enh))
    put("RepetitionTime", None if tr is None else _num(round(tr / 1000.0, 9)))
    ti = _num(_get(ds, "InversionTime", enh))
    if ti is None:
        tis = _get(ds, "InversionTimes", enh)  # XA (0018,9079)
        ti = _num(tis[0] if isinstance(tis, (list, tuple)) or hasattr(tis, "__getitem__") and not isinstance(tis, str) else tis) if tis is not None else None
    put("InversionTime", None if ti is None else _num(round(ti / 1000.0, 9)))
    put("FlipAngle", _num(_get(ds, "FlipAngle", enh)))

    # echo times and slice geometry over every file and frame
    echoes, positions, iop = set(), [], None
    damaged_placement = any(line.startswith(("ImagePositionPatient", "ImageOrientationPatient"))
                            for summary in summaries for line in summary.get("geometry") or ())
    for summary in summaries:
        for te, ipp, ori in summary["frames"]:
            if _num(te) is not None and _num(te) >= 0:
                echoes.add(round(float(te) / 1000.0, 9))
            if ipp is not None:
                positions.append([float(x) for x in ipp])
            if iop is None and ori is not None:
                iop = [float(x) for x in ori]
    if not echoes and enh:
        te = _num(ds.get("EchoTime"))
        if te is not None and te >= 0:
            echoes.add(round(te / 1000.0, 9))
    if len(echoes) > 1:  # TE 0 marks a computed frame (a field map in Hz), not an echo: dcm2niix
        echoes.discard(0.0)  # writes no EchoTime for it
    if echoes:
        ets = sorted(echoes)
        put("EchoTime", _num(ets[0]) if len(ets) == 1 else [_num(e) for e in ets])

    thick = _num(_get(ds, "SliceThickness", enh))
    put("SliceThickness", thick)
    spacing = _num(_get(ds, "SpacingBetweenSlices", enh))
    put("SpacingBetweenSlices", spacing)
    put("PixelSpacing", _nums(_get(ds, "PixelSpacing", enh)))
    if iop is None:
        iop = _nums(_get(ds, "ImageOrientationPatient", enh))
    put("ImageOrientationPatientDICOM", [_num(x) for x in iop] if iop else None)

    # in-plane geometry and phase encoding
    ped = _text(_get(ds, "InPlanePhaseEncodingDirection", enh))
    ped = {"COLUMN": "COL", "COL": "COL", "ROW": "ROW"}.get((ped or "").upper())
    put("InPlanePhaseEncodingDirectionDICOM", ped)
    rows, cols = _num(ds.get("Rows")), _num(ds.get("Columns"))
    image_type = _image_type(ds.get("ImageType") or [])
    n_mosaic = None
    if "MOSAIC" in image_type and rows and cols:
        n_mosaic = _num(_private(ds, 0x0019, "SIEMENS MR HEADER", 0x0A))
        if n_mosaic is None and csa.get("NumberOfImagesInMosaic"):
            n_mosaic = _num(csa["NumberOfImagesInMosaic"][0])
        if n_mosaic:
            tiles = math.ceil(math.sqrt(n_mosaic))
            rows, cols = rows // tiles, cols // tiles
    put("Rows", rows)
    put("Columns", cols)
    acq = _nums(_get(ds, "AcquisitionMatrix", enh))
    put("AcquisitionMatrix", acq)
    pe_steps = _num(_get(ds, "MRAcquisitionPhaseEncodingStepsInPlane", enh)) if enh else None
    if pe_steps is None and acq and len(acq) == 4:
        pe_steps = (acq[2] or acq[3]) if ped == "COL" else (acq[3] or acq[2]) if ped == "ROW" else None
    put("AcquisitionMatrixPE", pe_steps or None)
    if ped:
        put("ReconMatrixPE", rows if ped == "COL" else cols)
    put("PercentPhaseFOV", _num(_get(ds, "PercentPhaseFieldOfView", enh)))
    put("PercentSampling", _num(_get(ds, "PercentSampling", enh)))
    put("NumberOfAverages", _num(_get(ds, "NumberOfAverages", enh)))
    put("EchoTrainLength", _num(_get(ds, "EchoTrainLength", enh)))
    put("PixelBandwidth", _num(_get(ds, "PixelBandwidth", enh)))

    # phase-encoding polarity -> BIDS PhaseEncodingDirection (dcm2niix axes:
    # NIfTI i = DICOM column index, j = row index flipped, so COL flips sign)
    positive = None
    if vendor == "Siemens":
        if csa.get("PhaseEncodingDirectionPositive"):
            positive = _num(csa["PhaseEncodingDirectionPositive"][0])
        elif enh:
            for fr in _items(ds, "PerFrameFunctionalGroupsSequence")[:1]:
                for el in fr:
                    if el.VR == "SQ" and el.tag.group == 0x0021 and el.value:
                        positive = _num(_private(el.value[0], 0x0021, "SIEMENS MR SDI 02", 0x1C))
    elif vendor == "GE":
        view = _ge_protocol_block(ds).get("VIEWORDER")
        if view in ("0", "1"):
            positive = 1 if view == "0" else 0  # 0 = "Unflipped" (bottom-up)
    if ped and positive in (0, 1) and acq_type != "3D":
        axis = "j" if ped == "COL" else "i"
        negative = (positive == 1) if ped == "COL" else (positive == 0)
        put("PhaseEncodingDirection", axis + ("-" if negative else ""))

    # acceleration
    prf = _num(_get(ds, "ParallelReductionFactorInPlane", enh))
    if prf is None and asc:
        prf = _asc_num(asc, "sPat.lAccelFactPE")
    if prf is None and vendor == "GE":
        asset = _private(ds, 0x0043, "GEMS_PARM_01", 0x83)
        asset = _nums(asset if not isinstance(asset, (str, bytes)) else str(asset).split("\\"))
        if asset and asset[0] and asset[0] > 0:
            prf = _num(round(1.0 / asset[0], 5))
    put("ParallelReductionFactorInPlane", prf)
    mb = None
    if asc:
        if "cmrr" in asc.get("tSequenceFileName", "").lower():  # CMRR C2P keeps MB in a WIP field
            mb = _asc_num(asc, "sWipMemBlock.alFree[13]")
        mb = mb or _asc_num(asc, "sSliceAcceleration.lMultiBandFactor")
    put("MultibandAccelerationFactor", mb)
    put("ImageType", image_type or None)
    # what protocols match on (dcm2niix reports both); operational labels, not identifiers
    put("SeriesDescription", _text(_get(ds, "SeriesDescription", enh)))
    put("ProtocolName", _text(_get(ds, "ProtocolName", enh)))

    # slices and coverage along the slice normal
    n_slices, coverage, max_step = None, None, None
    if n_mosaic:
        n_slices = n_mosaic
        step = spacing if spacing else thick
        if step is not None and thick is not None:
            coverage = (n_slices - 1) * step + thick
    elif damaged_placement:
        pass  # a file's position or orientation is damaged: slices and coverage stay unknown
    elif positions and iop and len(iop) == 6:
        r, c = iop[:3], iop[3:]
        normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
        proj = sorted({round(sum(a * b for a, b in zip(pos, normal)), 2) for pos in positions})
        n_slices = len(proj)
        coverage = proj[-1] - proj[0] + (thick or 0.0)
        if n_slices > 1:  # the widest step between neighbouring slices: a missing slice shows here
            max_step = max(b - a for a, b in zip(proj, proj[1:]))
    put("NumberOfSlices", n_slices)
    put("SliceCoverageMM", None if coverage is None else _num(round(coverage, 4)))
    put("MaxSliceStepMM", None if max_step is None else _num(round(max_step, 4)))

    # what only the vendor's private tags hold (slice timing, multiband, polarity, diffusion, ...)
    module = _vendor_module(vendor)
    if module is not None:
        extra = _safe(module.series_fields, ds, [s.get("vendor") or {} for s in summaries]) or {}
        for key, value in extra.items():
            if value is None or value == [] or value == "":
                p.pop(key, None)
            else:
                p[key] = value
    _derived(p)
    return p


def _derived(p: dict[str, Any]) -> None:
    """Keys protocols compare that follow from others: slice order, diffusion shells and directions."""
    try:
        from sitebench.qc.acquisition_scheme import derived_keys
    except ImportError:
        return
    for key, value in (_safe(derived_keys, p) or {}).items():
        if value is not None:
            p[key] = value


def _trial_coding(ds) -> dict[str, str]:
    """ClinicalTrialSubjectID and ClinicalTrialTimePointID of a series' first file ('' where absent)."""
    return {"trial_subject": (_text(ds.get("ClinicalTrialSubjectID")) or "").strip(),
            "trial_timepoint": (_text(ds.get("ClinicalTrialTimePointID")) or "").strip()}


# --------------------------------------------------------------------------- public entry points
def series_from_summaries(files: list[Path], summaries: list[dict[str, Any]]) -> SeriesParameters:
    """One series from its files' :func:`file_summary` records: only the first file is read again.

    This is the intake path: every header was parsed once on receipt, so the verdict after
    the series completes costs one header read, not one per file.
    """
    import pydicom

    first = pydicom.dcmread(files[0], stop_before_pixels=True, force=False)
    params = _series_parameters([first], summaries)
    phi = sorted({name for s in summaries for name in s["phi"]}, key=PHI_KEYWORDS.index)
    return SeriesParameters(series_uid=str(first.get("SeriesInstanceUID") or ""), files=list(files),
                            parameters=params, missing=[k for k in PARAMETER_KEYS if k not in params],
                            phi_present=phi, study_uid=str(first.get("StudyInstanceUID") or ""),
                            scanner_id=_scanner_id(first), summaries=list(summaries), **_trial_coding(first))



#: Tags read from every file; the first file of each series is read whole (up to the pixels).
PER_FILE_TAGS: tuple[str, ...] = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "EchoTime",
    "ImagePositionPatient", "ImageOrientationPatient", "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence", *PHI_KEYWORDS,
)
_READ_ERRORS = (OSError, EOFError, ValueError, TypeError, KeyError, AttributeError, IndexError,
                struct.error)
#: Fewest files a worker process is started for (below it, starting one costs more than it saves).
_FILES_PER_WORKER = 64


def _scanner_id(ds) -> str | None:
    """A stable pseudonym of the physical scanner: serial numbers and station names are PHI-profile."""
    ident = _text(ds.get("DeviceSerialNumber")) or _text(ds.get("StationName"))
    return None if not ident else "scanner-" + _sha256_hex(ident.encode())[:12]


def _sha256_hex(data: bytes) -> str:
    """SHA-256 (FIPS 180-4) from CPython's built-in implementation, the one hashlib itself falls back to
    without OpenSSL: loading OpenSSL for hashlib costs `qc inspect` 3.5 MiB, a quarter of its memory.
    The digest is the same (tests/test_qc_dicom_params.py checks it against hashlib)."""
    try:
        from _sha2 import sha256  # CPython >= 3.12
    except ImportError:
        try:
            from _sha256 import sha256  # type: ignore[no-redef]  # CPython 3.10, 3.11
        except ImportError:  # another interpreter
            from hashlib import sha256  # type: ignore[no-redef]
    return sha256(data).hexdigest()


def dicom_files(path: str | Path | Iterable[str | Path]) -> list[Path]:
    """Every file under a folder (recursive), a single file, or an explicit list of files.

    A folder's files come in ``sorted(root.rglob("*"))`` order (path parts compared in turn, as
    :class:`~pathlib.Path` sorts), found with :func:`os.scandir`: its entries know their type, so
    the walk needs no stat a file, and a 700-file series is listed in a quarter of rglob's time."""
    if isinstance(path, (str, Path)):
        root = Path(path)
        if not root.exists():
            raise SitebenchError("no such file or folder", root)
        if root.is_file():
            return [root]
        found: list[str] = []
        _walk_files(str(root), found)
        return [Path(f) for f in sorted(found, key=lambda f: f.split(os.sep))]
    return [Path(f) for f in path]


def _walk_files(folder: str, found: list[str]) -> None:
    """Files under ``folder`` as rglob finds them: links to files are followed, links to folders are
    not descended into (so no loop), an unreadable folder is skipped."""
    try:
        with os.scandir(folder) as entries:
            listed = list(entries)
    except OSError:
        return
    for entry in listed:
        try:
            if entry.is_file():
                found.append(entry.path)
            elif entry.is_dir() and not entry.is_symlink():
                _walk_files(entry.path, found)
        except OSError:
            continue


def _pydicom_reader():
    """(read(path, tags or None), errors) through pydicom: tags None reads the whole header."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    def read(f, tags):
        if tags is None:
            return pydicom.dcmread(f, stop_before_pixels=True, force=False)
        return pydicom.dcmread(f, specific_tags=tags, force=False)
    return read, (InvalidDicomError, *_READ_ERRORS)


def _header_reader():
    """The same through :mod:`sitebench.qc.dicom_header` (no pydicom, no numpy), or None if absent."""
    try:
        from sitebench.qc.dicom_header import HeaderError, read_header
    except ImportError:
        return None

    def read(f, tags):
        return read_header(f, specific_tags=tags, stop_before_pixels=True)
    return read, (HeaderError, *_READ_ERRORS)


def _read_partial(f: Path, read, errors, tags: list[int]) -> tuple[str, Any] | None:
    """(SeriesInstanceUID, data set of ``tags``) of one file; None where it is not DICOM or has no series."""
    try:
        ds = read(f, tags)
    except errors:
        return None
    uid = str(ds.get("SeriesInstanceUID") or "")
    return (uid, ds) if uid else None


def _read_whole(f: Path, read, errors, partial: Any) -> Any:
    try:
        return read(f, None)
    except errors:
        return partial  # keep the partial read: the integrity check names the file


def _summaries_in_workers(files: list[Path], read, errors, tags: list[int], workers: int) -> list | None:
    """Every file's (SeriesInstanceUID, enhanced, :func:`file_summary`), or None where it is skipped,
    read in ``workers`` forked processes over contiguous slices (this one reads the first slice).

    Why: reading a series' headers is CPU-bound Python, one file at a time, and a large series on a
    many-core machine waits on one core. A worker reads each file as :func:`read_series` reads one
    that is not the first of its series (partially, or whole when the file is enhanced); the caller
    reads the first of each series itself and any file whose series' first disagrees on being
    enhanced, so the result is exactly the one-process result. A worker that fails (or a platform
    without fork, or a process that already runs threads, where forking is unsafe) costs only speed:
    its slice is read here. Summaries come back through a pipe in :mod:`marshal` (they are plain data).
    """
    import marshal

    threading = sys.modules.get("threading")
    workers = min(workers, len(files) // _FILES_PER_WORKER)
    if workers < 2 or not hasattr(os, "fork") or (threading is not None and threading.active_count() > 1):
        return None

    def summarise(chunk: list[Path]) -> list:
        out: list = []
        for f in chunk:
            found = _read_partial(f, read, errors, tags)
            if found is None:
                out.append(None)
                continue
            uid, ds = found
            enhanced = _is_enhanced(ds)
            if enhanced:
                ds = _read_whole(f, read, errors, ds)
            out.append((uid, enhanced, file_summary(ds)))
        return out

    size = -(-len(files) // workers)
    chunks = [files[i:i + size] for i in range(0, len(files), size)]
    sys.stdout.flush()
    sys.stderr.flush()
    children: list[tuple[int, int]] = []
    try:
        for chunk in chunks[1:]:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the worker: never returns into the caller's code
                status = 1
                try:
                    os.close(r)
                    data = marshal.dumps(summarise(chunk))
                    with os.fdopen(w, "wb") as pipe:
                        pipe.write(data)
                    status = 0
                finally:
                    os._exit(status)
            os.close(w)
            children.append((pid, r))
        results = summarise(chunks[0])
        for chunk, (pid, r) in zip(chunks[1:], children):
            with os.fdopen(r, "rb") as pipe:
                data = pipe.read()
            _, status = os.waitpid(pid, 0)
            part = None
            if status == 0:
                try:
                    part = marshal.loads(data)
                except (EOFError, ValueError, TypeError):
                    part = None
            results += part if isinstance(part, list) and len(part) == len(chunk) else summarise(chunk)
        children = []
        return results
    finally:
        for pid, r in children:  # interrupted: no worker outlives the call, no pipe stays open
            for undo in (lambda: os.kill(pid, 9), lambda: os.waitpid(pid, 0), lambda: os.close(r)):
                try:
                    undo()
                except OSError:
                    pass


def read_series(path: str | Path | Iterable[str | Path], reader: str = "auto",
                workers: int = 1) -> list[SeriesParameters]:
    """Read every DICOM file under ``path`` (a file, a folder read recursively, or a list of files).

    Files that are not DICOM are skipped quietly. Returns one
    :class:`SeriesParameters` per SeriesInstanceUID, ordered by first file.
    Raises :class:`SitebenchError` if ``path`` is missing or holds no DICOM.

    Only the tags the parameters need are parsed from every file (echo time, slice position,
    PHI-attribute presence, the vendor module's tags); the first file of a series is read whole,
    and every file of an enhanced multi-frame series is, since its geometry lives in the
    functional groups. ``reader``: "header" (our own deferred reader, :mod:`sitebench.qc.dicom_header`,
    which keeps pydicom and numpy out of the process), "pydicom", or "auto" (the first when present).
    ``workers`` > 1 reads the files in that many processes (see :func:`_summaries_in_workers`); the
    result is the same as with one.
    """
    chosen = _header_reader() if reader in ("auto", "header") else None
    if chosen is None:
        if reader == "header":
            raise SitebenchError("the header reader (sitebench.qc.dicom_header) is not installed", Path(str(path)))
        chosen = _pydicom_reader()
    read, errors = chosen
    files = dicom_files(path)
    per_file_tags = sorted({_tag(k) for k in PER_FILE_TAGS + vendor_per_file_tags()})
    # one pass per file: each header is summarised as it is read and dropped, only a series' first
    # data set is kept (its parameters come from it), so memory stays flat in the series' length
    firsts: dict[str, Any] = {}
    groups: dict[str, list] = defaultdict(list)
    told = _summaries_in_workers(files, read, errors, per_file_tags, workers) if workers > 1 else None
    for index, f in enumerate(files):
        if told is not None:
            result = told[index]
            if result is None:
                continue
            uid, enhanced, summary = result
            if uid in firsts and enhanced == _is_enhanced(firsts[uid]):  # as this loop would have read it
                groups[uid].append((f, summary))
                continue
        found = _read_partial(f, read, errors, per_file_tags)
        if found is None:
            continue
        uid, ds = found
        if uid not in firsts or _is_enhanced(firsts[uid]):
            ds = _read_whole(f, read, errors, ds)
            firsts.setdefault(uid, ds)
        groups[uid].append((f, file_summary(ds)))
        del ds
    if not groups:
        where = path if isinstance(path, (str, Path)) else (files[0].parent if files else Path("."))
        raise SitebenchError("no DICOM files with a SeriesInstanceUID found", where)
    out = []
    for uid, members in groups.items():
        first = firsts[uid]
        summaries = [summary for _, summary in members]
        params = _series_parameters([first], summaries)
        out.append(SeriesParameters(
            series_uid=uid, files=[f for f, _ in members], parameters=params,
            missing=[k for k in PARAMETER_KEYS if k not in params],
            phi_present=sorted({n for s in summaries for n in s["phi"]}, key=PHI_KEYWORDS.index), study_uid=str(first.get("StudyInstanceUID") or ""),
            scanner_id=_scanner_id(first), **_trial_coding(first)))
    return out
