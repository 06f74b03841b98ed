"""Python entry points: ``entrypoint:package.module:factory`` (or bare ``package.module:factory``).

``factory()`` (no arguments) returns an object whose ``predict(data)`` gives a :class:`Prediction`.
Its card is the object's ``card`` when that is a :class:`ModelCard`, else read from optional
attributes (``name``, ``version``, ``licence``, ``citation``, ``biomarkers``, ``training_data``,
``output_labels``). What it loads is the package's code and weights: every ``.py`` of the top-level
package plus weight-like files, each hashed in the parent and re-checked in every worker.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sitebench.errors import SitebenchError
from sitebench.models.base import BiomarkerModel, ModelCard, Prediction, prediction_from_output
from sitebench.models.files import tree_files
from sitebench.provenance import sha256_json

PREFIX = "entrypoint:"
#: Files besides ``.py`` a package may load: weights and configs.
WEIGHT_SUFFIXES = (".pt", ".pth", ".ts", ".onnx", ".npz", ".npy", ".json", ".yaml", ".yml", ".safetensors")
_TARGET = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True)
class EntryPointFiles:
    """Where an entry point's package lives and what it is."""

    target: str  # package.module:factory
    root: str  # the folder the relative file paths start from
    files: tuple[str, ...]
    package: str
    package_version: str


def looks_like_target(reference: str) -> bool:
    """``package.module:factory`` (the bare form; the caller checks it is not an existing path)."""
    return bool(_TARGET.match(reference))


def split_reference(reference: str) -> str:
    """``entrypoint:pkg.mod:factory`` or ``pkg.mod:factory`` -> ``pkg.mod:factory``; malformed is an error."""
    target = reference[len(PREFIX):] if reference.startswith(PREFIX) else reference
    if not looks_like_target(target):
        raise SitebenchError(f"entry point '{reference}' is not of the form 'entrypoint:package.module:factory'")
    return target


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0]}" if text else exc.__class__.__name__


def _import(reference: str, module_name: str):
    try:
        return importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while importing
        raise SitebenchError(f"entry point '{reference}' does not import ({_first_line(exc)})") from None


def _factory(reference: str, target: str):
    module_name, attr = target.split(":", 1)
    obj: Any = _import(reference, module_name)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SitebenchError(f"entry point '{reference}': module '{module_name}' has no '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SitebenchError(f"entry point '{reference}': '{attr}' is not callable (it is a {type(obj).__name__})")
    return obj


def _distribution(top: str) -> tuple[str, str] | None:
    names = importlib.metadata.packages_distributions().get(top) or []
    for name in names:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _loaded_suffix(path: str | Path, python_only: bool = False) -> bool:
    suffix = Path(path).suffix
    return suffix == ".py" or (not python_only and suffix in WEIGHT_SUFFIXES)


def _distribution_files(dist_name: str, top: str) -> tuple[Path, list[str]] | None:
    """The distribution's own listed files of the top-level package (None: it lists none, e.g. editable)."""
    dist = importlib.metadata.distribution(dist_name)
    listed = dist.files or []
    root = Path(dist.locate_file("")).resolve()
    chosen = []
    for entry in listed:
        parts = Path(str(entry)).parts
        if not parts or "__pycache__" in parts or ".." in parts:
            continue
        in_package = parts[0] == top or (len(parts) == 1 and parts[0] == f"{top}.py")
        if in_package and _loaded_suffix(entry) and (root / Path(str(entry))).is_file():
            chosen.append(Path(str(entry)).as_posix())
    return (root, sorted(chosen)) if chosen else None


def _adapter_files(reference: str, module: Any) -> tuple[str, tuple[str, ...], str, str] | None:
    """Files an adapter module names itself (root, relative paths, package, version), or None.

    An adapter that lives inside a larger package -- such as sitebench's own adapters of
    published networks -- defines ``model_files() -> {name: path}`` and ``PACKAGE``: then only
    those files and the adapter's own file are hashed, not every file of the package around it,
    and the card names the package that ships the network.
    """
    listing = getattr(module, "model_files", None)
    if not callable(listing):
        return None
    try:
        paths = [Path(p).resolve() for p in dict(listing()).values()]
    except SitebenchError:
        raise
    except Exception as exc:
        raise SitebenchError(f"entry point '{reference}': model_files() raised {_first_line(exc)}") from None
    paths.append(Path(module.__file__).resolve())
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    package = str(getattr(module, "PACKAGE", "") or module.__name__.split(".", 1)[0])
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        version = str(getattr(module, "__version__", "unversioned"))
    return str(root), tuple(sorted({p.relative_to(root).as_posix() for p in paths})), package, version


def locate(reference: str) -> EntryPointFiles:
    """Import the entry point's module and find the files it loads (runs in the parent)."""
    target = split_reference(reference)
    module_name = target.split(":", 1)[0]
    _factory(reference, target)  # imports it, and checks the factory exists, before any worker starts
    adapter = _adapter_files(reference, sys.modules[module_name])
    if adapter is not None:
        return EntryPointFiles(target, *adapter)
    top = module_name.split(".", 1)[0]
    top_module = sys.modules[top]
    origin = getattr(top_module, "__file__", None)
    if origin is None:  # a namespace package: its first folder
        paths = list(getattr(top_module, "__path__", []))
        if not paths:
            raise SitebenchError(f"entry point '{reference}': cannot find the files of package '{top}'")
        package_dir: Path | None = Path(paths[0]).resolve()
    else:
        origin_path = Path(origin).resolve()
        package_dir = origin_path.parent if origin_path.name == "__init__.py" else None
    found = _distribution(top)
    listed = _distribution_files(found[0], top) if found else None
    if listed is not None:
        root, files = listed
    elif package_dir is not None:
        root = package_dir.parent
        files = [f"{package_dir.name}/{rel}" for rel in tree_files(package_dir, (".py", *WEIGHT_SUFFIXES))]
    else:  # a single-module top level: the module file is the code
        root, files = origin_path.parent, [origin_path.name]
    if found:
        package, version = found
    else:
        package, version = top, str(getattr(top_module, "__version__", "unversioned"))
    return EntryPointFiles(target, str(root), tuple(files), package, version)


class EntryPointModel(BiomarkerModel):
    """The object an entry point's factory made, with a card that records its package and files."""

    def __init__(self, obj: Any, card: ModelCard) -> None:
        self.obj = obj
        self.card = card

    def predict(self, data: dict[str, Any]) -> Prediction:
        result = self.obj.predict(data)
        return result if isinstance(result, Prediction) else prediction_from_output(result)


def load_entrypoint(reference: str, files: dict[str, str], package: str, package_version: str,
                    name: str | None = None) -> EntryPointModel:
    """Call the factory (files already hash-checked) and build the card."""
    target = split_reference(reference)
    factory = _factory(reference, target)
    try:
        obj = factory()
    except Exception as exc:
        raise SitebenchError(f"entry point '{reference}': the factory raised {_first_line(exc)}") from None
    if not callable(getattr(obj, "predict", None)):
        raise SitebenchError(f"entry point '{reference}': the factory returned a {type(obj).__name__}, "
                             "which has no predict(data) method")
    digest = sha256_json(sorted(files.items()))
    extra = {"package": package, "package_version": package_version}
    base = getattr(obj, "card", None)
    if isinstance(base, ModelCard):
        card = dataclasses.replace(base, name=name or base.name, kind="entrypoint", source=reference,
                                   weights_sha256=base.weights_sha256 or digest, files=dict(files),
                                   extra={**base.extra, **extra})
    else:
        labels = getattr(obj, "output_labels", None) or {}
        biomarkers = tuple(getattr(obj, "biomarkers", None) or ())
        card = ModelCard(name=name or str(getattr(obj, "name", None) or target.split(":", 1)[0]),
                         version=str(getattr(obj, "version", None) or package_version),
                         weights_sha256=digest, kind="entrypoint", source=reference, outputs=biomarkers,
                         extra=extra, licence=str(getattr(obj, "licence", "") or ""),
                         citation=str(getattr(obj, "citation", "") or ""), biomarkers=biomarkers,
                         files=dict(files), training_data=str(getattr(obj, "training_data", "") or ""),
                         output_labels={int(k): str(v) for k, v in dict(labels).items()})
    return EntryPointModel(obj, card)
