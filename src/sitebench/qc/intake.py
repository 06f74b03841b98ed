"""Intake: DICOM C-STORE, DICOMweb STOW-RS upload and a watched folder, feeding the gate.

Order of work for every received file, whatever the way in:

1. its bytes are written content-addressed (``objects/ab/cd/<sha256>``, temp file,
   fsync, rename, fsync of the folder);
2. its integrity is checked (:func:`sitebench.qc.dicom_files.check_bytes`) and it is a
   row in the QC database, committed;
3. only then is the sender told it was received.

So a crash (even SIGKILL) loses nothing that was acknowledged, and a resend of the same
bytes is a no-op. A series is complete once no file of it has arrived for
``quiet_seconds``; a checker thread then runs the gate on it and records the verdict in
the database and the audit trail. Series still open at start-up (the service died
before checking them) are checked as soon as they are quiet.

Bad input never stops the service: every problem is stored, recorded and audited with a
one-line reason. A file larger than ``max_file_mb`` is refused (status A700 / HTTP 413)
and audited but not stored, so a sender cannot fill the disk.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable

import pydicom  # noqa: F401 - imported before the worker threads start: concurrent first imports deadlock
from pydantic import Field, field_validator

from sitebench.audit import AuditTrail, SqlAuditHead, create_audit_key, load_audit_key
from sitebench.config import StrictModel, load_yaml, parse_config
from sitebench.durable import fsync_dir, write_new_file
from sitebench.errors import SitebenchError
from sitebench.provenance import sha256_bytes, utc_now
from sitebench.qc import dicom_params  # noqa: F401 - same reason (check_bytes imports it lazily)
from sitebench.qc.access import Principal, UserStore
from sitebench.qc.dicom_files import FileCheck, check_bytes, check_path
from sitebench.qc.gate import Gate, Pseudonyms, SeriesOutcome
from sitebench.qc.notify import Alert, AlertRoutes, Notifier
from sitebench.qc.protocol import Protocol, load_protocol
from sitebench.qc.queries import QueryBook
from sitebench.qc.records import QCRecords, database_url

__all__ = ["IntakeConfig", "IntakeService", "ObjectStore", "Receipt", "load_intake_config", "open_audit_trail",
           "new_upload_token", "resolve_conflict", "serve"]

log = logging.getLogger("sitebench.qc.intake")
MB = 1024 * 1024
KEEP_IN_QUEUE_BYTES = 32 * MB  # larger files are read back from the store by the indexer
#: most queued files the indexer records in one database transaction
INDEX_BATCH = 64


# --------------------------------------------------------------------------- configuration
SiteName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class SiteConfig(StrictModel):
    #: calling AE titles of this site's scanners / PACS: an association from any other title is refused
    ae_titles: list[str] = Field(default_factory=list)
    #: SHA-256 (hex) of each bearer token this site uploads over STOW-RS with; the tokens themselves
    #: are never stored. A site without tokens cannot upload over HTTP.
    http_token_sha256: list[Sha256Hex] = Field(default_factory=list)
    #: addresses (IP or CIDR, e.g. 10.2.0.0/16) this site's DICOM associations may come from; empty: any.
    #: A calling AE title is only a name the sender chooses; the peer address is checked with it.
    dicom_peers: list[str] = Field(default_factory=list)

    @field_validator("dicom_peers")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for peer in value:
            try:
                ipaddress.ip_network(peer, strict=False)
            except ValueError:
                raise ValueError(f"{peer!r} is not an IP address or network") from None
        return value


class DicomTls(StrictModel):
    """TLS for DICOM (PS3.15 B.1, the TLS secure transport connection profile), with client certificates:
    a site's sender must present a certificate signed by ``client_ca``."""
    certificate: Path
    private_key: Path
    client_ca: Path
    require_client_certificate: bool = True


class DicomListener(StrictModel):
    host: str = "0.0.0.0"
    port: int = 11112
    ae_title: str = "SITEBENCH"
    #: concurrent associations; more are refused (A-ASSOCIATE-RJ), so one site cannot take every slot
    max_associations: int = Field(default=16, ge=1)
    #: seconds an idle connection (a bare TCP connect, a stalled sender) is kept before it is dropped
    network_timeout: float = Field(default=10.0, gt=0)
    #: seconds to wait for an association request / release (ACSE) and a DIMSE message
    acse_timeout: float = Field(default=10.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    tls: DicomTls | None = None


class HttpListener(StrictModel):
    host: str = "127.0.0.1"
    port: int = 8042
    #: parts one STOW-RS request may hold; a request with more is refused (413) after the limit
    max_parts: int = Field(default=2000, ge=1)
    #: requests per minute per site (token bucket); more are answered 429 with Retry-After
    max_requests_per_minute: float = Field(default=600.0, gt=0)
    #: serve /openapi.json and the docs (off: the schema describes the attack surface)
    openapi: bool = False


class IntakeConfig(StrictModel):
    store: Path
    database: str | None = None
    protocols: Path
    sites: dict[SiteName, SiteConfig]
    dicom: DicomListener | None = Field(default_factory=DicomListener)
    http: HttpListener | None = Field(default_factory=HttpListener)
    folder: Path | None = None
    #: the trial's secret that MAC-chains the audit trail (RFC 2104 HMAC-SHA256); keep it outside the store.
    #: Default ``<store>/audit.key``, made on first start. `sitebench audit new-key FILE` makes one.
    audit_key_file: Path | None = None
    #: the trial's secret for keyed UID and scanner pseudonyms (HMAC-SHA256, 32 random bytes as hex).
    #: Default ``<store>/pseudonym.key``, made on a new store's first start; keep a copy outside the store.
    pseudonym_key_file: Path | None = None
    quiet_seconds: float = 5.0
    #: a quiet series known to be incomplete waits this long after its last file before it gets a verdict
    incomplete_wait_seconds: float = Field(default=900.0, ge=0)
    #: failed attempts at indexing a file or checking a series before it is quarantined (retries back off)
    max_attempts: int = Field(default=3, ge=1)
    image_quality: bool = True
    #: alert routes per site and role (email over SMTP, signed webhooks): sitebench.qc.notify
    alerts: AlertRoutes | None = None
    #: the expected visits, a CSV of site, subject, visit, window_start, window_end (sitebench.qc.visits)
    visit_schedule: Path | None = None
    max_file_mb: float = 2048.0
    who: str = Field(default_factory=lambda: f"sitebench-gate@{socket.gethostname()}")


def load_intake_config(path: str | Path) -> IntakeConfig:
    """Read the intake YAML; relative paths are relative to the file."""
    path = Path(path)
    config = parse_config(load_yaml(path), IntakeConfig, path)
    base = path.resolve().parent
    updates: dict[str, Any] = {"store": base / config.store, "protocols": base / config.protocols}
    if config.folder is not None:
        updates["folder"] = base / config.folder
    if config.audit_key_file is not None:
        updates["audit_key_file"] = base / config.audit_key_file
    if config.pseudonym_key_file is not None:
        updates["pseudonym_key_file"] = base / config.pseudonym_key_file
    if config.visit_schedule is not None:
        updates["visit_schedule"] = base / config.visit_schedule
    if config.dicom is not None and config.dicom.tls is not None:
        tls = config.dicom.tls
        updates["dicom"] = config.dicom.model_copy(update={"tls": tls.model_copy(update={
            "certificate": base / tls.certificate, "private_key": base / tls.private_key,
            "client_ca": base / tls.client_ca})})
    return config.model_copy(update=updates)


def open_audit_trail(config: IntakeConfig) -> AuditTrail:
    """The store's audit trail (``<store>/audit.jsonl``), MAC-chained with the trial's key, its head in the database.

    The key is ``audit_key_file``; when none is configured, ``<store>/audit.key`` (made, 0600,
    on first use). A key outside the store (another mount, a secrets volume) means that whoever
    can write the store still cannot forge records; the head kept in the QC database means that
    removing the last records or re-chaining the file is caught by ``sitebench audit verify``.
    """
    key_file = config.audit_key_file or Path(config.store) / "audit.key"
    if config.audit_key_file is None and not key_file.exists():
        Path(config.store).mkdir(mode=0o700, parents=True, exist_ok=True)
        create_audit_key(key_file)
    return AuditTrail(Path(config.store) / "audit.jsonl", key=load_audit_key(key_file),
                      head=SqlAuditHead(database_url(config.store, config.database)))


def open_pseudonyms(config: IntakeConfig, records: QCRecords) -> Pseudonyms:
    """The store's pseudonym scheme: keyed (HMAC-SHA256, :class:`Pseudonyms`) with the trial's
    secret ``pseudonym_key_file`` (default ``<store>/pseudonym.key``, made 0600 on a new store's first
    start), or, for a store that already held records under the unkeyed SHA-256 scheme, that scheme
    still, so its series keep their keys (the scheme is recorded in the database either way)."""
    state = records.load_state("pseudonyms") or {}
    key_file = config.pseudonym_key_file or Path(config.store) / "pseudonym.key"
    scheme = state.get("scheme")
    if scheme is None:
        scheme = "sha256" if records.file_count() else "hmac-sha256"
        records.save_state("pseudonyms", {"scheme": scheme, "since_utc": utc_now()})
    if scheme == "sha256":
        return Pseudonyms(None)
    if not key_file.exists():
        if config.pseudonym_key_file is not None or records.file_count():
            raise SitebenchError("the pseudonym key is missing: series keys cannot be made without it", key_file)
        Path(config.store).mkdir(mode=0o700, parents=True, exist_ok=True)
        write_new_file(key_file, secrets.token_bytes(32).hex().encode() + b"\n", mode=0o600)
    try:
        key = bytes.fromhex(key_file.read_text().strip())
    except (OSError, ValueError) as exc:
        raise SitebenchError(f"unreadable pseudonym key ({exc})", key_file) from None
    if len(key) < 16:
        raise SitebenchError("pseudonym key shorter than 128 bits", key_file)
    return Pseudonyms(key)


def load_locked_protocols(folder: Path) -> list[Protocol]:
    """Every locked protocol YAML in a folder (a draft there is an error: the gate checks locked ones only)."""
    if not folder.is_dir():
        raise SitebenchError("protocol folder not found", folder)
    protocols = [load_protocol(p) for p in sorted(folder.glob("*.y*ml"))]
    if not protocols:
        raise SitebenchError("no protocol YAML files in the protocol folder", folder)
    return protocols


# --------------------------------------------------------------------------- content-addressed store
class ObjectStore:
    """Files named by their SHA-256 under ``root/objects/<site>``; writes are atomic and durable.

    The site in the path lets :meth:`IntakeService.recover` re-record an object whose
    database row was lost (power loss after the ack), with the right site. Files are
    0600 and folders 0700: the store holds identifiable images.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "objects" / "tmp"
        for folder in (self.root, self.objects, self.tmp):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(folder, 0o700)
        self._folders: set[Path] = set()  # object folders known to exist

    def target(self, sha: str, site: str) -> tuple[Path, str]:
        rel = Path("objects") / site / sha[:2] / sha
        return self.root / rel, str(rel)

    def new_tmp(self) -> Path:
        """A fresh path under ``objects/tmp`` for a caller that streams a file to disk (created 0600)."""
        path = self.tmp / uuid.uuid4().hex
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return path

    def put(self, data: bytes, site: str) -> tuple[str, str]:
        """Store bytes; returns (sha256, path relative to the store root). Idempotent.

        Returns only once the file and its folder entry are on disk (fsync of both). Few system
        calls: on a busy gate each one that blocks gives up the GIL, and getting it back waits
        for whichever thread holds it, so every call saved here shortens each C-STORE's reply.
        """
        sha = sha256_bytes(data)
        target, rel = self.target(sha, site)
        try:
            if os.stat(target).st_size == len(data):
                return sha, rel
        except FileNotFoundError:
            pass
        tmp = self.tmp / uuid.uuid4().hex
        write_new_file(tmp, data)  # 0600 from the start: no chmod
        self._place(tmp, target, chmod=False)
        return sha, rel

    def put_file(self, tmp: Path, site: str, sha: str | None = None) -> tuple[str, str, int]:
        """Move a fully written file from ``objects/tmp`` into place; returns (sha256, rel, size).

        The caller wrote (and closed) ``tmp``; it is fsync'd here. ``sha`` is its SHA-256 when the
        caller hashed it while streaming (saves a second read).
        """
        tmp = Path(tmp)
        if sha is None:
            from sitebench.provenance import sha256_file

            sha = sha256_file(tmp)
        size = tmp.stat().st_size
        target, rel = self.target(sha, site)
        if target.exists() and target.stat().st_size == size:
            tmp.unlink()
            return sha, rel, size
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        self._place(tmp, target)
        return sha, rel, size

    def _place(self, tmp: Path, target: Path, chmod: bool = True) -> None:
        folder = target.parent
        if chmod:
            os.chmod(tmp, 0o600)
        if folder not in self._folders:  # made once per process, not looked up per file
            self._make_folder(folder)
        try:
            os.replace(tmp, target)
        except FileNotFoundError:  # the folder went away under us (removed by hand): make it again
            if not tmp.exists():
                raise
            self._folders.discard(folder)
            self._make_folder(folder)
            os.replace(tmp, target)
        fsync_dir(folder)

    def _make_folder(self, folder: Path) -> None:
        for made in (folder.parent, folder):
            if not made.exists():
                made.mkdir(mode=0o700, exist_ok=True)
                fsync_dir(made.parent)  # the new folder's own entry is durable too
        self._folders.add(folder)

    def clean_tmp(self) -> int:
        """Remove temporary files left by transfers that died mid-file (nothing acknowledged is in tmp)."""
        removed = 0
        for path in self.tmp.iterdir():
            if path.is_file() or path.is_symlink():
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def path(self, rel: str) -> Path:
        return self.root / rel


# --------------------------------------------------------------------------- the service
@dataclass
class Receipt:
    """What intake did with one file.

    ``status``: ``stored`` (new and usable so far), ``duplicate`` (these exact bytes were
    stored before; ``problems`` are what was found then), ``quarantined`` (kept, but it
    cannot be used: ``problems`` say why), ``conflict`` (an instance already received with
    other bytes, or owned by another site: both copies are kept and audited), ``refused``
    (not stored: over a limit). ``status`` is final only when the file was parsed on
    receipt (``parse_now``); otherwise a new file is ``stored`` until the indexer has read it.
    """

    sha256: str
    new: bool
    series_key: str | None
    problems: list[str] = field(default_factory=list)
    status: str = "stored"

    @property
    def usable(self) -> bool:
        return self.status in ("stored", "duplicate") and not self.problems


@dataclass
class _Transfer:
    site: str
    source: str
    sender: str
    files: int = 0
    new_files: int = 0
    bytes: int = 0
    series: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


class IntakeService:
    """Stores, records and checks incoming files; the listeners are thin adapters onto :meth:`receive`."""

    def __init__(self, config: IntakeConfig) -> None:
        self.config = config
        self.store = ObjectStore(config.store)
        self.records = QCRecords(database_url(config.store, config.database))
        self.audit = open_audit_trail(config)
        self.users = UserStore(self.records)
        self.pseudonyms = open_pseudonyms(config, self.records)
        self.queries = QueryBook(self.records, self.audit, config.who)
        self.notifier = Notifier(config.alerts)
        self._minute_checks_at = 0.0
        if config.visit_schedule is not None:  # a bad schedule is one line at start, not a loop of errors
            from sitebench.qc.visits import load_schedule

            load_schedule(config.visit_schedule)
        #: routes added to the HTTP listener by higher rooms (the dashboard), set before start()
        self.http_extensions: list[Any] = []
        #: checks of higher rooms run by the checker thread once a minute, each given the service (the
        #: re-validation alert, which needs the reports); one failing never stops the others
        self.periodic_checks: list[Callable[["IntakeService"], Any]] = []
        self.protocols = load_locked_protocols(config.protocols)
        self.gate = Gate(self.protocols, image_quality=config.image_quality, pseudonyms=self.pseudonyms,
                         drift_state=self.records.load_state("drift"),
                         history_state=self.records.load_state("image_quality_history"))
        self.ae_sites = {ae.strip(): site for site, cfg in config.sites.items() for ae in cfg.ae_titles}
        self._transfers: dict[str, _Transfer] = {}
        self._queued: set[str] = set()  # files queued for the indexer (not queued twice by a retry sweep)
        self._pending: queue.Queue = queue.Queue()
        self._indexer_thread = threading.Thread(target=self._indexer, name="qc-indexer", daemon=True)
        self._indexer_thread.start()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._servers: list[Any] = []

    # ------------------------------------------------------------------ receiving
    def begin_transfer(self, site: str, source: str, sender: str) -> str:
        """Open a transfer (an association, an upload, a folder batch); recorded, so a crash mid-way is audited."""
        transfer = f"{source}-{uuid.uuid4().hex[:12]}"
        self.records.begin_transfer(transfer, site, source, sender)
        with self._lock:
            self._transfers[transfer] = _Transfer(site=site, source=source, sender=sender)
        return transfer

    def receive(self, data: bytes, transfer: str, parse_now: bool = False) -> Receipt:
        """Store and record one file of a transfer; its header is parsed and checked after that.

        The sender may be told "received" as soon as this returns: the bytes are fsync'd and
        their row committed. Parsing happens on the indexer thread (``parse_now`` does it here,
        for senders that expect per-file problems in their reply, like STOW-RS).
        """
        info = self._transfers[transfer]
        sha, rel = self.store.put(data, info.site)
        return self._received(sha, rel, len(data), data, transfer, parse_now)

    def receive_path(self, tmp: Path, transfer: str, parse_now: bool = False, sha256: str | None = None) -> Receipt:
        """:meth:`receive` for a file a listener streamed to :meth:`ObjectStore.new_tmp` (moved into the store).

        Nothing of it is held in memory but its header while it is parsed.
        """
        info = self._transfers[transfer]
        sha, rel, size = self.store.put_file(Path(tmp), info.site, sha256)
        return self._received(sha, rel, size, None, transfer, parse_now)

    def _received(self, sha: str, rel: str, size: int, data: bytes | None, transfer: str,
                  parse_now: bool) -> Receipt:
        info = self._transfers[transfer]
        new = self.records.record_received(sha256=sha, size=size, stored_path=rel, site=info.site,
                                           source=info.source, transfer=transfer)
        with self._lock:
            info.files += 1
            info.new_files += int(new)
            info.bytes += size
        if not new:
            return self._known_receipt(sha)
        if parse_now:
            return self._index(sha, rel, data, info.site, transfer)
        keep = data if data is not None and size <= KEEP_IN_QUEUE_BYTES else None
        with self._lock:
            self._queued.add(sha)
        self._pending.put((sha, rel, keep, info.site, transfer))
        return Receipt(sha256=sha, new=True, series_key=None)

    def _known_receipt(self, sha: str) -> Receipt:
        """The receipt of bytes stored before: what was found then (a resent bad file is still bad)."""
        state = self.records.file_state(sha) or {}
        if not state.get("indexed", True):
            return Receipt(sha256=sha, new=False, series_key=None, status="duplicate")
        if state.get("quarantine"):
            return Receipt(sha, False, None, [state["quarantine"]], "quarantined")
        status = "conflict" if state.get("conflict") else "duplicate"
        return Receipt(sha, False, state.get("series_key"), list(state.get("problems") or []), status)

    def _index(self, sha: str, rel: str, data: bytes | None, site: str, transfer: str) -> Receipt:
        """Parse and check one recorded file's header; record what it says.

        Any failure here (a parser bug on hostile bytes, a database error) is counted
        against the file with bounded, backed-off retries (:meth:`QCRecords.index_failed`);
        after the last one the file is quarantined with a one-line, audited reason. A file
        never holds up any other file or series.
        """
        try:
            check, size = self._parse(rel, data)
            fields = _index_fields(sha, site, check, self.pseudonyms)
            result = self.records.record_index(**fields)
        except Exception as exc:  # noqa: BLE001 - one file's failure is that file's problem, never the service's
            return self._index_failed(sha, rel, site, transfer, exc)
        return self._indexed(sha, rel, site, transfer, size, check, fields["series_key"], result)

    def _parse(self, rel: str, data: bytes | None) -> tuple[FileCheck, int]:
        """(header check, size) of one stored file: from the bytes kept in the queue, else its stored object."""
        # a file not kept in memory is mapped, not read: a 1 GiB upload costs its header, not 1 GiB
        if data is None:  # a lost or unreadable stored object is the store's failure: retried, then quarantined
            size = self.store.path(rel).stat().st_size
            return check_path(self.store.path(rel)), size
        return check_bytes(data), len(data)

    def _index_failed(self, sha: str, rel: str, site: str, transfer: str, exc: BaseException) -> Receipt:
        reason = f"could not be indexed: {type(exc).__name__}"
        _log_bug(self.store.root, f"indexing file {sha[:12]}", exc)
        if self.records.index_failed(sha, reason, max_attempts=self.config.max_attempts):
            self.audit.append(who=self.config.who, what="file quarantined", why=reason, subject=f"file {sha}",
                              details={"site": site, "transfer": transfer, "stored": rel})
            log.error("file %s quarantined: %s", sha[:12], reason)
            return Receipt(sha, True, None, [reason], "quarantined")
        return Receipt(sha, True, None, [reason], "stored")

    def _index_batch(self, items: list[tuple]) -> None:
        """Index queued files (``(sha, rel, data, site, transfer)``) with one database transaction for all of them.

        Each file is parsed on its own (a parse that raises sends that file down the one-file
        path, with its retries and quarantine); the parsed ones are recorded together
        (:meth:`QCRecords.record_index_many`). When that transaction fails, nothing of it is
        kept and every file is indexed alone, so one bad file never holds up another.
        """
        parsed, alone = [], []
        for item in items:
            sha, rel, data, site, transfer = item
            try:
                check, size = self._parse(rel, data)
                parsed.append((item, check, size, _index_fields(sha, site, check, self.pseudonyms)))
            except Exception:  # noqa: BLE001 - indexed alone below: retried, then quarantined
                alone.append(item)
        try:
            results = self.records.record_index_many([fields for _, _, _, fields in parsed])
        except Exception:  # noqa: BLE001 - one by one instead: the file at fault fails alone
            alone = [item for item, _, _, _ in parsed] + alone
        else:
            for ((sha, rel, _, site, transfer), check, size, fields), result in zip(parsed, results):
                try:
                    self._indexed(sha, rel, site, transfer, size, check, fields["series_key"], result)
                except Exception as exc:  # noqa: BLE001 - recorded; an audit append failed (logged)
                    _log_bug(self.store.root, f"auditing indexed file {sha[:12]}", exc)
        for item in alone:
            self._index(*item)

    def _indexed(self, sha: str, rel: str, site: str, transfer: str, size: int, check: FileCheck,
                 series_key: str | None, result) -> Receipt:
        """What a recorded index means: the transfer's tally, the audit records, the receipt."""
        with self._lock:
            info = self._transfers.get(transfer)
            if info is not None:
                if series_key:
                    info.series.add(series_key)
                info.problems += [f"{sha[:12]}: {p}" for p in check.problems]
                if result.reason:
                    info.problems.append(f"{sha[:12]}: {result.reason}")
        details = {"site": site, "transfer": transfer, "size": size, "stored": rel}
        if result.status == "quarantined":
            self.audit.append(who=self.config.who, what="file quarantined", why=result.reason, subject=f"file {sha}",
                              details=details)
            return Receipt(sha, True, None, [result.reason], "quarantined")
        if result.status == "conflict":
            self.audit.append(who=self.config.who, what="instance conflict", why=result.reason,
                              subject=f"series {series_key}",
                              details={**details, "file": sha, "other_copy": result.conflict_with})
            return Receipt(sha, True, series_key, check.problems + [result.reason], "conflict")
        for old in result.replaced:
            self.audit.append(who=self.config.who, what="instance replaced", subject=f"series {series_key}",
                              why="a clean resend replaces a damaged copy of the same instance",
                              details={**details, "file": sha, "replaced": old})
        if result.status == "superseded":
            self.audit.append(who=self.config.who, what="file not used", why=result.reason,
                              subject=f"series {series_key}", details={**details, "file": sha,
                                                                       "kept": result.superseded_by})
            return Receipt(sha, True, series_key, check.problems + [result.reason], "quarantined")
        if series_key is None:
            self.audit.append(who=self.config.who, what="file rejected", why="; ".join(check.problems),
                              subject=f"file {sha}", details={**details, "problems": check.problems})
            return Receipt(sha, True, None, check.problems, "quarantined")
        return Receipt(sha256=sha, new=True, series_key=series_key, problems=check.problems)

    def _indexer(self) -> None:
        """Index queued files in order, a batch at a time: whatever is queued when the indexer gets to it
        (up to :data:`INDEX_BATCH`, and never past a transfer's end, which is audited after its files)."""
        while True:
            batch = [self._pending.get()]
            while _is_file(batch[-1]) and len(batch) < INDEX_BATCH:
                try:
                    batch.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            files = [item for item in batch if _is_file(item)]
            last = batch[-1]
            try:
                if files:
                    try:
                        self._index_batch(files)
                    except Exception as exc:  # noqa: BLE001 - _index handles its own; a bug here is logged
                        _log_bug(self.store.root, "indexer", exc)
                        log.error("indexer: %s (the files stay recorded and are retried)", type(exc).__name__)
                    finally:
                        with self._lock:
                            self._queued.difference_update(item[0] for item in files)
                if last is None:  # stop: everything queued before it is done
                    return
                if not _is_file(last):
                    self._audit_transfer(*last[1:])
            except Exception as exc:  # noqa: BLE001 - auditing the transfer failed
                _log_bug(self.store.root, "indexer", exc)
                log.error("indexer: %s (auditing a transfer)", type(exc).__name__)
            finally:
                for _ in batch:
                    self._pending.task_done()

    def _requeue_due(self) -> None:
        """Queue files whose indexing failed and whose backed-off retry time has come."""
        for sha, rel, site, transfer in self.records.unindexed(due_only=True, failed_only=True):
            with self._lock:
                if sha in self._queued:
                    continue
                self._queued.add(sha)
            self._pending.put((sha, rel, None, site, transfer))

    def refuse(self, transfer: str, size: int, why: str) -> None:
        """A file not stored (too large): audited, and counted against the transfer."""
        info = self._transfers[transfer]
        with self._lock:
            info.problems.append(why)
        self.audit.append(who=self.config.who, what="file refused", why=why, subject=f"transfer {transfer}",
                          details={"site": info.site, "source": info.source, "sender": info.sender,
                                   "size": size, "max_bytes": self.max_file_bytes})

    @property
    def max_file_bytes(self) -> int:
        return int(self.config.max_file_mb * MB)

    def end_transfer(self, transfer: str, how: str = "completed") -> None:
        """Audit the transfer once the indexer has parsed all its files (queued behind them)."""
        self._pending.put(("end", transfer, how))

    def _audit_transfer(self, transfer: str, how: str) -> None:
        with self._lock:
            info = self._transfers.pop(transfer, None)
        if info is None:
            return
        self.records.end_transfer(transfer, how)
        self.audit.append(
            who=self.config.who, what="transfer received", why=how, subject=f"transfer {transfer}",
            details={"site": info.site, "source": info.source, "sender": info.sender, "files": info.files,
                     "new_files": info.new_files, "duplicate_files": info.files - info.new_files,
                     "bytes": info.bytes, "series": sorted(info.series), "problems": info.problems[:50]})

    def peer_allowed(self, site: str, address: str) -> bool:
        """Whether a DICOM association of ``site`` may come from ``address`` (its ``dicom_peers``)."""
        import ipaddress

        peers = self.config.sites[site].dicom_peers if site in self.config.sites else []
        if not peers:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(p, strict=False) for p in peers)

    def refuse_access(self, who: "Principal | None", attempted: str, address: str, why: str) -> None:
        """Audit a refused request: who (never the token), what they tried, from where."""
        self.audit.append(who=self.config.who, what="access refused", why=why, subject=attempted,
                          details={"user": who.name if who else None, "role": who.role if who else None,
                                   "user_site": who.site if who else None, "address": address})

    def reject_association(self, sender: str, why: str) -> None:
        self.audit.append(who=self.config.who, what="association rejected", why=why,
                          subject=f"calling AE {sender}", details={"calling_ae_title": sender})

    # ------------------------------------------------------------------ checking
    def check_complete(self, now: float | None = None) -> list[SeriesOutcome]:
        """Run the gate on every series that has been quiet for ``quiet_seconds`` and is not known incomplete.

        A series known to be incomplete (fewer instances than NumberOfSeriesRelatedInstances
        or its protocol says, or a hole in its slice positions) waits, for at most
        ``incomplete_wait_seconds`` after its last file, rather than failing: a resend after a
        pause joins it and it gets one verdict. A series whose check raises is retried with
        backoff and then quarantined; no series holds up another.
        """
        now = time.time() if now is None else now
        outcomes = []
        for series_key, site in self.records.quiet_series(self.config.quiet_seconds, now):
            try:
                outcome = self._check_one(series_key, site, now)
            except Exception as exc:  # noqa: BLE001 - one series' failure is that series' problem
                reason = (str(exc) if isinstance(exc, SitebenchError)
                          else f"the check failed: {type(exc).__name__}")
                if not isinstance(exc, SitebenchError):
                    _log_bug(self.store.root, f"checking series {series_key}", exc)
                if self.records.check_failed(series_key, reason, max_attempts=self.config.max_attempts):
                    self.audit.append(who=self.config.who, what="series not checked", why=reason,
                                      subject=f"series {series_key}", details={"site": site})
                    log.error("series %s not checked: %s", series_key, reason)
                continue
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    def _check_one(self, series_key: str, site: str, now: float) -> SeriesOutcome | None:
        files = self.records.series_files(series_key)
        summaries = [summary for _, _, summary in files if summary is not None]
        waiting = self._incomplete(summaries, now, series_key)
        if waiting:
            self.records.wait(series_key, waiting)
            return None
        paths = [self.store.path(rel) for rel, _, _ in files]
        checks = [FileCheck(series_uid="(stored)", problems=problems, summary=summary)
                  for _, problems, summary in files]
        quarantined = self.records.series_quarantined_files(series_key)
        if quarantined:
            checks.append(FileCheck(series_uid="(stored)", problems=quarantined, summary=None))
            paths.append(Path("(quarantined)"))
        if not summaries:  # no file of it has a readable header: nothing to check, the site re-sends
            outcome = _unreadable_series(series_key, site, checks)
        else:
            (outcome,) = self.gate.check_received(paths, checks, site)
        if outcome.series_key != series_key:  # a file's header disagrees with its intake record
            outcome.file_problems.append("file's SeriesInstanceUID changed between intake and check")
            outcome.series_key = series_key  # the verdict closes the series intake opened
        self._record(outcome)  # verdict and closing the series: one transaction
        return outcome

    def _incomplete(self, summaries: list[dict], now: float, series_key: str) -> str | None:
        """Why a quiet series should still wait, or None (complete, unknown, or waited long enough)."""
        from sitebench.qc.gate import series_completeness

        last = self.records.series_last_received(series_key)
        if last is not None and now - last > self.config.incomplete_wait_seconds:
            return None
        completeness = series_completeness(summaries)
        if completeness.complete is False:
            return completeness.why
        if completeness.complete is None:
            expected = self.gate.expected_instances(summaries)
            if expected is not None and len(summaries) < expected:
                return f"{len(summaries)} of the {expected} instances its protocol expects have arrived"
        return None

    def _record(self, outcome: SeriesOutcome) -> None:
        last = self.records.series_last_received(outcome.series_key)
        if last is not None:  # the dashboard's "time from upload to verdict": last file in to verdict out
            outcome.seconds["upload_to_verdict"] = max(0.0, time.time() - last)
        verdict_id = self.records.record_outcome(outcome)
        self.records.save_state("drift", self.gate.drift.state)
        self.records.save_state("image_quality_history", self.gate.history.state)
        details = outcome.to_dict()
        details.pop("checked_utc", None)
        self.audit.append(who=self.config.who, what="verdict", why=_why(outcome),
                          subject=f"series {outcome.series_key}", details=details)
        for event in outcome.drift:
            self.audit.append(who=self.config.who, what="drift", subject=f"series {outcome.series_key}",
                              why=f"{event.kind} {event.parameter} {event.change} against the qualified baseline",
                              details=event.to_dict())
        # after the verdict is on record: a failure drafts a query to its site, a passing re-scan closes one
        self.queries.draft_for_failure(verdict_id, outcome)
        self.queries.link_rescan(outcome)
        self.send_alerts(_alerts_for(outcome))
        if outcome.drift:  # a change may need re-validation: run the once-a-minute checks on the next pass
            self._minute_checks_at = 0.0
        log.info("%s", outcome.summary().splitlines()[0])

    def send_alerts(self, alerts: list[Alert]) -> None:
        """Send alerts off the checking thread: a slow mail server never delays a verdict."""
        if alerts and self.config.alerts is not None and self.config.alerts.routes:
            threading.Thread(target=lambda: [self.notifier.send(a) for a in alerts], name="qc-alerts",
                             daemon=True).start()

    def visit_status(self, site: str | None = None, today=None) -> list[dict[str, Any]]:
        """The visit schedule against what arrived (:func:`sitebench.qc.visits.reconcile`); [] without one."""
        from sitebench.qc.visits import load_schedule, reconcile

        if self.config.visit_schedule is None:
            return []
        schedule = [v for v in load_schedule(self.config.visit_schedule) if site is None or v.site == site]
        return reconcile(schedule, self.records.latest_verdicts(site), self.pseudonyms, today)

    def alert_overdue_visits(self, today=None) -> int:
        """Alert each visit whose window closed with nothing received, once (remembered in the database)."""
        if self.config.visit_schedule is None or not (self.config.alerts and self.config.alerts.routes):
            return 0
        done = set((self.records.load_state("visits_alerted") or {}).get("keys", []))
        late = []
        for row in self.visit_status(today=today):
            if row["status"] != "overdue":
                continue
            subject_key = self.pseudonyms(row["subject"])
            key = f"{row['site']}|{subject_key}|{row['visit']}"
            if key not in done:
                late.append(Alert("visit_overdue", row["site"], f"visit {row['visit']} of a subject is "
                                  f"{row['days_overdue']} days past its window", {
                                      "subject_key": subject_key, "visit": row["visit"],
                                      "window_end": row["window_end"]}))
                done.add(key)
        if late:
            self.send_alerts(late)
            self.records.save_state("visits_alerted", {"keys": sorted(done)})
        return len(late)

    def alert_overdue_queries(self) -> int:
        """Alert each query waiting on its site past its due time, once."""
        late = self.queries.overdue_unalerted()
        self.send_alerts([Alert("query_overdue", q.site, f"query {q.id} on series {q.series_key[:12]} is past its "
                                f"deadline", {"query": q.id, "series_key": q.series_key, "due_utc": q.due_utc})
                          for q in late])
        for q in late:
            self.queries.mark_alerted(q.id)
        return len(late)

    def run_periodic_checks(self) -> None:
        for check in self.periodic_checks:
            try:
                check(self)
            except Exception as exc:  # noqa: BLE001 - one check failing never stops the gate or the others
                _log_bug(self.store.root, "periodic check", exc)
                log.error("periodic check %s failed: %s; will retry", getattr(check, "__name__", "?"),
                          type(exc).__name__)

    def _checker(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self._requeue_due()
                self.check_complete()
                self.alert_overdue_queries()
                if time.monotonic() - self._minute_checks_at > 60:  # the schedule changes by the day
                    self._minute_checks_at = time.monotonic()
                    self.alert_overdue_visits()
                    self.run_periodic_checks()
            except Exception as exc:  # noqa: BLE001 - the service keeps serving (a database outage, say)
                _log_bug(self.store.root, "checker", exc)
                log.error("gate check pass failed: %s; will retry", type(exc).__name__)

    # ------------------------------------------------------------------ running
    def recover(self, margin_seconds: float = 600.0) -> int:
        """Re-record stored objects that have no database row (lost commits after a power loss).

        Only objects written since shortly before the newest row are looked at, so start-up
        does not walk the whole store.
        """
        from datetime import datetime

        last = self.records.last_received_utc()
        since = 0.0 if last is None else datetime.fromisoformat(last).timestamp() - margin_seconds
        known = self.records.known_sha256()
        recovered = 0
        for site_dir in sorted(p for p in self.store.objects.iterdir() if p.is_dir() and p.name != "tmp"):
            for path in site_dir.glob("*/*"):
                if path.name in known or path.stat().st_mtime < since:
                    continue
                transfer = self.begin_transfer(site_dir.name, "recovered", "object store")
                self.receive(path.read_bytes(), transfer)
                self.end_transfer(transfer, "stored before a crash, database row lost: re-recorded")
                recovered += 1
        return recovered

    def start(self, check_interval: float = 0.5) -> None:
        """Start the configured listeners and the checker thread (returns at once)."""
        leftovers = self.store.clean_tmp()  # partial files of transfers cut off mid-file: never acknowledged
        for sha, rel, site, transfer in self.records.unindexed():  # recorded, not parsed, before a crash
            with self._lock:
                self._queued.add(sha)
            self._pending.put((sha, rel, None, site, transfer))
        for cut in self.records.interrupted_transfers():
            self.records.end_transfer(cut["transfer"], "interrupted")
            self.audit.append(who=self.config.who, what="transfer interrupted", subject=f"transfer {cut['transfer']}",
                              why=f"{'association aborted' if cut['source'] == 'dicom' else 'transfer cut off'} "
                                  f"when the service stopped, {cut['files']} files stored",
                              details={"site": cut["site"], "source": cut["source"], "sender": cut["sender"],
                                       "started_utc": cut["started_utc"], "files": cut["files"]})
        self.recover()
        pending = self.records.open_series()
        self.audit.append(who=self.config.who, what="intake started", why="service start",
                          details={"protocols": [f"{p.name} v{p.version}" for p in self.protocols],
                                   "sites": sorted(self.config.sites), "open_series_recovered": len(pending),
                                   "partial_files_removed": leftovers})
        if self.config.dicom is not None:
            from sitebench.qc.dicom_scp import start_storage_scp

            self._servers.append(start_storage_scp(self, self.config.dicom))
        if self.config.http is not None:
            from sitebench.qc.stow import start_http

            self._servers.append(start_http(self, self.config.http, self.http_extensions))
        if self.config.folder is not None:
            from sitebench.qc.watch import FolderWatcher

            watcher = FolderWatcher(self, Path(self.config.folder))
            self._threads.append(watcher.start(self._stop))
        checker = threading.Thread(target=self._checker, args=(check_interval,), name="qc-checker", daemon=True)
        checker.start()
        self._threads.append(checker)

    def stop(self) -> None:
        self._stop.set()
        for server in self._servers:
            server.shutdown()
        self._pending.put(None)  # after everything queued: the indexer finishes those, then exits
        self._indexer_thread.join(timeout=60)
        for thread in self._threads:
            thread.join(timeout=10)
        self.audit.append(who=self.config.who, what="intake stopped", why="service stop")


def new_upload_token() -> tuple[str, str]:
    """A new STOW-RS bearer token and its SHA-256 (hex): the site keeps the token, the config only the hash."""
    from sitebench.qc.access import new_token, token_digest

    token = new_token()
    return token, token_digest(token)


def manage_users(config: IntakeConfig, action: str, username: str | None = None, *, role: str | None = None,
                 site: str | None = None, who: str) -> dict[str, Any]:
    """``qc users add|rotate|disable|list``: the users who may sign in (:mod:`sitebench.qc.access`).

    ``add`` and ``rotate`` return the new token, shown once; every change is audited (the user, its
    role and site; never the token). Users may be made before the gate's first start."""
    Path(config.store).mkdir(mode=0o700, parents=True, exist_ok=True)
    records = QCRecords(database_url(config.store, config.database))
    users = UserStore(records)
    if action == "list":
        return {"users": users.list()}
    if not username:
        raise SitebenchError(f"qc users {action}: give the user name")
    if action == "add":
        token = users.create(username, role or "", site, sites=config.sites)
    elif action == "rotate":
        token = users.rotate(username)
    elif action == "disable":
        users.disable(username)
        token = None
    else:
        raise SitebenchError(f"qc users: unknown action {action!r} (add, rotate, disable, list)")
    principal = users.principal(username)
    details = {"user": username, "role": role if principal is None else principal.role,
               "site": site if principal is None else principal.site}
    open_audit_trail(config).append(who=who, what=f"user {action}", why=f"qc users {action}",
                                    subject=f"user {username}", details=details)
    return {**details, "token": token}


def work_query(config: IntakeConfig, token: str | None, action: str, query_id: int | None = None, *,
               kind: str | None = None, text: str = "", site: str | None = None) -> dict[str, Any]:
    """``qc queries list|show|open|answer|accept|send-back`` as the user holding ``token``
    (:mod:`sitebench.qc.queries`): each step checked against the user's role and site, and audited."""
    from sitebench.qc.access import AccessDenied, allowed

    records = QCRecords(database_url(config.store, config.database))
    who = UserStore(records).authenticate(token)
    if who is None:
        raise SitebenchError("no valid token: give --token or set SITEBENCH_TOKEN (see `qc users add`)")
    book = QueryBook(records, open_audit_trail(config), config.who)
    if action == "list":
        site = site or who.site  # a site's user lists their own site's; a monitor every site's
        may_see = allowed(who, "view_site", site) if site else allowed(who, "manage_query", None)
        if not may_see:
            raise AccessDenied(f"{who.describe()} may not see {'site ' + site if site else 'every site'}'s queries")
        return {"queries": [q.to_dict() for q in book.list(site=site)]}
    if query_id is None:
        raise SitebenchError(f"qc queries {action}: give the query number")
    if action == "show":
        query = book.get(query_id)
        if not allowed(who, "view_site", query.site):
            raise AccessDenied(f"{who.describe()} may not see queries of site {query.site}")
    elif action == "open":
        query = book.open(query_id, who, text)
    elif action == "answer":
        query = book.answer(query_id, who, kind or "", text)
    elif action == "accept":
        query = book.accept(query_id, who, text)
    elif action == "send-back":
        query = book.send_back(query_id, who, text)
    else:
        raise SitebenchError(f"qc queries: unknown action {action!r}")
    return query.to_dict()


def ensure_first_admin(service: "IntakeService") -> Path | None:
    """On the first start of a store with no users, make user ``admin`` and write its token, once,
    to ``<store>/first-admin-token`` (0600): the operator reads it, signs in, makes the real users,
    and deletes the file. Returns the file's path when it was made."""
    if service.users.count():
        return None
    token = service.users.create("admin", "admin")
    path = Path(service.config.store) / "first-admin-token"
    path.unlink(missing_ok=True)  # left by a store whose database was started afresh
    write_new_file(path, (token + "\n").encode(), mode=0o600)
    service.audit.append(who=service.config.who, what="user add", why="first start: no users yet",
                         subject="user admin", details={"user": "admin", "role": "admin", "site": None,
                                                        "token_file": path.name})
    return path


def resolve_conflict(config: IntakeConfig, keep: str, *, who: str, why: str) -> dict[str, Any]:
    """Keep one copy of an instance in conflict (``qc resolve``); audited, and its series is checked again."""
    records = QCRecords(database_url(config.store, config.database))
    result = records.resolve_conflict(keep)
    open_audit_trail(config).append(who=who, what="conflict resolved", why=why, subject=f"series {result['series_key']}",
                                    details=result)
    return result


def _unreadable_series(series_key: str, site: str, checks: list[FileCheck]) -> SeriesOutcome:
    """An undetermined verdict for a series none of whose files has a readable header (re-send it)."""
    from sitebench.qc.protocol import Deviation

    problems = sorted({p for c in checks for p in c.problems})
    deviations = [Deviation("FileIntegrity", "every file complete and readable", problem, "integrity", "fail",
                            "undetermined", "re-send the series") for problem in problems]
    return SeriesOutcome(series_key=series_key, site=site, status="undetermined",
                         n_files=sum(c.summary is not None or c.problems != [] for c in checks),
                         deviations=deviations, checks=deviations, file_problems=problems)


def _alerts_for(outcome: SeriesOutcome) -> list[Alert]:
    """The alerts one verdict raises: a failure, and each drift event (a software change is an upgrade)."""
    out = []
    key = outcome.series_key
    if outcome.status == "fail":
        failed = [d for d in outcome.deviations if d.status == "fail"]
        out.append(Alert("series_failed", outcome.site, f"series {key[:12]} failed "
                         f"{', '.join(d.parameter for d in failed) or 'its checks'}",
                         {"series_key": key, "protocol": outcome.protocol or "none matched",
                          **{f"deviation {i + 1}": f"{d.parameter}: expected {d.expected}, observed {d.observed} "
                             f"({d.rule})" for i, d in enumerate(failed[:10])}}))
    for e in outcome.drift:
        kind = "software_upgrade" if e.kind == "software" else "drift"
        out.append(Alert(kind, outcome.site, f"{e.parameter} {e.change} on scanner {e.scanner}",
                         {"series_key": key, "parameter": e.parameter, "baseline": str(e.baseline),
                          "observed": str(e.observed), "scanner": e.scanner}))
    return out


def _is_file(item: Any) -> bool:
    """Whether an indexer queue item is a file (not a transfer's end, not the stop marker)."""
    return item is not None and item[0] != "end"


def _index_fields(sha: str, site: str, check: FileCheck, key: Pseudonyms) -> dict[str, Any]:
    """:meth:`QCRecords.record_index`'s arguments for one parsed file."""
    instance = ((check.summary or {}).get("instance") or {}).get("InstanceNumber")
    return {"sha256": sha, "site": site, "series_key": key(check.series_uid) if check.series_uid else None,
            "study_key": key(check.study_uid) if check.study_uid else None,
            "sop_key": key(check.sop_uid) if check.sop_uid else None, "problems": check.problems,
            "header_summary": check.summary, "instance_number": _instance_number(instance)}


def _instance_number(value: Any) -> int | None:
    """InstanceNumber as the database keeps it: an IS is at most 12 characters (PS3.5 6.2), so a larger value is junk."""
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 2**31:
        return None
    return value


def _log_bug(store: Path, what: str, exc: BaseException) -> None:
    """Keep the traceback of an unexpected failure for developers, out of the service log.

    The service log gets one line; ``<store>/logs/errors.log`` (0600) gets the traceback,
    which names code, never tag values.
    """
    import traceback

    folder = Path(store) / "logs"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        path = folder / "errors.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as handle:
            handle.write(f"--- {utc_now()} {what}\n")
            handle.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=30)))
    except OSError:
        pass


def _why(outcome: SeriesOutcome) -> str:
    if outcome.status == "unmatched":
        return "no locked protocol's match rules select this series"
    if not outcome.deviations:
        return f"all checks of {outcome.protocol} v{outcome.protocol_version} passed"
    return "; ".join(d.line() for d in outcome.deviations[:10])


def freeze_startup_objects() -> None:
    """Move what the process holds once started (modules, dictionaries, the app) out of the garbage
    collector's sight (``gc.freeze``, Python 3.7+): they live as long as the server, and a full
    collection walking them cost each tenth dashboard request about 100 ms with 5,000 series."""
    import gc

    gc.collect()
    gc.freeze()


def serve(config: IntakeConfig, ready: threading.Event | None = None, http_extensions: list[Any] | None = None,
          periodic_checks: list[Callable[[IntakeService], Any]] | None = None) -> None:
    """Run the intake service until SIGINT / SIGTERM; ``http_extensions`` add routes (the dashboard),
    ``periodic_checks`` run once a minute (the re-validation alert)."""
    import signal

    service = IntakeService(config)
    service.http_extensions = list(http_extensions or [])
    service.periodic_checks = list(periodic_checks or [])
    service.start()
    freeze_startup_objects()
    first_admin = ensure_first_admin(service)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    listening = []
    if config.dicom:
        listening.append(f"DICOM {config.dicom.ae_title}@{config.dicom.host}:{config.dicom.port}")
    if config.http:
        listening.append(f"STOW-RS http://{config.http.host}:{config.http.port}/dicomweb/{{site}}/studies")
        if service.http_extensions:
            listening.append(f"dashboard http://{config.http.host}:{config.http.port}/")
    if config.folder:
        listening.append(f"folder {config.folder}/{{site}}/")
    event = {"event": "listening", "on": listening, "store": str(config.store)}
    if first_admin is not None:
        event["first_admin_token_file"] = str(first_admin)  # read it, sign in, make users, delete it
    print(json.dumps(event), flush=True)
    if ready is not None:
        ready.set()
    done.wait()
    service.stop()
