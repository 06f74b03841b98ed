"""One interface for every biomarker model: scan in, a :class:`Prediction` out.

A prediction holds the model's outputs in three plain shapes, and the spec's declared
biomarkers (:mod:`sitebench.models.biomarkers`) are derived from them: named scalars
(a regression output), named 1-D arrays (class probabilities, a regression vector), and
an integer label map on the input grid (a segmentation).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Keys of the dictionary a model receives (MONAI dictionary-transform style).
IMAGE_KEY = "image"


@dataclass
class Prediction:
    """What a model says about one scan.

    ``values``: named scalars, e.g. ``{"brain_age": 61.3}``.
    ``arrays``: named 1-D outputs, e.g. ``{"pred": array([0.2, 0.8])}`` (class probabilities).
    ``segmentation``: an integer label map on the input grid; a boolean mask counts as label 1.
    """

    values: dict[str, float] = field(default_factory=dict)
    segmentation: np.ndarray | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def output_names(self) -> list[str]:
        """Every output a biomarker may name, for error messages."""
        names = list(self.values) + list(self.arrays)
        return names + (["segmentation"] if self.segmentation is not None else [])


@dataclass(frozen=True)
class Training:
    """How a model version was trained, as its bundle records it; typed so reports never dig in a dict."""

    vendor: str | None = None  # the only scanner vendor the training scans came from, if one
    augmentation: bool = False  # cross-vendor contrast augmentation
    n_scans: int | None = None
    seed: int | None = None
    iterations: int | None = None
    final_loss: float | None = None
    trained_utc: str | None = None
    code_commit: str | None = None  # git commit of the training code
    packages: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, data: dict[str, Any] | None) -> Training | None:
        """Read a bundle's ``metadata.json`` ``sitebench.training`` block; None when it has none."""
        if not data:
            return None
        scans = data.get("scans", data.get("n_scans"))
        return cls(vendor=data.get("vendor"), augmentation=bool(data.get("augmentation", False)),
                   n_scans=int(scans) if scans is not None else None, seed=data.get("seed"),
                   iterations=data.get("iterations"), final_loss=data.get("final_loss"),
                   trained_utc=data.get("trained_utc"),
                   code_commit=(data.get("code_version") or {}).get("git_commit", data.get("code_commit")),
                   packages=dict(data.get("packages") or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"vendor": self.vendor, "augmentation": self.augmentation, "n_scans": self.n_scans,
                "seed": self.seed, "iterations": self.iterations, "final_loss": self.final_loss,
                "trained_utc": self.trained_utc, "code_commit": self.code_commit, "packages": dict(self.packages)}


@dataclass
class ModelCard:
    """Identity of a model version; the weight hash is what makes a result resumable and auditable."""

    name: str
    version: str
    weights_sha256: str  # the weight file's hash (or the parameters' hash of a model without weights)
    kind: str
    source: str
    outputs: tuple[str, ...] = ("gm_volume_ml",)
    extra: dict[str, Any] = field(default_factory=dict)
    training: Training | None = None  # None: not trained (classical) or not recorded
    licence: str = ""  # SPDX identifier or the licence's name
    citation: str = ""  # how its authors ask to be cited
    biomarkers: tuple[str, ...] = ()  # the biomarkers the model is meant for
    files: dict[str, str] = field(default_factory=dict)  # every file loaded (weights, configs, code) -> SHA-256
    training_data: str = ""  # what is known of its training data, in words
    output_labels: dict[int, str] = field(default_factory=dict)  # labels its segmentation can hold (empty: unknown)

    @property
    def files_sha256(self) -> str:
        """One digest over every file the model loads: what a resumed run and a worker must match."""
        if not self.files:
            return self.weights_sha256
        from sitebench.provenance import sha256_json

        return sha256_json(sorted(self.files.items()))

    def to_dict(self) -> dict[str, Any]:
        """The model card as registration tags and the report's lineage show it."""
        return {"name": self.name, "version": self.version, "kind": self.kind, "source": self.source,
                "weights_sha256": self.weights_sha256, "files_sha256": self.files_sha256,
                "licence": self.licence, "citation": self.citation, "biomarkers": list(self.biomarkers),
                "files": dict(self.files), "training_data": self.training_data,
                "output_labels": {str(k): v for k, v in self.output_labels.items()},
                "training": self.training.to_dict() if self.training else None}

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


class BiomarkerModel(ABC):
    """Scan in, biomarker value(s) out.

    ``predict`` takes the dictionary the MONAI transforms produced: ``data["image"]``
    is a channel-first array or MetaTensor whose ``affine`` gives voxel size.
    """

    card: ModelCard

    @abstractmethod
    def predict(self, data: dict[str, Any]) -> Prediction:
        ...


def voxel_volume_ml(data: dict[str, Any]) -> float:
    """Voxel volume in ml from the MetaTensor affine (or ``data['affine']``)."""
    image = data[IMAGE_KEY]
    affine = getattr(image, "affine", None)
    if affine is None:
        affine = data.get("affine")
    if affine is None:
        raise ValueError("input has no affine; load it with LoadImaged so voxel size is known")
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    return float(abs(np.linalg.det(matrix))) / 1000.0


def as_numpy(image: Any) -> np.ndarray:
    """Channel-first tensor/array -> 3D float32 numpy array."""
    array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if array.ndim == 4:
        array = array[0]
    return array.astype(np.float32, copy=False)


def prediction_from_output(output: Any, key: str = "pred") -> Prediction:
    """A network's (post-processed) output for one scan as a :class:`Prediction`.

    One rule for every source that returns a bare tensor (a bundle, TorchScript, an MLflow
    model): a leading batch dimension of 1 is dropped; an output with three spatial dimensions
    is a segmentation -- one channel holds labels, several channels are argmax-ed (logits or
    probabilities); anything else is a 1-D array under ``key`` (class probabilities, a regression).
    """
    array = output.detach().cpu().numpy() if hasattr(output, "detach") else np.asarray(output)
    if array.ndim == 5 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 4:
        labels = array[0] if array.shape[0] == 1 else np.argmax(array, axis=0)
        if np.issubdtype(labels.dtype, np.floating):
            labels = np.rint(labels)
        return Prediction(segmentation=labels.astype(np.int32))
    if array.ndim == 3:
        return Prediction(segmentation=np.rint(array).astype(np.int32))
    if array.ndim >= 2 and array.shape[0] == 1:
        array = array[0]
    return Prediction(arrays={key: array.astype(np.float64).reshape(-1)})
