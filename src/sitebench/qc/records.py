"""The QC database: received files, series, verdicts, deviations, drift events, gate state.

SQLAlchemy Core over SQLite by default (``sqlite:///<store>/qc.db``, WAL, synchronous
NORMAL: a committed row survives a crash of the process; the fsync'd object store is what
survives a power loss, see :meth:`IntakeService.recover`) or any URL SQLAlchemy knows
(``postgresql+psycopg://...``). A received file is a row here *before* any check runs;
the series it belongs to stays ``open`` until the gate has recorded a verdict for it.

No identifier values are stored: series and studies are keyed by :func:`uid_key`
pseudonyms, and the PHI finding is the list of attribute *names* present.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (BigInteger, Boolean, Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text,
                        bindparam, cast, create_engine, event, func, insert, select, update)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from sitebench.errors import SitebenchError
from sitebench.provenance import jsonable, utc_now

__all__ = ["IndexResult", "QCRecords", "SiteStatus", "database_url", "rescan_groups", "resolved_by_rescan"]

metadata = MetaData()

received_files = Table(
    "received_files", metadata,
    Column("id", Integer, primary_key=True),
    Column("sha256", String(64), nullable=False, unique=True),
    Column("size", BigInteger, nullable=False),
    Column("stored_path", Text, nullable=False),
    Column("site", String(64), nullable=False),
    Column("source", String(16), nullable=False),  # dicom | http | folder | check
    Column("transfer", String(64), nullable=False),
    Column("series_key", String(32), index=True),
    Column("sop_key", String(32), index=True),  # every new file looks up other copies of its instance
    Column("problems", Text, nullable=False, default="[]"),  # JSON list of one-line problems
    Column("header_summary", Text),  # JSON file_summary: per-frame geometry, PHI attribute names
    Column("indexed", Boolean, nullable=False, default=False, index=True),  # header parsed; polled per pass
    Column("first_received_utc", String(40), nullable=False),
    Column("times_received", Integer, nullable=False, default=1),
    Column("received_epoch", Float),
    # one-line reason this file cannot be used (parse crashed, another site's instance); kept, never checked
    Column("quarantine", Text),
    Column("attempts", Integer, nullable=False, default=0),  # indexing attempts that failed
    Column("next_attempt_epoch", Float),
    Column("instance_number", Integer),
    # sha256 of the copy of the same instance that replaces this one (a clean resend of a damaged file,
    # or the copy a person kept when resolving a conflict)
    Column("superseded_by", String(64)),
    Column("conflict", Boolean, nullable=False, default=False),  # same instance, other bytes, unresolved
)
#: each site's last upload, read from the index alone (the overview asks it per site)
Index("ix_received_files_site_received", received_files.c.site, received_files.c.first_received_utc)

series = Table(
    "series", metadata,
    Column("series_key", String(32), primary_key=True),
    Column("site", String(64), nullable=False, index=True),
    Column("study_key", String(32)),
    Column("state", String(16), nullable=False),  # open | checked
    Column("n_files", Integer, nullable=False),
    Column("first_received_utc", String(40), nullable=False),
    Column("last_received_epoch", Float, nullable=False),
    Column("check_attempts", Integer, nullable=False, default=0),
    Column("next_check_epoch", Float),
    Column("waiting", Text),  # why an open, quiet series still waits (known incomplete), for qc status
    Column("quarantine", Text),  # why checking it failed repeatedly (a bug: its files are kept)
)

transfers = Table(
    "transfers", metadata,
    Column("transfer", String(64), primary_key=True),
    Column("site", String(64), nullable=False),
    Column("source", String(16), nullable=False),
    Column("sender", String(128), nullable=False),
    Column("started_utc", String(40), nullable=False),
    Column("ended_utc", String(40)),
    Column("how", Text),
)

verdicts = Table(
    "verdicts", metadata,
    Column("id", Integer, primary_key=True),
    Column("series_key", String(32), nullable=False, index=True),
    Column("site", String(64), nullable=False, index=True),
    Column("study_key", String(32)),
    Column("scanner", String(128)),
    Column("manufacturer", String(64)),
    Column("model", String(128)),
    Column("software_version", String(128)),
    Column("field_strength", Float),
    Column("protocol", String(128)),
    Column("protocol_version", Integer),
    Column("protocol_sha256", String(64)),
    Column("status", String(16), nullable=False),
    Column("latest", Boolean, nullable=False, default=True),
    Column("checked_utc", String(40), nullable=False),
    Column("n_files", Integer, nullable=False),
    Column("image_quality", Text, nullable=False, default="{}"),
    Column("phi_attributes_present", Text, nullable=False, default="[]"),
    Column("file_problems", Text, nullable=False, default="[]"),
    Column("seconds", Text, nullable=False, default="{}"),
    Column("subject_key", String(32)),  # keyed pseudonym of ClinicalTrialSubjectID
    Column("timepoint", String(64)),  # ClinicalTrialTimePointID
)

deviations = Table(
    "deviations", metadata,
    Column("id", Integer, primary_key=True),
    Column("verdict_id", Integer, ForeignKey("verdicts.id"), nullable=False, index=True),
    Column("parameter", String(128), nullable=False),
    Column("expected", Text, nullable=False),
    Column("observed", Text),  # JSON
    Column("rule", String(32), nullable=False),
    Column("severity", String(8), nullable=False),
    Column("status", String(16), nullable=False),
    Column("note", Text, nullable=False, default=""),
)

drift_events = Table(
    "drift_events", metadata,
    Column("id", Integer, primary_key=True),
    Column("verdict_id", Integer, ForeignKey("verdicts.id"), nullable=False, index=True),
    Column("site", String(64), nullable=False, index=True),
    Column("scanner", String(160), nullable=False),
    Column("series_key", String(32), nullable=False),
    Column("parameter", String(128), nullable=False),
    Column("baseline", Text),
    Column("observed", Text),
    Column("kind", String(16), nullable=False),
    Column("change", String(16), nullable=False),
    Column("first_seen", String(40), nullable=False),
)

#: people and systems that may sign in (sitebench.qc.access): the token's SHA-256 only, never the token
users = Table(
    "users", metadata,
    Column("username", String(64), primary_key=True),
    Column("role", String(32), nullable=False),
    Column("site", String(64)),  # None for trial-wide roles
    Column("token_sha256", String(64), nullable=False, unique=True),
    Column("created_utc", String(40), nullable=False),
    Column("disabled", Boolean, nullable=False, default=False),
)

#: deviation queries with the sites (sitebench.qc.queries): one per failed series, worked to closure
queries = Table(
    "queries", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("site", String(64), nullable=False, index=True),
    Column("series_key", String(64), nullable=False, index=True),
    Column("study_key", String(64)),
    Column("protocol", String(128)),
    Column("verdict_id", Integer),
    Column("status", String(16), nullable=False),  # draft | open | answered | returned | closed
    Column("what_failed", Text, nullable=False),  # JSON list of {parameter, expected, observed, rule}
    Column("request", Text, nullable=False),  # what the site should do, in plain words
    Column("created_utc", String(40), nullable=False),
    Column("opened_utc", String(40)),
    Column("due_utc", String(40)),
    Column("answer_kind", String(16)),  # rescan | explanation
    Column("answer", Text),
    Column("rescan_series_key", String(64)),  # the passing re-scan this query was closed by, if any
    Column("closed_utc", String(40)),
    Column("overdue_alerted", Boolean, nullable=False, default=False),
)

query_steps = Table(
    "query_steps", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("query_id", Integer, ForeignKey("queries.id"), nullable=False, index=True),
    Column("step", String(32), nullable=False),  # drafted | opened | answered | accepted | returned | rescan passed
    Column("who", String(128), nullable=False),
    Column("role", String(32)),
    Column("note", Text),
    Column("utc", String(40), nullable=False),
)

gate_state = Table(
    "gate_state", metadata,
    Column("name", String(32), primary_key=True),
    Column("state", Text, nullable=False),
    Column("updated_utc", String(40), nullable=False),
)


def database_url(store: str | Path, url: str | None = None) -> str:
    """The given URL, or the SQLite file inside the store."""
    return url or f"sqlite:///{Path(store).resolve() / 'qc.db'}"


def _json(value: Any) -> str:
    return json.dumps(jsonable(value), sort_keys=True)


@dataclass
class IndexResult:
    """What :meth:`QCRecords.record_index` did with a parsed file."""

    status: str  # stored | quarantined | conflict | superseded
    reason: str = ""
    conflict_with: str | None = None
    superseded_by: str | None = None
    replaced: list[str] = field(default_factory=list)  # damaged copies this clean resend replaces


@dataclass
class SiteStatus:
    """One row of ``sitebench qc status``."""

    site: str
    series: int = 0
    passed: int = 0
    warned: int = 0
    failed: int = 0
    undetermined: int = 0
    unmatched: int = 0
    open_deviations: int = 0
    drift_events: int = 0
    rescans: int = 0
    rejected_files: int = 0
    quarantined_files: int = 0
    conflicts: int = 0
    waiting_series: int = 0
    quarantined_series: int = 0

    @property
    def rescan_rate(self) -> float:
        return self.rescans / self.series if self.series else 0.0


def rescan_groups(verdict_rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """The gate's verdicts grouped by (site, study, protocol), each group in the order they were checked.

    This is the gate's one definition of a *re-scan*: a series of a study and protocol that
    already had an earlier series (every member after a group's first). Series with no study
    or no matched protocol belong to no group.
    """
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in sorted(verdict_rows, key=lambda r: r["id"]):
        if row.get("study_key") and row.get("protocol"):
            groups.setdefault((row["site"], row["study_key"], row["protocol"]), []).append(row)
    return groups


def resolved_by_rescan(verdict_rows: list[dict[str, Any]],
                       groups: dict[tuple[str, str, str], list[dict[str, Any]]] | None = None) -> set[int]:
    """Ids of the verdicts a later passing series of the same study and protocol resolved: their
    deviations are no longer open. ``groups``: :func:`rescan_groups` of these rows, if made already."""
    resolved: set[int] = set()
    for members in (rescan_groups(verdict_rows) if groups is None else groups).values():
        passed_at = [m["id"] for m in members if m["status"] == "pass"]
        if passed_at:
            resolved.update(m["id"] for m in members if m["id"] < max(passed_at))
    return resolved


class QCRecords:
    """Reads and writes the QC database; every write is one committed transaction."""

    def __init__(self, url: str) -> None:
        try:
            self.engine: Engine = create_engine(url, future=True)
        except Exception as exc:  # noqa: BLE001 - bad URL, missing driver
            raise SitebenchError(f"cannot open QC database {url.split('@')[-1]!r}: {exc}") from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        _add_missing_columns(self.engine)

    # ------------------------------------------------------------------ intake
    def record_received(self, *, sha256: str, size: int, stored_path: str, site: str, source: str,
                        transfer: str) -> bool:
        """Record one stored file before anything reads it; False when these exact bytes were seen before."""
        try:
            with self.engine.begin() as conn:
                conn.execute(_NEW_FILE, {"b_sha256": sha256, "b_size": size, "b_stored_path": stored_path,
                                         "b_site": site, "b_source": source, "b_transfer": transfer,
                                         "b_utc": utc_now(), "b_now": time.time()})
            return True
        except IntegrityError:  # these exact bytes are already recorded: count the resend, change nothing else
            with self.engine.begin() as conn:
                conn.execute(_RESENT_FILE, {"b_sha256": sha256})
            return False

    def file_state(self, sha256: str) -> dict[str, Any] | None:
        """What is known of one recorded file: series, problems, quarantine, conflict, replacement."""
        with self.engine.connect() as conn:
            row = conn.execute(select(received_files).where(received_files.c.sha256 == sha256)).mappings().first()
        if row is None:
            return None
        return {**row, "problems": json.loads(row["problems"] or "[]")}

    def record_index(self, *, sha256: str, site: str, series_key: str | None, study_key: str | None,
                     sop_key: str | None, problems: list[str], header_summary: dict | None,
                     instance_number: int | None = None) -> IndexResult:
        """What the header of a recorded file says; opens (or re-opens) its series. One transaction.

        Series belong to their site: a file whose SeriesInstanceUID or SOPInstanceUID is
        already another site's is quarantined and changes nothing of that site's. An instance
        received again with other bytes is never a silent replacement: a clean copy replaces
        a damaged one (audited by the caller), and two clean copies that differ are a
        *conflict* that leaves the series undetermined until a person keeps one
        (:meth:`resolve_conflict`). A new file of an already checked series re-opens it, so
        the gate checks the series again as a whole.
        """
        with self.engine.begin() as conn:
            return _record_index(conn, time.time(), sha256=sha256, site=site, series_key=series_key,
                                 study_key=study_key, sop_key=sop_key, problems=problems,
                                 header_summary=header_summary, instance_number=instance_number)

    def record_index_many(self, files: list[dict[str, Any]]) -> list[IndexResult]:
        """:meth:`record_index` for several parsed files (its keyword arguments, one dict each), in ONE transaction.

        The indexer records what it has queued this way: one commit (and one connection
        checkout) for a batch instead of one per file. Files are recorded in order, each
        seeing the ones before it (a resend in the same batch is judged against the first
        copy exactly as across transactions). Any error rolls the whole batch back and raises;
        the caller then records the files one by one, so one bad file never holds up another.
        """
        if not files:
            return []
        now = time.time()
        with self.engine.begin() as conn:
            return [_record_index(conn, now, **f) for f in files]

    def index_failed(self, sha256: str, reason: str, *, max_attempts: int = 3, backoff_seconds: float = 2.0) -> bool:
        """Count a failed attempt at indexing a file; True when it is now quarantined (attempts exhausted).

        Retries back off exponentially (``backoff_seconds * 2**attempt``), so a transient
        failure (a locked database, a full disk) heals and a deterministic one stops in seconds.
        """
        with self.engine.begin() as conn:
            attempts = int(conn.execute(select(received_files.c.attempts)
                                        .where(received_files.c.sha256 == sha256)).scalar() or 0) + 1
            values: dict[str, Any] = {"attempts": attempts}
            if attempts >= max_attempts:
                values.update(indexed=True, quarantine=reason, series_key=None, problems=_json([reason]))
            else:
                values["next_attempt_epoch"] = time.time() + backoff_seconds * 2 ** (attempts - 1)
            conn.execute(update(received_files).where(received_files.c.sha256 == sha256).values(**values))
        return attempts >= max_attempts

    def record_file(self, *, sha256: str, size: int, stored_path: str, site: str, source: str, transfer: str,
                    series_key: str | None, study_key: str | None, problems: list[str],
                    sop_key: str | None = None, header_summary: dict | None = None) -> bool:
        """:meth:`record_received` and :meth:`record_index` in one call (files already parsed)."""
        new = self.record_received(sha256=sha256, size=size, stored_path=stored_path, site=site, source=source,
                                   transfer=transfer)
        if new:
            self.record_index(sha256=sha256, site=site, series_key=series_key, study_key=study_key, sop_key=sop_key,
                              problems=problems, header_summary=header_summary)
        return new

    def unindexed(self, due_only: bool = False, failed_only: bool = False) -> list[tuple[str, str, str, str]]:
        """(sha256, stored path, site, transfer) of recorded files whose header is not yet parsed.

        ``due_only``: leave out those waiting for a retry after a failed attempt. ``failed_only``:
        only files whose indexing failed before (the retry sweep: a file just received is
        already queued, and fetching the whole backlog every pass costs the receivers' time).
        """
        query = (select(received_files.c.sha256, received_files.c.stored_path, received_files.c.site,
                        received_files.c.transfer).where(received_files.c.indexed.is_(False)))
        if failed_only:
            query = query.where(received_files.c.attempts > 0)
        if due_only:
            query = query.where((received_files.c.next_attempt_epoch.is_(None))
                                | (received_files.c.next_attempt_epoch <= time.time()))
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(received_files.c.id)).all()
        return [tuple(r) for r in rows]

    def known_sha256(self) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(select(received_files.c.sha256)).scalars())

    def last_received_by_site(self, sites: list[str]) -> dict[str, str]:
        """When each site last sent a file (first receipt of its newest file); sites that sent none are left out.

        One indexed lookup a site: a trial's million files are never scanned for the overview."""
        query = select(func.max(received_files.c.first_received_utc)).where(received_files.c.site == bindparam("site"))
        out = {}
        with self.engine.connect() as conn:
            for site in sites:
                last = conn.execute(query, {"site": site}).scalar()
                if last:
                    out[site] = last
        return out

    def last_received_utc(self) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(received_files.c.first_received_utc))).scalar()

    def quiet_series(self, quiet_seconds: float, now: float | None = None) -> list[tuple[str, str]]:
        """(series_key, site) of open series with no new file for ``quiet_seconds``: complete.

        A file of a site not yet parsed may belong to any of that site's open series, so
        that site's series wait for it (other sites' never do: their series cannot gain it).
        A file whose parse failed waits only for its bounded retries, then is quarantined.
        Series whose last check failed wait for their retry time.
        """
        now = time.time() if now is None else now
        cutoff = now - quiet_seconds
        with self.engine.connect() as conn:
            busy = set(conn.execute(select(received_files.c.site).where(received_files.c.indexed.is_(False))
                                    .distinct()).scalars())
            rows = conn.execute(select(series.c.series_key, series.c.site)
                                .where(series.c.state == "open", series.c.last_received_epoch <= cutoff,
                                       (series.c.next_check_epoch.is_(None)) | (series.c.next_check_epoch <= now))
                                .order_by(series.c.last_received_epoch)).all()
        return [(r.series_key, r.site) for r in rows if r.site not in busy]

    def open_series(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(series.c.series_key).where(series.c.state == "open")).scalars())

    def series_site(self, series_key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(series.c.site).where(series.c.series_key == series_key)).scalar()

    def series_files(self, series_key: str) -> list[tuple[str, list[str], dict | None]]:
        """(stored path, problems, header summary) of a series' instances, in arrival order.

        Copies replaced by a clean resend are left out. Each copy in an unresolved conflict
        carries a problem naming it, so the series is undetermined until a person keeps one.
        """
        with self.engine.connect() as conn:
            rows = conn.execute(select(received_files.c.id, received_files.c.sha256, received_files.c.stored_path,
                                       received_files.c.problems, received_files.c.header_summary,
                                       received_files.c.conflict, received_files.c.instance_number)
                                .where(received_files.c.series_key == series_key,
                                       received_files.c.superseded_by.is_(None))
                                .order_by(received_files.c.id)).all()
        out = []
        for r in rows:
            problems = json.loads(r.problems)
            if r.conflict:
                number = f"instance {r.instance_number}" if r.instance_number is not None else "an instance"
                problems = problems + [f"{number} received twice with different bytes (copy {r.sha256[:12]}): "
                                       f"conflict, keep one with `sitebench qc resolve`"]
            out.append((r.stored_path, problems, json.loads(r.header_summary) if r.header_summary else None))
        return out

    def series_quarantined_files(self, series_key: str) -> list[str]:
        """Problem lines for files of this series that were quarantined after their series was known."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(received_files.c.sha256, received_files.c.quarantine)
                                .where(received_files.c.series_key == series_key,
                                       received_files.c.quarantine.is_not(None))).all()
        return [f"file {r.sha256[:12]} quarantined ({r.quarantine}): re-send it" for r in rows]

    def series_last_received(self, series_key: str) -> float | None:
        with self.engine.connect() as conn:
            return conn.execute(select(series.c.last_received_epoch).where(series.c.series_key == series_key)).scalar()

    def wait(self, series_key: str, why: str) -> None:
        """Leave a quiet series open: it is known to be incomplete (``why`` shows in qc status)."""
        with self.engine.begin() as conn:
            conn.execute(update(series).where(series.c.series_key == series_key).values(waiting=why))

    def check_failed(self, series_key: str, reason: str, *, max_attempts: int = 3,
                     backoff_seconds: float = 2.0) -> bool:
        """Count a failed check of a series; True when it is now quarantined (left for a person)."""
        with self.engine.begin() as conn:
            attempts = int(conn.execute(select(series.c.check_attempts)
                                        .where(series.c.series_key == series_key)).scalar() or 0) + 1
            values: dict[str, Any] = {"check_attempts": attempts,
                                      "next_check_epoch": time.time() + backoff_seconds * 2 ** (attempts - 1)}
            if attempts >= max_attempts:
                values.update(state="quarantined", quarantine=reason)
            conn.execute(update(series).where(series.c.series_key == series_key).values(**values))
        return attempts >= max_attempts

    def conflicts(self, site: str | None = None) -> list[dict[str, Any]]:
        """Unresolved conflicts: every copy, with its series, site and instance number."""
        query = select(received_files.c.sha256, received_files.c.site, received_files.c.series_key,
                       received_files.c.sop_key, received_files.c.instance_number,
                       received_files.c.first_received_utc, received_files.c.transfer) \
            .where(received_files.c.conflict.is_(True), received_files.c.superseded_by.is_(None))
        if site is not None:
            query = query.where(received_files.c.site == site)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query.order_by(received_files.c.id)).mappings().all()]

    def resolve_conflict(self, keep_sha256: str) -> dict[str, Any]:
        """Keep one copy of a conflicting instance: the others are superseded and the series re-opened."""
        with self.engine.begin() as conn:
            row = conn.execute(select(received_files.c.sha256, received_files.c.sop_key, received_files.c.series_key,
                                      received_files.c.conflict, received_files.c.site)
                               .where(received_files.c.sha256.like(f"{keep_sha256}%"))).all()
            if len(row) != 1:
                raise SitebenchError(f"no single received file starts with {keep_sha256!r}")
            (row,) = row
            if not row.conflict:
                raise SitebenchError(f"file {row.sha256[:12]} is not in an unresolved conflict")
            others = [r.sha256 for r in conn.execute(select(received_files.c.sha256).where(
                received_files.c.sop_key == row.sop_key, received_files.c.sha256 != row.sha256,
                received_files.c.superseded_by.is_(None)))]
            conn.execute(update(received_files).where(received_files.c.sha256.in_(others))
                         .values(superseded_by=row.sha256, conflict=False))
            conn.execute(update(received_files).where(received_files.c.sha256 == row.sha256).values(conflict=False))
            conn.execute(update(series).where(series.c.series_key == row.series_key).values(
                state="open", last_received_epoch=0.0, check_attempts=0, next_check_epoch=None))
        return {"kept": row.sha256, "superseded": others, "series_key": row.series_key, "site": row.site}

    def attention_lines(self, limit: int = 20) -> list[str]:
        """One line per thing a person should act on: quarantined files and series, conflicts, waiting series."""
        lines = []
        with self.engine.connect() as conn:
            files = conn.execute(select(received_files.c.site, received_files.c.sha256, received_files.c.quarantine)
                                 .where(received_files.c.quarantine.is_not(None))
                                 .order_by(received_files.c.id.desc()).limit(limit)).all()
            stuck = conn.execute(select(series.c.site, series.c.series_key, series.c.quarantine)
                                 .where(series.c.state == "quarantined").limit(limit)).all()
            waiting = conn.execute(select(series.c.site, series.c.series_key, series.c.waiting)
                                   .where(series.c.state == "open", series.c.waiting.is_not(None)).limit(limit)).all()
        lines += [f"quarantined file {r.sha256[:12]} ({r.site}): {r.quarantine}" for r in files]
        lines += [f"series {r.series_key} ({r.site}) not checked: {r.quarantine}" for r in stuck]
        lines += [f"series {r.series_key} ({r.site}) waiting: {r.waiting}" for r in waiting]
        lines += [f"conflict in series {c['series_key']} ({c['site']}): instance {c['instance_number']}, "
                  f"copy {c['sha256'][:12]} received {c['first_received_utc']}" for c in self.conflicts()[:limit]]
        return lines

    # ------------------------------------------------------------------ transfers
    def begin_transfer(self, transfer: str, site: str, source: str, sender: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(transfers).values(transfer=transfer, site=site, source=source, sender=sender,
                                                  started_utc=utc_now()))

    def end_transfer(self, transfer: str, how: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(transfers).where(transfers.c.transfer == transfer)
                         .values(ended_utc=utc_now(), how=how))

    def interrupted_transfers(self) -> list[dict[str, Any]]:
        """Transfers that never ended (the service died mid-way), with the files each stored."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(transfers).where(transfers.c.ended_utc.is_(None))).mappings().all()
            out = []
            for row in rows:
                n = conn.execute(select(func.count()).select_from(received_files)
                                 .where(received_files.c.transfer == row["transfer"])).scalar_one()
                out.append({**row, "files": int(n)})
        return out

    # ------------------------------------------------------------------ verdicts
    def record_outcome(self, outcome) -> int:
        """Store one gate outcome (verdict, deviations, drift) and close its series; earlier verdicts of the
        series stop being latest."""
        with self.engine.begin() as conn:
            conn.execute(update(verdicts).where(verdicts.c.series_key == outcome.series_key).values(latest=False))
            verdict_id = conn.execute(insert(verdicts).values(
                series_key=outcome.series_key, site=outcome.site, study_key=outcome.study_key,
                scanner=outcome.scanner, manufacturer=outcome.parameters.get("Manufacturer"),
                model=outcome.parameters.get("ManufacturersModelName"),
                software_version=outcome.parameters.get("SoftwareVersions"),
                field_strength=outcome.parameters.get("MagneticFieldStrength"), protocol=outcome.protocol, protocol_version=outcome.protocol_version,
                protocol_sha256=outcome.protocol_sha256, status=outcome.status, latest=True,
                checked_utc=outcome.checked_utc, n_files=outcome.n_files,
                image_quality=_json(outcome.image_quality), phi_attributes_present=_json(outcome.phi_present),
                file_problems=_json(outcome.file_problems), seconds=_json(outcome.seconds),
                subject_key=outcome.subject_key or None, timepoint=outcome.timepoint or None)).inserted_primary_key[0]
            for d in outcome.deviations:
                conn.execute(insert(deviations).values(
                    verdict_id=verdict_id, parameter=d.parameter, expected=d.expected, observed=_json(d.observed),
                    rule=d.rule, severity=d.severity, status=d.status, note=d.note))
            for e in outcome.drift:
                conn.execute(insert(drift_events).values(
                    verdict_id=verdict_id, site=e.site, scanner=e.scanner, series_key=e.series_uid,
                    parameter=e.parameter, baseline=_json(e.baseline), observed=_json(e.observed), kind=e.kind,
                    change=e.change, first_seen=e.first_seen))
            conn.execute(update(series).where(series.c.series_key == outcome.series_key)
                         .values(state="checked", waiting=None, check_attempts=0, next_check_epoch=None))
        return int(verdict_id)

    def latest_verdicts(self, site: str | None = None, series_key: str | None = None) -> list[dict[str, Any]]:
        query = select(verdicts).where(verdicts.c.latest.is_(True)).order_by(verdicts.c.id)
        if site is not None:
            query = query.where(verdicts.c.site == site)
        if series_key is not None:
            query = query.where(verdicts.c.series_key == series_key)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [{**row, **{k: json.loads(row[k]) for k in ("image_quality", "phi_attributes_present",
                                                           "file_problems", "seconds")}} for row in rows]

    def verdict_timing(self) -> list[tuple[str, str, float | None]]:
        """(site, checked_utc, upload-to-verdict seconds) of every latest verdict: the overview's
        columns without decoding each verdict's other JSON."""
        if self.engine.dialect.name == "postgresql":  # the database reads the one number out of the JSON
            wait = cast(cast(verdicts.c.seconds, JSONB).op("->>")("upload_to_verdict"), Float)
        else:  # SQLite (and MySQL) json_extract
            wait = func.json_extract(verdicts.c.seconds, "$.upload_to_verdict")
        query = select(verdicts.c.site, verdicts.c.checked_utc, wait).where(verdicts.c.latest.is_(True))
        with self.engine.connect() as conn:
            return [(site, checked, None if w is None else float(w)) for site, checked, w in conn.execute(query).all()]

    def deviations_of(self, verdict_id: int) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(deviations).where(deviations.c.verdict_id == verdict_id)
                                .order_by(deviations.c.id)).mappings().all()
        return [{**row, "observed": json.loads(row["observed"]) if row["observed"] else None} for row in rows]

    def latest_deviations(self) -> list[dict[str, Any]]:
        """Every deviation of every latest verdict, with its verdict's id (one query, for reports)."""
        query = (select(deviations).join(verdicts, deviations.c.verdict_id == verdicts.c.id)
                 .where(verdicts.c.latest.is_(True)).order_by(deviations.c.verdict_id, deviations.c.id))
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [{**row, "observed": json.loads(row["observed"]) if row["observed"] else None} for row in rows]

    def drift_events(self, site: str | None = None) -> list[dict[str, Any]]:
        query = select(drift_events).order_by(drift_events.c.id)
        if site is not None:
            query = query.where(drift_events.c.site == site)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings().all()]

    def rejected_files(self) -> list[dict[str, Any]]:
        """Files that belong to no series (not DICOM, no SeriesInstanceUID): kept, never checked."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(received_files).where(received_files.c.series_key.is_(None),
                                                             received_files.c.indexed.is_(True))
                                .order_by(received_files.c.id)).mappings().all()
        return [{**row, "problems": json.loads(row["problems"])} for row in rows]

    def file_count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(received_files)).scalar_one())

    # ------------------------------------------------------------------ gate state
    def load_state(self, name: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(gate_state.c.state).where(gate_state.c.name == name)).first()
        return None if row is None else json.loads(row.state)

    def save_state(self, name: str, state: dict) -> None:
        with self.engine.begin() as conn:
            done = conn.execute(update(gate_state).where(gate_state.c.name == name)
                                .values(state=_json(state), updated_utc=utc_now())).rowcount
            if not done:
                conn.execute(insert(gate_state).values(name=name, state=_json(state), updated_utc=utc_now()))

    # ------------------------------------------------------------------ status
    def site_status(self) -> list[SiteStatus]:
        """Per site: verdict counts, open deviations, drift events, re-scan rate, rejected files.

        A *re-scan* is a series of a study and protocol that already had an earlier series;
        a deviation is *open* while it belongs to a latest verdict whose study has no later
        passing series of the same protocol.
        """
        with self.engine.connect() as conn:  # only the columns counted: no verdict's JSON is decoded
            rows = [{"id": i, "site": site, "status": status, "study_key": study, "protocol": protocol}
                    for i, site, status, study, protocol in conn.execute(
                        select(verdicts.c.id, verdicts.c.site, verdicts.c.status, verdicts.c.study_key,
                               verdicts.c.protocol).where(verdicts.c.latest.is_(True)).order_by(verdicts.c.id)).all()]
        table: dict[str, SiteStatus] = {}
        for row in rows:
            status = table.setdefault(row["site"], SiteStatus(site=row["site"]))
            status.series += 1
            field = {"pass": "passed", "warn": "warned", "fail": "failed"}.get(row["status"], row["status"])
            setattr(status, field, getattr(status, field) + 1)
        groups = rescan_groups(rows)
        for (site, _, _), members in groups.items():
            table[site].rescans += len(members) - 1
        resolved = resolved_by_rescan(rows, groups)
        with self.engine.connect() as conn:
            counts = conn.execute(select(verdicts.c.site, verdicts.c.id, func.count(deviations.c.id))
                                  .join(deviations, deviations.c.verdict_id == verdicts.c.id)
                                  .where(verdicts.c.latest.is_(True)).group_by(verdicts.c.site, verdicts.c.id)).all()
            drift = conn.execute(select(drift_events.c.site, func.count()).group_by(drift_events.c.site)).all()
            rejected = conn.execute(select(received_files.c.site, func.count())
                                    .where(received_files.c.series_key.is_(None), received_files.c.indexed.is_(True),
                                           received_files.c.quarantine.is_(None))
                                    .group_by(received_files.c.site)).all()
            quarantined = conn.execute(select(received_files.c.site, func.count())
                                       .where(received_files.c.quarantine.is_not(None))
                                       .group_by(received_files.c.site)).all()
            conflicting = conn.execute(select(received_files.c.site, func.count(func.distinct(received_files.c.sop_key)))
                                       .where(received_files.c.conflict.is_(True),
                                              received_files.c.superseded_by.is_(None))
                                       .group_by(received_files.c.site)).all()
            waiting = conn.execute(select(series.c.site, func.count()).where(series.c.state == "open",
                                                                             series.c.waiting.is_not(None))
                                   .group_by(series.c.site)).all()
            stuck = conn.execute(select(series.c.site, func.count()).where(series.c.state == "quarantined")
                                 .group_by(series.c.site)).all()
        for site, verdict_id, n in counts:
            if verdict_id not in resolved:
                table[site].open_deviations += int(n)
        for site, n in drift:
            table.setdefault(site, SiteStatus(site=site)).drift_events = int(n)
        for site, n in rejected:
            table.setdefault(site, SiteStatus(site=site)).rejected_files = int(n)
        for name, rows_ in (("quarantined_files", quarantined), ("conflicts", conflicting),
                            ("waiting_series", waiting), ("quarantined_series", stuck)):
            for site, n in rows_:
                setattr(table.setdefault(site, SiteStatus(site=site)), name, int(n))
        return [table[k] for k in sorted(table)]


# Statements of the per-file path, built once: building a Core statement and its cache key costs
# more than executing it on SQLite, and the indexer and the receivers run these for every file.
_OWNER = select(series.c.site).where(series.c.series_key == bindparam("b_series_key"))
_OTHER_COPIES = (select(received_files.c.sha256, received_files.c.site, received_files.c.problems,
                        received_files.c.quarantine)
                 .where(received_files.c.sop_key == bindparam("b_sop_key"),
                        received_files.c.sha256 != bindparam("b_sha256"), received_files.c.superseded_by.is_(None)))
_SET_INDEX = update(received_files).where(received_files.c.sha256 == bindparam("b_sha256")).values(
    series_key=bindparam("b_series_key"), sop_key=bindparam("b_sop_key"), problems=bindparam("b_problems"),
    indexed=True, instance_number=bindparam("b_instance_number"), quarantine=bindparam("b_quarantine"),
    conflict=bindparam("b_conflict"), superseded_by=bindparam("b_superseded_by"),
    header_summary=bindparam("b_header_summary"))
_REOPEN_SERIES = update(series).where(series.c.series_key == bindparam("b_series_key")).values(
    state="open", n_files=series.c.n_files + 1, last_received_epoch=bindparam("b_now"), check_attempts=0,
    next_check_epoch=None, quarantine=None)
_NEW_SERIES = insert(series).values(series_key=bindparam("b_series_key"), site=bindparam("b_site"),
                                    study_key=bindparam("b_study_key"), state="open", n_files=1,
                                    first_received_utc=bindparam("b_utc"), last_received_epoch=bindparam("b_now"),
                                    check_attempts=0)
_NEW_FILE = insert(received_files).values(
    sha256=bindparam("b_sha256"), size=bindparam("b_size"), stored_path=bindparam("b_stored_path"),
    site=bindparam("b_site"), source=bindparam("b_source"), transfer=bindparam("b_transfer"), problems="[]",
    indexed=False, first_received_utc=bindparam("b_utc"), times_received=1, received_epoch=bindparam("b_now"),
    attempts=0, conflict=False)
_RESENT_FILE = (update(received_files).where(received_files.c.sha256 == bindparam("b_sha256"))
                .values(times_received=received_files.c.times_received + 1))


def _record_index(conn, now: float, *, sha256: str, site: str, series_key: str | None, study_key: str | None,
                  sop_key: str | None, problems: list[str], header_summary: dict | None,
                  instance_number: int | None = None) -> IndexResult:
    """:meth:`QCRecords.record_index` inside the caller's transaction."""
    result = IndexResult(status="stored")
    owner = None if series_key is None else conn.execute(_OWNER, {"b_series_key": series_key}).scalar()
    if owner is not None and owner != site:
        result = IndexResult("quarantined", "its SeriesInstanceUID belongs to a series another site sent: "
                                            "not joined to it")
    elif sop_key is not None:
        others = conn.execute(_OTHER_COPIES, {"b_sop_key": sop_key, "b_sha256": sha256}).all()
        if any(o.site != site for o in others):
            result = IndexResult("quarantined", "its SOPInstanceUID is an instance another site sent: "
                                                "not joined")
        else:
            clean = not problems
            for other in others:
                other_clean = other.quarantine is None and not json.loads(other.problems or "[]")
                if clean and not other_clean:  # a clean resend repairs a damaged instance
                    conn.execute(update(received_files).where(received_files.c.sha256 == other.sha256)
                                 .values(superseded_by=sha256))
                    result.replaced.append(other.sha256)
                elif other_clean and not clean:  # a damaged resend never displaces a clean copy
                    result = IndexResult("superseded", "a damaged copy of an instance already stored "
                                                       "intact: kept, not used", superseded_by=other.sha256)
                elif clean and other_clean:
                    conn.execute(update(received_files).where(received_files.c.sha256 == other.sha256)
                                 .values(conflict=True))
                    result = IndexResult("conflict", "this instance was already received with other bytes: "
                                                     "both copies kept; a person keeps one "
                                                     "(sitebench qc resolve)", conflict_with=other.sha256)
                else:  # both damaged: the newer is the candidate; the series stays undetermined anyway
                    conn.execute(update(received_files).where(received_files.c.sha256 == other.sha256)
                                 .values(superseded_by=sha256))
                    result.replaced.append(other.sha256)
    quarantined = result.status == "quarantined"
    conn.execute(_SET_INDEX, {
        "b_sha256": sha256, "b_series_key": None if quarantined else series_key,
        "b_sop_key": None if quarantined else sop_key, "b_problems": _json(problems),
        "b_instance_number": instance_number, "b_quarantine": result.reason if quarantined else None,
        "b_conflict": result.status == "conflict", "b_superseded_by": result.superseded_by,
        "b_header_summary": None if header_summary is None or quarantined else _json(header_summary)})
    if series_key is None or quarantined:
        return result
    if not conn.execute(_REOPEN_SERIES, {"b_series_key": series_key, "b_now": now}).rowcount:
        conn.execute(_NEW_SERIES, {"b_series_key": series_key, "b_site": site, "b_study_key": study_key,
                                   "b_utc": utc_now(), "b_now": now})
    return result


def _add_missing_columns(engine: Engine) -> None:
    """Add columns this version's tables have and an older store's database lacks (all nullable or defaulted)."""
    from sqlalchemy import inspect, text

    inspector = inspect(engine)
    with engine.begin() as conn:
        for table in metadata.sorted_tables:
            present = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                kind = column.type.compile(dialect=engine.dialect)
                default = ""
                if column.default is not None and not callable(column.default.arg):
                    value = column.default.arg
                    if isinstance(value, bool):
                        default = f" DEFAULT {'true' if value else 'false'}"
                    elif isinstance(value, (int, float)):
                        default = f" DEFAULT {value}"
                    else:
                        default = " DEFAULT '" + str(value).replace("'", "''") + "'"
                not_null = "" if column.nullable or not default else " NOT NULL"
                conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}{default}{not_null}"))
        for table in metadata.sorted_tables:
            for index in table.indexes:
                index.create(conn, checkfirst=True)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a commit survives any crash of this process; after a power loss the
    # last commits may roll back, and intake re-records them from the fsync'd object store
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()

