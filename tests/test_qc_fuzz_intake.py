"""The whole fuzz corpus through all three ways in at once, next to a valid series.

A real `sitebench qc serve` (subprocess, SQLite, audit trail) gets the 197-file corpus of
tests/fuzz_corpus.py split over dcmtk's storescu, STOW-RS and the watched folder, then the
real GE T1 under new UIDs. Shown: every file sent is stored or refused (none lost), the bad
ones are quarantined or carry their problem, the valid series still gets its verdict within
its quiet period, the audit trail verifies with its key and head, and the server log holds
no traceback.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import requests
import sqlalchemy

from fuzz_corpus import make_corpus, valid_series
from test_qc_intake import SITE_AE, STORESCU, T1, TOKENS, Service, protocols  # noqa: F401 - fixture

pytestmark = [pytest.mark.dicom_net,
              pytest.mark.skipif(not T1.exists(), reason="needs ../shared/data/dicom"),
              pytest.mark.skipif(not STORESCU.exists(), reason="needs dcmtk's /usr/bin/storescu")]

QUIET = 2.0


def _stow_one(svc: Service, site: str, data: bytes) -> int:
    boundary = "fuzz-boundary-7d41"
    body = (b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + data
            + b"\r\n--" + boundary.encode() + b"--\r\n")
    reply = requests.post(f"http://127.0.0.1:{svc.http_port}/dicomweb/{site}/studies", data=body, timeout=60,
                          headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                                   "Authorization": f"Bearer {TOKENS[site]}"})
    return reply.status_code


def test_fuzz_corpus_through_every_way_in_leaves_the_gate_serving(tmp_path, protocols):  # noqa: F811
    cases = make_corpus(tmp_path / "corpus")
    assert len(cases) >= 150
    svc = Service(tmp_path, protocols, quiet_seconds=QUIET, max_file_mb=4.0,
                  incomplete_wait_seconds=5.0).start()
    try:
        by_way = {"dicom": cases[0::3], "http": cases[1::3], "folder": cases[2::3]}
        # C-STORE: storescu sends what it can read as DICOM (it skips the rest itself) and goes on
        dicom_dir = tmp_path / "dicom-way"
        dicom_dir.mkdir()
        for case in by_way["dicom"]:
            (dicom_dir / case.path.name).write_bytes(case.path.read_bytes())
        sent = subprocess.run([str(STORESCU), "-v", "-nh", "-aet", SITE_AE, "-aec", "SITEBENCH", "+sd", "+r",
                               "127.0.0.1", str(svc.dicom_port), str(dicom_dir)],
                              capture_output=True, text=True, errors="replace", timeout=300)
        acknowledged_dicom = (sent.stdout + sent.stderr).count("Received Store Response (Success)")
        # STOW-RS: one request per file, so each reply is that file's
        codes = [_stow_one(svc, "S01", case.path.read_bytes()) for case in by_way["http"]]
        assert set(codes) <= {200, 202, 409}, codes
        # the watched folder
        inbox = svc.inbox / "S01" / "fuzz"
        inbox.mkdir(parents=True)
        for case in by_way["folder"]:
            (inbox / case.path.name).write_bytes(case.path.read_bytes())
        deadline = time.monotonic() + 60
        while any(inbox.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(inbox.iterdir()), "the watched folder did not take every file"

        # then a valid series: its verdict comes within its quiet period, whatever came before it
        real = valid_series(tmp_path / "valid")
        svc.storescu(*real)
        sent_at = time.monotonic()
        engine = svc.records.engine
        series_key = None
        while time.monotonic() - sent_at < 60:
            rows = [v for v in svc.records.latest_verdicts() if v["n_files"] == 196]
            if rows:
                series_key = rows[0]["series_key"]
                break
            assert svc.proc.poll() is None
            time.sleep(0.1)
        waited = time.monotonic() - sent_at
        assert series_key is not None, svc.records.attention_lines()
        (verdict,) = [v for v in svc.records.latest_verdicts() if v["series_key"] == series_key]
        assert verdict["status"] == "pass"
        assert waited < QUIET + 3.0, f"valid series waited {waited:.1f}s for its verdict (quiet period {QUIET}s)"

        # nothing accepted is lost: every acknowledged or stored file has its row and its object
        with engine.connect() as conn:
            rows = conn.execute(sqlalchemy.text(
                "SELECT source, stored_path, quarantine, series_key, problems, indexed FROM received_files")).all()
        assert all(r.indexed for r in rows), "files left unparsed"
        for r in rows:
            assert (svc.store / r.stored_path).is_file()
        corpus_rows = [r for r in rows if r.series_key != series_key]
        stored = {way: sum(r.source == way for r in corpus_rows) for way in by_way}
        quarantined = sum(r.quarantine is not None for r in corpus_rows)
        with_problems = sum(r.quarantine is None and r.problems != "[]" for r in corpus_rows)
        assert stored["dicom"] >= acknowledged_dicom
        assert stored["http"] == sum(c != 400 for c in codes) - codes.count(413)
        assert stored["folder"] == len(by_way["folder"])
        print(f"\nfuzz corpus: {len(cases)} files sent ({', '.join(f'{w} {len(c)}' for w, c in by_way.items())}); "
              f"stored {sum(stored.values())} ({', '.join(f'{w} {n}' for w, n in stored.items())}; storescu "
              f"could send {acknowledged_dicom} of its {len(by_way['dicom'])}); quarantined {quarantined}; "
              f"stored with a problem {with_problems}; valid series verdict {waited:.1f}s after its last file")
        assert quarantined + with_problems >= 60
        # every corpus series is settled: a verdict, or waiting because it is known incomplete; none
        # was given up on after failed checks
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                unsettled = conn.execute(sqlalchemy.text(
                    "SELECT count(*) FROM series WHERE state = 'open' AND waiting IS NULL")).scalar()
            if not unsettled:
                break
            time.sleep(0.3)
        assert unsettled == 0, svc.records.attention_lines()
        assert sum(s.quarantined_series for s in svc.records.site_status()) == 0, svc.records.attention_lines()
        # no file and no series hit a bug on the way (the developers' log is written only then)
        errors = svc.store / "logs" / "errors.log"
        assert not errors.exists(), errors.read_text()[-3000:]

        status = subprocess.run([sys.executable, "-m", "sitebench.cli", "qc", "status", "--store", str(svc.store)],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "Traceback" not in status.stderr
        verify = subprocess.run([sys.executable, "-m", "sitebench.cli", "audit", "verify", "--config",
                                 str(svc.config)], capture_output=True, text=True, timeout=60)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert "MACs valid" in verify.stdout
    finally:
        log = svc.stop() if svc.proc.poll() is None else svc.proc.stderr.read()
    assert "Traceback" not in log, log[-4000:]
    assert svc.proc.returncode == 0, log[-2000:]
