r"""Locked acquisition protocols and the upload-time verdict on a DICOM series.

A *protocol* is one YAML file per series type (for example "3D T1w for
volumetry"). Series parameters are a flat dict with BIDS sidecar key names and
units, as dcm2niix writes them (seconds for TR/TE/TI, degrees, millimetres),
plus the geometry keys ``PixelSpacing`` ([row, column] mm) and
``SliceCoverageMM`` that the DICOM reader adds.

Protocol YAML::

    name: t1w_volumetry            # letters, digits, '.', '_', '-' (used in file names)
    version: 1
    description: 3D T1w for volumetry
    match:                         # all keys given must hold; regexes are full matches
      SeriesDescription: "anat-T1w_acq-tfl"
      ProtocolName: ".*T1w.*"
      ImageType: [ORIGINAL]        # items that must all be present
      MRAcquisitionType: 3D        # exact
      ScanningSequence: 'GR\\IR'    # single quotes keep YAML from eating backslashes
      SequenceName: '\*tfl3d.*'    # SequenceName, or PulseSequenceName when that is absent
    parameters:
      Manufacturer:     {kind: exact, value: Siemens}
      RepetitionTime:   {kind: rel, value: 2.3, tol: 0.02}
      EchoTime:         {kind: abs, value: 0.00232, tol: 0.001}
      FlipAngle:        {kind: abs, value: 8, tol: 1}
      PixelSpacing:     {kind: abs, value: [0.9, 0.9], tol: 0.05}
      MagneticFieldStrength: {kind: range, min: 2.5, max: 3.5}
      ParallelAcquisitionTechnique: {kind: one_of, values: [GRAPPA, SENSE]}
      PulseSequenceName: {kind: regex, pattern: ".*tfl3d.*", severity: warn}
      SoftwareVersions: {kind: record}
    coverage: {min_mm: 164.2, severity: fail}        # from SliceCoverageMM
    slice_gap: {max_gap_mm: 0.05, severity: fail}    # SpacingBetweenSlices - SliceThickness
    overrides:                     # applied in order; a later one wins for the same key
      - when: {Manufacturer: Siemens, SoftwareVersions: "syngo MR E11.*"}
        parameters:
          EchoTime: {kind: abs, value: 0.00298, tol: 0.001}

Rule kinds (each has ``severity: fail | warn``, default ``fail``; ``record`` has none):

* ``exact`` – strings compare case-sensitively, numbers numerically and exactly
  (3 == 3.0), lists element by element (same length).
* ``abs`` – ``|observed - value| <= tol``; a list value is checked element by element.
* ``rel`` – ``|observed - value| <= tol * |value|``; element by element for lists.
* ``range`` – ``min <= observed <= max``, either bound optional; every element of a list.
* ``one_of`` – observed equals one of ``values`` (compared as ``exact`` does).
* ``regex`` – ``re.fullmatch(pattern, text)``; text is ``str(value)`` and, for a
  list, its items joined with a backslash, the way DICOM writes multi-valued
  fields and dcm2niix writes ``ScanningSequence`` ("GR\IR"): pattern
  ``ORIGINAL\\PRIMARY\\.*`` matches ImageType ["ORIGINAL", "PRIMARY", "M", "ND"].
* ``directions`` – ``values: [[x, y, z], ...]`` and ``tol_deg`` (default 5): the observed list of
  vectors (``DiffusionGradientDirections``, one per volume, zero for b=0) as a SET of distinct
  non-zero directions must have as many directions as ``values`` and each must lie within
  ``tol_deg`` of one of the other side's, sign-invariant (g and -g encode alike) and in any
  order: two DTI schemes with the same count but other directions fail.
* ``record`` – never fails; the observed value goes into ``Verdict.recorded``.

Derived keys (:mod:`sitebench.qc.acquisition_scheme`, added by read_series and, where a
sidecar lacks them, by :func:`check_series` / :func:`draft_protocol`): ``SliceOrder``
(sequential-/interleaved-ascending/-descending, single-slice, other; within one multiband
band), ``DiffusionBValueShells`` (s/mm^2, b=0 as 0, shells clustered as MRtrix3 does),
``NumberOfDiffusionDirections``, ``NumberOfDiffusionVolumes``, ``NumberOfB0Volumes``.

One acquisition, one verdict, whatever its DICOM format: the same acquisition saved as classic
MR images (PS3.3 C.8.3.1) and as an enhanced MR image (C.8.13) gives some keys differently
(dcm2niix writes them as the files say, and so does read_series). :func:`comparable` is the one
place that folds the format out; rules (exact, one_of, regex), match rules and drafts compare
``ScanningSequence`` as a code set with GR/SE folded into EP, ``ImageType`` as value 1, value 2
and the complex component only, and drafts leave ``AcquisitionMatrix`` (absent from enhanced
images) out for ``AcquisitionMatrixPE`` / ``ReconMatrixPE``.

A parameter the series lacks (absent or null) makes its rule *undetermined*,
never a silent pass. A present value of the wrong type (text where a number is
expected, a list of the wrong length) fails.

Overrides: ``when`` maps Manufacturer / ManufacturersModelName / SoftwareVersions
to full-match regexes. An override applies when every ``when`` field is present
and matches; its rules replace the base rules for those keys (or add new keys).
If a ``when`` field is missing from the series while the others match, the
series cannot be placed, so every parameter that override names is undetermined.

Locking: :func:`lock_protocol` writes ``<name>.v<version>.locked.yaml`` (read-only)
with a ``lock`` block {content_sha256, locked_by, locked_utc, reason}.
``content_sha256`` is :func:`sitebench.provenance.sha256_json` of the validated
protocol content (every value, defaults filled in, without the ``lock`` block),
so it covers what the protocol *means*, not its formatting or comments.
:func:`load_protocol` verifies it on every locked file.

Draft defaults (:func:`draft_protocol`), see ``DRAFT_RULES``: exact for
Manufacturer, MRAcquisitionType and the sequence identifiers; TR and TI within
2 % and TE within 1 ms, all failing (a 2 % TR/TI change already shifts T1
contrast enough to matter for volumetry, and vendor rounding stays well inside
it); flip angle within 1 degree; pixel spacing and slice thickness within
0.05 mm; field strength within 0.2 T; AcquisitionMatrixPE and ReconMatrixPE
exact; in-plane acceleration and pixel bandwidth (5 %) as warnings; failing and
exact: multiband factor (it changes the slice timing, the g-factor noise and
the leakage between slices), phase-encoding direction (an AP/PA reversal flips
the susceptibility distortion, and a fieldmap or reversed-PE correction
assumes the locked one) and slice order (slice-timing correction assumes it);
the diffusion scheme failing: b-value shells within 5 %, number of
directions and of volumes exact, the directions set within 5 degrees
(``directions``), b=0 volume count as a warning; software version, model,
coil recorded only; coverage at least 95 % of the reference; slice gap at
most the reference gap + 0.05 mm. Every rule is drafted only when the
reference has its key.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (ValidationError, Field, PrivateAttr, StrictBool, StrictFloat, StrictInt, StrictStr,
                      field_validator)

from sitebench.config import StrictModel, load_yaml
from sitebench.errors import SitebenchError
from sitebench.provenance import sha256_json, utc_now
from sitebench.qc.acquisition_scheme import SAME_DIRECTION_DEG, B0_THRESHOLD, angle_deg, derived_keys, distinct_directions

__all__ = [
    "Protocol", "MatchRules", "Override", "Coverage", "SliceGap", "LockInfo",
    "ExactRule", "AbsRule", "RelRule", "RangeRule", "OneOfRule", "RegexRule", "RecordRule", "DirectionsRule",
    "Deviation", "Verdict", "LockedProtocol",
    "draft_protocol", "load_protocol", "lock_protocol", "locked_file_name",
    "check_series", "match_protocol", "with_derived", "suggest_name", "DRAFT_RULES", "comparable", "same_comparable", "FORMAT_DEPENDENT_KEYS",
]

Severity = Literal["fail", "warn"]
Number = Union[StrictInt, StrictFloat]
Scalar = Union[StrictBool, StrictInt, StrictFloat, StrictStr]

_EPS = 1e-9  # float slack on tolerance boundaries (0.9 + 0.05 must pass 0.95)


# --------------------------------------------------------------------------- values


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_value(value: Any) -> str:
    """A parameter value as a deviation line shows it (6 significant digits, lists bracketed)."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _same(expected: Any, observed: Any) -> bool:
    """Exact comparison: strings case-sensitive, numbers numerically, lists elementwise."""
    if isinstance(expected, (list, tuple)):
        return (isinstance(observed, (list, tuple)) and len(expected) == len(observed)
                and all(_same(e, o) for e, o in zip(expected, observed)))
    if isinstance(expected, bool) or isinstance(observed, bool):
        return isinstance(expected, bool) and isinstance(observed, bool) and expected == observed
    if _is_number(expected):
        return _is_number(observed) and float(expected) == float(observed)
    if isinstance(expected, str):
        return isinstance(observed, str) and expected == observed
    return expected == observed


def _pairs(expected: Any, observed: Any) -> list[tuple[float, float]] | None:
    """Numeric (expected, observed) pairs, or None when shapes or types do not fit."""
    if isinstance(expected, list):
        if not isinstance(observed, (list, tuple)) or len(observed) != len(expected):
            return None
        if not all(_is_number(o) for o in observed):
            return None
        return [(float(e), float(o)) for e, o in zip(expected, observed)]
    if not _is_number(observed):
        return None
    return [(float(expected), float(observed))]


def _numbers(observed: Any) -> list[float] | None:
    items = list(observed) if isinstance(observed, (list, tuple)) else [observed]
    if not items or not all(_is_number(o) for o in items):
        return None
    return [float(o) for o in items]


def _regex_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value)


def _compile(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression ({exc})") from None
    return pattern


# --------------------------------------------------------------------------- format-independent view

#: Keys whose value depends on how the acquisition was saved (classic or enhanced MR DICOM), not on
#: the acquisition; :func:`comparable` is their one format-independent view (see the module doc).
FORMAT_DEPENDENT_KEYS: frozenset[str] = frozenset({"ScanningSequence", "ImageType", "AcquisitionMatrix"})
_COMPLEX_WORDS = ("MAGNITUDE", "PHASE", "REAL", "IMAGINARY")
#: Value 3 of a classic MR ImageType as Siemens and Philips write the complex component.
_COMPLEX_LETTERS = {"M": "MAGNITUDE", "P": "PHASE", "R": "REAL", "I": "IMAGINARY"}
_NOT_IN_ENHANCED = {"AcquisitionMatrix": "AcquisitionMatrix (0018,1310) is not in enhanced MR images "
                                         "(PS3.3 C.8.13); lock AcquisitionMatrixPE / ReconMatrixPE instead"}

#: Parameters some vendors never write to DICOM, so the gate cannot check them on their files: the
#: rule stays undetermined (never a pass) and says why. Phase-encoding polarity: Canon/Toshiba and
#: Philips record the axis (0018,1312) but not the sign (dcm2niix Canon and Philips notes).
_NOT_RECORDED_BY_VENDOR = {
    "PhaseEncodingDirection": ({"Canon", "Toshiba", "Philips"},
                               "{vendor} does not record phase-encoding polarity in DICOM (only the axis, "
                               "InPlanePhaseEncodingDirectionDICOM): an AP/PA reversal cannot be seen in the "
                               "header; confirm it at the console or with a reverse-polarity reference scan"),
}


def _missing_note(key: str, values: dict[str, Any]) -> str:
    """Why a parameter is absent: not in enhanced files, not written by this vendor, or just missing."""
    if key in _NOT_IN_ENHANCED:
        return _NOT_IN_ENHANCED[key]
    vendors, note = _NOT_RECORDED_BY_VENDOR.get(key, (set(), ""))
    vendor = values.get("Manufacturer")
    if vendor in vendors:
        return note.format(vendor=vendor)
    return "parameter missing from the series"


def _items(value: Any) -> list[str]:
    raw = value if isinstance(value, (list, tuple)) else str(value).split("\\")
    return [str(v).strip().upper() for v in raw if str(v).strip()]


def comparable(key: str, value: Any) -> Any:
    """The format-independent view of one parameter value; other keys' values come back unchanged.

    * ``ScanningSequence``: the codes once each, as written, backslash-joined, and compared as a set;
      GR and SE are folded into EP. Classic MR writes (0018,0020) (C.8.3.1, e.g. "GR\\EP"); the enhanced MR
      image (C.8.13) has no such attribute, and dcm2niix derives the codes from EchoPulseSequence
      and friends, writing "EP" for the same acquisition. The echo type of an EPI is still checked
      through SequenceName / PulseSequenceName and EchoTime.
    * ``ImageType``: only what both formats mean alike: value 1 (ORIGINAL / DERIVED), value 2
      (PRIMARY / SECONDARY) and the complex component (MAGNITUDE, PHASE, REAL, IMAGINARY: a word
      anywhere after value 2, as dcm2niix appends it, or Siemens/Philips' M/P/R/I in value 3).
      Values 3 and 4 are implementation-specific in classic MR (C.8.3.1.1.1: "M\\ND\\MFSPLIT") and
      Image Flavor / Derived Pixel Contrast in enhanced MR (C.8.16.1: "FMRI\\NONE"), so they differ
      between the two files of one acquisition.
    * ``AcquisitionMatrix``: unchanged, but absent from enhanced images (C.8.13 has no (0018,1310)):
      drafts leave it out and lock AcquisitionMatrixPE / ReconMatrixPE, which both formats give.
    """
    if value is None or key not in FORMAT_DEPENDENT_KEYS:
        return value
    if key == "ScanningSequence":
        codes = list(dict.fromkeys(_items(value)))  # as written, once each; compared as a set
        if "EP" in codes:
            codes = [c for c in codes if c not in ("GR", "SE")]
        return "\\".join(codes)
    if key == "ImageType":
        items = _items(value)
        out = [v for v, allowed in zip(items[:2], (("ORIGINAL", "DERIVED"), ("PRIMARY", "SECONDARY")))
               if v in allowed]
        component = next((v for v in items[2:] if v in _COMPLEX_WORDS), None)
        if component is None and len(items) > 2:
            component = _COMPLEX_LETTERS.get(items[2])
        return out + ([component] if component else [])
    return value


def _pair(key: str, expected: Any, observed: Any) -> tuple[Any, Any]:
    """Both values in the comparable view; an ImageType complex component one side does not state is
    left out of both (an enhanced file states it per frame, which read_series may not give)."""
    a, b = comparable(key, expected), comparable(key, observed)
    if key == "ScanningSequence" and isinstance(a, str) and isinstance(b, str):
        a, b = sorted(a.split("\\")), sorted(b.split("\\"))  # a code set: "GR\\IR" is "IR\\GR"
    if key == "ImageType" and isinstance(a, list) and isinstance(b, list):
        has_a = bool(a) and a[-1] in _COMPLEX_WORDS
        has_b = bool(b) and b[-1] in _COMPLEX_WORDS
        if has_a != has_b:
            a, b = (a[:-1] if has_a else a), (b[:-1] if has_b else b)
    return a, b


def same_comparable(key: str, expected: Any, observed: Any) -> bool:
    """``expected`` and ``observed`` are the same value once the DICOM format is folded out (exact rule)."""
    return _same(*_pair(key, expected, observed))


def _regex_holds(key: str | None, pattern: str, observed: Any) -> bool:
    """A full match of the raw text, or, for a format-dependent key, of its comparable view; a pattern
    that is a literal code list ("GR\\\\EP") is compared as a value in the comparable view."""
    if re.fullmatch(pattern, _regex_text(observed)) is not None:
        return True
    if key not in FORMAT_DEPENDENT_KEYS:
        return False
    if re.fullmatch(pattern, _regex_text(comparable(key, observed))) is not None:
        return True
    if re.fullmatch(r"[A-Za-z0-9]+(\\\\[A-Za-z0-9]+)*", pattern):
        return same_comparable(key, pattern.replace("\\\\", "\\"), observed)
    return False


# --------------------------------------------------------------------------- rules


class _Rule(StrictModel):
    severity: Severity = "fail"
    #: the parameter this rule judges, set by :meth:`Protocol.rules_for` (not content: never hashed
    #: or saved); a format-dependent key is compared in its :func:`comparable` view
    _key: str | None = PrivateAttr(default=None)

    def bound(self, key: str) -> "_Rule":
        """This rule, judging ``key`` (a copy when the key's value depends on the DICOM format)."""
        if key not in FORMAT_DEPENDENT_KEYS or self._key == key:
            return self
        copy = self.model_copy()
        copy._key = key
        return copy

    def describe(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def holds(self, observed: Any) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError


class ExactRule(_Rule):
    kind: Literal["exact"]
    value: Union[Scalar, list[Scalar]]

    def describe(self) -> str:
        return f"exactly {format_value(self.value)}"

    def holds(self, observed: Any) -> bool:
        return same_comparable(self._key, self.value, observed) if self._key else _same(self.value, observed)


class AbsRule(_Rule):
    kind: Literal["abs"]
    value: Union[Number, list[Number]]
    tol: Annotated[float, Field(ge=0)]

    def describe(self) -> str:
        return f"{format_value(self.value)} ± {format_value(self.tol)}"

    def holds(self, observed: Any) -> bool:
        pairs = _pairs(self.value, observed)
        return pairs is not None and all(abs(o - e) <= self.tol + _EPS * max(1.0, abs(e)) for e, o in pairs)


class RelRule(_Rule):
    kind: Literal["rel"]
    value: Union[Number, list[Number]]
    tol: Annotated[float, Field(ge=0)]

    def describe(self) -> str:
        return f"{format_value(self.value)} ± {self.tol * 100:g}%"

    def holds(self, observed: Any) -> bool:
        pairs = _pairs(self.value, observed)
        return pairs is not None and all(
            abs(o - e) <= self.tol * abs(e) + _EPS * max(1.0, abs(e)) for e, o in pairs)


class RangeRule(_Rule):
    kind: Literal["range"]
    min: Number | None = None
    max: Number | None = None

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"between {format_value(self.min)} and {format_value(self.max)}"
        if self.min is not None:
            return f">= {format_value(self.min)}"
        if self.max is not None:
            return f"<= {format_value(self.max)}"
        return "any number"

    def holds(self, observed: Any) -> bool:
        values = _numbers(observed)
        if values is None:
            return False
        return all((self.min is None or v >= self.min - _EPS * max(1.0, abs(self.min)))
                   and (self.max is None or v <= self.max + _EPS * max(1.0, abs(self.max)))
                   for v in values)


class OneOfRule(_Rule):
    kind: Literal["one_of"]
    values: Annotated[list[Union[Scalar, list[Scalar]]], Field(min_length=1)]

    def describe(self) -> str:
        return "one of " + ", ".join(format_value(v) for v in self.values)

    def holds(self, observed: Any) -> bool:
        if self._key:
            return any(same_comparable(self._key, v, observed) for v in self.values)
        return any(_same(v, observed) for v in self.values)


class RegexRule(_Rule):
    kind: Literal["regex"]
    pattern: str

    @field_validator("pattern")
    @classmethod
    def _valid_regex(cls, value: str) -> str:
        return _compile(value)

    def describe(self) -> str:
        return f"matches /{self.pattern}/"

    def holds(self, observed: Any) -> bool:
        return _regex_holds(self._key, self.pattern, observed)


def _vector(value: list[float]) -> list[float]:
    if math.sqrt(sum(float(v) ** 2 for v in value)) < 1e-6:
        raise ValueError("a direction must be a non-zero [x, y, z]")
    return value


Direction = Annotated[list[Number], Field(min_length=3, max_length=3)]


class DirectionsRule(_Rule):
    """The diffusion directions as a set: the same count, each within ``tol_deg`` of one of the other's.

    Sign-invariant (g and -g encode the same diffusion) and order-free; zero vectors (b=0 volumes)
    are skipped, directions within 2 degrees of each other count once. Two schemes with the same
    number of directions but other directions fail. Compared in the frame of the observed value:
    dcm2niix's .bvec frame for ``DiffusionGradientDirections`` (image axes), so a scanner that
    applies its table in the magnet frame turns an angulated prescription into other directions.
    """

    kind: Literal["directions"]
    values: Annotated[list[Direction], Field(min_length=1)]
    tol_deg: Annotated[float, Field(gt=0, le=45)] = 5.0

    @field_validator("values")
    @classmethod
    def _non_zero(cls, values: list[list[float]]) -> list[list[float]]:
        return [_vector(v) for v in values]

    def describe(self) -> str:
        n = len(distinct_directions(self.values))
        return f"the reference's {n} diffusion directions, each within {self.tol_deg:g} deg (sign-invariant)"

    def holds(self, observed: Any) -> bool:
        if not isinstance(observed, (list, tuple)) or not observed:
            return False
        if not all(isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_number(x) for x in v) for v in observed):
            return False
        want, got = distinct_directions(self.values), distinct_directions(observed)
        if len(want) != len(got):
            return False
        near = lambda a, rest: any(angle_deg(a, b) <= self.tol_deg + 1e-9 for b in rest)  # noqa: E731
        return all(near(w, got) for w in want) and all(near(g, want) for g in got)


class RecordRule(StrictModel):
    kind: Literal["record"]

    def describe(self) -> str:
        return "recorded only"

    def bound(self, key: str) -> "RecordRule":
        return self


Rule = Annotated[Union[ExactRule, AbsRule, RelRule, RangeRule, OneOfRule, RegexRule, DirectionsRule, RecordRule],
                 Field(discriminator="kind")]


# --------------------------------------------------------------------------- protocol model


class MatchRules(StrictModel):
    """Which incoming series are this protocol's type; every rule given must hold."""

    SeriesDescription: str | None = None
    ProtocolName: str | None = None
    ImageType: list[str] | None = None
    MRAcquisitionType: str | None = None
    ScanningSequence: str | None = None
    SequenceName: str | None = None

    @field_validator("SeriesDescription", "ProtocolName", "ScanningSequence", "SequenceName")
    @classmethod
    def _valid_regex(cls, value: str | None) -> str | None:
        return None if value is None else _compile(value)

    def is_empty(self) -> bool:
        return all(v is None for v in self.model_dump().values())

    def matches(self, parameters: dict[str, Any]) -> bool:
        for key in ("SeriesDescription", "ProtocolName", "ScanningSequence"):
            pattern = getattr(self, key)
            if pattern is not None:
                value = parameters.get(key)
                if value is None or not _regex_holds(key, pattern, value):
                    return False
        if self.SequenceName is not None:
            value = parameters.get("SequenceName")
            if value is None:
                value = parameters.get("PulseSequenceName")
            if value is None or re.fullmatch(self.SequenceName, _regex_text(value)) is None:
                return False
        if self.MRAcquisitionType is not None and parameters.get("MRAcquisitionType") != self.MRAcquisitionType:
            return False
        if self.ImageType is not None:
            observed = parameters.get("ImageType")
            if isinstance(observed, str):
                observed = observed.split("\\")
            if not isinstance(observed, (list, tuple)):
                return False
            # an item matches as written, or in the comparable view (M = MAGNITUDE): items that only
            # one DICOM format writes (ND, MFSPLIT, FMRI) match only that format's files
            have = {str(v) for v in observed} | set(comparable("ImageType", observed))
            if not all(item in have or _COMPLEX_LETTERS.get(item.upper()) in have for item in self.ImageType):
                return False
        return True


class Coverage(StrictModel):
    min_mm: Annotated[float, Field(gt=0)]
    severity: Severity = "fail"


class SliceGap(StrictModel):
    max_gap_mm: float
    severity: Severity = "fail"


class OverrideWhen(StrictModel):
    Manufacturer: str | None = None
    ManufacturersModelName: str | None = None
    SoftwareVersions: str | None = None

    @field_validator("Manufacturer", "ManufacturersModelName", "SoftwareVersions")
    @classmethod
    def _valid_regex(cls, value: str | None) -> str | None:
        return None if value is None else _compile(value)

    def describe(self) -> str:
        return ", ".join(f"{k}=/{v}/" for k, v in self.model_dump(exclude_none=True).items())

    def decide(self, parameters: dict[str, Any]) -> bool | None:
        """True: applies; False: does not; None: a field it needs is missing."""
        missing = False
        for key, pattern in self.model_dump(exclude_none=True).items():
            value = parameters.get(key)
            if value is None:
                missing = True
            elif re.fullmatch(pattern, _regex_text(value)) is None:
                return False
        return None if missing else True


class Override(StrictModel):
    when: OverrideWhen
    parameters: dict[str, Rule]

    @field_validator("when")
    @classmethod
    def _not_empty(cls, value: OverrideWhen) -> OverrideWhen:
        if not value.model_dump(exclude_none=True):
            raise ValueError("needs at least one of Manufacturer, ManufacturersModelName, SoftwareVersions")
        return value


class LockInfo(StrictModel):
    content_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    locked_by: str
    locked_utc: str
    reason: str


class Protocol(StrictModel):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    version: Annotated[int, Field(ge=1)]
    description: str = ""
    match: MatchRules = Field(default_factory=MatchRules)
    parameters: dict[str, Rule] = Field(default_factory=dict)
    coverage: Coverage | None = None
    slice_gap: SliceGap | None = None
    overrides: list[Override] = Field(default_factory=list)
    #: image-quality metric -> rule (keys of sitebench.qc.image_quality.METRIC_KEYS)
    image_quality: dict[str, Rule] = Field(default_factory=dict)
    lock: LockInfo | None = None

    def content(self) -> dict[str, Any]:
        """The protocol as JSON-able data, without the lock block: what the hash covers.

        An empty ``image_quality`` is left out, so protocols locked before it existed keep their hash.
        """
        data = self.model_dump(mode="json", exclude={"lock"})
        if not data["image_quality"]:
            del data["image_quality"]
        return data

    def content_sha256(self) -> str:
        return sha256_json(self.content())

    @property
    def locked(self) -> bool:
        return self.lock is not None

    def rules_for(self, parameters: dict[str, Any]) -> tuple[dict[str, Any], list[int], dict[str, str]]:
        """Rules after overrides: (rules, indexes of applied overrides, key -> why undecidable)."""
        rules: dict[str, Any] = {key: rule.bound(key) for key, rule in self.parameters.items()}
        applied: list[int] = []
        undecided: dict[str, str] = {}
        for index, override in enumerate(self.overrides):
            decision = override.when.decide(parameters)
            if decision is True:
                rules.update({key: rule.bound(key) for key, rule in override.parameters.items()})
                applied.append(index)
                for key in override.parameters:
                    undecided.pop(key, None)
            elif decision is None:
                needed = [k for k in override.when.model_dump(exclude_none=True) if parameters.get(k) is None]
                for key in override.parameters:
                    undecided[key] = (f"rule depends on {', '.join(needed)} (override {index}: "
                                      f"{override.when.describe()}), which the series lacks")
                    rules.setdefault(key, override.parameters[key].bound(key))
        return rules, applied, undecided

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        kind_first = lambda rules: {k: {"kind": r["kind"], **r} for k, r in rules.items()}  # noqa: E731
        data["parameters"] = kind_first(data["parameters"])
        if data.get("image_quality"):
            data["image_quality"] = kind_first(data["image_quality"])
        else:
            data.pop("image_quality", None)
        for override in data["overrides"]:
            override["parameters"] = kind_first(override["parameters"])
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=None, width=100)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path


# --------------------------------------------------------------------------- drafting

#: key -> rule (without ``value``) that :func:`draft_protocol` uses when the reference has the key.
DRAFT_RULES: dict[str, dict[str, Any]] = {
    "Manufacturer": {"kind": "exact"},
    "MagneticFieldStrength": {"kind": "abs", "tol": 0.2},
    "MRAcquisitionType": {"kind": "exact"},
    "ScanningSequence": {"kind": "exact"},
    "SequenceVariant": {"kind": "exact"},
    "SequenceName": {"kind": "exact"},
    "PulseSequenceName": {"kind": "exact"},
    "RepetitionTime": {"kind": "rel", "tol": 0.02},
    "EchoTime": {"kind": "abs", "tol": 0.001},
    "InversionTime": {"kind": "rel", "tol": 0.02},
    "FlipAngle": {"kind": "abs", "tol": 1},
    "PixelSpacing": {"kind": "abs", "tol": 0.05},
    "SliceThickness": {"kind": "abs", "tol": 0.05},
    "NumberOfSlices": {"kind": "exact"},
    "AcquisitionMatrixPE": {"kind": "exact"},
    "ReconMatrixPE": {"kind": "exact"},
    "ParallelReductionFactorInPlane": {"kind": "exact", "severity": "warn"},
    "MultibandAccelerationFactor": {"kind": "exact"},
    "PixelBandwidth": {"kind": "rel", "tol": 0.05, "severity": "warn"},
    "PhaseEncodingDirection": {"kind": "exact"},
    "SliceOrder": {"kind": "exact"},
    "DiffusionBValueShells": {"kind": "rel", "tol": 0.05},
    "NumberOfDiffusionDirections": {"kind": "exact"},
    "NumberOfDiffusionVolumes": {"kind": "exact"},
    "NumberOfB0Volumes": {"kind": "exact", "severity": "warn"},
    "DiffusionGradientDirections": {"kind": "directions", "tol_deg": 5.0},
    "SoftwareVersions": {"kind": "record"},
    "ManufacturersModelName": {"kind": "record"},
    "ReceiveCoilName": {"kind": "record"},
    "CoilString": {"kind": "record"},
}

DRAFT_COVERAGE_FRACTION = 0.95
DRAFT_GAP_SLACK_MM = 0.05


def draft_protocol(parameters: dict[str, Any], name: str, description: str = "") -> Protocol:
    """A version-1 protocol drafted from one reference series, for a physicist to review and lock.

    Format-dependent values are drafted in their :func:`comparable` view, so a classic and an
    enhanced file of one acquisition draft the same rules; AcquisitionMatrix is never drafted
    (enhanced MR has none: AcquisitionMatrixPE / ReconMatrixPE are). The diffusion directions are
    drafted as the distinct directions of the diffusion-weighted volumes.
    """
    parameters = with_derived(parameters)
    rules: dict[str, Any] = {}
    for key, template in DRAFT_RULES.items():
        value = parameters.get(key)
        if value is None:
            continue
        rule = dict(template)
        if rule["kind"] == "directions":
            bvalues = parameters.get("DiffusionBValues")
            weighted = value
            if isinstance(bvalues, (list, tuple)) and len(bvalues) == len(value):
                weighted = [v for b, v in zip(bvalues, value) if not (_is_number(b) and b <= B0_THRESHOLD)]
            directions = distinct_directions(weighted, SAME_DIRECTION_DEG)
            if directions:
                rules[key] = {**rule, "values": directions}
            continue
        value = comparable(key, value)
        if rule["kind"] != "record":
            if rule["kind"] in ("abs", "rel") and _numbers(value) is None:
                rule = {"kind": "exact", **({"severity": rule["severity"]} if "severity" in rule else {})}
            rule["value"] = list(value) if isinstance(value, tuple) else value
        rules[key] = rule
    match: dict[str, Any] = {}
    if parameters.get("SeriesDescription") is not None:
        match["SeriesDescription"] = re.escape(str(parameters["SeriesDescription"])).replace("\\-", "-")
    if parameters.get("MRAcquisitionType") is not None:
        match["MRAcquisitionType"] = str(parameters["MRAcquisitionType"])
    data: dict[str, Any] = {"name": name, "version": 1, "description": description,
                            "match": match, "parameters": rules}
    coverage = parameters.get("SliceCoverageMM")
    if _is_number(coverage) and coverage > 0:
        data["coverage"] = {"min_mm": round(DRAFT_COVERAGE_FRACTION * float(coverage), 3), "severity": "fail"}
    spacing = parameters.get("MaxSliceStepMM")
    spacing = spacing if _is_number(spacing) else parameters.get("SpacingBetweenSlices")
    thickness = parameters.get("SliceThickness")
    if _is_number(spacing) and _is_number(thickness):
        gap = max(float(spacing) - float(thickness), 0.0)
        data["slice_gap"] = {"max_gap_mm": round(gap + DRAFT_GAP_SLACK_MM, 3), "severity": "fail"}
    return _parse_protocol(data, f"draft protocol '{name}'")


# --------------------------------------------------------------------------- load / lock


def locked_file_name(name: str, version: int) -> str:
    return f"{name}.v{version}.locked.yaml"


_RULE_KINDS = {"exact", "abs", "rel", "range", "one_of", "regex", "directions", "record"}


def _parse_protocol(data: dict[str, Any], source: str | Path) -> Protocol:
    """Validate protocol data; an unknown key is reported before any other problem.

    Errors read like :func:`sitebench.config.parse_config`'s, without pydantic's
    union tag in the key path ("parameters.EchoTime.tolerance", not "...EchoTime.abs.tolerance").
    """
    try:
        return Protocol.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        loc = list(error["loc"])
        for i in range(2, len(loc)):
            if loc[i - 2] in ("parameters", "image_quality") and loc[i] in _RULE_KINDS:
                del loc[i]
                break
        where = ".".join(str(part) for part in loc) or "(top level)"
        if error["type"] == "extra_forbidden":
            raise SitebenchError(f"unknown key '{where}'", source) from None
        if error["type"] == "missing":
            raise SitebenchError(f"missing key '{where}'", source) from None
        raise SitebenchError(f"key '{where}': {error['msg']}", source) from None


def load_protocol(path: str | Path) -> Protocol:
    """Read a protocol YAML; a locked one must still carry the content it was locked with."""
    path = Path(path)
    protocol = _parse_protocol(load_yaml(path), path)
    if protocol.lock is not None:
        actual = protocol.content_sha256()
        if actual != protocol.lock.content_sha256:
            raise SitebenchError(
                f"locked protocol '{protocol.name}' v{protocol.version} was edited after it was locked "
                f"(content sha256 {actual[:12]}… != locked {protocol.lock.content_sha256[:12]}…); "
                "restore the file, or change the draft and lock it as a new version", path)
    return protocol


@dataclass(frozen=True)
class LockedProtocol:
    protocol: Protocol
    path: Path
    content_sha256: str
    locked_by: str
    locked_utc: str
    reason: str
    created: bool  # False when identical content was already locked (idempotent re-lock)
    audit_record: dict[str, Any]  # describes the lock in force; append it to the audit trail when ``created``


def _locked_result(protocol: Protocol, path: Path, created: bool) -> LockedProtocol:
    lock = protocol.lock
    assert lock is not None
    audit = {"who": lock.locked_by, "what": "protocol locked", "when": lock.locked_utc, "why": lock.reason,
             "protocol": protocol.name, "version": protocol.version, "content_sha256": lock.content_sha256}
    return LockedProtocol(protocol=protocol, path=path, content_sha256=lock.content_sha256,
                          locked_by=lock.locked_by, locked_utc=lock.locked_utc, reason=lock.reason,
                          created=created, audit_record=audit)


def lock_protocol(protocol_path: str | Path, who: str, why: str, lock_dir: str | Path) -> LockedProtocol:
    """Write the immutable ``<name>.v<version>.locked.yaml`` copy of a protocol into ``lock_dir``.

    Locking identical content again returns the existing lock (``created=False``); different
    content under a locked name and version is refused: a change is a new version.
    """
    if not str(who).strip():
        raise SitebenchError("locking needs who is locking it", protocol_path)
    if not str(why).strip():
        raise SitebenchError("locking needs a reason", protocol_path)
    draft = load_protocol(protocol_path)
    sha = draft.content_sha256()
    lock_dir = Path(lock_dir)
    target = lock_dir / locked_file_name(draft.name, draft.version)
    if target.exists():
        existing = load_protocol(target)
        if (existing.name, existing.version) != (draft.name, draft.version) or existing.content_sha256() != sha:
            raise SitebenchError(
                f"protocol '{draft.name}' version {draft.version} is already locked in {target} with different "
                f"content; a change is a new version: raise 'version' in {protocol_path} and lock again", target)
        return _locked_result(existing, target, created=False)
    locked = draft.model_copy(update={"lock": LockInfo(content_sha256=sha, locked_by=str(who).strip(),
                                                       locked_utc=utc_now(), reason=" ".join(str(why).split()))})
    lock_dir.mkdir(parents=True, exist_ok=True)
    header = (f"# LOCKED protocol {draft.name} v{draft.version}: do not edit. "
              "A change is a new version; lock it with its own version number.\n")
    try:
        with open(target, "x", encoding="utf-8") as handle:
            handle.write(header + locked.to_yaml())
    except FileExistsError:  # someone locked it between our check and our write
        return lock_protocol(protocol_path, who, why, lock_dir)
    os.chmod(target, 0o444)
    return _locked_result(load_protocol(target), target, created=True)


# --------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class Deviation:
    parameter: str
    expected: str
    observed: Any
    rule: str  # rule kind: exact, abs, rel, range, one_of, regex, coverage, slice_gap
    severity: str
    status: str  # fail | warn | undetermined (pass only in Verdict.checks)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        from sitebench.provenance import jsonable

        data = {"parameter": self.parameter, "expected": self.expected, "observed": jsonable(self.observed),
                "rule": self.rule, "severity": self.severity, "status": self.status}
        if self.note:
            data["note"] = self.note
        return data

    def line(self) -> str:
        observed = "missing" if self.observed is None else format_value(self.observed)
        text = f"{self.status.upper()} {self.parameter}: expected {self.expected}, observed {observed}"
        return text + (f" ({self.note})" if self.note else "")


@dataclass
class Verdict:
    status: str  # pass | warn | fail | undetermined
    protocol: str
    version: int
    content_sha256: str
    deviations: list[Deviation] = field(default_factory=list)
    checks: list[Deviation] = field(default_factory=list)  # every check, passes included
    recorded: dict[str, Any] = field(default_factory=dict)
    overrides_applied: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from sitebench.provenance import jsonable

        return {"status": self.status, "protocol": self.protocol, "version": self.version,
                "content_sha256": self.content_sha256,
                "deviations": [d.to_dict() for d in self.deviations],
                "checks": [c.to_dict() for c in self.checks],
                "recorded": jsonable(self.recorded), "overrides_applied": list(self.overrides_applied)}

    def summary(self) -> str:
        head = f"{self.status.upper()}: protocol {self.protocol} v{self.version}"
        if not self.deviations:
            return f"{head}, {len(self.checks)} checks passed"
        return head + "; " + "; ".join(d.line() for d in self.deviations)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def with_derived(parameters: dict[str, Any]) -> dict[str, Any]:
    """``parameters`` with the keys :func:`~sitebench.qc.acquisition_scheme.derived_keys` derives, where
    they are absent (read_series adds them itself; a dcm2niix sidecar has only their inputs)."""
    try:
        derived = derived_keys(parameters)
    except Exception:  # noqa: BLE001 - malformed inputs derive nothing, never stop a verdict
        derived = {}
    missing = {k: v for k, v in derived.items() if v is not None and parameters.get(k) is None}
    return {**parameters, **missing} if missing else parameters


def check_series(parameters: dict[str, Any], protocol: Protocol) -> Verdict:
    """Check one series' parameters against a protocol (matching is :func:`match_protocol`'s job)."""
    parameters = with_derived(parameters)
    rules, applied, undecided = protocol.rules_for(parameters)
    recorded = {key: None if _missing(parameters.get(key)) else parameters.get(key)
                for key, rule in rules.items() if isinstance(rule, RecordRule)}
    checks = check_values(parameters, rules, undecided)
    if protocol.coverage is not None:
        cov = protocol.coverage
        observed = parameters.get("SliceCoverageMM")
        expected = f">= {format_value(cov.min_mm)} mm"
        if not _is_number(observed):
            checks.append(Deviation("SliceCoverageMM", expected, None if _missing(observed) else observed,
                                    "coverage", cov.severity, "undetermined",
                                    "slice coverage missing from the series"))
        else:
            ok = observed >= cov.min_mm - _EPS * max(1.0, cov.min_mm)
            checks.append(Deviation("SliceCoverageMM", expected, observed, "coverage", cov.severity,
                                    "pass" if ok else cov.severity))
    if protocol.slice_gap is not None:
        checks.append(_slice_gap_check(parameters, protocol.slice_gap))
    return Verdict(status=overall_status(checks), protocol=protocol.name, version=protocol.version,
                   content_sha256=protocol.content_sha256(),
                   deviations=[c for c in checks if c.status != "pass"], checks=checks,
                   recorded=recorded, overrides_applied=applied)


def _slice_gap_check(parameters: dict[str, Any], gap_rule: SliceGap) -> Deviation:
    """Gap = the widest step between neighbouring slice positions (or SpacingBetweenSlices) - thickness.

    Positions catch a slice missing from the middle of a series, which the header's
    SpacingBetweenSlices cannot show.
    """
    spacing = parameters.get("MaxSliceStepMM")
    if not _is_number(spacing):
        spacing = parameters.get("SpacingBetweenSlices")
    thickness = parameters.get("SliceThickness")
    expected = f"gap (slice step - SliceThickness) <= {format_value(gap_rule.max_gap_mm)} mm"
    if not (_is_number(spacing) and _is_number(thickness)):
        lacking = [k for k, v in (("slice positions or SpacingBetweenSlices", spacing),
                                  ("SliceThickness", thickness)) if not _is_number(v)]
        return Deviation("SliceGapMM", expected, None, "slice_gap", gap_rule.severity, "undetermined",
                         f"{', '.join(lacking)} missing from the series")
    gap = float(spacing) - float(thickness)
    ok = gap <= gap_rule.max_gap_mm + _EPS * max(1.0, abs(gap_rule.max_gap_mm))
    return Deviation("SliceGapMM", expected, round(gap, 6), "slice_gap", gap_rule.severity,
                     "pass" if ok else gap_rule.severity)


def check_values(values: dict[str, Any], rules: dict[str, Any], undecided: dict[str, str] | None = None,
                 prefix: str = "") -> list[Deviation]:
    """One check per non-record rule; a value that is absent is undetermined, never a pass."""
    undecided = undecided or {}
    checks: list[Deviation] = []
    for key, rule in rules.items():
        if isinstance(rule, RecordRule):
            continue
        rule = rule.bound(key)
        observed = values.get(key)
        if key in undecided:
            status, note = "undetermined", undecided[key]
        elif _missing(observed):
            status, note = "undetermined", _missing_note(key, values)
        elif rule.holds(observed):
            status, note = "pass", ""
        else:
            status, note = rule.severity, ""
        checks.append(Deviation(prefix + key, rule.describe(), None if _missing(observed) else observed,
                                rule.kind, rule.severity, status, note))
    return checks


def overall_status(checks: list[Deviation]) -> str:
    """fail beats undetermined (of a fail rule) beats warn beats pass."""
    deviations = [c for c in checks if c.status != "pass"]
    if any(d.status == "fail" for d in deviations):
        return "fail"
    if any(d.status == "undetermined" and d.severity == "fail" for d in deviations):
        return "undetermined"
    return "warn" if deviations else "pass"


def match_protocol(parameters: dict[str, Any], protocols: list[Protocol]) -> Protocol | None:
    """The one protocol whose match rules the series meets; None when none does ("unmatched").

    More than one match raises SitebenchError: there is no safe precedence between locked
    protocols, so overlapping match rules are a protocol-set error to fix, not to guess around.
    A protocol with empty match rules never matches (it would otherwise match every series).
    """
    hits = [p for p in protocols if not p.match.is_empty() and p.match.matches(parameters)]
    if len(hits) > 1:
        names = ", ".join(f"{p.name} v{p.version}" for p in hits)
        what = parameters.get("SeriesDescription", "(no SeriesDescription)")
        raise SitebenchError(f"series '{what}' matches more than one protocol ({names}); "
                             "make their match rules exclusive")
    return hits[0] if hits else None


# --------------------------------------------------------------------------- default names

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DIFFUSION_WORDS = re.compile(r"(?i)(^|[^a-z])(dwi|dti|diff|tensor|hardi)")
NAME_MAX = 64


def _seconds(value: Any) -> float | None:
    values = _numbers(value) if value is not None else None
    return min(values) if values else None


def _sanitised(text: Any) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", str(text or "").strip().lower())
    name = re.sub(r"-{2,}", "-", name).strip("-._")[:NAME_MAX].rstrip("-._")
    return name if _NAME_PATTERN.fullmatch(name) else ""


def suggest_name(parameters: dict[str, Any]) -> str:
    """A protocol name from what the series is: ``dwi``, ``bold``, ``t1w``/``t2w``/``flair`` (``-3d`` for 3D),
    else the sanitised ProtocolName / SeriesDescription, else ``protocol``; always a valid name.

    * dwi: a diffusion-weighted shell (b above the b=0 threshold), DIFFUSION in ImageType, or
      dwi/dti/diff/tensor in the series' names (Philips writes no diffusion ImageType).
    * bold: an echo-planar series (EP in ScanningSequence, an "ep..." sequence name, or ImageType
      FMRI) that is not spin echo (an "epse" name, or SE in ScanningSequence without a gradient-echo
      "fid" name): a gradient-echo EPI time series.
    * flair: TI >= 1.5 s (fluid nulled: T1 of CSF ~4 s at 3 T gives a null at ~2.5 s).
    * t1w: inversion-prepared with TI 0.1-1.5 s and TE < 15 ms (MPRAGE, IR-SPGR), or a short-TR
      (< 0.8 s) short-TE (< 30 ms) spin echo, or a 3D gradient echo with TR < 50 ms and TE < 10 ms.
    * t2w: TE >= 60 ms and TR >= 1.5 s without inversion.
    """
    p = with_derived(parameters)
    image_type = [str(v).upper() for v in (p.get("ImageType") or [])] if isinstance(p.get("ImageType"), list) else \
        _items(p.get("ImageType") or "")
    codes = set(_items(p.get("ScanningSequence") or ""))
    seq = " ".join(str(p.get(k) or "") for k in ("SequenceName", "PulseSequenceName")).lower()
    names = " ".join(str(p.get(k) or "") for k in ("SeriesDescription", "ProtocolName"))
    shells = p.get("DiffusionBValueShells")
    three_d = "-3d" if str(p.get("MRAcquisitionType") or "").upper() == "3D" else ""
    tr, te, ti = _seconds(p.get("RepetitionTime")), _seconds(p.get("EchoTime")), _seconds(p.get("InversionTime"))
    if (isinstance(shells, list) and any(_is_number(b) and b > B0_THRESHOLD for b in shells)) \
            or "DIFFUSION" in image_type or _DIFFUSION_WORDS.search(names):
        return "dwi"
    epi = "EP" in codes or re.search(r"(^|[^a-z])\*?ep", seq) is not None or "FMRI" in image_type
    if epi:
        spin_echo = "epse" in seq or ("SE" in codes and "fid" not in seq)  # Siemens VB12 writes SE\EP
        if not spin_echo:  # for its gradient-echo *epfid: the sequence name says the echo
            return "bold"
    elif ti is not None and ti >= 1.5:
        return "flair" + three_d
    elif te is not None and ((ti is not None and 0.1 <= ti < 1.5 and te < 0.015)
                             or (tr is not None and "SE" in codes and tr < 0.8 and te < 0.03)
                             or (tr is not None and three_d and "GR" in codes and tr < 0.05 and te < 0.01)):
        return "t1w" + three_d
    elif te is not None and tr is not None and te >= 0.06 and tr >= 1.5 and not (ti and ti > 0):
        return "t2w" + three_d
    for key in ("ProtocolName", "SeriesDescription"):
        name = _sanitised(p.get(key))
        if name:
            return name
    return "protocol"
