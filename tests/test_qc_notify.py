"""Alerts reach real servers: aiosmtpd's SMTP server and an HTTP webhook receiver on local ports,
from the notifier alone and from a real `sitebench qc serve` that a failing upload reaches."""

from __future__ import annotations

import json
import threading
import time
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pydicom
import pytest
from test_qc_queries import upload, user, wait_for, wrong_flip_angle
from test_qc_stow import T1, Service, free_port

from sitebench.qc.notify import Alert, AlertRoutes, Notifier, check_no_identifiers, verify_signature

SECRET = "webhook-secret-for-tests"


class Mailbox:
    """A real SMTP server (aiosmtpd) that keeps what it receives."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list[tuple[list[str], bytes]] = []
        box = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
                box.messages.append((list(envelope.rcpt_tos), envelope.content))
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()


class Receiver:
    """A real HTTP server taking webhooks; ``codes`` are answered in turn (then 200)."""

    def __init__(self, codes: list[int] | None = None) -> None:
        self.received: list[tuple[dict, bytes]] = []
        self.codes = list(codes or [])
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's hook name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                self.send_response(receiver.codes.pop(0) if receiver.codes else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def servers(monkeypatch):
    monkeypatch.setenv("SITEBENCH_WEBHOOK_SECRET", SECRET)
    mailbox, receiver = Mailbox(), Receiver()
    yield mailbox, receiver
    mailbox.stop()
    receiver.stop()


def routes(mailbox: Mailbox, url: str, **extra) -> AlertRoutes:
    return AlertRoutes.model_validate({
        "smtp": {"host": "127.0.0.1", "port": mailbox.port, "sender": "gate@trial.example"},
        "routes": [{"sites": ["S01"], "role": "site_coordinator", "email": ["coord-s01@site.example"]},
                   {"sites": ["S02"], "role": "site_coordinator", "email": ["coord-s02@site.example"]},
                   {"kinds": ["series_failed", "drift"], "role": "central_monitor", "email": ["monitor@cro.example"],
                    "webhook": {"url": url, "secret_env": "SITEBENCH_WEBHOOK_SECRET"}}],
        "backoff_s": 0, **extra})


def failed_alert() -> Alert:
    return Alert("series_failed", "S01", "series a8e3f629d146 failed FlipAngle",
                 {"series_key": "a8e3f629d146aa00bb11", "deviation 1": "FlipAngle: expected 12 +/- 1, observed 25 (abs)"})


def test_email_and_signed_webhook_go_to_the_routes_of_the_site(servers):
    mailbox, receiver = servers
    deliveries = Notifier(routes(mailbox, receiver.url)).send(failed_alert())
    assert [(d.channel, d.ok) for d in deliveries] == [("email", True), ("email", True), ("webhook", True)]
    recipients = sorted(r for rcpt, _ in mailbox.messages for r in rcpt)
    assert recipients == ["coord-s01@site.example", "monitor@cro.example"]  # S02's coordinator hears nothing
    mail = message_from_bytes(mailbox.messages[0][1])
    assert mail["Subject"] == "[sitebench] S01 series failed: series a8e3f629d146 failed FlipAngle"
    assert "observed 25" in mail.get_payload()
    headers, body = receiver.received[0]
    assert json.loads(body)["details"]["series_key"] == "a8e3f629d146aa00bb11"
    stamp, signature = headers["X-Sitebench-Timestamp"], headers["X-Sitebench-Signature"]
    assert verify_signature(SECRET.encode(), stamp, body, signature)
    assert not verify_signature(b"another secret", stamp, body, signature)
    assert not verify_signature(SECRET.encode(), stamp, body.replace(b"25", b"26"), signature)
    assert not verify_signature(SECRET.encode(), stamp, body, signature, now=float(stamp) + 3600)  # a replay
    # the same finding again (a re-check, a restart) is not sent twice
    notifier = Notifier(routes(mailbox, receiver.url))
    notifier.send(failed_alert())
    assert notifier.send(failed_alert()) == []


def test_retries_on_5xx_not_on_4xx_and_one_dead_server_never_stops_the_others(servers, monkeypatch):
    mailbox, _ = servers
    flaky = Receiver([500, 503])
    refusing = Receiver([400])
    try:
        (_, _, hook) = Notifier(routes(mailbox, flaky.url)).send(failed_alert())
        assert hook.ok and hook.attempts == 3 and len(flaky.received) == 3
        (_, _, hook) = Notifier(routes(mailbox, refusing.url)).send(failed_alert())
        assert not hook.ok and hook.attempts == 1 and "HTTP 400" in hook.error and "\n" not in hook.error
        dead_smtp = routes(mailbox, flaky.url)
        dead_smtp.smtp.port = free_port()  # nothing listens there
        deliveries = Notifier(dead_smtp).send(failed_alert())
        mails = [d for d in deliveries if d.channel == "email"]
        (hook,) = [d for d in deliveries if d.channel == "webhook"]
        assert len(mails) == 2 and all(not m.ok and m.attempts == 3 for m in mails) and hook.ok
    finally:
        flaky.stop()
        refusing.stop()


def test_an_alert_with_an_identifier_is_refused_before_anything_is_sent(servers):
    mailbox, receiver = servers
    uid = str(pydicom.dcmread(next(T1.iterdir()), stop_before_pixels=True).SeriesInstanceUID)
    for alert in (Alert("series_failed", "S01", f"series {uid} failed", {}),
                  Alert("series_failed", "S01", "failed", {"PatientName": "Doe^Jane"}),
                  Alert("drift", "S01", "x", {"note": f"see {uid}"})):
        with pytest.raises(ValueError, match="pseudonym"):
            Notifier(routes(mailbox, receiver.url)).send(alert)
    with pytest.raises(ValueError, match="kind"):
        check_no_identifiers(Alert("bored", "S01", "x"))
    assert mailbox.messages == [] and receiver.received == []
    with pytest.raises(Exception, match="emails"):
        AlertRoutes.model_validate({"routes": [{"emails": ["x@y"]}]})


@pytest.fixture(scope="module")
def protocols(t1_protocols):
    return t1_protocols


def test_a_failed_upload_alerts_its_site_and_the_monitor(tmp_path, protocols, servers):
    mailbox, receiver = servers
    alerts = routes(mailbox, receiver.url).model_dump(mode="json")
    svc = Service(tmp_path, protocols, http={"max_requests_per_minute": 100000}, alerts=alerts)
    token = user(svc, "up-s01", "site_uploader", "S01")
    svc.start()
    try:
        upload(svc, "S01", wrong_flip_angle(tmp_path / "fa25"), token)
        assert wait_for(lambda: len(mailbox.messages) >= 2 and receiver.received, timeout=60)
        time.sleep(0.5)
    finally:
        svc.stop()
    texts = [content.decode("utf-8", "replace") for _, content in mailbox.messages] + \
        [body.decode() for _, body in receiver.received]
    assert all("FlipAngle" in t and "observed 25" in t for t in texts)
    first = pydicom.dcmread(next(T1.iterdir()), stop_before_pixels=True)
    identifiers = [str(first.get(k, "")).strip() for k in ("PatientName", "PatientID", "StudyInstanceUID")]
    assert not any(i and i in t for i in identifiers for t in texts)
    headers, body = receiver.received[0]
    assert verify_signature(SECRET.encode(), headers["X-Sitebench-Timestamp"], body, headers["X-Sitebench-Signature"])


def series_parts(out, **attrs) -> list[bytes]:
    """The T1 as a new series of the same study, with some attributes changed (a real upload's bytes)."""
    out.mkdir(parents=True, exist_ok=True)
    series_uid, parts = pydicom.uid.generate_uid(), []
    for i, path in enumerate(sorted(T1.iterdir())):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, pydicom.uid.generate_uid()
        for key, value in attrs.items():
            setattr(ds, key, value)
        ds.save_as(out / f"{i:04d}.dcm", enforce_file_format=True)
        parts.append((out / f"{i:04d}.dcm").read_bytes())
    return parts


def test_a_software_upgrade_no_report_covers_alerts_revalidation_pending_once(tmp_path, protocols, servers):
    mailbox, receiver = servers
    alerts = routes(mailbox, receiver.url).model_dump(mode="json")
    alerts["routes"].append({"kinds": ["revalidation_pending"], "role": "central_monitor",
                             "email": ["validation@cro.example"],
                             "webhook": {"url": receiver.url, "secret_env": "SITEBENCH_WEBHOOK_SECRET"}})
    svc = Service(tmp_path, protocols, http={"max_requests_per_minute": 100000}, alerts=alerts)
    token = user(svc, "up-s01", "site_uploader", "S01")

    def revalidation_mail():
        return [(to, content.decode("utf-8", "replace")) for to, content in mailbox.messages
                if "validation@cro.example" in to]

    svc.start()
    try:
        upload(svc, "S01", series_parts(tmp_path / "baseline"), token)
        assert wait_for(lambda: svc.records.latest_verdicts(), timeout=60)
        upload(svc, "S01", series_parts(tmp_path / "upgraded", SoftwareVersions="25\\LX\\MR Software release:RX29.1"),
               token)
        assert wait_for(revalidation_mail, timeout=60), svc.stderr
        time.sleep(1.5)
    finally:
        svc.stop()
    (mail,) = revalidation_mail()
    assert "re-validation pending at S01" in mail[1] and "RX29.1" in mail[1]
    hooks = [(h, json.loads(b)) for h, b in receiver.received if json.loads(b)["kind"] == "revalidation_pending"]
    (headers, body), = [(h, b) for h, b in receiver.received if json.loads(b)["kind"] == "revalidation_pending"]
    assert verify_signature(SECRET.encode(), headers["X-Sitebench-Timestamp"], body, headers["X-Sitebench-Signature"])
    assert hooks[0][1]["details"]["change"] == "software" and hooks[0][1]["site"] == "S01"
    first = pydicom.dcmread(next(T1.iterdir()), stop_before_pixels=True)
    identifiers = [str(first.get(k, "")).strip() for k in ("PatientName", "PatientID", "StudyInstanceUID",
                                                            "DeviceSerialNumber")]
    assert not any(i and i in text for i in identifiers for text in (mail[1], body.decode()))
    svc.start()  # a restart remembers what was alerted: the same change is not alerted again
    try:
        time.sleep(3)
    finally:
        svc.stop()
    assert len(revalidation_mail()) == 1
