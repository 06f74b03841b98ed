"""Keyed pseudonyms: a new store keys series by HMAC-SHA256 with the trial's secret; a store made
before keeps its unkeyed SHA-256 keys. Real `sitebench qc serve`, real uploads of the GE T1 slices."""

from __future__ import annotations

import hashlib
import hmac
import stat

import pydicom
import pytest
from test_qc_stow import T1, Service, multipart

from sitebench.qc.gate import Pseudonyms, uid_key

pytestmark = pytest.mark.skipif(not T1.exists(), reason="needs ../shared/data/dicom")


@pytest.fixture(scope="module")
def protocols(t1_protocols):
    return t1_protocols


def _keys(svc: Service) -> set[str]:
    with svc.records.engine.connect() as conn:
        return {r[0] for r in conn.exec_driver_sql("SELECT series_key FROM received_files").fetchall() if r[0]}


def _wait_indexed(svc: Service, n: int) -> set[str]:
    import time

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(_keys(svc)) < n:
        time.sleep(0.1)
    return _keys(svc)


def test_a_new_store_keys_series_with_the_trials_secret(tmp_path, protocols):
    slice_ = sorted(T1.iterdir())[30]
    uid = str(pydicom.dcmread(slice_, stop_before_pixels=True).SeriesInstanceUID)
    svc = Service(tmp_path, protocols).start()
    try:
        assert svc.post("S01", multipart([slice_.read_bytes()])).status_code == 200
        keys = _wait_indexed(svc, 1)
    finally:
        svc.stop()
    key_file = svc.store / "pseudonym.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    secret = bytes.fromhex(key_file.read_text().strip())
    assert len(secret) == 32
    expected = hmac.new(secret, hashlib.sha256(uid.encode()).hexdigest()[:20].encode(), hashlib.sha256).hexdigest()[:20]
    assert keys == {expected} and uid_key(uid) not in keys  # who holds the UID alone cannot confirm it
    assert Pseudonyms(secret)(uid) == expected and Pseudonyms(secret).rekey(uid_key(uid)) == expected
    assert Pseudonyms(secret)(uid) != Pseudonyms(b"another trial's key 0123456789")(uid)


def test_a_store_made_before_keeps_its_keys_and_a_lost_key_is_one_line(tmp_path, protocols):
    files = sorted(T1.iterdir())[40:42]
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    svc = Service(tmp_path, protocols).start()
    try:
        assert svc.post("S01", multipart([files[0].read_bytes()])).status_code == 200
        _wait_indexed(svc, 1)
    finally:
        svc.stop()
    # what a store made before keyed pseudonyms looks like: records, no scheme, no key
    with svc.records.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM gate_state WHERE name = 'pseudonyms'")
        conn.exec_driver_sql("UPDATE received_files SET series_key = ?", (uid_key(uid),))
    (svc.store / "pseudonym.key").unlink()
    svc.start()
    try:
        assert svc.post("S01", multipart([files[1].read_bytes()])).status_code == 200
        _wait_indexed(svc, 1)
        import time

        time.sleep(1.0)
        assert _keys(svc) == {uid_key(uid)}  # the same series, the same (unkeyed) key: nothing split
    finally:
        svc.stop()
    assert svc.records.load_state("pseudonyms")["scheme"] == "sha256"
    assert not (svc.store / "pseudonym.key").exists()

    # a keyed store whose key is gone cannot key new series: one line, no traceback
    from conftest import run_cli

    (tmp_path / "keyed").mkdir()
    fresh = Service(tmp_path / "keyed", protocols).start()
    try:
        assert fresh.post("S01", multipart([files[0].read_bytes()])).status_code == 200
        _wait_indexed(fresh, 1)
    finally:
        fresh.stop()
    (fresh.store / "pseudonym.key").unlink()
    result = run_cli("qc", "serve", "--config", fresh.config)
    assert result.returncode == 2 and "pseudonym key is missing" in result.stderr and "Traceback" not in result.stderr
