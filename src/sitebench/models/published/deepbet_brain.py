"""deepbet: brain extraction of T1-weighted MRI by two published 3-D U-Nets (Fisch et al. 2024).

Used unmodified under its MIT licence, through its own public API
(``deepbet.BrainExtraction(no_gpu=True).run(nifti)``: a bounding-box network at 128³, then the
segmentation network at 256³ inside the box, largest component, holes filled, threshold 0.5),
with the weights that ship inside the ``deepbet`` wheel. The brain mask comes back on the input
grid, so it can be scored against a reference segmentation; its volume is the total
intracranial volume (TIV) deepbet reports.

Reference: L. Fisch, S. Zumdick, C. Barkhau, et al. "deepbet: Fast brain extraction of T1-weighted
MRI using Convolutional Neural Networks." Computers in Biology and Medicine 179 (2024) 108845.
doi:10.1016/j.compbiomed.2024.108845
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from sitebench.errors import SitebenchError
from sitebench.models.base import BiomarkerModel, ModelCard, Prediction
from sitebench.provenance import sha256_file

PACKAGE = "deepbet"
CITATION = ("Fisch L, Zumdick S, Barkhau C, et al. deepbet: Fast brain extraction of T1-weighted MRI using "
            "Convolutional Neural Networks. Comput Biol Med. 2024;179:108845. doi:10.1016/j.compbiomed.2024.108845")
TRAINING_DATA = ("Published by its authors: 7837 T1-weighted images from 191 datasets of healthy adults and "
                 "patients (OpenNeuro and other public sources), masks from a CAT12-based pipeline; trained and "
                 "tested on 1.5 T and 3 T scans of several vendors. Not trained on this trial's scanners.")
#: What the files the adapter loads are, relative to the installed distribution's root.
_LOADED = ("deepbet/__init__.py", "deepbet/bet.py", "deepbet/utils.py", "data/models/model.pt",
           "data/models/bbox_model.pt")


def _installed_root() -> Path:
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise SitebenchError("the deepbet package is not installed (pip install deepbet)") from None
    return Path(str(dist.locate_file(""))).resolve()


def model_files() -> dict[str, Path]:
    """What this adapter loads of the installed deepbet: its inference code and both shipped networks.

    sitebench's entry-point source hashes exactly these (and this file), in the parent and again
    in every worker, instead of every file of the sitebench package around this adapter.
    """
    root = _installed_root()
    files = {rel: root / rel for rel in _LOADED}
    for rel, path in files.items():
        if not path.is_file():
            raise SitebenchError("a file of the installed deepbet package is missing", path)
    return files


class DeepbetBrainExtraction(BiomarkerModel):
    """deepbet's brain mask (label 1) and its TIV (ml) for one T1w scan."""

    def __init__(self, threshold: float = 0.5, n_dilate: int = 0) -> None:
        from deepbet import BrainExtraction

        root = _installed_root()
        self.threshold, self.n_dilate = threshold, n_dilate
        self._bet = BrainExtraction(no_gpu=True)
        version = metadata.version(PACKAGE)
        licence = metadata.metadata(PACKAGE).get("License") or "MIT"
        self.card = ModelCard(
            name="deepbet", version=version, weights_sha256=sha256_file(root / "data/models/model.pt"),
            kind="entrypoint", source="entrypoint:sitebench.models.published.deepbet_brain:make_model",
            outputs=("segmentation", "tiv_ml"), licence=licence, citation=CITATION,
            biomarkers=("brain_volume_ml",), training_data=TRAINING_DATA,
            output_labels={0: "background", 1: "brain"},
            extra={"package": PACKAGE, "package_version": version,
                   "description": "Published pretrained brain-extraction network, run unmodified with its "
                                  "shipped weights (threshold 0.5, no dilation: its defaults)",
                   "changelog": {}})

    def predict(self, data: dict[str, Any]) -> Prediction:
        import nibabel as nib

        path = data.get("image_path")
        if not path:
            raise SitebenchError("deepbet reads the scan from its file; the input has no image_path")
        _, mask, tiv = self._bet.run(nib.load(str(path)), threshold=self.threshold, n_dilate=self.n_dilate)
        labels = np.asarray(mask.dataobj).astype(np.uint8)
        if labels.ndim == 4:
            labels = labels[..., 0]
        return Prediction(values={"tiv_ml": float(tiv)}, segmentation=labels)


def make_model() -> DeepbetBrainExtraction:
    """The entry point a spec names: ``entrypoint:sitebench.models.published.deepbet_brain:make_model``."""
    return DeepbetBrainExtraction()
