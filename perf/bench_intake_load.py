"""Intake under load, against a real `sitebench qc serve` subprocess, in one run.

    .venv/bin/python perf/bench_intake_load.py [--quick]

Measured, same machine, same run:

* C-STORE throughput (files/s): 10 concurrent dcmtk storescu processes, each with its own
  copy of the series, and ``/status`` latency meanwhile (the figures before this work, 160
  files/s and 49 ms at most, were taken this way);
* STOW-RS throughput (files/s): 10 concurrent senders, each sending its own copy of the
  196-slice GE 3D T1 (dcm_qa_deident; new Series/SOP Instance UIDs per sender, so every
  file is new) in requests of 20 parts, against two references: the floor, a bare uvicorn
  app that only writes each request's body to a file, fed the same requests the same way;
  and the ceiling of intake itself, ``IntakeService.receive`` in-process on one thread
  (store, fsync, record, parse: the work every STOW-RS part costs, without HTTP);
* ``/status`` latency (median, max) while those uploads run, against the same server idle;
* server memory (VmRSS sampled every 20 ms, and VmHWM) while one streamed 1 GiB part of
  non-DICOM bytes is uploaded (``max_file_mb`` 2048, so it is stored and quarantined),
  against the server's idle RSS; the peak while the body streams in and the peak of the
  whole request (including intake parsing the stored file) are reported apart;
* the DICOM listener against 10 idle bare TCP connections: seconds until the server drops
  each (recv returns b''), against the configured ``acse_timeout``, and whether a real
  C-STORE from dcmtk's /usr/bin/storescu succeeds while they are open.

The figures before the STOW-RS rewrite (issue: "STOW-RS failures") are printed beside
them: 160 files/s, /status max 49 ms, 2,170 MiB during 1 GiB, idle connections held ~60 s.
``--quick`` sends 40 files per sender instead of 196 (the 1 GiB upload and the idle
connections are the same). The temp store (the 1 GiB file included) is deleted at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pydicom
import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
SERIES = ROOT.parent / "shared" / "data" / "dicom" / "dcm_qa_deident" / "In"
STORESCU = Path("/usr/bin/storescu")  # dcmtk's; pynetdicom installs a different storescu in the venv
TOKEN = "bench-s01-token"
BOUNDARY = "bench-boundary-7d1f"
SENDERS = 10
PARTS_PER_REQUEST = 20
BEFORE = {"files_per_s": 160.0, "status_max_ms": 49.0, "rss_1gib_mib": 2170.0, "idle_drop_s": 60.0}

BARE_APP = '''
import sys, tempfile, uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    with tempfile.TemporaryFile(dir=sys.argv[2]) as out:
        while True:
            message = await receive()
            out.write(message.get("body", b""))
            if not message.get("more_body"):
                break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", http="h11")
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def multipart(parts: list[bytes]) -> bytes:
    head = b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
    return b"".join(head + p + b"\r\n" for p in parts) + b"--" + BOUNDARY.encode() + b"--\r\n"


HEADERS = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
           "Authorization": f"Bearer {TOKEN}"}


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """`sitebench qc serve` in a subprocess: STOW-RS and a DICOM listener, its stderr to a file."""

    def __init__(self, tmp: Path, protocols: Path, acse_timeout: float) -> None:
        self.http_port, self.dicom_port = free_port(), free_port()
        self.store = tmp / "store"
        config = {"store": str(self.store), "protocols": str(protocols),
                  "sites": {"S01": {"ae_titles": ["S01_MR1"],
                                    "http_token_sha256": [hashlib.sha256(TOKEN.encode()).hexdigest()]}},
                  "http": {"host": "127.0.0.1", "port": self.http_port, "max_requests_per_minute": 100000},
                  "dicom": {"host": "127.0.0.1", "port": self.dicom_port, "ae_title": "SITEBENCH",
                            "acse_timeout": acse_timeout, "network_timeout": acse_timeout, "max_associations": 16},
                  "quiet_seconds": 3600, "image_quality": False, "max_file_mb": 2048}
        self.config = tmp / "intake.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = tmp / "server.log"
        self.url = f"http://127.0.0.1:{self.http_port}"

    def __enter__(self) -> "Server":
        self.proc = subprocess.Popen([sys.executable, "-m", "sitebench.cli", "qc", "serve", "--config", str(self.config)],
                                     stdout=subprocess.PIPE, stderr=open(self.log, "w"), text=True)
        line = self.proc.stdout.readline()
        if '"listening"' not in line:
            raise RuntimeError(line + self.log.read_text())
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def status_ms(self) -> float:
        start = time.perf_counter()
        reply = requests.get(f"{self.url}/status", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        reply.raise_for_status()
        return (time.perf_counter() - start) * 1000


def sender_copies(tmp: Path, n_files: int) -> list[list[bytes]]:
    """Each sender's own copy of the series (new Series and SOP Instance UIDs): every file is new."""
    copies: list[list[bytes]] = [[] for _ in range(SENDERS)]
    series_uids = [pydicom.uid.generate_uid() for _ in range(SENDERS)]
    out = tmp / "copy.dcm"
    for path in sorted(SERIES.iterdir())[:n_files]:
        ds = pydicom.dcmread(path)
        for k in range(SENDERS):
            ds.SeriesInstanceUID = series_uids[k]
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            ds.save_as(out, enforce_file_format=True)
            copies[k].append(out.read_bytes())
    return copies


def send_all(url: str, copies: list[list[bytes]]) -> tuple[float, list[int]]:
    """Seconds for 10 concurrent senders to send their copies, 20 parts a request; the reply codes."""
    codes: list[int] = []

    def send(files: list[bytes]) -> None:
        with requests.Session() as session:
            for i in range(0, len(files), PARTS_PER_REQUEST):
                reply = session.post(f"{url}/dicomweb/S01/studies", data=multipart(files[i:i + PARTS_PER_REQUEST]),
                                     headers=HEADERS, timeout=300)
                codes.append(reply.status_code)

    threads = [threading.Thread(target=send, args=(c,)) for c in copies]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, codes


def storescu_all(server: Server, tmp: Path, copies: list[list[bytes]]) -> tuple[float, list[int]]:
    """Seconds for 10 concurrent dcmtk storescu processes to send their copies over C-STORE; exit codes."""
    folders = []
    for k, files in enumerate(copies):
        folder = tmp / f"cstore-{k}"
        folder.mkdir()
        for i, data in enumerate(files):
            (folder / f"{i:04d}.dcm").write_bytes(data)
        folders.append(folder)
    start = time.perf_counter()
    procs = [subprocess.Popen([str(STORESCU), "-aet", "S01_MR1", "-aec", "SITEBENCH", "+sd", "127.0.0.1",
                               str(server.dicom_port), str(f)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for f in folders]
    codes = [p.wait(timeout=600) for p in procs]
    return time.perf_counter() - start, codes


def throughput(server: Server, copies: list[list[bytes]], send=None) -> dict:
    """Files/s for the 10 senders (STOW-RS by default, or ``send()``), and /status latency meanwhile."""
    idle = [server.status_ms() for _ in range(20)]
    stop, latencies = threading.Event(), []

    def poll() -> None:
        while not stop.is_set():
            latencies.append(server.status_ms())
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    seconds, codes = send() if send is not None else send_all(server.url, copies)
    stop.set()
    poller.join()
    files = sum(len(c) for c in copies)
    return {"files": files, "seconds": seconds, "files_per_s": files / seconds, "codes": sorted(set(codes)),
            "status_idle_median_ms": statistics.median(idle), "status_idle_max_ms": max(idle),
            "status_load_median_ms": statistics.median(latencies), "status_load_max_ms": max(latencies),
            "status_samples": len(latencies)}


def bare_throughput(tmp: Path, copies: list[list[bytes]]) -> dict:
    port = free_port()
    (tmp / "bare").mkdir()
    proc = subprocess.Popen([sys.executable, "-c", BARE_APP, str(port), str(tmp / "bare")])
    try:
        wait_port(port)
        seconds, codes = send_all(f"http://127.0.0.1:{port}", copies)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    files = sum(len(c) for c in copies)
    return {"files": files, "seconds": seconds, "files_per_s": files / seconds, "codes": sorted(set(codes))}


_IN_PROCESS = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from sitebench.qc.intake import IntakeConfig, IntakeService
files = [p.read_bytes() for p in sorted(Path(sys.argv[3]).iterdir())]
config = IntakeConfig(store=Path(sys.argv[4]), protocols=Path(sys.argv[2]), sites={"S01": {"ae_titles": ["X"]}},
                      dicom=None, http=None, quiet_seconds=3600, image_quality=False)
service = IntakeService(config)
transfer = service.begin_transfer("S01", "http", "bench")
start = time.perf_counter()
for data in files:
    service.receive(data, transfer, parse_now=True)
seconds = time.perf_counter() - start
service.stop()
print(json.dumps({"files": len(files), "seconds": seconds, "files_per_s": len(files) / seconds}))
"""


def in_process(tmp: Path, protocols: Path, files: list[bytes], src: Path = ROOT / "src", name: str = "now") -> dict:
    """IntakeService.receive(parse_now=True) on one thread, no HTTP, in a fresh process importing ``src``:
    what intake itself costs per file."""
    folder = tmp / "inprocess-files"
    if not folder.exists():
        folder.mkdir()
        for i, data in enumerate(files):
            (folder / f"{i:05d}.dcm").write_bytes(data)
    store = tmp / f"inprocess-{name}-{len(list(tmp.glob('inprocess-*')))}"
    out = subprocess.run([sys.executable, "-c", _IN_PROCESS, str(src), str(protocols), str(folder), str(store)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def in_process_compared(tmp: Path, protocols: Path, files: list[bytes], baseline: Path,
                        rounds: int = 3) -> dict:
    """In-process intake cost of this checkout and of ``baseline`` (another checkout's ``src``), alternated.

    Each round runs both in fresh processes on fresh stores; the medians are compared, so
    machine load drifting during the run hits both alike.
    """
    runs: dict[str, list[float]] = {"now": [], "baseline": []}
    for _ in range(rounds):
        for name, src in (("now", ROOT / "src"), ("baseline", baseline)):
            runs[name].append(in_process(tmp, protocols, files, src, name)["files_per_s"])
    now, base = statistics.median(runs["now"]), statistics.median(runs["baseline"])
    return {"files": len(files), "now_files_per_s": now, "baseline_files_per_s": base, "ratio": now / base,
            "rounds": runs, "baseline_src": str(baseline)}


def one_gib(server: Server) -> dict:
    """RSS while one streamed 1 GiB part of non-DICOM bytes is uploaded."""
    pid = server.proc.pid
    idle = rss_mib(pid)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    streamed = threading.Event()
    samples: list[tuple[bool, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((streamed.is_set(), rss_mib(pid)))
            time.sleep(0.02)

    def body():
        yield b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
        chunk = b"\xab" * (1 << 20)
        for _ in range(1024):
            yield chunk
        yield b"\r\n--" + BOUNDARY.encode() + b"--\r\n"
        streamed.set()

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    reply = requests.post(f"{server.url}/dicomweb/S01/studies", data=body(), headers=HEADERS, timeout=600)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    failed = reply.json().get("00081198", [])
    return {"code": reply.status_code, "seconds": seconds, "idle_rss_mib": idle,
            "peak_rss_streaming_mib": max((r for done, r in samples if not done), default=float("nan")),
            "peak_rss_request_mib": max(r for _, r in samples), "vm_hwm_mib": rss_mib(pid, "VmHWM"),
            "stored_as": failed[0].get("status", "failed") if failed else "stored",
            "reason": failed[0]["reason"] if failed else None}


def idle_connections(server: Server, acse_timeout: float) -> dict:
    """10 bare TCP connections that send nothing: seconds until the server drops each; a C-STORE meanwhile."""
    drops: list[float] = []
    socks = [socket.create_connection(("127.0.0.1", server.dicom_port)) for _ in range(10)]
    start = time.perf_counter()

    def wait(sock: socket.socket) -> None:
        sock.settimeout(acse_timeout * 6 + 30)
        try:
            while sock.recv(4096):
                pass
            drops.append(time.perf_counter() - start)
        except ConnectionResetError:
            drops.append(time.perf_counter() - start)
        except socket.timeout:
            drops.append(float("inf"))

    waiters = [threading.Thread(target=wait, args=(s,)) for s in socks]
    for t in waiters:
        t.start()
    time.sleep(0.5)
    store = {"ok": None, "seconds": None, "detail": "dcmtk's storescu not installed"}
    if STORESCU.exists():
        files = sorted(SERIES.iterdir())[:5]
        t0 = time.perf_counter()
        run = subprocess.run([str(STORESCU), "-aet", "S01_MR1", "-aec", "SITEBENCH", "127.0.0.1",
                              str(server.dicom_port), *map(str, files)], capture_output=True, text=True, timeout=120)
        store = {"ok": run.returncode == 0, "seconds": time.perf_counter() - t0,
                 "detail": (run.stdout + run.stderr).strip().splitlines()[-1:] if run.returncode else "5 files"}
    for t in waiters:
        t.join()
    for s in socks:
        s.close()
    return {"acse_timeout_s": acse_timeout, "drop_median_s": statistics.median(drops), "drop_max_s": max(drops),
            "dropped": sum(d != float("inf") for d in drops), "cstore_while_open": store}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 files per sender instead of 196")
    parser.add_argument("--acse-timeout", type=float, default=10.0)
    parser.add_argument("--baseline", type=Path,
                        help="another checkout's src/ (e.g. `git worktree add /tmp/base ff07cb5`, then "
                             "/tmp/base/src): in-process intake cost per file, this checkout vs that one")
    args = parser.parse_args()
    if not SERIES.exists():
        sys.exit(f"{SERIES}: not found (the shared data folder must sit beside the repository)")

    from sitebench.provenance import code_version, package_versions
    from sitebench.qc.dicom_params import read_series
    from sitebench.qc.protocol import draft_protocol, lock_protocol

    n_files = 40 if args.quick else 196
    with tempfile.TemporaryDirectory(prefix="bench-intake-") as tmp_name:
        tmp = Path(tmp_name)
        (series,) = read_series(SERIES)
        draft = draft_protocol(series.parameters, "ge-t1w").save(tmp / "draft.yaml")
        lock_protocol(draft, who="bench", why="benchmark", lock_dir=tmp / "locked")
        copies = sender_copies(tmp, n_files)
        results: dict[str, dict] = {}
        with Server(tmp, tmp / "locked", args.acse_timeout) as server:
            results["one_gib"] = one_gib(server)
            results["stow"] = throughput(server, copies)
            dicom_copies = sender_copies(tmp, n_files)  # other UIDs: new files, not resends of the STOW ones
            results["cstore"] = throughput(server, dicom_copies,
                                           send=lambda: storescu_all(server, tmp, dicom_copies))
            results["idle_tcp"] = idle_connections(server, args.acse_timeout)
            tracebacks = server.log.read_text().count("Traceback")
        results["bare"] = bare_throughput(tmp, copies)
        results["in_process"] = in_process(tmp, tmp / "locked", [f for c in copies[:2] for f in c])
        if args.baseline is not None:
            results["in_process_vs_baseline"] = in_process_compared(tmp, tmp / "locked", copies[0], args.baseline)

    stow, bare, big, idle = results["stow"], results["bare"], results["one_gib"], results["idle_tcp"]
    cstore = results["cstore"]
    inproc = results["in_process"]
    rows = [
        ("HTTP files/s, 10 senders, bare body writer", f"{bare['files_per_s']:8.1f}", "floor (no intake work)", ""),
        ("intake files/s, in-process, one thread", f"{inproc['files_per_s']:8.1f}", "intake's own cost, no HTTP", ""),
        ("STOW-RS files/s, 10 senders (sitebench)", f"{stow['files_per_s']:8.1f}",
         f"{stow['files_per_s'] / inproc['files_per_s']:.2f}x in-process", ""),
        ("C-STORE files/s, 10 storescu senders", f"{cstore['files_per_s']:8.1f}",
         f"{cstore['files_per_s'] / inproc['files_per_s']:.2f}x in-process", f"{BEFORE['files_per_s']:.0f}"),
        ("/status median ms, under C-STORE load", f"{cstore['status_load_median_ms']:8.1f}", "", ""),
        ("/status max ms, under C-STORE load", f"{cstore['status_load_max_ms']:8.1f}", "",
         f"{BEFORE['status_max_ms']:.0f}"),
        ("/status median ms, idle", f"{stow['status_idle_median_ms']:8.1f}", "", ""),
        ("/status median ms, under load", f"{stow['status_load_median_ms']:8.1f}",
         f"{stow['status_load_median_ms'] / stow['status_idle_median_ms']:.1f}x idle", ""),
        ("/status max ms, under load", f"{stow['status_load_max_ms']:8.1f}", "goal < 1000", ""),
        ("RSS MiB idle", f"{big['idle_rss_mib']:8.0f}", "", "121"),
        ("RSS MiB peak, 1 GiB part streaming in", f"{big['peak_rss_streaming_mib']:8.0f}",
         f"+{big['peak_rss_streaming_mib'] - big['idle_rss_mib']:.0f} over idle; goal < 200", ""),
        ("RSS MiB peak, whole 1 GiB request (VmHWM)", f"{big['vm_hwm_mib']:8.0f}",
         f"+{big['vm_hwm_mib'] - big['idle_rss_mib']:.0f} over idle", f"{BEFORE['rss_1gib_mib']:.0f}"),
        ("idle bare TCP dropped after s (max of 10)", f"{idle['drop_max_s']:8.1f}",
         f"acse_timeout {idle['acse_timeout_s']:g} s; {idle['dropped']}/10 dropped", f"~{BEFORE['idle_drop_s']:.0f}"),
    ]
    print(f"{os.cpu_count()} CPUs; {SENDERS} senders x {n_files} files ({PARTS_PER_REQUEST} parts a request)")
    print(f"  {'':<44} {'now':>8}   {'':<36} before")
    for name, value, note, before in rows:
        print(f"  {name:<44} {value}   {note:<36} {before}")
    if "in_process_vs_baseline" in results:
        cmp = results["in_process_vs_baseline"]
        print(f"  {'intake files/s in-process, vs --baseline':<44} {cmp['now_files_per_s']:8.1f}   "
              f"{cmp['ratio']:.2f}x the baseline ({cmp['baseline_files_per_s']:.1f})")
    store = idle["cstore_while_open"]
    print(f"  C-STORE while the 10 idle connections were open: {store['ok']} ({store['detail']}); "
          f"1 GiB part: HTTP {big['code']}, {big['stored_as']} in {big['seconds']:.1f} s; "
          f"STOW reply codes {stow['codes']}; tracebacks in the server log: {tracebacks}")
    print(json.dumps({"results": results, "quick": args.quick, "tracebacks": tracebacks,
                      "before": BEFORE, "code_version": code_version(), "packages": package_versions()},
                     default=str))


if __name__ == "__main__":
    main()
