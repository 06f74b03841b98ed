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
from typing import Any, Iterable

from sitebench.qc.dicom_params import _ge_protocol_block, _num, _private, _raw_value, _text

__all__ = ["PER_FILE_TAGS", "file_fields", "series_fields"]

# Private creators of the GE blocks read per file, and the elements read from each.
_ACQU, _RELA, _PARM = "GEMS_ACQU_01", "GEMS_RELA_01", "GEMS_PARM_01"
_PER_FILE_PRIVATE = ((0x0019, _ACQU, (0xBB, 0xBC, 0xBD)),  # diffusion direction (phase, freq, slice)
                     (0x0021, _RELA, (0x5E,)),  # RTIA timer
                     (0x0043, _PARM, (0x39,)))  # slop_int_6..9: b-value first
#: Creator slots looked at for the per-file private blocks: GE writes its blocks at 0x10..0x1F.
_BLOCKS = range(0x10, 0x20)


def _per_file_tags() -> tuple:
    tags: list[Any] = ["InstanceNumber", "AcquisitionNumber", "ImagePositionPatient", "ImageOrientationPatient",
                       "TriggerTime", "Manufacturer", "SpecificCharacterSet"]
    for group, _creator, elems in _PER_FILE_PRIVATE:
        for block in _BLOCKS:
            tags.append((group << 16) | block)
            tags.extend((group << 16) | (block << 8) | e for e in elems)
    return tuple(tags)


#: Tags :func:`file_fields` reads (keywords and int tags, for ``pydicom.dcmread(specific_tags=...)``): the
#: creators of the GE private groups 0019/0021/0043 at slots 0x10..0x1F and their diffusion/RTIA elements.
PER_FILE_TAGS: tuple = _per_file_tags()


# --------------------------------------------------------------------------- small helpers
def _safe(fn, *args) -> Any:
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - a malformed value is "unknown", never an error
        return None


def _private_cheap(ds, group: int, creator: str, elem: int) -> Any:
    """Private element ``(group, creator, elem)`` found by the creator element at (group,0010..001F), read
    undecoded where possible: cheap enough for every file (no ``private_block`` scan of the dataset)."""
    from pydicom.tag import Tag

    wanted = creator.encode()
    for block in _BLOCKS:
        name = _safe(_raw_value, ds, Tag(group, block))
        if name is None:
            continue
        name = name[0] if isinstance(name, list) and name else name
        if isinstance(name, bytes):
            name = name.decode("latin1", "replace")
        if str(name).encode("latin1", "replace").strip(b" \x00") == wanted:
            return _safe(_raw_value, ds, Tag(group, (block << 8) | elem))
    return None


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
    """Per-file values :func:`series_fields` needs (JSON-able): InstanceNumber, AcquisitionNumber, the slice
    position along the normal (``pos``), RTIA timer (0021,105E), TriggerTime (0018,1060), b-value (0043,1039
    first item) and the diffusion direction (0019,10BB/10BC/10BD).

    Why these: dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56), nii_dicom.cpp, reads exactly these per
    file (kRTIA_timer, kTriggerTime, kDiffusion_bValueGE, kDiffusionDirectionGEX/Y/Z) and orders slices and
    volumes by InstanceNumber and position. Only direct tag reads; {} for a non-GE file or on odd input."""
    try:
        if not _is_ge(ds):
            return {}
        out: dict[str, Any] = {}
        for key in ("InstanceNumber", "AcquisitionNumber"):
            v = _first(_safe(_raw_value, ds, key))
            if v is not None and float(v).is_integer():
                out[key] = int(v)
        ipp = _floats(_safe(_raw_value, ds, "ImagePositionPatient"))
        iop = _floats(_safe(_raw_value, ds, "ImageOrientationPatient"))
        if ipp and iop and len(ipp) == 3 and len(iop) == 6:
            r, c = iop[:3], iop[3:]
            n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
            out["pos"] = round(sum(a * b for a, b in zip(ipp, n)), 4)
            out["iop"] = [round(x, 4) for x in iop]
        tt = _first(_safe(_raw_value, ds, "TriggerTime"))
        if tt is not None:
            out["trigger"] = tt
        rtia = _first(_private_cheap(ds, 0x0021, _RELA, 0x5E))
        if rtia is not None:
            out["rtia"] = rtia
        b = _first(_private_cheap(ds, 0x0043, _PARM, 0x39))
        if b is not None:
            out["b"] = b
        vec = [_first(_private_cheap(ds, 0x0019, _ACQU, e)) for e in (0xBB, 0xBC, 0xBD)]
        if all(v is not None for v in vec):
            out["g"] = vec
        return out
    except Exception:  # noqa: BLE001 - never raise at intake
        return {}


# --------------------------------------------------------------------------- series-level pieces
def _repetition_time(first) -> float | None:
    """TR in s including the epiRT "delay after slice group" (0043,107C, FL seconds).

    dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56), nii_dicom.cpp kEpiRTGroupDelayGE: the group
    delay is read in s, kept in ms, and the sidecar's RepetitionTime is (0018,0080) + delay: a GE epiRT
    series with TR 2 s and a 3 s group delay samples every 5 s."""
    tr = _num(first.get("RepetitionTime"))
    if tr is None or tr <= 0:
        return None
    gd = _first(_private(first, 0x0043, _PARM, 0x7C))
    delay_ms = gd * 1000.0 if gd and gd > 0 else 0.0
    return _g((tr + delay_ms) / 1000.0)


def _multiband(first) -> int | None:
    """HyperBand factor: first value of (0043,10B6) "multiband parameters" when > 1, else the protocol data
    block's MBACCEL. dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56), nii_dicom.cpp kMultiBandGE
    (value 1 = factor, 2 = slice FOV shift, 3 = calibration), reported only when > 1."""
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


def _software_27r3(first) -> bool:
    """Software release 27.0 R03 or later (major version in (0018,1020), release in its text): GE changed
    the HyperBand excitation order then. dcm2niix (Li et al. 2016), nii_dicom_batch.cpp / dcm_qa_ge
    slicetime.cpp ``is27r3``."""
    import re

    text = _text(first.get("SoftwareVersions")) or ""
    major = _first(text.split("\\")[0]) if text else None
    if major is None:
        return True
    if major >= 28:
        return True
    if major < 27:
        return False
    m = re.search(r"_R(\d+)", text)
    return bool(m and int(m.group(1)) >= 3)


def _slice_order(files: list[dict[str, Any]]) -> tuple[list[float], list[float]] | None:
    """(positions of the first volume in InstanceNumber order, their distinct values ascending).

    dcm2niix (Li et al. 2016), nii_dicom_batch.cpp sorts GE files by InstanceNumber; the volume's slices are
    the files until the first position repeats. The NIfTI slice order is ascending along the slice normal
    (dcm2niix flips a descending stack, and its slice times with it)."""
    ordered = sorted((f for f in files if "pos" in f), key=lambda f: (f.get("InstanceNumber", 0)))
    if not ordered:
        return None
    first_volume: list[float] = []
    for f in ordered:
        if any(abs(f["pos"] - p) < 1e-3 for p in first_volume):
            break
        first_volume.append(f["pos"])
    return first_volume, sorted(first_volume)


def _ge_slice_pattern(mb: int, n_slices: int, tr_s: float, interleaved: bool, is27r3: bool) -> list[float]:
    """Slice onset times (s) in acquisition-location order for GE EPI with HyperBand factor ``mb``.

    dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56) sliceTimeGE (nii_dicom_batch.cpp; dcm_qa_ge
    slicetime.cpp): ceil(slices / mb) excitations share the TR without the group delay; interleaved order
    excites even locations first; from 27.0 R03 an even number (> 2) of interleaved HyperBand excitations swaps
    the last and third-from-last; each band repeats the pattern."""
    n_exc = max(1, math.ceil(n_slices / max(1, mb)))
    step = tr_s / n_exc
    if not interleaved:
        base = [i * step for i in range(n_exc)]
    else:
        n_odd = (n_exc - 1) // 2
        base = [(i // 2) * step if i % 2 == 0 else (n_odd + (i + 1) // 2) * step for i in range(n_exc)]
        if mb > 1 and is27r3 and n_exc > 2 and n_exc % 2 == 0:
            base[-1], base[-3] = base[-3], base[-1]
    return [base[i % n_exc] for i in range(n_slices)]


def _slice_timing(first, files: list[dict[str, Any]], mb: int | None) -> list[float] | None:
    """SliceTiming (s, NIfTI slice order) for 2D GE gradient-echo EPI (epi / epiRT; not the spin-echo DWI
    "EPI2", whose pattern differs and which dcm2niix leaves without slice times).

    dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56), nii_dicom_batch.cpp: from the protocol data block
    (0025,101B: SLICEORDER 1 = interleaved, HyperBand factor, slice count) with TR (0018,0080), see
    :func:`_ge_slice_pattern`; otherwise from per-file TriggerTime (0018,1060, ms) or the RTIA timer (0021,105E,
    s from R27, 0.1 ms before), relative to the earliest slice of the first volume."""
    if (_text(first.get("MRAcquisitionType")) or "").upper() == "3D":
        return None
    internal = (_text(_private(first, 0x0019, _ACQU, 0x9E)) or "").upper()
    psn = (_text(_private(first, 0x0019, _ACQU, 0x9C)) or "").lower()
    if internal:
        if internal != "EPI":
            return None
    elif "epi" not in psn or "epi2" in psn:
        return None
    order = _slice_order(files)
    if not order:
        return None
    acq_positions, nifti_positions = order
    n = len(acq_positions)
    if n < 2:
        return None
    tr = _num(first.get("RepetitionTime"))
    block = _safe(_ge_protocol_block, first) or {}
    times_acq: list[float] | None = None
    if tr and tr > 0 and block.get("SLICEORDER") in ("0", "1"):
        times_acq = _ge_slice_pattern(mb or 1, n, tr / 1000.0, block["SLICEORDER"] == "1", _software_27r3(first))
    else:  # per-file timers of the first volume
        ordered = sorted((f for f in files if "pos" in f), key=lambda f: f.get("InstanceNumber", 0))[:n]
        for key, scale in (("trigger", 1000.0), ("rtia", None)):
            vals = [f.get(key) for f in ordered]
            if any(v is None for v in vals) or len(set(vals)) < 2:
                continue
            if scale is None:  # RTIA: seconds in newer releases, 0.1 ms in older ones
                scale = 10000.0 if max(vals) > (tr or 1e9) / 100.0 else 1.0
            t0 = min(vals)
            times_acq = [(v - t0) / scale for v in vals]
            break
    if times_acq is None:
        return None
    by_pos = dict(zip(acq_positions, times_acq))
    return [_g(by_pos[p]) for p in nifti_positions]


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
    GE's phase/frequency/slice frame; nii_dicom_batch.cpp nii_saveDTI takes one value per volume (the files at the first file's position, in
    InstanceNumber order), treats b > 0 without a gradient as b = 0, or as a trace/ADC volume it leaves out when
    (0019,10E0) NumberOfDiffusionDirection is 0, writes nothing when neither b nor direction varies, and
    geCorrectBvecs (:func:`_ge_bvec`) zeroes b = 0 vectors, rescales b by |g|^2 (to a multiple of 5) for a
    non-unit gradient and reorients the rest. Matches the dcm_qa_ge .bval/.bvec files exactly."""
    ordered = sorted((f for f in files if "b" in f), key=lambda f: f.get("InstanceNumber", 0))
    if not ordered:
        return None
    pos0 = ordered[0].get("pos")
    vols = [f for f in ordered if pos0 is None or f.get("pos") is None or abs(f["pos"] - pos0) < 1e-3]
    if len(vols) < 3:
        return None
    n_dirs = _first(_private(first, 0x0019, _ACQU, 0xE0))
    trace_is_adc = n_dirs is not None and n_dirs == 0
    raw: list[tuple[float, list[float]]] = []
    for f in vols:
        b = float(int(f.get("b") or 0) % 1_000_000_000)  # GE may bias the stored b by 10^9 (set_bValGE)
        g = [float(x) for x in (f.get("g") or [0.0, 0.0, 0.0])]
        raw.append((b, g))
    b_varies = len({b for b, _ in raw}) > 1 or min(b for b, _ in raw) > 50 or any(raw[0][1])
    if not b_varies and len({tuple(g) for _, g in raw}) < 2:
        return None  # one b-value and one direction: dcm2niix writes no .bval/.bvec
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
    slice_dir = _slice_dir(first, files)
    bvals: list[float] = []
    bvecs: list[list[float]] = []
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
def series_fields(first, files: list[dict[str, Any]]) -> dict[str, Any]:
    """BIDS keys for a GE MR series that replace dicom_params' values (see the module docstring for the
    reference): RepetitionTime, MultibandAccelerationFactor, PhaseEncodingDirection,
    ParallelReductionFactorInPlane, SliceTiming, DiffusionBValues, DiffusionGradientDirections. A key that
    cannot be determined is left out; never raises."""
    out: dict[str, Any] = {}
    try:
        if first is None or not _is_ge(first):
            return out
        files = [f for f in (files or []) if isinstance(f, dict)]
        steps: Iterable[tuple[str, Any]] = (
            ("RepetitionTime", lambda: _repetition_time(first)),
            ("MultibandAccelerationFactor", lambda: _multiband(first)),
            ("PhaseEncodingDirection", lambda: _phase_encoding_direction(first)),
            ("ParallelReductionFactorInPlane", lambda: _accel_in_plane(first)),
        )
        for key, fn in steps:
            v = _safe(fn)
            if v is not None:
                out[key] = v
        st = _safe(_slice_timing, first, files, out.get("MultibandAccelerationFactor"))
        if st:
            out["SliceTiming"] = st
        dwi = _safe(_diffusion, first, files)
        if dwi:
            out["DiffusionBValues"], out["DiffusionGradientDirections"] = dwi
    except Exception:  # noqa: BLE001 - return what we have
        pass
    return out
