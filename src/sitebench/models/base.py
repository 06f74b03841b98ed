"""One interface for every biomarker model: scan in, biomarker value(s) out, optional segmentation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Keys of the dictionary a model receives (MONAI dictionary-transform style).
IMAGE_KEY = "image"


@dataclass
class Prediction:
    """What a model says about one scan."""

    values: dict[str, float]
    segmentation: np.ndarray | None = None  # boolean mask on the input grid


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
    weights_sha256: str
    kind: str
    source: str
    outputs: tuple[str, ...] = ("gm_volume_ml",)
    extra: dict[str, Any] = field(default_factory=dict)
    training: Training | None = None  # None: not trained (classical) or not recorded

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
