"""``sitebench report verify | keygen | sign``: locked validation reports and their sign-offs."""

from __future__ import annotations

import argparse
import os

from sitebench.cli._common import add_json, print_result


def cmd_report_verify(args: argparse.Namespace) -> int:
    from sitebench.reports import verify_report

    result = verify_report(args.path, public_keys=args.public_key, recompute=args.recompute,
                           materials_dir=args.materials)
    print_result(result, args.json)
    return result.exit_code


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


def add_parser(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser("report", help="validation reports").add_subparsers(dest="action", metavar="ACTION",
                                                                                 required=True)
    verify = report.add_parser("verify", help="check every hash of a report",
                               description="Three answers: are the report's own files intact, are its "
                                           "sign-offs valid (with --public-key), and which materials could "
                                           "be checked here. Exit 0: all verified; 1: a report file, the "
                                           "lock, a sign-off, a material found here or a recomputed table "
                                           "does not match; 3: report intact (and signed) but some "
                                           "materials are not available here (use --materials); 4: with "
                                           "--recompute, only the mixed-model tables differ, because they "
                                           "were locked with another mixed-model engine; 2: bad input.")
    verify.add_argument("path", help="report folder (or its report.html / lock.json)")
    verify.add_argument("--public-key", action="append", help="also require valid Ed25519 sign-offs by these "
                                                               "keys (.pub; repeatable)")
    verify.add_argument("--recompute", action="store_true",
                        help="also re-derive the evaluation table and every result table from the locked "
                             "predictions, data manifest and analysis plan, and compare them byte for byte")
    verify.add_argument("--materials", metavar="DIR",
                        help="another copy of the materials (trial folder, weights): each material not found "
                             "where the lock recorded it is looked for here by its recorded path, then by its "
                             "trailing folders and file name")
    add_json(verify, "the verification (every file, every problem)")
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
