"""``sitebench manifest validate | import``: the scan manifest every stage reads."""

from __future__ import annotations

import argparse
from pathlib import Path


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


def add_parser(sub: argparse._SubParsersAction) -> None:
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
