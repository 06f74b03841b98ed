"""How far :func:`read_series` agrees with dcm2niix's BIDS sidecars, per vendor and per key.

dcm2niix (Li et al. 2016, J Neurosci Methods 264:47-56) is the reference converter of the field;
its validation sets (``neurolabusc/dcm_qa*``) hold scanner DICOM under ``In/`` and dcm2niix's own
sidecars (``.json``, ``.bval``, ``.bvec``) under ``Ref/``. Pointing :func:`agreement` at such sets
measures the header parser on vendors and software versions we have never seen, which is how it
is checked on other teams' data.

A sidecar belongs to a series when SeriesNumber and SeriesDescription agree (dcm2niix writes one
sidecar per echo, complex component or derived volume of a series). A key counts when the sidecar
has it; a key we do not report counts as a disagreement (missing is not agreement). Numbers agree
within 0.1 % (1e-4 absolute), SliceTiming within 1 ms per slice, b-values within 0.5 s/mm^2 and
gradient directions within 2e-3 per component (dcm2niix writes them with 6 significant digits).

SliceTiming that dcm2niix derives from per-image acquisition times (UIH per-slice items, Siemens
and GE classic files) is only as fine as dcm2niix's own reading of a DICOM TM: it holds
``HHMMSS.frac`` as a 32-bit float (nii_dicom.cpp), so after 13:10:72 a time is on a 1/64 s grid,
before it on 1/128 s or finer. Where every reference slice time is a multiple of that grid step
(the sign of such a reading; CSA mosaic times in ms are not), the tolerance is the step: the
difference of two values each rounded by half a step. Reproducing the rounding on the UIH DTI
series gives dcm2niix's sidecar to 5e-6 s, which is how this was established.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from sitebench.errors import SitebenchError

__all__ = ["AGREEMENT_KEYS", "Comparison", "AgreementResult", "agreement", "compare_with_sidecar"]

#: The keys compared, in the order a report lists them.
AGREEMENT_KEYS: tuple[str, ...] = (
    "RepetitionTime", "EchoTime", "FlipAngle", "InversionTime",
    "Manufacturer", "ManufacturersModelName", "SoftwareVersions", "MagneticFieldStrength",
    "SliceThickness", "MRAcquisitionType", "PercentPhaseFOV", "EchoTrainLength", "PixelBandwidth",
    "SequenceName", "ScanningSequence", "SequenceVariant",
    "ParallelReductionFactorInPlane", "MultibandAccelerationFactor",
    "PhaseEncodingDirection", "SliceTiming",
)
#: Pseudo-keys for the diffusion files next to a sidecar.
BVAL, BVEC = "bval", "bvec"


@dataclass
class Comparison:
    """One key of one sidecar: our value, dcm2niix's, and whether they agree."""

    vendor: str
    series: str
    sidecar: str
    key: str
    ours: Any
    reference: Any
    agrees: bool

    def line(self) -> str:
        return f"{self.vendor} {self.series} ({self.sidecar}): {self.key} ours={_short(self.ours)} dcm2niix={_short(self.reference)}"


@dataclass
class AgreementResult:
    """Every comparison made; :meth:`by_vendor` and :meth:`disagreements` summarise them."""

    comparisons: list[Comparison] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # series folders with no sidecar

    def by_vendor(self) -> dict[str, tuple[int, int]]:
        """vendor -> (agreeing, compared)."""
        out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for c in self.comparisons:
            out[c.vendor][1] += 1
            out[c.vendor][0] += int(c.agrees)
        return {v: (a, n) for v, (a, n) in sorted(out.items())}

    def disagreements(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.agrees]

    def summary(self) -> str:
        lines = [f"{'vendor':<10} {'agree':>6} {'of':>6} {'%':>7}"]
        for vendor, (agree, n) in self.by_vendor().items():
            lines.append(f"{vendor:<10} {agree:>6} {n:>6} {100.0 * agree / n:>6.1f}%")
        lines += [c.line() for c in self.disagreements()]
        lines += [f"no sidecar: {s}" for s in self.unmatched]
        return "\n".join(lines)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _close(a: Any, b: Any, rel: float = 1e-3, tol: float = 1e-4) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=rel, abs_tol=tol)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, rel, tol) for x, y in zip(a, b))
    return a == b


def _tm_grid(ref: list, acquisition_time: Any) -> float:
    """The float32 step of dcm2niix's ``HHMMSS.frac`` at the sidecar's AcquisitionTime, when every
    reference slice time lies on that grid (see the module docstring); else 0."""
    try:
        hhmmss = float(str(acquisition_time).replace(":", ""))
        step = 2.0 ** (math.floor(math.log2(hhmmss)) - 23)
        times = [float(r) for r in ref]
    except (TypeError, ValueError):
        return 0.0
    on_grid = all(abs(t / step - round(t / step)) <= 1e-3 for t in times)
    return step if on_grid and any(t > 0 for t in times) else 0.0


def _agrees(key: str, ours: Any, ref: Any, acquisition_time: Any = None) -> bool:
    if ours is None:
        return False
    if key == "EchoTime" and isinstance(ours, list) and not isinstance(ref, list):
        return any(_close(o, ref) for o in ours)  # dcm2niix writes one sidecar per echo
    if key == "SliceTiming":
        tol = max(1e-3, _tm_grid(ref, acquisition_time))
        return (isinstance(ours, list) and len(ours) == len(ref)
                and all(abs(float(o) - float(r)) <= tol + 1e-9 for o, r in zip(ours, ref)))
    if key == BVAL:
        return isinstance(ours, list) and len(ours) == len(ref) and all(abs(o - r) <= 0.5 for o, r in zip(ours, ref))
    if key == BVEC:
        return (isinstance(ours, list) and len(ours) == len(ref)
                and all(len(o) == 3 and all(abs(a - b) <= 2e-3 for a, b in zip(o, r)) for o, r in zip(ours, ref)))
    return _close(ours, ref)


def _diffusion_files(sidecar: Path) -> tuple[list[float] | None, list[list[float]] | None]:
    bval, bvec = sidecar.with_suffix(".bval"), sidecar.with_suffix(".bvec")
    values = [float(x) for x in bval.read_text().split()] if bval.is_file() else None
    vectors = None
    if bvec.is_file():
        rows = [[float(x) for x in line.split()] for line in bvec.read_text().splitlines() if line.strip()]
        if len(rows) == 3:
            vectors = [list(v) for v in zip(*rows)]
    return values, vectors


def compare_with_sidecar(parameters: dict[str, Any], sidecar: Path, series: str = "") -> list[Comparison]:
    """Every :data:`AGREEMENT_KEYS` key the sidecar has, plus its .bval/.bvec, against ``parameters``."""
    ref = json.loads(sidecar.read_text())
    vendor = str(ref.get("Manufacturer") or parameters.get("Manufacturer") or "unknown")
    out = []
    for key in AGREEMENT_KEYS:
        want = ref.get(key)
        if key == "SequenceName" and want is None and vendor != "GE":
            want = ref.get("PulseSequenceName")  # dcm2niix before 2024 filed (0018,9005) under this key
        if want is None:
            continue
        got = parameters.get(key)
        out.append(Comparison(vendor, series, sidecar.name, key, got, want,
                              _agrees(key, got, want, ref.get("AcquisitionTime"))))
    values, vectors = _diffusion_files(sidecar)
    for key, want, got in ((BVAL, values, parameters.get("DiffusionBValues")),
                           (BVEC, vectors, parameters.get("DiffusionGradientDirections"))):
        if want is not None:
            out.append(Comparison(vendor, series, sidecar.name, key, got, want, _agrees(key, got, want)))
    return out


def _series_folders(in_dir: Path) -> list[Path]:
    """Leaf folders with files below ``In`` (each holds one series in the dcm_qa layout)."""
    return sorted({f.parent for f in in_dir.rglob("*") if f.is_file() and f.suffix.lower() not in (".txt", ".md", ".json")})


def agreement(roots: Iterable[str | Path]) -> AgreementResult:
    """Compare every series of every validation set (a folder with ``In/`` and ``Ref/``) under ``roots``.

    A root may be one set or a folder of sets.
    """
    import pydicom

    from sitebench.qc.dicom_params import read_series

    sets: list[Path] = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise SitebenchError("no such folder", root)
        sets += [root] if (root / "In").is_dir() else sorted(p for p in root.iterdir() if (p / "In").is_dir())
    if not sets:
        raise SitebenchError("no validation set (a folder with In/ and Ref/) found", next(iter(map(Path, roots)), Path(".")))
    result = AgreementResult()
    for set_dir in sets:
        sidecars = [(j, json.loads(j.read_text())) for j in sorted((set_dir / "Ref").glob("*.json"))]
        for folder in _series_folders(set_dir / "In"):
            try:
                series_list = read_series(folder)
            except SitebenchError:
                continue
            for series in series_list:
                first = pydicom.dcmread(series.files[0], stop_before_pixels=True)
                number, description = str(first.get("SeriesNumber")), str(first.get("SeriesDescription", "")).strip()
                name = f"{set_dir.name}/{folder.relative_to(set_dir / 'In')}"
                mine = [j for j, ref in sidecars if str(ref.get("SeriesNumber")) == number
                        and str(ref.get("SeriesDescription", "")).strip() == description]
                if not mine:
                    result.unmatched.append(name)
                for sidecar in mine:
                    result.comparisons += compare_with_sidecar(series.parameters, sidecar, name)
    return result
