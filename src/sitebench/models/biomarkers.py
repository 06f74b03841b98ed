"""Biomarkers are declared in the spec, not coded: each names a rule that derives it from a model's output.

The rules (``kind``):

* ``label_volume`` -- the volume (ml) of a set of labels in the model's segmentation,
  e.g. left + right hippocampus ``labels: [17, 53]``; voxel volume from the input grid.
* ``regression`` -- a scalar output by key (``output: brain_age``), or one element of an
  array output by ``index``.
* ``class_probability`` -- the probability of class ``index`` in an array output (binary:
  a single sigmoid probability needs no index); ``threshold`` is the decision threshold.
* ``ratio`` -- one biomarker over another (``numerator``, ``denominator``), times ``scale``;
  ``normalised`` is the same rule, read as "normalised by", e.g. grey matter by intracranial
  volume (the proportion method; see O'Brien et al. 2011, Neuroimage 56:1,
  doi:10.1016/j.neuroimage.2011.02.064).

Each biomarker names its reference: a manifest ``column`` (for a class probability, with the
``positive`` value), and/or ``labels`` of the reference segmentation, which are also scored
for overlap per label (Dice, HD95, volume error).

These declarations live on the ground floor because the runner derives values with them and
the statistics read their kinds from the locked plan; neither may import the other.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from sitebench.config import StrictModel
from sitebench.models.base import Prediction

#: The rules whose values are continuous measurements (agreement, mixed models, equivalence).
CONTINUOUS_KINDS = ("label_volume", "regression", "ratio", "normalised")
#: The rules whose values are probabilities of a class (AUC, sensitivity/specificity, calibration).
CLASSIFICATION_KINDS = ("class_probability",)
SEGMENTATION_OUTPUT = "segmentation"


class BiomarkerError(Exception):
    """A biomarker that cannot be derived from a model's output; ``key`` is where in the spec."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(message)


class ReferenceSpec(StrictModel):
    """Where a biomarker's reference comes from."""

    column: str | None = Field(None, description="manifest column with the reference value (or class)")
    positive: str | None = Field(None, description="class probability: the column value that counts as positive")
    labels: list[int] | None = Field(None, description="labels of the reference segmentation (volume, overlap)")
    segmentation: str | None = Field(None, description="manifest column with the reference label maps "
                                                       "(default: the spec's reference_segmentation)")

    @model_validator(mode="after")
    def _names_a_source(self) -> "ReferenceSpec":
        if not self.column and not self.labels:
            raise ValueError("a reference names a manifest column, labels of the reference segmentation, or both")
        return self


class BiomarkerSpec(StrictModel):
    """One declared biomarker: its name, unit, derivation rule and reference."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_.\-]*$")
    kind: Literal["label_volume", "regression", "class_probability", "ratio", "normalised"]
    unit: str = ""
    description: str = ""
    output: str | None = Field(None, description="the model output it is read from (a scalar or array key)")
    labels: list[int] | None = Field(None, description="label_volume: the labels whose volume is summed")
    label_names: dict[int, str] = Field(default_factory=dict, description="names of the labels, for the report")
    index: int | None = Field(None, ge=0, description="element of an array output (class index)")
    threshold: float = Field(0.5, gt=0, lt=1, description="class_probability: the decision threshold")
    numerator: str | None = None
    denominator: str | None = None
    scale: float = Field(1.0, gt=0, description="ratio/normalised: multiply by this, e.g. 100 for percent")
    reference: ReferenceSpec | None = None
    equivalence_margin: float | None = Field(None, gt=0, description="continuous: per-site equivalence margin, "
                                             "in the biomarker's unit")

    @model_validator(mode="after")
    def _rule_is_complete(self) -> "BiomarkerSpec":
        if self.kind == "label_volume":
            if not self.labels:
                raise ValueError("a label_volume biomarker lists its labels")
        elif self.kind in ("regression", "class_probability"):
            if not self.output:
                raise ValueError(f"a {self.kind} biomarker names the model output it is read from")
        elif not (self.numerator and self.denominator):
            raise ValueError(f"a {self.kind} biomarker names a numerator and a denominator biomarker")
        if self.kind == "class_probability" and self.reference and self.reference.column \
                and self.reference.positive is None:
            raise ValueError("a class_probability reference column needs 'positive': the value that is the class")
        if self.kind == "label_volume" and not self.unit:
            self.unit = "ml"
        return self

    @property
    def analysis(self) -> str:
        """``continuous`` or ``classification``: which statistics apply."""
        return "classification" if self.kind in CLASSIFICATION_KINDS else "continuous"

    @property
    def derived(self) -> bool:
        return self.kind in ("ratio", "normalised")

    def plan_entry(self) -> dict[str, Any]:
        """What the locked analysis plan records of this biomarker (plain data for the statistics)."""
        ref = self.reference
        return {"name": self.name, "kind": self.kind, "analysis": self.analysis, "unit": self.unit,
                "description": self.description, "threshold": self.threshold if self.analysis == "classification"
                else None, "reference_column": ref.column if ref else None,
                "reference_positive": ref.positive if ref else None,
                "reference_labels": list(ref.labels) if ref and ref.labels else None,
                "equivalence_margin": self.equivalence_margin,
                "label_names": {str(k): v for k, v in self.label_names.items()}}


def check_declarations(biomarkers: list[BiomarkerSpec]) -> None:
    """Names are unique and a derived biomarker names biomarkers declared before it; raises ValueError."""
    seen: set[str] = set()
    for i, marker in enumerate(biomarkers):
        if marker.name in seen:
            raise ValueError(f"biomarkers[{i}].name: '{marker.name}' is declared twice")
        if marker.derived:
            for part in ("numerator", "denominator"):
                name = getattr(marker, part)
                if name not in seen:
                    raise ValueError(f"biomarkers[{i}].{part}: '{name}' is not a biomarker declared before it")
        seen.add(marker.name)


def check_model_labels(biomarkers: list[BiomarkerSpec], output_labels: dict[int, str], model_key: str) -> None:
    """A label a model never outputs is an error before any scan is scored (when the model says what it outputs)."""
    if not output_labels:
        return
    for i, marker in enumerate(biomarkers):
        for label in marker.labels or []:
            if label not in output_labels:
                have = ", ".join(f"{k} ({v})" if v else str(k) for k, v in sorted(output_labels.items()))
                raise BiomarkerError(f"biomarkers[{i}].labels", f"model {model_key} never outputs label {label} "
                                     f"(its labels: {have})")


def as_label_map(segmentation: np.ndarray) -> np.ndarray:
    """An integer label map; a boolean mask is label 1."""
    array = np.asarray(segmentation)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError("the segmentation holds non-integer values (probabilities, not labels)")
        return array.astype(np.int32)
    return array


def derive(biomarkers: list[BiomarkerSpec], prediction: Prediction, voxel_ml: float) -> dict[str, float]:
    """Every declared biomarker's value for one scan, in declaration order (derived ones last use earlier ones)."""
    values: dict[str, float] = {}
    labels: np.ndarray | None = None
    for i, marker in enumerate(biomarkers):
        if marker.kind == "label_volume":
            if labels is None:
                source = prediction.arrays.get(marker.output) if marker.output not in (None, SEGMENTATION_OUTPUT) \
                    else prediction.segmentation
                if source is None:
                    raise BiomarkerError(f"biomarkers[{i}].output",
                                         f"the model gives no segmentation (it gives: "
                                         f"{', '.join(prediction.output_names()) or 'nothing'})")
                if np.asarray(source).ndim != 3:
                    raise BiomarkerError(f"biomarkers[{i}]", f"'{marker.name}' needs a 3-D label map; the model's "
                                         f"segmentation has shape {tuple(np.asarray(source).shape)}")
                try:
                    labels = as_label_map(source)
                except ValueError as exc:
                    raise BiomarkerError(f"biomarkers[{i}]", str(exc)) from None
            values[marker.name] = float(np.isin(labels, marker.labels).sum()) * voxel_ml
        elif marker.kind in ("regression", "class_probability"):
            values[marker.name] = _read_output(i, marker, prediction)
        else:
            denominator = values[marker.denominator]
            values[marker.name] = (values[marker.numerator] / denominator * marker.scale
                                   if denominator not in (0.0,) and math.isfinite(denominator) else math.nan)
    return values


def _read_output(i: int, marker: BiomarkerSpec, prediction: Prediction) -> float:
    name = marker.output
    if name in prediction.values:
        if marker.index not in (None, 0):
            raise BiomarkerError(f"biomarkers[{i}].index", f"output '{name}' is a scalar; it has no element "
                                 f"{marker.index}")
        value = float(prediction.values[name])
    elif name in prediction.arrays:
        array = np.asarray(prediction.arrays[name], dtype=np.float64).reshape(-1) \
            if np.asarray(prediction.arrays[name]).size <= 4096 else None
        if array is None:
            raise BiomarkerError(f"biomarkers[{i}].output", f"output '{name}' has shape "
                                 f"{tuple(np.asarray(prediction.arrays[name]).shape)}: a map, not a "
                                 f"{'probability vector' if marker.kind == 'class_probability' else 'scalar'}")
        if marker.index is None:
            if marker.kind == "class_probability" and array.size == 2:
                index = 1  # two-class softmax: the probability of the positive (second) class
            elif array.size == 1:
                index = 0
            else:
                raise BiomarkerError(f"biomarkers[{i}].index", f"output '{name}' has {array.size} elements; "
                                     "say which one with 'index'")
        else:
            index = marker.index
        if index >= array.size:
            raise BiomarkerError(f"biomarkers[{i}].index", f"output '{name}' has {array.size} elements; "
                                 f"index {index} is out of range")
        value = float(array[index])
    else:
        raise BiomarkerError(f"biomarkers[{i}].output", f"the model has no output '{name}' (it gives: "
                             f"{', '.join(prediction.output_names()) or 'nothing'})")
    if marker.kind == "class_probability" and not (0.0 <= value <= 1.0):
        raise BiomarkerError(f"biomarkers[{i}].output", f"output '{name}' gives {value:.4g}, not a probability "
                             "in [0, 1]; add a softmax/sigmoid to the model's postprocessing")
    return value
