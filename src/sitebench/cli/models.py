"""``sitebench models list | register | versions | promote``: model versions and the MLflow registry."""

from __future__ import annotations

import argparse

from sitebench.cli._common import add_json, add_tracking_uri, print_json


def cmd_models_list(args: argparse.Namespace) -> int:
    from sitebench.models.registry import BUILTIN_DIR, builtin_bundles, load_model

    print("classical            gm-tissue-gmm (three-class GMM tissue classification)")
    for name in builtin_bundles():
        model = load_model(f"builtin:{name}")
        training = model.card.training
        print(f"builtin:{name:<12} {model.card.key:<16} sha256 {model.card.weights_sha256[:16]}…  "
              f"trained on {training.vendor if training else '?'}, "
              f"augmentation={training.augmentation if training else None}")
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
    from sitebench.models.registry import version_rows

    rows = version_rows(args.tracking_uri)
    if args.json:
        print_json(rows)
        return 0
    for r in rows:
        print(f"{r['name']}/{r['version']:<4} {' '.join('@' + a for a in r['aliases']):<24} "
              f"weights {str(r['weights_sha256'])[:12]}…  report {str(r['report_lock_sha256'] or '-')[:12]}")
    return 0


def _gate_rows(store_or_url: str | None):
    """The QC gate's drift events and latest verdicts (promotion imports no qc: the top reads them)."""
    if store_or_url is None:
        return None
    from sitebench.cli.qc import _qc_records
    from sitebench.reports.coverage import GateRows

    records = _qc_records(store_or_url, store_or_url if "://" in store_or_url else None)
    return GateRows.from_records(records, source=store_or_url)


def cmd_models_promote(args: argparse.Namespace) -> int:
    from sitebench.promotion import promote_model_version

    info = promote_model_version(args.name, args.version, args.alias, args.tracking_uri, report=args.report,
                                 public_keys=args.public_key, materials_dir=args.materials,
                                 gate_rows=_gate_rows(args.qc_store), require_coverage=args.require_coverage)
    extra = f" with report {info['report_dir']} ({info['signoffs']} valid sign-offs)" if "report_dir" in info else ""
    print(f"{args.name}/{args.version} is now @{args.alias}{extra}")
    if info.get("uncovered"):
        print(f"warning: {info['uncovered']} (recorded as tag sitebench.uncovered_sites)")
    elif "uncovered" in info:
        print(f"{info['coverage_report']} covers every site the QC gate has seen")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="model versions").add_subparsers(dest="action", metavar="ACTION",
                                                                            required=True)
    models.add_parser("list", help="list built-in model versions").set_defaults(func=cmd_models_list)
    register = models.add_parser("register", help="register a model version in MLflow (weight hash as a tag)")
    register.add_argument("reference", help="classical, builtin:NAME or a MONAI bundle folder")
    register.add_argument("--name", required=True, help="registered model name")
    register.add_argument("--alias", help="alias to point at this version, e.g. candidate")
    add_tracking_uri(register, required=True)
    register.set_defaults(func=cmd_models_register)
    versions = models.add_parser("versions", help="registered versions with aliases, weight and report hashes")
    add_tracking_uri(versions, required=True)
    add_json(versions, "the list of versions")
    versions.set_defaults(func=cmd_models_versions)
    promote = models.add_parser("promote", help="point an alias at a version; @validated needs a signed report",
                                description="Aliases other than 'validated' are set directly. 'validated' needs "
                                            "--report: it must verify, carry a valid approval sign-off by one of "
                                            "--public-key, and rest on this version's weights; it is then "
                                            "attached to the version and its lock hash stored as a tag. With "
                                            "--qc-store, the output names every site whose current software "
                                            "version or scanner (from the gate's latest verdicts and drift "
                                            "events) the report does not cover; promotion still succeeds and "
                                            "records them as the tag sitebench.uncovered_sites, unless "
                                            "--require-coverage: then it is refused.")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--alias", required=True)
    promote.add_argument("--report", help="validation report folder")
    promote.add_argument("--public-key", action="append", help="signer public keys (.pub; repeatable)")
    promote.add_argument("--materials", metavar="DIR",
                         help="another copy of the report's materials, for a report away from them")
    promote.add_argument("--qc-store", metavar="DIR_OR_URL",
                         help="the QC gate's store folder (holds qc.db) or database URL: name every site whose "
                              "current software version or scanner the report does not cover (a warning, "
                              "recorded as the version tag sitebench.uncovered_sites); needs --report")
    promote.add_argument("--require-coverage", action="store_true",
                         help="with --qc-store: refuse to promote while the report does not cover a site")
    add_tracking_uri(promote, required=True)
    promote.set_defaults(func=cmd_models_promote)
