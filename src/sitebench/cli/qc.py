"""``sitebench qc ...``: upload-time QC of DICOM series (inspect, protocols, check, serve, status)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from sitebench.cli._common import EXIT_VERIFY_FAILED, add_json, print_json, print_result, usable_cpus
from sitebench.errors import SitebenchError


def _one_series(path: str, series_uid: str | None):
    from sitebench.qc.dicom_params import read_series

    series = read_series(path)
    if series_uid:
        series = [s for s in series if s.series_uid == series_uid]
    if len(series) != 1:
        raise SitebenchError(f"holds {len(series)} matching series; name one with --series-uid", path)
    return series[0]


def cmd_qc_inspect(args: argparse.Namespace) -> int:
    from sitebench.qc.dicom_params import read_series

    # the scanner pseudonym (never the serial number) lets a record serve as a `qc check --baseline`
    records = [{**series.to_dict(), **({"_scanner_id": series.scanner_id} if series.scanner_id else {})}
               for series in read_series(args.path, workers=args.workers or usable_cpus(8))]
    if args.json:
        print_json(records)
        return 0
    for record in records:
        print(f"{record['SeriesInstanceUID']} ({record['n_files']} files)")
        for key, value in record.items():
            if key not in ("SeriesInstanceUID", "n_files"):
                print(f"  {key:<34} {value}")
    return 0


def cmd_qc_protocol_init(args: argparse.Namespace) -> int:
    from sitebench.qc.protocol import draft_protocol, suggest_name

    series = _one_series(args.series, args.series_uid)
    name = args.name if args.name is not None else suggest_name(series.parameters)
    protocol = draft_protocol(series.parameters, name, args.description or "")
    out = Path(args.out)
    if out.exists():
        raise SitebenchError("exists already; a protocol is never overwritten", out)
    protocol.save(out)
    print(f"{out}: draft protocol '{protocol.name}' v{protocol.version} with {len(protocol.parameters)} rules; "
          "review it, then lock it with: sitebench qc protocol lock")
    return 0


def cmd_qc_protocol_lock(args: argparse.Namespace) -> int:
    from sitebench.qc.protocol import lock_protocol

    locked = lock_protocol(args.protocol, who=args.who, why=args.why, lock_dir=args.lock_dir)
    if args.audit and locked.created:
        from sitebench.audit import AuditTrail

        record = dict(locked.audit_record)
        AuditTrail(args.audit).append(who=record.pop("who"), what=record.pop("what"), why=record.pop("why", ""),
                                      subject=f"protocol {record.get('protocol')} v{record.get('version')}",
                                      details=record)
    if args.json:
        print_json({"path": str(locked.path), "created": locked.created, "content_sha256": locked.content_sha256,
                    "audit_record": locked.audit_record})
        return 0
    state = "locked" if locked.created else "already locked (identical content)"
    print(f"{locked.path}: {state}, content sha256 {locked.content_sha256}")
    return 0


def _baseline(path: str) -> dict:
    """The qualified baseline's parameters: a reference DICOM series (file or folder, one series) or a
    JSON file of its parameters (a dict, or `qc inspect --json`'s list holding one record)."""
    import json

    source = Path(path)
    if not source.exists():
        raise SitebenchError("baseline does not exist", source)
    if source.is_file() and source.suffix.lower() == ".json":
        try:
            data = json.loads(source.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SitebenchError(f"baseline is not readable JSON ({exc})", source) from None
        if isinstance(data, list):
            if len(data) != 1:
                raise SitebenchError(f"baseline holds {len(data)} series records; give one", source)
            data = data[0]
        if not isinstance(data, dict) or not data.get("Manufacturer"):
            raise SitebenchError("baseline is not a series' parameters (a JSON object with Manufacturer, "
                                 "e.g. from `sitebench qc inspect --json`)", source)
        params = dict(data)
        if params.get("_scanner_id") and not params.get("DeviceSerialNumber"):
            params["DeviceSerialNumber"] = params["_scanner_id"]  # the same pseudonym the gate keys on
        return params
    from sitebench.qc.dicom_params import PARSER_VERSION, read_series

    series = read_series(source)
    if len(series) != 1:
        raise SitebenchError(f"baseline holds {len(series)} series; a baseline is one reference series", source)
    params = {**series[0].parameters, "SeriesInstanceUID": series[0].series_uid,
              "_parser_version": PARSER_VERSION}  # read just now: every key this parser knows
    if series[0].scanner_id:
        params["DeviceSerialNumber"] = series[0].scanner_id  # a pseudonym, as the gate keys scanners
    return params


def cmd_qc_check(args: argparse.Namespace) -> int:
    from sitebench.qc.dicom_params import dicom_files
    from sitebench.qc.gate import Gate
    from sitebench.qc.protocol import load_protocol

    baseline = _baseline(args.baseline) if args.baseline else None
    gate = Gate([load_protocol(args.protocol)], image_quality=args.iqm, require_locked=False, match=False,
                baseline=baseline)
    outcomes = gate.check_files(dicom_files(args.path), site=args.site)
    if args.json:
        print_json([o.to_dict() for o in outcomes])
    else:
        for outcome in outcomes:
            print(outcome.summary())
            if baseline is not None and not outcome.drift and outcome.protocol:
                print("  no drift against the baseline")
    return EXIT_VERIFY_FAILED if any(o.status == "fail" for o in outcomes) else 0


def cmd_qc_serve(args: argparse.Namespace) -> int:
    from sitebench.dashboard.app import Revalidation, check_mlflow_ui, mount
    from sitebench.dashboard.biomarkers import BiomarkerValues
    from sitebench.qc.intake import load_intake_config, serve

    config = load_intake_config(args.config)
    updates = {}
    if args.dicom_port is not None and config.dicom is not None:
        updates["dicom"] = config.dicom.model_copy(update={"port": args.dicom_port})
    if args.http_port is not None:  # also turns HTTP (STOW-RS and the dashboard) on where the YAML has it off
        from sitebench.qc.intake import HttpListener

        updates["http"] = (config.http or HttpListener()).model_copy(update={"port": args.http_port})
    from functools import partial

    check_mlflow_ui(args.mlflow_ui)  # before any listener starts
    revalidation = Revalidation(args.reports, args.public_key or [])  # pages and alert share one
    biomarkers = BiomarkerValues(args.reports, args.predictions)  # a missing --predictions file: one line now
    dashboard = partial(mount, revalidation=revalidation, mlflow_ui=args.mlflow_ui, biomarkers=biomarkers)
    serve(config.model_copy(update=updates), http_extensions=[dashboard],
          periodic_checks=[revalidation.alert_new_pending])
    return 0


def _qc_records(store: str, database: str | None):
    from sitebench.qc.records import QCRecords, database_url

    if database is None and not (Path(store) / "qc.db").exists():
        raise SitebenchError("no QC database here (qc.db); give the intake store or --database URL", store)
    return QCRecords(database_url(store, database))


def cmd_qc_manifest(args: argparse.Namespace) -> int:
    from sitebench.qc.to_manifest import verdicts_to_manifest

    statuses = ("pass", "warn", "fail", "undetermined") if args.include_failed else ("pass", "warn")
    manifest = verdicts_to_manifest(_qc_records(args.store, args.database), args.store, args.out, statuses)
    print(f"{args.out}: {len(manifest)} checked series ({', '.join(statuses)}), NIfTI under "
          f"{Path(args.out).parent / 'images'}")
    return 0


def cmd_qc_status(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from sitebench.reports.coverage import GateRows, revalidation_status

    records = _qc_records(args.store, args.database)
    gate = GateRows.from_records(records, source=args.database or args.store)
    rows = gate.site_status
    revalidation = revalidation_status(gate, args.reports, args.public_key)
    if args.json:
        print_json([{**asdict(r), "rescan_rate": r.rescan_rate, "revalidation": revalidation.site_dict(r.site)}
                    for r in rows])
        return 0
    head = f"{'site':<10}{'series':>7}{'pass':>6}{'warn':>6}{'fail':>6}{'undet':>6}{'unmatch':>8}" \
           f"{'open dev':>9}{'drift':>6}{'rescan':>8}{'rejected':>9}{'quarant':>8}{'conflict':>9}{'waiting':>8}" \
           f"  {'re-validation'}"
    print(head)
    for r in rows:
        print(f"{r.site:<10}{r.series:>7}{r.passed:>6}{r.warned:>6}{r.failed:>6}{r.undetermined:>6}"
              f"{r.unmatched:>8}{r.open_deviations:>9}{r.drift_events:>6}{100 * r.rescan_rate:>7.1f}%"
              f"{r.rejected_files:>9}{r.quarantined_files + r.quarantined_series:>8}{r.conflicts:>9}"
              f"{r.waiting_series:>8}  {revalidation.column(r.site)}".rstrip())
    if not rows:
        print("(no series checked yet)")
    for line in records.attention_lines() + revalidation.attention_lines():
        print(line)
    return 0


def cmd_qc_new_token(args: argparse.Namespace) -> int:
    from sitebench.qc.intake import new_upload_token

    token, digest = new_upload_token()
    print(f"token (give it to site {args.site}; it is not stored anywhere): {token}")
    print(f"config line:  sites: {{{args.site}: {{http_token_sha256: [{digest}]}}}}")
    return 0


def cmd_qc_users(args: argparse.Namespace) -> int:
    from sitebench.qc.intake import load_intake_config, manage_users

    result = manage_users(load_intake_config(args.config), args.action, args.name, role=args.role, site=args.site,
                          who=args.who)
    if args.json:
        print_json(result)
    elif args.action == "list":
        for user in result["users"]:
            print(f"{user['username']:<24} {user['role']:<17} {user['site'] or '(all sites)':<12}"
                  f"{' disabled' if user['disabled'] else ''}")
    else:
        print(f"user {result['user']}: {args.action} done ({result['role']}"
              f"{' of ' + result['site'] if result['site'] else ''})")
        if result["token"]:
            print(f"token (shown once; give it to the user, the gate keeps only its hash): {result['token']}")
    return 0


def cmd_qc_queries(args: argparse.Namespace) -> int:
    import os

    from sitebench.qc.intake import load_intake_config, work_query

    result = work_query(load_intake_config(args.config), args.token or os.environ.get("SITEBENCH_TOKEN"),
                        args.action, args.id, kind=args.kind, text=args.text or "", site=args.site)
    if args.json:
        print_json(result)
        return 0
    for q in result.get("queries", [result]):
        failed = ", ".join(d["parameter"] for d in q["what_failed"]) or "-"
        print(f"query {q['id']}  site {q['site']}  series {q['series_key']}  {q['status']}  failed: {failed}"
              f"{'  due ' + q['due_utc'] if q['due_utc'] and q['status'] in ('open', 'returned') else ''}")
    return 0


def cmd_qc_resolve(args: argparse.Namespace) -> int:
    from sitebench.qc.intake import load_intake_config, resolve_conflict

    result = resolve_conflict(load_intake_config(args.config), args.keep, who=args.who, why=args.why)
    print(f"kept {result['kept'][:12]} for series {result['series_key']} ({result['site']}); "
              f"{len(result['superseded'])} other cop{'y' if len(result['superseded']) == 1 else 'ies'} kept "
          f"but not used; the series is checked again")
    return 0


def cmd_qc_iqm(args: argparse.Namespace) -> int:
    from sitebench.qc.image_quality import image_quality_nifti

    print_result(image_quality_nifti(args.image, labels_path=args.labels), args.json)
    return 0


def _add_inspect(qc: argparse._SubParsersAction) -> None:
    inspect = qc.add_parser("inspect", help="acquisition parameters per series (BIDS keys and units)",
                            description="Read DICOM headers (classic and enhanced MR) and print one record per "
                                        "series with BIDS sidecar key names and units. Patient identifiers are "
                                        "reported by attribute name only, never by value.")
    inspect.add_argument("path", help="DICOM file or folder (recursive)")
    inspect.add_argument("--workers", type=int, default=0, metavar="N",
                         help="processes reading the headers (default: one a CPU, at most 8; a large folder "
                              "only, at least 64 files a process; 1 = this process)")
    add_json(inspect, "a list with one record per series")
    inspect.set_defaults(func=cmd_qc_inspect, uses_libraries=False)  # the standard library and our reader only


def _add_check(qc: argparse._SubParsersAction) -> None:
    check = qc.add_parser("check", help="check series offline against a protocol",
                          description="Verdict per series: pass, warn, fail or undetermined, with every "
                                      "deviation, and with --baseline its drift against a reference series. "
                                      "Exit 1 if any series fails.")
    check.add_argument("path", help="DICOM file or folder")
    check.add_argument("--protocol", required=True, help="protocol YAML (locked or draft)")
    check.add_argument("--site", default="offline", help="site name for drift and image-quality history")
    check.add_argument("--iqm", action="store_true", help="also compute image-quality metrics and thresholds")
    check.add_argument("--baseline", metavar="PATH",
                       help="qualified baseline for drift: a reference DICOM series (folder or file) or a JSON "
                            "file of its parameters (from `qc inspect --json`); each series' drift events "
                            "(software, model, coil, parameter, scanner) against it are listed")
    add_json(check, "a list with one verdict per series")
    check.set_defaults(func=cmd_qc_check)


def _add_serve(qc: argparse._SubParsersAction) -> None:
    serve_cmd = qc.add_parser("serve", help="run the upload-time gate: DICOM C-STORE, STOW-RS, watched folder",
                              description="Receive series (DICOM Storage SCP with an AE title per site, "
                                          "DICOMweb STOW-RS upload, a watched folder), store every file "
                                          "content-addressed before acknowledging it, and give each series its "
                                          "verdict once it has been quiet. Runs until interrupted.")
    serve_cmd.add_argument("--config", required=True, help="intake YAML (see configs/qc_intake.yaml)")
    serve_cmd.add_argument("--dicom-port", type=int, help="override the DICOM port")
    serve_cmd.add_argument("--http-port", type=int, help="override the HTTP port")
    serve_cmd.add_argument("--reports", help="folder of locked validation reports the dashboard lists and judges "
                                            "re-validation against")
    serve_cmd.add_argument("--public-key", action="append", help="signer's public key (PEM) to check report "
                                                                "sign-offs with; repeatable")
    serve_cmd.add_argument("--predictions", action="append", metavar="CSV",
                           help="a benchmark's predictions.csv (scan_id = the gate's series key, as `qc manifest` "
                                "writes): the site pages chart its biomarkers too, beside those the reports "
                                "locked; repeatable")
    serve_cmd.add_argument("--mlflow-ui", metavar="URL", help="address of the MLflow UI (mlflow ui / server) over "
                                                              "the benchmarks' store: each report links to its run")
    serve_cmd.set_defaults(func=cmd_qc_serve)


def _add_status(qc: argparse._SubParsersAction) -> None:
    status = qc.add_parser("status", help="per-site table: verdicts, open deviations, drift, re-scan rate, "
                                          "re-validation",
                           description="Counts of pass/warn/fail/undetermined/unmatched series (latest verdict "
                                       "each), open deviations, drift events, the re-scan rate and rejected files. "
                                       "The re-validation column says 'pending' for a site with a software upgrade "
                                       "(a SoftwareVersions drift event), a scanner model change or a new scanner "
                                       "beside an already qualified one, until a signed report covers it: one that "
                                       "verifies, carries a valid approval sign-off by one of --public-key, and "
                                       "whose locked data manifest has scans of that site with the new software "
                                       "version (and scanner). Each pending site gets one attention line saying "
                                       "what changed, since which series, and why it is pending. Without "
                                       "--reports no report can cover anything, so such a site still shows "
                                       "'pending' (its line says no reports were given): a change is never shown "
                                       "as settled without a report checked. Without --public-key no sign-off "
                                       "counts either.")
    status.add_argument("--store", default="qc-store", help="intake store folder (holds qc.db)")
    status.add_argument("--database", help="SQLAlchemy URL instead of the store's SQLite file")
    status.add_argument("--reports", metavar="DIR",
                        help="reports root (<DIR>/<name>/vNNN/) whose signed reports can clear re-validation")
    status.add_argument("--public-key", metavar="PEM", action="append",
                        help="public key whose sign-offs count (.pub; repeatable)")
    add_json(status, "a list with one row per site (its re-validation state under 'revalidation')")
    status.set_defaults(func=cmd_qc_status)


def _add_resolve(qc: argparse._SubParsersAction) -> None:
    resolve = qc.add_parser("resolve", help="keep one copy of an instance received twice with different bytes",
                            description="An instance (SOPInstanceUID) received again with other bytes is a "
                                        "conflict: both copies are kept and the series is undetermined until a "
                                        "person keeps one. `qc status` lists conflicts with each copy's sha256. "
                                        "Audited; the series is checked again.")
    resolve.add_argument("--config", required=True, help="intake YAML of the running gate")
    resolve.add_argument("--keep", required=True, help="sha256 (or a unique prefix) of the copy to keep")
    resolve.add_argument("--who", required=True, help="who decides")
    resolve.add_argument("--why", required=True, help="why this copy")
    resolve.set_defaults(func=cmd_qc_resolve)


def _add_new_token(qc: argparse._SubParsersAction) -> None:
    token = qc.add_parser("new-token", help="a new STOW-RS upload token for a site, and the hash for the config",
                          description="Prints a random bearer token once, and its SHA-256 for the site's "
                                      "http_token_sha256 list in the intake YAML. The gate stores only the hash.")
    token.add_argument("--site", required=True, help="site the token is for")
    token.set_defaults(func=cmd_qc_new_token)


def _add_users(qc: argparse._SubParsersAction) -> None:
    users = qc.add_parser("users", help="who may sign in: site uploaders, coordinators, monitors, readers, admins",
                          description="add a user (prints its token once), rotate its token, disable it, or "
                                      "list users. A site_uploader or site_coordinator belongs to one --site; "
                                      "central_monitor, reader and admin see the trial. Audited.")
    users.add_argument("action", choices=("add", "rotate", "disable", "list"))
    users.add_argument("name", nargs="?", help="user name (not for list)")
    users.add_argument("--config", required=True, help="intake YAML of the gate")
    users.add_argument("--role", choices=("site_uploader", "site_coordinator", "central_monitor", "reader", "admin"),
                       help="role of a new user")
    users.add_argument("--site", help="the site of a site_uploader or site_coordinator")
    users.add_argument("--who", default="sitebench-cli", help="who makes the change (audited)")
    add_json(users, "the user record (with the new token for add and rotate)")
    users.set_defaults(func=cmd_qc_users)


def _add_queries(qc: argparse._SubParsersAction) -> None:
    queries = qc.add_parser("queries", help="deviation queries with the sites: list, open, answer, accept, send back",
                            description="A failed series drafts a query to its site. A central monitor opens "
                                        "it; the site coordinator answers (--kind rescan or explanation, "
                                        "--text); the monitor accepts it (closed) or sends it back. A passing "
                                        "re-scan closes it by itself. Every step is audited.")
    queries.add_argument("action", choices=("list", "show", "open", "answer", "accept", "send-back"))
    queries.add_argument("id", nargs="?", type=int, help="query number (not for list)")
    queries.add_argument("--config", required=True, help="intake YAML of the gate")
    queries.add_argument("--token", help="your token (default: $SITEBENCH_TOKEN)")
    queries.add_argument("--kind", choices=("rescan", "explanation"), help="answer: what the site did")
    queries.add_argument("--text", help="answer, note or reason")
    queries.add_argument("--site", help="list: one site's queries")
    add_json(queries, "the query (or {'queries': [...]} for list)")
    queries.set_defaults(func=cmd_qc_queries)


def _add_manifest(qc: argparse._SubParsersAction) -> None:
    to_manifest = qc.add_parser("manifest", help="checked series into a scan manifest (NIfTI + QC columns)",
                                description="One NIfTI and one manifest row per series whose latest verdict is "
                                            "pass or warn, with qc_status, qc_protocol, qc_deviations and "
                                            "qc_<metric> columns, for `sitebench benchmark run`.")
    to_manifest.add_argument("--store", default="qc-store", help="intake store folder")
    to_manifest.add_argument("--database", help="SQLAlchemy URL instead of the store's SQLite file")
    to_manifest.add_argument("--out", required=True, help="manifest to write (.csv, .tsv or .parquet)")
    to_manifest.add_argument("--include-failed", action="store_true", help="also fail and undetermined series")
    to_manifest.set_defaults(func=cmd_qc_manifest)


def _add_iqm(qc: argparse._SubParsersAction) -> None:
    iqm = qc.add_parser("iqm", help="image-quality metrics of a volume (MRIQC definitions)",
                        description="SNR, CNR, CJV, EFC, FBER, FWHM, a QI1-style artefact fraction and WM2MAX "
                                    "on a NIfTI volume; tissues from --labels or a 3-class mixture.")
    iqm.add_argument("image", help="NIfTI volume")
    iqm.add_argument("--labels", help="label map (1 CSF, 2 GM, 3 WM)")
    add_json(iqm, "the metrics")
    iqm.set_defaults(func=cmd_qc_iqm)


def _add_protocol(qc: argparse._SubParsersAction) -> None:
    proto = qc.add_parser("protocol", help="draft and lock acquisition protocols").add_subparsers(
        dest="protocol_action", metavar="ACTION", required=True)
    init = proto.add_parser("init", help="draft a protocol from a reference series")
    init.add_argument("series", help="DICOM folder of the reference series")
    init.add_argument("--out", required=True, help="protocol YAML to write (never overwritten)")
    init.add_argument("--name", help="protocol name (default: from the series: dwi, bold, t1w, t2w, flair, "
                                     "'-3d' for 3D anatomy, else its ProtocolName / SeriesDescription)")
    init.add_argument("--description")
    init.add_argument("--series-uid", help="which series, when the folder holds several")
    init.set_defaults(func=cmd_qc_protocol_init)
    lock = proto.add_parser("lock", help="lock a protocol version (immutable; a change is a new version)")
    lock.add_argument("protocol", help="protocol YAML")
    lock.add_argument("--who", required=True, help="who locks it")
    lock.add_argument("--why", required=True, help="why")
    lock.add_argument("--lock-dir", required=True, help="folder of locked protocols")
    add_json(lock, "the locked file, its hash and the audit record")
    lock.add_argument("--audit", help="append the lock to this audit trail (JSON lines)")
    lock.set_defaults(func=cmd_qc_protocol_lock)


#: qc's actions in --help order, each adding its own parser
ACTIONS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "inspect": _add_inspect,
    "check": _add_check,
    "serve": _add_serve,
    "status": _add_status,
    "resolve": _add_resolve,
    "new-token": _add_new_token,
    "users": _add_users,
    "queries": _add_queries,
    "manifest": _add_manifest,
    "iqm": _add_iqm,
    "protocol": _add_protocol,
}


def add_parser(sub: argparse._SubParsersAction, action: str | None = None) -> None:
    """The ``qc`` group; with ``action`` one of its actions, only that action's parser: argparse builds
    every parser up front, and ``qc inspect`` at upload time should not pay 20 ms for the sixteen others.
    Any other word (``--help``, a typo) builds them all, so the usage lists every action."""
    qc = sub.add_parser("qc", help="upload-time QC of DICOM series").add_subparsers(dest="action", metavar="ACTION",
                                                                                  required=True)
    for name, add in ACTIONS.items():
        if action not in ACTIONS or name == action:
            add(qc)
