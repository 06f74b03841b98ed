"""``sitebench audit verify``: the append-only, hash-chained audit trail."""

from __future__ import annotations

import argparse
from pathlib import Path

from sitebench.cli._common import EXIT_VERIFY_FAILED, add_json, print_result
from sitebench.errors import SitebenchError


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from sitebench.audit import verify_trail

    if not Path(args.trail).exists():
        raise SitebenchError("no audit trail here", args.trail)
    result = verify_trail(args.trail)
    print_result(result, args.json)
    return 0 if result.ok else EXIT_VERIFY_FAILED


def add_parser(sub: argparse._SubParsersAction) -> None:
    audit = sub.add_parser("audit", help="the append-only, hash-chained audit trail").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    averify = audit.add_parser("verify", help="detect any edited, removed or reordered record",
                               description="Exit 0 if the chain is intact, 1 otherwise.")
    averify.add_argument("trail", help="audit trail file (JSON lines)")
    add_json(averify, "the verification")
    averify.set_defaults(func=cmd_audit_verify)
