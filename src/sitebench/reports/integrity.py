"""Does each file a report's lock lists still have its hash?

Two kinds of file, kept apart because a report travels without its materials:

- *subjects*, the report's own files (HTML, PDF, result tables), must sit in the report
  folder with their locked hash;
- *materials*, what the report rests on (weights, spec, data manifest, every image and
  label), are looked for where the lock recorded them (relative to the report folder)
  and, with ``materials_dir``, under another copy of them. A material found nowhere is
  *not available here*: nothing is known about it, which is not the same as changed.

Signing checks a report with this before signing; ``verify`` adds sign-offs and recompute.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from sitebench.provenance import sha256_file, sha256_json
from sitebench.reports.lock import LOCK_FILE, STATEMENT_TYPE

OK, CHANGED, MISSING, NOT_AVAILABLE = "ok", "changed", "missing", "not available here"


@dataclass(frozen=True)
class FileCheck:
    """One locked file: its role, the path the lock records, what was found, and where."""

    role: str
    where: str  # path as recorded in the lock (relative to the report folder, or absolute)
    status: str  # OK | CHANGED | MISSING (a subject) | NOT_AVAILABLE (a material found nowhere)
    found: str | None = None  # the file that was hashed

    @property
    def failed(self) -> bool:
        return self.status in (CHANGED, MISSING)

    def describe(self) -> str:
        return f"{self.role} ({self.where}) {self.status}"

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "where": self.where, "status": self.status, "found": self.found}


#: What verify and sign say when :func:`statement_intact` fails.
LOCK_CHANGED = f"{LOCK_FILE} changed (its content no longer matches its own hash)"


def statement_intact(statement: dict[str, Any]) -> bool:
    """The lock's own hash: an edited byte anywhere in the statement fails this."""
    if statement.get("_type") != STATEMENT_TYPE or not isinstance(statement.get("predicate"), dict):
        return False
    unsigned = copy.deepcopy(statement)
    claimed = unsigned["predicate"].pop("statement_sha256", None)
    return claimed is not None and claimed == sha256_json(unsigned)


def _check(role: str, where: str, digest: str, path: Path | None, absent: str) -> FileCheck:
    if path is None or not path.is_file():
        return FileCheck(role, where, absent)
    return FileCheck(role, where, OK if sha256_file(path) == digest else CHANGED, str(path))


def check_subjects(report_dir: Path, statement: dict[str, Any]) -> list[FileCheck]:
    """Every file of the report itself, in the report folder."""
    checks = []
    for subject in statement.get("subject", []):
        role = (subject.get("annotations") or {}).get("role", subject["name"])
        where = subject["name"]
        path = Path(where) if Path(where).is_absolute() else report_dir / where
        checks.append(_check(role, where, subject["digest"]["sha256"], path, MISSING))
    return checks


def material_candidates(report_dir: Path, where: str, materials_dir: Path | None = None) -> list[Path]:
    """Existing files that may be this material: where the lock recorded it, then under ``materials_dir``.

    Under ``materials_dir`` the recorded path is tried whole (without its leading ``..``), then
    with leading folders dropped one at a time down to the bare file name, so both the trial's
    parent folder and the trial folder itself serve as ``--materials``.
    """
    recorded = Path(where)
    candidates = [recorded if recorded.is_absolute() else report_dir / recorded]
    if materials_dir is not None:
        parts = [p for p in PurePath(where).parts if p not in ("..", ".") and not PurePath(p).anchor]
        candidates += [Path(materials_dir).joinpath(*parts[start:]) for start in range(len(parts))]
    return [c for c in dict.fromkeys(candidates) if c.is_file()]


def locate_material(report_dir: Path, where: str, digest: str, materials_dir: Path | None = None) -> FileCheck:
    """The material's check: the first candidate with the locked hash; else CHANGED (naming the first
    candidate found), or NOT_AVAILABLE when there is none."""
    candidates = material_candidates(report_dir, where, materials_dir)
    for candidate in candidates:
        if sha256_file(candidate) == digest:
            return FileCheck("", where, OK, str(candidate))
    if candidates:
        return FileCheck("", where, CHANGED, str(candidates[0]))
    return FileCheck("", where, NOT_AVAILABLE)


def find_material(report_dir: Path, where: str, digest: str, materials_dir: Path | None = None) -> Path | None:
    """The file holding this material here (with its locked hash), or None."""
    check = locate_material(report_dir, where, digest, materials_dir)
    return Path(check.found) if check.status == OK and check.found else None


def check_materials(report_dir: Path, statement: dict[str, Any],
                    materials_dir: Path | None = None) -> list[FileCheck]:
    """Every material the lock lists: ok, changed, or not available here."""
    checks = []
    for m in (statement.get("predicate") or {}).get("materials", []):
        found = locate_material(report_dir, m["uri"], m["digest"]["sha256"], materials_dir)
        checks.append(FileCheck(m["name"], m["uri"], found.status, found.found))
    return checks
