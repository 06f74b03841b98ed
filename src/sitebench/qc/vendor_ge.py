"""GE MR header values that dcm2niix reports and :mod:`sitebench.qc.dicom_params` misses or gets wrong.

Reference implementation: dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56), ``console/nii_dicom.cpp``
(header parsing) and ``console/nii_dicom_batch.cpp`` (sidecar, .bval/.bvec writing), and the stand-alone
``slicetime.cpp`` of the dcm_qa_ge validation set for the HyperBand slice order. This module is our own Python;
every function names the tags it reads and why.

Two entry points (the intake calls both):

* :func:`file_fields` on every received file: a few direct tag reads (see :data:`PER_FILE_TAGS`);
* :func:`series_fields` once per series, with the first file's full header and every file's
  :func:`file_fields`, returning BIDS keys that replace the parser's values.
"""

from __future__ import annotations

import math
import struct
from typing import Any

from sitebench.qc.dicom_params import _ge_protocol_block, _num, _private, _raw_value, _text

__all__ = ["PER_FILE_TAGS", "file_fields", "series_fields"]

# Private creators of the GE blocks read per file, and the elements read from each.
_ACQU, _PARM = "GEMS_ACQU_01", "GEMS_PARM_01"
_PER_FILE_PRIVATE = ((0x0019, _ACQU, (0xBB, 0xBC, 0xBD)),  # diffusion direction (phase, freq, slice)
                     (0x0043, _PARM, (0x39,)))  # slop_int_6..9: b-value first
#: Creator slots looked at for the per-file private blocks: GE writes its blocks at 0x10..0x1F.
_BLOCKS = range(0x10, 0x20)


def _per_file_tags() -> tuple:
    tags: list[Any] = ["InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient", "Manufacturer",
                       "SpecificCharacterSet"]
    for group, _creator, elems in _PER_FILE_PRIVATE:
        for block in _BLOCKS:
            tags.append((group << 16) | block)
            tags.extend((group << 16) | (block << 8) | e for e in elems)
    return tuple(tags)


#: Tags :func:`file_fields` reads (keywords and int tags, for ``pydicom.dcmread(specific_tags=...)``): the
#: creators of the GE private groups 0019/0043 at slots 0x10..0x1F and their diffusion elements.
PER_FILE_TAGS: tuple = _per_file_tags()


# --------------------------------------------------------------------------- small helpers
def _safe(fn, *args) -> Any:
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - a malformed value is "unknown", never an error
        return None


def _creator_block(ds, group: int, creator: str) -> int | None:
    """The block (0x10..0x1F) whose creator element (group,00bb) names ``creator`` (PS3.5 7.8.1), read
    undecoded where possible: cheap enough for every file (no ``private_block`` scan of the dataset)."""
    wanted = creator.encode()
    for block in _BLOCKS:
        name = _safe(_raw_value, ds, (group << 16) | block)
        if name is None:
            continue
        name = name[0] if isinstance(name, list) and name else name
        if isinstance(name, bytes):
            name = name.decode("latin1", "replace")
        if str(name).encode("latin1", "replace").strip(b" \x00") == wanted:
            return block
    return None


def _private_cheap(ds, group: int, creator: str, *elems: int) -> list[Any]:
    """Private elements ``(group, creator, elem)`` for each of ``elems``, the block found once."""
    block = _creator_block(ds, group, creator)
    if block is None:
        return [None] * len(elems)
    return [_safe(_raw_value, ds, (group << 16) | (block << 8) | elem) for elem in elems]


def _floats(v: Any) -> list[float] | None:
    """A DS/IS/LO multi-value (list, backslash text or bytes) as floats; None if any item is unusable."""
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode("latin1", "replace")
    if isinstance(v, str):
        v = v.strip(" \x00").split("\\")
    elif not isinstance(v, (list, tuple)) and not hasattr(v, "__iter__"):
        v = [v]
    out = []
    for x in v:
        try:
            f = float(str(x).strip(" \x00"))
        except (TypeError, ValueError):
            return None
        if not math.isfinite(f):
            return None
        out.append(f)
    return out or None


def _first(v: Any) -> float | None:
    """First number of a possibly multi-valued, possibly empty-padded value (e.g. LO ``8\\4\\19\\\\\\``)."""
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode("latin1", "replace")
    if isinstance(v, str):
        items = v.strip(" \x00").split("\\")
    elif hasattr(v, "__iter__"):  # list, tuple, pydicom MultiValue
        items = list(v)
    else:
        items = [v]
    for x in items[:1]:
        try:
            f = float(str(x).strip(" \x00"))
            return f if math.isfinite(f) else None
        except (TypeError, ValueError):
            return None
    return None


def _g(x: float) -> float:
    """``x`` as dcm2niix prints it (C ``%g``: six significant digits), so values compare exactly."""
    return float(f"{x:.6g}")


def _is_ge(ds) -> bool:
    return (_text(_safe(lambda: ds.get("Manufacturer"))) or "").upper().startswith("GE")


# --------------------------------------------------------------------------- per file
def file_fields(ds) -> dict[str, Any]:
    """Per-file values :func:`series_fields` needs (JSON-able): InstanceNumber, the slice position along the
    normal (``pos``) and orientation (``iop``), the b-value (``b``, 0043,1039 first item) and the diffusion
    direction (``g``, 0019,10BB/10BC/10BD).

    Why these: dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56), nii_dicom.cpp reads b and direction per
    file (kDiffusion_bValueGE, kDiffusionDirectionGEX/Y/Z) and nii_dicom_batch.cpp orders slices and volumes by
    InstanceNumber and position. The RTIA timer (0021,105E) and TriggerTime (0018,1060) are not kept: for GE
    dcm2niix computes slice times from the protocol data block instead (sliceTimingGE). Only direct tag reads;
    {} for a non-GE file or on odd input."""
    try:
        if not _is_ge(ds):
            return {}
        out: dict[str, Any] = {}
        number = _first(_safe(_raw_value, ds, "InstanceNumber"))
        if number is not None and float(number).is_integer():
            out["InstanceNumber"] = int(number)
        ipp = _floats(_safe(_raw_value, ds, "ImagePositionPatient"))
        iop = _floats(_safe(_raw_value, ds, "ImageOrientationPatient"))
        if ipp and iop and len(ipp) == 3 and len(iop) == 6:
            r, c = iop[:3], iop[3:]
            n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
            out["pos"] = round(sum(a * b for a, b in zip(ipp, n)), 4)
            out["iop"] = [round(x, 6) for x in iop]
        b = _first(_private_cheap(ds, 0x0043, _PARM, 0x39)[0])
        if b is not None:
            out["b"] = b
        vec = [_first(v) for v in _private_cheap(ds, 0x0019, _ACQU, 0xBB, 0xBC, 0xBD)]
        if all(v is not None for v in vec):
            out["g"] = vec
        return out
    except Exception:  # noqa: BLE001 - never raise at intake
        return {}


# --------------------------------------------------------------------------- series-level pieces
def _protocol(first) -> dict[str, str]:
    """The gzip protocol data block (0025,101B) as key -> text; {} when absent or undecodable."""
    return _safe(_ge_protocol_block, first) or {}


def _epi_version(first) -> int:
    """dcm2niix's ``epiVersionGE``: -1 not EPI, 0 epi (multi-phase), 1 epiRT, 2 epi2 (spin echo), 3 pepolar.

    dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56), nii_dicom.cpp, in tag order: the pulse-sequence
    name (0019,109C: "epi_pepolar" > "epi2" > "epiRT" > "epi"), then the internal name (0019,109E) "EPI" making
    a non-epiRT series 0, then the mere presence of the epiRT group delay (0043,107C) making it 1."""
    psn = _text(_private(first, 0x0019, _ACQU, 0x9C)) or ""
    version = -1
    if "epi_pepolar" in psn:
        version = 3
    elif "epi2" in psn:
        version = 2
    elif "epiRT" in psn:
        version = 1
    elif "epi" in psn:
        version = 0
    internal = _text(_private(first, 0x0019, _ACQU, 0x9E)) or ""
    if version < 3 and internal == "EPI" and version != 1:
        version = 0
    if _private(first, 0x0043, _PARM, 0x7C) is not None:
        version = 1
    return version


def _group_delay_ms(first) -> float:
    """The epiRT "delay after slice group" (0043,107C, FL in s) in ms; 0 when absent."""
    gd = _first(_private(first, 0x0043, _PARM, 0x7C))
    return gd * 1000.0 if gd and gd > 0 else 0.0


def _multiband_tag(first) -> int | None:
    """HyperBand factor: first value of (0043,10B6) "multiband parameters" when > 1. dcm2niix (Li et al. 2016,
    J Neurosci Methods 264:47-56), nii_dicom.cpp kMultiBandGE (value 1 = factor, 2 = slice FOV shift,
    3 = calibration method)."""
    mb = _first(_private(first, 0x0043, _PARM, 0xB6))
    if mb is not None and mb > 1 and float(mb).is_integer():
        return int(mb)
    return None


def _user_data_polarity(first) -> int | None:
    """Phase polarity from GE's user-defined data (0043,102A): 0 = unflipped, 4 = flipped, None if unknown.

    dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56), nii_dicom.cpp kUserDefineDataGE: the rdb header
    starts at the uint16 at byte 24; its float version >= 25.002 shifts the fields by 0x4C; EPI only (bit 0x800
    at +0x3A); polarity = uint16 at +0x30 & 4; the slice-order word at 0x394 (0x308 from 25.002) equal to 2
    ("bottom up") inverts it. This, not the protocol block's VIEWORDER, is why HyperBand series (polarity bit 4)
    come out with the opposite sign from non-multiband ones."""
    raw = _private(first, 0x0043, _PARM, 0x2A)
    if not isinstance(raw, (bytes, bytearray)) or len(raw) < 916:
        return None
    raw = bytes(raw)
    try:
        hdr = struct.unpack_from("<H", raw, 24)[0]
        if len(raw) < hdr + 916:
            return None
        version = struct.unpack_from("<f", raw, hdr)[0]
        if not 5.0 <= version <= 40.0:
            return None
        kydir = 0x394
        if version >= 25.002:
            hdr += 0x4C
            kydir -= 0x8C
        if not struct.unpack_from("<H", raw, hdr + 0x3A)[0] & 0x800:
            return None  # not EPI
        polarity = struct.unpack_from("<H", raw, hdr + 0x30)[0] & 0x0004
        slice_order = struct.unpack_from("<H", raw, hdr + kydir)[0]
    except struct.error:
        return None
    if slice_order == 2:  # bottom-up acquisition inverts the flag
        polarity = 0 if polarity == 4 else 4
    return polarity


def _phase_encoding_direction(first) -> str | None:
    """BIDS PhaseEncodingDirection for GE.

    dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56): nii_dicom.cpp takes the polarity from
    RectilinearPhaseEncodeReordering (0018,9034; RX27+: LINEAR = flipped, REVERSE_LINEAR = unflipped) and
    otherwise from the user-defined data (0043,102A, see :func:`_user_data_polarity`); nii_dicom_batch.cpp maps
    unflipped to "positive" and, with NIfTI's flipped rows, COL -> j- (positive) / j, ROW -> i / i-. Skipped
    for 3D unless the echo train is > 1 (3D EPI), as dcm2niix does."""
    ped = (_text(first.get("InPlanePhaseEncodingDirection")) or "").upper()
    axis = {"COL": "C", "COLUMN": "C", "ROW": "R"}.get(ped)
    if axis is None:
        return None
    acq3d = (_text(first.get("MRAcquisitionType")) or "").upper() == "3D"
    etl = _num(first.get("EchoTrainLength")) or 0
    if acq3d and not etl > 1:
        return None
    element = first.get((0x0018, 0x9034))
    reorder = (_text(getattr(element, "value", None)) or "").upper()
    polarity = 4 if reorder.startswith("L") else 0 if reorder.startswith("R") else _user_data_polarity(first)
    if polarity is None:
        return None
    positive = polarity == 0
    if axis == "C":
        return "j-" if positive else "j"
    return "i" if positive else "i-"


def _accel_in_plane(first) -> float | None:
    """ParallelReductionFactorInPlane = 1 / first ASSET R factor (0043,1083), reported only when > 1.

    dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56), nii_dicom.cpp kAssetRFactorsGE, written with
    ``%g``: six significant digits (0.57812 -> 1.72974, where dicom_params rounds to 1.72975)."""
    asset = _floats(_private(first, 0x0043, _PARM, 0x83))
    if not asset or asset[0] <= 0:
        return None
    prf = 1.0 / asset[0]
    return _g(prf) if prf > 1.0 else None


def _software_version(first) -> tuple[float, bool]:
    """(major version, is27r3) from SoftwareVersions (0018,1020) as dcm2niix reads them: the text after ':' (or
    the last backslash), e.g. ``DV28.0_R02_1947.a`` -> 28.0, release 2; ``MR29.1_EA_2039.g`` -> 29.1, release 0
    (EA). is27r3 = 27.1 or later, or 27.x with release >= 3: GE changed the HyperBand excitation order then.
    dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56), nii_dicom_batch.cpp readSoftwareVersionsGE."""
    import re

    text = _text(first.get("SoftwareVersions")) or ""
    tail = text.split(":", 1)[1] if ":" in text else text.rsplit("\\", 1)[-1]
    m = re.match(r"..(\d+)\.(\d+)_(..)(\d*)", tail[:10])
    if not m:
        return 0.0, False
    major, minor = int(m.group(1)), int(m.group(2))
    release = 0 if m.group(3) == "EA" or not m.group(4) else int(m.group(4))
    version = major + 0.1 * minor
    return version, version >= 27.1 or (major == 27 and release >= 3)


def _slice_order(files: list[dict[str, Any]]) -> tuple[list[float], list[float], int] | None:
    """(positions of the first volume in InstanceNumber order, the same ascending, number of volumes).

    dcm2niix (Li et al. 2016), nii_dicom_batch.cpp sorts GE files by InstanceNumber; a volume's slices are the
    files until the first position repeats. The NIfTI slice order is ascending along the slice normal
    (dcm2niix flips a descending stack, and its slice times with it: reverseSliceTiming)."""
    ordered = sorted((f for f in files if isinstance(f.get("pos"), (int, float))),
                     key=lambda f: f.get("InstanceNumber", 0))
    if not ordered:
        return None
    first_volume: list[float] = []
    for f in ordered:
        if any(abs(f["pos"] - p) < 1e-3 for p in first_volume):
            break
        first_volume.append(f["pos"])
    return first_volume, sorted(first_volume), len(ordered) // max(1, len(first_volume))


def _ge_slice_pattern(mb: int, n_slices: int, tr_s: float, interleaved: bool, is27r3: bool) -> list[float]:
    """Slice onset times (s), in InstanceNumber (acquisition-location) order, for GE EPI with HyperBand ``mb``.

    dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56), nii_dicom_batch.cpp sliceTimeGE (and dcm_qa_ge
    slicetime.cpp): ceil(slices / mb) excitations share the TR less the group delay; before 27.0 R03 an even
    count gains one (empty) excitation; interleaved order excites even locations first; from 27.0 R03 an even
    number (> 2) of interleaved HyperBand excitations swaps the last and third-from-last; every band repeats it."""
    n_exc = max(1, math.ceil(n_slices / max(1, mb)))
    if mb > 1 and not is27r3 and n_exc % 2 == 0:
        n_exc += 1
    step = tr_s / n_exc
    if not interleaved:
        base = [i * step for i in range(n_exc)]
    else:
        n_odd = (n_exc - 1) // 2
        base = [(i // 2) * step if i % 2 == 0 else (n_odd + (i + 1) // 2) * step for i in range(n_exc)]
        if mb > 1 and is27r3 and n_exc > 2 and n_exc % 2 == 0:
            base[-1], base[-3] = base[-3], base[-1]
    return [base[i % n_exc] for i in range(n_slices)]


def _slice_timing_ge(first, files: list[dict[str, Any]]) -> dict[str, Any]:
    """dcm2niix's GE slice-timing step: {"SliceTiming": [...], "MultibandAccelerationFactor": n,
    "RepetitionTime": s} for what it decides, {} where it reports no slice times.

    dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56), nii_dicom_batch.cpp sliceTimingGE: GE slice times
    are computed, never read from the per-file RTIA timer (0021,105E) or TriggerTime (0018,1060) (those are
    unreliable, e.g. zero in some files of dcm_qa_ge epiRT), and only for 2D series with >= 2 slices and >= 2
    volumes, not localizers (0019,1017 == 256), with a decodable protocol data block (0025,101B). Its MBACCEL
    raises the HyperBand factor; SLICEORDER 0 = sequential, anything else interleaved. Only epiRT (pulse
    sequence or IOPT "FMRI") and multi-phase epi (IOPT "MPh", whose DELACQNOAV group delay is added to the TR;
    variable delays unsupported) get times; diffusion (epi2 / IOPT "DIFF") and others none. HyperBand before
    release 26 has none. Times are in InstanceNumber order, then reordered to ascending slice position."""
    out: dict[str, Any] = {}
    if (_text(first.get("MRAcquisitionType")) or "").upper() == "3D":
        return out
    if _first(_private(first, 0x0019, _ACQU, 0x17)) == 256:
        return out  # localizer (SeriesPlane 3-plane)
    order = _slice_order(files)
    if not order:
        return out
    acq_positions, nifti_positions, n_volumes = order
    n = len(acq_positions)
    if n < 2 or n_volumes < 2:
        return out
    block = _protocol(first)
    if not block:
        return out
    mb_accel = int(_first(block.get("MBACCEL")) or 0)
    mb = max(_multiband_tag(first) or 1, mb_accel, 1)
    if mb > 1:
        out["MultibandAccelerationFactor"] = mb
    so = block.get("SLICEORDER")
    so_num = _first(so) if so is not None else -1
    interleaved = so_num != 0
    iopt = block.get("IOPT", "")
    delay_ms = (_first(block.get("DELACQNOAV")) or 0.0) * 1000.0
    if "MPh" in iopt:
        if block.get("DELACQ") == "Minimum":
            delay_ms = 0.0
        if "MPhVar" in iopt:
            delay_ms = -1.0
    version = _epi_version(first)
    tr = _num(first.get("RepetitionTime"))
    if tr is None or tr <= 0:
        return out
    tr = float(tr)
    group_delay = _group_delay_ms(first)
    if version >= 3:
        pass  # ABCD pepolar research sequence: dcm2niix warns and computes
    elif version == 1 or "FMRI" in iopt:
        tr += group_delay  # epiRT: 0043,107C already part of the reported TR
    elif version == 0 or "MPh" in iopt:
        if delay_ms > 0:
            tr += delay_ms
            group_delay = delay_ms
            out["RepetitionTime"] = _g(tr / 1000.0)
        if delay_ms < -0.5:
            return out
    else:  # diffusion (epi2, IOPT DIFF) and anything else: no slice times
        return out
    major, is27r3 = _software_version(first)
    if mb > 1 and major < 26.0:
        return out
    times = _ge_slice_pattern(mb, n, (tr - group_delay) / 1000.0, interleaved, is27r3)
    if len({round(t, 9) for t in times}) < 2:
        return out
    by_pos = dict(zip(acq_positions, times))
    out["SliceTiming"] = [_g(by_pos[p]) for p in nifti_positions]
    return out


def _slice_dir(first, files: list[dict[str, Any]]) -> int:
    """dcm2niix's ``sliceDir``: 1/2/3 = sagittal/coronal/axial (the largest component of the slice normal),
    negative when the stack's InstanceNumber order descends along the normal. dcm2niix (Li et al. 2016,
    J Neurosci Methods 264:47-56), nii_dicom.cpp verify_slice_dir."""
    iop = _floats(first.get("ImageOrientationPatient")) or next((f["iop"] for f in files if f.get("iop")), None)
    axis = 3
    if iop and len(iop) == 6:
        r, c = iop[:3], iop[3:]
        n = [abs(r[1] * c[2] - r[2] * c[1]), abs(r[2] * c[0] - r[0] * c[2]), abs(r[0] * c[1] - r[1] * c[0])]
        axis = 2 if n[1] >= n[0] and n[1] >= n[2] else 1
        if n[2] >= n[0] and n[2] >= n[1]:
            axis = 3
    order = _slice_order(files)
    descending = bool(order and len(order[0]) > 1 and order[0][0] > order[0][-1])
    return -axis if descending else axis


def _ge_bvec(g: list[float], col: bool, slice_dir: int) -> list[float]:
    """GE (0019,10BB/10BC/10BD) direction -> dcm2niix .bvec frame.

    dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56), nii_dicom_batch.cpp geCorrectBvecs (after
    Xiangrui Li's dicm2nii): ROW phase encoding swaps the in-plane axes (negating the new y); the axes flipped
    are (x, y) for sagittal, (y, z) coronal, z axial, with the slice flip toggled for a descending stack; then
    y is negated (NIfTI rows) and the whole vector negated "so files appear identical to old versions"."""
    v = list(g)
    if not col:
        v = [v[1], -v[0], v[2]]
    flip = {1: [1, 1, 0], 2: [0, 1, 1]}.get(abs(slice_dir), [0, 0, 1])
    if slice_dir < 0:
        flip[2] = 1 - flip[2]
    v = [-x if f else x for x, f in zip(v, flip)]
    v[1] = -v[1]
    return [(-x if x != 0 else 0.0) + 0.0 for x in v]


def _diffusion(first, files: list[dict[str, Any]]) -> tuple[list[float], list[list[float]]] | None:
    """Per-volume b-values and directions as dcm2niix writes .bval/.bvec for GE.

    dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56): nii_dicom.cpp reads the b-value as the first item
    of (0043,1039), an integer less any 10^9 bias (set_bValGE), and the direction from (0019,10BB/10BC/10BD),
    GE's phase/frequency/slice frame. nii_dicom_batch.cpp nii_saveDTI needs >= 3 files, takes one value per
    volume (the files at the first file's position, in InstanceNumber order), writes nothing when neither b nor
    direction varies, treats b > 0 without a gradient as b = 0, or as a trace/ADC volume it leaves out when
    (0019,10E0) NumberOfDiffusionDirection is 0; geCorrectBvecs (:func:`_ge_bvec`, head-first supine only)
    zeroes b = 0 vectors, rescales b by |g|^2 (to a multiple of 5) for a non-unit gradient and reorients the
    rest. Matches the dcm_qa_ge .bval/.bvec files exactly."""
    ordered = sorted((f for f in files if "b" in f), key=lambda f: f.get("InstanceNumber", 0))
    if not ordered:
        return None
    pos0 = ordered[0].get("pos")
    vols = [f for f in ordered if pos0 is None or f.get("pos") is None or abs(f["pos"] - pos0) < 1e-3]
    if len(ordered) < 3 or len(vols) < 2:
        return None
    n_dirs = _first(_private(first, 0x0019, _ACQU, 0xE0))
    trace_is_adc = n_dirs is not None and n_dirs == 0
    raw: list[tuple[float, list[float]]] = []
    for f in vols:
        b = float(int(f.get("b") or 0) % 1_000_000_000)  # GE may bias the stored b by 10^9 (set_bValGE)
        g = [float(x) for x in (f.get("g") or [0.0, 0.0, 0.0])]
        raw.append((b, g))
    b_varies = len({b for b, _ in raw}) > 1 or min(b for b, _ in raw) > 50 or any(raw[0][1])
    if not b_varies:
        if len({tuple(g) for _, g in raw}) < 2 or all(any(g) for _, g in raw):
            return None  # one b-value for every volume: dcm2niix writes no .bval/.bvec
        raw = [(b if any(g) else 0.0, g) for b, g in raw]  # volumes without a gradient are b = 0
    keep: list[tuple[float, list[float]]] = []
    adc = 0
    for b, g in raw:
        if b != 0 and not any(g):  # bval > 0 with bvec 0: trace/ADC, or GE's raw b = 0 (issue 245)
            if trace_is_adc:
                adc += 1
                keep.append((-1.0, g))
                continue
            b = 0.0
        keep.append((b, g))
    if adc and not (adc == 1 and len(keep) - adc < 2) and len(keep) - adc >= 2:
        keep = [(b, g) for b, g in keep if b >= 0]
    else:
        keep = [(b if b >= 0 else raw[i][0], g) for i, (b, g) in enumerate(keep)]
    col = (_text(first.get("InPlanePhaseEncodingDirection")) or "").upper().startswith("COL")
    row = (_text(first.get("InPlanePhaseEncodingDirection")) or "").upper().startswith("ROW")
    slice_dir = _slice_dir(first, files)
    bvals: list[float] = []
    bvecs: list[list[float]] = []
    if not (col or row) or (_text(first.get("PatientPosition")) or "").upper() != "HFS":
        # geCorrectBvecs leaves them as stored (dcm2niix warns): not head-first supine, or no PE axis
        return [_g(b) for b, _ in keep], [[_g(x) + 0.0 for x in g] for _, g in keep]
    for b, g in keep:
        length = math.sqrt(sum(x * x for x in g))
        if b <= 1.1920929e-07 or length <= 1.1920929e-07:
            bvals.append(_g(b))
            bvecs.append([0.0, 0.0, 0.0])
            continue
        if 0.03 < length < 0.97:
            scaled = b * length * length
            new_b = 5.0 if 0 < scaled < 5 else float(int((scaled + 2.5) / 5) * 5)
            scale = math.sqrt(b / new_b) if new_b else 0.0
            b, g = new_b, [x * scale for x in g]
        bvals.append(_g(b))
        bvecs.append([_g(x) + 0.0 for x in _ge_bvec(g, col, slice_dir)])
    return bvals, bvecs


# --------------------------------------------------------------------------- series
def _repetition_time(first) -> float | None:
    """TR in s including the epiRT "delay after slice group" (0043,107C, FL seconds).

    dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56), nii_dicom.cpp kEpiRTGroupDelayGE: the delay is
    read in s and kept in ms, and the sidecar's RepetitionTime is (0018,0080) + delay: a GE epiRT series with
    TR 2 s and a 3 s group delay samples every 5 s (dcm_qa_ge epiRT_IntAsc_GD3s). Printed with ``%g``."""
    tr = _num(first.get("RepetitionTime"))
    if tr is None or tr <= 0:
        return None
    return _g((tr + _group_delay_ms(first)) / 1000.0)


def series_fields(first, files: list[dict[str, Any]]) -> dict[str, Any]:
    """BIDS keys for a GE MR series that replace dicom_params' values, as dcm2niix (Li et al. 2016, J Neurosci
    Methods 264:47-56) writes them: RepetitionTime (s, with the slice-group delay), MultibandAccelerationFactor,
    PhaseEncodingDirection, ParallelReductionFactorInPlane, SliceTiming (s, NIfTI slice order),
    DiffusionBValues and DiffusionGradientDirections (per volume, .bval/.bvec order and frame). ``first`` is the
    first file's full header, ``files`` every file's :func:`file_fields` in file order. A key that cannot be
    determined is left out (SequenceName never: dcm2niix writes only (0018,0024), absent on GE); never raises."""
    out: dict[str, Any] = {}
    try:
        if first is None or not _is_ge(first):
            return out
        files = [f for f in (files or []) if isinstance(f, dict)]
        for key, fn in (("RepetitionTime", _repetition_time), ("MultibandAccelerationFactor", _multiband_tag),
                        ("PhaseEncodingDirection", _phase_encoding_direction),
                        ("ParallelReductionFactorInPlane", _accel_in_plane)):
            v = _safe(fn, first)
            if v is not None:
                out[key] = v
        out.update(_safe(_slice_timing_ge, first, files) or {})
        dwi = _safe(_diffusion, first, files)
        if dwi:
            out["DiffusionBValues"], out["DiffusionGradientDirections"] = dwi
    except Exception:  # noqa: BLE001 - return what we have
        pass
    return out
