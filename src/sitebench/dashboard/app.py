"""Routes of the operations dashboard, added to the gate's FastAPI app by :func:`mount`.

Sign-in: the user pastes their token (``qc users add`` printed it once); the page answers with a
session cookie signed with the store's ``session.key`` (itsdangerous, HMAC-SHA1 over a timestamped
payload), ``HttpOnly`` and ``SameSite=Strict``, bound to the token's digest so rotating or disabling
the user ends the session. Failed sign-ins are rate-limited per address. Forms carry a CSRF token
derived from the session. Every page checks :func:`sitebench.qc.access.allowed`; a refusal is a 403
page and an audit record.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from sitebench.errors import SitebenchError
from sitebench.qc.access import AccessDenied, Principal, allowed

if TYPE_CHECKING:
    from sitebench.dashboard.biomarkers import BiomarkerValues
    from sitebench.qc.intake import IntakeService

log = logging.getLogger("sitebench.dashboard")

__all__ = ["mount", "SESSION_COOKIE", "SESSION_HOURS"]

SESSION_COOKIE = "sitebench_session"
SESSION_HOURS = 8.0
FAILED_SIGN_INS_PER_MINUTE = 10.0
TEMPLATES = Path(__file__).resolve().parent / "templates"
STATUS_COLOURS = {"pass": "#2e7d32", "warn": "#f9a825", "fail": "#c62828", "undetermined": "#6d4c41",
                  "unmatched": "#757575"}


def _session_key(store: Path) -> bytes:
    """The store's cookie-signing secret (``<store>/session.key``, 0600, made on first use)."""
    from sitebench.durable import write_new_file

    path = Path(store) / "session.key"
    if not path.exists():
        try:
            write_new_file(path, secrets.token_hex(32).encode(), mode=0o600)
        except FileExistsError:
            pass
    return bytes.fromhex(path.read_text().strip())


class Revalidation:
    """Re-validation state of every site against the locked reports (sitebench.reports.coverage),
    recomputed at most once a minute: verifying a report hashes its files. One object serves the
    dashboard's pages and the gate's periodic re-validation alert, so reports are hashed once.
    A page never waits for a recompute once there is a state: a stale one is served while a
    background thread refreshes it (with 5,000 series a recompute takes a third of a second)."""

    def __init__(self, reports_root: str | Path | None = None, public_keys: list[str | Path] | None = None) -> None:
        self.reports_root = Path(reports_root) if reports_root else None
        self.public_keys = [Path(k) for k in public_keys or []]
        self._at, self._status = 0.0, None
        self._lock, self._refreshing = threading.Lock(), False

    def _compute(self, service: "IntakeService", reuse_reports: bool) -> Any:
        from sitebench.reports.coverage import GateRows, revalidation_status

        rows = GateRows.from_records(service.records, source=str(service.config.store))
        reports = self._status.reports if reuse_reports and self._status is not None else None
        try:
            status = revalidation_status(rows, self.reports_root, self.public_keys or None, reports=reports)
        except SitebenchError:  # an empty reports folder: no report covers anything yet
            status = revalidation_status(rows, None, None)
        with self._lock:
            self._status = status
            if reports is None:
                self._at = time.monotonic()
        return status

    def _refresh(self, service: "IntakeService") -> None:
        try:
            self._compute(service, reuse_reports=False)
        except Exception as exc:  # noqa: BLE001 - the stale state stays; the next page asks again
            log.error("re-validation refresh failed: %s", type(exc).__name__)
        finally:
            self._refreshing = False

    def status(self, service: "IntakeService", fresh: bool = False) -> Any:
        """The state for a page (stale at most a minute, refreshed behind it); ``fresh`` re-reads the
        gate's rows now, reusing the reports' checks while they are under a minute old (the alert)."""
        stale = self._status is None or time.monotonic() - self._at > 60
        if self._status is None or fresh:
            return self._compute(service, reuse_reports=not stale)
        if stale:
            with self._lock:
                start, self._refreshing = not self._refreshing, True
            if start:
                threading.Thread(target=self._refresh, args=(service,), name="revalidation", daemon=True).start()
        return self._status

    def alert_new_pending(self, service: "IntakeService") -> int:
        """Alert (``revalidation_pending``) each site change no signed report covers, once per change.

        The changes alerted are remembered in the gate's database (``revalidation_alerted``), so a
        restart does not repeat them; a change a report later covers simply stops being pending.
        """
        from sitebench.qc.notify import Alert

        if not (service.config.alerts and service.config.alerts.routes):
            return 0  # nothing remembered either: changes are alerted once alerts are configured
        done = set((service.records.load_state("revalidation_alerted") or {}).get("keys", []))
        alerts = []
        for pending in self.status(service, fresh=True).pending:
            for change, why in zip(pending.changes, pending.reasons):
                key = "|".join(str(v) for v in (pending.site, change.kind, change.scanner_id, change.after,
                                                change.since_series))
                if key in done:
                    continue
                done.add(key)
                alerts.append(Alert("revalidation_pending", pending.site,
                                    f"re-validation pending at {pending.site}: {change.describe()}; {why}",
                                    {"change": change.kind, "before": change.before, "after": change.after,
                                     "software_version": change.software_version, "scanner_key": change.scanner_id,
                                     "series_key": change.since_series, "since_utc": change.since_utc}))
        if alerts:
            service.send_alerts(alerts)
            service.records.save_state("revalidation_alerted", {"keys": sorted(done)})
        return len(alerts)


def check_mlflow_ui(mlflow_ui: str | None) -> None:
    """Only an http(s) MLflow UI address is linked (never a ``javascript:`` or file address)."""
    if mlflow_ui and not mlflow_ui.startswith(("http://", "https://")):
        raise SitebenchError(f"--mlflow-ui must be an http:// or https:// address, not {mlflow_ui!r}")


def mlflow_run_url(mlflow_ui: str | None, run: dict[str, str] | None) -> str | None:
    """The MLflow UI's page of a report's run (``<ui>/#/experiments/<id>/runs/<run>``), or None."""
    check_mlflow_ui(mlflow_ui)
    if not mlflow_ui or not run:
        return None
    return (f"{mlflow_ui.rstrip('/')}/#/experiments/{quote(run['experiment_id'], safe='')}"
            f"/runs/{quote(run['run_id'], safe='')}")


def mount(app: Any, service: "IntakeService", reports_root: str | Path | None = None,
          public_keys: list[str | Path] | None = None, mlflow_ui: str | None = None,
          revalidation: Revalidation | None = None, biomarkers: "BiomarkerValues | None" = None) -> None:
    """Add the dashboard's pages to ``app`` (the gate's STOW-RS app). ``reports_root`` holds the
    locked validation reports (``<name>/vNNN/``) the reports page lists and re-validation is judged
    against; ``public_keys`` check their sign-offs; ``mlflow_ui`` is the MLflow UI each report's
    run links to (without it the run id and its store are shown). ``revalidation`` shares one
    :class:`Revalidation` with the gate's alert (``qc serve``); else one is made of the reports.
    The site page charts each biomarker in ``biomarkers`` (by default those the reports locked
    predictions of), for the roles that may read reports (biomarker values can
    unblind a trial, so site staff see the image-quality charts only)."""
    check_mlflow_ui(mlflow_ui)
    revalidation = revalidation or Revalidation(reports_root, public_keys)
    from sitebench.dashboard.biomarkers import BiomarkerValues

    biomarker_values = biomarkers or BiomarkerValues(revalidation.reports_root)
    from itsdangerous import BadSignature, URLSafeTimedSerializer
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    from sitebench.qc.stow import RateLimiter

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]))
    env.globals["colours"] = STATUS_COLOURS
    session_key = _session_key(service.config.store)
    signer = URLSafeTimedSerializer(session_key, salt="sitebench-dashboard")
    failed_sign_ins = RateLimiter(FAILED_SIGN_INS_PER_MINUTE)

    def address(request: Request) -> str:
        return request.client.host if request.client else "?"

    def current(request: Request) -> Principal | None:
        raw = request.cookies.get(SESSION_COOKIE)
        if not raw:
            return None
        try:
            data = signer.loads(raw, max_age=int(SESSION_HOURS * 3600))
        except BadSignature:
            return None
        return service.users.session_principal(str(data.get("u")), str(data.get("f")))

    def csrf(request: Request) -> str:
        return hmac.new(session_key, (request.cookies.get(SESSION_COOKIE) or "").encode(), hashlib.sha256).hexdigest()[:32]

    def page(request: Request, template: str, who: Principal | None, status: int = 200, **context: Any) -> HTMLResponse:
        html = env.get_template(template).render(who=who, csrf=csrf(request) if who else "", **context)
        return HTMLResponse(html, status_code=status, headers={
            "Cache-Control": "no-store", "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
                                       "form-action 'self'; frame-ancestors 'none'"})

    def refuse(request: Request, who: Principal, what: str, why: str) -> HTMLResponse:
        service.refuse_access(who, what, address(request), why)
        return page(request, "error.html", who, status=403, title="Not allowed",
                    message="This page belongs to another site or role.")

    def need(request: Request) -> Principal | Response:
        who = current(request)
        if who is None:
            return RedirectResponse("/login", status_code=303)
        return who

    # ------------------------------------------------------------------ sign-in
    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request) -> HTMLResponse:
        return page(request, "login.html", None, title="Sign in", error=None)

    @app.post("/login", include_in_schema=False)
    def login(request: Request, token: str = Form("")) -> Response:
        who = service.users.authenticate(token.strip())
        if who is None:
            wait = failed_sign_ins.take(address(request))
            service.refuse_access(None, "dashboard sign-in", address(request), "no valid token")
            if wait:
                return page(request, "login.html", None, status=429, title="Sign in",
                            error=f"Too many failed sign-ins; try again in {max(1, math.ceil(wait))} s.")
            return page(request, "login.html", None, status=401, title="Sign in", error="That token is not valid.")
        service.audit.append(who=who.name, what="sign-in", why="dashboard", subject=f"user {who.name}",
                             details={"user": who.name, "role": who.role, "site": who.site, "address": address(request)})
        cookie = signer.dumps({"u": who.name, "f": service.users.session_fingerprint(who.name)})
        home = f"/sites/{who.site}" if who.site else "/reports" if who.role == "reader" else "/"
        response = RedirectResponse(home, status_code=303)
        response.set_cookie(SESSION_COOKIE, cookie, max_age=int(SESSION_HOURS * 3600), httponly=True,
                            samesite="strict", secure=request.url.scheme == "https", path="/")
        return response

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request) -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # ------------------------------------------------------------------ pages
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview(request: Request) -> Response:
        who = need(request)
        if not isinstance(who, Principal):
            return who
        if who.site:
            return RedirectResponse(f"/sites/{who.site}", status_code=303)
        if who.role == "reader":
            return RedirectResponse("/reports", status_code=303)
        if who.role not in ("central_monitor", "admin"):
            return refuse(request, who, "trial overview", "the overview is for central monitors")
        pending = {p.site: p for p in revalidation.status(service).pending}
        return page(request, "overview.html", who, title="Trial overview", rows=_overview(service), pending=pending)

    @app.get("/reports", response_class=HTMLResponse, include_in_schema=False)
    def reports_page(request: Request) -> Response:
        who = need(request)
        if not isinstance(who, Principal):
            return who
        if not allowed(who, "view_reports"):
            return refuse(request, who, "reports page", "reports are for monitors, readers and admins")
        from sitebench.reports.signing import read_signoffs

        status = revalidation.status(service)
        reports = [{"coverage": r, "signoffs": read_signoffs(r.report_dir),
                    "mlflow_url": mlflow_run_url(mlflow_ui, r.mlflow_run)} for r in status.reports]
        return page(request, "reports.html", who, title="Validation reports", reports=reports,
                    root=revalidation.reports_root, keys=bool(revalidation.public_keys), pending=status.pending)

    def site_viewer(request: Request, site: str, what: str) -> Principal | Response:
        """The signed-in user when they may see ``site``; else the sign-in redirect or an audited 403."""
        who = need(request)
        if not isinstance(who, Principal):
            return who
        if site not in service.config.sites or not allowed(who, "view_site", site):
            return refuse(request, who, f"{what} {site if site in service.config.sites else '(unknown site)'}",
                          "not this user's site or role")
        return who

    @app.get("/sites/{site}", response_class=HTMLResponse, include_in_schema=False)
    def site_page(request: Request, site: str) -> Response:
        who = site_viewer(request, site, "site page")
        if not isinstance(who, Principal):
            return who
        verdicts = service.records.latest_verdicts(site)
        biomarkers_shown = allowed(who, "view_reports")  # biomarker values can unblind: not for site staff
        biomarkers = biomarker_values.for_series([v["series_key"] for v in verdicts]) if biomarkers_shown else None
        return page(request, "site.html", who, title=f"Site {site}", site=site, verdicts=list(reversed(verdicts)),
                    timeline=_timeline_svg(verdicts, service.records.drift_events(site)),
                    charts=_control_charts(verdicts, biomarkers), biomarkers_shown=biomarkers_shown,
                    queries=service.queries.list(site=site))

    @app.get("/sites/{site}/visits", response_class=HTMLResponse, include_in_schema=False)
    def visits_page(request: Request, site: str) -> Response:
        who = site_viewer(request, site, "visits of")
        if not isinstance(who, Principal):
            return who
        return page(request, "visits.html", who, title=f"Site {site}: expected against received", site=site,
                    visits=service.visit_status(site), schedule=service.config.visit_schedule is not None)

    @app.get("/series/{series_key}", response_class=HTMLResponse, include_in_schema=False)
    def series_page(request: Request, series_key: str) -> Response:
        who = need(request)
        if not isinstance(who, Principal):
            return who
        verdict = next(iter(service.records.latest_verdicts(series_key=series_key)), None)
        if verdict is None or not allowed(who, "view_site", verdict["site"]):
            return refuse(request, who, "series page", "no such series for this user")
        queries = [q for q in service.queries.list(site=verdict["site"]) if q.series_key == series_key]
        return page(request, "series.html", who, title=f"Series {series_key[:12]}", verdict=verdict,
                    deviations=service.records.deviations_of(verdict["id"]), queries=queries,
                    history=_metric_history(service, verdict))

    @app.get("/series/{series_key}/montage.png", include_in_schema=False)
    def montage(request: Request, series_key: str) -> Response:
        who = need(request)
        if not isinstance(who, Principal):
            return who
        site = service.records.series_site(series_key)
        if site is None or not allowed(who, "view_site", site):
            return refuse(request, who, "series montage", "no such series for this user")
        from sitebench.qc.dicom_files import volume_from_summaries

        rows = service.records.series_files(series_key)
        root = Path(service.config.store)
        files = [p if Path(p).is_absolute() else root / p for p, problems, summary in rows if summary and not problems]
        summaries = [summary for _, problems, summary in rows if summary and not problems]
        try:
            volume, _ = volume_from_summaries(files, summaries)
        except (SitebenchError, ValueError, OSError):
            return Response(status_code=404)
        return Response(montage_png(volume), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/queries/{query_id}", response_class=HTMLResponse, include_in_schema=False)
    def query_page(request: Request, query_id: int) -> Response:
        who = need(request)
        if not isinstance(who, Principal):
            return who
        try:
            query = service.queries.get(query_id)
        except SitebenchError:
            return refuse(request, who, f"query {query_id}", "no such query")
        if not allowed(who, "view_site", query.site):
            return refuse(request, who, f"query {query_id}", "not this user's site or role")
        return page(request, "query.html", who, title=f"Query {query_id}", query=query, error=None,
                    can_manage=allowed(who, "manage_query", query.site),
                    can_answer=allowed(who, "answer_query", query.site))

    @app.post("/queries/{query_id}/{action}", include_in_schema=False)
    def query_step(request: Request, query_id: int, action: str, csrf_token: str = Form(""),
                   text: str = Form(""), kind: str = Form("")) -> Response:
        who = need(request)
        if not isinstance(who, Principal):
            return who
        if not hmac.compare_digest(csrf_token, csrf(request)):
            return refuse(request, who, f"query {query_id} {action}", "form without this session's CSRF token")
        steps = {"open": lambda: service.queries.open(query_id, who, text),
                 "answer": lambda: service.queries.answer(query_id, who, kind, text),
                 "accept": lambda: service.queries.accept(query_id, who, text),
                 "send-back": lambda: service.queries.send_back(query_id, who, text)}
        if action not in steps:
            return refuse(request, who, f"query {query_id} {action}", "no such step")
        try:
            steps[action]()
        except AccessDenied:
            return page(request, "error.html", who, status=403, title="Not allowed",
                        message="Your role or site may not take this step.")
        except SitebenchError as exc:
            query = service.queries.get(query_id)
            return page(request, "query.html", who, status=409, title=f"Query {query_id}", query=query,
                        error=str(exc), can_manage=allowed(who, "manage_query", query.site),
                        can_answer=allowed(who, "answer_query", query.site))
        return RedirectResponse(f"/queries/{query_id}", status_code=303)


# --------------------------------------------------------------------------- page data
def _overview(service: "IntakeService") -> list[dict[str, Any]]:
    """One row per configured site: verdict counts, open deviations and queries, re-scan rate,
    median upload-to-verdict time, last upload, drift events."""
    import statistics

    rows = {r.site: r for r in service.records.site_status()}
    open_queries = service.queries.open_counts()
    overdue: dict[str, int] = {}
    for visit in service.visit_status():
        overdue[visit["site"]] = overdue.get(visit["site"], 0) + (visit["status"] == "overdue")
    waits: dict[str, list[float]] = {}
    last: dict[str, str] = {}
    for site, checked, wait in service.records.verdict_timing():
        if wait is not None:
            waits.setdefault(site, []).append(float(wait))
        if checked and checked > last.get(site, ""):
            last[site] = checked
    uploaded = service.records.last_received_by_site(sorted(service.config.sites))
    out = []
    for site in sorted(service.config.sites):
        status = rows.get(site)
        out.append({"site": site, "series": status.series if status else 0, "passed": status.passed if status else 0,
                    "warned": status.warned if status else 0, "failed": status.failed if status else 0,
                    "open_deviations": status.open_deviations if status else 0,
                    "open_queries": open_queries.get(site, 0),
                    "rescan_rate": status.rescan_rate if status else 0.0,
                    "median_wait_s": statistics.median(waits[site]) if waits.get(site) else None,
                    "last_upload": uploaded.get(site, "")[:19].replace("T", " ") or None,
                    "last_checked": last.get(site), "drift_events": status.drift_events if status else 0,
                    "overdue_visits": overdue.get(site, 0)})
    return out


def _metric_history(service: "IntakeService", verdict: dict[str, Any]) -> list[dict[str, Any]]:
    """Each image-quality metric of the series against the same site's earlier series: mean, SD, z."""
    import statistics

    mine = verdict.get("image_quality") or {}
    others = [v.get("image_quality") or {} for v in service.records.latest_verdicts(verdict["site"])
              if v["id"] < verdict["id"]]
    out = []
    for name, value in sorted(mine.items()):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        past = [o[name] for o in others if isinstance(o.get(name), (int, float))]
        mean = statistics.fmean(past) if past else None
        sd = statistics.stdev(past) if len(past) > 1 else None
        z = (value - mean) / sd if mean is not None and sd else None
        out.append({"metric": name, "value": value, "mean": mean, "sd": sd, "z": z, "n": len(past)})
    return out


def montage_png(volume: Any, tiles: int = 12, columns: int = 4, tile_px: int = 160) -> bytes:
    """A grey-scale PNG of ``tiles`` slices spread evenly through the volume (its third axis, the
    stacking order), each scaled to ``tile_px`` and windowed at the volume's 1st-99th percentiles.
    Made from the pixel values alone: no text, no header field is drawn, so nothing identifies the
    patient beyond what the pixels themselves show."""
    import struct
    import zlib

    import numpy as np

    data = np.asarray(volume, dtype=np.float32)
    if data.ndim == 2:
        data = data[:, :, None]
    picks = np.unique(np.linspace(0, data.shape[2] - 1, min(tiles, data.shape[2])).round().astype(int))
    finite = data[np.isfinite(data)]
    low, high = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    scale = 255.0 / (high - low) if high > low else 0.0
    step = max(1, int(np.ceil(max(data.shape[0], data.shape[1]) / tile_px)))
    shots = [np.clip((np.nan_to_num(data[::step, ::step, k]) - low) * scale, 0, 255).astype(np.uint8) for k in picks]
    h, w = shots[0].shape
    rows = int(np.ceil(len(shots) / columns))
    sheet = np.zeros((rows * h, min(columns, len(shots)) * w), dtype=np.uint8)
    for i, shot in enumerate(shots):
        r, c = divmod(i, columns)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = shot
    raw = b"".join(b"\x00" + sheet[y].tobytes() for y in range(sheet.shape[0]))  # PNG filter 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", sheet.shape[1], sheet.shape[0], 8, 0, 0, 0, 0)  # 8-bit grey (PNG spec 11.2.2)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


#: series of a scanner that qualify its control-chart baseline (the first ones checked)
CHART_BASELINE = 20
#: rules the dashboard flags on: 1_3s and the EWMA. All five Westgard rules together, with limits
#: estimated from a 20-series baseline, alarm on a quarter to a third of in-control scanners within
#: 20 series (Jones, Champ & Rigdon 2001); 1_3s + EWMA keeps the false alarms rare and still sees a
#: sustained 1.5-sigma shift within a few series (EWMA ARL about 5, Lucas & Saccucci 1990).
CHART_RULES = ("1_3s", "ewma")


def _control_charts(verdicts: list[dict[str, Any]],
                    biomarkers: dict[str, dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """Per scanner, image-quality metric and validated biomarker (``biomarkers``: series key ->
    {label: value}, :class:`~sitebench.dashboard.biomarkers.BiomarkerValues`): a Shewhart/EWMA/Westgard
    chart (qc.control_charts) fitted on the first :data:`CHART_BASELINE` series that have the value
    and judging the rest; an inline SVG each, with software-version changes marked. Too few series:
    no chart."""
    from sitebench.dashboard.biomarkers import measures
    from sitebench.qc.control_charts import MIN_BASELINE, ControlChart

    by_scanner: dict[str, list[dict[str, Any]]] = {}
    for v in verdicts:
        by_scanner.setdefault(v.get("scanner") or "unknown scanner", []).append(v)
    out = []
    for scanner, rows in sorted(by_scanner.items()):
        rows = sorted(rows, key=lambda r: r["id"])
        measured = [measures(r, (biomarkers or {}).get(r["series_key"])) for r in rows]
        names = {name: kind for m in measured for name, (kind, _) in m.items()}
        for metric, kind in sorted(names.items(), key=lambda item: (item[1] != "image quality", item[0])):
            having = [(r, m[metric][1]) for r, m in zip(rows, measured, strict=True)
                      if metric in m and math.isfinite(m[metric][1])]
            baseline_n = min(CHART_BASELINE, len(having) - 1)
            if baseline_n < MIN_BASELINE:
                continue
            charted, values = [r for r, _ in having], [v for _, v in having]
            try:
                result = ControlChart(metric=metric, rules=CHART_RULES).fit_chart(values[:baseline_n], values[baseline_n:])
            except SitebenchError:
                continue
            monitored = charted[baseline_n:]
            flagged = [(monitored[i]["series_key"], result.flags[i]) for i in range(len(monitored))
                       if result.out_of_control[i]]
            out.append({"scanner": scanner, "metric": metric, "kind": kind, "baseline": baseline_n,
                        "flagged": flagged, "svg": _chart_svg(values, baseline_n, result, charted)})
    return out


def _chart_svg(values: list[float], baseline_n: int, result: Any, rows: list[dict[str, Any]], width: int = 720,
               height: int = 150) -> str:
    """Values in order (baseline grey, monitored blue, out of control red), centre and 3-sigma limits,
    the EWMA as a line, software-version changes dashed."""
    from html import escape

    finite = [v for v in values if math.isfinite(v)] + [result.ucl, result.lcl]
    low, high = min(finite), max(finite)
    pad = (high - low) * 0.08 or 1.0
    low, high = low - pad, high + pad
    n = len(values)

    def x(i: int) -> float:
        return 30 + (width - 40) * i / max(n - 1, 1)

    def y(v: float) -> float:
        return 10 + (height - 25) * (high - v) / (high - low)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="control chart">']
    for level, colour, dash in ((result.center, "#455a64", ""), (result.ucl, "#c62828", ' stroke-dasharray="5 3"'),
                                (result.lcl, "#c62828", ' stroke-dasharray="5 3"')):
        parts.append(f'<line x1="30" y1="{y(level):.1f}" x2="{width - 10}" y2="{y(level):.1f}" stroke="{colour}" '
                     f'stroke-width="0.8"{dash}/>')
    ewma_points = " ".join(f"{x(baseline_n + i):.1f},{y(e):.1f}" for i, e in enumerate(result.ewma) if math.isfinite(e))
    if ewma_points:
        parts.append(f'<polyline points="{ewma_points}" fill="none" stroke="#8e24aa" stroke-width="1"/>')
    previous = None
    for i, (v, row) in enumerate(zip(values, rows, strict=True)):
        software = row.get("software_version")
        if previous is not None and software != previous:
            parts.append(f'<line x1="{x(i):.1f}" y1="5" x2="{x(i):.1f}" y2="{height - 12}" stroke="#1565c0" '
                         f'stroke-dasharray="4 2"><title>software {escape(str(software))}</title></line>')
        previous = software
        if not math.isfinite(v):
            continue
        out = i >= baseline_n and bool(result.out_of_control[i - baseline_n])
        colour = "#c62828" if out else ("#9e9e9e" if i < baseline_n else "#1565c0")
        label = ", ".join(result.flags[i - baseline_n]) if out else ("baseline" if i < baseline_n else "in control")
        parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}"><title>'
                     f'{escape(row["series_key"][:12])}: {v:.4g} ({escape(label)})</title></circle>')
    parts.append(f'<text x="2" y="{y(result.ucl) + 3:.1f}" font-size="9">UCL</text>'
                 f'<text x="2" y="{y(result.lcl) + 3:.1f}" font-size="9">LCL</text></svg>')
    return "".join(parts)


def _timeline_svg(verdicts: list[dict[str, Any]], drift: list[dict[str, Any]], width: int = 720,
                  height: int = 90) -> str:
    """The site's series on a time axis, one dot per series in its verdict's colour, with a marker
    where a scanner's software version changes (an upgrade), where a new scanner or scanner model
    appears, and one per drift event. Inline SVG: no script."""
    from html import escape

    points = [(dt.datetime.fromisoformat(v["checked_utc"]), v) for v in verdicts if v.get("checked_utc")]
    if not points:
        return ""
    t0, t1 = min(p[0] for p in points), max(p[0] for p in points)
    span = max((t1 - t0).total_seconds(), 1.0)

    def x(t: dt.datetime) -> float:
        return 20 + (width - 40) * (t - t0).total_seconds() / span

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="series over time">', f'<line x1="20" y1="50" x2="{width - 20}" y2="50" stroke="#999"/>']
    software: dict[str, Any] = {}  # per scanner: a site with two scanners on two versions changes nothing
    models: dict[str, Any] = {}

    def marker(t: dt.datetime, colour: str, title: str, kind: str) -> str:
        return (f'<line class="{kind}" x1="{x(t):.1f}" y1="10" x2="{x(t):.1f}" y2="80" stroke="{colour}" '
                f'stroke-dasharray="4 2"><title>{escape(title)}</title></line>')

    for t, v in points:
        scanner = str(v.get("scanner") or "unknown scanner")
        if scanner not in software:
            if software:
                parts.append(marker(t, "#ef6c00", f"new scanner {scanner[:20]}", "scanner-change"))
        else:
            if v.get("model") != models[scanner]:
                parts.append(marker(t, "#ef6c00", f"{scanner[:20]}: model {models[scanner]} to {v.get('model')}",
                                    "scanner-change"))
            if v.get("software_version") != software[scanner]:
                parts.append(marker(t, "#1565c0", f"{scanner[:20]}: software {software[scanner]} to "
                                                  f"{v.get('software_version')}", "software-change"))
        software[scanner], models[scanner] = v.get("software_version"), v.get("model")
        parts.append(f'<circle cx="{x(t):.1f}" cy="50" r="5" fill="{STATUS_COLOURS.get(v["status"], "#000")}">'
                     f'<title>{escape(v["series_key"][:12])}: {escape(v["status"])}</title></circle>')
    verdict_time = {v["id"]: t for t, v in points}
    for event in drift:
        t = verdict_time.get(event.get("verdict_id"))
        if t is not None:
            parts.append(f'<path d="M{x(t):.1f},22 l-5,-9 h10 z" fill="#6a1b9a"><title>drift: '
                         f'{escape(str(event.get("parameter")))}</title></path>')
    parts.append(f'<text x="20" y="88" font-size="10">{escape(t0.strftime("%Y-%m-%d %H:%M"))}</text>'
                 f'<text x="{width - 20}" y="88" font-size="10" text-anchor="end">'
                 f'{escape(t1.strftime("%Y-%m-%d %H:%M"))}</text></svg>')
    return "".join(parts)
