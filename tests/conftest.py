"""Shared fixtures: real simulated trials on disk, real MLflow stores in temp folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


#: Fixtures that bring an outside dependency; a test using one (directly or through another
#: fixture) gets the marker, so `-m "not r_reference"` etc. select without a list to keep up to date.
MARK_BY_FIXTURE = {"rscript": "r_reference", "postgres_url": "postgres"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marker in MARK_BY_FIXTURE.items():
            if fixture in item.fixturenames:
                item.add_marker(marker)


def run_cli(*args, cwd: str | Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess:
    """The ``sitebench`` command as a user runs it: a fresh process, text output, exit code kept.

    ``env`` adds to (never replaces) the environment; MLflow telemetry stays off. The test
    process's ``MLFLOW_TRACKING_URI`` is not passed on (``mlflow.set_tracking_uri`` in an earlier
    test sets it, and the command would log into that test's store); give it in ``env`` to test it.
    """
    inherited = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "sitebench.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout,
                          env={**inherited, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})})


@pytest.fixture(scope="session")
def small_trial(tmp_path_factory):
    """Six sites, four scans each: every vendor, the upgrade site (S01) and the coverage site (S05)."""
    from sitebench.datasets.simulator import TrialConfig, simulate_trial

    out = tmp_path_factory.mktemp("small_trial")
    # the scripted story (drift, swap, re-scans, unmatched series) stays out: tests that use this trial read
    # scan counts and values off it; tests/test_simulator.py and the gate tests run the story themselves
    return simulate_trial(TrialConfig(n_sites=6, scans_per_site=4, seed=7, workers=2,
                                      coverage={"site": "S05", "missing_superior_mm": 20.0, "fraction": 1.0,
                                                "rescan_fraction": 0.0},
                                      protocol_drift=None, unmatched=None, scanner_swap=None), out)


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    """A real PostgreSQL server of our own (initdb + pg_ctl in a temp folder), stopped at the end."""
    import glob
    import shutil
    import socket
    import subprocess
    import tempfile

    initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not initdb:
        pytest.skip("needs the PostgreSQL server binaries (apt-get install postgresql)")
    bindir = Path(initdb[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="sitebench-pg-", dir="/tmp"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    subprocess.run(as_user + [str(bindir / "initdb"), "-D", str(data), "-U", "sitebench", "--auth=trust"],
                   check=True, capture_output=True)
    subprocess.run(as_user + [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                              f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    yield f"postgresql+psycopg://sitebench@127.0.0.1:{port}/postgres"
    subprocess.run(as_user + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def require_rscript(package: str) -> str:
    """Rscript with an R package, or a test failure saying how to get it (skip only with SITEBENCH_SKIP_R=1).

    R is the independent reference for the statistics; a missing R must not pass silently.
    """
    import shutil
    import subprocess

    if os.environ.get("SITEBENCH_SKIP_R") == "1":
        pytest.skip(f"SITEBENCH_SKIP_R=1: {package} reference comparisons skipped")
    exe = shutil.which("Rscript")
    debian = f"r-cran-{package.lower()}"
    if exe is None:
        pytest.fail(f"Rscript not found: the {package} reference tests need R (apt-get install r-base-core "
                    f"{debian}), or set SITEBENCH_SKIP_R=1 to skip them", pytrace=False)
    probe = subprocess.run([exe, "-e", f"suppressPackageStartupMessages(library({package}))"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail(f"R package {package} is not installed (apt-get install {debian}), or set "
                    f"SITEBENCH_SKIP_R=1 to skip: {probe.stderr.strip()[-300:]}", pytrace=False)
    return exe


@pytest.fixture(scope="session")
def t1_protocols(tmp_path_factory) -> Path:
    """A folder with one locked protocol, drafted from the real GE 3D T1 and locked by a named person."""
    from sitebench.qc.dicom_params import read_series
    from sitebench.qc.protocol import draft_protocol, lock_protocol

    t1 = SHARED_DATA / "dicom" / "dcm_qa_deident" / "In"
    if not t1.exists():
        pytest.skip("needs ../shared/data/dicom")
    root = tmp_path_factory.mktemp("protocols")
    (series,) = read_series(t1)
    draft = draft_protocol(series.parameters, "ge-t1w").save(root / "draft.yaml")
    lock_protocol(draft, who="A. Physicist", why="site qualification", lock_dir=root / "locked")
    return root / "locked"
