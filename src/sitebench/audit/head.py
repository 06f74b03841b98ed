"""The audit trail's head, kept outside the trail file: the last ``seq`` and its ``sha256``.

Whoever can write the trail file can cut records off its end, or rewrite it and recompute
every hash; a copy of the last record's identity kept somewhere else (a database the file's
writer cannot rewrite, ideally with other permissions) shows both. :class:`AuditHead` is the
protocol :class:`~sitebench.audit.trail.AuditTrail` uses; :class:`SqlAuditHead` keeps it in
one row of a table ``audit_head(name PK, seq, sha256, updated_utc)`` of any SQLAlchemy
database (SQLite and PostgreSQL URLs), e.g. the QC service's own ``sqlite:///<store>/qc.db``.
Only that table is created or touched; nothing else in the database is.

SQLAlchemy is imported when a :class:`SqlAuditHead` is made, not when this module is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from sitebench.errors import SitebenchError
from sitebench.provenance import utc_now

TABLE_NAME = "audit_head"


@runtime_checkable
class AuditHead(Protocol):
    """Where the last appended record's ``(seq, sha256)`` is kept, away from the trail file."""

    def read(self) -> tuple[int, str] | None:
        """The last recorded ``(seq, sha256)``, or None when nothing was recorded yet."""

    def write(self, seq: int, sha256: str) -> None:
        """Record ``(seq, sha256)`` as the trail's last record; durable when it returns."""


class SqlAuditHead:
    """An :class:`AuditHead` in one row (``name = trail_name``) of the table ``audit_head`` at ``url``.

    ``read`` never creates anything (a database without the table, or without the row, has no
    head: None); ``write`` creates the table on first use (``CREATE TABLE IF NOT EXISTS``, only
    this table) and upserts the row in one committed transaction. On SQLite the connections
    this class opens use ``synchronous=FULL`` so a written head survives a power loss; the
    database's journal mode (the QC service uses WAL) is left as it is.
    """

    def __init__(self, url: str, trail_name: str = "audit") -> None:
        if not isinstance(trail_name, str) or not trail_name.strip():
            raise SitebenchError("audit head trail_name must be non-empty text")
        import sqlalchemy as sa

        self.url = url
        self.trail_name = trail_name
        try:
            self.engine = sa.create_engine(url, future=True)
        except Exception as exc:  # noqa: BLE001 - bad URL, missing driver
            raise SitebenchError(f"cannot open audit head database {_safe(url)!r}: {exc}") from None
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._metadata = sa.MetaData()
        self.table = sa.Table(
            TABLE_NAME, self._metadata,
            sa.Column("name", sa.String(200), primary_key=True),
            sa.Column("seq", sa.Integer, nullable=False),
            sa.Column("sha256", sa.String(64), nullable=False),
            sa.Column("updated_utc", sa.String(40), nullable=False),
        )
        self._created = False

    def __repr__(self) -> str:
        return f"SqlAuditHead({_safe(self.url)!r}, trail_name={self.trail_name!r})"

    def read(self) -> tuple[int, str] | None:
        import sqlalchemy as sa

        if not self._created and self._missing_sqlite_file():
            return None  # reading never creates a database file
        try:
            if not self._created and not sa.inspect(self.engine).has_table(TABLE_NAME):
                return None
            with self.engine.connect() as conn:
                row = conn.execute(sa.select(self.table.c.seq, self.table.c.sha256)
                                   .where(self.table.c.name == self.trail_name)).first()
        except sa.exc.SQLAlchemyError as exc:
            raise SitebenchError(f"cannot read the audit head from {_safe(self.url)!r}: {_first_line(exc)}") from None
        return None if row is None else (int(row[0]), str(row[1]))

    def write(self, seq: int, sha256: str) -> None:
        import sqlalchemy as sa

        values: dict[str, Any] = {"seq": int(seq), "sha256": str(sha256), "updated_utc": utc_now()}
        try:
            if not self._created:
                self._metadata.create_all(self.engine, tables=[self.table], checkfirst=True)
                self._created = True
            for _attempt in range(2):  # a concurrent first insert: the second try updates
                try:
                    with self.engine.begin() as conn:
                        done = conn.execute(sa.update(self.table).where(self.table.c.name == self.trail_name)
                                            .values(**values)).rowcount
                        if not done:
                            conn.execute(sa.insert(self.table).values(name=self.trail_name, **values))
                    return
                except sa.exc.IntegrityError:
                    continue
            raise SitebenchError(f"cannot write the audit head to {_safe(self.url)!r}: concurrent inserts")
        except sa.exc.SQLAlchemyError as exc:
            raise SitebenchError(f"cannot write the audit head to {_safe(self.url)!r}: {_first_line(exc)}") from None

    def _missing_sqlite_file(self) -> bool:
        if self.engine.dialect.name != "sqlite":
            return False
        database = self.engine.url.database
        if not database or database == ":memory:" or database.startswith("file:"):
            return False
        return not Path(database).exists()

    def close(self) -> None:
        """Close the pooled connections (a later call opens new ones)."""
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _safe(url: str) -> str:
    """The URL without credentials (``user:password@`` dropped)."""
    scheme, sep, rest = str(url).partition("://")
    return f"{scheme}{sep}{rest.split('@')[-1]}" if sep else str(url)


def _first_line(exc: BaseException) -> str:
    return str(getattr(exc, "orig", None) or exc).splitlines()[0] if str(exc) else type(exc).__name__
