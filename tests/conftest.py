"""Shared fixtures: real simulated trials on disk, real MLflow stores in temp folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def small_trial(tmp_path_factory):
    """Six sites, four scans each: every vendor, the upgrade site (S01) and the coverage site (S05)."""
    from sitebench.datasets.simulator import TrialConfig, simulate_trial

    out = tmp_path_factory.mktemp("small_trial")
    return simulate_trial(TrialConfig(n_sites=6, scans_per_site=4, seed=7, workers=2), out)
