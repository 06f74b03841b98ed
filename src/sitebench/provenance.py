"""Hashes and the facts every result carries: code version, packages, seeds.

One SHA-256 helper lives here so that every stage hashes files the same way.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20

TRACKED_PACKAGES = (
    "sitebench", "torch", "monai", "numpy", "scipy", "pandas", "nibabel", "pydicom",
    "scikit-learn", "statsmodels", "mlflow", "nilearn", "matplotlib", "pydantic",
)


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in chunks so large images stay cheap."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object in canonical form (sorted keys, no spaces)."""
    return sha256_bytes(canonical_json(obj))


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def utc_now() -> str:
    """Current time, UTC, ISO 8601 to the second."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    import platform  # here, not at the top: every command imports this module for sha256_file
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def code_version(start: str | Path | None = None) -> dict[str, Any]:
    """Git commit and dirty flag of the checkout that holds sitebench, if any."""
    return dict(_code_version(str(start) if start else None))


@lru_cache(maxsize=4)
def _code_version(start: str | None) -> dict[str, Any]:
    """One pair of git calls per process: truth file, lock, report and MLflow all ask."""
    import subprocess

    here = Path(start) if start else Path(__file__).resolve().parent
    info: dict[str, Any] = {"package_version": _own_version(), "git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10)
            info["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _own_version() -> str:
    from sitebench import __version__

    return __version__


def jsonable(value: Any) -> Any:
    """numpy scalars to Python, NaN/NA to None, containers walked, so ``json.dumps`` always works."""
    import math

    import numpy as np

    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, str):
        return value
    try:
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return None
    except ImportError:  # pragma: no cover
        pass
    return str(value)
