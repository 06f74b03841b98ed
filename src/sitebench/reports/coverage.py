"""What a locked report validates, and which sites wait for re-validation after an upgrade.

Coverage (:func:`report_coverage`)
----------------------------------
A report *covers* (site, software version[, scanner][, model]) when

1. it verifies (:func:`sitebench.reports.verify.verify_report`: the lock's own hash, every
   report file, every material found here, every sign-off against the given public keys),
   with no material missing here;
2. it carries at least one ``approval`` sign-off (all of its sign-offs being valid, as 1.
   requires); and
3. its locked data manifest (the material named ``data manifest``, read only when found
   with its locked hash) has scans of that site with that software version (and scanner,
   and model).

Without public keys nothing is signed as far as coverage knows: sign-offs are not checked,
so a report then validates its scans (:meth:`ReportCoverage.includes`) but covers nothing.

Re-validation (:func:`revalidation_pending`)
--------------------------------------------
Pure logic over the rows :meth:`QCRecords.drift_events` and :meth:`QCRecords.latest_verdicts`
return. A site is *re-validation pending* for

- a **software** change: the latest ``SoftwareVersions`` drift event (kind ``software``) of a
  (site, scanner, protocol) baseline; the new version must be covered at that site;
- a **model** change: a ``ManufacturersModelName`` drift event (kind ``model``: same physical
  scanner, new model); the scanner with that model must be covered;
- a **new scanner**: the drift monitor's ``scanner`` event (the first series of a scanner
  pseudonym at a site where another scanner already had a qualified baseline for the same
  protocol) or, for gate stores recorded before that event existed, the same found in the
  latest verdicts (another scanner had a passing series of that protocol first); that
  scanner (at the software version it runs now) must be covered.

*Since* is the first series after the change (the drift event's series, or the new scanner's
first series) and when the gate checked it. One :class:`PendingRevalidation` per site lists
its uncovered changes, each with why it is pending.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from sitebench.errors import SitebenchError
from sitebench.provenance import sha256_file
from sitebench.reports.integrity import find_material
from sitebench.reports.lock import LOCK_FILE, read_lock, report_dir_of
from sitebench.reports.signing import load_public_key, read_signoffs
from sitebench.reports.verify import SHOWN, Verification, verify_report
from sitebench.reports.verify import _some as _first_few

if TYPE_CHECKING:  # pandas stays off the start-up path
    import pandas as pd

__all__ = ["DATA_MANIFEST", "GateRows", "PendingRevalidation", "ReportCoverage", "RevalidationStatus", "SiteChange",
           "UNCOVERED_TAG", "revalidation_status", "site_changes",
           "find_reports", "pending_frame", "report_coverage", "revalidation_pending", "sites_not_covered"]

DATA_MANIFEST = "data manifest"  # the lock's material role (as recompute reads it)
UNCOVERED_TAG = "sitebench.uncovered_sites"  # model-version tag promotion sets from sites_not_covered
CHANGE_KINDS = ("software", "model", "scanner", "not validated")
_VERSION_DIR = re.compile(r"v(\d{3,})")  # as reports.build.next_report_dir names them


def _text(value: Any) -> str | None:
    if value is None:
        return None
    try:
        if value != value:  # NaN from a table
            return None
    except (TypeError, ValueError):
        pass
    text = str(value).strip()
    return text or None


def _decoded(value: Any) -> Any:
    """A drift event's baseline/observed as the records store them (JSON text), or already decoded."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _shown(value: Any) -> str | None:
    value = _decoded(value)
    if isinstance(value, (list, tuple)):
        return "\\".join(str(v) for v in value)
    return _text(value)


def _some(items: list[str]) -> str:
    return _first_few(items, hint="")


# --------------------------------------------------------------------------- coverage of one report


@dataclass
class ReportCoverage:
    """What one locked report validates (its data manifest's scans) and whether it counts (signed)."""

    report_dir: Path
    name: str | None = None
    version: int | None = None
    lock_sha256: str | None = None
    verified: bool = False  # files, lock, materials (all found here) and, when checked, every sign-off
    signoffs_checked: bool = False  # public keys were given
    valid_signoffs: int = 0
    approvals: int = 0  # approval sign-offs, counted only when every sign-off is valid
    problems: list[str] = field(default_factory=list)  # why it does not count; empty when signed
    manifest: str | None = None  # the data manifest read here (with its locked hash), else None
    scans: list[dict[str, Any]] = field(default_factory=list)  # site, scanner_id, vendor, scanner_model,
    #                                                             software_version, n_scans
    model_versions: list[str] = field(default_factory=list)
    #: The MLflow run the report names in its lock (``tracking_uri``, ``experiment_id``, ``run_id``), if any.
    mlflow_run: dict[str, str] | None = None

    @property
    def signed(self) -> bool:
        """Verified, every sign-off valid against the given keys, at least one approval: it counts."""
        return self.verified and self.signoffs_checked and self.approvals > 0 and not self.problems

    @property
    def label(self) -> str:
        version = f"v{self.version:03d}" if isinstance(self.version, int) else self.report_dir.name
        return f"report {self.name} {version}" if self.name else f"report {version}"

    @property
    def sites(self) -> list[str]:
        return sorted({s["site"] for s in self.scans if s["site"]})

    def software_versions(self, site: str | None = None) -> list[str]:
        return sorted({s["software_version"] for s in self.scans
                       if s["software_version"] and (site is None or s["site"] == site)})

    def scanners(self, site: str | None = None) -> list[str]:
        return sorted({s["scanner_id"] for s in self.scans
                       if s["scanner_id"] and (site is None or s["site"] == site)})

    def includes(self, site: str, software_version: str | None = None, scanner_id: str | None = None,
                 model: str | None = None) -> bool:
        """Its data manifest has scans of this site (with this software version, scanner, model): signed or not."""
        for scan in self.scans:
            if scan["site"] != site:
                continue
            if software_version is not None and scan["software_version"] != _text(software_version):
                continue
            if scanner_id is not None and scan["scanner_id"] != _text(scanner_id):
                continue
            if model is not None and scan["scanner_model"] != _text(model):
                continue
            return True
        return False

    def covers(self, site: str, software_version: str | None = None, scanner_id: str | None = None,
               model: str | None = None) -> bool:
        """Signed (verified, approved) and :meth:`includes` these scans."""
        return self.signed and self.includes(site, software_version, scanner_id, model)

    def why_not(self) -> str:
        """Why it does not count, in a few words (empty when signed)."""
        if self.signed:
            return ""
        return _some(self.problems) if self.problems else "not signed"

    # ------------------------------------------------------------------ results-object views
    def summary(self) -> str:
        state = "signed (verified, approved)" if self.signed else f"does not count: {self.why_not()}"
        lines = [f"{self.report_dir}: {self.label}: {state}"]
        if self.manifest is None:
            lines.append("  data manifest: not read")
        else:
            lines.append(f"  validates {len(self.sites)} sites, {len(self.software_versions())} software versions, "
                         f"{len(self.scanners())} scanners ({sum(s['n_scans'] for s in self.scans)} scans)")
            for site in self.sites[:6]:
                lines.append(f"  {site}: {', '.join(self.software_versions(site)) or '-'}")
            if len(self.sites) > 6:
                lines.append(f"  … and {len(self.sites) - 6} more sites (--json lists all)")
        if self.model_versions:
            lines.append(f"  model versions: {', '.join(self.model_versions)}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"report_dir": str(self.report_dir), "name": self.name, "version": self.version,
                "label": self.label, "lock_sha256": self.lock_sha256, "signed": self.signed,
                "verified": self.verified, "signoffs_checked": self.signoffs_checked,
                "valid_signoffs": self.valid_signoffs, "approvals": self.approvals, "problems": list(self.problems),
                "manifest": self.manifest, "sites": self.sites, "model_versions": list(self.model_versions),
                "mlflow_run": dict(self.mlflow_run) if self.mlflow_run else None,
                "scans": [dict(s) for s in self.scans]}

    def to_frame(self) -> pd.DataFrame:
        """One row per (site, scanner, vendor, model, software version) the manifest holds, with ``signed``."""
        import pandas as pd

        columns = ["report", "site", "scanner_id", "vendor", "scanner_model", "software_version", "n_scans",
                   "signed"]
        return pd.DataFrame([{"report": self.label, **s, "signed": self.signed} for s in self.scans],
                            columns=columns)


def report_coverage(report_dir: str | Path, public_keys: Sequence[str | Path] | None = None, *,
                    materials_dir: str | Path | None = None,
                    verification: Verification | None = None) -> ReportCoverage:
    """Which sites / software versions / scanners / model versions a report validates, and whether it counts.

    ``verification`` reuses a :func:`verify_report` already made with these keys (promotion
    has one), so nothing is hashed twice. A bad public key path is a user error; everything
    wrong with the report itself is a problem on the result, never an exception.
    """
    report_dir = report_dir_of(report_dir)
    keys = list(public_keys or [])
    for key in keys:
        load_public_key(Path(key))  # a wrong --public-key is the user's error, not the report's
    result = ReportCoverage(report_dir=report_dir, signoffs_checked=bool(keys))
    try:
        statement = read_lock(report_dir)
    except SitebenchError as exc:
        result.problems.append(str(exc))
        return result
    predicate = statement.get("predicate") if isinstance(statement.get("predicate"), dict) else {}
    info = predicate.get("report") if isinstance(predicate.get("report"), dict) else {}
    result.name = _text(info.get("name"))
    result.version = info.get("version") if isinstance(info.get("version"), int) else None
    result.lock_sha256 = sha256_file(report_dir / LOCK_FILE)
    result.model_versions = _model_versions(predicate)
    run = info.get("mlflow_run")
    if isinstance(run, dict) and all(isinstance(run.get(k), str) for k in ("tracking_uri", "experiment_id", "run_id")):
        result.mlflow_run = {k: run[k] for k in ("tracking_uri", "experiment_id", "run_id")}

    if verification is None:
        try:
            verification = verify_report(report_dir, public_keys=keys or None, materials_dir=materials_dir)
        except SitebenchError as exc:  # e.g. an unreadable signatures.json
            verification = None
            result.problems.append(f"does not verify: {exc}")
    if verification is not None:
        if verification.problems:
            result.problems.append("does not verify: " + _some(verification.problems))
        elif verification.materials_not_here:
            missing = verification.materials_not_here
            result.problems.append(f"does not verify here: {len(missing)} material(s) not available "
                                   f"(first: {missing[0].where}); give the materials folder")
        else:
            result.verified = True
        result.valid_signoffs = verification.signoffs
    if not keys:
        result.problems.append("sign-offs not checked (no public key given)")
    elif result.verified:
        meanings = [s.get("meaning") for s in read_signoffs(report_dir) if isinstance(s, dict)]
        result.approvals = meanings.count("approval")
        if not result.approvals:
            result.problems.append("no approval sign-off (only " + (", ".join(sorted(set(map(str, meanings))))
                                                                     or "none") + ")")

    material = next((m for m in predicate.get("materials", []) or []
                     if isinstance(m, dict) and m.get("name") == DATA_MANIFEST), None)
    if material is None:
        result.problems.append("its lock names no data manifest")
        return result
    path = find_material(report_dir, material["uri"], material["digest"]["sha256"],
                         Path(materials_dir) if materials_dir is not None else None)
    if path is None:
        if not any(p.startswith("does not verify") for p in result.problems):
            result.problems.append(f"its data manifest ({material['uri']}) is not here with its locked hash")
        return result
    result.manifest = str(path)
    try:
        result.scans = _manifest_scans(path)
    except SitebenchError as exc:
        result.problems.append(f"its data manifest cannot be read: {exc}")
    return result


def _model_versions(predicate: dict[str, Any]) -> list[str]:
    analysis = predicate.get("analysis") if isinstance(predicate.get("analysis"), dict) else {}
    keys = [str(k) for k in analysis.get("model_keys") or []]
    for material in predicate.get("materials", []) or []:
        name = str(material.get("name", "")) if isinstance(material, dict) else ""
        if name.startswith("weights "):
            keys.append(name.removeprefix("weights ").strip())
    return list(dict.fromkeys(k for k in keys if k))


def _manifest_scans(path: Path) -> list[dict[str, Any]]:
    from sitebench.datasets import manifest as mf

    table = mf.read_table(path)
    if mf.SITE not in table:
        raise SitebenchError(f"no '{mf.SITE}' column", path)
    return manifest_scans(table)


def manifest_scans(table: pd.DataFrame) -> list[dict[str, Any]]:
    """A manifest's scans counted per (site, scanner_id, vendor, scanner_model, software_version)."""
    from sitebench.datasets import manifest as mf

    columns = {"site": mf.SITE, "scanner_id": mf.SCANNER_ID, "vendor": mf.VENDOR,
               "scanner_model": mf.SCANNER_MODEL, "software_version": mf.SOFTWARE_VERSION}
    counts: dict[tuple, int] = {}
    for _, row in table.iterrows():
        key = tuple(_text(row[c]) if c in table else None for c in columns.values())
        counts[key] = counts.get(key, 0) + 1
    return [{**dict(zip(columns, key)), "n_scans": n}
            for key, n in sorted(counts.items(), key=lambda kv: tuple(v or "" for v in kv[0]))]


def find_reports(root: str | Path) -> list[Path]:
    """Every report folder under a reports root (``<root>/<name>/vNNN/`` holding a lock), oldest version first.

    ``root`` may also be one report's ``<name>`` folder or a report folder itself.
    """
    root = Path(root)
    if not root.is_dir():
        raise SitebenchError("no such reports folder", root)
    if (root / LOCK_FILE).exists():
        return [root]
    found = [p for p in root.iterdir() if _VERSION_DIR.fullmatch(p.name) and (p / LOCK_FILE).exists()]
    for name_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        found += [p for p in name_dir.iterdir()
                  if p.is_dir() and _VERSION_DIR.fullmatch(p.name) and (p / LOCK_FILE).exists()]
    return sorted(set(found), key=lambda p: (p.parent.name, int(p.name[1:])))


# --------------------------------------------------------------------------- what changed at each site


@dataclass(frozen=True)
class SiteChange:
    """One software / model / scanner change at a site (or, for promotion, a current state no report has)."""

    site: str
    kind: str  # software | model | scanner | not validated
    scanner_id: str | None  # pseudonym of the scanner the new series came from
    protocol: str | None
    before: str | None  # previous software version / model / qualified scanner
    after: str | None  # new software version / model / scanner pseudonym
    software_version: str | None  # the software version that must be covered with it
    model: str | None  # the scanner model that must be covered (model changes)
    since_series: str | None  # the first series after the change
    since_utc: str | None  # when the gate checked that series

    @property
    def since_date(self) -> str:
        return (self.since_utc or "")[:10]

    def requirement(self) -> dict[str, str | None]:
        """The (site, software_version[, scanner_id][, model]) a report must include to cover it."""
        need: dict[str, str | None] = {"site": self.site, "software_version": self.software_version}
        if self.kind in ("scanner", "model"):
            need["scanner_id"] = self.scanner_id
        if self.kind == "model":
            need["model"] = self.model
        return need

    def covered_by(self, report: ReportCoverage, signed_only: bool = True) -> bool:
        need = self.requirement()
        check = report.covers if signed_only else report.includes
        return check(need["site"], need.get("software_version"), need.get("scanner_id"), need.get("model"))

    def what(self) -> str:
        """What must be covered, in words: 'syngo MR XA30 at S07', 'scanner scanner-1a2b (…) at S16'."""
        if self.kind == "software" or self.kind == "not validated":
            return f"{self.after or self.software_version} at {self.site}"
        if self.kind == "model":
            return f"model {self.after} (scanner {self.scanner_id}) at {self.site}"
        return f"scanner {self.scanner_id}" + (f" ({self.software_version})" if self.software_version else "") \
            + f" at {self.site}"

    def describe(self) -> str:
        """'software syngo MR E11 -> syngo MR XA30 since series 3f2a… (2026-07-01)'."""
        since = f" since series {self.since_series}" if self.since_series else ""
        since += f" ({self.since_date})" if self.since_utc else ""
        if self.kind == "scanner":
            return f"new scanner {self.after} (qualified: {self.before})" + since
        if self.kind == "not validated":
            return f"software {self.after} in use" + since
        return f"{self.kind} {self.before} -> {self.after}" + since

    def short(self) -> str:
        """For promotion's one line: 'syngo MR XA30, since 2026-07-01', 'new scanner', 'model X'."""
        when = f", since {self.since_date}" if self.since_utc else ""
        if self.kind == "scanner":
            return "new scanner" + when
        if self.kind == "model":
            return f"model {self.after}" + when
        if self.kind == "not validated":
            return f"{self.after}, not in the report"
        return f"{self.after}" + when

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "kind": self.kind, "scanner_id": self.scanner_id, "protocol": self.protocol,
                "before": self.before, "after": self.after, "software_version": self.software_version,
                "model": self.model, "since_series": self.since_series, "since_utc": self.since_utc,
                "description": self.describe()}


@dataclass
class PendingRevalidation:
    """One site waiting for re-validation: its uncovered changes, and for each why it is pending."""

    site: str
    changes: list[SiteChange]
    reasons: list[str]  # one per change, same order

    @property
    def kinds(self) -> list[str]:
        return list(dict.fromkeys(c.kind for c in self.changes))

    @property
    def since_utc(self) -> str | None:
        stamps = [c.since_utc for c in self.changes if c.since_utc]
        return min(stamps) if stamps else None

    @property
    def software_versions(self) -> list[str]:
        return list(dict.fromkeys(c.software_version for c in self.changes if c.software_version))

    @property
    def scanners(self) -> list[str]:
        return list(dict.fromkeys(c.scanner_id for c in self.changes if c.scanner_id))

    def line(self) -> str:
        """'S07: software syngo MR E11 -> syngo MR XA30 since series 3f2a… (2026-07-01); no signed report …'."""
        return f"{self.site}: " + "; ".join(f"{c.describe()}; {why}" for c, why in zip(self.changes, self.reasons))

    def short(self) -> str:
        """'S07 (syngo MR XA30, since 2026-07-01)'."""
        return f"{self.site} ({'; '.join(c.short() for c in self.changes)})"

    def summary(self) -> str:
        return self.line()

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "pending": True, "kinds": self.kinds, "since_utc": self.since_utc,
                "software_versions": self.software_versions, "scanners": self.scanners, "line": self.line(),
                "changes": [{**c.to_dict(), "reason": why} for c, why in zip(self.changes, self.reasons)]}

    def to_frame(self) -> pd.DataFrame:
        return pending_frame([self])


def pending_frame(pending: Iterable[PendingRevalidation]) -> pd.DataFrame:
    """One row per (site, change): kind, scanner, before/after, since, reason."""
    import pandas as pd

    columns = ["site", "kind", "scanner_id", "protocol", "before", "after", "software_version", "model",
               "since_series", "since_utc", "reason"]
    rows = [{**{k: v for k, v in c.to_dict().items() if k in columns}, "reason": why}
            for p in pending for c, why in zip(p.changes, p.reasons)]
    return pd.DataFrame(rows, columns=columns)


@dataclass
class GateRows:
    """The gate's own records that coverage and the report's QC section read.

    The caller opens the gate's store (``QCRecords``) and hands it to :meth:`from_records`:
    reports read the gate's rows, they never open its database themselves.
    """

    drift_events: list[dict[str, Any]]
    latest_verdicts: list[dict[str, Any]]
    source: str = ""
    #: ``QCRecords.site_status()`` rows (verdict counts, open deviations, re-scans, rejected files)
    site_status: list[Any] = field(default_factory=list)
    #: every deviation of every latest verdict (``QCRecords.latest_deviations()``)
    deviations: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_records(cls, records: Any, source: str = "") -> GateRows:
        """Everything the report and re-validation need, read from an open ``QCRecords``."""
        return cls(drift_events=records.drift_events(), latest_verdicts=records.latest_verdicts(), source=source,
                   site_status=records.site_status(), deviations=records.latest_deviations())


def _key_part(key: Any, index: int) -> str | None:
    parts = str(key or "").split("|")  # drift scanner key: Manufacturer|ident[|protocol]
    return _text(parts[index]) if len(parts) > index else None


def _key_ident(key: str) -> str | None:
    return _key_part(key.strip(), 1) or _text(key)


def _scanner_of(event: dict[str, Any], by_series: dict[str, dict[str, Any]]) -> str | None:
    verdict = by_series.get(event.get("series_key"))
    if verdict is not None and _text(verdict.get("scanner")):
        return _text(verdict["scanner"])
    return _key_ident(str(event.get("scanner") or ""))


def site_changes(drift_events: list[dict[str, Any]], latest_verdicts: list[dict[str, Any]]) -> list[SiteChange]:
    """Every software / model / new-scanner change the gate's rows show, in the order they happened."""
    by_series = {v["series_key"]: v for v in latest_verdicts if v.get("series_key")}
    changes: list[SiteChange] = []
    latest_software: dict[tuple, dict[str, Any]] = {}
    for event in sorted(drift_events, key=lambda e: e.get("id") or 0):
        kind, parameter = event.get("kind"), event.get("parameter")
        if kind == "software" and parameter == "SoftwareVersions":
            latest_software[(event["site"], event.get("scanner"))] = event  # the latest one stands
        elif kind == "scanner":  # the monitor's own new-scanner event (stores from before it: see below)
            verdict = by_series.get(event.get("series_key"), {})
            before = [_key_ident(k) for k in str(_decoded(event.get("baseline")) or "").split(",") if k.strip()]
            changes.append(SiteChange(
                site=event["site"], kind="scanner", scanner_id=_scanner_of(event, by_series),
                protocol=verdict.get("protocol") or _key_part(event.get("scanner"), 2),
                before=", ".join(b for b in before if b) or None, after=_scanner_of(event, by_series),
                software_version=_text(verdict.get("software_version")), model=None,
                since_series=event.get("series_key"), since_utc=event.get("first_seen")))
        elif kind == "model" and parameter == "ManufacturersModelName":
            verdict = by_series.get(event.get("series_key"), {})
            changes.append(SiteChange(
                site=event["site"], kind="model", scanner_id=_scanner_of(event, by_series),
                protocol=verdict.get("protocol"), before=_shown(event.get("baseline")),
                after=_shown(event.get("observed")), software_version=_text(verdict.get("software_version")),
                model=_shown(event.get("observed")), since_series=event.get("series_key"),
                since_utc=event.get("first_seen")))
    for event in latest_software.values():
        verdict = by_series.get(event.get("series_key"), {})
        after = _shown(event.get("observed"))
        changes.append(SiteChange(
            site=event["site"], kind="software", scanner_id=_scanner_of(event, by_series),
            protocol=verdict.get("protocol"), before=_shown(event.get("baseline")), after=after,
            software_version=after, model=None, since_series=event.get("series_key"),
            since_utc=event.get("first_seen")))
    # a new scanner pseudonym at a site whose protocol already had a qualified (passing) scanner, for
    # gate stores recorded before the drift monitor raised 'scanner' events itself
    known = {(c.site, c.scanner_id) for c in changes if c.kind == "scanner"}
    qualified: dict[tuple, str] = {}
    seen: set[tuple] = set()
    latest_on: dict[tuple, dict[str, Any]] = {}
    for verdict in sorted(latest_verdicts, key=lambda v: v.get("id") or 0):
        scanner, protocol = _text(verdict.get("scanner")), verdict.get("protocol")
        if scanner is None or protocol is None:
            continue
        latest_on[(verdict["site"], scanner)] = verdict
        key = (verdict["site"], protocol)
        first = qualified.get(key)
        if first is not None and (key, scanner) not in seen and (verdict["site"], scanner) not in known:
            # scanners seen before qualification are not new
            changes.append(SiteChange(
                site=verdict["site"], kind="scanner", scanner_id=scanner, protocol=protocol, before=first,
                after=scanner, software_version=_text(verdict.get("software_version")), model=None,
                since_series=verdict.get("series_key"), since_utc=verdict.get("checked_utc")))
        seen.add((key, scanner))
        if first is None and verdict.get("status") == "pass":
            qualified[key] = scanner
    # a new scanner is covered at the software version it runs now
    changes = [c if c.kind != "scanner" or (c.site, c.scanner_id) not in latest_on else
               SiteChange(**{**c.__dict__, "software_version": _text(
                   latest_on[(c.site, c.scanner_id)].get("software_version")) or c.software_version})
               for c in changes]
    return sorted(changes, key=lambda c: (c.site, c.since_utc or "", CHANGE_KINDS.index(c.kind)))


def _reason(change: SiteChange, reports: Sequence[ReportCoverage]) -> str:
    what = change.what()
    if not reports:
        return f"no signed report covers {what} (no reports given)"
    unsigned = [r for r in reports if change.covered_by(r, signed_only=False) and not r.signed]
    if unsigned:
        return f"no signed report covers {what} (" + "; ".join(
            f"{r.label} includes it but {r.why_not()}" for r in unsigned[:SHOWN]) + ")"
    return f"no signed report covers {what}"


def revalidation_pending(drift_events: list[dict], latest_verdicts: list[dict],
                         reports: list[ReportCoverage]) -> list[PendingRevalidation]:
    """One row per site with a software / model / scanner change that no signed report covers (by site)."""
    by_site: dict[str, PendingRevalidation] = {}
    for change in site_changes(drift_events, latest_verdicts):
        if any(change.covered_by(r) for r in reports):
            continue
        row = by_site.setdefault(change.site, PendingRevalidation(change.site, [], []))
        row.changes.append(change)
        row.reasons.append(_reason(change, reports))
    return [by_site[s] for s in sorted(by_site)]


def sites_not_covered(drift_events: list[dict], latest_verdicts: list[dict],
                      report: ReportCoverage) -> list[PendingRevalidation]:
    """Every site whose current software version or scanner one report does not cover (for promotion).

    The site's changes (:func:`revalidation_pending` with this report alone), and for the
    other sites every software version their latest series run now that the report's
    manifest lacks at that site (kind ``not validated``).
    """
    pending = {p.site: p for p in revalidation_pending(drift_events, latest_verdicts, [report])}
    first_seen: dict[tuple[str, str], dict[str, Any]] = {}
    current: dict[tuple, dict[str, Any]] = {}
    for verdict in sorted(latest_verdicts, key=lambda v: v.get("id") or 0):
        version = _text(verdict.get("software_version"))
        if version is None or verdict.get("protocol") is None:  # an unmatched series is not the trial's
            continue
        first_seen.setdefault((verdict["site"], version), verdict)
        current[(verdict["site"], _text(verdict.get("scanner")), verdict.get("protocol"))] = verdict
    for (site, scanner, protocol), verdict in sorted(current.items(), key=lambda kv: tuple(map(str, kv[0]))):
        version = _text(verdict.get("software_version"))
        if site in pending and any(c.software_version == version for c in pending[site].changes):
            continue
        if report.covers(site, version):
            continue
        since = first_seen[(site, version)]
        change = SiteChange(site=site, kind="not validated", scanner_id=scanner, protocol=protocol, before=None,
                            after=version, software_version=version, model=None,
                            since_series=since.get("series_key"), since_utc=since.get("checked_utc"))
        row = pending.setdefault(site, PendingRevalidation(site, [], []))
        row.changes.append(change)
        row.reasons.append(_reason(change, [report]))
    return [pending[s] for s in sorted(pending)]


# --------------------------------------------------------------------------- the gate's sites against a reports root


@dataclass
class RevalidationStatus:
    """Every site's re-validation state against the reports under a root (what ``qc status --reports`` shows)."""

    pending: list[PendingRevalidation]
    reports: list[ReportCoverage]
    reports_root: str | None = None
    keys_given: bool = False

    def for_site(self, site: str) -> PendingRevalidation | None:
        return next((p for p in self.pending if p.site == site), None)

    def column(self, site: str) -> str:
        """The ``re-validation`` column of ``qc status``: 'pending' or ''."""
        return "pending" if self.for_site(site) is not None else ""

    def site_dict(self, site: str) -> dict[str, Any]:
        row = self.for_site(site)
        return {"status": self.column(site), "pending": row is not None, "reports_given": self.reports_root is not None,
                "line": row.line() if row else "", "changes": row.to_dict()["changes"] if row else []}

    def attention_lines(self) -> list[str]:
        return [f"re-validation pending: {p.line()}" for p in self.pending]

    def summary(self) -> str:
        counted = sum(r.signed for r in self.reports)
        head = (f"{len(self.pending)} site(s) re-validation pending; {len(self.reports)} report(s) under "
                f"{self.reports_root}, {counted} signed" if self.reports_root is not None
                else f"{len(self.pending)} site(s) re-validation pending (no reports given)")
        return "\n".join([head] + [f"  {p.line()}" for p in self.pending])

    def to_dict(self) -> dict[str, Any]:
        return {"reports_root": self.reports_root, "keys_given": self.keys_given,
                "pending": [p.to_dict() for p in self.pending], "reports": [r.to_dict() for r in self.reports]}

    def to_frame(self) -> pd.DataFrame:
        return pending_frame(self.pending)


def revalidation_status(rows: GateRows, reports_root: str | Path | None = None,
                        public_keys: Sequence[str | Path] | None = None, *,
                        materials_dir: str | Path | None = None,
                        reports: list[ReportCoverage] | None = None) -> RevalidationStatus:
    """Every report under ``reports_root`` (:func:`find_reports`), checked with ``public_keys``, against the gate.

    Without ``reports_root`` no report covers anything, so every site with a change is pending
    (its reason says no reports were given): a change is never shown as settled unchecked.
    ``reports`` reuses coverages already checked under that root (nothing is hashed again).
    """
    if reports is not None:
        pending = revalidation_pending(rows.drift_events, rows.latest_verdicts, reports)
        return RevalidationStatus(pending=pending, reports=reports,
                                  reports_root=None if reports_root is None else str(reports_root),
                                  keys_given=bool(public_keys))
    reports = []
    if reports_root is not None:
        folders = find_reports(reports_root)
        if not folders:
            raise SitebenchError("no reports here (looked for <name>/vNNN/lock.json)", reports_root)
        reports = [report_coverage(f, public_keys, materials_dir=materials_dir) for f in folders]
    pending = revalidation_pending(rows.drift_events, rows.latest_verdicts, reports)
    return RevalidationStatus(pending=pending, reports=reports,
                              reports_root=None if reports_root is None else str(reports_root),
                              keys_given=bool(public_keys))
