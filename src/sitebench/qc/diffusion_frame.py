"""Diffusion gradient vectors in dcm2niix's .bvec frame, shared by the vendor modules.

dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56), nii_dicom_batch.cpp
``siemensPhilipsCorrectBvecs``: scanner-frame (LPS) gradient directions are projected on the
image's read (row), phase (column) and slice (row x column) axes, normalised, and the y value
negated because dcm2niix writes rows bottom-up (its NIfTI j axis is the DICOM row index flipped).
b-0 and zero-length vectors stay (0, 0, 0). UIH stores image-frame vectors: only y is negated.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["to_bvec_frame", "uih_bvec", "slice_normal", "clean"]


def slice_normal(iop: Sequence[float]) -> list[float] | None:
    """row x column of ImageOrientationPatient (0020,0037), or None if unusable."""
    try:
        r, c = [float(x) for x in iop[:3]], [float(x) for x in iop[3:6]]
    except (TypeError, ValueError, IndexError):
        return None
    if len(r) != 3 or len(c) != 3:
        return None
    return [r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0]]


def _norm(v: Sequence[float]) -> list[float]:
    length = math.sqrt(sum(x * x for x in v))
    return [x / length for x in v] if length > 0 else [0.0, 0.0, 0.0]


def clean(x: float, ndigits: int = 6) -> float:
    """Rounded, without a negative zero (dcm2niix strips the sign of -0)."""
    y = round(float(x), ndigits)
    return 0.0 if y == 0 else y


def _direction(bval: float, vec: Sequence[float] | None) -> list[float] | None:
    """The first three components of a diffusion direction as floats; None for a b=0 volume
    (dcm2niix writes 0 0 0 there) or an unusable vector."""
    if vec is None or bval is None or float(bval) <= 1e-6:
        return None
    try:
        return [float(x) for x in vec[:3]]
    except (TypeError, ValueError):
        return None


def to_bvec_frame(bval: float, vec: Sequence[float] | None, iop: Sequence[float], negate_z: bool = False) -> list[float]:
    """One scanner-frame gradient direction -> dcm2niix .bvec frame (see module docstring).

    ``negate_z``: the slices were written in reverse order (dcm2niix flips the third axis)."""
    v = _direction(bval, vec)
    if v is None or math.sqrt(sum(x * x for x in v)) <= 1e-6:
        return [0.0, 0.0, 0.0]
    read = _norm([float(x) for x in iop[:3]])
    phase = _norm([float(x) for x in iop[3:6]])
    normal = _norm(slice_normal(iop) or [0.0, 0.0, 1.0])
    out = _norm([sum(a * b for a, b in zip(v, axis)) for axis in (read, phase, normal)])
    out[1] = -out[1]
    if negate_z:
        out[2] = -out[2]
    return [clean(x) for x in out]


def uih_bvec(bval: float, vec: Sequence[float] | None) -> list[float]:
    """UIH (0065,1037) is already in the image frame: dcm2niix only negates y."""
    v = _direction(bval, vec)
    if v is None:
        return [0.0, 0.0, 0.0]
    return [clean(v[0]), clean(-v[1]), clean(v[2])]


def as_floats(value: Any) -> list[float] | None:
    """A multi-valued number (DS/FD list, backslash text) as floats, or None."""
    if value is None:
        return None
    if isinstance(value, (bytes, str)):
        value = (value.decode("latin1") if isinstance(value, bytes) else value).split("\\")
    try:
        items = list(value) if hasattr(value, "__iter__") else [value]
        return [float(x) for x in items]
    except (TypeError, ValueError):
        return None
