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

from typing import Any

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


#: MLflow's limit on a tag value; longer card fields are cut with a note.
_TAG_LIMIT = 5000


def card_tags(card: Any) -> dict[str, str]:
    """The model card as MLflow version tags: who made it, under which licence, for what, from which files."""
    import json

    data = card.to_dict()
    tags = {"sitebench.card.name": data["name"], "sitebench.card.version": data["version"],
            "sitebench.card.kind": data["kind"], "sitebench.card.source": str(data["source"]),
            "sitebench.card.licence": data["licence"] or "not stated",
            "sitebench.card.citation": data["citation"] or "not stated",
            "sitebench.card.biomarkers": ",".join(data["biomarkers"]) or "not stated",
            "sitebench.card.training_data": data["training_data"] or "not stated",
            "sitebench.card.files_sha256": data["files_sha256"],
            "sitebench.card.files": json.dumps(data["files"], sort_keys=True)}
    return {k: (v if len(v) <= _TAG_LIMIT else v[:_TAG_LIMIT - 12] + " …(cut)") for k, v in tags.items()}


def register_benchmark_models(run: BenchmarkRun, store: TrackingStore) -> dict[str, str]:
    """Register every model version the spec asks to register; returns model_key -> version.

    The version carries the model card as tags (:func:`card_tags`). A source that is not a
    folder of files (an entry point, a TorchScript file) is registered with its card only.
    """
    import mlflow

    from sitebench.models.registry import load_model, registry_client

    _quiet_mlflow()
    mlflow.set_tracking_uri(store.tracking_uri)
    mlflow.set_registry_uri(store.tracking_uri)
    registered: dict[str, str] = {}
    for model_spec, resolved, card in zip(run.spec.models, run.resolved, run.models):
        if not model_spec.register_as:
            continue
        model = load_model(resolved)
        with tempfile.TemporaryDirectory() as tmp:
            if resolved.location and Path(resolved.location).is_dir():
                files = resolved.location
            elif resolved.kind == "classical":
                files = str(write_classical_spec(tmp, model))
            else:
                import json

                (Path(tmp) / "model_card.json").write_text(json.dumps(card.to_dict(), indent=2, sort_keys=True))
                if resolved.location and Path(resolved.location).is_file():
                    import shutil

                    shutil.copy2(resolved.location, Path(tmp) / Path(resolved.location).name)
                files = tmp
            version = register_model_version(model, files, model_spec.register_as, model_spec.alias,
                                             store.tracking_uri)
        client = registry_client(store.tracking_uri)
        for key, value in card_tags(card).items():
            client.set_model_version_tag(model_spec.register_as, version, key, value)
        registered[card.key] = version
    return registered


def _classification_dict(rows: pd.DataFrame) -> dict[str, float]:
    """AUC, sensitivity, specificity ... of one stratum level, with their CIs (estimable rows only)."""
    metrics: dict[str, float] = {}
    for row in rows.itertuples(index=False):
        if getattr(row, "status", "ok") != "ok" or row.estimate is None or pd.isna(row.estimate):
            continue
        metrics[str(row.metric)] = float(row.estimate)
        if row.ci_low is not None and not pd.isna(row.ci_low):
            metrics[f"{row.metric}_ci_low"] = float(row.ci_low)
            metrics[f"{row.metric}_ci_high"] = float(row.ci_high)
    return metrics


def _overlap_dict(rows: pd.DataFrame) -> dict[str, float]:
    """Mean Dice, median HD95 and mean volume error per label."""
    metrics: dict[str, float] = {}
    for row in rows.itertuples(index=False):
        label = str(row.label_name or row.label).replace("+", "_").replace(" ", "_")
        for name in ("dice_mean", "hd95_median_mm", "volume_error_mean_ml"):
            value = getattr(row, name, None)
            if value is not None and not pd.isna(value):
                metrics[f"{label}.{name}"] = float(value)
    return metrics


def _stratified(frame: pd.DataFrame | None, key: str) -> pd.DataFrame:
    if frame is None or frame.empty or "model_key" not in frame:
        return pd.DataFrame()
    return frame[frame["model_key"] == key]


def open_benchmark_run(run: BenchmarkRun, store: TrackingStore) -> dict[str, str]:
    """Create the benchmark's parent run before anything is logged, so its id can be locked into the report.

    The report names its run and the run holds the report: the run is created first (status
    RUNNING), the report is written with its id, then :func:`log_benchmark` fills the same run.
    Returns ``tracking_uri``, ``experiment_id`` and ``run_id``.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()
    mlflow.set_tracking_uri(store.tracking_uri)
    experiment_id = _experiment_id(run.spec.mlflow.experiment, store)
    created = MlflowClient(store.tracking_uri).create_run(experiment_id, run_name=f"benchmark {run.spec.name}")
    return {"tracking_uri": store.tracking_uri, "experiment_id": experiment_id, "run_id": created.info.run_id}


def fail_benchmark_run(store: TrackingStore, run_id: str) -> None:
    """Mark a parent run opened by :func:`open_benchmark_run` FAILED when the work after it stops."""
    from mlflow.tracking import MlflowClient

    MlflowClient(store.tracking_uri).set_terminated(run_id, status="FAILED")


def log_benchmark(run: BenchmarkRun, metrics: pd.DataFrame, store: TrackingStore, *,
                  spec_path: str | Path | None = None, extra_artifacts: dict[str, Path] | None = None,
                  registered: dict[str, str] | None = None, classification: pd.DataFrame | None = None,
                  overlap: pd.DataFrame | None = None, run_id: str | None = None) -> str:
    """Log the benchmark: a parent run, a nested run per model version and per stratum level.

    ``run_id`` fills a parent run made by :func:`open_benchmark_run` (the report locked its id);
    without it a new parent run is started.

    ``metrics`` is the tidy per-stratum table of the continuous biomarkers, ``classification``
    and ``overlap`` those of the class-probability biomarkers and of the segmentation labels.
    With one biomarker, metric names are bare (``mae``); with several, each is prefixed with
    its biomarker (``brain_volume_ml.mae``) so they never collide.
    """
    import mlflow
    import mlflow.data

    _quiet_mlflow()
    mlflow.set_tracking_uri(store.tracking_uri)
    mlflow.set_registry_uri(store.tracking_uri)
    spec = run.spec
    experiment_id = _experiment_id(spec.mlflow.experiment, store)
    versions = code_version()
    with (mlflow.start_run(run_id=run_id) if run_id else
          mlflow.start_run(experiment_id=experiment_id, run_name=f"benchmark {spec.name}")) as parent:
        mlflow.set_tags({"sitebench.level": "benchmark", "sitebench.spec_sha256": spec.fingerprint(),
                         "sitebench.git_commit": str(versions["git_commit"]),
                         "sitebench.git_dirty": str(versions["git_dirty"])})
        biomarkers = run.biomarkers
        mlflow.log_params({"manifest": str(spec.manifest_path),
                           "reference": ",".join(spec.reference_columns) or "reference segmentation",
                           "biomarkers": ",".join(f"{m.name} ({m.kind})" for m in biomarkers),
                           "strata": ",".join(spec.strata), "seed": spec.seed,
                           "bootstrap": spec.bootstrap, "n_scans": len(run.manifest),
                           "models": ",".join(c.key for c in run.models)})
        mlflow.log_dict(package_versions(), "environment/packages.json")
        dataset = mlflow.data.from_pandas(run.manifest.table, source=str(run.manifest.source),
                                          name=f"{spec.name}-manifest",
                                          targets=(spec.reference_columns or [None])[0])
        mlflow.log_input(dataset, context="evaluation")
        if spec_path:
            mlflow.log_artifact(str(spec_path), artifact_path="spec")
        mlflow.log_artifact(str(run.predictions_path), artifact_path="predictions")
        if not run.overlap.empty:
            overlap_file = run.predictions_path.with_name("overlap_scores.csv")
            if overlap_file.exists():
                mlflow.log_artifact(str(overlap_file), artifact_path="predictions")
        for name, path in (extra_artifacts or {}).items():
            # a folder (the locked report) keeps its own name under ``name``: report/v001/lock.json ...,
            # logged file by file so every artifact store takes it, and verifiable once downloaded
            if Path(path).is_dir():
                mlflow.log_artifacts(str(path), artifact_path=f"{name}/{Path(path).name}")
            else:
                mlflow.log_artifact(str(path), artifact_path=name)
        several = len(biomarkers) > 1

        def named(prefix: str, values: dict[str, float]) -> dict[str, float]:
            return {f"{prefix}.{k}" if several else k: v for k, v in values.items()} if prefix else values

        for card in run.models:
            with mlflow.start_run(experiment_id=experiment_id, run_name=f"model {card.key}", nested=True):
                mlflow.set_tags({"sitebench.level": "model", "sitebench.model": card.name,
                                 "sitebench.model_version": card.version,
                                 "sitebench.weights_sha256": card.weights_sha256,
                                 "sitebench.files_sha256": card.files_sha256,
                                 "sitebench.licence": card.licence or "not stated",
                                 "sitebench.registered_version": (registered or {}).get(card.key, "")})
                levels: dict[tuple[str, str], dict[str, float]] = {}
                counts: dict[tuple[str, str], int] = {}
                tables = ((_stratified(metrics, card.key), _metric_dict, "n_scans"),
                          (_stratified(classification, card.key), _classification_dict, "n"),
                          (_stratified(overlap, card.key), _overlap_dict, "n_scans"))
                for frame, convert, count in tables:
                    if frame.empty:
                        continue
                    by = ["biomarker"] if "biomarker" in frame else []
                    for keys, rows in frame.groupby(by + ["stratum", "level"], sort=True):
                        keys = keys if isinstance(keys, tuple) else (keys,)
                        marker, stratum, level = (keys if by else ("",) + keys)
                        level_key = (str(stratum), str(level))
                        levels.setdefault(level_key, {}).update(named(str(marker), convert(rows)))
                        if count in rows and not rows[count].isna().all():
                            counts[level_key] = max(counts.get(level_key, 0), int(rows[count].max()))
                mlflow.log_metrics(levels.pop(("overall", "all"), {}))
                for (stratum, level), values in sorted(levels.items()):
                    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{stratum}={level}",
                                          nested=True):
                        mlflow.set_tags({"sitebench.level": "stratum", "sitebench.stratum": stratum,
                                         "sitebench.stratum_value": str(level), "sitebench.model": card.key,
                                         "sitebench.n_scans": str(counts.get((stratum, level), 0))})
                        mlflow.log_metrics(values)
        return parent.info.run_id
