"""DICOMweb STOW-RS upload (FastAPI + uvicorn), in front of :class:`sitebench.qc.intake.IntakeService`.

``POST /dicomweb/{site}/studies`` takes ``multipart/related; type="application/dicom"``
(one DICOM file per part) or a single ``application/dicom`` body, with
``Authorization: Bearer <token>``; the site's accepted tokens are configured as SHA-256 hex
(``sites.<site>.http_token_sha256``).

Checked in this order, before any of the body is read:

=====  =====================================================================================
401    no token, a wrong token, or an unknown site: one identical answer, so a client without
       a valid token cannot learn which sites exist
429    the site's token bucket (``http.max_requests_per_minute``) is empty; ``Retry-After`` says
       when to retry
415    neither ``multipart/related`` (with ``type`` application/dicom, or none) nor
       ``application/dicom``
400    multipart without a (valid) boundary
=====  =====================================================================================

More than :data:`FAILED_AUTH_PER_MINUTE` failed authentications from one client address are
answered 429 (for any site, so this says nothing about which sites exist either).

The body is then parsed as it arrives, by python-multipart's RFC 2046 parser (a delimiter
counts only at the start of a line, so file content holding ``--boundary`` is fine). Each
part is streamed to its own temp file under ``objects/tmp`` and hashed while written (a part
of at most 64 KiB stays in memory instead, up to 2 MiB a request, so 2000 tiny parts do not
cost 2000 file creations); the
writes (and the parser, which drives them) run in a worker thread, one chunk at a time, so the
event loop stays free for other requests and the body is never held in memory. A part is
only stored once the closing delimiter of the request has been seen: a request that is cut
off, or malformed anywhere, stores nothing (PS3.18: 400 means no instance was stored).

Then:

=====  =====================================================================================
400    malformed: empty body, the boundary never found, garbage before the first delimiter,
       no part, or the body ends before the closing delimiter (nothing stored)
413    more than ``http.max_parts`` parts, or (a single ``application/dicom`` body) larger
       than ``max_file_mb`` (nothing stored); the refusal is audited
408    the client sent nothing for :data:`STALL_SECONDS` (nothing stored)
200    every part stored (or already stored before, intact: status "duplicate")
202    some parts stored, some failed
409    no part could be stored
=====  =====================================================================================

A part fails (and the others go on) when it is larger than ``max_file_mb`` (refused, not
stored, audited; FailureReason A700 out of resources), its ``Content-Type`` is not
application/dicom or its ``Content-Length`` disagrees with the bytes received (C000
cannot understand), it repeats the bytes of an earlier part of the same request ("duplicate
of part N"; 0111 duplicate SOP instance), intake found it unusable (not DICOM, truncated,
...: C000; it is kept in quarantine), it is an instance already received with other bytes
(conflict: 0111), or it was sent before and the stored copy was unusable (its stored
problems; C000). A part without a ``Content-Type`` is taken as application/dicom.

The reply's JSON: ``00081199`` (ReferencedSOPSequence) lists the stored parts (part index,
sha256, series_key, status "stored" / "duplicate"); ``00081198`` (FailedSOPSequence) the
failed ones, each with ``00081197`` (FailureReason) and a one-line ``reason``.

A client that disconnects mid-upload is audited as an interrupted transfer ("client
disconnected after N parts"), its temp files are removed; nothing is logged as an error.

``GET /status`` (any configured site's token) gives that site's row of ``sitebench qc
status``; ``GET /healthz`` is open and says only ``{"ok": true}``; ``/openapi.json`` and the
docs exist only with ``http.openapi: true``.
"""


import hashlib
import hmac
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from sitebench.qc.access import Principal
    from sitebench.qc.intake import HttpListener, IntakeService, Receipt

__all__ = ["make_app", "start_http", "RateLimiter", "StowUpload"]

log = logging.getLogger("sitebench.qc.stow")

# FailureReason (0008,1197) values (PS3.4 Annex B storage status codes, as PS3.18 STOW-RS uses them)
FAILURE_PROCESSING = 0x0110  # processing failure: the server could not store a well-formed part
FAILURE_DUPLICATE = 0x0111  # duplicate SOP instance: same bytes earlier in the request, or a conflicting copy
FAILURE_OUT_OF_RESOURCES = 0xA700  # out of resources: the part is larger than max_file_mb
FAILURE_CANNOT_UNDERSTAND = 0xC000  # cannot understand: not (intact) DICOM, wrong part headers

#: seconds without a byte from the client before an upload is abandoned (408); a stalled
#: sender must not hold a connection slot (uvicorn's ``limit_concurrency``) for ever
STALL_SECONDS = 60.0
#: a part up to this size is kept in memory (within :data:`MEMORY_PER_REQUEST`), not in a temp
#: file: thousands of tiny parts must not cost thousands of file creations
SMALL_PART_BYTES = 64 * 1024
MEMORY_PER_REQUEST = 2 * 1024 * 1024
NOT_AUTHORISED = {"error": "not authorised for this site"}
#: failed authentications per minute per client address before it is answered 429 (whatever the
#: site: the answer says nothing about which sites exist), against token guessing
FAILED_AUTH_PER_MINUTE = 60.0
DICOM_TYPE = "application/dicom"


class RequestRefused(Exception):
    """The whole request is refused: HTTP ``status`` with a one-line ``reason``; nothing is stored."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


# --------------------------------------------------------------------------- streaming one request to disk
@dataclass
class _Part:
    index: int
    headers: dict[str, str] = field(default_factory=dict)
    buffer: bytearray | None = None  # a small part, in memory
    tmp: Path | None = None  # or a temp file
    handle: BinaryIO | None = None
    hasher: Any = None
    size: int = 0
    failure: tuple[int, str] | None = None  # (FailureReason, reason) decided while receiving
    sha256: str | None = None


class StowUpload:
    """One request's parts, written to temp files as the bytes arrive (not thread-safe: one feeder at a time).

    :meth:`feed` is called with each chunk of the body, in a worker thread; :meth:`finish` once
    the body has ended. Completed parts stay in ``objects/tmp`` (small ones in memory) until
    :meth:`commit` hands them to intake; :meth:`discard` removes every temp file (request
    refused or interrupted).
    """

    def __init__(self, service: "IntakeService", transfer: str, boundary: bytes | None) -> None:
        self.service, self.transfer = service, transfer
        self.max_file = service.max_file_bytes
        self.max_parts = service.config.http.max_parts if service.config.http else 2000
        self.parts: list[_Part] = []  # finished parts, in order
        self.current: _Part | None = None
        self.bytes_read = 0
        self.in_memory = 0  # bytes of parts held in memory (at most MEMORY_PER_REQUEST)
        self.ended = False
        self._seen: dict[str, int] = {}  # sha256 -> index of its first part in this request
        self._field = bytearray()
        self._value = bytearray()
        self.parser = None
        if boundary is not None:
            from python_multipart import MultipartParser

            self.parser = MultipartParser(boundary, {
                "on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end, "on_end": self._end})
        else:  # a single application/dicom body: one part, no headers
            self.current = _Part(index=0)
            self._accept(self.current)

    # ------------------------------------------------------------------ feeding (worker thread)
    def feed(self, chunk: bytes) -> None:
        self.bytes_read += len(chunk)
        if self.parser is None:
            self._part_data(chunk, 0, len(chunk))
            if self.current is not None and self.current.failure is not None:  # over the limit
                raise RequestRefused(413, self.current.failure[1])
            return
        from python_multipart.exceptions import MultipartParseError

        try:
            self.parser.write(chunk)
        except MultipartParseError as exc:
            raise RequestRefused(400, f"malformed multipart body: {exc}") from None

    def finish(self) -> None:
        """The body ended: complete the single part, or check the multipart body was closed."""
        if self.parser is None:
            part, self.current = self.current, None
            if part is not None:
                if part.size == 0:
                    self._close(part, delete=True)
                    raise RequestRefused(400, "empty body")
                self._complete(part)
            return
        if self.bytes_read == 0:
            raise RequestRefused(400, "empty body")
        if not self.ended:
            if not self.parts and self.current is None:
                raise RequestRefused(400, "the multipart boundary was never found in the body")
            raise RequestRefused(400, f"body ended before the closing delimiter (after {len(self.parts)} "
                                      "complete parts); nothing stored")
        if not self.parts:
            raise RequestRefused(400, "multipart body without any part")

    # ------------------------------------------------------------------ parser callbacks
    def _part_begin(self) -> None:
        if len(self.parts) >= self.max_parts:
            raise RequestRefused(413, f"more than {self.max_parts} parts in one request")
        self.current = _Part(index=len(self.parts))
        self._field.clear()
        self._value.clear()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self.current.headers[name] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        part = self.current
        media = part.headers.get("content-type", DICOM_TYPE).split(";")[0].strip().lower()
        declared = part.headers.get("content-length")
        if media != DICOM_TYPE:
            part.failure = (FAILURE_CANNOT_UNDERSTAND, f"part Content-Type is {media!r}, not {DICOM_TYPE}")
        elif declared is not None and not declared.strip().isdigit():
            part.failure = (FAILURE_CANNOT_UNDERSTAND, f"part Content-Length {declared!r} is not a number")
        elif declared is not None and int(declared) > self.max_file:
            part.failure = (FAILURE_OUT_OF_RESOURCES, self._too_large(int(declared), declared=True))
        else:
            self._accept(part)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.current
        n = end - start
        part.size += n
        if part.hasher is None:
            return  # failed part: its bytes are counted, not kept
        if part.size > self.max_file:
            part.failure = (FAILURE_OUT_OF_RESOURCES, self._too_large(part.size))
            self._close(part, delete=True)
            return
        view = memoryview(data)[start:end]
        part.hasher.update(view)
        if part.buffer is not None:
            if part.size <= SMALL_PART_BYTES and self.in_memory + n <= MEMORY_PER_REQUEST:
                part.buffer += view
                self.in_memory += n
                return
            self._open(part)  # too large for memory: to a temp file, from its first byte
            part.handle.write(part.buffer)
            self.in_memory -= len(part.buffer)
            part.buffer = None
        part.handle.write(view)

    def _part_end(self) -> None:
        part, self.current = self.current, None
        self._complete(part)

    def _end(self) -> None:
        self.ended = True

    # ------------------------------------------------------------------ helpers
    def _too_large(self, size: int, declared: bool = False) -> str:
        what = f"Content-Length {size}" if declared else f"more than {self.max_file} bytes (read {size} when refused)"
        return f"part {len(self.parts)} exceeds the {self.max_file}-byte limit per file: {what}"

    @staticmethod
    def _accept(part: _Part) -> None:
        part.buffer = bytearray()
        part.hasher = hashlib.sha256()

    def _open(self, part: _Part) -> None:
        part.tmp = self.service.store.new_tmp()
        part.handle = open(part.tmp, "wb", buffering=1024 * 1024)  # noqa: SIM115 - closed in _close

    def _close(self, part: _Part, delete: bool) -> None:
        part.hasher = None
        if delete and part.buffer is not None:
            self.in_memory -= len(part.buffer)
            part.buffer = None
        if part.handle is not None:
            part.handle.close()
            part.handle = None
        if delete and part.tmp is not None:
            part.tmp.unlink(missing_ok=True)
            part.tmp = None

    def _complete(self, part: _Part) -> None:
        declared = part.headers.get("content-length")
        if part.failure is None and declared is not None and int(declared) != part.size:
            part.failure = (FAILURE_CANNOT_UNDERSTAND, f"Content-Length says {int(declared)}, received {part.size}")
        if part.failure is None:
            part.sha256 = part.hasher.hexdigest()
            first = self._seen.setdefault(part.sha256, part.index)
            if first != part.index:
                part.failure = (FAILURE_DUPLICATE, f"duplicate of part {first}")
        self._close(part, delete=part.failure is not None)
        if part.failure is not None and part.failure[0] == FAILURE_OUT_OF_RESOURCES:
            self.service.refuse(self.transfer, part.size, part.failure[1])
        self.parts.append(part)

    # ------------------------------------------------------------------ after the body
    def commit(self) -> tuple[list[dict], list[dict]]:
        """Hand every good part to intake (blocking: call it in a worker thread); (stored, failed) entries."""
        stored, failed = [], []
        for part in self.parts:
            entry: dict[str, Any] = {"part": part.index, "sha256": part.sha256, "series_key": None}
            if part.failure is not None:
                failed.append({**entry, "status": "refused" if part.failure[0] == FAILURE_OUT_OF_RESOURCES
                               else "failed", "00081197": part.failure[0], "reason": part.failure[1]})
                continue
            try:
                if part.buffer is not None:
                    receipt = self.service.receive(bytes(part.buffer), self.transfer, parse_now=True)
                else:
                    receipt = self.service.receive_path(part.tmp, self.transfer, parse_now=True, sha256=part.sha256)
            except Exception:  # noqa: BLE001 - our failure, not the client's: logged, the part is reported failed
                log.exception("storing STOW-RS part %d of transfer %s failed", part.index, self.transfer)
                if part.tmp is not None:
                    part.tmp.unlink(missing_ok=True)
                failed.append({**entry, "status": "failed", "00081197": FAILURE_PROCESSING,
                               "reason": "processing failure: the server could not store this part"})
                continue
            finally:
                if part.buffer is not None:
                    self.in_memory -= len(part.buffer)
                part.tmp, part.buffer = None, None
            entry["series_key"] = receipt.series_key
            if receipt.usable:
                stored.append({**entry, "status": receipt.status})
            else:  # a new file with problems is kept in quarantine
                status = "quarantined" if receipt.status == "stored" else receipt.status
                failed.append({**entry, "status": status, "00081197": _failure_code(receipt),
                               "reason": _reason(receipt)})
        return stored, failed

    def discard(self) -> int:
        """Remove every temp file of this request; the number of complete parts it had."""
        if self.current is not None:
            self._close(self.current, delete=True)
            self.current = None
        for part in self.parts:
            self._close(part, delete=True)
        return len(self.parts)


def _failure_code(receipt: "Receipt") -> int:
    if receipt.status == "conflict":
        return FAILURE_DUPLICATE
    if receipt.status == "refused":
        return FAILURE_OUT_OF_RESOURCES
    return FAILURE_CANNOT_UNDERSTAND


def _reason(receipt: "Receipt") -> str:
    problems = "; ".join(receipt.problems) or receipt.status
    if receipt.status == "duplicate":
        return f"sent before, and the stored copy is unusable: {problems}"
    return problems


# --------------------------------------------------------------------------- authentication, rate limit
class RateLimiter:
    """Token bucket per key: ``per_minute`` requests a minute, bursts up to one minute's worth."""

    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, per_minute)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str, now: float | None = None) -> float:
        """0 when the request may go ahead (a token taken), else the seconds until a token is there."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


_DUMMY_HASH = "0" * 64


def _principal(service: "IntakeService", token: str | None) -> "Principal | None":
    """Who holds ``token``: a user of the QC database, or a site's upload token from the intake
    YAML (a site_uploader of that site). The YAML digests are compared in constant time, all of them."""
    from sitebench.qc.access import Principal, token_digest

    if not token:
        return None
    presented = token_digest(token)
    found = None
    for site, site_config in service.config.sites.items():
        for expected in site_config.http_token_sha256 or [_DUMMY_HASH]:
            if hmac.compare_digest(presented, expected) and found is None:
                found = site
    if found is not None:
        return Principal(name=f"upload token of {found}", role="site_uploader", site=found)
    return service.users.authenticate(token)


# --------------------------------------------------------------------------- the app
def make_app(service: "IntakeService", extensions: Sequence[Callable[[Any, "IntakeService"], None]] = ()) -> Any:
    """The STOW-RS app; each of ``extensions`` adds its routes (the dashboard, from a higher room)."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from python_multipart.multipart import parse_options_header
    from starlette.requests import ClientDisconnect

    from sitebench.qc.access import allowed, valid_site_name
    from sitebench.qc.records import SiteStatus

    http = service.config.http
    openapi = bool(http and http.openapi)
    app = FastAPI(title="sitebench QC intake", openapi_url="/openapi.json" if openapi else None,
                  docs_url="/docs" if openapi else None, redoc_url=None)
    limiter = RateLimiter(http.max_requests_per_minute if http else 600.0)
    failed_auth = RateLimiter(FAILED_AUTH_PER_MINUTE)
    logging.getLogger("python_multipart").setLevel(logging.ERROR)  # malformed bodies are answered, not logged
    # worker threads for uploads, apart from the pool /status runs in, so uploads cannot starve it
    workers: dict[str, anyio.CapacityLimiter] = {}

    def upload_workers() -> anyio.CapacityLimiter:
        if "limiter" not in workers:
            workers["limiter"] = anyio.CapacityLimiter(16)
        return workers["limiter"]

    def not_authorised(request: Request) -> JSONResponse:
        wait = failed_auth.take(request.client.host if request.client else "?")
        if wait:
            return JSONResponse({"error": "too many failed authentications"}, status_code=429,
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return JSONResponse(NOT_AUTHORISED, status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True}

    def address(request: Request) -> str:
        return request.client.host if request.client else "?"

    @app.get("/status")
    async def status(request: Request) -> Any:
        who = await anyio.to_thread.run_sync(_principal, service, _bearer(request.headers.get("authorization")))
        if who is None:
            service.refuse_access(None, "GET /status", address(request), "no valid token")
            return not_authorised(request)
        rows = await anyio.to_thread.run_sync(service.records.site_status)
        seen = {r.site for r in rows}
        rows = [*rows, *(SiteStatus(site=s) for s in service.config.sites if s not in seen)]  # nothing received yet
        return [{**asdict(r), "rescan_rate": r.rescan_rate} for r in rows if allowed(who, "view_site", r.site)]

    @app.post("/dicomweb/{site}/studies")
    async def stow(site: str, request: Request) -> JSONResponse:
        who = await anyio.to_thread.run_sync(_principal, service, _bearer(request.headers.get("authorization")))
        if who is None:
            service.refuse_access(None, f"upload to {site if valid_site_name(site) else 'an invalid site name'}",
                                  address(request), "no valid token")
            return not_authorised(request)
        if not (valid_site_name(site) and site in service.config.sites and allowed(who, "upload", site)):
            # the same answer whether the site exists or not: a token of S01 learns nothing of S02
            service.refuse_access(who, f"upload to {site if valid_site_name(site) else 'an invalid site name'}",
                                  address(request), "not this user's site or role")
            return JSONResponse({"error": "this token may not upload for that site"}, status_code=403)
        wait = limiter.take(site)
        if wait:
            return JSONResponse({"error": f"more than {http.max_requests_per_minute:g} requests a minute "
                                          "from this site"}, status_code=429,
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        media, params = parse_options_header(request.headers.get("content-type", ""))
        media = media.decode("latin-1").lower()
        root_type = params.get(b"type", DICOM_TYPE.encode()).decode("latin-1").lower()
        if not ((media == "multipart/related" and root_type == DICOM_TYPE) or media == DICOM_TYPE):
            return JSONResponse({"error": f'send multipart/related; type="{DICOM_TYPE}" or {DICOM_TYPE}'},
                                status_code=415)
        boundary = None
        if media == "multipart/related":
            boundary = params.get(b"boundary", b"")
            if not (0 < len(boundary) <= 70) or boundary.endswith(b" "):
                return JSONResponse({"error": "multipart/related without a valid boundary"}, status_code=400)
        sender = f"http:{address(request)} as {who.name}"
        transfer = service.begin_transfer(site, "http", sender)
        upload = StowUpload(service, transfer, boundary)
        how = "http upload"
        workers_ = upload_workers()
        try:
            try:
                chunks = request.stream().__aiter__()
                while True:
                    with anyio.move_on_after(STALL_SECONDS) as scope:
                        chunk = await chunks.__anext__()
                    if scope.cancelled_caught:
                        raise RequestRefused(408, f"no data from the client for {STALL_SECONDS:g} s")
                    if chunk:
                        await anyio.to_thread.run_sync(upload.feed, chunk, limiter=workers_)
            except StopAsyncIteration:
                pass
            await anyio.to_thread.run_sync(upload.finish, limiter=workers_)
            stored, failed = await anyio.to_thread.run_sync(upload.commit, limiter=workers_)
        except RequestRefused as refused:
            parts = await anyio.to_thread.run_sync(upload.discard, limiter=workers_)
            if refused.status == 413:
                service.refuse(transfer, upload.bytes_read, refused.reason)
            how = f"request refused ({refused.status}): {refused.reason}; {parts} complete parts not stored"
            return JSONResponse({"error": refused.reason}, status_code=refused.status)
        except ClientDisconnect:
            parts = await anyio.to_thread.run_sync(upload.discard, limiter=workers_)
            how = f"interrupted: client disconnected after {parts} parts ({upload.bytes_read} bytes); nothing stored"
            return JSONResponse({"error": "client disconnected"}, status_code=400)
        except BaseException:
            upload.discard()  # cancelled (server stopping) or a bug: no temp file left behind
            how = "interrupted: server error or shutdown; nothing stored"
            raise
        finally:
            service.end_transfer(transfer, how)
        code = 200 if not failed else (202 if stored else 409)
        return JSONResponse({"00081199": stored, "00081198": failed}, status_code=code)

    for extend in extensions:
        extend(app, service)
    return app


# --------------------------------------------------------------------------- the server thread
class _HttpServer:
    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self.server, self.thread = server, thread

    def shutdown(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_http(service: "IntakeService", listener: "HttpListener",
               extensions: Sequence[Callable[[Any, "IntakeService"], None]] = ()) -> _HttpServer:
    import uvicorn

    config = uvicorn.Config(make_app(service, extensions), host=listener.host, port=listener.port, log_level="warning",
                            access_log=False, http="h11", timeout_keep_alive=5, limit_concurrency=64,
                            h11_max_incomplete_event_size=16 * 1024, timeout_graceful_shutdown=5,
                            server_header=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="qc-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        from sitebench.errors import SitebenchError

        raise SitebenchError(f"HTTP listener could not start on {listener.host}:{listener.port}")
    return _HttpServer(server, thread)
