"""Models packaged as MONAI bundles: ``configs/inference.json`` + ``models/model.pt``.

The built-in U-Net versions ship as bundles too, so one loader serves ours and any
third-party bundle with a ``network_def`` and an optional dictionary ``preprocessing``.
The expected weight hash lives in ``configs/metadata.json`` under ``sitebench.weights_sha256``;
a weight file that does not match is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sitebench.errors import SitebenchError
from sitebench.models.base import IMAGE_KEY, BiomarkerModel, ModelCard, Prediction, Training, voxel_volume_ml
from sitebench.provenance import sha256_file

WEIGHTS_RELPATH = Path("models") / "model.pt"


def bundle_weights_sha256(bundle_dir: str | Path) -> str | None:
    meta = _read_json(Path(bundle_dir) / "configs" / "metadata.json")
    return (meta.get("sitebench") or {}).get("weights_sha256")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise SitebenchError("missing from the MONAI bundle", path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SitebenchError(f"not valid JSON ({exc.msg} at line {exc.lineno})", path) from None


class BundleSegmentationModel(BiomarkerModel):
    """A MONAI bundle whose network segments GM; volume = voxels labelled GM x voxel volume."""

    def __init__(self, bundle_dir: str | Path, expected_sha256: str | None = None,
                 name: str | None = None) -> None:
        import torch
        from monai.bundle import ConfigParser

        self.bundle_dir = Path(bundle_dir)
        meta = _read_json(self.bundle_dir / "configs" / "metadata.json")
        weights = self.bundle_dir / WEIGHTS_RELPATH
        if not weights.exists():
            raise SitebenchError("model weights missing from the MONAI bundle", weights)
        actual = sha256_file(weights)
        expected = expected_sha256 or (meta.get("sitebench") or {}).get("weights_sha256")
        if expected and actual != expected:
            raise SitebenchError(f"SHA-256 of model weights is {actual[:12]}…, expected {expected[:12]}…; "
                                 "the file changed since it was registered", weights)
        parser = ConfigParser()
        parser.read_config(str(self.bundle_dir / "configs" / "inference.json"))
        parser.read_meta(str(self.bundle_dir / "configs" / "metadata.json"))
        self.network = parser.get_parsed_content("network_def")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a corrupt file
            raise SitebenchError(f"cannot load model weights ({exc.__class__.__name__})", weights) from None
        self.network.load_state_dict(state)
        self.network.eval()
        self.preprocessing = parser.get_parsed_content("preprocessing") if "preprocessing" in parser else None
        self.gm_channel = int((meta.get("sitebench") or {}).get("gm_channel", 1))
        self.card = ModelCard(name=name or meta.get("name", self.bundle_dir.name),
                              version=str(meta.get("version", "0")), weights_sha256=actual,
                              kind="monai-bundle", source=str(self.bundle_dir),
                              training=Training.from_metadata((meta.get("sitebench") or {}).get("training")),
                              extra={"description": meta.get("description", ""),
                                     "changelog": meta.get("changelog", {})})

    def predict(self, data: dict[str, Any]) -> Prediction:
        import torch

        shape = tuple(data[IMAGE_KEY].shape[-3:])
        voxel_ml = voxel_volume_ml(data)
        sample = {IMAGE_KEY: data[IMAGE_KEY]}
        if self.preprocessing is not None:
            sample = self.preprocessing(sample)
        image = torch.as_tensor(np.asarray(sample[IMAGE_KEY]), dtype=torch.float32)
        with torch.inference_mode():
            logits = self.network(image.unsqueeze(0))
        labels = logits.argmax(dim=1)[0].numpy()
        mask = labels[: shape[0], : shape[1], : shape[2]] == self.gm_channel
        return Prediction(values={"gm_volume_ml": float(mask.sum()) * voxel_ml}, segmentation=mask)


def write_bundle(bundle_dir: str | Path, state_dict: Any, network_def: dict[str, Any],
                 preprocessing: dict[str, Any], metadata: dict[str, Any]) -> str:
    """Write a MONAI bundle and record its weight hash in the metadata; returns the hash."""
    import torch

    bundle_dir = Path(bundle_dir)
    (bundle_dir / "configs").mkdir(parents=True, exist_ok=True)
    (bundle_dir / "models").mkdir(parents=True, exist_ok=True)
    weights = bundle_dir / WEIGHTS_RELPATH
    torch.save(state_dict, weights)
    digest = sha256_file(weights)
    metadata = {**metadata, "sitebench": {**metadata.get("sitebench", {}), "weights_sha256": digest}}
    (bundle_dir / "configs" / "inference.json").write_text(
        json.dumps({"network_def": network_def, "preprocessing": preprocessing}, indent=2))
    (bundle_dir / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return digest


#: The U-Net every built-in version shares; small enough to ship (a few hundred KB).
GM_UNET_NETWORK_DEF: dict[str, Any] = {
    "_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
    "channels": [12, 24, 48], "strides": [2, 2], "num_res_units": 1,
}

#: Inference preprocessing: robust intensity scaling, then padding to a multiple of 4.
GM_UNET_PREPROCESSING: dict[str, Any] = {
    "_target_": "Compose",
    "transforms": [
        {"_target_": "ScaleIntensityRangePercentilesd", "keys": "image", "lower": 1, "upper": 99,
         "b_min": 0.0, "b_max": 1.0, "clip": False},
        {"_target_": "DivisiblePadd", "keys": "image", "k": 4, "method": "end"},
    ],
}
