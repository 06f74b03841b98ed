"""Philips header values dcm2niix writes that the series parser (dicom_params) leaves out.

Reference: dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56), nii_dicom.cpp:

* classic files keep the MR-modifier attributes of the enhanced format in the private sequence
  (2005,140F) 'Philips MR Imaging DD 005': ParallelReductionFactorInPlane (0018,9069) is there;
* DWI b-values in (0018,9087) or private (2001,1003) 'Philips Imaging DD 001', scanner-frame (LPS)
  directions in (0018,9089) or (2005,10B0/10B1/10B2) 'Philips MR Imaging DD 001', and the direction
  label (2001,1004): 'I' marks the isotropic (trace) image the scanner computes, which dcm2niix
  drops from the .bval/.bvec (and so from the diffusion scheme a protocol checks);
* enhanced files repeat per-frame ScanningSequence (0018,0020) in private frame items, and
  dcm2niix keeps the last one read: for a field map that is the computed B0 map's 'RM' (research
  mode), not the magnitude frames' 'GR'.
"""

from __future__ import annotations

from typing import Any

from sitebench.qc.diffusion_frame import as_floats, to_bvec_frame
from sitebench.qc.dicom_params import _items, _num, _private, _private_fast, _raw_value, _text
from sitebench.qc.per_image import enhanced_frames, frame_item, position_along_normal, volumes

__all__ = ["PER_FILE_TAGS", "file_fields", "series_fields"]

_IMAGING = "Philips Imaging DD 001"
_MR_IMAGING = "Philips MR Imaging DD 001"
_MR_IMAGING_005 = "Philips MR Imaging DD 005"
_BLOCKS = (0x10, 0x11, 0x12, 0x13, 0x14, 0x15)


def _private_tags(group: int, elems: tuple[int, ...]) -> tuple:
    """The creator elements and every block's copy of ``elems``: a creator's block is not fixed."""
    return tuple([(group << 16) | b for b in _BLOCKS]
                 + [(group << 16) | (b << 8) | e for b in _BLOCKS for e in elems])


#: Per-file tags: order (InstanceNumber), slice position and orientation, diffusion (standard and
#: private) and the direction label that marks the isotropic image.
PER_FILE_TAGS: tuple = (
    "InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient", "DiffusionBValue",
    "DiffusionGradientOrientation", "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
    *_private_tags(0x2001, (0x03, 0x04)), *_private_tags(0x2005, (0xB0, 0xB1, 0xB2)),
)


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) and value else value


def file_fields(ds) -> dict[str, Any]:
    """Per-file order, position along the normal and diffusion (b, direction, label)."""
    try:
        out: dict[str, Any] = {}
        if "PerFrameFunctionalGroupsSequence" in ds:
            out["frames"] = enhanced_frames(ds)
            return out
        out["n"] = _num(_raw_value(ds, "InstanceNumber"))
        out["z"] = position_along_normal(_raw_value(ds, "ImagePositionPatient"), _raw_value(ds, "ImageOrientationPatient"))
        b = _raw_value(ds, "DiffusionBValue")
        if b is None:
            b = _private_fast(ds, 0x2001, _IMAGING, 0x03)
        out["b"] = _num(_first(b))
        g = as_floats(_raw_value(ds, "DiffusionGradientOrientation"))
        if g is None:
            parts = [_private_fast(ds, 0x2005, _MR_IMAGING, e) for e in (0xB0, 0xB1, 0xB2)]
            g = as_floats([_first(x) for x in parts]) if all(x is not None for x in parts) else None
        out["g"] = g
        out["label"] = _text(_private_fast(ds, 0x2001, _IMAGING, 0x04))
        return {k: v for k, v in out.items() if v is not None}
    except Exception:  # noqa: BLE001 - a damaged file gives nothing, never an error at intake
        return {}


def _is_trace(b: Any, g: Any, label: Any) -> bool:
    """The scanner's isotropic (trace / ADC) image: b > 0 with label 'I' or no direction."""
    if b is None or float(b) <= 1e-6:
        return False
    if (label or "").strip().upper() == "I":
        return True
    return g is None or sum(float(x) ** 2 for x in g[:3]) <= 1e-12


def _modifier(first, keyword: str) -> Any:
    """An MR-modifier value from the classic file's private (2005,140F) item, else None."""
    for item in _private(first, 0x2005, _MR_IMAGING_005, 0x0F) or []:
        if keyword in item:
            return item[keyword].value
    return None


def _last_frame_value(first, tag: int) -> Any:
    """``tag`` in the last per-frame item (private frame items included), as dcm2niix reads it."""
    frames = _items(first, "PerFrameFunctionalGroupsSequence")
    if not frames:
        return None
    found = None

    def walk(item) -> None:  # depth first, in file order: what a sequential reader sees last wins
        nonlocal found
        for el in item:
            if el.tag == tag:
                found = el.value
            elif el.VR == "SQ":
                for child in el.value or ():
                    walk(child)

    walk(frames[-1])
    return found


def series_fields(first, files: list[dict[str, Any]]) -> dict[str, Any]:
    """ParallelReductionFactorInPlane, enhanced ScanningSequence and diffusion of one Philips series."""
    out: dict[str, Any] = {}
    try:
        enhanced = "PerFrameFunctionalGroupsSequence" in first
        if not enhanced:
            prf = _num(_modifier(first, "ParallelReductionFactorInPlane"))
            if prf is not None and prf > 0:
                out["ParallelReductionFactorInPlane"] = prf
        else:
            scan_seq = _text(_last_frame_value(first, 0x00180020))
            if scan_seq and first.get("ScanningSequence") is None:
                out["ScanningSequence"] = scan_seq
        iop = as_floats(first.get("ImageOrientationPatient"))
        if enhanced:
            for fr in _items(first, "SharedFunctionalGroupsSequence")[:1] + _items(first, "PerFrameFunctionalGroupsSequence")[:1]:
                it = frame_item(fr, "PlaneOrientationSequence")
                if it is not None and "ImageOrientationPatient" in it:
                    iop = as_floats(it.ImageOrientationPatient)
                    break
            images = [(fr[1], i, fr[2], fr[3], None) for f in files for i, fr in enumerate(f.get("frames") or [])]
        else:
            images = [(f.get("z"), f.get("n"), f.get("b"), f.get("g"), f.get("label")) for f in files]
        if iop and len(iop) == 6 and any(b is not None and b > 0 for _, _, b, _, _ in images):
            kept = [(z, n, b, g) for z, n, b, g, label in images if not _is_trace(b, g, label)]
            vols = volumes(kept)
            out["DiffusionBValues"] = [float(b or 0) for b, _ in vols]
            out["DiffusionGradientDirections"] = [to_bvec_frame(b or 0, g, iop) for b, g in vols]
    except Exception:  # noqa: BLE001 - odd input: report what was found so far
        pass
    return out
