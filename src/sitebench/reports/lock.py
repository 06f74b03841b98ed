"""The lock: SHA-256 of everything a report depends on, and its verification.

``lock.json`` sits beside ``report.html``. It lists the report's own files
(subjects) and what they rest on (materials: model weights, spec, data manifest,
predictions), plus the code version and package versions. The lock hashes its
own canonical content, so an edited byte anywhere, lock included, fails
``verify``. (Signatures come on top of this; they do not replace it.)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sitebench.errors import SitebenchError
from sitebench.provenance import code_version, package_versions, sha256_file, sha256_json, utc_now

LOCK_FILE = "lock.json"
LOCK_SCHEMA = "sitebench.lock/v1"


def _entry(name: str, path: Path, base: Path) -> dict[str, Any]:
    try:
        where = os.path.relpath(path.resolve(), base.resolve())
    except ValueError:  # another drive on Windows
        where = str(path.resolve())
    return {"name": name, "path": where, "digest": {"sha256": sha256_file(path)}}


def write_lock(report_dir: Path, subjects: dict[str, Path], materials: dict[str, Path],
               report_info: dict[str, Any], seeds: dict[str, Any]) -> Path:
    """Write ``lock.json`` for a finished report folder; returns its path."""
    body = {
        "schema": LOCK_SCHEMA,
        "report": report_info,
        "locked_utc": utc_now(),
        "subjects": [_entry(name, path, report_dir) for name, path in subjects.items()],
        "materials": [_entry(name, path, report_dir) for name, path in materials.items()],
        "code_version": code_version(),
        "packages": package_versions(),
        "seeds": seeds,
    }
    body["lock_sha256"] = sha256_json(body)
    path = report_dir / LOCK_FILE
    with open(path, "x") as handle:  # never overwrite
        json.dump(body, handle, indent=2, sort_keys=True)
    return path


@dataclass
class Verification:
    """Outcome of ``report verify``: every check made, and every problem found."""

    report_dir: Path
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    signoffs: int = 0  # valid sign-offs, when keys were given

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = f"{self.report_dir}: "
        if self.ok:
            signed = f", {self.signoffs} valid sign-off(s)" if self.signoffs else ""
            return head + (f"OK, {self.checked} hashes match{signed} (report {self.report.get('name')} "
                           f"v{self.report.get('version')})")
        return head + "FAILED: " + "; ".join(self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {"report_dir": str(self.report_dir), "ok": self.ok, "checked": self.checked,
                "signoffs": self.signoffs, "problems": self.problems, "report": self.report}


def verify_report(path: str | Path, public_keys: list[str | Path] | None = None) -> Verification:
    """Check the lock's own hash and every file it lists; a report folder or its lock/html file.

    With ``public_keys``, every sign-off must also be a valid Ed25519 signature by one of
    them over this very lock (see :mod:`sitebench.reports.signing`).
    """
    path = Path(path)
    report_dir = path if path.is_dir() else path.parent
    lock_path = report_dir / LOCK_FILE
    if not lock_path.exists():
        raise SitebenchError(f"no {LOCK_FILE} here; not a sitebench report", report_dir)
    try:
        lock = json.loads(lock_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        result = Verification(report_dir)
        result.problems.append(f"{LOCK_FILE} is not valid JSON (changed)")
        return result
    result = Verification(report_dir, report=lock.get("report", {}))
    claimed = lock.pop("lock_sha256", None)
    if claimed != sha256_json(lock):
        result.problems.append(f"{LOCK_FILE} changed (its content no longer matches its own hash)")
    result.checked += 1
    for group in ("subjects", "materials"):
        for entry in lock.get(group, []):
            target = Path(entry["path"])
            target = target if target.is_absolute() else report_dir / target
            result.checked += 1
            if not target.exists():
                result.problems.append(f"{entry['name']} ({entry['path']}) is missing")
            elif sha256_file(target) != entry["digest"]["sha256"]:
                result.problems.append(f"{entry['name']} ({entry['path']}) changed")
    if public_keys:
        from sitebench.reports.signing import verify_signoffs

        valid, problems = verify_signoffs(report_dir, list(public_keys))
        result.checked += valid + len(problems)
        result.signoffs = valid
        result.problems.extend(problems)
    return result
