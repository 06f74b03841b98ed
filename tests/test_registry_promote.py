"""Model-version registry on a real SQLite MLflow store: register, list, promote; @validated needs a
verified report with a valid approval sign-off that rests on the version's own weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sitebench.models.registry import BUILTIN_DIR
from sitebench.reports.lock import write_lock
from sitebench.reports.signing import generate_key, sign_report
from conftest import run_cli as _run_cli


def run_cli(cwd: Path, *args):
    return _run_cli(*args, cwd=cwd, timeout=300)


def locked_report(folder: Path, weights: Path) -> Path:
    (folder / "tables").mkdir(parents=True)
    (folder / "report.html").write_text("<html><h1>gm-unet validation</h1></html>")
    (folder / "tables" / "metrics.csv").write_text("site,mae\nS01,27.8\n")
    write_lock(folder, {"report.html": folder / "report.html", "metrics": folder / "tables" / "metrics.csv"},
               {"weights gm-unet": weights}, {"name": "gm-unet", "version": 1}, {"seed": 0})
    return folder


@pytest.mark.slow
def test_promotion_to_validated_needs_an_approved_report_on_these_weights(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registered = run_cli(tmp_path, "models", "register", "builtin:gm_unet_v1", "--name", "gm-unet", "--alias",
                         "candidate", "--tracking-uri", uri)
    assert registered.returncode == 0, registered.stderr
    key, pub = generate_key(tmp_path / "keys" / "qa")
    v1_weights = BUILTIN_DIR / "gm_unet_v1" / "models" / "model.pt"

    bare = run_cli(tmp_path, "models", "promote", "gm-unet", "1", "--alias", "validated", "--tracking-uri", uri)
    assert bare.returncode == 2 and "needs --report" in bare.stderr and "Traceback" not in bare.stderr

    report = locked_report(tmp_path / "reports" / "v001", v1_weights)
    sign_report(report, key, "R. Reviewer", "review")
    reviewed = run_cli(tmp_path, "models", "promote", "gm-unet", "1", "--alias", "validated", "--report", report,
                       "--public-key", pub, "--tracking-uri", uri)
    assert reviewed.returncode == 2 and "no approval sign-off" in reviewed.stderr

    other = locked_report(tmp_path / "reports" / "other", BUILTIN_DIR / "gm_unet_v2" / "models" / "model.pt")
    sign_report(other, key, "A. Approver", "approval")
    wrong = run_cli(tmp_path, "models", "promote", "gm-unet", "1", "--alias", "validated", "--report", other,
                    "--public-key", pub, "--tracking-uri", uri)
    assert wrong.returncode == 2 and "does not rest on gm-unet/1's weights" in wrong.stderr

    sign_report(report, key, "A. Approver", "approval")
    stranger_key, stranger_pub = generate_key(tmp_path / "keys" / "stranger")
    unknown = run_cli(tmp_path, "models", "promote", "gm-unet", "1", "--alias", "validated", "--report", report,
                      "--public-key", stranger_pub, "--tracking-uri", uri)
    assert unknown.returncode == 2 and "does not verify" in unknown.stderr

    promoted = run_cli(tmp_path, "models", "promote", "gm-unet", "1", "--alias", "validated", "--report", report,
                       "--public-key", pub, "--tracking-uri", uri)
    assert promoted.returncode == 0, promoted.stderr
    (row,) = json.loads(run_cli(tmp_path, "models", "versions", "--tracking-uri", uri, "--json").stdout)
    assert row["aliases"] == ["candidate", "validated"] and row["report_lock_sha256"]

    # after sign-off, a changed results table blocks any further promotion with that report
    (report / "tables" / "metrics.csv").write_text("site,mae\nS01,2.8\n")
    tampered = run_cli(tmp_path, "models", "promote", "gm-unet", "1", "--alias", "validated", "--report", report,
                       "--public-key", pub, "--tracking-uri", uri)
    assert tampered.returncode == 2 and "metrics (tables/metrics.csv) changed" in tampered.stderr


def test_promoting_a_missing_version_is_one_line(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli(tmp_path, "models", "promote", "nothing", "7", "--alias", "candidate", "--tracking-uri", uri)
    assert result.returncode == 2 and "no registered version nothing/7" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_report_away_from_its_weights_promotes_with_materials(tmp_path):
    """A report copied away from the weights it rests on is refused until --materials points at a copy of them."""
    import shutil

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registered = run_cli(tmp_path, "models", "register", "builtin:gm_unet_v1", "--name", "gm-unet",
                         "--tracking-uri", uri)
    assert registered.returncode == 0, registered.stderr
    key, pub = generate_key(tmp_path / "keys" / "qa")
    weights = tmp_path / "site" / "gm_unet_v1" / "models" / "model.pt"
    weights.parent.mkdir(parents=True)
    shutil.copyfile(BUILTIN_DIR / "gm_unet_v1" / "models" / "model.pt", weights)
    report = locked_report(tmp_path / "site" / "reports" / "v001", weights)
    sign_report(report, key, "A. Approver", "approval")
    away = tmp_path / "inbox" / "v001"
    shutil.copytree(report, away)
    shutil.move(tmp_path / "site", tmp_path / "archive")  # the weights are no longer where the lock says

    refused = run_cli(tmp_path, "models", "promote", "gm-unet", "1", "--alias", "validated", "--report", away,
                      "--public-key", pub, "--tracking-uri", uri)
    assert refused.returncode == 2 and "not available here" in refused.stderr and "--materials" in refused.stderr
    promoted = run_cli(tmp_path, "models", "promote", "gm-unet", "1", "--alias", "validated", "--report", away,
                       "--public-key", pub, "--materials", tmp_path / "archive", "--tracking-uri", uri)
    assert promoted.returncode == 0, promoted.stderr
