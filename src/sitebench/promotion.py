"""Promote a registered model version to an alias; ``@validated`` needs a verified, approved report.

Promotion joins two rooms, the model registry (``models``) and the validation report
(``reports``), so it sits above both: the registry keeps registry things only, and the
report package never learns about MLflow model versions.

With the QC gate's rows (:class:`~sitebench.reports.coverage.GateRows`, which the caller
reads: promotion imports no ``qc``), promotion also names every site whose current software
version or scanner the report does not cover
(:func:`~sitebench.reports.coverage.sites_not_covered`). That is a warning, recorded as the
version tag ``sitebench.uncovered_sites``; with ``require_coverage`` it refuses instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sitebench.errors import SitebenchError
from sitebench.models.registry import REPORT_TAG, WEIGHTS_TAG, registry_client
from sitebench.provenance import sha256_file
from sitebench.reports.coverage import UNCOVERED_TAG, GateRows, report_coverage, sites_not_covered
from sitebench.reports.lock import LOCK_FILE, locked_files, read_lock
from sitebench.reports.signing import read_signoffs
from sitebench.reports.verify import verify_report

__all__ = ["PROTECTED_ALIASES", "UNCOVERED_TAG", "promote_model_version"]

#: Aliases a version only gets with a verified report carrying a valid approval sign-off.
PROTECTED_ALIASES = frozenset({"validated"})


def promote_model_version(name: str, version: str, alias: str, tracking_uri: str | None,
                          report: str | Path | None = None, public_keys: list[str | Path] | None = None,
                          materials_dir: str | Path | None = None, gate_rows: GateRows | None = None,
                          require_coverage: bool = False) -> dict:
    """Point ``alias`` at a registered version; ``validated`` needs a verified, approved report.

    For a protected alias the report must verify (every hash, materials included, found where
    the lock recorded them or under ``materials_dir``, and every sign-off against
    ``public_keys``), carry at least one valid ``approval`` sign-off, and list this version's
    weights among its materials. The report folder is then attached to the version's run as
    an artifact and its lock hash stored as a version tag.

    With ``gate_rows`` (the QC gate's drift events and latest verdicts) the result's
    ``uncovered_sites`` (one dict per site, see ``PendingRevalidation.to_dict``) and
    ``uncovered`` (one line, empty when none) name every site whose current software version
    or scanner the report does not cover, and the version tag ``sitebench.uncovered_sites``
    records them ('S07 (…), S16 (…)', or '' when the report covers every site). Promotion
    still happens, unless ``require_coverage``: then an uncovered site is a one-line error and
    nothing is changed.
    """
    from mlflow.exceptions import MlflowException

    if require_coverage and gate_rows is None:
        raise SitebenchError("--require-coverage needs --qc-store: the gate whose sites the report must cover")
    if gate_rows is not None and report is None:
        raise SitebenchError("--qc-store: naming the sites a report does not cover needs --report")
    client = registry_client(tracking_uri)
    try:
        model_version = client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise SitebenchError(f"no registered version {name}/{version} ({exc.message.splitlines()[0]})") from None
    info: dict[str, Any] = {"name": name, "version": str(version), "alias": alias}
    verification = None
    if alias in PROTECTED_ALIASES:
        info.update(_approved_report(model_version, report, public_keys or [], materials_dir))
        verification = info.pop("verification")
    uncovered_tag = None
    if gate_rows is not None:
        coverage = report_coverage(report, public_keys, materials_dir=materials_dir,  # type: ignore[arg-type]
                                   verification=verification)
        uncovered = sites_not_covered(gate_rows.drift_events, gate_rows.latest_verdicts, coverage)
        info["coverage_report"] = coverage.label
        info["uncovered_sites"] = [p.to_dict() for p in uncovered]
        uncovered_tag = ", ".join(p.short() for p in uncovered)
        info["uncovered"] = f"{coverage.label} does not cover: {uncovered_tag}" if uncovered else ""
        if uncovered and require_coverage:
            raise SitebenchError(f"{info['uncovered']}; {name}/{version} not promoted (--require-coverage)")
    if alias in PROTECTED_ALIASES:
        client.log_artifacts(model_version.run_id, str(info["report_dir"]),
                             artifact_path=f"validation_report/{Path(info['report_dir']).name}")
        client.set_model_version_tag(name, str(version), REPORT_TAG, info["lock_sha256"])
        info["report_dir"] = str(info["report_dir"])
    if uncovered_tag is not None:
        client.set_model_version_tag(name, str(version), UNCOVERED_TAG, uncovered_tag[:4900])
    client.set_registered_model_alias(name, alias, str(version))
    return info


def _approved_report(model_version: Any, report: str | Path | None, public_keys: list[str | Path],
                     materials_dir: str | Path | None) -> dict[str, Any]:
    where = f"{model_version.name}/{model_version.version}"
    if report is None:
        raise SitebenchError(f"promoting {where} to a protected alias needs --report: a verified, signed "
                             "validation report")
    if not public_keys:
        raise SitebenchError("promotion needs --public-key: the keys whose sign-offs count")
    check = verify_report(report, public_keys=public_keys, materials_dir=materials_dir)
    if check.problems:
        shown = "; ".join(check.problems[:3]) + (f"; … and {len(check.problems) - 3} more"
                                                if len(check.problems) > 3 else "")
        raise SitebenchError("report does not verify: " + shown, report)
    if check.materials_not_here:
        raise SitebenchError(f"report does not verify: {len(check.materials_not_here)} material(s) not available "
                             f"here (first: {check.materials_not_here[0].where}); give --materials DIR", report)
    report_dir = check.report_dir
    if not any(s.get("meaning") == "approval" for s in read_signoffs(report_dir)):
        raise SitebenchError("report carries no approval sign-off (only authorship/review)", report_dir)
    weights = model_version.tags.get(WEIGHTS_TAG)
    digests = {digest for _, _, digest in locked_files(read_lock(report_dir))}
    if not weights or weights not in digests:
        raise SitebenchError(f"report does not rest on {where}'s weights (sha256 {str(weights)[:12]}…)", report_dir)
    return {"report_dir": report_dir, "lock_sha256": sha256_file(report_dir / LOCK_FILE),
            "signoffs": check.signoffs, "verification": check}
