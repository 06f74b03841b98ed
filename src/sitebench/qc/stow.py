"""DICOMweb STOW-RS style upload (FastAPI), in front of :class:`sitebench.qc.intake.IntakeService`.

``POST /dicomweb/{site}/studies`` takes ``multipart/related; type="application/dicom"``
(one DICOM file per part) or a single ``application/dicom`` body. The body is read in
chunks and refused with 413 as soon as it passes the size limit. The reply follows
STOW-RS: 200 when every instance was stored, 202 when some have problems, 409 when none
could be used; its JSON lists stored instances under ReferencedSOPSequence (0008,1199)
and unusable ones under FailedSOPSequence (0008,1198) with a one-line reason each.
``GET /status`` gives the per-site table of ``sitebench qc status``.
"""


import re
import threading
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from sitebench.qc.intake import HttpListener, IntakeService

__all__ = ["make_app", "start_http", "split_multipart"]

FAILURE_PROCESSING = 0xC000  # STOW-RS FailureReason "processing failure"


def split_multipart(body: bytes, content_type: str) -> list[bytes]:
    """The parts of a multipart body, byte for byte (headers dropped)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise ValueError("multipart content type without a boundary")
    delimiter = b"--" + match.group(1).encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break  # closing delimiter
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("multipart part without a header block")
        parts.append(content[:-2] if content.endswith(b"\r\n") else content)
    return parts


def make_app(service: "IntakeService") -> Any:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI(title="sitebench QC intake", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True}

    @app.get("/status")
    def status() -> list[dict]:
        return [{**asdict(s), "rescan_rate": s.rescan_rate} for s in service.records.site_status()]

    @app.post("/dicomweb/{site}/studies")
    async def stow(site: str, request: Request) -> JSONResponse:
        if site not in service.config.sites:
            return JSONResponse({"error": f"site '{site}' is not configured"}, status_code=404)
        content_type = request.headers.get("content-type", "")
        if not (content_type.startswith("multipart/related") or content_type.startswith("application/dicom")):
            return JSONResponse({"error": "send multipart/related; type=\"application/dicom\" "
                                          "or application/dicom"}, status_code=415)
        sender = f"http:{request.client.host if request.client else '?'}"
        transfer = service.begin_transfer(site, "http", sender)
        limit = service.max_file_bytes
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    service.refuse(transfer, len(body), f"upload passed the {limit}-byte limit "
                                                        f"({len(body)} bytes read when refused)")
                    return JSONResponse({"error": f"upload larger than {limit} bytes"}, status_code=413)
            try:
                parts = split_multipart(bytes(body), content_type) if content_type.startswith("multipart") \
                    else [bytes(body)]
            except ValueError as exc:
                service.refuse(transfer, len(body), f"malformed multipart body: {exc}")
                return JSONResponse({"error": f"malformed multipart body: {exc}"}, status_code=400)
            stored, failed = [], []
            for index, part in enumerate(parts):
                receipt = service.receive(part, transfer, parse_now=True)
                entry = {"part": index, "sha256": receipt.sha256, "series_key": receipt.series_key}
                if receipt.problems:
                    failed.append({**entry, "00081197": FAILURE_PROCESSING, "reason": "; ".join(receipt.problems)})
                else:
                    stored.append(entry)
        finally:
            service.end_transfer(transfer, "http upload")
        code = 200 if not failed else (202 if stored else 409)
        return JSONResponse({"00081199": stored, "00081198": failed}, status_code=code)

    return app


class _HttpServer:
    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self.server, self.thread = server, thread

    def shutdown(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_http(service: "IntakeService", listener: "HttpListener") -> _HttpServer:
    import time

    import uvicorn

    config = uvicorn.Config(make_app(service), host=listener.host, port=listener.port, log_level="warning",
                            access_log=False)
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
