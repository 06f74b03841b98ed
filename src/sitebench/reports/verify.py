"""``report verify``: three separate answers an auditor needs, wherever the report folder travels.

1. Are the report's own files intact? (the lock's own hash and every subject)
2. Are its sign-offs valid? (only when public keys are given)
3. Which materials (weights, manifest, images, labels) could be checked here, and did
   they match? A copy of the report without its materials (the copy logged to MLflow,
   one attached to a submission) is intact and signed, with its materials *not available
   here*; ``materials_dir`` checks them against another copy.

The exit status tells them apart (:data:`EXIT_CODES`). ``recompute`` re-derives every
result table from the locked inputs (see :mod:`sitebench.reports.recompute`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sitebench.errors import SitebenchError
from sitebench.reports.integrity import (LOCK_CHANGED, NOT_AVAILABLE, FileCheck, check_materials, check_subjects,
                                         statement_intact)
from sitebench.reports.lock import read_lock, report_dir_of
from sitebench.reports.recompute import recompute_report
from sitebench.reports.signing import read_signoffs, verify_signoffs

__all__ = ["EXIT_CODES", "Verification", "verify_report"]

#: Exit status of ``sitebench report verify`` (2 stays the command line's one-line user error).
EXIT_VERIFIED, EXIT_FAILED, EXIT_MATERIALS_NOT_HERE, EXIT_ENGINE_CHANGED = 0, 1, 3, 4
EXIT_CODES = {
    EXIT_VERIFIED: "verified: report files intact, sign-offs valid (when keys are given), every material matched",
    EXIT_FAILED: "failed: a report file, the lock, a sign-off, a material found here or a recomputed table "
                 "does not match",
    EXIT_MATERIALS_NOT_HERE: "report intact (and signed, when keys are given), but some materials are not "
                             "available here: check them with --materials DIR",
    EXIT_ENGINE_CHANGED: "report intact; recompute reproduced every table except the mixed-model tables, "
                         "which were locked with another mixed-model engine",
}
SHOWN = 3  # names shown per kind of problem in summary(); to_dict() has them all


def _some(items: list[str], hint: str = " (--json lists all)") -> str:
    """The first :data:`SHOWN` items, and how many more (``hint`` says where the rest are)."""
    more = f"; … and {len(items) - SHOWN} more{hint}" if len(items) > SHOWN else ""
    return "; ".join(items[:SHOWN]) + more


@dataclass
class Verification:
    """Outcome of ``report verify``: the report's files, its sign-offs, its materials, and any recompute."""

    report_dir: Path
    report: dict[str, Any] = field(default_factory=dict)
    lock_intact: bool = True
    files: list[FileCheck] = field(default_factory=list)  # the report's own files (lock subjects)
    materials: list[FileCheck] = field(default_factory=list)
    materials_dir: Path | None = None
    signoffs_checked: bool = False  # public keys were given
    signoffs_present: int = 0
    signoffs: int = 0  # valid sign-offs
    signoff_problems: list[str] = field(default_factory=list)
    recomputed: list[str] = field(default_factory=list)  # result tables re-derived and identical
    recompute_problems: list[str] = field(default_factory=list)
    recompute_engine_changes: list[str] = field(default_factory=list)  # differences a recorded engine change explains
    recompute_not_done: list[str] = field(default_factory=list)  # steps skipped for want of a material here

    # ------------------------------------------------------------------ the three answers

    @property
    def file_problems(self) -> list[str]:
        lock = [] if self.lock_intact else [LOCK_CHANGED]
        return lock + [c.describe() for c in self.files if c.failed]

    @property
    def report_intact(self) -> bool:
        return not self.file_problems

    @property
    def signed(self) -> bool | None:
        """True: every sign-off valid; False: one is not (or none is present); None: no keys given."""
        return None if not self.signoffs_checked else not self.signoff_problems

    @property
    def material_problems(self) -> list[str]:
        return [c.describe() for c in self.materials if c.failed]

    @property
    def materials_not_here(self) -> list[FileCheck]:
        return [c for c in self.materials if c.status == NOT_AVAILABLE]

    @property
    def problems(self) -> list[str]:
        """Everything that does not match (not what could not be checked here)."""
        return self.file_problems + self.signoff_problems + self.material_problems + self.recompute_problems

    @property
    def exit_code(self) -> int:
        if self.problems:
            return EXIT_FAILED
        if self.recompute_engine_changes:
            return EXIT_ENGINE_CHANGED
        if self.materials_not_here or self.recompute_not_done:
            return EXIT_MATERIALS_NOT_HERE
        return EXIT_VERIFIED

    @property
    def ok(self) -> bool:
        """Everything verified here: report files, sign-offs (when checked), every material, any recompute."""
        return self.exit_code == EXIT_VERIFIED

    @property
    def checked(self) -> int:
        """Hashes and signatures actually compared (the lock's own hash included)."""
        matched = sum(c.status != NOT_AVAILABLE for c in self.materials)
        return 1 + len(self.files) + matched + self.signoffs + len(self.signoff_problems) + len(self.recomputed)

    # ------------------------------------------------------------------ results-object views

    def summary(self) -> str:
        """At most ten lines: one per answer, counts and the first few names."""
        name = f"report {self.report.get('name')} v{self.report.get('version')}"
        lines = [f"{self.report_dir}: {name}"]
        if self.report_intact:
            lines.append(f"  report files: intact ({len(self.files)} files and the lock's own hash match)")
        else:
            lines.append(f"  report files: FAILED: {_some(self.file_problems)}")
        if self.signed is None:
            lines.append(f"  sign-offs: not checked ({self.signoffs_present} present; give --public-key)")
        elif self.signed:
            lines.append(f"  sign-offs: {self.signoffs} valid")
        else:
            lines.append(f"  sign-offs: FAILED ({self.signoffs} valid): {_some(self.signoff_problems)}")
        matched = sum(c.status == "ok" for c in self.materials)
        where = f" (here or under {self.materials_dir})" if self.materials_dir else ""
        lines.append(f"  materials: {matched} of {len(self.materials)} match{where}")
        if self.material_problems:
            lines.append(f"  materials FAILED: {_some(self.material_problems)}")
        missing = self.materials_not_here
        if missing:
            names = [c.role for c in missing]
            lines.append(f"  materials not available here: {len(missing)} ({_some(names)}); "
                         "check them with --materials DIR")
        if self.recomputed or self.recompute_problems or self.recompute_engine_changes or self.recompute_not_done:
            lines.append(f"  recompute: {len(self.recomputed)} tables re-derived and identical")
            for kind in (self.recompute_problems, self.recompute_engine_changes, self.recompute_not_done):
                if kind:
                    lines.append(f"  recompute: {_some([k.removeprefix('recompute: ') for k in kind])}")
        verdict = f"  => exit {self.exit_code}: {EXIT_CODES[self.exit_code].split(':')[0]}"
        return "\n".join(lines[:9] + [verdict])

    def to_dict(self) -> dict[str, Any]:
        return {"report_dir": str(self.report_dir), "report": self.report, "ok": self.ok,
                "exit_code": self.exit_code, "meaning": EXIT_CODES[self.exit_code], "checked": self.checked,
                "report_files": {"intact": self.report_intact, "lock_intact": self.lock_intact,
                                 "files": len(self.files), "problems": self.file_problems},
                "signoffs": self.signoffs,
                "signoff_check": {"checked": self.signoffs_checked, "valid": self.signoffs,
                                  "present": self.signoffs_present, "problems": self.signoff_problems},
                "materials": {"total": len(self.materials),
                              "matched": sum(c.status == "ok" for c in self.materials),
                              "not_available_here": [c.to_dict() for c in self.materials_not_here],
                              "problems": self.material_problems,
                              "materials_dir": str(self.materials_dir) if self.materials_dir else None},
                "recomputed": self.recomputed,
                "recompute": {"identical": self.recomputed, "problems": self.recompute_problems,
                              "engine_changes": self.recompute_engine_changes, "not_done": self.recompute_not_done},
                "problems": self.problems}

    def to_frame(self) -> pd.DataFrame:
        """One row per locked file: kind, role, recorded path, status and where it was found."""
        rows = [{"kind": "report file", **c.to_dict()} for c in self.files]
        rows += [{"kind": "material", **c.to_dict()} for c in self.materials]
        return pd.DataFrame(rows, columns=["kind", "role", "where", "status", "found"])


def verify_report(path: str | Path, public_keys: list[str | Path] | None = None, recompute: bool = False,
                  materials_dir: str | Path | None = None) -> Verification:
    """Check a report folder (or its lock/html file): its files, its sign-offs, its materials, optionally recompute.

    ``materials_dir`` is another copy of the materials, searched by their recorded path when they
    are not where the lock recorded them. With ``public_keys``, every sign-off must be a valid
    Ed25519 signature by one of them over this very lock.
    """
    report_dir = report_dir_of(path)
    if materials_dir is not None and not Path(materials_dir).is_dir():
        raise SitebenchError("--materials: not a folder", materials_dir)
    materials = Path(materials_dir) if materials_dir is not None else None
    try:
        statement = read_lock(report_dir)
    except SitebenchError:
        return Verification(report_dir, lock_intact=False, materials_dir=materials)
    predicate = statement.get("predicate") if isinstance(statement.get("predicate"), dict) else {}
    result = Verification(report_dir, report=predicate.get("report", {}), lock_intact=statement_intact(statement),
                          files=check_subjects(report_dir, statement),
                          materials=check_materials(report_dir, statement, materials), materials_dir=materials)
    if public_keys:
        result.signoffs_checked = True
        result.signoffs_present = len(read_signoffs(report_dir))
        result.signoffs, result.signoff_problems = verify_signoffs(report_dir, list(public_keys))
    else:
        try:
            result.signoffs_present = len(read_signoffs(report_dir))
        except SitebenchError:  # unreadable signatures.json: it fails when keys are given
            result.signoffs_present = 0
    if recompute:
        again = recompute_report(report_dir, materials)
        result.recomputed = again.checked
        result.recompute_problems = again.problems
        result.recompute_engine_changes = again.engine_changes
        result.recompute_not_done = again.not_done
    return result
