"""Siemens header values dcm2niix writes that the series parser (dicom_params) leaves out.

Reference: dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56), nii_dicom.cpp (header
parsing: CSA ``MosaicRefAcqTimes``, ``B_value``, ``DiffusionGradientDirection``, XA private
(0021,111C)) and nii_dicom_batch.cpp (slice timing written in NIfTI slice order, bvec rotation).
"""

from __future__ import annotations

from typing import Any

from sitebench.qc.diffusion_frame import as_floats, clean, slice_normal, to_bvec_frame
from sitebench.qc.per_image import enhanced_frames, frame_item, position_along_normal, seconds, slice_times, volumes
from sitebench.qc.dicom_params import _csa_tags, _items, _num, _private, _private_fast, _raw_value, _text

__all__ = ["PER_FILE_TAGS", "file_fields", "series_fields"]


def _private_tags(group: int, elems: tuple[int, ...], blocks: tuple[int, ...] = (0x10, 0x11, 0x12, 0x13)) -> tuple:
    out = [(group << 16) | b for b in blocks]
    out += [(group << 16) | (b << 8) | e for b in blocks for e in elems]
    return tuple(out)


#: Per-file tags: timing (AcquisitionTime/DateTime, XA (0021,1104)), slice position and
#: orientation, instance/acquisition numbers, diffusion (0019,100C/100E; 0018,9087/9089; enhanced
#: groups) and XA classic polarity (0021,111C).
PER_FILE_TAGS: tuple = (
    "InstanceNumber", "AcquisitionNumber", "AcquisitionTime", "AcquisitionDateTime", "ImagePositionPatient",
    "ImageOrientationPatient", "DiffusionBValue", "DiffusionGradientOrientation", "SpecificCharacterSet",
    "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
    *_private_tags(0x0019, (0x0C, 0x0E)), *_private_tags(0x0021, (0x04, 0x1C)),
)


def file_fields(ds) -> dict[str, Any]:
    """Per-file timing, position along the normal, diffusion and XA classic polarity.

    dcm2niix (Li et al. 2016), nii_dicom.cpp: classic XA files have no CSA header, so slice time
    comes from each file's acquisition time and polarity from (0021,111C) 'SIEMENS MR SDI 02';
    V-series diffusion from 'SIEMENS MR HEADER' (0019,100C) B_value / (0019,100E) direction."""
    try:
        out: dict[str, Any] = {}
        if "PerFrameFunctionalGroupsSequence" in ds:
            out["frames"] = enhanced_frames(ds)
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
        return {k: v for k, v in out.items() if v is not None}
    except Exception:  # noqa: BLE001 - a damaged file gives nothing, never an error at intake
        return {}


def _mosaic_times(first) -> list[float] | None:
    """CSA image header (0029,1010) ``MosaicRefAcqTimes`` (ms, mosaic tile order): negative times
    shifted to start at 0 (dcm2niix checkSliceTimes, issue 271), reversed when the CSA
    SliceNormalVector points against row x column (dcm2niix writes the slices flipped then)."""
    csa = _csa_tags(_private(first, 0x0029, "SIEMENS CSA HEADER", 0x10))
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
    normal = slice_normal(first.get("ImageOrientationPatient") or [])
    csa_normal = as_floats(csa.get("SliceNormalVector")) if csa.get("SliceNormalVector") else None
    if normal and csa_normal and len(csa_normal) == 3 and sum(a * b for a, b in zip(normal, csa_normal)) < 0:
        times = times[::-1]
    return [clean(t / 1000.0, 6) for t in times]


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
            times = _mosaic_times(first)
        elif enhanced:
            frames = [fr for f in files[:1] for fr in f.get("frames") or []]
            times = slice_times([(fr[1], fr[0]) for fr in frames])
        else:
            times = slice_times([(f.get("z"), f.get("t")) for f in files])
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
