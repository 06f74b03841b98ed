"""Acquisition-scheme keys derived from others: slice order, and the diffusion scheme's shells and directions.

:func:`sitebench.qc.dicom_params.read_series` calls :func:`derived_keys` at the end of the parse and
merges its result, so protocols can lock what a physicist means ("interleaved ascending", "b=0 and
1000 with 30 directions") instead of per-slice times and per-volume vectors that jitter.

Inputs are the BIDS sidecar keys as dcm2niix writes them (Li et al. 2016, J Neurosci Methods 264:47):
``SliceTiming`` (seconds, one per slice, in the order the slices are stored in the NIfTI image),
``MultibandAccelerationFactor``, ``DiffusionBValues`` (s/mm^2, one per volume, the .bval) and
``DiffusionGradientDirections`` ([x, y, z] per volume, the .bvec frame).

Slice order (:func:`slice_order`)
    Judged within one band: with multiband factor MB the slice times repeat every n/MB slices
    (the slices of a band are excited together), so the first n/MB times are the order. Slices
    are ranked by acquisition time; "sequential" is every slice in index order (or reversed);
    "interleaved" is passes through the slices with a step s >= 2, each pass one residue class
    (index mod s) acquired before the next (Siemens starts the pass with index 1 for an even
    slice count, GE with index 0: both are interleaved), ascending when at least 3/4 of the
    steps inside the passes go up (descending: down). The 3/4 admits GE HyperBand's swap of the
    last two slices of a pass (dcm_qa_ge "HB8 int_asc": 0 2 4 6 8 1 3 5 9 7). Times within
    :data:`SAME_TIME_S` are simultaneous. The order is in dcm2niix's slice index: dcm2niix
    reverses the stored slices of a volume with a positive determinant (its "flipZ", e.g.
    Siemens sagittal), so dcm_qa_sag's "Ascending" scan is "sequential-descending" there, in
    both its classic and its enhanced file.

Diffusion scheme (:func:`diffusion_scheme`)
    * b=0 volumes: b <= :data:`B0_THRESHOLD` (10 s/mm^2, MRtrix3's ``BZeroThreshold`` default;
      UIH writes b=1.25 for its b=0 volume).
    * shells: the other b-values sorted and split where neighbours differ by
      :data:`SHELL_EPSILON` (100 s/mm^2) or more, the single-linkage form of MRtrix3's shell
      clustering (``core/dwi/shells.h`` ``DWI_SHELLS_EPSILON`` 100, configurable as
      ``BValueEpsilon``); a shell's value is its median rounded to :data:`SHELL_ROUND`
      (10 s/mm^2), so per-direction jitter of a few s/mm^2 (Siemens writes the effective b of
      each direction) falls into one shell with one value. dcm2niix itself writes b-values as
      the scanner gives them and clusters nothing. b=0 is shell 0 when present.
    * directions: the non-zero vectors of the diffusion-weighted volumes, normalised, one per
      set of vectors within :data:`SAME_DIRECTION_DEG` of each other, sign-invariant (g and -g
      give the same diffusion encoding: the signal depends on (g.D.g)).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["slice_order", "diffusion_scheme", "derived_keys", "distinct_directions", "angle_deg",
           "SLICE_ORDERS", "SAME_TIME_S", "B0_THRESHOLD", "SHELL_EPSILON", "SHELL_ROUND", "SAME_DIRECTION_DEG"]

SLICE_ORDERS = ("sequential-ascending", "sequential-descending", "interleaved-ascending",
                "interleaved-descending", "single-slice", "other")
#: Slice times closer than this (s) are one excitation: dcm2niix writes milliseconds and Siemens
#: steps its times by 2.5 ms, while consecutive slices are at least ~10 ms apart.
SAME_TIME_S = 0.005
#: Share of the within-pass steps that must go one way for a direction to be named.
DIRECTION_SHARE = 0.75
B0_THRESHOLD = 10.0
SHELL_EPSILON = 100.0
SHELL_ROUND = 10.0
SAME_DIRECTION_DEG = 2.0


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _times(slice_timing: Any) -> list[float] | None:
    if not isinstance(slice_timing, (list, tuple)) or not slice_timing:
        return None
    times = [_number(t) for t in slice_timing]
    return None if any(t is None for t in times) else times  # type: ignore[return-value]


def _band(times: list[float], multiband: int | None) -> list[float] | None:
    """The slice times of one band, or None when the times do not repeat as multiband says they must."""
    n = len(times)
    mb = multiband if isinstance(multiband, int) and not isinstance(multiband, bool) and multiband > 1 else None
    candidates = [n // mb] if mb else [k for k in range(1, n) if n % k == 0]
    if mb is None and _distinct(times):
        return times
    for k in candidates:
        if k >= 1 and n % k == 0 and all(abs(times[i] - times[i % k]) <= SAME_TIME_S for i in range(n)):
            band = times[:k]
            if _distinct(band):
                return band
    return None


def _distinct(times: list[float]) -> bool:
    ordered = sorted(times)
    return all(b - a > SAME_TIME_S for a, b in zip(ordered, ordered[1:]))


def _direction(steps: list[int]) -> str | None:
    if not steps:
        return None
    up = sum(1 for s in steps if s > 0) / len(steps)
    if up >= DIRECTION_SHARE:
        return "ascending"
    if up <= 1 - DIRECTION_SHARE:
        return "descending"
    return None


def slice_order(slice_timing: list[float] | None, multiband: int | None = None) -> str | None:
    """"sequential-ascending", ..., "single-slice" or "other"; None without slice times (see module doc).

    The order is within one band for a multiband acquisition (times repeat every n/MB slices); times
    that do not repeat so, or slices of one band acquired together, give "other".
    """
    times = _times(slice_timing)
    if times is None:
        return None
    if len(times) == 1:
        return "single-slice"
    band = _band(times, multiband)
    if band is None:
        return "other"
    k = len(band)
    if k == 1:
        return "other"  # every slice excited at once: no order to name
    order = sorted(range(k), key=lambda i: band[i])
    if order == list(range(k)):
        return "sequential-ascending"
    if order == list(range(k - 1, -1, -1)):
        return "sequential-descending"
    for step in range(2, k):
        residues = [i % step for i in order]
        runs = [r for j, r in enumerate(residues) if j == 0 or residues[j - 1] != r]
        if len(runs) != len(set(runs)) or len(runs) != min(step, k):
            continue  # a residue class split over several passes: not this step
        inside = [b - a for a, b, ra, rb in zip(order, order[1:], residues, residues[1:]) if ra == rb]
        way = _direction(inside)
        if way is not None:
            return f"interleaved-{way}"
        return "other"
    return "other"


# --------------------------------------------------------------------------- diffusion


def _unit(vector: Any) -> tuple[float, float, float] | None:
    if not isinstance(vector, (list, tuple)) or len(vector) != 3:
        return None
    xyz = [_number(v) for v in vector]
    if any(v is None for v in xyz):
        return None
    norm = math.sqrt(sum(v * v for v in xyz))  # type: ignore[operator]
    if norm < 1e-6:
        return None
    return (xyz[0] / norm, xyz[1] / norm, xyz[2] / norm)  # type: ignore[operator]


def angle_deg(a: Sequence[float], b: Sequence[float]) -> float:
    """The sign-invariant angle between two directions (0..90 degrees): g and -g encode alike."""
    ua, ub = _unit(a), _unit(b)
    if ua is None or ub is None:
        return 90.0
    dot = abs(sum(x * y for x, y in zip(ua, ub)))
    return math.degrees(math.acos(min(1.0, dot)))


def distinct_directions(vectors: Any, tol_deg: float = SAME_DIRECTION_DEG) -> list[list[float]]:
    """The distinct non-zero directions among ``vectors`` (unit length, first of each group kept).

    Two directions within ``tol_deg`` (sign-invariant) are one; zero or malformed vectors are skipped.
    """
    kept: list[tuple[float, float, float]] = []
    for vector in vectors if isinstance(vectors, (list, tuple)) else ():
        unit = _unit(vector)
        if unit is not None and all(angle_deg(unit, k) > tol_deg for k in kept):
            kept.append(unit)
    return [[round(c, 6) + 0.0 for c in k] for k in kept]


def _shells(bvalues: list[float]) -> list[float | int]:
    weighted = sorted(b for b in bvalues if b > B0_THRESHOLD)
    groups: list[list[float]] = []
    for b in weighted:
        if groups and b - groups[-1][-1] < SHELL_EPSILON:
            groups[-1].append(b)
        else:
            groups.append([b])
    shells: list[float | int] = [0] if any(b <= B0_THRESHOLD for b in bvalues) else []
    for group in groups:
        mid = len(group) // 2
        median = group[mid] if len(group) % 2 else 0.5 * (group[mid - 1] + group[mid])
        shells.append(int(round(median / SHELL_ROUND) * SHELL_ROUND))
    return shells


def diffusion_scheme(bvalues: Any, directions: Any = None) -> dict[str, Any]:
    """``DiffusionBValueShells``, ``NumberOfDiffusionVolumes``, ``NumberOfB0Volumes`` and, with directions,
    ``NumberOfDiffusionDirections`` (see module doc); {} without usable b-values.

    A direction counts only on a diffusion-weighted volume (b above the b=0 threshold) with a non-zero
    vector; vectors per volume must be as many as the b-values, else no direction count is claimed.
    """
    if not isinstance(bvalues, (list, tuple)) or not bvalues:
        return {}
    values = [_number(b) for b in bvalues]
    if any(b is None or b < 0 for b in values):
        return {}
    out: dict[str, Any] = {
        "DiffusionBValueShells": _shells(values),  # type: ignore[arg-type]
        "NumberOfDiffusionVolumes": len(values),
        "NumberOfB0Volumes": sum(1 for b in values if b <= B0_THRESHOLD),  # type: ignore[operator]
    }
    if isinstance(directions, (list, tuple)) and len(directions) == len(values):
        weighted = [d for b, d in zip(values, directions) if b > B0_THRESHOLD]  # type: ignore[operator]
        out["NumberOfDiffusionDirections"] = len(distinct_directions(weighted))
    return out


def derived_keys(parameters: dict[str, Any]) -> dict[str, Any]:
    """``SliceOrder`` and the diffusion keys whose inputs ``parameters`` hold (for read_series to merge)."""
    out: dict[str, Any] = {}
    mb = parameters.get("MultibandAccelerationFactor")
    if isinstance(mb, float) and mb.is_integer():
        mb = int(mb)
    order = slice_order(parameters.get("SliceTiming"), mb if isinstance(mb, int) else None)
    if order is not None:
        out["SliceOrder"] = order
    out.update(diffusion_scheme(parameters.get("DiffusionBValues"), parameters.get("DiffusionGradientDirections")))
    return out
