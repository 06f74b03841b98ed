"""Deviation queries worked with the site, end to end: a real upload of the GE T1 with a wrong flip
angle fails at a real `sitebench qc serve`, drafts a query; the monitor opens it, another site's
coordinator is refused, the site's coordinator answers, the monitor sends it back, then accepts; a
second failure is closed by its passing re-scan. Every step is in the audit trail."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from test_qc_stow import T1, Service, multipart

pytestmark = pytest.mark.skipif(not T1.exists(), reason="needs ../shared/data/dicom")


@pytest.fixture(scope="module")
def protocols(t1_protocols):
    return t1_protocols


def wrong_flip_angle(out: Path, flip: float = 25.0) -> list[bytes]:
    """The T1 series as a new series of the same study, acquired with another flip angle."""
    out.mkdir(parents=True, exist_ok=True)
    series_uid = pydicom.uid.generate_uid()
    parts = []
    for i, path in enumerate(sorted(T1.iterdir())):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FlipAngle = series_uid, pydicom.uid.generate_uid(), flip
        ds.save_as(out / f"{i:04d}.dcm", enforce_file_format=True)
        parts.append((out / f"{i:04d}.dcm").read_bytes())
    return parts


def upload(svc: Service, site: str, parts: list[bytes], token: str) -> None:
    for start in range(0, len(parts), 50):
        reply = svc.post(site, multipart(parts[start:start + 50]), token=token)
        assert reply.status_code == 200, reply.text


def queries(svc: Service, token: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "sitebench.cli", "qc", "queries", *args, "--config", str(svc.config),
                           "--token", token, "--json"], capture_output=True, text=True, timeout=60)
    return {"rc": done.returncode, "err": done.stderr, **(json.loads(done.stdout) if done.returncode == 0 else {})}


def wait_for(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    return predicate()


def user(svc: Service, name: str, role: str, site: str | None = None) -> str:
    args = [sys.executable, "-m", "sitebench.cli", "qc", "users", "add", name, "--role", role, "--config",
            str(svc.config), "--json", *(["--site", site] if site else [])]
    return json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)["token"]


def test_a_failed_series_is_worked_to_closure_with_its_site(tmp_path, protocols):
    svc = Service(tmp_path, protocols, http={"max_requests_per_minute": 100000}, quiet_seconds=1.0)
    tokens = {"up": user(svc, "up-s01", "site_uploader", "S01"), "coord": user(svc, "coord-s01", "site_coordinator", "S01"),
              "coord2": user(svc, "coord-s02", "site_coordinator", "S02"), "monitor": user(svc, "monitor", "central_monitor")}
    svc.start()
    try:
        upload(svc, "S01", wrong_flip_angle(tmp_path / "fa25"), tokens["up"])
        drafts = wait_for(lambda: queries(svc, tokens["monitor"], "list").get("queries"))
        (draft,) = drafts
        assert draft["status"] == "draft" and draft["site"] == "S01"
        assert [d["parameter"] for d in draft["what_failed"]] == ["FlipAngle"]
        assert draft["what_failed"][0]["observed"] == 25 and "Re-scan with the locked protocol" in draft["request"]
        qid = str(draft["id"])
        # the coordinator cannot open it; another site's coordinator cannot even see it
        refused = queries(svc, tokens["coord"], "open", qid)
        assert refused["rc"] == 2 and "may not manage query" in refused["err"] and "Traceback" not in refused["err"]
        assert queries(svc, tokens["coord2"], "show", qid)["rc"] == 2
        assert queries(svc, tokens["coord2"], "list")["queries"] == []  # its own site's: none
        opened = queries(svc, tokens["monitor"], "open", qid, "--text", "please re-scan or explain")
        assert opened["status"] == "open" and opened["due_utc"]
        assert queries(svc, tokens["coord2"], "answer", qid, "--kind", "explanation", "--text", "x")["rc"] == 2
        answered = queries(svc, tokens["coord"], "answer", qid, "--kind", "explanation",
                           "--text", "the technologist loaded an old protocol; retrained")
        assert answered["status"] == "answered" and answered["answer_kind"] == "explanation"
        returned = queries(svc, tokens["monitor"], "send-back", qid, "--text", "a re-scan is needed for this visit")
        assert returned["status"] == "returned"
        queries(svc, tokens["coord"], "answer", qid, "--kind", "rescan", "--text", "re-scan booked")
        closed = queries(svc, tokens["monitor"], "accept", qid, "--text", "ok")
        assert closed["status"] == "closed" and closed["closed_utc"]
        steps = queries(svc, tokens["monitor"], "show", qid)["steps"]
        assert [s["step"] for s in steps] == ["drafted", "opened", "answered", "returned", "answered", "accepted"]
        assert [s["who"] for s in steps][1:] == ["monitor", "coord-s01", "monitor", "coord-s01", "monitor"]

        # a second failure of the same study and protocol, then the passing re-scan closes its query
        upload(svc, "S01", wrong_flip_angle(tmp_path / "fa30", 30.0), tokens["up"])
        second = wait_for(lambda: [q for q in queries(svc, tokens["monitor"], "list")["queries"] if q["status"] == "draft"])
        queries(svc, tokens["monitor"], "open", str(second[0]["id"]))
        upload(svc, "S01", [p.read_bytes() for p in sorted(T1.iterdir())], tokens["up"])
        linked = wait_for(lambda: queries(svc, tokens["monitor"], "show", str(second[0]["id"])).get("rescan_series_key"))
        final = queries(svc, tokens["monitor"], "show", str(second[0]["id"]))
        assert linked and final["status"] == "closed" and final["answer_kind"] == "rescan"
        assert final["steps"][-1]["step"] == "rescan passed"
        trail = svc.audit()
        whats = [r["what"] for r in trail if r["what"].startswith("query ")]
        assert whats.count("query opened") == 2 and "query returned" in whats and "query rescan passed" in whats
        assert any(r["what"] == "access refused" and r["details"]["user"] == "coord-s02" for r in trail)
        assert not any(t in json.dumps(trail) for t in tokens.values())
    finally:
        svc.stop()
