"""Dashboard page times with a trial's worth of records: 20 sites, 5,000 series, in SQLite and in
PostgreSQL (a real server this script starts with initdb/pg_ctl when the binaries are there).

    .venv/bin/python perf/bench_dashboard.py [--sites 20] [--series 5000] [--repeats 15] [--skip-postgres]

The gate (``IntakeService``, HTTP only, the dashboard mounted as ``qc serve`` mounts it) serves the
pages over a real socket; a signed-in central monitor fetches the trial overview and one site's
page; the median and the 90th percentile of the repeats are printed per database, beside the time
to fetch ``/healthz`` (the HTTP floor of the same server). Goals (issue 15): overview and site page
under 200 ms in SQLite and 300 ms in PostgreSQL. Measured, never asserted in tests. The site page
carries biomarker control charts too: a benchmark predictions table of two model versions for every
series is given as ``qc serve --predictions`` gives it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
T1 = ROOT.parent / "shared" / "data" / "dicom" / "dcm_qa_deident" / "In"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def locked_protocols(folder: Path) -> Path:
    from sitebench.qc.dicom_params import read_series
    from sitebench.qc.protocol import draft_protocol, lock_protocol

    (series,) = read_series(T1)
    draft = draft_protocol(series.parameters, "ge-t1w").save(folder / "draft.yaml")
    lock_protocol(draft, who="bench", why="bench", lock_dir=folder / "locked")
    return folder / "locked"


def fill(url: str, sites: int, n_series: int, seed: int = 0) -> None:
    """``n_series`` verdicts over ``sites`` sites and a year, a few with deviations and drift."""
    from sqlalchemy import insert

    from sitebench.qc.records import QCRecords, deviations, drift_events, verdicts

    records = QCRecords(url)
    rng = random.Random(seed)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    rows, devs, drifts = [], [], []
    for i in range(n_series):
        site = f"S{i % sites + 1:02d}"
        status = rng.choices(["pass", "warn", "fail", "undetermined"], [80, 10, 8, 2])[0]
        rows.append({"id": i + 1, "series_key": f"{i:020x}", "site": site, "study_key": f"{i // 3:020x}",
                     "scanner": f"scanner-{i % (sites * 2):012x}", "manufacturer": "GE", "model": "SIGNA",
                     "software_version": "DV26" if i < n_series * 0.6 else "DV28", "field_strength": 3.0,
                     "protocol": "ge-t1w", "protocol_version": 1, "protocol_sha256": "0" * 64, "status": status,
                     "latest": True, "checked_utc": (start + dt.timedelta(minutes=90 * i)).isoformat(timespec="seconds"),
                     "n_files": 196, "image_quality": json.dumps({"snr": rng.gauss(20, 2), "cnr": rng.gauss(3, .3),
                                                                  "efc": rng.gauss(.5, .02)}),
                     "phi_attributes_present": "[]", "file_problems": "[]",
                     "seconds": json.dumps({"header": 0.2, "upload_to_verdict": rng.uniform(4, 9)})})
        if status == "fail":
            devs.append({"verdict_id": i + 1, "parameter": "FlipAngle", "expected": "12 +/- 1", "observed": "25",
                         "rule": "abs", "severity": "fail", "status": "fail", "note": ""})
        if rng.random() < 0.01:
            drifts.append({"verdict_id": i + 1, "site": site, "scanner": rows[-1]["scanner"], "series_key": rows[-1]["series_key"],
                           "parameter": "SoftwareVersions", "baseline": '"DV26"', "observed": '"DV28"',
                           "kind": "software", "change": "changed", "first_seen": True})
    with records.engine.begin() as conn:
        conn.execute(insert(verdicts), rows)
        conn.execute(insert(deviations), devs)
        if drifts:
            conn.execute(insert(drift_events), drifts)


def predictions_table(path: Path, n_series: int, seed: int = 1) -> Path:
    """A benchmark's predictions.csv for every series (``scan_id`` = the gate's series key), two model versions."""
    rng = random.Random(seed)
    lines = ["scan_id,model_key,biomarker,prediction"]
    for i in range(n_series):
        for model in ("gm-unet@1.0.0", "gm-unet@2.0.0"):
            lines.append(f"{i:020x},{model},gm_volume_ml,{rng.gauss(640, 25):.2f}")
    path.write_text("\n".join(lines) + "\n")
    return path


def measure(store: Path, protocols: Path, database: str | None, sites: int, repeats: int,
            predictions: Path) -> dict:
    from functools import partial

    from sitebench.dashboard import mount
    from sitebench.dashboard.biomarkers import BiomarkerValues
    from sitebench.qc.intake import IntakeConfig, IntakeService, freeze_startup_objects

    port = free_port()
    config = IntakeConfig.model_validate({
        "store": store, "database": database, "protocols": protocols, "dicom": None, "folder": None,
        "http": {"host": "127.0.0.1", "port": port, "max_requests_per_minute": 1e6},
        "sites": {f"S{i + 1:02d}": {} for i in range(sites)}})
    service = IntakeService(config)
    service.http_extensions = [partial(mount, biomarkers=BiomarkerValues(None, [predictions]))]
    token = service.users.create("bench-monitor", "central_monitor")
    service.start()
    freeze_startup_objects()  # as `qc serve` does once started
    try:
        session = requests.Session()
        reply = session.post(f"http://127.0.0.1:{port}/login", data={"token": token}, allow_redirects=False, timeout=30)
        assert reply.status_code == 303, reply.text
        out = {}
        for name, path in (("healthz", "/healthz"), ("overview", "/"), ("site page", "/sites/S01")):
            warm = session.get(f"http://127.0.0.1:{port}{path}", timeout=30)
            assert name != "site page" or 'class="chart-biomarker"' in warm.text, "no biomarker chart"
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                page = session.get(f"http://127.0.0.1:{port}{path}", timeout=30)
                times.append(time.perf_counter() - started)
                assert page.status_code == 200, (path, page.status_code)
            times.sort()
            out[name] = {"median_ms": 1000 * statistics.median(times), "p90_ms": 1000 * times[int(0.9 * (len(times) - 1))]}
        return out
    finally:
        service.stop()


def postgres() -> tuple[str, callable] | None:
    initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not initdb:
        return None
    bindir = Path(initdb[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="sitebench-pg-bench-", dir="/tmp"))
    as_user = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    port = free_port()
    subprocess.run(as_user + [str(bindir / "initdb"), "-D", str(root / "data"), "-U", "sitebench", "--auth=trust"],
                   check=True, capture_output=True)
    subprocess.run(as_user + [str(bindir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"), "-w", "-o",
                              f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)

    def stop() -> None:
        subprocess.run(as_user + [str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

    return f"postgresql+psycopg://sitebench@127.0.0.1:{port}/postgres", stop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--series", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args()
    from sitebench.provenance import code_version

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        protocols = locked_protocols(Path(tmp) / "protocols")
        store = Path(tmp) / "sqlite-store"
        store.mkdir()
        from sitebench.qc.records import database_url

        fill(database_url(store), args.sites, args.series)
        predictions = predictions_table(Path(tmp) / "predictions.csv", args.series)
        results["sqlite"] = measure(store, protocols, None, args.sites, args.repeats, predictions)
        server = None if args.skip_postgres else postgres()
        if server is not None:
            url, stop = server
            try:
                fill(url, args.sites, args.series)
                pg_store = Path(tmp) / "pg-store"
                pg_store.mkdir()
                results["postgresql"] = measure(pg_store, protocols, url, args.sites, args.repeats, predictions)
            finally:
                stop()
    goals = {"sqlite": 200.0, "postgresql": 300.0}
    print(f"dashboard with {args.sites} sites and {args.series} series (median / p90 of {args.repeats}):")
    for db, pages in results.items():
        for name, t in pages.items():
            goal = "" if name == "healthz" else f"  goal < {goals[db]:.0f} ms: {'met' if t['median_ms'] < goals[db] else 'NOT met'}"
            print(f"  {db:<10} {name:<10} {t['median_ms']:7.1f} ms / {t['p90_ms']:7.1f} ms{goal}")
    print(json.dumps({"results": results, "sites": args.sites, "series": args.series, "code_version": code_version(),
                      "python": sys.version.split()[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
