"""The ``sitebench`` command: parses arguments, calls one library function, prints the result.

Heavy libraries (torch, monai, mlflow) are imported inside the commands so that
``--help`` answers at once. A ``SitebenchError`` becomes one line on stderr and
exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from sitebench import __version__
from sitebench.errors import SitebenchError

EXIT_USER_ERROR = 2
EXIT_VERIFY_FAILED = 1


def _quiet_libraries() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import logging

    for name in ("mlflow", "alembic", "distributed", "monai", "monai.data.nvimgcodec_pydicom_plugin"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _say(message: str) -> None:
    print(f"sitebench: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- commands


def cmd_demo(args: argparse.Namespace) -> int:
    from sitebench.pipeline import run_demo

    result = run_demo(args.out, sites=args.sites, scans_per_site=args.scans_per_site, seed=args.seed,
                      workers=args.workers, scheduler=args.scheduler, bootstrap=args.bootstrap,
                      progress=not args.no_progress, tracking_uri=args.tracking_uri, log=_say)
    print(result.summary())
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from sitebench.datasets.simulator import load_trial_config, simulate_trial
    from sitebench.pipeline import progress_bar

    config = load_trial_config(args.config, n_sites=args.sites, scans_per_site=args.scans_per_site,
                               seed=args.seed, workers=args.workers)
    trial = simulate_trial(config, args.out, progress=progress_bar(not args.no_progress,
                                                                     config.n_sites * config.scans_per_site,
                                                                     "simulating scans"))
    print(trial.summary())
    print(f"truth: {trial.truth_path}")
    return 0


def cmd_benchmark_run(args: argparse.Namespace) -> int:
    from sitebench.pipeline import run_pipeline

    result = run_pipeline(args.spec, workers=args.workers, scheduler=args.scheduler,
                          tracking_uri=args.tracking_uri, report=not args.no_report,
                          progress=not args.no_progress, log=_say)
    print(result.summary())
    return 0


def cmd_report_verify(args: argparse.Namespace) -> int:
    from sitebench.reports import verify_report

    result = verify_report(args.path, public_keys=args.public_key, recompute=args.recompute)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 0 if result.ok else EXIT_VERIFY_FAILED


def _passphrase() -> bytes | None:
    value = os.environ.get("SITEBENCH_KEY_PASSPHRASE")
    return value.encode() if value else None


def cmd_report_keygen(args: argparse.Namespace) -> int:
    from sitebench.reports.signing import generate_key, key_fingerprint, load_public_key

    private, public = generate_key(args.out, passphrase=_passphrase())
    print(f"{private}: private key (keep it with the signer, mode 0600)\n{public}: public key, "
          f"fingerprint {key_fingerprint(load_public_key(public))} (give it to verifiers)")
    return 0


def cmd_report_sign(args: argparse.Namespace) -> int:
    from sitebench.reports.signing import sign_report

    signoff = sign_report(args.path, args.key, args.name, args.meaning, passphrase=_passphrase())
    print(f"{args.path}: signed for {signoff.meaning} by {signoff.signer} at {signoff.signed_utc} "
          f"(lock {signoff.lock_sha256[:16]}…, key {signoff.key_fingerprint})")
    return 0


def cmd_manifest_validate(args: argparse.Namespace) -> int:
    from sitebench.datasets.manifest import read_manifest

    manifest = read_manifest(args.path, check_hashes=not args.no_hashes)
    table = manifest.table
    print(f"{args.path}: OK, {len(table)} scans, {table['site'].nunique()} sites, "
          f"{table['vendor'].nunique()} vendors, {table['software_version'].nunique()} software versions")
    return 0


def cmd_manifest_import(args: argparse.Namespace) -> int:
    from sitebench.datasets import importers
    from sitebench.datasets.manifest import write_manifest

    out = Path(args.out)
    if args.kind == "nifti":
        table = importers.import_nifti_folder(args.source, args.table, root=out.parent,
                                              reference_columns=args.reference or ())
    else:
        table = importers.import_bids(args.source, root=out.parent)
    write_manifest(table, out)
    print(f"{out}: {len(table)} scans")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from sitebench.models.registry import BUILTIN_DIR, builtin_bundles, load_model

    print("classical            gm-tissue-gmm (three-class GMM tissue classification)")
    for name in builtin_bundles():
        model = load_model(f"builtin:{name}")
        training = model.card.extra.get("training", {})
        print(f"builtin:{name:<12} {model.card.key:<16} sha256 {model.card.weights_sha256[:16]}…  "
              f"trained on {training.get('vendor', '?')}, augmentation={training.get('augmentation')}")
    print(f"(bundles in {BUILTIN_DIR})")
    return 0


def cmd_models_register(args: argparse.Namespace) -> int:
    import tempfile

    from sitebench.models.registry import load_model, register_model_version, resolve_model, write_classical_spec

    resolved = resolve_model(args.reference)
    model = load_model(resolved)
    with tempfile.TemporaryDirectory() as tmp:
        files = resolved.location or str(write_classical_spec(tmp, model))
        version = register_model_version(model, files, args.name, args.alias, args.tracking_uri)
    print(f"{args.name} version {version}: {model.card.key}, weights sha256 {model.card.weights_sha256}"
          + (f", alias @{args.alias}" if args.alias else ""))
    return 0


def cmd_models_versions(args: argparse.Namespace) -> int:
    from sitebench.models.registry import REPORT_TAG, WEIGHTS_TAG, registry_client

    client = registry_client(args.tracking_uri)
    rows = []
    for registered in client.search_registered_models():
        aliases: dict[str, list[str]] = {}
        for alias, number in (registered.aliases or {}).items():
            aliases.setdefault(str(number), []).append(alias)
        for version in client.search_model_versions(f"name='{registered.name}'"):
            rows.append({"name": registered.name, "version": str(version.version),
                         "aliases": sorted(aliases.get(str(version.version), [])),
                         "weights_sha256": version.tags.get(WEIGHTS_TAG),
                         "report_lock_sha256": version.tags.get(REPORT_TAG)})
    rows.sort(key=lambda r: (r["name"], int(r["version"])))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']}/{r['version']:<4} {' '.join('@' + a for a in r['aliases']):<24} "
                  f"weights {str(r['weights_sha256'])[:12]}…  report {str(r['report_lock_sha256'] or '-')[:12]}")
    return 0


def cmd_models_promote(args: argparse.Namespace) -> int:
    from sitebench.models.registry import promote_model_version

    info = promote_model_version(args.name, args.version, args.alias, args.tracking_uri, report=args.report,
                                 public_keys=args.public_key)
    extra = f" with report {info['report_dir']} ({info['signoffs']} valid sign-offs)" if "report_dir" in info else ""
    print(f"{args.name}/{args.version} is now @{args.alias}{extra}")
    return 0


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

    for series in read_series(args.path):
        record = series.to_dict()
        if args.json:
            print(json.dumps(record, sort_keys=False))
        else:
            print(f"{record['SeriesInstanceUID']} ({record['n_files']} files)")
            for key, value in record.items():
                if key not in ("SeriesInstanceUID", "n_files"):
                    print(f"  {key:<34} {value}")
    return 0


def cmd_qc_protocol_init(args: argparse.Namespace) -> int:
    from sitebench.qc.protocol import draft_protocol

    series = _one_series(args.series, args.series_uid)
    protocol = draft_protocol(series.parameters, args.name, args.description or "")
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
    state = "locked" if locked.created else "already locked (identical content)"
    if args.audit and locked.created:
        from sitebench.audit import AuditTrail

        record = dict(locked.audit_record)
        AuditTrail(args.audit).append(who=record.pop("who"), what=record.pop("what"), why=record.pop("why", ""),
                                      subject=f"protocol {record.get('protocol')} v{record.get('version')}",
                                      details=record)
    print(f"{locked.path}: {state}, content sha256 {locked.content_sha256}")
    if args.json:
        print(json.dumps(locked.audit_record))
    return 0


def cmd_qc_check(args: argparse.Namespace) -> int:
    from sitebench.qc.dicom_params import dicom_files
    from sitebench.qc.gate import Gate
    from sitebench.qc.protocol import load_protocol

    gate = Gate([load_protocol(args.protocol)], image_quality=args.iqm, require_locked=False, match=False)
    outcomes = gate.check_files(dicom_files(args.path), site=args.site)
    if args.json:
        print(json.dumps([o.to_dict() for o in outcomes], indent=2))
    else:
        for outcome in outcomes:
            print(outcome.summary())
    return EXIT_VERIFY_FAILED if any(o.status == "fail" for o in outcomes) else 0


def cmd_qc_serve(args: argparse.Namespace) -> int:
    from sitebench.qc.intake import load_intake_config, serve

    config = load_intake_config(args.config)
    updates = {}
    if args.dicom_port is not None and config.dicom is not None:
        updates["dicom"] = config.dicom.model_copy(update={"port": args.dicom_port})
    if args.http_port is not None and config.http is not None:
        updates["http"] = config.http.model_copy(update={"port": args.http_port})
    serve(config.model_copy(update=updates))
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

    rows = _qc_records(args.store, args.database).site_status()
    if args.json:
        print(json.dumps([{**asdict(r), "rescan_rate": r.rescan_rate} for r in rows], indent=2))
        return 0
    head = f"{'site':<10}{'series':>7}{'pass':>6}{'warn':>6}{'fail':>6}{'undet':>6}{'unmatch':>8}" \
           f"{'open dev':>9}{'drift':>6}{'rescan':>8}{'rejected':>9}"
    print(head)
    for r in rows:
        print(f"{r.site:<10}{r.series:>7}{r.passed:>6}{r.warned:>6}{r.failed:>6}{r.undetermined:>6}"
              f"{r.unmatched:>8}{r.open_deviations:>9}{r.drift_events:>6}{100 * r.rescan_rate:>7.1f}%"
              f"{r.rejected_files:>9}")
    if not rows:
        print("(no series checked yet)")
    return 0


def cmd_qc_iqm(args: argparse.Namespace) -> int:
    from sitebench.qc.image_quality import image_quality_nifti

    quality = image_quality_nifti(args.image, labels_path=args.labels)
    print(json.dumps(quality.to_dict(), indent=2) if args.json else quality.summary())
    return 0


def cmd_stats_combat(args: argparse.Namespace) -> int:
    import pandas as pd

    from sitebench.stratification import ComBat
    from sitebench.stratification.combat import combat_efficacy

    table = _stats_table(args.table)
    try:
        _columns(table, args.batch, *args.features, *args.categorical, *args.continuous)
        covariates = table[args.categorical + args.continuous] if args.categorical or args.continuous else None
        features = table[args.features].apply(pd.to_numeric, errors="coerce")
        batch = table[args.batch].astype(str).tolist()
        model = ComBat(parametric=not args.nonparametric, empirical_bayes=not args.no_eb,
                       mean_only=args.mean_only, ref_batch=args.ref_batch)
        harmonized = model.fit_transform(features, batch, covariates, categorical=args.categorical,
                                         continuous=args.continuous)
    except SitebenchError as exc:
        raise SitebenchError(str(exc), args.table) from None
    out = table.copy()
    out[args.features] = harmonized
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(args.out, index=False)
    efficacy = combat_efficacy(features, out[args.features], batch, covariates)
    print(f"{args.out}: {len(out)} rows, {len(args.features)} features harmonized across "
          f"{table[args.batch].nunique()} batches")
    print(efficacy.summary())
    if args.efficacy_json:
        Path(args.efficacy_json).write_text(json.dumps(efficacy.to_dict(), indent=2))
    return 0


def _stats_table(path: str):
    from sitebench.datasets.manifest import read_table

    return read_table(Path(path))


def _print_result(result, as_json: bool) -> None:
    print(json.dumps(result.to_dict(), indent=2) if as_json else result.summary())


def cmd_stats_equivalence(args: argparse.Namespace) -> int:
    from sitebench.stratification.equivalence import site_equivalence

    return _run_table_analysis(args, lambda t: site_equivalence(t, args.value, args.site, args.margin, args.alpha))


def cmd_stats_paired(args: argparse.Namespace) -> int:
    from sitebench.stratification.paired import paired_comparison

    return _run_table_analysis(args, lambda t: paired_comparison(
        t, model=args.model, a=args.a, b=args.b, value=args.value, scan=args.scan, by=args.by or None,
        margin=args.margin, alpha=args.alpha))


def _columns(table, *names: str | None):
    """The named columns (None stays None); a missing one is an error listing what the table has."""
    missing = [n for n in names if n is not None and n not in table.columns]
    if missing:
        raise SitebenchError(f"no column(s) {', '.join(missing)} (have: {', '.join(map(str, table.columns))})")
    return [None if n is None else table[n] for n in names]


def cmd_stats_delong(args: argparse.Namespace) -> int:
    from sitebench.stratification.classification import delong

    return _run_table_analysis(args, lambda t: delong(*_columns(t, args.truth, args.score, args.score2),
                                                      alpha=args.alpha))


def cmd_stats_icc(args: argparse.Namespace) -> int:
    from sitebench.stratification.agreement import icc

    return _run_table_analysis(args, lambda t: icc(t, args.targets, args.raters, args.ratings, alpha=args.alpha))


def cmd_stats_bland_altman(args: argparse.Namespace) -> int:
    from sitebench.stratification.agreement import bland_altman

    return _run_table_analysis(args, lambda t: bland_altman(t, args.a, args.b, alpha=args.alpha,
                                                           limit_z=args.limit_z))


def cmd_stats_metrology(args: argparse.Namespace) -> int:
    from sitebench.stratification.agreement import metrology

    return _run_table_analysis(args, lambda t: metrology(t, args.subject, args.value, reference=args.reference,
                                                         replicate=args.replicate, site=args.site,
                                                         alpha=args.alpha))


def cmd_stats_mixed(args: argparse.Namespace) -> int:
    from sitebench.stratification.lmm import fit_lmm

    return _run_table_analysis(args, lambda t: fit_lmm(t, args.formula, args.groups, vc=args.vc or (),
                                                       crossed=args.crossed or (), reml=not args.ml))


def _run_table_analysis(args: argparse.Namespace, analysis) -> int:
    """Read the table, run one analysis, print its summary or JSON; errors name the table."""
    table = _stats_table(args.table)
    try:
        result = analysis(table)
    except SitebenchError as exc:
        raise SitebenchError(str(exc), args.table) from None
    _print_result(result, args.json)
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from sitebench.audit import verify_trail

    if not Path(args.trail).exists():
        raise SitebenchError("no audit trail here", args.trail)
    result = verify_trail(args.trail)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 0 if result.ok else EXIT_VERIFY_FAILED


# --------------------------------------------------------------------------- parser


def _add_execution(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=2, help="local worker processes (default 2; 1 = inline)")
    parser.add_argument("--scheduler", metavar="ADDRESS", help="Dask scheduler address, e.g. tcp://host:8786")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite under the output folder)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sitebench",
        description="Check an imaging biomarker across the sites, scanner vendors and software versions "
                    "of a multi-site trial: simulate, benchmark model versions, fit scanner effects, "
                    "and write locked validation reports.",
        epilog="Start with: sitebench demo --out sitebench-demo")
    parser.add_argument("--version", action="version", version=f"sitebench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser("demo", help="run the whole path on a built-in simulated trial",
                          description="Simulate a multi-site trial, run three model versions through MONAI, "
                                      "record per-stratum results in MLflow, fit the scanner-effect model "
                                      "and write a locked, versioned report.")
    demo.add_argument("--out", default="sitebench-demo", help="output folder (default: ./sitebench-demo)")
    demo.add_argument("--sites", type=int, default=20, help="number of sites (default 20)")
    demo.add_argument("--scans-per-site", type=int, default=10, help="scans per site (default 10)")
    demo.add_argument("--seed", type=int, default=0, help="simulation and bootstrap seed (default 0)")
    demo.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (default 1000)")
    _add_execution(demo)
    demo.set_defaults(func=cmd_demo)

    sim = sub.add_parser("simulate", help="simulate a multi-site trial with known truth",
                         description="Write images, label maps, manifest.csv and truth.json for a seeded "
                                     "simulated trial.")
    sim.add_argument("--out", required=True, help="new output folder")
    sim.add_argument("--config", help="trial settings YAML (see configs/trial_demo.yaml)")
    sim.add_argument("--sites", type=int, help="override: number of sites")
    sim.add_argument("--scans-per-site", type=int, help="override: scans per site")
    sim.add_argument("--seed", type=int, help="override: seed")
    sim.add_argument("--workers", type=int, help="override: worker processes")
    sim.add_argument("--no-progress", action="store_true")
    sim.set_defaults(func=cmd_simulate)

    bench = sub.add_parser("benchmark", help="run model versions over a manifest").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    run = bench.add_parser("run", help="run a benchmark spec (YAML)",
                           description="Score every scan with every model version of SPEC, resume what is "
                                       "already scored, compute per-stratum metrics and mixed models, log to "
                                       "MLflow and write a locked report.")
    run.add_argument("spec", help="benchmark spec YAML")
    run.add_argument("--no-report", action="store_true", help="skip the report")
    _add_execution(run)
    run.set_defaults(func=cmd_benchmark_run)

    report = sub.add_parser("report", help="validation reports").add_subparsers(dest="action", metavar="ACTION",
                                                                                 required=True)
    verify = report.add_parser("verify", help="check every hash of a report",
                               description="Exit 0 if the report and everything it rests on are unchanged, "
                                           "1 otherwise.")
    verify.add_argument("path", help="report folder (or its report.html / lock.json)")
    verify.add_argument("--public-key", action="append", help="also require valid Ed25519 sign-offs by these "
                                                               "keys (.pub; repeatable)")
    verify.add_argument("--recompute", action="store_true",
                        help="also re-derive the evaluation table and every result table from the locked "
                             "predictions, data manifest and analysis plan, and compare them byte for byte")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=cmd_report_verify)
    keygen = report.add_parser("keygen", help="generate an Ed25519 signing key pair",
                               description="Writes OUT.key (0600; passphrase from $SITEBENCH_KEY_PASSPHRASE if "
                                           "set) and OUT.pub. Never overwrites; rotate by generating a new name.")
    keygen.add_argument("--out", required=True, help="path without suffix, e.g. ~/.sitebench/keys/jdoe-2026")
    keygen.set_defaults(func=cmd_report_keygen)
    sign = report.add_parser("sign", help="electronic sign-off bound to the report's lock (21 CFR 11.50)",
                             description="Adds the signer's printed name, the time and the meaning to "
                                         "signatures.json, signed with Ed25519 over the lock's hash.")
    sign.add_argument("path", help="report folder")
    sign.add_argument("--key", required=True, help="private key (.key)")
    sign.add_argument("--name", required=True, help="signer's printed name")
    sign.add_argument("--meaning", required=True, choices=["authorship", "review", "approval"])
    sign.set_defaults(func=cmd_report_sign)

    manifest = sub.add_parser("manifest", help="scan manifests").add_subparsers(dest="action", metavar="ACTION",
                                                                                required=True)
    validate = manifest.add_parser("validate", help="validate a manifest (columns, ids, paths, hashes)")
    validate.add_argument("path")
    validate.add_argument("--no-hashes", action="store_true", help="skip SHA-256 checks")
    validate.set_defaults(func=cmd_manifest_validate)
    imp = manifest.add_parser("import", help="build a manifest from NIfTI+CSV or a BIDS dataset")
    imp.add_argument("kind", choices=("nifti", "bids"))
    imp.add_argument("source", help="NIfTI folder or BIDS root")
    imp.add_argument("--table", help="CSV describing the NIfTI files (nifti only)")
    imp.add_argument("--reference", nargs="*", help="reference value columns (nifti only)")
    imp.add_argument("--out", required=True, help="manifest to write (.csv or .parquet)")
    imp.set_defaults(func=cmd_manifest_import)

    qc = sub.add_parser("qc", help="upload-time QC of DICOM series").add_subparsers(dest="action", metavar="ACTION",
                                                                                  required=True)
    inspect = qc.add_parser("inspect", help="acquisition parameters per series (BIDS keys and units)",
                            description="Read DICOM headers (classic and enhanced MR) and print one record per "
                                        "series with BIDS sidecar key names and units. Patient identifiers are "
                                        "reported by attribute name only, never by value.")
    inspect.add_argument("path", help="DICOM file or folder (recursive)")
    inspect.add_argument("--json", action="store_true", help="one JSON object per series, one per line")
    inspect.set_defaults(func=cmd_qc_inspect)
    check = qc.add_parser("check", help="check series offline against a protocol",
                          description="Verdict per series: pass, warn, fail or undetermined, with every "
                                      "deviation. Exit 1 if any series fails.")
    check.add_argument("path", help="DICOM file or folder")
    check.add_argument("--protocol", required=True, help="protocol YAML (locked or draft)")
    check.add_argument("--site", default="offline", help="site name for drift and image-quality history")
    check.add_argument("--iqm", action="store_true", help="also compute image-quality metrics and thresholds")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=cmd_qc_check)
    serve_cmd = qc.add_parser("serve", help="run the upload-time gate: DICOM C-STORE, STOW-RS, watched folder",
                              description="Receive series (DICOM Storage SCP with an AE title per site, "
                                          "DICOMweb STOW-RS upload, a watched folder), store every file "
                                          "content-addressed before acknowledging it, and give each series its "
                                          "verdict once it has been quiet. Runs until interrupted.")
    serve_cmd.add_argument("--config", required=True, help="intake YAML (see configs/qc_intake.yaml)")
    serve_cmd.add_argument("--dicom-port", type=int, help="override the DICOM port")
    serve_cmd.add_argument("--http-port", type=int, help="override the HTTP port")
    serve_cmd.set_defaults(func=cmd_qc_serve)
    status = qc.add_parser("status", help="per-site table: verdicts, open deviations, drift, re-scan rate",
                           description="Counts of pass/warn/fail/undetermined/unmatched series (latest verdict "
                                       "each), open deviations, drift events, the re-scan rate and rejected files.")
    status.add_argument("--store", default="qc-store", help="intake store folder (holds qc.db)")
    status.add_argument("--database", help="SQLAlchemy URL instead of the store's SQLite file")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_qc_status)
    to_manifest = qc.add_parser("manifest", help="checked series into a scan manifest (NIfTI + QC columns)",
                                description="One NIfTI and one manifest row per series whose latest verdict is "
                                            "pass or warn, with qc_status, qc_protocol, qc_deviations and "
                                            "qc_<metric> columns, for `sitebench benchmark run`.")
    to_manifest.add_argument("--store", default="qc-store", help="intake store folder")
    to_manifest.add_argument("--database", help="SQLAlchemy URL instead of the store's SQLite file")
    to_manifest.add_argument("--out", required=True, help="manifest to write (.csv, .tsv or .parquet)")
    to_manifest.add_argument("--include-failed", action="store_true", help="also fail and undetermined series")
    to_manifest.set_defaults(func=cmd_qc_manifest)
    iqm = qc.add_parser("iqm", help="image-quality metrics of a volume (MRIQC definitions)",
                        description="SNR, CNR, CJV, EFC, FBER, FWHM, a QI1-style artefact fraction and WM2MAX "
                                    "on a NIfTI volume; tissues from --labels or a 3-class mixture.")
    iqm.add_argument("image", help="NIfTI volume")
    iqm.add_argument("--labels", help="label map (1 CSF, 2 GM, 3 WM)")
    iqm.add_argument("--json", action="store_true")
    iqm.set_defaults(func=cmd_qc_iqm)
    proto = qc.add_parser("protocol", help="draft and lock acquisition protocols").add_subparsers(
        dest="protocol_action", metavar="ACTION", required=True)
    init = proto.add_parser("init", help="draft a protocol from a reference series")
    init.add_argument("series", help="DICOM folder of the reference series")
    init.add_argument("--out", required=True, help="protocol YAML to write (never overwritten)")
    init.add_argument("--name", default="t1w-3d", help="protocol name (default t1w-3d)")
    init.add_argument("--description")
    init.add_argument("--series-uid", help="which series, when the folder holds several")
    init.set_defaults(func=cmd_qc_protocol_init)
    lock = proto.add_parser("lock", help="lock a protocol version (immutable; a change is a new version)")
    lock.add_argument("protocol", help="protocol YAML")
    lock.add_argument("--who", required=True, help="who locks it")
    lock.add_argument("--why", required=True, help="why")
    lock.add_argument("--lock-dir", required=True, help="folder of locked protocols")
    lock.add_argument("--json", action="store_true", help="also print the audit record")
    lock.add_argument("--audit", help="append the lock to this audit trail (JSON lines)")
    lock.set_defaults(func=cmd_qc_protocol_lock)

    stats = sub.add_parser("stats", help="scanner-effect statistics on any CSV").add_subparsers(
        dest="analysis", metavar="ANALYSIS", required=True)
    combat = stats.add_parser("combat", help="ComBat harmonization (all variants; matches the authors' outputs)",
                              description="One row per scan in, the same rows out with harmonized features.")
    combat.add_argument("table", help="CSV/TSV/Parquet, one row per scan")
    combat.add_argument("--batch", required=True, help="batch column (site or scanner)")
    combat.add_argument("--features", nargs="+", required=True, help="feature columns to harmonize")
    combat.add_argument("--categorical", nargs="*", default=[], help="categorical covariates to preserve")
    combat.add_argument("--continuous", nargs="*", default=[], help="continuous covariates to preserve")
    combat.add_argument("--nonparametric", action="store_true", help="non-parametric empirical Bayes prior")
    combat.add_argument("--no-eb", action="store_true", help="no empirical Bayes shrinkage")
    combat.add_argument("--mean-only", action="store_true", help="adjust location only")
    combat.add_argument("--ref-batch", help="reference batch, left unchanged")
    combat.add_argument("--out", required=True, help="harmonized CSV")
    combat.add_argument("--efficacy-json", help="also write the efficacy report (site share before/after, "
                                                "covariate effects kept) as JSON")
    combat.set_defaults(func=cmd_stats_combat)
    equivalence = stats.add_parser("equivalence", help="per-site TOST vs the rest; is every site within a margin?",
                                   description="Welch TOST of each site's mean against the other sites', Holm-"
                                               "adjusted; 'every site within the margin' by intersection-union.")
    equivalence.add_argument("table", help="CSV/TSV/Parquet, one row per scan")
    equivalence.add_argument("--value", required=True, help="per-scan performance column (e.g. absolute error)")
    equivalence.add_argument("--site", default="site", help="site column")
    equivalence.add_argument("--margin", type=float, required=True, help="equivalence margin, in --value's units")
    equivalence.add_argument("--alpha", type=float, default=0.05)
    equivalence.add_argument("--json", action="store_true")
    equivalence.set_defaults(func=cmd_stats_equivalence)
    paired = stats.add_parser("paired", help="two model versions on the same scans: per-site paired differences",
                              description="Pairs rows by scan; per level of --by and overall: mean difference "
                                          "(b - a) with paired-t CI, Wilcoxon p, and with --margin the paired "
                                          "TOST, Holm-adjusted across levels.")
    paired.add_argument("table", help="CSV/TSV/Parquet, one row per scan and model version")
    paired.add_argument("--model", default="model_key", help="column naming the model version")
    paired.add_argument("--a", required=True, help="first model version (e.g. gm-unet@1.0.0)")
    paired.add_argument("--b", required=True, help="second model version")
    paired.add_argument("--value", required=True, help="per-scan value to compare (e.g. absolute error)")
    paired.add_argument("--scan", default="scan_id", help="scan column the rows are paired on")
    paired.add_argument("--by", default="site", help="stratum column ('' for overall only)")
    paired.add_argument("--margin", type=float, help="equivalence margin for the paired TOST, --value's units")
    paired.add_argument("--alpha", type=float, default=0.05)
    paired.add_argument("--json", action="store_true")
    paired.set_defaults(func=cmd_stats_paired)
    delong_cmd = stats.add_parser("delong", help="AUC with DeLong CI; paired DeLong test of two scores",
                                  description="AUC (larger score = positive class) with the DeLong CI, as R's "
                                              "pROC; with --score2, the paired DeLong test of the difference.")
    delong_cmd.add_argument("table")
    delong_cmd.add_argument("--truth", required=True, help="binary outcome column (0/1)")
    delong_cmd.add_argument("--score", required=True)
    delong_cmd.add_argument("--score2", help="second model's score, for the paired test")
    delong_cmd.add_argument("--alpha", type=float, default=0.05)
    delong_cmd.add_argument("--json", action="store_true")
    delong_cmd.set_defaults(func=cmd_stats_delong)
    mixed = stats.add_parser("mixed", help="linear mixed model: fixed effects, variance components, BLUPs",
                             description="Random intercepts for --groups (site), nested --vc (scanner within "
                                         "site) and --crossed factors (traveling subjects); REML by default. "
                                         "Checked against R's lme4.")
    mixed.add_argument("table")
    mixed.add_argument("--formula", required=True, help='fixed effects, e.g. "y ~ age + C(vendor)"')
    mixed.add_argument("--groups", required=True, help="top-level grouping column (site)")
    mixed.add_argument("--vc", nargs="*", help="columns nested in --groups (scanner)")
    mixed.add_argument("--crossed", nargs="*", help="columns crossed with --groups (subject)")
    mixed.add_argument("--ml", action="store_true", help="maximum likelihood instead of REML (for LRTs)")
    mixed.add_argument("--json", action="store_true")
    mixed.set_defaults(func=cmd_stats_mixed)
    icc_cmd = stats.add_parser("icc", help="ICC(1,1), ICC(A,1), ICC(C,1) and their k forms, with F-based CIs",
                               description="Intraclass correlations (McGraw & Wong names; Shrout & Fleiss forms) "
                                           "from a long table: one row per (target, rater) rating.")
    icc_cmd.add_argument("table")
    icc_cmd.add_argument("--targets", required=True, help="subject / target column")
    icc_cmd.add_argument("--raters", required=True, help="rater, scanner or session column")
    icc_cmd.add_argument("--ratings", required=True, help="measurement column")
    icc_cmd.add_argument("--alpha", type=float, default=0.05)
    icc_cmd.add_argument("--json", action="store_true")
    icc_cmd.set_defaults(func=cmd_stats_icc)
    ba = stats.add_parser("bland-altman", help="bias and limits of agreement, each with a CI",
                          description="Bias (mean of a - b), SD and limits bias ± z·SD with CIs (exact, "
                                      "non-central t).")
    ba.add_argument("table")
    ba.add_argument("--a", required=True)
    ba.add_argument("--b", required=True)
    ba.add_argument("--limit-z", type=float, default=1.96, help="limits at bias ± this many SDs (1986 paper: 2)")
    ba.add_argument("--alpha", type=float, default=0.05)
    ba.add_argument("--json", action="store_true")
    ba.set_defaults(func=cmd_stats_bland_altman)
    metro = stats.add_parser("metrology", help="QIBA metrology: bias, linearity, wSD, RC, wCV, reproducibility",
                             description="Technical performance of a quantitative imaging biomarker (Raunig et "
                                         "al. 2015): give --reference for bias and linearity, repeat scans for "
                                         "repeatability, --site for reproducibility.")
    metro.add_argument("table")
    metro.add_argument("--subject", required=True)
    metro.add_argument("--value", required=True)
    metro.add_argument("--reference", help="true value column")
    metro.add_argument("--replicate", help="replicate (repeat scan) column")
    metro.add_argument("--site", help="site column, for reproducibility")
    metro.add_argument("--alpha", type=float, default=0.05)
    metro.add_argument("--json", action="store_true")
    metro.set_defaults(func=cmd_stats_metrology)

    audit = sub.add_parser("audit", help="the append-only, hash-chained audit trail").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    averify = audit.add_parser("verify", help="detect any edited, removed or reordered record",
                               description="Exit 0 if the chain is intact, 1 otherwise.")
    averify.add_argument("trail", help="audit trail file (JSON lines)")
    averify.add_argument("--json", action="store_true")
    averify.set_defaults(func=cmd_audit_verify)

    models = sub.add_parser("models", help="model versions").add_subparsers(dest="action", metavar="ACTION",
                                                                            required=True)
    models.add_parser("list", help="list built-in model versions").set_defaults(func=cmd_models_list)
    register = models.add_parser("register", help="register a model version in MLflow (weight hash as a tag)")
    register.add_argument("reference", help="classical, builtin:NAME or a MONAI bundle folder")
    register.add_argument("--name", required=True, help="registered model name")
    register.add_argument("--alias", help="alias to point at this version, e.g. candidate")
    register.add_argument("--tracking-uri", required=True, help="MLflow tracking/registry URI")
    register.set_defaults(func=cmd_models_register)
    versions = models.add_parser("versions", help="registered versions with aliases, weight and report hashes")
    versions.add_argument("--tracking-uri", required=True)
    versions.add_argument("--json", action="store_true")
    versions.set_defaults(func=cmd_models_versions)
    promote = models.add_parser("promote", help="point an alias at a version; @validated needs a signed report",
                                description="Aliases other than 'validated' are set directly. 'validated' needs "
                                            "--report: it must verify, carry a valid approval sign-off by one of "
                                            "--public-key, and rest on this version's weights; it is then "
                                            "attached to the version and its lock hash stored as a tag.")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--alias", required=True)
    promote.add_argument("--report", help="validation report folder")
    promote.add_argument("--public-key", action="append", help="signer public keys (.pub; repeatable)")
    promote.add_argument("--tracking-uri", required=True)
    promote.set_defaults(func=cmd_models_promote)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except SitebenchError as exc:
        print(f"sitebench: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # e.g. piped into `head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("sitebench: interrupted; finished work is kept and a rerun resumes", file=sys.stderr)
        return 130


def _entry() -> Any:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
