"""United Imaging (UIH) header values dcm2niix writes that the series parser (dicom_params) leaves out.

Reference: dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56), nii_dicom.cpp, UIH private
group 0065 'Image Private Header':

* (0065,1051) holds one item per slice of a VFRAME (mosaic-like) image, each with its own
  AcquisitionDateTime (0008,002A) and ImagePositionPatient: SliceTiming is each slice's time
  relative to the first acquired, in ascending position along the slice normal;
* (0065,1009) b-value and (0065,1037) gradient direction, already in the image frame
  (:func:`sitebench.qc.diffusion_frame.uih_bvec`);
* (0065,100D) the acceleration, e.g. ``F:2S``: the first number is the in-plane factor.
"""

from __future__ import annotations

import re
from typing import Any

from sitebench.qc.diffusion_frame import as_floats, uih_bvec
from sitebench.qc.dicom_params import _num, _private, _private_fast, _raw_value, _text
from sitebench.qc.per_image import position_along_normal, seconds, slice_times, volumes

__all__ = ["PER_FILE_TAGS", "file_fields", "series_fields"]

_CREATOR = "Image Private Header"
_BLOCKS = (0x10, 0x11, 0x12, 0x13)

#: Per-file tags: order (InstanceNumber), position, and the diffusion b-value and direction.
PER_FILE_TAGS: tuple = (
    "InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient",
    *[(0x0065 << 16) | b for b in _BLOCKS],
    *[(0x0065 << 16) | (b << 8) | e for b in _BLOCKS for e in (0x09, 0x37)],
)


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) and value else value


def file_fields(ds) -> dict[str, Any]:
    """Per-file order, position along the normal and diffusion (b, image-frame direction)."""
    try:
        out: dict[str, Any] = {
            "n": _num(_raw_value(ds, "InstanceNumber")),
            "z": position_along_normal(_raw_value(ds, "ImagePositionPatient"), _raw_value(ds, "ImageOrientationPatient")),
            "b": _num(_first(_private_fast(ds, 0x0065, _CREATOR, 0x09))),
            "g": as_floats(_private_fast(ds, 0x0065, _CREATOR, 0x37)),
        }
        return {k: v for k, v in out.items() if v is not None}
    except Exception:  # noqa: BLE001 - a damaged file gives nothing, never an error at intake
        return {}


def _acceleration(value: Any) -> float | int | None:
    """(0065,100D) ``F:2S`` -> 2: the first number of the text."""
    match = re.search(r"\d+(?:\.\d+)?", _text(value) or "")
    factor = _num(match.group(0)) if match else None
    return factor if factor is not None and factor >= 1 else None


def _vframe_slice_times(first) -> list[float] | None:
    """SliceTiming from the per-slice items (0065,1051) of the series' first VFRAME image."""
    iop = _raw_value(first, "ImageOrientationPatient")
    slices = []
    for item in _private(first, 0x0065, _CREATOR, 0x51) or []:
        t = seconds(item.get("AcquisitionDateTime")) if "AcquisitionDateTime" in item else None
        if t is None and "AcquisitionTime" in item:
            t = seconds(item.get("AcquisitionTime"))
        z = position_along_normal(item.get("ImagePositionPatient"), iop) if "ImagePositionPatient" in item else None
        slices.append((z, t))
    return slice_times(slices) if len(slices) > 1 else None


def series_fields(first, files: list[dict[str, Any]]) -> dict[str, Any]:
    """ParallelReductionFactorInPlane, SliceTiming and diffusion of one UIH series."""
    out: dict[str, Any] = {}
    try:
        factor = _acceleration(_private(first, 0x0065, _CREATOR, 0x0D))
        if factor is not None:
            out["ParallelReductionFactorInPlane"] = factor
        if _text(first.get("MRAcquisitionType")) != "3D":
            times = _vframe_slice_times(first)
            if times:
                out["SliceTiming"] = times
        images = [(f.get("z"), f.get("n"), f.get("b"), f.get("g")) for f in files]
        if any(b is not None for _, _, b, _ in images):
            vols = volumes(images)
            out["DiffusionBValues"] = [float(b or 0) for b, _ in vols]
            out["DiffusionGradientDirections"] = [uih_bvec(b or 0, g) for b, g in vols]
    except Exception:  # noqa: BLE001 - odd input: report what was found so far
        pass
    return out
