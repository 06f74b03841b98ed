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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (BigInteger, Boolean, Column, Float, ForeignKey, Integer, MetaData, String, Table, Text,
                        create_engine, event, func, insert, select, update)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from sitebench.errors import SitebenchError
from sitebench.provenance import jsonable, utc_now

__all__ = ["QCRecords", "SiteStatus", "database_url"]

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
    Column("sop_key", String(32)),
    Column("problems", Text, nullable=False, default="[]"),  # JSON list of one-line problems
    Column("header_summary", Text),  # JSON file_summary: per-frame geometry, PHI attribute names
    Column("indexed", Boolean, nullable=False, default=False),  # header parsed and checked
    Column("first_received_utc", String(40), nullable=False),
    Column("times_received", Integer, nullable=False, default=1),
)

series = Table(
    "series", metadata,
    Column("series_key", String(32), primary_key=True),
    Column("site", String(64), nullable=False, index=True),
    Column("study_key", String(32)),
    Column("state", String(16), nullable=False),  # open | checked
    Column("n_files", Integer, nullable=False),
    Column("first_received_utc", String(40), nullable=False),
    Column("last_received_epoch", Float, nullable=False),
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

    @property
    def rescan_rate(self) -> float:
        return self.rescans / self.series if self.series else 0.0


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

    # ------------------------------------------------------------------ intake
    def record_received(self, *, sha256: str, size: int, stored_path: str, site: str, source: str,
                        transfer: str) -> bool:
        """Record one stored file before anything reads it; False when these exact bytes were seen before."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(received_files).values(
                    sha256=sha256, size=size, stored_path=stored_path, site=site, source=source, transfer=transfer,
                    problems="[]", indexed=False, first_received_utc=utc_now(), times_received=1))
            return True
        except IntegrityError:  # these exact bytes are already recorded: count the resend, change nothing else
            with self.engine.begin() as conn:
                conn.execute(update(received_files).where(received_files.c.sha256 == sha256)
                             .values(times_received=received_files.c.times_received + 1))
            return False

    def record_index(self, *, sha256: str, site: str, series_key: str | None, study_key: str | None,
                     sop_key: str | None, problems: list[str], header_summary: dict | None) -> None:
        """What the header of a recorded file says; opens (or re-opens) its series.

        A new file of an already checked series re-opens it, so the gate checks the series
        again as a whole.
        """
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(update(received_files).where(received_files.c.sha256 == sha256).values(
                series_key=series_key, sop_key=sop_key, problems=_json(problems), indexed=True,
                header_summary=None if header_summary is None else _json(header_summary)))
            if series_key is None:
                return
            opened = conn.execute(update(series).where(series.c.series_key == series_key).values(
                state="open", n_files=series.c.n_files + 1, last_received_epoch=now)).rowcount
            if not opened:
                conn.execute(insert(series).values(series_key=series_key, site=site, study_key=study_key,
                                                   state="open", n_files=1, first_received_utc=utc_now(),
                                                   last_received_epoch=now))

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

    def unindexed(self) -> list[tuple[str, str, str, str]]:
        """(sha256, stored path, site, transfer) of recorded files whose header is not yet parsed."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(received_files.c.sha256, received_files.c.stored_path, received_files.c.site,
                                       received_files.c.transfer)
                                .where(received_files.c.indexed.is_(False)).order_by(received_files.c.id)).all()
        return [tuple(r) for r in rows]

    def known_sha256(self) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(select(received_files.c.sha256)).scalars())

    def last_received_utc(self) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(received_files.c.first_received_utc))).scalar()

    def quiet_series(self, quiet_seconds: float, now: float | None = None) -> list[tuple[str, str]]:
        """(series_key, site) of open series with no new file for ``quiet_seconds``: complete."""
        cutoff = (time.time() if now is None else now) - quiet_seconds
        with self.engine.connect() as conn:
            pending = conn.execute(select(func.count()).select_from(received_files)
                                   .where(received_files.c.indexed.is_(False))).scalar_one()
            if pending:  # a file not yet parsed may belong to any open series: none is complete yet
                return []
            rows = conn.execute(select(series.c.series_key, series.c.site)
                                .where(series.c.state == "open", series.c.last_received_epoch <= cutoff)
                                .order_by(series.c.last_received_epoch)).all()
        return [(r.series_key, r.site) for r in rows]

    def open_series(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(series.c.series_key).where(series.c.state == "open")).scalars())

    def series_files(self, series_key: str) -> list[tuple[str, list[str], dict | None]]:
        """(stored path, problems, header summary) of a series' instances, in arrival order.

        An instance (SOPInstanceUID) received again with other bytes counts once, as its
        latest version: re-sending a damaged file repairs the series.
        """
        with self.engine.connect() as conn:
            rows = conn.execute(select(received_files.c.id, received_files.c.sop_key, received_files.c.stored_path,
                                       received_files.c.problems, received_files.c.header_summary)
                                .where(received_files.c.series_key == series_key)
                                .order_by(received_files.c.id)).all()
        latest = {r.sop_key or f"row-{r.id}": r for r in rows}
        return [(r.stored_path, json.loads(r.problems), json.loads(r.header_summary) if r.header_summary else None)
                for r in sorted(latest.values(), key=lambda r: r.id)]

    def mark_checked(self, series_key: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(series).where(series.c.series_key == series_key).values(state="checked"))

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
                file_problems=_json(outcome.file_problems), seconds=_json(outcome.seconds))).inserted_primary_key[0]
            for d in outcome.deviations:
                conn.execute(insert(deviations).values(
                    verdict_id=verdict_id, parameter=d.parameter, expected=d.expected, observed=_json(d.observed),
                    rule=d.rule, severity=d.severity, status=d.status, note=d.note))
            for e in outcome.drift:
                conn.execute(insert(drift_events).values(
                    verdict_id=verdict_id, site=e.site, scanner=e.scanner, series_key=e.series_uid,
                    parameter=e.parameter, baseline=_json(e.baseline), observed=_json(e.observed), kind=e.kind,
                    change=e.change, first_seen=e.first_seen))
            conn.execute(update(series).where(series.c.series_key == outcome.series_key).values(state="checked"))
        return int(verdict_id)

    def latest_verdicts(self, site: str | None = None) -> list[dict[str, Any]]:
        query = select(verdicts).where(verdicts.c.latest.is_(True)).order_by(verdicts.c.id)
        if site is not None:
            query = query.where(verdicts.c.site == site)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [{**row, **{k: json.loads(row[k]) for k in ("image_quality", "phi_attributes_present",
                                                           "file_problems", "seconds")}} for row in rows]

    def deviations_of(self, verdict_id: int) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(deviations).where(deviations.c.verdict_id == verdict_id)
                                .order_by(deviations.c.id)).mappings().all()
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
        rows = self.latest_verdicts()
        table: dict[str, SiteStatus] = {}
        by_study: dict[tuple, list[dict]] = {}
        for row in rows:
            status = table.setdefault(row["site"], SiteStatus(site=row["site"]))
            status.series += 1
            field = {"pass": "passed", "warn": "warned", "fail": "failed"}.get(row["status"], row["status"])
            setattr(status, field, getattr(status, field) + 1)
            if row["study_key"] and row["protocol"]:
                by_study.setdefault((row["site"], row["study_key"], row["protocol"]), []).append(row)
        resolved: set[int] = set()
        for (site, _, _), members in by_study.items():
            table[site].rescans += len(members) - 1
            passed_at = [m["id"] for m in members if m["status"] == "pass"]
            if passed_at:
                resolved.update(m["id"] for m in members if m["id"] < max(passed_at))
        with self.engine.connect() as conn:
            counts = conn.execute(select(verdicts.c.site, verdicts.c.id, func.count(deviations.c.id))
                                  .join(deviations, deviations.c.verdict_id == verdicts.c.id)
                                  .where(verdicts.c.latest.is_(True)).group_by(verdicts.c.site, verdicts.c.id)).all()
            drift = conn.execute(select(drift_events.c.site, func.count()).group_by(drift_events.c.site)).all()
            rejected = conn.execute(select(received_files.c.site, func.count())
                                    .where(received_files.c.series_key.is_(None), received_files.c.indexed.is_(True))
                                    .group_by(received_files.c.site)).all()
        for site, verdict_id, n in counts:
            if verdict_id not in resolved:
                table[site].open_deviations += int(n)
        for site, n in drift:
            table.setdefault(site, SiteStatus(site=site)).drift_events = int(n)
        for site, n in rejected:
            table.setdefault(site, SiteStatus(site=site)).rejected_files = int(n)
        return [table[k] for k in sorted(table)]


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a commit survives any crash of this process; after a power loss the
    # last commits may roll back, and intake re-records them from the fsync'd object store
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()

