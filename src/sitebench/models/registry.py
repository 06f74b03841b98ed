"""Resolve a model reference to a loaded model, and register versions in MLflow.

References a spec may use:

- ``classical``                      candidate (a), tissue-class GM volume
- ``builtin:gm_unet_v1``             a bundle shipped inside the package
- ``path/to/bundle_dir``             any MONAI bundle directory
- ``models:/name@alias`` or ``models:/name/3``  an MLflow registered model version

Every reference resolves to a local directory plus the weight hash it must have,
so worker processes (or Dask workers) load exactly what the parent checked.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sitebench.errors import SitebenchError
from sitebench.models.base import BiomarkerModel
from sitebench.models.bundle import BundleSegmentationModel
from sitebench.models.classical import TissueClassGMVolume
from sitebench.provenance import sha256_file

BUILTIN_DIR = Path(__file__).parent / "bundles"
CLASSICAL_FILE = "sitebench-classical.json"
WEIGHTS_TAG = "weights_sha256"


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference made concrete: where its files are and which hash they must have."""

    reference: str
    kind: str  # "classical" | "bundle"
    location: str | None
    expected_sha256: str | None
    name: str | None = None
    registered_version: str | None = None


def builtin_bundles() -> list[str]:
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "configs" / "metadata.json").exists())


def resolve_model(reference: str, expected_sha256: str | None = None, name: str | None = None,
                  tracking_uri: str | None = None) -> ResolvedModel:
    if reference == "classical":
        return ResolvedModel(reference, "classical", None, expected_sha256, name)
    if reference.startswith("builtin:"):
        bundle = BUILTIN_DIR / reference.split(":", 1)[1]
        if not (bundle / "configs" / "metadata.json").exists():
            raise SitebenchError(f"unknown built-in model '{reference}' (have: {', '.join(builtin_bundles())})")
        return ResolvedModel(reference, "bundle", str(bundle), expected_sha256, name)
    if reference.startswith("models:/"):
        return _resolve_registered(reference, expected_sha256, tracking_uri)
    path = Path(reference)
    if (path / CLASSICAL_FILE).exists():
        return ResolvedModel(reference, "classical", str(path), expected_sha256, name)
    if (path / "configs" / "inference.json").exists():
        return ResolvedModel(reference, "bundle", str(path.resolve()), expected_sha256, name)
    raise SitebenchError("not a model reference: expected 'classical', 'builtin:NAME', a MONAI bundle "
                         "directory or 'models:/NAME@ALIAS'", reference)


@lru_cache(maxsize=16)
def _load_cached(kind: str, location: str | None, expected_sha256: str | None, name: str | None,
                 files_sha256: str | None) -> BiomarkerModel:
    if kind == "classical":
        parameters: dict[str, Any] = {}
        version = "1.0"
        if location:
            spec = json.loads((Path(location) / CLASSICAL_FILE).read_text())
            parameters, version = spec.get("parameters", {}), spec.get("version", version)
        model = TissueClassGMVolume(version=version, **parameters)
        if expected_sha256 and model.card.weights_sha256 != expected_sha256:
            raise SitebenchError(f"parameter hash {model.card.weights_sha256[:12]}… does not match "
                                 f"expected {expected_sha256[:12]}…", location or "classical")
        return model
    return BundleSegmentationModel(location, expected_sha256=expected_sha256, name=name)


def load_model(resolved: ResolvedModel | str, **kwargs: Any) -> BiomarkerModel:
    """Load (once per process) the model a reference points to, checking its weight hash."""
    if isinstance(resolved, str):
        resolved = resolve_model(resolved, **kwargs)
    # the files' current hash is part of the cache key: a file changed on disk is never served stale
    current = model_files_sha256(resolved.location) if resolved.location else None
    return _load_cached(resolved.kind, resolved.location, resolved.expected_sha256, resolved.name, current)


# --------------------------------------------------------------------------- MLflow registry


def registry_client(tracking_uri: str | None):
    """An MlflowClient on one store for tracking and registry (no global URI leaks between stores)."""
    import logging

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient  # first: importing mlflow configures its loggers

    for noisy in ("mlflow", "alembic"):  # schema-creation INFO lines are not the user's business
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _resolve_registered(reference: str, expected_sha256: str | None,
                        tracking_uri: str | None) -> ResolvedModel:
    import mlflow
    from mlflow.exceptions import MlflowException

    body = reference[len("models:/"):]
    client = registry_client(tracking_uri)
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = body.rsplit("/", 1)
            version = client.get_model_version(name, number)
        local = mlflow.artifacts.download_artifacts(artifact_uri=version.source, tracking_uri=tracking_uri)
    except MlflowException as exc:
        raise SitebenchError(f"cannot resolve registered model ({exc.message.splitlines()[0]})", reference) from None
    registered_hash = version.tags.get(WEIGHTS_TAG)
    if expected_sha256 and registered_hash and expected_sha256 != registered_hash:
        raise SitebenchError(f"registered weight hash {registered_hash[:12]}… does not match the spec's "
                             f"{expected_sha256[:12]}…", reference)
    kind = "classical" if (Path(local) / CLASSICAL_FILE).exists() else "bundle"
    return ResolvedModel(reference, kind, local, expected_sha256 or registered_hash, name=name,
                         registered_version=str(version.version))


def model_files_sha256(location: str | Path) -> str:
    """The hash registration records: the weight file of a bundle, the parameter file otherwise."""
    location = Path(location)
    for candidate in (location / "models" / "model.pt", location / CLASSICAL_FILE):
        if candidate.exists():
            return sha256_file(candidate)
    return "missing"


def write_classical_spec(directory: str | Path, model: TissueClassGMVolume) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CLASSICAL_FILE).write_text(json.dumps(
        {"kind": "classical", "version": model.card.version, "parameters": model.parameters}, indent=2))
    return directory


def register_model_version(model: BiomarkerModel, files: str | Path, name: str, alias: str | None,
                           tracking_uri: str | None, experiment: str = "sitebench-registry") -> str:
    """Register ``files`` (a bundle or classical spec dir) as a version of ``name``; returns the version.

    Registering the same weights again returns the existing version, so repeated demo
    runs do not pile up versions. The weight hash is stored as a version tag because
    a registered version's artifacts can be overwritten in place.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = registry_client(tracking_uri)
    digest = model.card.weights_sha256
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Registered by sitebench")
    for existing in client.search_model_versions(f"name='{name}'"):
        if existing.tags.get(WEIGHTS_TAG) == digest:
            version = existing.version
            break
    else:
        mlflow.set_tracking_uri(tracking_uri)
        exp = mlflow.get_experiment_by_name(experiment) or mlflow.get_experiment(
            mlflow.create_experiment(experiment))
        with mlflow.start_run(experiment_id=exp.experiment_id, run_name=f"register {name} {model.card.version}",
                              nested=mlflow.active_run() is not None) as run:
            mlflow.log_artifacts(str(files), artifact_path="model")
            mlflow.set_tags({"sitebench.kind": "registration", WEIGHTS_TAG: digest})
        created = client.create_model_version(
            name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
            tags={WEIGHTS_TAG: digest, "model_version": model.card.version, "kind": model.card.kind},
            description=f"{name} {model.card.version}")
        version = created.version
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return str(version)


REPORT_TAG = "sitebench.report_lock_sha256"  # set by sitebench.promotion on @validated


def version_rows(tracking_uri: str | None) -> list[dict[str, Any]]:
    """Every registered version with its aliases, weight hash and report lock hash, by name then number.

    One row per version, so a reviewer sees at a glance which weights @validated points at
    and which report it rests on.
    """
    client = registry_client(tracking_uri)
    rows = []
    for registered in client.search_registered_models():
        aliases: dict[str, list[str]] = {}
        for alias, number in (registered.aliases or {}).items():
            aliases.setdefault(str(number), []).append(alias)
        for version in client.search_model_versions(f"name='{registered.name}'"):
            rows.append({"name": registered.name, "version": str(version.version),
                         "aliases": sorted(aliases.get(str(version.version), [])),
                         "weights_sha256": version.tags.get(WEIGHTS_TAG),
                         "report_lock_sha256": version.tags.get(REPORT_TAG)})
    rows.sort(key=lambda r: (r["name"], int(r["version"])))
    return rows
