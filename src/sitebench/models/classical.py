"""Candidate (a): grey-matter volume by intensity-based tissue classification, no learning.

A three-class Gaussian mixture on head voxels, the textbook approach (as in FSL FAST
without its bias-field and MRF terms). It has no weights; its parameters are hashed
instead so a result still names exactly what produced it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from sklearn.mixture import GaussianMixture

from sitebench.models.base import IMAGE_KEY, BiomarkerModel, ModelCard, Prediction, as_numpy, voxel_volume_ml
from sitebench.provenance import sha256_bytes

DEFAULT_PARAMETERS: dict[str, Any] = {
    "n_classes": 3,
    "foreground_fraction_of_p99": 0.12,
    "fit_sample": 40000,
    "random_state": 0,
}


class TissueClassGMVolume(BiomarkerModel):
    """Three-class GMM; GM is the class with the middle mean intensity (T1w)."""

    def __init__(self, version: str = "1.0", **parameters: Any) -> None:
        self.parameters = {**DEFAULT_PARAMETERS, **parameters}
        blob = json.dumps({"model": "TissueClassGMVolume", **self.parameters}, sort_keys=True).encode()
        self.card = ModelCard(name="gm-tissue-gmm", version=version, weights_sha256=sha256_bytes(blob),
                              kind="classical", source="sitebench.models.classical",
                              extra={"parameters": self.parameters})

    def predict(self, data: dict[str, Any]) -> Prediction:
        image = as_numpy(data[IMAGE_KEY])
        p = self.parameters
        threshold = p["foreground_fraction_of_p99"] * float(np.percentile(image, 99))
        foreground = image > threshold
        values = image[foreground].reshape(-1, 1)
        rng = np.random.default_rng(p["random_state"])
        sample = values[rng.choice(len(values), size=min(p["fit_sample"], len(values)), replace=False)]
        gmm = GaussianMixture(n_components=p["n_classes"], random_state=p["random_state"],
                              means_init=np.percentile(sample, [10, 50, 90]).reshape(-1, 1))
        gmm.fit(sample)
        order = np.argsort(gmm.means_.ravel())
        gm_class = order[len(order) // 2]
        mask = np.zeros(image.shape, dtype=bool)
        mask[foreground] = gmm.predict(values) == gm_class
        return Prediction(values={"gm_volume_ml": float(mask.sum()) * voxel_volume_ml(data)}, segmentation=mask)
