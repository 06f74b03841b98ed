"""Siemens header values dcm2niix writes that the series parser (dicom_params) leaves out.

Reference: dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56), nii_dicom.cpp (header
parsing: CSA ``MosaicRefAcqTimes``, ``B_value``, ``DiffusionGradientDirection``, XA private
(0021,111C)) and nii_dicom_batch.cpp (slice timing written in NIfTI slice order, bvec rotation).
"""

from __future__ import annotations

from typing import Any

from sitebench.qc.dicom_params import (
    _ascconv,
    _csa_tags,
    _items,
    _num,
    _private,
    _private_fast,
    _raw_value,
    _text,
)
from sitebench.qc.diffusion_frame import as_floats, clean, slice_normal, to_bvec_frame
from sitebench.qc.per_image import (
    enhanced_frames,
    frame_item,
    position_along_normal,
    seconds,
    slice_times,
    steadier_volume,
    volumes,
)

__all__ = ["PER_FILE_TAGS", "file_fields", "series_fields"]


def _private_tags(group: int, elems: tuple[int, ...], blocks: tuple[int, ...] = (0x10, 0x11, 0x12, 0x13)) -> tuple:
    out = [(group << 16) | b for b in blocks]
    out += [(group << 16) | (b << 8) | e for b in blocks for e in elems]
    return tuple(out)


#: Per-file tags: timing (AcquisitionTime/DateTime, XA (0021,1104)), slice position and
#: orientation, instance/acquisition numbers, diffusion (0019,100C/100E; 0018,9087/9089; enhanced
#: groups), XA classic polarity (0021,111C) and the CSA image header (0029,1010), whose
#: ``MosaicRefAcqTimes`` are read from the second mosaic only.
PER_FILE_TAGS: tuple = (
    "InstanceNumber", "AcquisitionNumber", "AcquisitionTime", "AcquisitionDateTime", "ImagePositionPatient",
    "ImageOrientationPatient", "DiffusionBValue", "DiffusionGradientOrientation", "SpecificCharacterSet",
    "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
    *_private_tags(0x0019, (0x0C, 0x0E)), *_private_tags(0x0021, (0x04, 0x1C)), *_private_tags(0x0029, (0x10,)),
)

#: CSA keys the mosaic slice times need (:func:`_mosaic_times`).
_MOSAIC_KEYS = ("MosaicRefAcqTimes", "NumberOfImagesInMosaic", "SliceNormalVector")


def file_fields(ds) -> dict[str, Any]:
    """Per-file timing, position along the normal, diffusion and XA classic polarity.

    dcm2niix (Li et al. 2016), nii_dicom.cpp: classic XA files have no CSA header, so slice time
    comes from each file's acquisition time and polarity from (0021,111C) 'SIEMENS MR SDI 02';
    V-series diffusion from 'SIEMENS MR HEADER' (0019,100C) B_value / (0019,100E) direction."""
    try:
        out: dict[str, Any] = {}
        if "PerFrameFunctionalGroupsSequence" in ds:
            out["frames"] = enhanced_frames(ds)
            after_start = [_time_after_start(fr) for fr in _items(ds, "PerFrameFunctionalGroupsSequence")]
            if after_start and len(after_start) == len(out["frames"]) and None not in after_start:
                for frame, t in zip(out["frames"], after_start):
                    frame[0] = t
            return out
        out["n"] = _num(_raw_value(ds, "InstanceNumber"))
        out["acq"] = _num(_raw_value(ds, "AcquisitionNumber"))
        out["t"] = seconds(_raw_value(ds, "AcquisitionDateTime")) or seconds(_raw_value(ds, "AcquisitionTime"))
        out["z"] = position_along_normal(_raw_value(ds, "ImagePositionPatient"), _raw_value(ds, "ImageOrientationPatient"))
        b = _private_fast(ds, 0x0019, "SIEMENS MR HEADER", 0x0C)
        if b is None:
            b = _raw_value(ds, "DiffusionBValue")
        g = _private_fast(ds, 0x0019, "SIEMENS MR HEADER", 0x0E)
        if g is None:
            g = _raw_value(ds, "DiffusionGradientOrientation")
        out["b"] = _num(b[0] if isinstance(b, (list, tuple)) else b)
        out["g"] = as_floats(g)
        out["pe+"] = _num(_private_fast(ds, 0x0021, "SIEMENS MR SDI 02", 0x1C))
        out["tas"] = _num(_private_fast(ds, 0x0021, "SIEMENS MR SDI 02", 0x04))
        if out["n"] == 2:  # dcm2niix times a mosaic series by its second volume (see series_fields)
            csa = _csa_tags(_private_fast(ds, 0x0029, "SIEMENS CSA HEADER", 0x10))
            if csa.get("MosaicRefAcqTimes"):
                out["csa"] = {k: csa[k] for k in _MOSAIC_KEYS if k in csa}
        return {k: v for k, v in out.items() if v is not None}
    except Exception:  # noqa: BLE001 - a damaged file gives nothing, never an error at intake
        return {}


def _time_after_start(frame) -> float | None:
    """XA per-frame TimeAfterStart (0021,1104) 'SIEMENS MR SDI 02' (s), in the frame's private
    (0021,xx) item: the slice clock dcm2niix times XA enhanced files by. FrameAcquisitionDateTime
    is rounded to 10 ms on the scanner, TimeAfterStart to 2.5 ms."""
    for el in frame:
        if el.VR == "SQ" and el.tag.group == 0x0021 and el.value:
            return _num(_private(el.value[0], 0x0021, "SIEMENS MR SDI 02", 0x04))
    return None


def _mosaic_times(csa: dict[str, list[str]], iop: list[float] | None) -> list[float] | None:
    """CSA image header (0029,1010) ``MosaicRefAcqTimes`` (ms, mosaic tile order): negative times
    shifted to start at 0 (dcm2niix checkSliceTimes, issue 271), reversed when the CSA
    SliceNormalVector points against row x column (dcm2niix writes the slices flipped then)."""
    raw = csa.get("MosaicRefAcqTimes") or []
    try:
        times = [float(x) for x in raw]
    except ValueError:
        return None
    if len(times) < 4:
        return None
    n = _num((csa.get("NumberOfImagesInMosaic") or [None])[0])
    if isinstance(n, int) and 0 < n <= len(times):
        times = times[:n]
    low = min(times)
    if low < 0:
        times = [t - low for t in times]
    return _in_nifti_order([clean(t / 1000.0, 6) for t in times], csa, iop)


def _in_nifti_order(times: list[float], csa: dict[str, list[str]], iop: list[float] | None) -> list[float]:
    """Mosaic tiles are stored along the CSA SliceNormalVector; dcm2niix writes slices along
    row x column, so the times reverse where the two point apart."""
    normal = slice_normal(iop or [])
    csa_normal = as_floats(csa.get("SliceNormalVector")) if csa.get("SliceNormalVector") else None
    if normal and csa_normal and len(csa_normal) == 3 and sum(a * b for a, b in zip(normal, csa_normal)) < 0:
        return times[::-1]
    return times


def _protocol_times(asc: dict[str, str], n_slices: int) -> list[float] | None:
    """Slice times of an early (VB12/VB13) mosaic that has no ``MosaicRefAcqTimes``: the protocol's
    slice order ``sSliceArray.ucMode`` (1 ascending, 2 descending, 4 interleaved) spread evenly
    over TR less ``lDelayTimeInTR`` (both us), as dcm2niix does for these files. Siemens
    interleaving starts with the first slice for an odd count and the second for an even one."""
    try:
        mode = int(asc.get("sSliceArray.ucMode", ""), 0)
    except ValueError:
        return None
    tr = _num(asc.get("alTR[0]"))
    delay = _num(asc.get("lDelayTimeInTR")) or 0
    if mode not in (1, 2, 4) or not tr or n_slices < 2 or _num(asc.get("sSliceArray.lSize")) != n_slices:
        return None
    step = (tr - delay) / 1e6 / n_slices
    if mode == 1:
        order = list(range(n_slices))
    elif mode == 2:
        order = list(range(n_slices))[::-1]
    else:
        first = 0 if n_slices % 2 else 1
        order = list(range(first, n_slices, 2)) + list(range(1 - first, n_slices, 2))
    times = [0.0] * n_slices
    for k, z in enumerate(order):
        times[z] = clean(k * step, 6)
    return times


def series_fields(first, files: list[dict[str, Any]]) -> dict[str, Any]:
    """SliceTiming, XA classic PhaseEncodingDirection and diffusion for one Siemens series."""
    out: dict[str, Any] = {}
    try:
        mosaic = any("MOSAIC" in str(x).upper() for x in (first.get("ImageType") or []))
        iop = as_floats(first.get("ImageOrientationPatient"))
        enhanced = "PerFrameFunctionalGroupsSequence" in first
        if enhanced:
            for fr in _items(first, "SharedFunctionalGroupsSequence")[:1] + _items(first, "PerFrameFunctionalGroupsSequence")[:1]:
                it = frame_item(fr, "PlaneOrientationSequence")
                if it is not None and "ImageOrientationPatient" in it:
                    iop = as_floats(it.ImageOrientationPatient)
                    break
        three_d = _text(first.get("MRAcquisitionType")) == "3D"
        # slice timing
        times = None
        if mosaic:
            csa1 = _csa_tags(_private(first, 0x0029, "SIEMENS CSA HEADER", 0x10))
            csa2 = next((f["csa"] for f in files if f.get("csa")), None)
            times = steadier_volume(_mosaic_times(csa1, iop), _mosaic_times(csa2, iop) if csa2 else None)
            if times is None:
                n = _num((csa1.get("NumberOfImagesInMosaic") or [None])[0])
                asc = _ascconv(_private(first, 0x0029, "SIEMENS CSA HEADER", 0x20))
                times = _protocol_times(asc, n) if isinstance(n, int) else None
                times = _in_nifti_order(times, csa1, iop) if times else None
        else:
            if enhanced:
                slices = [(fr[1], fr[0]) for f in files for fr in f.get("frames") or []]
                times = steadier_volume(slice_times(slices, 0), slice_times(slices, 1))
            else:
                times = None
                tr = _num(first.get("RepetitionTime"))
                if files and all(f.get("tas") is not None for f in files):  # XA classic TimeAfterStart
                    slices = [(f.get("z"), f["tas"]) for f in files]
                    times = steadier_volume(slice_times(slices, 0), slice_times(slices, 1))
                    # a first volume alone can carry single-band times spanning more than TR
                    # (dcm2niix issue 875): then the files' acquisition times are the better clock
                    if times and tr and max(times) * 1000.0 >= tr:
                        times = None
                if times is None:
                    slices = [(f.get("z"), f.get("t")) for f in files]
                    times = steadier_volume(slice_times(slices, 0), slice_times(slices, 1))
        if times and not three_d:
            out["SliceTiming"] = times
        # XA classic polarity (0021,111C): no CSA header to carry PhaseEncodingDirectionPositive
        csa = _csa_tags(_private(first, 0x0029, "SIEMENS CSA HEADER", 0x10))
        positive = files[0].get("pe+") if files and not csa.get("PhaseEncodingDirectionPositive") else None
        ped = {"COLUMN": "COL", "COL": "COL", "ROW": "ROW"}.get((_text(first.get("InPlanePhaseEncodingDirection")) or "").upper())
        if positive in (0, 1) and ped and not three_d:
            negative = (positive == 1) if ped == "COL" else (positive == 0)
            out["PhaseEncodingDirection"] = ("j" if ped == "COL" else "i") + ("-" if negative else "")
        # diffusion
        if enhanced:
            images = [(fr[1], fr[0], fr[2], fr[3]) for f in files for fr in f.get("frames") or []]
        else:
            images = [(f.get("z"), f.get("t"), f.get("b"), f.get("g")) for f in files]
        if iop and any(b is not None for _, _, b, _ in images):
            vols = [(b, g) for _, _, b, g in images] if mosaic else volumes(images)
            out["DiffusionBValues"] = [float(b or 0) for b, _ in vols]
            out["DiffusionGradientDirections"] = [to_bvec_frame(b or 0, g, iop) for b, g in vols]
    except Exception:  # noqa: BLE001 - odd input: report what was found so far
        pass
    return out
