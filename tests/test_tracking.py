"""MLflow: the default local SQLite store needs no server; a real tracking server URI works too."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

from sitebench.pipeline import run_pipeline

pytestmark = pytest.mark.slow  # MLflow runs against a store and a tracking server


def _spec(trial_dir: Path, tmp_path: Path) -> Path:
    spec = {"name": "tracked", "manifest": str(trial_dir / "manifest.csv"), "reference": "gm_volume_ml",
            "reference_segmentation": "label_path", "bootstrap": 50, "results_dir": str(tmp_path / "results"),
            "models": [{"source": "classical", "register_as": "gm-tissue-gmm", "alias": "candidate"}],
            "mlflow": {"experiment": "tracked"}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    process = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_default_store_is_sqlite_under_the_output_folder(small_trial, tmp_path):
    result = run_pipeline(_spec(small_trial.out_dir, tmp_path), workers=1, progress=False, report=False)
    assert result.store.tracking_uri == f"sqlite:///{(tmp_path / 'results' / 'mlflow.db').resolve()}"
    assert (tmp_path / "results" / "mlartifacts").is_dir()
    assert not Path("mlflow.db").exists() or Path("mlflow.db").stat().st_mtime < time.time() - 600
    mlflow.set_tracking_uri(result.store.tracking_uri)
    run = mlflow.get_run(result.mlflow_run_id)
    assert run.data.params["n_scans"] == "24"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"spec", "predictions", "environment"} <= artifacts


def test_a_benchmark_that_stops_before_logging_leaves_its_run_failed_not_running(small_trial, tmp_path):
    from sitebench.errors import SitebenchError

    spec_path = _spec(small_trial.out_dir, tmp_path)
    spec = yaml.safe_load(spec_path.read_text())
    spec["report"] = {"failed_manifest": str(tmp_path / "no-such-manifest.csv")}  # the report step stops
    spec["models"][0].pop("register_as")
    spec_path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SitebenchError, match="failed_manifest"):
        run_pipeline(spec_path, workers=1, progress=False)
    mlflow.set_tracking_uri(f"sqlite:///{(tmp_path / 'results' / 'mlflow.db').resolve()}")
    runs = mlflow.search_runs(experiment_names=["tracked"])
    assert list(runs["status"]) == ["FAILED"] and list(runs["tags.mlflow.runName"]) == ["benchmark tracked"]


def test_a_tracking_server_uri_works(small_trial, tmp_path, mlflow_server):
    result = run_pipeline(_spec(small_trial.out_dir, tmp_path), workers=1, progress=False, report=False,
                          tracking_uri=mlflow_server)
    assert result.store.tracking_uri == mlflow_server
    mlflow.set_tracking_uri(mlflow_server)
    runs = mlflow.search_runs(experiment_names=["tracked"])
    assert set(runs["tags.sitebench.level"]) == {"benchmark", "model", "stratum"}
    client = mlflow.MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    version = client.get_model_version_by_alias("gm-tissue-gmm", "candidate")
    assert version.tags["weights_sha256"] == result.run.models[0].weights_sha256
    assert not (tmp_path / "results" / "mlflow.db").exists()  # nothing went to the local default
