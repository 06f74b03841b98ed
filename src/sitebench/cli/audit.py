"""``sitebench audit verify|repair|new-key``: the append-only, hash- and MAC-chained audit trail.

``--key-file`` gives the trail's secret (MACs are checked, and a repair record is keyed);
``--database`` the database holding the trail's head (``audit_head`` table). ``--config
INTAKE_YAML`` is the shortcut for a QC store: the YAML's ``store`` (relative to the YAML's
folder) gives the trail ``<store>/audit.jsonl`` and the database ``database``, else
``sqlite:///<store>/qc.db``; the key is ``audit_key_file`` (relative to the YAML's folder),
else ``<store>/audit.key`` when that exists. Options given on the command line win. The YAML
is read with plain ``yaml.safe_load`` so these commands do not depend on the QC service's
config schema.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sitebench.cli._common import EXIT_VERIFY_FAILED, add_json, print_result, say
from sitebench.errors import SitebenchError


@dataclass
class _Target:
    trail: Path
    key: bytes | None
    head: Any  # SqlAuditHead | None


def _from_config(path: str) -> dict[str, Any]:
    """Trail, database and key file named by an intake YAML (only ``store``, ``database``, ``audit_key_file``)."""
    import yaml

    config = Path(path)
    try:
        data = yaml.safe_load(config.read_text())
    except FileNotFoundError:
        raise SitebenchError("config file not found", config) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SitebenchError(f"cannot read the config file: {exc}", config) from None
    except yaml.YAMLError as exc:
        raise SitebenchError(f"not valid YAML: {str(exc).splitlines()[0]}", config) from None
    if not isinstance(data, dict) or not isinstance(data.get("store"), str) or not data["store"].strip():
        raise SitebenchError("config has no 'store' folder (the QC store holding audit.jsonl)", config)
    base = config.resolve().parent
    store = (base / data["store"]).resolve()
    out: dict[str, Any] = {"trail": store / "audit.jsonl"}
    database = data.get("database")
    if database is not None and not isinstance(database, str):
        raise SitebenchError("config 'database' must be a database URL", config)
    if database:
        out["database"] = database
    elif (store / "qc.db").exists():  # never create an empty database just to read a head from it
        out["database"] = f"sqlite:///{store / 'qc.db'}"
    else:
        say(f"no QC database at {store / 'qc.db'}; the trail's head is not checked")
    key_file = data.get("audit_key_file")
    if key_file is not None and not isinstance(key_file, str):
        raise SitebenchError("config 'audit_key_file' must be a file name", config)
    if key_file:
        out["key_file"] = base / key_file
    elif (store / "audit.key").exists():
        out["key_file"] = store / "audit.key"
    return out


def _target(args: argparse.Namespace) -> _Target:
    from sitebench.audit import SqlAuditHead, load_audit_key

    config = _from_config(args.config) if args.config else {}
    trail = args.trail or config.get("trail")
    if trail is None:
        raise SitebenchError("give the audit trail file, or --config INTAKE_YAML for a QC store's trail")
    key_file = args.key_file or config.get("key_file")
    database = args.database or config.get("database")
    key = load_audit_key(key_file) if key_file else None
    head = SqlAuditHead(database, args.head_name) if database else None
    return _Target(Path(trail), key, head)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from sitebench.audit import verify_trail

    target = _target(args)
    if not target.trail.exists() and target.head is None:
        raise SitebenchError("no audit trail here", target.trail)
    result = verify_trail(target.trail, key=target.key, head=target.head)
    print_result(result, args.json)
    return 0 if result.ok else EXIT_VERIFY_FAILED


def cmd_audit_repair(args: argparse.Namespace) -> int:
    from sitebench.audit import repair_trail

    target = _target(args)
    result = repair_trail(target.trail, who=args.who, why=args.why, key=target.key, head=target.head)
    print(result.summary())
    return 0


def cmd_audit_new_key(args: argparse.Namespace) -> int:
    from sitebench.audit import create_audit_key

    create_audit_key(args.key_file)
    print(f"{args.key_file}: new audit key (32 random bytes, hex, mode 0600); keep it away from the trail's writers")
    return 0


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trail", nargs="?", help="audit trail file (JSON lines); optional with --config")
    parser.add_argument("--config", metavar="INTAKE_YAML",
                        help="a QC intake YAML: trail <store>/audit.jsonl, its database and key file")
    parser.add_argument("--key-file", metavar="F", help="file holding the trail's secret key (mode 0600)")
    parser.add_argument("--database", metavar="URL", help="database holding the trail's head (audit_head table)")
    parser.add_argument("--head-name", default="audit", help="the trail's name in the audit_head table "
                                                            "(default: audit)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    audit = sub.add_parser("audit", help="the append-only, hash- and MAC-chained audit trail").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    averify = audit.add_parser(
        "verify", help="detect any edited, removed, forged or reordered record",
        description="Check the hash chain; the MACs with --key-file; the head with --database. "
                    "Exit 0 if everything checked is intact, 1 otherwise, 2 on a usage error.")
    _add_target(averify)
    add_json(averify, "the verification")
    averify.set_defaults(func=cmd_audit_verify)

    arepair = audit.add_parser(
        "repair", help="cut off a torn last line (kept beside the trail) and record the repair",
        description="Only a torn last line is removed; its bytes are kept in <trail>.torn-<utc> and the repair "
                    "is appended to the trail as 'audit repaired'. Any other damage is refused (exit 2).")
    _add_target(arepair)
    arepair.add_argument("--who", required=True, help="who repairs the trail")
    arepair.add_argument("--why", required=True, help="why (e.g. the crash that tore the line)")
    arepair.set_defaults(func=cmd_audit_repair)

    akey = audit.add_parser("new-key", help="create a trail key file (32 random bytes, hex, mode 0600)",
                            description="Refuses to overwrite an existing file.")
    akey.add_argument("key_file", help="the new key file")
    akey.set_defaults(func=cmd_audit_new_key)
