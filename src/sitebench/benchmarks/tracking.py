"""Record a benchmark in MLflow: one parent run, nested runs per model version and per stratum.

MLflow metrics cannot carry a stratum, so each stratum level is its own nested run
tagged ``sitebench.stratum`` / ``sitebench.stratum_value``. The default store is
SQLite plus a local artifact folder under the output directory: no server needed,
and any server URI works in its place.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from sitebench.benchmarks.runner import BenchmarkRun
from sitebench.models.registry import register_model_version, write_classical_spec
from sitebench.provenance import code_version, package_versions

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@dataclass
class TrackingStore:
    tracking_uri: str
    artifact_root: str | None


def local_store(out_dir: str | Path, tracking_uri: str | None = None) -> TrackingStore:
    """SQLite tracking/registry store and local artifacts under ``out_dir`` (unless a URI is given)."""
    if tracking_uri:
        return TrackingStore(tracking_uri, None)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return TrackingStore(f"sqlite:///{out / 'mlflow.db'}", (out / "mlartifacts").as_uri())


def _quiet_mlflow() -> None:
    """MLflow sets its own log level at import; keep its INFO chatter out of our output."""
    import logging

    import mlflow  # noqa: F401  (import first: it configures its loggers)

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _experiment_id(name: str, store: TrackingStore) -> str:
    import mlflow

    existing = mlflow.get_experiment_by_name(name)
    if existing:
        return existing.experiment_id
    return mlflow.create_experiment(name, artifact_location=(f"{store.artifact_root}/{name}"
                                                             if store.artifact_root else None))


def _metric_dict(rows: pd.DataFrame) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for row in rows.itertuples(index=False):
        if not row.estimable or row.estimate is None or pd.isna(row.estimate):
            continue
        metrics[row.metric] = float(row.estimate)
        if row.ci_low is not None and not pd.isna(row.ci_low):
            metrics[f"{row.metric}_ci_low"] = float(row.ci_low)
            metrics[f"{row.metric}_ci_high"] = float(row.ci_high)
    return metrics


def register_benchmark_models(run: BenchmarkRun, store: TrackingStore) -> dict[str, str]:
    """Register every model version the spec asks to register; returns model_key -> version."""
    import mlflow

    from sitebench.models.registry import load_model

    _quiet_mlflow()
    mlflow.set_tracking_uri(store.tracking_uri)
    mlflow.set_registry_uri(store.tracking_uri)
    registered: dict[str, str] = {}
    for model_spec, resolved, card in zip(run.spec.models, run.resolved, run.models):
        if not model_spec.register_as:
            continue
        model = load_model(resolved)
        with tempfile.TemporaryDirectory() as tmp:
            files = resolved.location or str(write_classical_spec(tmp, model))  # type: ignore[arg-type]
            registered[card.key] = register_model_version(model, files, model_spec.register_as, model_spec.alias,
                                                          store.tracking_uri)
    return registered


def log_benchmark(run: BenchmarkRun, metrics: pd.DataFrame, store: TrackingStore, *,
                  spec_path: str | Path | None = None, extra_artifacts: dict[str, Path] | None = None,
                  registered: dict[str, str] | None = None) -> str:
    """Log the benchmark; ``metrics`` is the tidy per-stratum table with a ``model_key`` column."""
    import mlflow
    import mlflow.data

    _quiet_mlflow()
    mlflow.set_tracking_uri(store.tracking_uri)
    mlflow.set_registry_uri(store.tracking_uri)
    spec = run.spec
    experiment_id = _experiment_id(spec.mlflow.experiment, store)
    versions = code_version()
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"benchmark {spec.name}") as parent:
        mlflow.set_tags({"sitebench.level": "benchmark", "sitebench.spec_sha256": spec.fingerprint(),
                         "sitebench.git_commit": str(versions["git_commit"]),
                         "sitebench.git_dirty": str(versions["git_dirty"])})
        mlflow.log_params({"manifest": str(spec.manifest_path), "reference": spec.reference,
                           "output": spec.output, "strata": ",".join(spec.strata), "seed": spec.seed,
                           "bootstrap": spec.bootstrap, "n_scans": len(run.manifest),
                           "models": ",".join(c.key for c in run.models)})
        mlflow.log_dict(package_versions(), "environment/packages.json")
        dataset = mlflow.data.from_pandas(run.manifest.table, source=str(run.manifest.source),
                                          name=f"{spec.name}-manifest", targets=spec.reference)
        mlflow.log_input(dataset, context="evaluation")
        if spec_path:
            mlflow.log_artifact(str(spec_path), artifact_path="spec")
        mlflow.log_artifact(str(run.predictions_path), artifact_path="predictions")
        for name, path in (extra_artifacts or {}).items():
            # a folder (the locked report) keeps its own name under ``name``: report/v001/lock.json ...,
            # logged file by file so every artifact store takes it, and verifiable once downloaded
            if Path(path).is_dir():
                mlflow.log_artifacts(str(path), artifact_path=f"{name}/{Path(path).name}")
            else:
                mlflow.log_artifact(str(path), artifact_path=name)
        for card in run.models:
            model_rows = metrics[metrics["model_key"] == card.key]
            with mlflow.start_run(experiment_id=experiment_id, run_name=f"model {card.key}", nested=True):
                mlflow.set_tags({"sitebench.level": "model", "sitebench.model": card.name,
                                 "sitebench.model_version": card.version,
                                 "sitebench.weights_sha256": card.weights_sha256,
                                 "sitebench.registered_version": (registered or {}).get(card.key, "")})
                overall = model_rows[model_rows["stratum"] == "overall"]
                mlflow.log_metrics(_metric_dict(overall))
                for (stratum, level), rows in model_rows[model_rows["stratum"] != "overall"].groupby(
                        ["stratum", "level"], sort=True):
                    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{stratum}={level}",
                                          nested=True):
                        mlflow.set_tags({"sitebench.level": "stratum", "sitebench.stratum": stratum,
                                         "sitebench.stratum_value": str(level), "sitebench.model": card.key,
                                         "sitebench.n_scans": str(int(rows["n_scans"].iloc[0]))})
                        mlflow.log_metrics(_metric_dict(rows))
        return parent.info.run_id
