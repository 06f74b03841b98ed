"""STOW-RS upload as an attacker or a broken client sends it: one regression test per finding.

Every test talks real HTTP (requests, or a raw socket) to the real `sitebench qc serve` in a
subprocess, with a real SQLite database and audit trail in a temp folder, and sends files of
the GE 3D T1 series from ../shared/data/dicom.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
import requests
import yaml

from sitebench.qc.records import QCRecords, database_url

DICOM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
T1 = DICOM / "dcm_qa_deident" / "In"
TOKENS = {"S01": "s01-token", "S02": "s02-token"}
BOUNDARY = "sitebench-test-boundary"

pytestmark = [
    pytest.mark.dicom_net,  # starts the intake service's listeners
    pytest.mark.skipif(not T1.exists(), reason="needs ../shared/data/dicom"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def protocols(t1_protocols) -> Path:
    return t1_protocols


class Service:
    """`sitebench qc serve` in a subprocess (HTTP only), its stderr collected as it comes."""

    def __init__(self, tmp: Path, protocols: Path, http: dict | None = None, **overrides) -> None:
        self.store = tmp / "store"
        self.http_port = free_port()
        sites = {site: {"ae_titles": [f"{site}_MR1"], "http_token_sha256": [sha256(token.encode())]}
                 for site, token in TOKENS.items()}
        config = {"store": str(self.store), "protocols": str(protocols), "sites": sites, "dicom": None,
                  "http": {"host": "127.0.0.1", "port": self.http_port, **(http or {})},
                  "quiet_seconds": 1.0, "image_quality": False, **overrides}
        self.config = tmp / "intake.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.proc: subprocess.Popen | None = None
        self._stderr: list[str] = []

    def start(self) -> "Service":
        self.proc = subprocess.Popen([sys.executable, "-m", "sitebench.cli", "qc", "serve", "--config", str(self.config)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert '"listening"' in line, line + self.proc.stderr.read()
        threading.Thread(target=lambda: self._stderr.extend(iter(self.proc.stderr.readline, "")), daemon=True).start()
        return self

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        return self.stderr

    @property
    def records(self) -> QCRecords:
        return QCRecords(database_url(self.store))

    def known(self) -> set[str]:
        return self.records.known_sha256()

    def tmp_files(self) -> list[Path]:
        return [p for p in (self.store / "objects" / "tmp").iterdir()]

    def audit(self) -> list[dict]:
        return [json.loads(line) for line in (self.store / "audit.jsonl").read_text().splitlines()]

    def post(self, site: str, body, content_type: str | None = None, token: str | None = "default",
             timeout: float = 60, **headers) -> requests.Response:
        token = TOKENS.get(site, TOKENS["S01"]) if token == "default" else token
        if content_type is None:
            content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
        headers = {"Content-Type": content_type, **headers}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return requests.post(f"{self.url}/dicomweb/{site}/studies", data=body, headers=headers, timeout=timeout)

    def stow(self, site: str, parts: list[bytes], **kwargs) -> tuple[int, dict]:
        reply = self.post(site, multipart(parts), **kwargs)
        return reply.status_code, reply.json()

    def status(self, token: str | None = TOKENS["S01"], timeout: float = 10) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(f"{self.url}/status", headers=headers, timeout=timeout)


def multipart(parts: list[bytes], boundary: str = BOUNDARY, headers: list[dict] | None = None,
              close: bool = True) -> bytes:
    out = []
    for i, part in enumerate(parts):
        head = (headers[i] if headers else None) or {"Content-Type": "application/dicom"}
        out.append(b"--" + boundary.encode() + b"\r\n"
                   + b"".join(f"{k}: {v}\r\n".encode() for k, v in head.items()) + b"\r\n" + part + b"\r\n")
    return b"".join(out) + (b"--" + boundary.encode() + b"--\r\n" if close else b"")


@pytest.fixture(scope="module")
def server(tmp_path_factory, protocols):
    """One service for the tests that need no special limits: 0.5 MB per file, 2000 parts per request."""
    svc = Service(tmp_path_factory.mktemp("stow"), protocols, http={"max_requests_per_minute": 100000},
                  max_file_mb=0.5).start()
    yield svc
    if svc.proc.poll() is None:
        svc.stop()


@pytest.fixture
def service(server):
    """The shared service; each test ends with no traceback in its log and no temp file left."""
    yield server
    deadline = time.monotonic() + 5
    while server.tmp_files() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.tmp_files()
    assert "Traceback" not in server.stderr, server.stderr[-3000:]


@pytest.fixture(scope="module")
def t1_files() -> list[Path]:
    return sorted(T1.iterdir())


def new_instance(path: Path, out: Path, **attributes) -> bytes:
    """A copy of a T1 slice as a new instance, with attributes set; its bytes."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    for name, value in attributes.items():
        setattr(ds, name, value)
    ds.save_as(out, enforce_file_format=True)
    return out.read_bytes()


# --------------------------------------------------------------------------- malformed requests
def test_malformed_requests_answer_400_and_store_nothing(service, t1_files):
    before = service.known()
    good = t1_files[0].read_bytes()
    cases = {
        "boundary mismatch": (multipart([good], boundary="other-boundary"), None),
        "empty body": (b"", None),
        "garbage before the first delimiter": (b"garbage" + multipart([good]), None),
        "epilogue only": (b"--" + BOUNDARY.encode() + b"--\r\nepilogue\r\n", None),
        "truncated final part": (multipart([good, good[:50000]], close=False), None),
        "no boundary": (multipart([good]), 'multipart/related; type="application/dicom"'),
        "empty single body": (b"", "application/dicom"),
    }
    for name, (body, content_type) in cases.items():
        reply = service.post("S01", body, content_type=content_type)
        assert reply.status_code == 400, (name, reply.status_code, reply.text)
        assert reply.json()["error"], name
    assert service.known() == before  # not even the complete first part of the truncated request
    for content_type in ("text/plain", f"multipart/form-data; boundary={BOUNDARY}",
                         f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}'):
        assert service.post("S01", multipart([good]), content_type=content_type).status_code == 415


def test_duplicate_part_in_one_request_is_failed(service, t1_files):
    data = t1_files[1].read_bytes()
    code, reply = service.stow("S01", [data, data])
    assert code == 202, reply
    (stored,) = reply["00081199"]
    (failed,) = reply["00081198"]
    assert stored["part"] == 0 and stored["sha256"] == sha256(data) and stored["series_key"]
    assert failed["part"] == 1 and failed["reason"] == "duplicate of part 0" and failed["00081197"] == 0x0111
    # sent again, intact: a duplicate of a stored copy is fine
    code, reply = service.stow("S01", [data])
    assert code == 200 and reply["00081199"][0]["status"] == "duplicate", reply


def test_resent_bad_file_is_failed_with_its_stored_problems(service):
    bad = b"this is not DICOM\n" * 20
    code, first = service.stow("S01", [bad])
    assert code == 409 and "not a DICOM file" in first["00081198"][0]["reason"], first
    code, again = service.stow("S01", [bad])
    assert code == 409, again
    (failed,) = again["00081198"]
    assert "not a DICOM file" in failed["reason"] and failed["sha256"] == sha256(bad), again
    assert failed["status"] == "duplicate" and failed["00081197"] == 0xC000
    assert not again["00081199"]


def test_delimiter_inside_a_file_is_content_not_a_boundary(service, t1_files, tmp_path):
    """The README's example: ImageComments '--B' and 'x--B--y' with boundary=B (the old parser split there)."""
    files = [new_instance(t1_files[2], tmp_path / "a.dcm", ImageComments="--B"),
             new_instance(t1_files[3], tmp_path / "b.dcm", ImageComments="x--B--y")]
    assert all(b"--B" in f for f in files)
    reply = service.post("S01", multipart(files, boundary="B"),
                         content_type='multipart/related; type="application/dicom"; boundary=B')
    assert reply.status_code == 200, reply.text
    stored = reply.json()["00081199"]
    assert [s["sha256"] for s in stored] == [sha256(f) for f in files]
    for entry, data in zip(stored, files):  # the stored object is the file, byte for byte
        (path,) = (service.store / "objects" / "S01").glob(f"*/{entry['sha256']}")
        assert path.read_bytes() == data


def test_part_headers_are_honoured(service, t1_files):
    a, b, c = (f.read_bytes() for f in t1_files[4:7])
    headers = [{"Content-Type": "application/dicom", "Content-Length": str(len(a) + 10)},
               {"Content-Type": "application/dicom", "Content-Length": str(len(b))},
               {"Content-Type": "text/plain"}]
    reply = service.post("S01", multipart([a, b, c], headers=headers))
    assert reply.status_code == 202, reply.text
    body = reply.json()
    assert [s["part"] for s in body["00081199"]] == [1]
    failed = {f["part"]: f for f in body["00081198"]}
    assert failed[0]["reason"] == f"Content-Length says {len(a) + 10}, received {len(a)}"
    assert "text/plain" in failed[2]["reason"]
    assert sha256(a) not in service.known() and sha256(c) not in service.known()


def test_part_over_the_size_limit_is_refused_and_the_others_stored(service, t1_files):
    big = b"\x00" * 600_000  # max_file_mb 0.5
    good = t1_files[7].read_bytes()
    code, reply = service.stow("S01", [big, good])
    assert code == 202, reply
    (failed,) = reply["00081198"]
    assert failed["part"] == 0 and failed["00081197"] == 0xA700 and "limit" in failed["reason"]
    assert reply["00081199"][0]["sha256"] == sha256(good)
    assert sha256(big) not in service.known()
    assert not list((service.store / "objects").rglob(sha256(big)))
    deadline = time.monotonic() + 5
    while not any(r["what"] == "file refused" for r in service.audit()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any(r["what"] == "file refused" and "limit" in r["why"] for r in service.audit())
    # declared too large in the part's Content-Length: refused without reading it to disk
    reply = service.post("S01", multipart([big], headers=[{"Content-Type": "application/dicom",
                                                           "Content-Length": str(len(big))}]))
    assert reply.status_code == 409 and reply.json()["00081198"][0]["00081197"] == 0xA700
    # a single application/dicom body over the limit: 413, not stored
    reply = service.post("S01", big, content_type="application/dicom")
    assert reply.status_code == 413 and sha256(big) not in service.known()


def test_single_application_dicom_body_is_stored(service, t1_files):
    data = t1_files[8].read_bytes()
    reply = service.post("S01", data, content_type="application/dicom")
    assert reply.status_code == 200, reply.text
    assert reply.json()["00081199"][0]["sha256"] == sha256(data) and sha256(data) in service.known()


# --------------------------------------------------------------------------- load
def _poll_status(service: Service, stop: threading.Event, latencies: list[float]) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        reply = service.status(timeout=10)
        assert reply.status_code == 200
        latencies.append(time.perf_counter() - start)
        time.sleep(0.02)


def test_too_many_parts_is_413_and_status_stays_responsive(service, t1_files):
    before = service.known()
    body = multipart([f"tiny part {i}\n".encode() for i in range(10_000)])
    assert len(body) < 1_000_000
    stop, latencies = threading.Event(), []
    poller = threading.Thread(target=_poll_status, args=(service, stop, latencies))
    poller.start()
    time.sleep(0.1)
    reply = service.post("S01", body)
    time.sleep(0.1)
    # 10 concurrent uploads of real files
    chunks = [t1_files[20 + 10 * i: 30 + 10 * i] for i in range(10)]
    codes = []
    uploads = [threading.Thread(target=lambda c=c: codes.append(service.stow("S01", [f.read_bytes() for f in c])[0]))
               for c in chunks]
    for t in uploads:
        t.start()
    for t in uploads:
        t.join(timeout=120)
    stop.set()
    poller.join(timeout=20)
    assert reply.status_code == 413 and "2000 parts" in reply.json()["error"], reply.text
    assert codes == [200] * 10
    assert len(latencies) >= 3 and max(latencies) < 1.0, latencies
    assert service.known() - before == {sha256(f.read_bytes()) for c in chunks for f in c}


# --------------------------------------------------------------------------- access
def test_no_or_wrong_token_is_401_and_another_sites_token_403_both_audited(service, t1_files):
    """No credentials or a wrong token: one identical 401 whatever the site (nothing learnt about
    which sites exist). A valid token used for another site, known or not: 403, again one answer.
    Nothing is stored, and every refusal is in the audit trail with the user but never the token."""
    body = multipart([t1_files[9].read_bytes()])
    unauthenticated = [service.post("S99", b"malformed", token=None),  # unknown site, bad request: auth first
                       service.post("S01", body, token="wrong"),
                       service.post("S01", body, token=None),
                       service.post("S01", body, token=None, Authorization="Basic czAxOnMwMS10b2tlbg==")]
    answers = {(r.status_code, r.content, r.headers.get("www-authenticate")) for r in unauthenticated}
    assert len(answers) == 1 and next(iter(answers))[0] == 401, answers
    forbidden = [service.post("S01", body, token=TOKENS["S02"]),  # another site's token
                 service.post("S99", body, token=TOKENS["S01"]),  # unknown site, a valid token
                 service.post("S01..S02", body, token=TOKENS["S01"])]  # a name that is no site
    assert {(r.status_code, r.content) for r in forbidden} == {(403, forbidden[0].content)}, \
        [(r.status_code, r.text) for r in forbidden]
    # an encoded slash never reaches the handler (no route), so no site name can leave its folder
    assert service.post("..%2FS01", body, token=TOKENS["S01"]).status_code == 404
    assert sha256(t1_files[9].read_bytes()) not in service.known()
    refused = [r for r in service.audit() if r["what"] == "access refused"]
    assert any(r["details"]["user_site"] == "S02" and r["subject"] == "upload to S01" for r in refused), refused[-5:]
    assert any(r["details"]["user"] is None and r["why"] == "no valid token" for r in refused)
    assert not any(TOKENS["S01"] in json.dumps(r) or TOKENS["S02"] in json.dumps(r) for r in service.audit())
    replies = unauthenticated[1:]
    # /status: a site's token, and only that site's row; /healthz open and terse; no schema
    assert service.status(token=None).status_code == 401
    assert service.status(token="wrong").content == replies[0].content
    rows = service.status(token=TOKENS["S02"]).json()
    assert [r["site"] for r in rows] == ["S02"]
    assert requests.get(f"{service.url}/healthz", timeout=10).json() == {"ok": True}
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert requests.get(f"{service.url}{path}", timeout=10).status_code == 404


def test_client_disconnect_mid_body_is_audited_and_cleaned_up(service, t1_files):
    before = service.known()
    body = multipart([f.read_bytes() for f in t1_files[100:110]])
    head = (f"POST /dicomweb/S01/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKENS['S01']}\r\n"
            f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}\r\n'
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", service.http_port)) as sock:
        sock.sendall(head + body[: len(body) // 2])
        time.sleep(0.5)
    deadline = time.monotonic() + 10
    interrupted = []
    while not interrupted and time.monotonic() < deadline:
        interrupted = [r for r in service.audit() if "client disconnected" in r["why"]]
        time.sleep(0.1)
    assert interrupted, service.audit()[-3:]
    assert re.search(r"after [1-5] parts", interrupted[0]["why"]), interrupted  # what arrived before the close
    assert interrupted[0]["details"]["files"] == 0
    assert service.known() == before
    assert service.status().status_code == 200  # still serving


def test_rate_limit_per_site_answers_429_with_retry_after(tmp_path, protocols):
    svc = Service(tmp_path, protocols, http={"max_requests_per_minute": 5, "openapi": True}).start()
    try:
        codes, retry = [], []
        for _ in range(8):
            reply = svc.post("S01", b"", content_type="application/dicom")
            codes.append(reply.status_code)
            retry.append(reply.headers.get("retry-after"))
        assert codes == [400] * 5 + [429] * 3, codes
        assert all(r is not None and int(r) >= 1 for r in retry[5:]), retry
        assert svc.post("S02", b"", content_type="application/dicom").status_code == 400  # per site
        assert svc.post("S01", b"", token="wrong", content_type="application/dicom").status_code == 401
        assert requests.get(f"{svc.url}/openapi.json", timeout=10).status_code == 200  # when configured
        # token guessing: after 60 failed authentications a minute from one address, 429, whatever the site
        # (a token bucket: one failure a second refills, so count against the time the guessing took)
        started, guesses = time.monotonic(), []
        while 429 not in guesses and len(guesses) < 400:
            site = ["S01", "S99"][len(guesses) % 2]
            guesses.append(svc.post(site, b"", token=f"guess-{len(guesses)}", content_type="application/dicom").status_code)
        took = time.monotonic() - started
        assert set(guesses[:-1]) == {401} and guesses[-1] == 429, guesses
        assert 59 <= len(guesses) - 1 <= 59 + took + 1, (len(guesses), took)
        assert svc.post("S02", b"", content_type="application/dicom").status_code == 400  # a valid token still works
    finally:
        log = svc.stop()
    assert "Traceback" not in log, log[-3000:]
