"""Ed25519 sign-offs on a locked report folder, through the command line an auditor uses."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from sitebench.reports.lock import write_lock
from conftest import run_cli

pytestmark = pytest.mark.slow  # end to end through the CLI: keygen, sign, verify


@pytest.fixture
def report(tmp_path) -> Path:
    """A real locked report folder: an HTML page and a results table, resting on a weights file."""
    folder = tmp_path / "reports" / "demo" / "v001"
    (folder / "tables").mkdir(parents=True)
    (folder / "report.html").write_text("<html><h1>Validation report</h1></html>")
    (folder / "tables" / "metrics.csv").write_text("site,mae\nS01,12.5\n")
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"\x00weights")
    write_lock(folder, {"report.html": folder / "report.html", "metrics": folder / "tables" / "metrics.csv"},
               {"weights": weights}, {"name": "demo", "version": 1}, {"seed": 0})
    return folder


def test_keygen_sign_and_verify(tmp_path, report):
    keys = tmp_path / "keys"
    made = run_cli("report", "keygen", "--out", keys / "writer")
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE((keys / "writer.key").stat().st_mode) == 0o600
    assert run_cli("report", "keygen", "--out", keys / "writer").returncode == 2  # never overwritten
    run_cli("report", "keygen", "--out", keys / "reviewer")

    for who, key, meaning in (("A. Writer", "writer", "authorship"), ("B. Reviewer", "reviewer", "approval")):
        signed = run_cli("report", "sign", report, "--key", keys / f"{key}.key", "--name", who, "--meaning", meaning)
        assert signed.returncode == 0, signed.stderr
    ok = run_cli("report", "verify", report, "--public-key", keys / "writer.pub", "--public-key", keys / "reviewer.pub",
                 "--json")
    assert ok.returncode == 0, ok.stdout
    assert json.loads(ok.stdout)["signoffs"] == 2
    signoffs = json.loads((report / "signatures.json").read_text())
    assert [s["meaning"] for s in signoffs] == ["authorship", "approval"] and signoffs[0]["signer"] == "A. Writer"

    # a key that did not sign: the sign-off made with it is named
    run_cli("report", "keygen", "--out", keys / "stranger")
    wrong = run_cli("report", "verify", report, "--public-key", keys / "stranger.pub", "--public-key",
                    keys / "reviewer.pub")
    assert wrong.returncode == 1 and "sign-off 0 (A. Writer, authorship)" in wrong.stdout

    # an edited sign-off (the meaning changed) fails its signature
    signoffs[1]["meaning"] = "review"
    (report / "signatures.json").write_text(json.dumps(signoffs))
    edited = run_cli("report", "verify", report, "--public-key", keys / "writer.pub", "--public-key",
                     keys / "reviewer.pub")
    assert edited.returncode == 1 and "sign-off 1 (B. Reviewer, review): signature does not match" in edited.stdout


def test_changed_results_break_hash_and_signature(tmp_path, report):
    keys = tmp_path / "keys"
    run_cli("report", "keygen", "--out", keys / "writer")
    run_cli("report", "sign", report, "--key", keys / "writer.key", "--name", "A. Writer", "--meaning", "approval")
    (report / "tables" / "metrics.csv").write_text("site,mae\nS01,2.5\n")
    changed = run_cli("report", "verify", report, "--public-key", keys / "writer.pub")
    assert changed.returncode == 1 and "metrics (tables/metrics.csv) changed" in changed.stdout
    # a report that fails verification cannot be signed
    refused = run_cli("report", "sign", report, "--key", keys / "writer.key", "--name", "A. Writer",
                      "--meaning", "review")
    assert refused.returncode == 2 and "refusing to sign" in refused.stderr and "Traceback" not in refused.stderr


def test_passphrase_protected_key_and_bad_meaning(tmp_path, report):
    env = {"SITEBENCH_KEY_PASSPHRASE": "correct horse"}
    assert run_cli("report", "keygen", "--out", tmp_path / "k", env=env).returncode == 0
    no_pass = run_cli("report", "sign", report, "--key", tmp_path / "k.key", "--name", "A", "--meaning", "approval")
    assert no_pass.returncode == 2 and "cannot read the private key" in no_pass.stderr
    assert run_cli("report", "sign", report, "--key", tmp_path / "k.key", "--name", "A", "--meaning", "approval",
                   env=env).returncode == 0
    unsigned_meaning = run_cli("report", "sign", report, "--key", tmp_path / "k.key", "--name", "A",
                               "--meaning", "liking", env=env)
    assert unsigned_meaning.returncode == 2
