"""Ed25519 electronic sign-offs bound to a report's lock (21 CFR 11.50 / 11.70 style).

A sign-off records the signer's printed name, the UTC date and time, and the meaning of
the signature (authorship, review or approval), together with the SHA-256 of the
report's ``lock.json`` — which itself hashes every file the report rests on. The
signature covers all of these, so it cannot be moved to another report or another
meaning. Sign-offs accumulate in ``signatures.json`` beside the lock; the lock is
never rewritten, so a report can carry several.

Keys: ``sitebench report keygen --out ~/.sitebench/keys/NAME`` writes ``NAME.key``
(PKCS#8 PEM, mode 0600, optionally passphrase-protected) and ``NAME.pub``. Keep the
private key with the signer only; distribute the ``.pub`` to whoever verifies. To rotate,
generate a new pair, sign new reports with it and keep the old ``.pub``: verification
names the key fingerprint each sign-off was made with.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sitebench.errors import SitebenchError
from sitebench.provenance import canonical_json, sha256_bytes, sha256_file, utc_now
from sitebench.reports.integrity import LOCK_CHANGED, check_materials, check_subjects, statement_intact
from sitebench.reports.lock import LOCK_FILE, read_lock, report_dir_of

__all__ = ["MEANINGS", "SignOff", "generate_key", "key_fingerprint", "load_public_key", "read_signoffs", "sign_report",
           "verify_signoffs"]

SIGNATURES_FILE = "signatures.json"
SIGNOFF_SCHEMA = "sitebench.signoff/v1"
MEANINGS = ("authorship", "review", "approval")


@dataclass(frozen=True)
class SignOff:
    signer: str
    meaning: str
    signed_utc: str
    lock_sha256: str
    key_fingerprint: str
    signature: str

    def statement(self) -> dict[str, Any]:
        """What the signature covers."""
        return {"schema": SIGNOFF_SCHEMA, "signer": self.signer, "meaning": self.meaning,
                "signed_utc": self.signed_utc, "lock_sha256": self.lock_sha256,
                "key_fingerprint": self.key_fingerprint}

    def to_dict(self) -> dict[str, Any]:
        return {**self.statement(), "signature": self.signature}


def key_fingerprint(public_key) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + sha256_bytes(raw)[:32]


def generate_key(out: str | Path, passphrase: bytes | None = None) -> tuple[Path, Path]:
    """Write ``<out>.key`` (private, 0600) and ``<out>.pub``; refuses to overwrite either."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out)
    private_path, public_path = out.with_suffix(".key"), out.with_suffix(".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise SitebenchError("exists already; a key is never overwritten (rotate to a new name)", path)
    out.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def _load_private(path: Path, passphrase: bytes | None):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=passphrase)
    except FileNotFoundError:
        raise SitebenchError("private key not found", path) from None
    except (ValueError, TypeError) as exc:
        raise SitebenchError(f"cannot read the private key ({exc})", path) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SitebenchError("not an Ed25519 private key", path)
    return key


def load_public_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise SitebenchError("public key not found", path) from None
    except ValueError as exc:
        raise SitebenchError(f"cannot read the public key ({exc})", path) from None
    if not isinstance(key, Ed25519PublicKey):
        raise SitebenchError("not an Ed25519 public key", path)
    return key


def read_signoffs(report_dir: Path) -> list[dict[str, Any]]:
    path = report_dir / SIGNATURES_FILE
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SitebenchError(f"{SIGNATURES_FILE} is not valid JSON", path) from None
    if not isinstance(data, list):
        raise SitebenchError(f"{SIGNATURES_FILE} must hold a list of sign-offs", path)
    return data


def sign_report(path: str | Path, key_path: str | Path, signer: str, meaning: str,
                passphrase: bytes | None = None) -> SignOff:
    """Add one sign-off to a locked report (its files must verify first: nobody signs a changed report).

    Materials not available here (a copy of the report) do not stop a sign-off; a material
    found here with another hash does.
    """
    report_dir = report_dir_of(path)
    signer = " ".join(str(signer).split())
    if not signer:
        raise SitebenchError("a sign-off needs the signer's printed name")
    if meaning not in MEANINGS:
        raise SitebenchError(f"meaning must be one of {', '.join(MEANINGS)}, got {meaning!r}")
    problems = _integrity_problems(report_dir)
    if problems:
        raise SitebenchError("refusing to sign a report that fails verification: " + "; ".join(problems[:3])
                             + (f"; … and {len(problems) - 3} more" if len(problems) > 3 else ""), report_dir)
    key = _load_private(Path(key_path), passphrase)
    unsigned = SignOff(signer=signer, meaning=meaning, signed_utc=utc_now(),
                       lock_sha256=sha256_file(report_dir / LOCK_FILE),
                       key_fingerprint=key_fingerprint(key.public_key()), signature="")
    signature = key.sign(canonical_json(unsigned.statement()))
    signoff = SignOff(**{**unsigned.__dict__, "signature": base64.b64encode(signature).decode()})
    signoffs = read_signoffs(report_dir) + [signoff.to_dict()]
    target = report_dir / SIGNATURES_FILE
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(signoffs, indent=2, sort_keys=True))
    os.replace(tmp, target)
    return signoff


def _integrity_problems(report_dir: Path) -> list[str]:
    """What does not match in the report's lock, its own files, and the materials found here."""
    try:
        statement = read_lock(report_dir)
    except SitebenchError as exc:
        return [str(exc)]
    problems = [] if statement_intact(statement) else [LOCK_CHANGED]
    checks = check_subjects(report_dir, statement) + check_materials(report_dir, statement)
    return problems + [c.describe() for c in checks if c.failed]


def verify_signoffs(report_dir: Path, public_keys: list[str | Path]) -> tuple[int, list[str]]:
    """(valid sign-offs, problems): each must be signed by one of the given keys and bound to this lock."""
    from cryptography.exceptions import InvalidSignature

    keys = {key_fingerprint(k): k for k in (load_public_key(Path(p)) for p in public_keys)}
    lock_sha = sha256_file(report_dir / LOCK_FILE)
    valid, problems = 0, []
    signoffs = read_signoffs(report_dir)
    if not signoffs:
        return 0, ["the report carries no sign-off"]
    for index, data in enumerate(signoffs):
        try:
            signoff = SignOff(**{k: data[k] for k in SignOff.__dataclass_fields__})
        except (KeyError, TypeError):
            problems.append(f"sign-off {index} is malformed")
            continue
        who = f"sign-off {index} ({signoff.signer}, {signoff.meaning})"
        if signoff.lock_sha256 != lock_sha:
            problems.append(f"{who} is for another lock.json (the lock changed after signing)")
            continue
        key = keys.get(signoff.key_fingerprint)
        if key is None:
            problems.append(f"{who}: signed with key {signoff.key_fingerprint}, which is not among the given keys")
            continue
        try:
            key.verify(base64.b64decode(signoff.signature), canonical_json(signoff.statement()))
            valid += 1
        except (InvalidSignature, ValueError):
            problems.append(f"{who}: signature does not match its statement (edited)")
    return valid, problems
