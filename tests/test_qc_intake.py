"""The upload-time gate as a site sends to it: dcmtk's storescu, STOW-RS over HTTP, a watched folder.

Every test runs the real `sitebench qc serve` in a subprocess with a real SQLite database and
audit trail in a temp folder, and sends real series from ../shared/data/dicom.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import sqlalchemy
import yaml
from nibabel.nicom import dicomwrappers

from sitebench.audit import verify_trail
from sitebench.datasets.manifest import read_manifest
from sitebench.provenance import sha256_file
from sitebench.qc.records import QCRecords, database_url

DICOM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
T1 = DICOM / "dcm_qa_deident" / "In"
ENHANCED = DICOM / "dcm_qa_enh" / "In" / "Philips" / "IM_0027_fMAP.dcm"
STORESCU = Path("/usr/bin/storescu")  # dcmtk's; pynetdicom installs a different storescu in the venv
SITE_AE = "S01_MR1"
TOKENS = {"S01": "s01-upload-token", "S02": "s02-upload-token"}  # STOW-RS bearer tokens; the config holds their SHA-256

pytestmark = [
    pytest.mark.dicom_net,  # storescu to a DICOM listener, STOW-RS over HTTP
    pytest.mark.skipif(not T1.exists(), reason="needs ../shared/data/dicom"),
    pytest.mark.skipif(not STORESCU.exists(), reason="needs dcmtk's /usr/bin/storescu (apt-get install dcmtk)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def protocols(t1_protocols) -> Path:
    return t1_protocols


class Service:
    """`sitebench qc serve` in a subprocess, with helpers to wait on its database."""

    def __init__(self, tmp: Path, protocols: Path, **overrides) -> None:
        self.store = tmp / "store"
        self.inbox = tmp / "inbox"
        self.dicom_port, self.http_port = free_port(), free_port()
        config = {"store": str(self.store), "protocols": str(protocols), "folder": str(self.inbox),
                  "sites": {site: {"ae_titles": [ae],
                                   "http_token_sha256": [hashlib.sha256(TOKENS[site].encode()).hexdigest()]}
                            for site, ae in (("S01", SITE_AE), ("S02", "S02_MR1"))},
                  "dicom": {"host": "127.0.0.1", "port": self.dicom_port, "ae_title": "SITEBENCH"},
                  "http": {"host": "127.0.0.1", "port": self.http_port},
                  "quiet_seconds": 1.0, "image_quality": False, **overrides}
        self.config = tmp / "intake.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Service":
        self.proc = subprocess.Popen([sys.executable, "-m", "sitebench.cli", "qc", "serve", "--config", str(self.config)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert '"listening"' in line, line + self.proc.stderr.read()
        return self

    def stop(self, sig=signal.SIGTERM) -> str:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        return self.proc.stderr.read()

    @property
    def records(self) -> QCRecords:
        return QCRecords(database_url(self.store))

    def wait_for_verdicts(self, n: int, timeout: float = 90) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.records.latest_verdicts()
            if len(rows) >= n and not self.records.open_series():
                return rows
            assert self.proc.poll() is None, self.proc.stderr.read()
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"no {n} verdicts after {timeout}s: {self.records.latest_verdicts()}; "
                             f"open: {self.records.open_series()}; service log: {self.proc.stderr.read()[-3000:]}")

    def storescu(self, *paths: Path, aet: str = SITE_AE, check: bool = True) -> subprocess.CompletedProcess:
        args = [str(STORESCU), "-v", "-aet", aet, "-aec", "SITEBENCH", "+sd", "+r", "127.0.0.1",
                str(self.dicom_port), *map(str, paths)]
        result = subprocess.run(args, capture_output=True, text=True, timeout=300)
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    def stow(self, site: str, parts: list[bytes]) -> tuple[int, dict]:
        import requests

        boundary = "sitebench-test-boundary"
        body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                        for p in parts) + b"--" + boundary.encode() + b"--\r\n"
        reply = requests.post(f"http://127.0.0.1:{self.http_port}/dicomweb/{site}/studies", data=body, timeout=60,
                              headers={"Content-Type": f'multipart/related; type="application/dicom"; '
                                                       f'boundary={boundary}',
                                       "Authorization": f"Bearer {TOKENS[site]}"})
        return reply.status_code, reply.json()


@pytest.fixture
def service(tmp_path, protocols):
    svc = Service(tmp_path, protocols).start()
    yield svc
    if svc.proc.poll() is None:
        svc.stop()


def audit_records(service: Service) -> list[dict]:
    return [json.loads(line) for line in (service.store / "audit.jsonl").read_text().splitlines()]


def test_storescu_series_gets_its_verdict_in_database_and_audit(service):
    service.storescu(T1)
    (verdict,) = service.wait_for_verdicts(1)
    assert verdict["status"] == "pass" and verdict["n_files"] == 196 and verdict["site"] == "S01"
    assert verdict["protocol"] == "ge-t1w" and verdict["protocol_version"] == 1
    assert service.records.file_count() == 196
    trail = audit_records(service)
    whats = [r["what"] for r in trail]
    assert "transfer received" in whats and "verdict" in whats
    audited = next(r for r in trail if r["what"] == "verdict")
    assert audited["subject"] == f"series {verdict['series_key']}" and audited["details"]["status"] == "pass"
    assert verify_trail(service.store / "audit.jsonl").ok
    # identifiers: attribute names are a finding, values never reach the database or the trail
    first = pydicom.dcmread(next(T1.iterdir()), stop_before_pixels=True)
    assert "PatientName" in audited["details"]["phi_attributes_present"]
    values = [str(first.get(k, "")).strip() for k in ("PatientName", "PatientID", "SeriesInstanceUID",
                                                         "StudyInstanceUID", "DeviceSerialNumber")]
    text = (service.store / "audit.jsonl").read_text() + (service.store / "qc.db").read_bytes().decode("latin-1")
    for value in filter(None, values):
        assert value not in text

    # a resend of the same series is idempotent: no new files, no second verdict
    service.storescu(T1)
    time.sleep(2.5)
    assert service.records.file_count() == 196 and len(service.records.latest_verdicts()) == 1

    # qc status shows the site
    status = subprocess.run([sys.executable, "-m", "sitebench.cli", "qc", "status", "--store", str(service.store),
                             "--json"], capture_output=True, text=True, timeout=60)
    (row,) = json.loads(status.stdout)
    assert row["site"] == "S01" and row["passed"] == 1 and row["series"] == 1

    # the verdict feeds the scan manifest the benchmarks read: a NIfTI whose geometry matches
    # nibabel's own reading of the DICOM, and the QC columns
    out = service.store.parent / "trial" / "manifest.csv"
    made = subprocess.run([sys.executable, "-m", "sitebench.cli", "qc", "manifest", "--store", str(service.store),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    manifest = read_manifest(out)
    (scan,) = manifest.table.to_dict("records")
    assert scan["scan_id"] == verdict["series_key"] and scan["qc_status"] == "pass" and scan["vendor"] == "GE"
    image = nib.load(out.parent / scan["image_path"])
    assert image.shape == (256, 256, 196)
    assert_same_world_coordinates(image, sorted(T1.iterdir())[77])

    # tampering with the gate's own trail: turning the verdict into a fail is caught, by record
    tampered = service.store.parent / "tampered.jsonl"
    lines = (service.store / "audit.jsonl").read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if '"what":"verdict"' in line)
    lines[index] = lines[index].replace('"status":"pass"', '"status":"fail"', 1)
    tampered.write_text("\n".join(lines) + "\n")
    check = subprocess.run([sys.executable, "-m", "sitebench.cli", "audit", "verify", str(tampered)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and f"seq {json.loads(lines[index])['seq']}" in check.stdout + check.stderr
    # cutting the last records off cleanly leaves a valid hash chain; the MAC key and the head the
    # gate keeps in its database catch it
    service.stop()
    trail = service.store / "audit.jsonl"
    assert subprocess.run([sys.executable, "-m", "sitebench.cli", "audit", "verify", "--config", str(service.config)],
                          capture_output=True, text=True, timeout=60).returncode == 0
    trail.write_text("".join(trail.read_text().splitlines(keepends=True)[:-2]))
    assert verify_trail(trail).ok  # the plain hash chain cannot tell
    cut = subprocess.run([sys.executable, "-m", "sitebench.cli", "audit", "verify", "--config", str(service.config)],
                         capture_output=True, text=True, timeout=60)
    assert cut.returncode == 1 and "missing" in cut.stdout, cut.stdout + cut.stderr


def assert_same_world_coordinates(image, dicom_file: Path) -> None:
    """Pixels of one slice land where nibabel's own DICOM reader puts them (catches flipped axes)."""
    wrapper = dicomwrappers.wrapper_from_file(dicom_file)
    pixels = pydicom.dcmread(dicom_file).pixel_array.astype(np.float32)
    volume = np.asarray(image.dataobj, dtype=np.float32)
    (k,) = [k for k in range(volume.shape[2]) if np.array_equal(volume[:, :, k], pixels)]
    theirs_data = np.asarray(wrapper.get_data(), dtype=np.float32)
    transposed = theirs_data.shape[:2] == pixels.T.shape and np.array_equal(theirs_data[..., 0] if
                                                                           theirs_data.ndim == 3 else theirs_data, pixels.T)
    for r, c in ((0, 0), (10, 200), (255, 3), (128, 64)):
        ours = np.diag([-1, -1, 1, 1]) @ image.affine @ np.array([r, c, k, 1.0])  # RAS -> LPS
        index = (c, r) if transposed else (r, c)
        theirs = wrapper.affine @ np.array([*index, 0, 1.0])
        assert np.allclose(ours[:3], theirs[:3], atol=0.01), (r, c, ours, theirs)


def test_a_file_whose_indexing_keeps_failing_is_quarantined_and_holds_nothing_up(tmp_path, protocols):
    """Bounded, backed-off retries, then quarantine: in-process, with the object of a recorded file gone."""
    from sitebench.qc.intake import IntakeService, load_intake_config

    svc = Service(tmp_path, protocols, dicom=None, http=None, folder=None, max_attempts=2, incomplete_wait_seconds=1.0)
    config = load_intake_config(svc.config)
    service = IntakeService(config)
    try:
        transfer = service.begin_transfer("S01", "dicom", SITE_AE)
        files = sorted(T1.iterdir())
        doomed = service.receive(files[0].read_bytes(), transfer)  # recorded, not yet parsed ...
        service._pending.join()
        # ... and as if the parse had not happened before a crash, and the object was lost since
        with service.records.engine.begin() as conn:
            conn.execute(sqlalchemy.text("UPDATE received_files SET indexed = 0, series_key = NULL"))
            conn.execute(sqlalchemy.text("DELETE FROM series"))
        (service.store.root / service.records.file_state(doomed.sha256)["stored_path"]).unlink()
        for f in files[1:]:
            service.receive(f.read_bytes(), transfer)
        service.end_transfer(transfer)
        service.start(check_interval=0.2)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not service.records.file_state(doomed.sha256)["quarantine"]:
            time.sleep(0.1)
        state = service.records.file_state(doomed.sha256)
        assert state["quarantine"] == "could not be indexed: FileNotFoundError" and state["attempts"] == 2
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not service.records.latest_verdicts():
            time.sleep(0.2)
        (verdict,) = service.records.latest_verdicts()  # the other 195 files still make their series' verdict
        assert verdict["n_files"] == 195 and verdict["status"] == "fail"
        (row,) = service.records.site_status()
        assert row.quarantined_files == 1
        assert any("quarantined" in line for line in service.records.attention_lines())
    finally:
        service.stop()
    trail = [json.loads(line) for line in (svc.store / "audit.jsonl").read_text().splitlines()]
    assert [r["why"] for r in trail if r["what"] == "file quarantined"] == ["could not be indexed: FileNotFoundError"]
    assert "FileNotFoundError" in (svc.store / "logs" / "errors.log").read_text()  # the traceback, for developers


def test_unknown_calling_ae_title_is_refused_and_audited(service):
    result = service.storescu(next(T1.iterdir()), aet="STRANGER", check=False)
    assert result.returncode != 0
    assert service.records.file_count() == 0
    assert any(r["what"] == "association rejected" and "STRANGER" in r["subject"] for r in audit_records(service))


def _modified(path: Path, out: Path, edit) -> Path:
    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_bad_input_is_stored_audited_and_the_service_keeps_serving(tmp_path, protocols):
    # the 3-slice series below is short of the 196 its protocol expects: it waits 3 s for the rest, then fails
    svc = Service(tmp_path, protocols, max_file_mb=1.0, incomplete_wait_seconds=3.0).start()
    try:
        files = sorted(T1.iterdir())
        bad = tmp_path / "bad"
        bad.mkdir()
        # 1. truncated file and 2. a file that is not DICOM, over STOW-RS
        data = files[0].read_bytes()
        code, reply = svc.stow("S01", [data[: len(data) - 4000], b"this is not DICOM\n" * 10])
        assert code == 409, reply
        reasons = [f["reason"] for f in reply["00081198"]]
        assert "truncated" in reasons[0] and "not a DICOM file" in reasons[1]
        # 3. DICOM without pixel data, 4. missing required tags: storescu; new instances of the T1 series
        def new_instance(ds, drop):
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            delattr(ds, drop)
        no_pixels = _modified(files[1], bad / "nopix.dcm", lambda ds: new_instance(ds, "PixelData"))
        no_rows = _modified(files[2], bad / "norows.dcm", lambda ds: new_instance(ds, "Rows"))
        svc.storescu(no_pixels, no_rows)
        # 5. two series in one transfer: the T1 with a copy of three slices under a new SeriesInstanceUID
        other = bad / "other"
        other.mkdir()
        new_uid = pydicom.uid.generate_uid()
        for f in files[:3]:
            _modified(f, other / f.name, lambda ds: (setattr(ds, "SeriesInstanceUID", new_uid),
                                                      setattr(ds, "SOPInstanceUID", pydicom.uid.generate_uid())))
        # 6. an enhanced file that lost its shared functional groups
        enhanced = _modified(ENHANCED, bad / "enh.dcm", lambda ds: ds.__delattr__("SharedFunctionalGroupsSequence"))
        # 7. a file far larger than the limit (1 MB here): refused with A700, audited, not stored
        def huge(ds):
            ds.Rows, ds.Columns = 1024, 1024
            ds.PixelData = bytes(1024 * 1024 * 2)
        big = _modified(files[5], bad / "big.dcm", huge)
        big_send = svc.storescu(big, check=False)
        assert "Refused: OutOfResources" in big_send.stdout + big_send.stderr, big_send.stdout + big_send.stderr
        svc.storescu(T1, other, enhanced)

        verdicts = svc.wait_for_verdicts(3)
        by_files = {v["n_files"]: v for v in verdicts}
        # 196 slices + the pixel-less and row-less instances; the truncated copy of slice 1 was
        # repaired by the full resend of the same instance
        t1 = by_files[198]
        assert t1["status"] == "undetermined"
        assert sorted(t1["file_problems"]) == ["no pixel data", "required tags missing: Rows"]
        deviations = svc.records.deviations_of(t1["id"])
        assert {d["parameter"] for d in deviations} == {"FileIntegrity"}
        # the second series of the transfer is checked on its own: 3 slices miss the coverage
        short = by_files[3]
        assert short["status"] == "fail" and short["series_key"] != t1["series_key"]
        assert "SliceCoverageMM" in {d["parameter"] for d in svc.records.deviations_of(short["id"])}
        enh = by_files[1]
        assert enh["protocol"] is None and enh["status"] == "unmatched"  # a Philips field map, not the T1
        assert "enhanced MR image without SharedFunctionalGroupsSequence" in " ".join(enh["file_problems"])

        trail = audit_records(svc)
        rejected = [r for r in trail if r["what"] == "file rejected"]
        assert len(rejected) == 1 and "not a DICOM file" in rejected[0]["why"]  # the truncated one has a series
        assert any(r["what"] == "file refused" and "exceeds" in r["why"] for r in trail)
        assert all(p.exists() for p in (svc.store / "objects").rglob("*") if p.is_file())
        assert svc.records.rejected_files()[0]["problems"] == ["not a DICOM file (no DICM preamble or file meta)"]
        assert verify_trail(svc.store / "audit.jsonl").ok

        # still serving: another real series (Siemens XA30 field map) over the watched folder gets its verdict
        drop = svc.inbox / "S02" / "xa30"
        shutil.copytree(DICOM / "dcm_qa_xa30" / "In" / "9_gre_field_mapping", drop)
        latest = svc.wait_for_verdicts(4)[-1]
        assert latest["site"] == "S02" and latest["status"] == "unmatched"
        assert not any(p.is_file() for p in drop.rglob("*"))  # taken in, then removed from the folder
    finally:
        svc.stop()


def _kill_mid_series(tmp_path: Path, protocols: Path) -> tuple[Service, int]:
    """Start a gate, SIGKILL it while storescu sends the T1; (service, files acknowledged).

    The kill must land mid-series: on an idle machine storescu can send all 196 files before
    the kill lands, so a run where it did is repeated on a fresh store, killing earlier.
    """
    for attempt, kill_at in enumerate((20, 5, 1)):
        run = tmp_path / f"run{attempt}"
        run.mkdir()
        svc = Service(run, protocols, quiet_seconds=2.0).start()
        sender = subprocess.Popen([str(STORESCU), "-v", "-aet", SITE_AE, "-aec", "SITEBENCH", "+sd", "+r",
                                   "127.0.0.1", str(svc.dicom_port), str(T1)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while svc.records.file_count() < kill_at and time.monotonic() < deadline:
            time.sleep(0.002)
        svc.proc.send_signal(signal.SIGKILL)
        svc.proc.wait(timeout=30)
        log = sender.communicate(timeout=60)[0]
        acknowledged = log.count("Received Store Response (Success)")
        if acknowledged < 196:
            return svc, acknowledged
    raise AssertionError("storescu sent the whole series before every kill landed")


def test_sigkill_mid_series_loses_nothing_acknowledged(tmp_path, protocols):
    svc, acknowledged = _kill_mid_series(tmp_path, protocols)
    assert acknowledged >= 1

    stored = svc.records.file_count()
    assert stored >= acknowledged
    for row in svc.records.series_files(svc.records.open_series()[0]):  # (path, problems, header summary)
        assert sha256_file(svc.store / row[0]) == Path(row[0]).name  # content-addressed, intact

    # a power loss may roll back the newest database commits (WAL, synchronous=NORMAL): the
    # fsync'd objects are the record, and start-up re-records them
    lose = min(10, stored - 1)
    with svc.records.engine.begin() as conn:
        lost = conn.execute(sqlalchemy.text(
            f"DELETE FROM received_files WHERE id IN (SELECT id FROM received_files ORDER BY id DESC LIMIT {lose})"
        )).rowcount
    assert lost == lose and svc.records.file_count() == stored - lose
    # a file cut off mid-write, as a killed receiver leaves it
    (svc.store / "objects" / "tmp" / "partial-write").write_bytes(b"DICM" * 100)

    # restart: the open series is recovered, the cut association audited, the partial file removed
    svc.start()
    deadline = time.monotonic() + 30
    while svc.records.file_count() < stored and time.monotonic() < deadline:
        time.sleep(0.1)
    # every stored object has its row again (one more when the kill fell between an object's
    # fsync and its row's commit: never acknowledged, but kept)
    assert stored <= svc.records.file_count() <= stored + 1
    assert not list((svc.store / "objects" / "tmp").iterdir())
    trail = audit_records(svc)
    (cut,) = [r for r in trail if r["what"] == "transfer interrupted"]
    assert cut["why"].startswith("association aborted") and cut["details"]["files"] >= stored - lose

    # the partial series is quiet but known incomplete (its protocol expects 196 slices): it
    # waits, with no interim verdict, however long the site takes to resend
    time.sleep(3 * 2.0)
    assert svc.records.latest_verdicts() == [] and len(svc.records.open_series()) == 1
    assert any("waiting" in line for line in svc.records.attention_lines())
    svc.storescu(T1)
    (verdict,) = svc.wait_for_verdicts(1)
    assert verdict["n_files"] == 196 and verdict["status"] == "pass"
    with svc.records.engine.connect() as conn:  # exactly one verdict ever, not a fail then a pass
        assert conn.execute(sqlalchemy.text("SELECT count(*) FROM verdicts")).scalar() == 1
    trail = audit_records(svc)
    starts = [r for r in trail if r["what"] == "intake started"]
    assert starts[-1]["details"]["open_series_recovered"] == 1
    assert starts[-1]["details"]["partial_files_removed"] >= 1  # ours, and any the kill cut off mid-write
    assert verify_trail(svc.store / "audit.jsonl").ok
    assert "Traceback" not in svc.stop()


# --------------------------------------------------------------------------- robustness (issue 12)
def _copy_with(path: Path, out: Path, **attrs) -> Path:
    """A copy of a real file with some attributes changed (UIDs kept unless given)."""
    ds = pydicom.dcmread(path)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(out, enforce_file_format=True)
    return out


def _quarantined(svc: Service) -> list[dict]:
    with svc.records.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sqlalchemy.text(
            "SELECT sha256, site, quarantine FROM received_files WHERE quarantine IS NOT NULL")).mappings()]


def test_one_sites_file_never_changes_another_sites_series(service, tmp_path):
    service.storescu(T1)
    (before,) = service.wait_for_verdicts(1)
    assert before["status"] == "pass"
    files = sorted(T1.iterdir())
    # S02 sends a file carrying the SOPInstanceUID of S01's instance (other bytes), and one that
    # joins S01's SeriesInstanceUID as a new instance: over DICOM and over STOW-RS
    same_sop = _copy_with(files[5], tmp_path / "same_sop.dcm", ImageComments="from another site")
    same_series = _copy_with(files[6], tmp_path / "same_series.dcm", SOPInstanceUID=pydicom.uid.generate_uid())
    service.storescu(same_sop, aet="S02_MR1")
    code, reply = service.stow("S02", [same_series.read_bytes()])
    assert code == 409 and "another site" in reply["00081198"][0]["reason"], reply
    deadline = time.monotonic() + 20
    while len(_quarantined(service)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    quarantined = _quarantined(service)
    assert {q["site"] for q in quarantined} == {"S02"} and len(quarantined) == 2
    assert all("another site" in q["quarantine"] for q in quarantined)
    time.sleep(2.5)  # a quiet period: had S01's series been re-opened, it would be checked again now
    (after,) = service.records.latest_verdicts()
    assert after["id"] == before["id"] and after["status"] == "pass" and after["n_files"] == 196
    assert service.records.open_series() == []
    (s01,) = [s for s in service.records.site_status() if s.site == "S01"]
    assert s01.quarantined_files == 0
    whats = [r["what"] for r in audit_records(service)]
    assert whats.count("file quarantined") == 2


def test_resent_instance_with_other_bytes_is_a_conflict_until_a_person_keeps_one(service, tmp_path):
    service.storescu(T1)
    (first,) = service.wait_for_verdicts(1)
    original = sorted(T1.iterdir())[5]
    changed = _copy_with(original, tmp_path / "changed.dcm", ImageComments="edited after the scan")
    service.storescu(changed)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        (latest,) = service.records.latest_verdicts()
        if latest["id"] != first["id"] and not service.records.open_series():
            break
        time.sleep(0.3)
    assert latest["status"] == "undetermined" and latest["n_files"] == 197
    assert any("conflict" in p for p in latest["file_problems"]), latest["file_problems"]
    (s01,) = service.records.site_status()
    assert s01.conflicts == 1
    assert any(r["what"] == "instance conflict" for r in audit_records(service))
    # both copies are kept; the person keeps the original, and the series is checked again
    copies = service.records.conflicts()  # in arrival order; C-STORE keeps the dataset as sent, not the file
    assert len(copies) == 2 and copies[0]["instance_number"] == copies[1]["instance_number"] is not None
    keep, other = copies[0]["sha256"], copies[1]["sha256"]
    done = subprocess.run([sys.executable, "-m", "sitebench.cli", "qc", "resolve", "--config", str(service.config),
                           "--keep", keep[:16], "--who", "A. Coordinator", "--why", "the edit was not the scan"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        (final,) = service.records.latest_verdicts()
        if final["id"] != latest["id"]:
            break
        time.sleep(0.3)
    assert final["status"] == "pass" and final["n_files"] == 196
    assert (service.store / "objects" / "S01" / other[:2] / other).exists()  # kept, not used
    resolved = [r for r in audit_records(service) if r["what"] == "conflict resolved"]
    assert resolved and resolved[0]["who"] == "A. Coordinator"


def test_called_ae_title_must_be_the_gates(service):
    args = [str(STORESCU), "-aet", SITE_AE, "-aec", "NOT_THE_GATE", "127.0.0.1", str(service.dicom_port),
            str(next(T1.iterdir()))]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and service.records.file_count() == 0
    (rejected,) = [r for r in audit_records(service) if r["what"] == "association rejected"]
    assert "called AE title" in rejected["why"]


def test_store_is_private_and_the_watched_folder_never_follows_links(service, tmp_path):
    outside = tmp_path / "outside.dcm"
    shutil.copy(sorted(T1.iterdir())[0], outside)
    (service.inbox / "S01").mkdir(parents=True, exist_ok=True)
    (service.inbox / "S01" / "link.dcm").symlink_to(outside)
    (service.inbox / "S01" / "linked-folder").symlink_to(T1, target_is_directory=True)
    deadline = time.monotonic() + 20
    while (service.inbox / "S01" / "link.dcm").is_symlink() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)
    assert service.records.file_count() == 0 and outside.exists()
    assert (service.inbox / ".refused" / "S01" / "link.dcm").is_symlink()
    refused = [r for r in audit_records(service) if r["what"] == "file refused"]
    assert len(refused) == 2 and all("symbolic link" in r["why"] for r in refused)
    service.storescu(sorted(T1.iterdir())[0])
    deadline = time.monotonic() + 20
    while service.records.file_count() < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    for path in [service.store, *(service.store / "objects").rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


def test_idle_connections_are_dropped_and_never_block_intake(tmp_path, protocols):
    """Ten bare TCP connects (a port scanner, a health check) once held every association slot for a minute."""
    svc = Service(tmp_path, protocols, dicom={"host": "127.0.0.1", "port": free_port(), "ae_title": "SITEBENCH",
                                              "max_associations": 8, "acse_timeout": 2.0, "network_timeout": 2.0})
    svc.dicom_port = yaml.safe_load(svc.config.read_text())["dicom"]["port"]
    svc.start()
    try:
        idle = [socket.create_connection(("127.0.0.1", svc.dicom_port), timeout=30) for _ in range(10)]
        opened = time.monotonic()
        dropped = []
        for sock in idle:
            assert sock.recv(1) == b""  # the gate closes it: no association request came
            dropped.append(time.monotonic() - opened)
            sock.close()
        assert max(dropped) < 10, dropped
        svc.storescu(*sorted(T1.iterdir())[:3])  # the slots are free again
        deadline = time.monotonic() + 20
        while svc.records.file_count() < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert svc.records.file_count() == 3
    finally:
        log = svc.stop()
    assert "Traceback" not in log
