"""Access control on every way in: roles scoped to their site, per-user tokens stored hashed, the
first admin made on first start, refusals audited. A real `sitebench qc serve` (STOW-RS) with real
uploads of the shared GE T1 slices; users in real SQLite and PostgreSQL databases."""

from __future__ import annotations

import json
import stat
import sys

import pytest
import requests
from test_qc_stow import T1, Service, multipart, sha256

from sitebench.errors import SitebenchError
from sitebench.qc.access import (
    ACTIONS,
    ROLES,
    Principal,
    UserStore,
    allowed,
    valid_site_name,
)
from sitebench.qc.records import QCRecords, database_url

pytestmark = pytest.mark.skipif(not T1.exists(), reason="needs ../shared/data/dicom")


def test_each_role_may_do_exactly_its_own_things():
    uploader = Principal("u1", "site_uploader", "S01")
    coordinator = Principal("c1", "site_coordinator", "S01")
    monitor = Principal("m", "central_monitor")
    reader = Principal("r", "reader")
    admin = Principal("a", "admin")
    expected = {  # (principal, action, site): allowed
        (uploader, "upload", "S01"): True, (uploader, "upload", "S02"): False, (uploader, "view_site", "S01"): True,
        (uploader, "view_site", "S02"): False, (uploader, "answer_query", "S01"): False,
        (uploader, "view_reports", None): False,
        (coordinator, "upload", "S01"): False, (coordinator, "answer_query", "S01"): True,
        (coordinator, "answer_query", "S02"): False, (coordinator, "manage_query", "S01"): False,
        (coordinator, "view_site", None): False,  # the trial overview is not a site's page
        (monitor, "upload", "S01"): False, (monitor, "view_site", "S02"): True, (monitor, "manage_query", "S02"): True,
        (monitor, "answer_query", "S01"): False, (monitor, "view_reports", None): True,
        (monitor, "manage_users", None): False,
        (reader, "view_site", "S01"): False, (reader, "view_reports", None): True, (reader, "upload", "S01"): False,
        (admin, "manage_users", None): True, (admin, "upload", "S02"): True,
    }
    for (who, action, site), ok in expected.items():
        assert allowed(who, action, site) is ok, (who, action, site)
    assert not any(allowed(None, a, "S01") for a in ACTIONS)
    assert not allowed(admin, "delete_everything", "S01")
    assert set(ROLES) == {"site_uploader", "site_coordinator", "central_monitor", "reader", "admin"}


def test_site_names_never_leave_their_folder():
    for bad in ("..", "../S02", "S01/../S02", "S01/x", "", ".hidden", "S01..", "a" * 65, "S 01", "S01\x00"):
        assert not valid_site_name(bad), bad
    for good in ("S01", "site-3", "BOS_MGH.2", "a" * 64):
        assert valid_site_name(good), good


@pytest.fixture(params=["sqlite", "postgresql"])
def users(request, tmp_path):
    url = database_url(tmp_path) if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    records = QCRecords(url)
    store = UserStore(records)
    if request.param == "postgresql":  # one server for the session: start from no users
        with records.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM users")
    return store


def test_tokens_are_stored_hashed_rotated_and_disabled(users):
    token = users.create("coord-s01", "site_coordinator", "S01", sites=["S01", "S02"])
    assert token.startswith("sbk_") and len(token) > 40
    assert users.authenticate(token) == Principal("coord-s01", "site_coordinator", "S01")
    with users._engine.connect() as conn:
        stored = [tuple(r) for r in conn.exec_driver_sql("SELECT * FROM users").fetchall()]
    assert token not in json.dumps(stored, default=str) and sha256(token.encode()) in json.dumps(stored)
    assert users.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert users.authenticate("") is None and users.authenticate(None) is None
    fingerprint = users.session_fingerprint("coord-s01")
    new = users.rotate("coord-s01")
    assert users.authenticate(token) is None and users.authenticate(new).name == "coord-s01"
    assert users.session_fingerprint("coord-s01") != fingerprint  # old sessions end
    users.disable("coord-s01")
    assert users.authenticate(new) is None and users.session_fingerprint("coord-s01") is None
    for args, message in ((("x", "site_uploader", None), "belongs to one site"),
                          (("x", "central_monitor", "S01"), "whole trial"),
                          (("x", "superuser", None), "role 'superuser'"),
                          (("../x", "reader", None), "user name"),
                          (("x", "site_uploader", "S09"), "not in the intake configuration"),
                          (("coord-s01", "reader", None), "already exists")):
        with pytest.raises(SitebenchError, match=message):
            users.create(*args, sites=["S01", "S02"])


def _cli_user(config, *args) -> dict:
    import subprocess

    done = subprocess.run([sys.executable, "-m", "sitebench.cli", "qc", "users", *args, "--config", str(config),
                           "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def gate(tmp_path_factory, protocols):
    svc = Service(tmp_path_factory.mktemp("access"), protocols, http={"max_requests_per_minute": 100000})
    tokens = {name: _cli_user(svc.config, "add", name, "--role", role, *(["--site", site] if site else []))["token"]
              for name, role, site in (("up-s01", "site_uploader", "S01"), ("coord-s01", "site_coordinator", "S01"),
                                       ("monitor", "central_monitor", None), ("stats", "reader", None))}
    svc.start()
    yield svc, tokens
    if svc.proc.poll() is None:
        svc.stop()


@pytest.fixture(scope="module")
def protocols(t1_protocols):
    return t1_protocols


def test_user_tokens_upload_only_for_their_own_site(gate):
    svc, tokens = gate
    files = sorted(T1.iterdir())
    body = multipart([files[20].read_bytes()])
    assert svc.post("S01", body, token=tokens["up-s01"]).status_code == 200
    assert sha256(files[20].read_bytes()) in svc.known()
    other = multipart([files[21].read_bytes()])
    for name, site in (("up-s01", "S02"), ("coord-s01", "S01"), ("monitor", "S01"), ("stats", "S01")):
        reply = svc.post(site, other, token=tokens[name])
        assert reply.status_code == 403, (name, site, reply.text)
    assert sha256(files[21].read_bytes()) not in svc.known()
    audit = svc.audit()
    refused = [(r["details"]["user"], r["subject"]) for r in audit if r["what"] == "access refused"]
    assert ("up-s01", "upload to S02") in refused and ("monitor", "upload to S01") in refused
    assert any(r["what"] == "transfer received" and "as up-s01" in r["details"]["sender"] for r in audit)
    assert not any(t in json.dumps(audit) for t in tokens.values())


def test_status_is_scoped_to_what_the_user_may_see(gate):
    svc, tokens = gate
    assert [r["site"] for r in svc.status(token=tokens["coord-s01"]).json()] == ["S01"]
    assert {r["site"] for r in svc.status(token=tokens["monitor"]).json()} >= {"S01"}
    assert svc.status(token=tokens["stats"]).json() == []  # reports only


def test_first_start_makes_one_admin_whose_token_file_only_the_owner_reads(tmp_path, protocols, gate):
    svc, _ = gate
    assert not (svc.store / "first-admin-token").exists()  # users were made before its first start
    fresh = Service(tmp_path, protocols).start()
    try:
        token_file = fresh.store / "first-admin-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        admin = token_file.read_text().strip()
        assert {r["site"] for r in fresh.status(token=admin).json()} == {"S01", "S02"}
        made = [r for r in fresh.audit() if r["what"] == "user add" and r["subject"] == "user admin"]
        assert len(made) == 1 and admin not in json.dumps(made)
    finally:
        fresh.stop()
    fresh.start()  # a second start makes no second admin
    try:
        assert [r for r in fresh.audit() if r["what"] == "user add"] == made
    finally:
        fresh.stop()


def test_disabled_and_rotated_tokens_stop_working(gate):
    svc, tokens = gate
    token = _cli_user(svc.config, "add", "temp-s02", "--role", "site_uploader", "--site", "S02")["token"]
    assert svc.status(token=token).status_code == 200
    rotated = _cli_user(svc.config, "rotate", "temp-s02")["token"]
    assert svc.status(token=token).status_code == 401 and svc.status(token=rotated).status_code == 200
    _cli_user(svc.config, "disable", "temp-s02")
    assert svc.status(token=rotated).status_code == 401
    assert requests.get(f"{svc.url}/status", timeout=10).status_code == 401
