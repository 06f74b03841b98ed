"""Deviation queries with the sites: a failed series is worked to closure, every step on record.

The clinical-trial data query, applied to imaging (as trial platforms such as Clario and Flywheel
run them; ICH E6(R3) 3.16 on resolving deviations with the site):

    drafted ──open──▶ open ──answer──▶ answered ──accept──▶ closed
    (gate, on a fail)   ▲                   │
                        └──── send back ◀───┘ (returned: the site answers again)

A passing re-scan of the same study and protocol closes an open, answered or returned query of
its site by itself and links to it. Who may take each step is :func:`sitebench.qc.access.allowed`
(``manage_query`` to open, accept and send back; ``answer_query`` for the site coordinator of the
query's site). Each step is one row in ``query_steps`` and one audit record; the text speaks of
series by their pseudonym only, never of a patient.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert, select, update

from sitebench.errors import SitebenchError
from sitebench.provenance import utc_now
from sitebench.qc.access import AccessDenied, Principal, allowed

__all__ = ["Query", "QueryBook", "DEFAULT_DAYS_TO_ANSWER", "STATUSES"]

STATUSES = ("draft", "open", "answered", "returned", "closed")
ANSWER_KINDS = ("rescan", "explanation")
DEFAULT_DAYS_TO_ANSWER = 5.0
_OPEN = ("open", "answered", "returned")


@dataclass
class Query:
    id: int
    site: str
    series_key: str
    status: str
    what_failed: list[dict[str, Any]]
    request: str
    created_utc: str
    opened_utc: str | None = None
    due_utc: str | None = None
    answer_kind: str | None = None
    answer: str | None = None
    rescan_series_key: str | None = None
    closed_utc: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)

    def overdue(self, now: dt.datetime | None = None) -> bool:
        """Waiting on the site past its due time (open or sent back, not yet answered)."""
        if self.status not in ("open", "returned") or not self.due_utc:
            return False
        return (now or dt.datetime.now(dt.timezone.utc)) > dt.datetime.fromisoformat(self.due_utc)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _request(what_failed: list[dict[str, Any]]) -> str:
    names = ", ".join(d["parameter"] for d in what_failed) or "the protocol check"
    return (f"The series failed on {names}. Re-scan with the locked protocol, or explain why the series should "
            f"be accepted as acquired (for example a documented protocol deviation).")


class QueryBook:
    """The queries of one QC database; ``audit`` is the store's :class:`sitebench.audit.AuditTrail`."""

    def __init__(self, records, audit, gate_who: str = "sitebench-gate") -> None:
        from sitebench.qc.records import queries, query_steps

        self._engine = records.engine
        self._q, self._steps = queries, query_steps
        self._audit = audit
        self._gate_who = gate_who

    # ------------------------------------------------------------------ the gate's side
    def draft_for_failure(self, verdict_id: int, outcome) -> int | None:
        """A draft query for a failed series (none for other verdicts, or when one is already there)."""
        if outcome.status != "fail":
            return None
        with self._engine.begin() as conn:
            existing = conn.execute(select(self._q.c.id).where(self._q.c.series_key == outcome.series_key)
                                    .where(self._q.c.status != "closed")).first()
            if existing:
                return None
            failed = [{"parameter": d.parameter, "expected": d.expected, "observed": _plain(d.observed),
                       "rule": d.rule} for d in outcome.deviations if d.status == "fail"]
            query_id = conn.execute(insert(self._q).values(
                site=outcome.site, series_key=outcome.series_key, study_key=outcome.study_key or None,
                protocol=outcome.protocol, verdict_id=verdict_id, status="draft", what_failed=json.dumps(failed),
                request=_request(failed), created_utc=utc_now(), overdue_alerted=False)).inserted_primary_key[0]
            self._step(conn, query_id, "drafted", Principal(self._gate_who, "gate"), "failed verdict")
        self._audit_step(int(query_id), "drafted", Principal(self._gate_who, "gate"), outcome.site, "failed verdict")
        return int(query_id)

    def link_rescan(self, outcome) -> list[int]:
        """A passing series closes its site's open queries on the same study and protocol (a re-scan)."""
        if outcome.status != "pass" or not outcome.study_key or not outcome.protocol:
            return []
        with self._engine.begin() as conn:
            ids = [r[0] for r in conn.execute(
                select(self._q.c.id).where(self._q.c.site == outcome.site)
                .where(self._q.c.study_key == outcome.study_key).where(self._q.c.protocol == outcome.protocol)
                .where(self._q.c.series_key != outcome.series_key)
                .where(self._q.c.status.in_(_OPEN + ("draft",))))]
            for query_id in ids:
                conn.execute(update(self._q).where(self._q.c.id == query_id).values(
                    status="closed", closed_utc=utc_now(), rescan_series_key=outcome.series_key,
                    answer_kind="rescan"))
                self._step(conn, query_id, "rescan passed", Principal(self._gate_who, "gate"),
                           f"series {outcome.series_key} passed")
        for query_id in ids:
            self._audit_step(query_id, "rescan passed", Principal(self._gate_who, "gate"), outcome.site,
                             f"series {outcome.series_key} passed")
        return ids

    # ------------------------------------------------------------------ people's side
    def open(self, query_id: int, who: Principal, note: str = "", days: float = DEFAULT_DAYS_TO_ANSWER) -> Query:
        query = self._check(query_id, who, "manage_query", ("draft",))
        due = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=days)).isoformat(timespec="seconds")
        return self._move(query, who, "opened", note, status="open", opened_utc=utc_now(), due_utc=due)

    def answer(self, query_id: int, who: Principal, kind: str, text: str) -> Query:
        if kind not in ANSWER_KINDS:
            raise SitebenchError(f"answer: {kind!r} is not one of {', '.join(ANSWER_KINDS)}")
        if not text.strip():
            raise SitebenchError("answer: say what was done or why")
        query = self._check(query_id, who, "answer_query", ("open", "returned"))
        return self._move(query, who, "answered", text, status="answered", answer_kind=kind, answer=text.strip())

    def accept(self, query_id: int, who: Principal, note: str = "") -> Query:
        query = self._check(query_id, who, "manage_query", ("answered",))
        return self._move(query, who, "accepted", note, status="closed", closed_utc=utc_now())

    def send_back(self, query_id: int, who: Principal, note: str, days: float = DEFAULT_DAYS_TO_ANSWER) -> Query:
        if not note.strip():
            raise SitebenchError("send back: say what the site should do instead")
        query = self._check(query_id, who, "manage_query", ("answered",))
        due = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=days)).isoformat(timespec="seconds")
        return self._move(query, who, "returned", note, status="returned", due_utc=due, overdue_alerted=False)

    # ------------------------------------------------------------------ reading
    def get(self, query_id: int) -> Query:
        with self._engine.connect() as conn:
            row = conn.execute(select(self._q).where(self._q.c.id == query_id)).mappings().first()
            if row is None:
                raise SitebenchError(f"no query {query_id}")
            steps = conn.execute(select(self._steps).where(self._steps.c.query_id == query_id)
                                 .order_by(self._steps.c.id)).mappings().all()
        return _query(row, [dict(s) for s in steps])

    def list(self, site: str | None = None, status: str | tuple[str, ...] | None = None) -> list[Query]:
        stmt = select(self._q).order_by(self._q.c.id)
        if site is not None:
            stmt = stmt.where(self._q.c.site == site)
        if status is not None:
            stmt = stmt.where(self._q.c.status.in_((status,) if isinstance(status, str) else status))
        with self._engine.connect() as conn:
            return [_query(r, []) for r in conn.execute(stmt).mappings().all()]

    def open_counts(self) -> dict[str, int]:
        """Open (not yet closed, not draft) queries per site: the overview's column."""
        counts: dict[str, int] = {}
        for q in self.list(status=_OPEN):
            counts[q.site] = counts.get(q.site, 0) + 1
        return counts

    def overdue_unalerted(self, now: dt.datetime | None = None) -> list[Query]:
        """Queries past due whose site has not been alerted yet; :meth:`mark_alerted` after sending."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(self._q).where(self._q.c.status.in_(("open", "returned")))
                                .where(self._q.c.overdue_alerted.is_(False))).mappings().all()
        return [q for q in (_query(r, []) for r in rows) if q.overdue(now)]

    def mark_alerted(self, query_id: int) -> None:
        with self._engine.begin() as conn:
            conn.execute(update(self._q).where(self._q.c.id == query_id).values(overdue_alerted=True))

    # ------------------------------------------------------------------ internals
    def _check(self, query_id: int, who: Principal, action: str, states: tuple[str, ...]) -> Query:
        query = self.get(query_id)
        if not allowed(who, action, query.site):
            self._audit.append(who=who.name, what="access refused", why=f"{action} needs another role or site",
                               subject=f"query {query_id}", details={"user": who.name, "role": who.role,
                                                                     "user_site": who.site, "site": query.site})
            raise AccessDenied(f"{who.describe()} may not {action.replace('_', ' ')} of site {query.site}")
        if query.status not in states:
            raise SitebenchError(f"query {query_id} is {query.status}; this step needs it {' or '.join(states)}")
        return query

    def _move(self, query: Query, who: Principal, step: str, note: str, **values: Any) -> Query:
        with self._engine.begin() as conn:
            moved = conn.execute(update(self._q).where(self._q.c.id == query.id)
                                 .where(self._q.c.status == query.status).values(**values)).rowcount
            if not moved:  # someone else moved it meanwhile
                raise SitebenchError(f"query {query.id} changed meanwhile; reload it")
            self._step(conn, query.id, step, who, note)
        self._audit_step(query.id, step, who, query.site, note)
        return self.get(query.id)

    def _step(self, conn, query_id: int, step: str, who: Principal, note: str) -> None:
        conn.execute(insert(self._steps).values(query_id=query_id, step=step, who=who.name, role=who.role,
                                                note=note or None, utc=utc_now()))

    def _audit_step(self, query_id: int, step: str, who: Principal, site: str, note: str) -> None:
        self._audit.append(who=who.name, what=f"query {step}", why=note or step, subject=f"query {query_id}",
                           details={"site": site, "role": who.role})


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else json.dumps(value, default=str)


def _query(row, steps: list[dict[str, Any]]) -> Query:
    data = dict(row)
    return Query(id=data["id"], site=data["site"], series_key=data["series_key"], status=data["status"],
                 what_failed=json.loads(data["what_failed"]), request=data["request"],
                 created_utc=data["created_utc"], opened_utc=data["opened_utc"], due_utc=data["due_utc"],
                 answer_kind=data["answer_kind"], answer=data["answer"],
                 rescan_series_key=data["rescan_series_key"], closed_utc=data["closed_utc"], steps=steps)
