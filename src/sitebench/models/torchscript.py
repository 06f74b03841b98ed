"""TorchScript models: a ``.ts``/``.pt``/``.pth`` file that ``torch.jit.load`` reads, plus a YAML card beside it.

The YAML (``net.ts.yaml`` or ``net.yaml``) says what the network is and how to feed it::

    name: hippo-seg
    version: "2.1"
    licence: Apache-2.0
    citation: "Doe et al. 2025"
    biomarkers: [hippocampus_volume]
    training_data: "ADNI-3, 400 T1w scans, Siemens and GE"
    output_labels: {0: background, 1: left, 2: right}
    preprocessing:
      - ScaleIntensityd: {keys: image}
    postprocessing:
      - Activationsd: {keys: pred, softmax: true}
    inferer:
      SlidingWindowInferer: {roi_size: [64, 64, 64], sw_batch_size: 1}

Pre- and post-processing are MONAI dictionary transforms (preprocessing acts on ``image``,
postprocessing on ``pred``); without an ``inferer`` the network is called on the whole image.
The same schema is read from ``sitebench.yaml`` inside an MLflow model, so one :class:`NetworkModel`
runs any bare network: preprocess, infer, postprocess, then :func:`prediction_from_output`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from pydantic import Field, field_validator

from sitebench.config import StrictModel, load_yaml, parse_config
from sitebench.errors import SitebenchError
from sitebench.models.base import IMAGE_KEY, BiomarkerModel, ModelCard, Prediction, prediction_from_output

SUFFIXES = (".ts", ".pt", ".pth")
PRED_KEY = "pred"


class SourceConfig(StrictModel):
    """What a bare network's YAML card says: identity, licence, and its MONAI pre/post-processing."""

    name: str | None = None
    version: str = "0"
    licence: str = ""
    citation: str = ""
    biomarkers: list[str] = Field(default_factory=list)
    training_data: str = ""
    output_labels: dict[int, str] = Field(default_factory=dict)
    preprocessing: list[dict[str, dict[str, Any] | None]] = Field(default_factory=list)
    postprocessing: list[dict[str, dict[str, Any] | None]] = Field(default_factory=list)
    inferer: dict[str, dict[str, Any] | None] | None = None

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) else value

    @field_validator("preprocessing", "postprocessing", "inferer")
    @classmethod
    def _one_name_per_item(cls, value: Any) -> Any:
        items = [value] if isinstance(value, dict) else (value or [])
        for item in items:
            if len(item) != 1:
                raise ValueError("each item is a mapping of one MONAI name to its arguments")
        return value


def load_source_config(path: str | Path) -> SourceConfig:
    """Read and validate a model YAML card; an unknown key is an error naming the file and key."""
    return parse_config(load_yaml(path), SourceConfig, path)


def card_yaml(model_file: str | Path) -> Path:
    """The YAML card beside a TorchScript file: ``<file>.yaml`` first, then ``<stem>.yaml``."""
    model_file = Path(model_file)
    for candidate in (model_file.with_name(model_file.name + ".yaml"), model_file.with_suffix(".yaml")):
        if candidate.is_file():
            return candidate
    raise SitebenchError(f"no model card beside the TorchScript file: write {model_file.name}.yaml or "
                         f"{model_file.stem}.yaml (name, version, licence, citation, biomarkers, preprocessing, ...)",
                         model_file)


def is_torchscript_reference(path: Path) -> bool:
    return path.suffix in SUFFIXES and path.is_file()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0]}" if text else exc.__class__.__name__


def build_transforms(items: list[dict[str, dict[str, Any] | None]], where: str, source: str | Path) -> Callable | None:
    """A MONAI Compose of ``[{Name: {args}}, ...]``; an unknown name or bad argument names the item."""
    if not items:
        return None
    from monai import transforms as T

    steps = []
    for i, item in enumerate(items):
        ((name, args),) = item.items()
        factory = getattr(T, name, None)
        if not callable(factory):
            raise SitebenchError(f"{where}[{i}]: unknown MONAI transform '{name}'", source)
        try:
            steps.append(factory(**(args or {})))
        except Exception as exc:  # MONAI raises TypeError/ValueError for bad arguments
            raise SitebenchError(f"{where}[{i}]: {name} ({_first_line(exc)})", source) from None
    return T.Compose(steps)


def build_inferer(item: dict[str, dict[str, Any] | None] | None, source: str | Path) -> Callable | None:
    """A MONAI inferer from ``{Name: {args}}``; None means: call the network on the whole image."""
    if not item:
        return None
    from monai import inferers

    ((name, args),) = item.items()
    factory = getattr(inferers, name, None)
    if not callable(factory):
        raise SitebenchError(f"inferer: unknown MONAI inferer '{name}'", source)
    try:
        return factory(**(args or {}))
    except Exception as exc:
        raise SitebenchError(f"inferer: {name} ({_first_line(exc)})", source) from None


def card_from_config(config: SourceConfig, *, name: str | None, default_name: str, kind: str, source: str,
                     weights_sha256: str, files: dict[str, str], version: str | None = None,
                     extra: dict[str, Any] | None = None) -> ModelCard:
    return ModelCard(name=name or config.name or default_name, version=version or config.version,
                     weights_sha256=weights_sha256, kind=kind, source=source, outputs=tuple(config.biomarkers),
                     extra=dict(extra or {}), licence=config.licence, citation=config.citation,
                     biomarkers=tuple(config.biomarkers), files=dict(files), training_data=config.training_data,
                     output_labels=dict(config.output_labels))


class NetworkModel(BiomarkerModel):
    """A bare network (TorchScript, an MLflow model) with the YAML card's pre/post-processing and inferer.

    ``network`` takes a batched float32 tensor ``(1, C, *spatial)`` and returns a tensor (or array).
    """

    def __init__(self, network: Callable[[Any], Any], config: SourceConfig, card: ModelCard,
                 config_source: str | Path) -> None:
        self.network = network
        self.config = config
        self.card = card
        self.preprocessing = build_transforms(config.preprocessing, "preprocessing", config_source)
        self.postprocessing = build_transforms(config.postprocessing, "postprocessing", config_source)
        self.inferer = build_inferer(config.inferer, config_source)

    def predict(self, data: dict[str, Any]) -> Prediction:
        import torch

        sample = {IMAGE_KEY: data[IMAGE_KEY]}
        if self.preprocessing is not None:
            sample = self.preprocessing(sample)
        image = sample[IMAGE_KEY]
        tensor = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        batch = tensor.to(torch.float32)[None]
        with torch.inference_mode():
            out = self.inferer(batch, self.network) if self.inferer is not None else self.network(batch)
        out = _as_tensor(out)
        result = {IMAGE_KEY: image, PRED_KEY: out[0]}
        if self.postprocessing is not None:
            with torch.inference_mode():
                result = self.postprocessing(result)
        return prediction_from_output(result[PRED_KEY])


def _as_tensor(output: Any):
    """A network's output (tensor, numpy, pandas) as a plain torch tensor."""
    import numpy as np
    import torch

    if hasattr(output, "to_numpy") and not hasattr(output, "detach"):  # pandas
        output = output.to_numpy()
    if hasattr(output, "as_tensor"):  # MetaTensor
        output = output.as_tensor()
    if isinstance(output, torch.Tensor):
        return output.detach().cpu()
    return torch.as_tensor(np.asarray(output))


def torchscript_files(model_file: str | Path) -> tuple[Path, list[str]]:
    """The folder and relative paths of what a TorchScript model loads: the file and its YAML card."""
    model_file = Path(model_file).resolve()
    config = card_yaml(model_file)
    load_source_config(config)  # a bad card is an error in the parent, before any worker starts
    return model_file.parent, sorted({model_file.name, config.name})


def load_torchscript(model_file: str | Path, files: dict[str, str], name: str | None = None,
                     source: str | None = None) -> NetworkModel:
    """Load a TorchScript file (already hash-checked) with its YAML card."""
    import torch

    model_file = Path(model_file)
    config_path = card_yaml(model_file)
    config = load_source_config(config_path)
    try:
        module = torch.jit.load(str(model_file), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError, ValueError, ... for a file that is not TorchScript
        raise SitebenchError(f"not a TorchScript file ({_first_line(exc)})", model_file) from None
    module.eval()
    card = card_from_config(config, name=name, default_name=model_file.stem, kind="torchscript",
                            source=source or str(model_file), weights_sha256=files[model_file.name], files=files)
    return NetworkModel(module, config, card, config_path)
