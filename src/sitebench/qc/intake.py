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
import socket
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import pydicom  # noqa: F401 - imported before the worker threads start: concurrent first imports deadlock
from pydantic import Field

from sitebench.audit import AuditTrail
from sitebench.config import StrictModel, load_yaml, parse_config
from sitebench.durable import fsync_dir
from sitebench.errors import SitebenchError
from sitebench.provenance import sha256_bytes
from sitebench.qc import dicom_params  # noqa: F401 - same reason (check_bytes imports it lazily)
from sitebench.qc.dicom_files import FileCheck, check_bytes
from sitebench.qc.gate import Gate, SeriesOutcome, uid_key
from sitebench.qc.protocol import Protocol, load_protocol
from sitebench.qc.records import QCRecords, database_url

__all__ = ["IntakeConfig", "IntakeService", "ObjectStore", "Receipt", "load_intake_config", "serve"]

log = logging.getLogger("sitebench.qc.intake")
MB = 1024 * 1024
KEEP_IN_QUEUE_BYTES = 32 * MB  # larger files are read back from the store by the indexer


# --------------------------------------------------------------------------- configuration
SiteName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class SiteConfig(StrictModel):
    #: calling AE titles of this site's scanners / PACS: an association from any other title is refused
    ae_titles: list[str] = Field(default_factory=list)


class DicomListener(StrictModel):
    host: str = "0.0.0.0"
    port: int = 11112
    ae_title: str = "SITEBENCH"


class HttpListener(StrictModel):
    host: str = "127.0.0.1"
    port: int = 8042


class IntakeConfig(StrictModel):
    store: Path
    database: str | None = None
    protocols: Path
    sites: dict[SiteName, SiteConfig]
    dicom: DicomListener | None = Field(default_factory=DicomListener)
    http: HttpListener | None = Field(default_factory=HttpListener)
    folder: Path | None = None
    quiet_seconds: float = 5.0
    image_quality: bool = True
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
    return config.model_copy(update=updates)


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
    database row was lost (power loss after the ack), with the right site.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "objects" / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes, site: str) -> tuple[str, str]:
        """Store bytes; returns (sha256, path relative to the store root). Idempotent."""
        sha = sha256_bytes(data)
        rel = Path("objects") / site / sha[:2] / sha
        target = self.root / rel
        if target.exists() and target.stat().st_size == len(data):
            return sha, str(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{sha}.{uuid.uuid4().hex}"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
        return sha, str(rel)

    def path(self, rel: str) -> Path:
        return self.root / rel


# --------------------------------------------------------------------------- the service
@dataclass
class Receipt:
    """What intake did with one file."""

    sha256: str
    new: bool
    series_key: str | None
    problems: list[str] = field(default_factory=list)


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
        self.audit = AuditTrail(Path(config.store) / "audit.jsonl")
        self.protocols = load_locked_protocols(config.protocols)
        self.gate = Gate(self.protocols, image_quality=config.image_quality,
                         drift_state=self.records.load_state("drift"),
                         history_state=self.records.load_state("image_quality_history"))
        self.ae_sites = {ae.strip(): site for site, cfg in config.sites.items() for ae in cfg.ae_titles}
        self._transfers: dict[str, _Transfer] = {}
        self._pending: queue.Queue = queue.Queue()
        self._indexer_thread = threading.Thread(target=self._indexer, name="qc-indexer", daemon=True)
        self._indexer_thread.start()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._servers: list[Any] = []

    # ------------------------------------------------------------------ receiving
    def begin_transfer(self, site: str, source: str, sender: str) -> str:
        transfer = f"{source}-{uuid.uuid4().hex[:12]}"
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
        new = self.records.record_received(sha256=sha, size=len(data), stored_path=rel, site=info.site,
                                           source=info.source, transfer=transfer)
        with self._lock:
            info.files += 1
            info.new_files += int(new)
            info.bytes += len(data)
        if not new:
            return Receipt(sha256=sha, new=False, series_key=None)
        if parse_now:
            return self._index(sha, rel, data, info.site, transfer)
        self._pending.put((sha, rel, data if len(data) <= KEEP_IN_QUEUE_BYTES else None, info.site, transfer))
        return Receipt(sha256=sha, new=True, series_key=None)

    def _index(self, sha: str, rel: str, data: bytes | None, site: str, transfer: str) -> Receipt:
        """Parse and check one recorded file's header; record what it says."""
        if data is None:
            data = self.store.path(rel).read_bytes()
        check: FileCheck = check_bytes(data)
        series_key = uid_key(check.series_uid) if check.series_uid else None
        self.records.record_index(sha256=sha, site=site, series_key=series_key,
                                  study_key=uid_key(check.study_uid) if check.study_uid else None,
                                  sop_key=uid_key(check.sop_uid) if check.sop_uid else None,
                                  problems=check.problems, header_summary=check.summary)
        with self._lock:
            info = self._transfers.get(transfer)
            if info is not None:
                if series_key:
                    info.series.add(series_key)
                info.problems += [f"{sha[:12]}: {p}" for p in check.problems]
        if series_key is None:
            self.audit.append(who=self.config.who, what="file rejected", why="; ".join(check.problems),
                              subject=f"file {sha}", details={"site": site, "transfer": transfer,
                                                              "size": len(data), "stored": rel,
                                                              "problems": check.problems})
        return Receipt(sha256=sha, new=True, series_key=series_key, problems=check.problems)

    def _indexer(self) -> None:
        while True:
            item = self._pending.get()
            try:
                if item is None:
                    return
                if item[0] == "end":
                    self._audit_transfer(*item[1:])
                else:
                    self._index(*item)
            except Exception:  # noqa: BLE001 - the row stays unindexed and is parsed again at the next start
                log.exception("indexing a received file failed")
            finally:
                self._pending.task_done()

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
        self.audit.append(
            who=self.config.who, what="transfer received", why=how, subject=f"transfer {transfer}",
            details={"site": info.site, "source": info.source, "sender": info.sender, "files": info.files,
                     "new_files": info.new_files, "duplicate_files": info.files - info.new_files,
                     "bytes": info.bytes, "series": sorted(info.series), "problems": info.problems[:50]})

    def reject_association(self, sender: str, why: str) -> None:
        self.audit.append(who=self.config.who, what="association rejected", why=why,
                          subject=f"calling AE {sender}", details={"calling_ae_title": sender})

    # ------------------------------------------------------------------ checking
    def check_complete(self, now: float | None = None) -> list[SeriesOutcome]:
        """Run the gate on every series that has been quiet for ``quiet_seconds``."""
        outcomes = []
        for series_key, site in self.records.quiet_series(self.config.quiet_seconds, now):
            files = self.records.series_files(series_key)
            paths = [self.store.path(rel) for rel, _, _ in files]
            checks = [FileCheck(series_uid="(stored)", problems=problems, summary=summary)
                      for _, problems, summary in files]
            try:
                results = self.gate.check_received(paths, checks, site)
            except SitebenchError as exc:
                self.records.mark_checked(series_key)
                self.audit.append(who=self.config.who, what="series not checked", why=str(exc),
                                  subject=f"series {series_key}", details={"site": site})
                continue
            for outcome in results:
                if outcome.series_key != series_key:  # a file's header disagrees with its intake record
                    outcome.file_problems.append("file's SeriesInstanceUID changed between intake and check")
                    outcome.series_key = series_key  # the verdict closes the series intake opened
                self._record(outcome)  # verdict and closing the series: one transaction
                outcomes.append(outcome)
        return outcomes

    def _record(self, outcome: SeriesOutcome) -> None:
        self.records.record_outcome(outcome)
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
        log.info("%s", outcome.summary().splitlines()[0])

    def _checker(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.check_complete()
            except Exception:  # noqa: BLE001 - the service keeps serving; the series stays open
                log.exception("gate check failed; will retry")

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
        for sha, rel, site, transfer in self.records.unindexed():  # recorded, not parsed, before a crash
            self._pending.put((sha, rel, None, site, transfer))
        self.recover()
        pending = self.records.open_series()
        self.audit.append(who=self.config.who, what="intake started", why="service start",
                          details={"protocols": [f"{p.name} v{p.version}" for p in self.protocols],
                                   "sites": sorted(self.config.sites), "open_series_recovered": len(pending)})
        if self.config.dicom is not None:
            from sitebench.qc.dicom_scp import start_storage_scp

            self._servers.append(start_storage_scp(self, self.config.dicom))
        if self.config.http is not None:
            from sitebench.qc.stow import start_http

            self._servers.append(start_http(self, self.config.http))
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


def _why(outcome: SeriesOutcome) -> str:
    if outcome.status == "unmatched":
        return "no locked protocol's match rules select this series"
    if not outcome.deviations:
        return f"all checks of {outcome.protocol} v{outcome.protocol_version} passed"
    return "; ".join(d.line() for d in outcome.deviations[:10])


def serve(config: IntakeConfig, ready: threading.Event | None = None) -> None:
    """Run the intake service until SIGINT / SIGTERM."""
    import signal

    service = IntakeService(config)
    service.start()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    listening = []
    if config.dicom:
        listening.append(f"DICOM {config.dicom.ae_title}@{config.dicom.host}:{config.dicom.port}")
    if config.http:
        listening.append(f"STOW-RS http://{config.http.host}:{config.http.port}/dicomweb/{{site}}/studies")
    if config.folder:
        listening.append(f"folder {config.folder}/{{site}}/")
    print(json.dumps({"event": "listening", "on": listening, "store": str(config.store)}), flush=True)
    if ready is not None:
        ready.set()
    done.wait()
    service.stop()
