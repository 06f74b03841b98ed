"""Per-image timing, slice position and diffusion, from classic files or enhanced frames.

Shared by the vendor modules (:mod:`vendor_siemens`, :mod:`vendor_philips`, ...): each one reads
its own private tags, then orders images into slices and volumes the same way dcm2niix does
(Li et al. 2016, J Neurosci Methods 264:47-56; nii_dicom_batch.cpp sorts by position along the
slice normal, then by acquisition order).
"""

from __future__ import annotations

from typing import Any

from sitebench.qc.dicom_params import _items, _num, _text
from sitebench.qc.diffusion_frame import as_floats, clean, slice_normal

__all__ = ["enhanced_frames", "frame_item", "position_along_normal", "seconds", "slice_times", "steadier_volume", "volumes"]


def seconds(value: Any) -> float | None:
    """DICOM TM ``HHMMSS.frac`` or DT ``YYYYMMDDHHMMSS.frac`` -> seconds since midnight."""
    text = _text(value)
    if not text:
        return None
    text = text.split("+")[0].split("-")[0]
    if len(text.split(".")[0]) >= 14:
        text = text[8:]
    try:
        hh, mm, ss = int(text[0:2]), int(text[2:4] or 0), float(text[4:] or 0)
    except ValueError:
        return None
    return hh * 3600 + mm * 60 + ss


def position_along_normal(ipp: Any, iop: Any) -> float | None:
    """ImagePositionPatient projected on row x column (mm): the slice's place in the stack."""
    n = slice_normal(iop) if iop is not None else None
    p = as_floats(ipp)
    if n is None or p is None or len(p) != 3:
        return None
    return round(sum(a * b for a, b in zip(p, n)), 3)


def frame_item(frame, seq_kw: str):
    return next(iter(_items(frame, seq_kw)), None) if frame is not None else None


def enhanced_frames(ds) -> list[list]:
    """[time s, position along the normal, b-value, gradient] per frame of an enhanced file.

    Frame time: FrameContentSequence (0020,9111) FrameAcquisitionDateTime (0018,9074), as dcm2niix
    uses for XA enhanced slice timing; diffusion: MRDiffusionSequence (0018,9117)."""
    shared = next(iter(_items(ds, "SharedFunctionalGroupsSequence")), None)
    out = []
    for fr in _items(ds, "PerFrameFunctionalGroupsSequence"):
        def get(seq_kw, kw):
            for g in (fr, shared):
                it = frame_item(g, seq_kw)
                if it is not None and kw in it:
                    return it[kw].value
            return None
        content = frame_item(fr, "FrameContentSequence")
        t = seconds(content.get("FrameAcquisitionDateTime")) if content is not None else None
        proj = position_along_normal(get("PlanePositionSequence", "ImagePositionPatient"), get("PlaneOrientationSequence", "ImageOrientationPatient"))
        b = _num(get("MRDiffusionSequence", "DiffusionBValue"))
        g = None
        dif = frame_item(fr, "MRDiffusionSequence") or frame_item(shared, "MRDiffusionSequence")
        if dif is not None:
            d = frame_item(dif, "DiffusionGradientDirectionSequence")
            if d is not None:
                g = as_floats(d.get("DiffusionGradientOrientation"))
        out.append([t, proj, b, g])
    return out


def slice_times(slices: list[tuple[float, float]], volume: int = 0) -> list[float] | None:
    """(position along the normal, time) of every slice image -> dcm2niix SliceTiming of one volume.

    ``volume`` counts repeats of each position in time order (0: the first volume; None where a
    position has fewer repeats). dcm2niix writes slices in ascending position along row x
    column, times relative to the first slice acquired."""
    per_z: dict[float, list[float]] = {}
    for z, t in slices:
        if z is None or t is None:
            continue
        per_z.setdefault(z, []).append(t)
    if len(per_z) < 2 or any(len(ts) <= volume for ts in per_z.values()):
        return None
    chosen = {z: sorted(ts)[volume] for z, ts in per_z.items()}
    zs = sorted(chosen)
    t0 = min(chosen.values())
    times = [chosen[z] - t0 for z in zs]
    if max(times) <= 0:
        return None
    return [clean(t, 6) for t in times]


def steadier_volume(first: list[float] | None, second: list[float] | None) -> list[float] | None:
    """The slice times dcm2niix writes when it has two volumes' worth: the second volume's where
    its acquisition span (TA) differs from the first's, else the first's.

    dcm2niix issues 870/875: the first volume of a Siemens series can carry single-band or
    start-up timing (XA30 classic TimeAfterStart, VB17 and VE11 mosaics 2.5 ms short), so
    dcm2niix takes the second volume when the two spans disagree."""
    if first and second and len(first) == len(second) and abs(max(first) - max(second)) > 1e-6:
        return second
    return first or second


def volumes(images: list[tuple[Any, Any, Any, Any]]) -> list[tuple[Any, Any]]:
    """(b, gradient) per volume from per-image (z, order, b, g): volumes in acquisition order, one
    entry per repeat of the first slice position. ``order`` is what orders the images in time: the
    acquisition time (Siemens) or the instance number (Philips, whose DWI files share one time)."""
    zs = [z for z, _, _, _ in images if z is not None]
    if not zs:
        return [(b, g) for _, _, b, g in images]
    ordered = sorted(images, key=lambda x: (x[1] if x[1] is not None else 0.0))
    n_pos = len(set(zs))
    per_z: dict[Any, list] = {}
    for z, _t, b, g in ordered:
        per_z.setdefault(z, []).append((b, g))
    z0 = sorted(per_z)[0]
    if n_pos and len(images) % n_pos == 0:
        return per_z[z0]
    return [(b, g) for _, _, b, g in ordered]
