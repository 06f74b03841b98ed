"""Any MONAI bundle, run the way MONAI runs it: ``configs/inference.{json,yaml}`` + ``models/model.pt``.

One loader serves our built-in U-Net versions and any model-zoo bundle. The inference
config is parsed by MONAI's own ``ConfigParser`` (``bundle_root`` set to the bundle, the
device to the CPU, the bundle's ``scripts/`` importable as MONAI makes them), and one scan
goes through what the bundle's evaluator would do with it: its ``preprocessing`` (from the
file path when it starts with ``LoadImaged``, else on the scan the benchmark loaded), the
batch collated, its ``inferer`` (``SimpleInferer`` by default) on its ``network_def``, the
batch decollated and its ``postprocessing`` (``Invertd`` included, writers left out).

Checks before anything runs: the files the caller checked (``expected_files``), the
hashes in the bundle's own ``large_files.yml``, and the weight hash (``expected_sha256``
or ``sitebench.weights_sha256`` in ``configs/metadata.json``); each refusal names the file.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sitebench.errors import SitebenchError
from sitebench.models.base import (IMAGE_KEY, BiomarkerModel, ModelCard, Prediction, Training,
                                   prediction_from_output, voxel_volume_ml)
from sitebench.models.files import hash_files, tree_files, verify_files
from sitebench.provenance import sha256_file

WEIGHTS_RELPATH = Path("models") / "model.pt"
TORCHSCRIPT_RELPATH = Path("models") / "model.ts"
CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
METADATA_RELPATH = Path("configs") / "metadata.json"
LARGE_FILES = "large_files.yml"
PRED_KEY = "pred"  # monai.utils.CommonKeys.PRED: the key every MONAI evaluator writes its output under


def bundle_weights_sha256(bundle_dir: str | Path) -> str | None:
    meta = _read_json(Path(bundle_dir) / METADATA_RELPATH)
    return (meta.get("sitebench") or {}).get("weights_sha256")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise SitebenchError("missing from the MONAI bundle", path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SitebenchError(f"not valid JSON ({exc.msg} at line {exc.lineno})", path) from None


def _config_path(bundle_dir: Path) -> Path | None:
    for name in CONFIG_NAMES:
        if (bundle_dir / "configs" / name).is_file():
            return bundle_dir / "configs" / name
    return None


def _weights_path(bundle_dir: Path) -> Path | None:
    for rel in (WEIGHTS_RELPATH, TORCHSCRIPT_RELPATH):
        if (bundle_dir / rel).is_file():
            return bundle_dir / rel
    return None


def bundle_files(bundle_dir: str | Path) -> list[str]:
    """Relative paths of every file the model loads: config, metadata, weights, large_files.yml, scripts."""
    bundle_dir = Path(bundle_dir)
    files: list[str] = []
    config = _config_path(bundle_dir)
    if config is not None:
        files.append(config.relative_to(bundle_dir).as_posix())
    if (bundle_dir / METADATA_RELPATH).is_file():
        files.append(METADATA_RELPATH.as_posix())
    weights = _weights_path(bundle_dir)
    if weights is not None:
        files.append(weights.relative_to(bundle_dir).as_posix())
    if (bundle_dir / LARGE_FILES).is_file():
        files.append(LARGE_FILES)
    if (bundle_dir / "scripts").is_dir():
        files.extend(f"scripts/{rel}" for rel in tree_files(bundle_dir / "scripts"))
    return files


def check_large_files(bundle_dir: str | Path) -> None:
    """Refuse a file whose hash differs from the one the bundle's ``large_files.yml`` lists for it."""
    import yaml

    bundle_dir = Path(bundle_dir)
    listing = bundle_dir / LARGE_FILES
    if not listing.is_file():
        return
    try:
        content = yaml.safe_load(listing.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SitebenchError(f"not valid YAML ({str(exc).splitlines()[0]})", listing) from None
    for entry in content.get("large_files") or []:
        if not isinstance(entry, Mapping) or not entry.get("path") or not entry.get("hash_val"):
            continue
        path = bundle_dir / str(entry["path"])
        if not path.is_file():
            continue  # listed for download, not shipped here
        kind = str(entry.get("hash_type") or "md5").lower()
        if kind not in ("md5", "sha256"):
            raise SitebenchError(f"large_files.yml hash_type '{kind}' is not md5 or sha256", listing)
        digest = hashlib.new(kind)
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        expected = str(entry["hash_val"]).lower()
        if digest.hexdigest() != expected:
            raise SitebenchError(f"{kind} is {digest.hexdigest()[:12]}…, but the bundle's large_files.yml hash "
                                 f"differs ({expected[:12]}…); the file is not the one the bundle lists", path)


def _use_bundle_scripts(root: Path) -> None:
    """Make ``scripts`` import from this bundle, as MONAI does (bundle root on ``sys.path``)."""
    root_text = str(root)
    if root_text in sys.path:
        sys.path.remove(root_text)
    sys.path.insert(0, root_text)
    for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
        module = sys.modules[name]
        origin = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", []) or []), "")
        if not str(origin).startswith(root_text + "/"):
            del sys.modules[name]  # another bundle's scripts: never serve its code to this one


def _flatten(transform: Any) -> list[Any]:
    inner = getattr(transform, "transforms", None)
    if isinstance(inner, (list, tuple)):
        return [t for child in inner for t in _flatten(child)]
    return [transform]


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


class MonaiBundleModel(BiomarkerModel):
    """A MONAI bundle's inference workflow applied to one scan at a time."""

    def __init__(self, bundle_dir: str | Path, expected_sha256: str | None = None, name: str | None = None,
                 expected_files: dict[str, str] | None = None) -> None:
        import torch

        self.bundle_dir = Path(bundle_dir).resolve()
        if expected_files:
            verify_files(self.bundle_dir, expected_files)  # before anything is read or run
        config_path = _config_path(self.bundle_dir)
        if config_path is None:
            raise SitebenchError("no inference config (configs/inference.json or configs/inference.yaml) in "
                                 "the MONAI bundle", self.bundle_dir / "configs")
        meta_path = self.bundle_dir / METADATA_RELPATH
        meta = _read_json(meta_path) if meta_path.exists() else {}
        check_large_files(self.bundle_dir)

        from monai.bundle import ConfigParser

        parser = ConfigParser()
        try:
            parser.read_config(str(config_path))
        except Exception as exc:  # noqa: BLE001 - json/yaml raise their own types
            raise SitebenchError(f"cannot read the bundle config ({_first_line(str(exc))[:160]})",
                                 config_path) from None
        torchscript = self.bundle_dir / TORCHSCRIPT_RELPATH
        if "network_def" not in parser and not torchscript.is_file():
            raise SitebenchError("no 'network_def': the bundle config defines no network", config_path)
        weights = _weights_path(self.bundle_dir) if "network_def" in parser else torchscript
        if weights is None:
            raise SitebenchError("model weights missing from the MONAI bundle", self.bundle_dir / WEIGHTS_RELPATH)
        actual = sha256_file(weights)
        sitebench_meta = meta.get("sitebench") or {}
        expected = expected_sha256 or sitebench_meta.get("weights_sha256")
        if expected and actual != expected:
            raise SitebenchError(f"SHA-256 of model weights is {actual[:12]}…, expected {expected[:12]}…; "
                                 "the file changed since it was registered", weights)
        files = hash_files(self.bundle_dir, {*bundle_files(self.bundle_dir),
                                             weights.relative_to(self.bundle_dir).as_posix()})

        if meta_path.exists():
            parser.read_meta(str(meta_path))
        parser["bundle_root"] = str(self.bundle_dir)
        parser["device"] = "$torch.device('cpu')"
        if (self.bundle_dir / "scripts").is_dir():
            _use_bundle_scripts(self.bundle_dir)
        self.parser = parser
        self.config_path = config_path

        if weights.suffix == ".pt":
            self.network = self._parsed("network_def")
            try:
                state = torch.load(weights, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - torch raises many types for a corrupt file
                raise SitebenchError(f"cannot load model weights ({exc.__class__.__name__})", weights) from None
            if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
                state = state["model"]  # the {"model": state_dict} layout CheckpointLoader reads
            try:
                self.network.load_state_dict(state)
            except (RuntimeError, TypeError, AttributeError) as exc:
                raise SitebenchError("model weights do not fit the bundle's network_def "
                                     f"({_first_line(str(exc))[:160]})", weights) from None
        else:
            try:
                self.network = torch.jit.load(str(weights), map_location="cpu")
            except Exception as exc:  # noqa: BLE001
                raise SitebenchError(f"cannot load TorchScript model ({exc.__class__.__name__})", weights) from None
        self.network = self.network.to("cpu").eval()

        from monai.inferers import SimpleInferer
        from monai.transforms import Compose, Invertd, LoadImaged

        self.preprocessing = self._parsed("preprocessing") if "preprocessing" in parser else None
        if isinstance(self.preprocessing, (list, tuple)):
            self.preprocessing = Compose(list(self.preprocessing))
        self.inferer = self._parsed("inferer") if "inferer" in parser else SimpleInferer()
        post = self._parsed("postprocessing") if "postprocessing" in parser else None
        if isinstance(post, (list, tuple)):
            post = Compose(list(post))
        self.postprocessing = post
        self._post_for_keys: dict[frozenset[str], Any] = {}
        steps = _flatten(self.preprocessing) if self.preprocessing is not None else []
        self.loads_image = any(isinstance(t, LoadImaged) for t in steps)
        self.inverts = post is not None and any(isinstance(t, Invertd) for t in _flatten(post))
        self.image_key = self._image_key(parser)

        output = self._output_format(meta)
        self.segments = output in ("segmentation", None)
        self.gm_channel = int(sitebench_meta.get("gm_channel", 1)) if sitebench_meta else None
        self.card = ModelCard(
            name=name or meta.get("name", self.bundle_dir.name), version=str(meta.get("version", "0")),
            weights_sha256=actual, kind="monai-bundle", source=str(self.bundle_dir),
            outputs=("gm_volume_ml",) if self.gm_channel is not None else
            (("segmentation",) if self.segments else (PRED_KEY,)),
            training=Training.from_metadata(sitebench_meta.get("training")),
            extra={"description": meta.get("description", ""), "changelog": meta.get("changelog", {})},
            licence=self._licence(meta), citation=self._citation(meta),
            biomarkers=tuple(sitebench_meta.get("biomarkers") or ()),
            files=files, training_data=self._training_data(meta),
            output_labels=self._output_labels(meta, output))

    # ------------------------------------------------------------------ the config, read as MONAI reads it

    def _parsed(self, id: str) -> Any:
        """``parser.get_parsed_content(id)``; a component that cannot be built is a one-line error."""
        try:
            return self.parser.get_parsed_content(id)
        except Exception as exc:  # noqa: BLE001 - MONAI wraps whatever the component raised
            cause = exc
            while cause.__cause__ is not None:
                cause = cause.__cause__
            reason = _first_line(str(cause)) or cause.__class__.__name__
            raise SitebenchError(f"cannot build '{id}' from the bundle config ({cause.__class__.__name__}: "
                                 f"{reason[:160]})", self.config_path) from None

    @staticmethod
    def _image_key(parser: Any) -> str:
        for key in ("image_key", "image"):
            if key in parser:
                try:
                    value = parser.get_parsed_content(key)
                except Exception:  # noqa: BLE001 - an id that is not a key name
                    continue
                if isinstance(value, str):
                    return value
        return IMAGE_KEY

    def _pred_format(self, meta: dict[str, Any]) -> dict[str, Any]:
        outputs = ((meta.get("network_data_format") or {}).get("outputs") or {})
        if not isinstance(outputs, Mapping) or not outputs:
            return {}
        chosen = outputs.get(PRED_KEY) or next(iter(outputs.values()))
        return chosen if isinstance(chosen, Mapping) else {}

    def _output_format(self, meta: dict[str, Any]) -> str | None:
        """'segmentation', 'classes' or None (not declared)."""
        pred = self._pred_format(meta)
        if not pred:
            return None
        if str(pred.get("format", "")).lower() == "segmentation" or str(pred.get("type", "")).lower() == "image":
            return "segmentation"
        return "classes"

    def _output_labels(self, meta: dict[str, Any], output: str | None) -> dict[int, str]:
        if output != "segmentation":
            return {}
        channels = self._pred_format(meta).get("channel_def") or {}
        labels: dict[int, str] = {}
        for key, value in channels.items():
            try:
                labels[int(key)] = str(value)
            except (TypeError, ValueError):
                continue
        if labels:
            return labels
        try:
            count = int(self.parser.get_parsed_content("network_def#out_channels"))
        except Exception:  # noqa: BLE001 - no network_def (TorchScript) or no out_channels
            return {}
        return {i: "" for i in range(count)}

    def _licence(self, meta: dict[str, Any]) -> str:
        for key in ("license", "licence"):
            if meta.get(key):
                return str(meta[key])
        for name in ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE"):
            path = self.bundle_dir / name
            if path.is_file():
                lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
                if not lines:
                    continue
                if len(lines) > 1 and lines[1].lower().startswith("version"):  # "Apache License" / "Version 2.0, …"
                    return f"{lines[0]} {lines[1].split(',')[0]}"
                return lines[0]
        return ""

    @staticmethod
    def _citation(meta: dict[str, Any]) -> str:
        references = meta.get("references")
        if isinstance(references, (list, tuple)) and references:
            return "; ".join(str(r).strip() for r in references if str(r).strip())
        if references:
            return str(references)
        return str(meta.get("citation") or "")

    @staticmethod
    def _training_data(meta: dict[str, Any]) -> str:
        parts = [meta.get(key) for key in ("training_data", "data_source", "data_type")]
        return "; ".join(str(p) if not isinstance(p, (dict, list)) else json.dumps(p) for p in parts if p)

    # ------------------------------------------------------------------ one scan, as the evaluator runs it

    def _postprocessing_for(self, keys: frozenset[str]) -> Any:
        """The bundle's postprocessing without writers; transforms on keys absent at inference skip them."""
        if self.postprocessing is None:
            return None
        if keys not in self._post_for_keys:
            from monai.transforms import Compose, MapTransform

            kept = []
            for transform in _flatten(self.postprocessing):
                if type(transform).__name__.startswith("Save"):
                    continue  # writers: a benchmark keeps the prediction, not a file
                if isinstance(transform, MapTransform) and any(k not in keys for k in transform.keys):
                    transform.allow_missing_keys = True  # e.g. "label": absent when a scan is only predicted
                kept.append(transform)
            original = self.postprocessing
            self._post_for_keys[keys] = Compose(kept, map_items=getattr(original, "map_items", True),
                                                unpack_items=getattr(original, "unpack_items", False))
        return self._post_for_keys[keys]

    def predict(self, data: dict[str, Any]) -> Prediction:
        import torch
        from monai.data import list_data_collate
        from monai.transforms import Decollated
        from monai.transforms.utils import apply_transform

        image = data.get(IMAGE_KEY)
        with torch.inference_mode():
            if self.loads_image:
                path = data.get("image_path") or (getattr(image, "meta", None) or {}).get("filename_or_obj")
                if not path:
                    raise SitebenchError("this bundle loads its scans itself (LoadImaged): the input needs "
                                         "'image_path'", self.config_path)
                sample: dict[str, Any] = {self.image_key: str(path)}
            else:
                sample = {self.image_key: image}
            if self.preprocessing is not None:
                sample = apply_transform(self.preprocessing, sample)
            batch = list_data_collate([sample])
            inputs = batch[self.image_key]
            if hasattr(inputs, "to"):
                inputs = inputs.to("cpu")
            output = {self.image_key: inputs, PRED_KEY: self.inferer(inputs, self.network)}
            decollate = Decollated(keys=None, detach=True)
            batch_item, output_item = decollate(batch)[0], decollate(output)[0]
            post = self._postprocessing_for(frozenset(batch_item) | frozenset(output_item))
            if post is not None:
                merged = apply_transform(post, {**batch_item, **output_item})
                output_item = {**output_item, **{k: v for k, v in merged.items()
                                                 if k in output_item or k not in batch_item}}
            pred = output_item[PRED_KEY]
            if not self.inverts and image is not None:
                pred = _crop_to_input(pred, tuple(image.shape))
            prediction = prediction_from_output(pred)
        if self.gm_channel is not None and prediction.segmentation is not None:
            gm = float((prediction.segmentation == self.gm_channel).sum())
            prediction.values["gm_volume_ml"] = gm * voxel_volume_ml(data)
        return prediction


def _crop_to_input(pred: Any, input_shape: tuple[int, ...]) -> Any:
    """No inverse available: an output padded past the input's spatial shape is cropped back (padding at the end)."""
    shape = tuple(pred.shape)
    if len(shape) != len(input_shape) or len(shape) < 3:
        return pred
    spatial, target = shape[1:], input_shape[1:]
    if spatial == target or any(s < t for s, t in zip(spatial, target)):
        return pred
    return pred[(slice(None),) + tuple(slice(0, t) for t in target)]


#: The name registry.py and older code use.
BundleSegmentationModel = MonaiBundleModel


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
