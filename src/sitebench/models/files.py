"""Every file a model loads, with its SHA-256: checked in the parent, re-checked in each worker.

A model source resolves to a root folder and the relative paths of the files it loads
(weights, configs, code). :func:`hash_files` records them; :func:`verify_files` refuses a file
whose bytes changed since, naming it, so a worker never scores with what the parent did not check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from sitebench.errors import SitebenchError
from sitebench.provenance import sha256_file


def hash_files(root: str | Path, relative_paths: Iterable[str | Path]) -> dict[str, str]:
    """``{relative path: SHA-256}`` of each file under ``root``, sorted by path; a missing file is an error."""
    root = Path(root)
    hashes: dict[str, str] = {}
    for rel in sorted({Path(p).as_posix() for p in relative_paths}):
        path = root / rel
        if not path.is_file():
            raise SitebenchError("a file the model loads is missing", path)
        hashes[rel] = sha256_file(path)
    return hashes


def verify_files(root: str | Path, expected: dict[str, str]) -> None:
    """Raise, naming the file, when any file's bytes differ from what was checked."""
    root = Path(root)
    for rel, digest in expected.items():
        path = root / rel
        if not path.is_file():
            raise SitebenchError("a file the model loads has gone since it was checked", path)
        actual = sha256_file(path)
        if actual != digest:
            raise SitebenchError(f"SHA-256 is {actual[:12]}…, expected {digest[:12]}…; the file changed since "
                                 "it was checked", path)


def tree_files(root: str | Path, suffixes: tuple[str, ...] = (".py",)) -> list[str]:
    """Relative paths of the files under ``root`` with these suffixes (code a model imports), caches left out."""
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts)
