"""MLflow models (``models:/name@alias``, ``models:/name/3``, ``runs:/<run_id>/<path>``) with an ``MLmodel`` file.

The ``pytorch`` flavour loads an ``nn.Module`` and is called like a TorchScript network; otherwise the
``python_function`` flavour is called with a float32 array ``(1, C, *spatial)``. Pre/post-processing
come from an optional ``sitebench.yaml`` inside the model folder (the TorchScript card's schema;
log it with ``extra_files=`` or ``artifacts=``). Every file of the downloaded folder is hashed in the
parent and re-checked in each worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sitebench.errors import SitebenchError
from sitebench.models.torchscript import NetworkModel, SourceConfig, card_from_config, load_source_config
from sitebench.provenance import sha256_json

MLMODEL = "MLmodel"
CONFIG_NAME = "sitebench.yaml"
#: Written by MLflow when a version is registered (again), never loaded by the model.
NOT_LOADED = ("registered_model_meta",)


def is_mlflow_model(folder: str | Path) -> bool:
    return (Path(folder) / MLMODEL).is_file()


def model_folder_files(folder: str | Path) -> list[str]:
    """Every file of a downloaded MLflow model folder, relative, caches and registration metadata left out."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.name not in NOT_LOADED)


def flavour(folder: str | Path) -> str:
    """``pytorch`` or ``pyfunc``: which loader an MLflow model folder needs."""
    import yaml

    path = Path(folder) / MLMODEL
    try:
        flavours = (yaml.safe_load(path.read_text()) or {}).get("flavors") or {}
    except yaml.YAMLError:
        raise SitebenchError("not a valid MLmodel file", path) from None
    if "pytorch" in flavours:
        return "pytorch"
    if "python_function" in flavours:
        return "pyfunc"
    raise SitebenchError(f"MLflow model has neither a pytorch nor a python_function flavour (it has: "
                         f"{', '.join(flavours) or 'none'})", path)


def config_file(folder: str | Path) -> Path | None:
    """The model's ``sitebench.yaml``: at the top of the folder, else the shallowest one inside it."""
    folder = Path(folder)
    found = sorted(folder.rglob(CONFIG_NAME), key=lambda p: (len(p.relative_to(folder).parts), str(p)))
    return found[0] if found else None


def check_config(folder: str | Path) -> None:
    """Validate the model's ``sitebench.yaml`` in the parent, so a bad key stops the run before workers start."""
    path = config_file(folder)
    if path is not None:
        load_source_config(path)


class _Pyfunc:
    """A pyfunc model as a network: numpy float32 in, its output (numpy, tensor, pandas) out."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, batch: Any) -> Any:
        import numpy as np

        array = batch.detach().cpu().numpy() if hasattr(batch, "detach") else np.asarray(batch)
        return self.model.predict(array.astype(np.float32, copy=False))


def load_mlflow_model(folder: str | Path, files: dict[str, str], reference: str, name: str | None,
                      registered_version: str | None) -> NetworkModel:
    """Load an MLflow model folder (already hash-checked) as a network with its ``sitebench.yaml``."""
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    folder = Path(folder)
    kind = flavour(folder)
    path = config_file(folder)
    config = load_source_config(path) if path is not None else SourceConfig()
    try:
        if kind == "pytorch":
            import mlflow.pytorch

            network: Any = mlflow.pytorch.load_model(str(folder), map_location="cpu")
            network.eval()
        else:
            import mlflow.pyfunc

            network = _Pyfunc(mlflow.pyfunc.load_model(str(folder)))
    except SitebenchError:
        raise
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        raise SitebenchError(f"cannot load the MLflow {kind} model ({exc.__class__.__name__}"
                             f"{': ' + lines[0] if lines else ''})", reference) from None
    default_name = reference.rstrip("/").split("/")[-1].split("@")[0]
    if reference.startswith("models:/"):
        default_name = reference[len("models:/"):].split("@")[0].rsplit("/", 1)[0]
    version = registered_version or (config.version if config.version != "0" else None)
    card = card_from_config(config, name=name, default_name=default_name, kind=f"mlflow-{kind}",
                            source=reference, weights_sha256=sha256_json(sorted(files.items())), files=files,
                            version=version, extra={"flavour": kind})
    return NetworkModel(network, config, card, path or folder)
