"""The lock: SHA-256 of everything a report depends on.

``lock.json`` sits beside ``report.html``. It is an in-toto Statement (v1): its
``subject`` lists the report's own files (HTML, PDF, result tables) and its
``predicate`` what they rest on (materials: model weights, spec, data manifest,
every image and label file), the code version, package versions, seeds and the
analysis plan. The statement carries the hash of its own canonical content, so an
edited byte anywhere, lock included, fails ``verify`` (:mod:`sitebench.reports.verify`).
Sign-offs (``signing.py``) sign the lock's SHA-256; they come on top of this and do not
replace it. This module writes and reads locks only: it imports nothing else of the
reports package, so everything else may import it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sitebench.errors import SitebenchError
from sitebench.provenance import code_version, package_versions, sha256_file, sha256_json, utc_now

LOCK_FILE = "lock.json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://sitebench.dev/validation-report/v1"
LEGACY_SCHEMA = "sitebench.lock/v1"  # before the in-toto layout: subjects/materials with paths, lock_sha256


def _relative(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), base.resolve())
    except ValueError:  # another drive on Windows
        return str(path.resolve())


def _subject(role: str, path: Path, base: Path) -> dict[str, Any]:
    """An in-toto ResourceDescriptor for a file of the report itself (name = its path in the folder)."""
    return {"name": _relative(path, base), "digest": {"sha256": sha256_file(path)}, "annotations": {"role": role}}


def _material(role: str, path: Path, base: Path) -> dict[str, Any]:
    """A ResourceDescriptor for an input the report rests on (name = what it is, uri = where it was)."""
    return {"name": role, "uri": _relative(path, base), "digest": {"sha256": sha256_file(path)}}


def write_lock(report_dir: Path, subjects: dict[str, Path], materials: dict[str, Path],
               report_info: dict[str, Any], seeds: dict[str, Any],
               analysis: dict[str, Any] | None = None) -> Path:
    """Write ``lock.json``, an in-toto Statement, for a finished report folder; returns its path.

    ``subject`` lists the report's own files; ``predicate`` holds what they rest on
    (materials), the code and package versions, seeds and the analysis plan, and
    ``statement_sha256``: the hash of the canonical statement without that field.
    """
    predicate = {
        "report": report_info,
        "locked_utc": utc_now(),
        "materials": [_material(role, path, report_dir) for role, path in materials.items()],
        "code_version": code_version(),
        "packages": package_versions(),
        "seeds": seeds,
        "analysis": analysis or {},
    }
    statement = {"_type": STATEMENT_TYPE,
                 "subject": [_subject(role, path, report_dir) for role, path in subjects.items()],
                 "predicateType": PREDICATE_TYPE, "predicate": predicate}
    predicate["statement_sha256"] = sha256_json(statement)
    path = report_dir / LOCK_FILE
    with open(path, "x") as handle:  # never overwrite
        json.dump(statement, handle, indent=2, sort_keys=True)
    return path


def read_lock(report_dir: Path) -> dict[str, Any]:
    """The lock's statement; a one-line error when it is missing or not JSON."""
    lock_path = report_dir / LOCK_FILE
    if not lock_path.exists():
        raise SitebenchError(f"no {LOCK_FILE} here; not a sitebench report", report_dir)
    try:
        statement = json.loads(lock_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SitebenchError(f"{LOCK_FILE} is not valid JSON (changed)", lock_path) from None
    return _from_legacy(statement) if statement.get("schema") == LEGACY_SCHEMA else statement


def _from_legacy(lock: dict[str, Any]) -> dict[str, Any]:
    """An earlier ``sitebench.lock/v1`` lock in the Statement layout, so reports locked then still verify."""
    claimed = lock.pop("lock_sha256", None)
    intact = claimed == sha256_json(lock)
    predicate = {k: v for k, v in lock.items() if k not in ("schema", "subjects", "materials")}
    predicate["materials"] = [{"name": e["name"], "uri": e["path"], "digest": e["digest"]}
                              for e in lock.get("materials", [])]
    statement = {"_type": STATEMENT_TYPE, "predicateType": LEGACY_SCHEMA, "predicate": predicate,
                 "subject": [{"name": e["path"], "digest": e["digest"], "annotations": {"role": e["name"]}}
                             for e in lock.get("subjects", [])]}
    predicate["statement_sha256"] = sha256_json(statement) if intact else None
    return statement


def locked_files(statement: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(role, path relative to the report folder, sha256) for every subject and material."""
    predicate = statement.get("predicate", {})
    rows = [((s.get("annotations") or {}).get("role", s["name"]), s["name"], s["digest"]["sha256"])
            for s in statement.get("subject", [])]
    rows += [(m["name"], m["uri"], m["digest"]["sha256"]) for m in predicate.get("materials", [])]
    return rows


def locked_subject(statement: dict[str, Any], role: str) -> dict[str, Any] | None:
    """The subject (its ``name`` is its path in the report folder, with its ``digest``) that has this role."""
    return next((s for s in statement.get("subject", []) if (s.get("annotations") or {}).get("role") == role), None)


def report_dir_of(path: str | Path) -> Path:
    """The report folder for a folder or one of its files; a one-line error when it holds no lock."""
    path = Path(path)
    report_dir = path if path.is_dir() else path.parent
    if not (report_dir / LOCK_FILE).exists():
        raise SitebenchError(f"no {LOCK_FILE} here; not a sitebench report", report_dir)
    return report_dir
