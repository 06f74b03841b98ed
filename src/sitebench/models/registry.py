"""Resolve a model reference to a loaded model, and register versions in MLflow.

References a spec may use:

- ``classical``                      candidate (a), tissue-class GM volume
- ``builtin:gm_unet_v1``             a bundle shipped inside the package
- ``path/to/bundle_dir``             any MONAI bundle directory
- ``path/to/net.ts`` (``.pt``, ``.pth``)  a TorchScript file with its YAML card (``net.ts.yaml``)
- ``entrypoint:package.module:factory`` (or bare ``package.module:factory``)  a Python entry point
- ``models:/name@alias`` or ``models:/name/3``  an MLflow registered model version (one sitebench
  registered, or any MLflow model with an ``MLmodel`` file)
- ``runs:/<run_id>/<path>``          an MLflow model logged in a run

Every reference resolves, in the parent, to a folder and the SHA-256 of every file the model
loads (weights, configs, code); each worker re-checks them (:func:`verify_files`) before loading,
so worker processes (or Dask workers) load exactly what the parent checked.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sitebench.errors import SitebenchError
from sitebench.models import bundle as bundle_module
from sitebench.models.base import BiomarkerModel
from sitebench.models.classical import TissueClassGMVolume
from sitebench.models.files import hash_files, tree_files, verify_files
from sitebench.provenance import sha256_file, sha256_json

BUILTIN_DIR = Path(__file__).parent / "bundles"
CLASSICAL_FILE = "sitebench-classical.json"
WEIGHTS_TAG = "weights_sha256"
#: Files of a MONAI bundle a loader may read, when bundle.py does not list them itself.
BUNDLE_SUFFIXES = (".json", ".yaml", ".yml", ".pt", ".pth", ".ts", ".py", ".onnx", ".safetensors")
#: Kinds whose files are a bare network plus its YAML card, an entry point's package, or an MLflow model.
MLFLOW_KINDS = ("mlflow-pytorch", "mlflow-pyfunc")


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference made concrete: where its files are and which hashes they must have."""

    reference: str
    kind: str  # "classical" | "bundle" | "torchscript" | "entrypoint" | "mlflow-pytorch" | "mlflow-pyfunc"
    location: str | None  # the folder ``files`` are relative to
    expected_sha256: str | None
    name: str | None = None
    registered_version: str | None = None
    files: tuple[tuple[str, str], ...] = ()  # (relative path, SHA-256) of every file the model loads
    details: tuple[tuple[str, str], ...] = ()  # source-specific facts, e.g. an entry point's package

    @property
    def files_sha256(self) -> str | None:
        return sha256_json(sorted(self.files)) if self.files else None


def builtin_bundles() -> list[str]:
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "configs" / "metadata.json").exists())


def _files(root: str | Path, relative: list[str]) -> tuple[tuple[str, str], ...]:
    return tuple(hash_files(root, relative).items())


def bundle_file_list(bundle_dir: str | Path) -> list[str]:
    """The files a MONAI bundle's loader reads (bundle.py's own list when it has one)."""
    listed = getattr(bundle_module, "bundle_files", None)
    if callable(listed):
        return list(listed(bundle_dir))
    return tree_files(bundle_dir, BUNDLE_SUFFIXES)


def is_bundle(folder: str | Path) -> bool:
    """A MONAI bundle folder: it has an inference config (``configs/inference.json`` or its YAML form)."""
    names = getattr(bundle_module, "CONFIG_NAMES", ("inference.json",))
    return any((Path(folder) / "configs" / config).is_file() for config in names)


def _bundle(reference: str, folder: str | Path, expected_sha256: str | None, name: str | None,
            registered_version: str | None = None) -> ResolvedModel:
    folder = str(Path(folder).resolve())
    return ResolvedModel(reference, "bundle", folder, expected_sha256, name, registered_version,
                         files=_files(folder, bundle_file_list(folder)))


def _classical(reference: str, folder: str | Path | None, expected_sha256: str | None, name: str | None,
               registered_version: str | None = None) -> ResolvedModel:
    files = _files(folder, [CLASSICAL_FILE]) if folder else ()
    return ResolvedModel(reference, "classical", str(folder) if folder else None, expected_sha256, name,
                         registered_version, files=files)


def _pinned(reference: str, actual: str, expected: str | None) -> None:
    if expected and actual != expected:
        raise SitebenchError(f"SHA-256 of the model is {actual[:12]}…, expected {expected[:12]}…; "
                             "it changed since it was pinned", reference)


def _torchscript(reference: str, path: Path, expected_sha256: str | None, name: str | None,
                 registered_version: str | None = None) -> ResolvedModel:
    from sitebench.models.torchscript import torchscript_files

    root, relative = torchscript_files(path)
    files = _files(root, relative)
    _pinned(reference, dict(files)[path.resolve().name], expected_sha256)
    return ResolvedModel(reference, "torchscript", str(root), expected_sha256, name, registered_version,
                         files=files, details=(("model_file", path.resolve().name),))


def _entrypoint(reference: str, expected_sha256: str | None, name: str | None) -> ResolvedModel:
    from sitebench.models.entrypoint import locate

    found = locate(reference)
    files = _files(found.root, list(found.files))
    _pinned(reference, sha256_json(sorted(dict(files).items())), expected_sha256)
    return ResolvedModel(reference, "entrypoint", found.root, expected_sha256, name, files=files,
                         details=(("package", found.package), ("package_version", found.package_version)))


def _mlflow_model(reference: str, folder: str | Path, expected_sha256: str | None, name: str | None,
                  registered_version: str | None) -> ResolvedModel:
    from sitebench.models.mlflow_model import check_config, flavour, model_folder_files

    kind = f"mlflow-{flavour(folder)}"
    check_config(folder)
    files = _files(folder, model_folder_files(folder))
    _pinned(reference, sha256_json(sorted(dict(files).items())), expected_sha256)
    return ResolvedModel(reference, kind, str(folder), expected_sha256, name, registered_version, files=files)


def _torchscript_in(folder: str | Path) -> Path | None:
    """A registered folder holding one TorchScript file and its card (what sitebench registers for one)."""
    from sitebench.models.torchscript import SUFFIXES

    candidates = [p for p in sorted(Path(folder).iterdir()) if p.is_file() and p.suffix in SUFFIXES
                  and (p.with_name(p.name + ".yaml").is_file() or p.with_suffix(".yaml").is_file())]
    return candidates[0] if len(candidates) == 1 else None


def resolve_model(reference: str, expected_sha256: str | None = None, name: str | None = None,
                  tracking_uri: str | None = None) -> ResolvedModel:
    from sitebench.models.entrypoint import PREFIX, looks_like_target
    from sitebench.models.torchscript import is_torchscript_reference

    if reference == "classical":
        return _classical(reference, None, expected_sha256, name)
    if reference.startswith("builtin:"):
        bundle = BUILTIN_DIR / reference.split(":", 1)[1]
        if not (bundle / "configs" / "metadata.json").exists():
            raise SitebenchError(f"unknown built-in model '{reference}' (have: {', '.join(builtin_bundles())})")
        return _bundle(reference, bundle, expected_sha256, name)
    if reference.startswith(PREFIX):
        return _entrypoint(reference, expected_sha256, name)
    if reference.startswith(("models:/", "runs:/")):
        return _resolve_registered(reference, expected_sha256, tracking_uri, name)
    path = Path(reference)
    if (path / CLASSICAL_FILE).exists():
        return _classical(reference, path, expected_sha256, name)
    if is_bundle(path):
        return _bundle(reference, path, expected_sha256, name)
    if is_torchscript_reference(path):
        return _torchscript(reference, path, expected_sha256, name)
    if not path.exists() and looks_like_target(reference):
        return _entrypoint(reference, expected_sha256, name)
    raise SitebenchError("not a model reference: expected 'classical', 'builtin:NAME', a MONAI bundle "
                         "directory, a TorchScript file (.ts, .pt, .pth), 'entrypoint:package.module:factory', "
                         "'models:/NAME@ALIAS', 'models:/NAME/N' or 'runs:/RUN_ID/PATH'", reference)


def _bundle_model(resolved: ResolvedModel) -> BiomarkerModel:
    cls = getattr(bundle_module, "MonaiBundleModel", None) or bundle_module.BundleSegmentationModel
    kwargs: dict[str, Any] = {"expected_sha256": resolved.expected_sha256, "name": resolved.name}
    if "expected_files" in inspect.signature(cls).parameters:
        kwargs["expected_files"] = dict(resolved.files)
    return cls(resolved.location, **kwargs)


@lru_cache(maxsize=16)
def _load_cached(resolved: ResolvedModel) -> BiomarkerModel:
    kind, location, expected_sha256 = resolved.kind, resolved.location, resolved.expected_sha256
    files = dict(resolved.files)
    if kind == "classical":
        parameters: dict[str, Any] = {}
        version = "1.0"
        if location:
            spec = json.loads((Path(location) / CLASSICAL_FILE).read_text())
            parameters, version = spec.get("parameters", {}), spec.get("version", version)
        model: BiomarkerModel = TissueClassGMVolume(version=version, **parameters)
        if expected_sha256 and model.card.weights_sha256 != expected_sha256:
            raise SitebenchError(f"parameter hash {model.card.weights_sha256[:12]}… does not match "
                                 f"expected {expected_sha256[:12]}…", location or "classical")
    elif kind == "bundle":
        model = _bundle_model(resolved)
    elif kind == "torchscript":
        from sitebench.models.torchscript import load_torchscript

        model_file = Path(location) / dict(resolved.details)["model_file"]  # type: ignore[arg-type]
        model = load_torchscript(model_file, files, name=resolved.name, source=resolved.reference)
    elif kind == "entrypoint":
        from sitebench.models.entrypoint import load_entrypoint

        details = dict(resolved.details)
        model = load_entrypoint(resolved.reference, files, details["package"], details["package_version"],
                                name=resolved.name)
    elif kind in MLFLOW_KINDS:
        from sitebench.models.mlflow_model import load_mlflow_model

        model = load_mlflow_model(location, files, resolved.reference, resolved.name,  # type: ignore[arg-type]
                                  resolved.registered_version)
    else:
        raise SitebenchError(f"unknown model kind '{kind}'", resolved.reference)
    if kind in ("torchscript", "entrypoint", *MLFLOW_KINDS):
        _pinned(resolved.reference, model.card.weights_sha256, expected_sha256)
    if files:
        model.card.files = files
    return model


def load_model(resolved: ResolvedModel | str, **kwargs: Any) -> BiomarkerModel:
    """Load (once per process) the model a reference points to, after re-checking every file's hash.

    A file changed since :func:`resolve_model` hashed it is refused with its name; the hashes are part
    of the cache key, so a model is never served from a cache built on other files.
    """
    if isinstance(resolved, str):
        resolved = resolve_model(resolved, **kwargs)
    if resolved.files:
        verify_files(resolved.location, dict(resolved.files))  # type: ignore[arg-type]
    return _load_cached(resolved)


# --------------------------------------------------------------------------- MLflow registry


def registry_client(tracking_uri: str | None):
    """An MlflowClient on one store for tracking and registry (no global URI leaks between stores)."""
    import logging

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars on stderr
    from mlflow import MlflowClient  # first: importing mlflow configures its loggers

    for noisy in ("mlflow", "alembic"):  # schema-creation INFO lines are not the user's business
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _resolve_registered(reference: str, expected_sha256: str | None, tracking_uri: str | None,
                        name: str | None = None) -> ResolvedModel:
    import mlflow
    from mlflow.exceptions import MlflowException

    from sitebench.models.mlflow_model import is_mlflow_model

    client = registry_client(tracking_uri)
    version = None
    try:
        if reference.startswith("runs:/"):
            body = reference[len("runs:/"):]
            if "/" not in body.strip("/"):
                raise SitebenchError("expected 'runs:/RUN_ID/PATH'", reference)
            source = reference
        else:
            body = reference[len("models:/"):]
            if "@" in body:
                registered, alias = body.split("@", 1)
                version = client.get_model_version_by_alias(registered, alias)
            elif "/" in body:
                registered, number = body.rsplit("/", 1)
                version = client.get_model_version(registered, number)
            else:
                raise SitebenchError("expected 'models:/NAME@ALIAS' or 'models:/NAME/N'", reference)
            source = version.source
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=tracking_uri)
    except MlflowException as exc:
        first = (exc.message.splitlines() or [exc.__class__.__name__])[0]
        raise SitebenchError(f"cannot resolve registered model ({first})", reference) from None
    number = str(version.version) if version is not None else None
    if is_mlflow_model(local):
        return _mlflow_model(reference, local, expected_sha256, name, number)
    registered_hash = version.tags.get(WEIGHTS_TAG) if version is not None else None
    if expected_sha256 and registered_hash and expected_sha256 != registered_hash:
        raise SitebenchError(f"registered weight hash {registered_hash[:12]}… does not match the spec's "
                             f"{expected_sha256[:12]}…", reference)
    expected = expected_sha256 or registered_hash
    if (Path(local) / CLASSICAL_FILE).exists():
        return _classical(reference, local, expected, name or (version.name if version else None), number)
    if not (Path(local) / "configs").is_dir():
        script = _torchscript_in(local)
        if script is not None:
            return _torchscript(reference, script, expected, name or (version.name if version else None), number)
    if version is None and not is_bundle(local):
        raise SitebenchError("not a model: the run's folder has no MLmodel file, MONAI bundle or "
                             "TorchScript file", reference)
    return _bundle(reference, local, expected, name or (version.name if version else None), number)


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


def _local_artifacts(tracking_uri: str | None, experiment: str) -> str | None:
    """Artifacts of a local SQLite store go beside its database (``<db folder>/mlartifacts/<experiment>``,
    as :func:`sitebench.benchmarks.tracking.local_store` lays them out), never into the working folder
    (MLflow's default ``./mlruns``); a server decides for itself (None)."""
    if not tracking_uri or not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts" / experiment).as_uri()


def register_model_version(model: BiomarkerModel, files: str | Path, name: str, alias: str | None,
                           tracking_uri: str | None, experiment: str = "sitebench-registry") -> str:
    """Register ``files`` (a bundle, classical spec or TorchScript model's dir) as a version of ``name``.

    Returns the version number.

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
            mlflow.create_experiment(experiment, artifact_location=_local_artifacts(tracking_uri, experiment)))
        with mlflow.start_run(experiment_id=exp.experiment_id, run_name=f"register {name} {model.card.version}",
                              nested=mlflow.active_run() is not None) as run:
            _log_model_files(model, files)
            mlflow.set_tags({"sitebench.kind": "registration", WEIGHTS_TAG: digest})
        created = client.create_model_version(
            name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
            tags={WEIGHTS_TAG: digest, "model_version": model.card.version, "kind": model.card.kind},
            description=f"{name} {model.card.version}")
        version = created.version
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return str(version)


def _log_model_files(model: BiomarkerModel, files: str | Path) -> None:
    """Log the registered files: a bundle or classical folder whole; of a TorchScript model or an entry
    point, only the files it loads (never the whole folder they sit in)."""
    import shutil
    import tempfile

    import mlflow

    if model.card.kind not in ("torchscript", "entrypoint") or not model.card.files:
        mlflow.log_artifacts(str(files), artifact_path="model")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for rel in model.card.files:
            target = Path(tmp) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(files) / rel, target)
        mlflow.log_artifacts(tmp, artifact_path="model")


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
