"""Alerts to trial operations, routed per site and per role: email over SMTP and signed webhooks.

Sent on a failed series, drift against the qualified baseline, a software upgrade, an overdue
visit, re-validation pending and a query waiting past its deadline. An alert names the site, the
series pseudonym and what was found, never a patient: :func:`check_no_identifiers` refuses any
alert holding a PHI attribute or a DICOM UID before anything is sent.

Webhooks carry the JSON alert, signed as Stripe and GitHub sign theirs: header
``X-Sitebench-Signature: sha256=<hex>`` is HMAC-SHA256 (RFC 2104) over ``<timestamp>.<body>`` with
the route's secret, and ``X-Sitebench-Timestamp`` is that Unix time, so a receiver can refuse a
replay (:func:`verify_signature`). The secret is read from the environment variable the route
names; it is never in the configuration file. A destination that fails is retried (connection
errors and 5xx, with backoff) and reported; it never stops the others or the gate.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import smtplib
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any, Literal

from pydantic import Field

from sitebench.config import StrictModel
from sitebench.provenance import utc_now

__all__ = ["ALERT_KINDS", "Alert", "AlertRoutes", "Delivery", "Notifier", "check_no_identifiers", "sign",
           "verify_signature"]

ALERT_KINDS = ("series_failed", "drift", "software_upgrade", "visit_overdue", "revalidation_pending",
               "query_overdue")
_PHI_KEYS = re.compile(r"patient|accession|birth|(study|series|sop)instanceuid|referringphysician", re.I)
_UID = re.compile(r"\b\d+(?:\.\d+){4,}\b")
log = logging.getLogger("sitebench.qc.notify")


@dataclass
class Alert:
    kind: str
    site: str
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    created_utc: str = field(default_factory=utc_now)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "site": self.site, "summary": self.summary, "details": self.details,
                "created_utc": self.created_utc}

    def dedupe_key(self) -> str:
        subject = self.details.get("series_key") or self.details.get("query") or self.summary
        return f"{self.kind}|{self.site}|{subject}|{self.details.get('parameter', '')}"


def check_no_identifiers(alert: Alert) -> None:
    """Raise ValueError when an alert would carry a patient identifier or a DICOM UID."""
    if alert.kind not in ALERT_KINDS:
        raise ValueError(f"unknown alert kind {alert.kind!r}")
    for key in alert.details:
        if _PHI_KEYS.search(str(key)):
            raise ValueError(f"alert detail {key!r} is an identifier; alerts name series by pseudonym only")
    for text in [alert.summary, alert.site, *map(str, alert.details.values())]:
        if _UID.search(text):
            raise ValueError("alert text holds a DICOM UID; alerts name series by pseudonym only")


class SmtpServer(StrictModel):
    host: str = "127.0.0.1"
    port: int = 25
    sender: str = "sitebench-gate@localhost"
    starttls: bool = False
    username_env: str | None = None
    password_env: str | None = None
    timeout_s: float = 10.0


class WebhookTarget(StrictModel):
    url: str
    #: environment variable holding the HMAC secret (never the secret itself)
    secret_env: str


class Route(StrictModel):
    kinds: list[Literal["*", "series_failed", "drift", "software_upgrade", "visit_overdue", "revalidation_pending",
                        "query_overdue"]] = Field(default_factory=lambda: ["*"])
    sites: list[str] = Field(default_factory=lambda: ["*"])
    #: who the route is for (central_monitor, site_coordinator, ...): recorded with each delivery
    role: str = "central_monitor"
    email: list[str] = Field(default_factory=list)
    webhook: WebhookTarget | None = None


class AlertRoutes(StrictModel):
    """``alerts:`` of the intake YAML."""
    smtp: SmtpServer | None = None
    routes: list[Route] = Field(default_factory=list)
    attempts: int = Field(default=3, ge=1)
    backoff_s: float = Field(default=1.0, ge=0)


@dataclass
class Delivery:
    channel: str  # email | webhook
    target: str  # the address, or the webhook's host
    role: str
    ok: bool
    attempts: int
    error: str = ""


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, timestamp: str, body: bytes, header: str, tolerance_s: float = 300,
                     now: float | None = None) -> bool:
    """What a webhook receiver checks: the signature over ``timestamp.body``, and a fresh timestamp."""
    try:
        age = abs((now if now is not None else time.time()) - float(timestamp))
    except ValueError:
        return False
    return age <= tolerance_s and hmac.compare_digest(sign(secret, timestamp, body), header or "")


class Notifier:
    """Sends each alert to the routes that match its kind and site; one failure never stops the rest."""

    def __init__(self, routes: AlertRoutes | None) -> None:
        self.routes = routes or AlertRoutes()
        self._sent: set[str] = set()

    def send(self, alert: Alert) -> list[Delivery]:
        check_no_identifiers(alert)
        key = alert.dedupe_key()
        if key in self._sent:  # the same finding twice (a re-check, a restart's recovery): one alert
            return []
        self._sent.add(key)
        out = []
        for route in self.routes.routes:
            if not (("*" in route.kinds or alert.kind in route.kinds) and ("*" in route.sites or alert.site in route.sites)):
                continue
            if route.email:
                out.append(self._email(alert, route))
            if route.webhook is not None:
                out.append(self._webhook(alert, route))
        for d in out:
            if not d.ok:
                log.warning("alert %s for %s not delivered by %s to %s: %s", alert.kind, alert.site, d.channel,
                            d.target, d.error)
        return out

    def _retrying(self, attempt) -> tuple[bool, int, str]:
        error = ""
        for n in range(1, self.routes.attempts + 1):
            try:
                attempt()
                return True, n, ""
            except _Permanent as exc:
                return False, n, str(exc)
            except (OSError, smtplib.SMTPException, _Transient) as exc:
                error = f"{type(exc).__name__}: {exc}"[:200]
                if n < self.routes.attempts:
                    time.sleep(self.routes.backoff_s * 2 ** (n - 1))
        return False, self.routes.attempts, error

    def _email(self, alert: Alert, route: Route) -> Delivery:
        smtp = self.routes.smtp
        target = ", ".join(route.email)
        if smtp is None:
            return Delivery("email", target, route.role, False, 0, "no smtp server configured under alerts.smtp")
        message = EmailMessage()
        message["Subject"] = f"[sitebench] {alert.site} {alert.kind.replace('_', ' ')}: {alert.summary}"
        message["From"], message["To"] = smtp.sender, target
        lines = [alert.summary, "", f"Site: {alert.site}", f"Kind: {alert.kind}", f"When (UTC): {alert.created_utc}"]
        lines += [f"{k}: {v}" for k, v in alert.details.items()]
        message.set_content("\n".join(lines) + "\n\n" + json.dumps(alert.to_dict(), indent=2, default=str) + "\n")

        def attempt() -> None:
            with smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout_s) as client:
                if smtp.starttls:
                    client.starttls()
                if smtp.username_env:
                    client.login(os.environ.get(smtp.username_env, ""), os.environ.get(smtp.password_env or "", ""))
                client.send_message(message)

        ok, n, error = self._retrying(attempt)
        return Delivery("email", target, route.role, ok, n, error)

    def _webhook(self, alert: Alert, route: Route) -> Delivery:
        hook = route.webhook
        assert hook is not None
        host = urllib.parse.urlsplit(hook.url).netloc or hook.url
        secret = os.environ.get(hook.secret_env)
        if not secret:
            return Delivery("webhook", host, route.role, False, 0, f"environment variable {hook.secret_env} is not set")
        body = json.dumps(alert.to_dict(), sort_keys=True, default=str).encode()

        def attempt() -> None:
            timestamp = str(int(time.time()))
            request = urllib.request.Request(hook.url, data=body, method="POST", headers={
                "Content-Type": "application/json", "X-Sitebench-Timestamp": timestamp,
                "X-Sitebench-Signature": sign(secret.encode(), timestamp, body)})
            try:
                with urllib.request.urlopen(request, timeout=10) as reply:
                    reply.read()
            except urllib.error.HTTPError as exc:
                if exc.code >= 500:
                    raise _Transient(f"HTTP {exc.code}") from None
                raise _Permanent(f"HTTP {exc.code}: the receiver refused the alert") from None

        ok, n, error = self._retrying(attempt)
        return Delivery("webhook", host, route.role, ok, n, error)


class _Transient(Exception):
    pass


class _Permanent(Exception):
    pass
