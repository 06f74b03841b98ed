"""The whole path, wired once: benchmark -> per-stratum metrics -> mixed models -> MLflow -> report.

This is the only module (besides the command line) that touches every room; each
room stays usable on its own.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import yaml

from sitebench.benchmarks.runner import BenchmarkRun, run_benchmark
from sitebench.benchmarks.spec import BenchmarkSpec, load_spec
from sitebench.benchmarks.tracking import (TrackingStore, fail_benchmark_run, local_store, log_benchmark, open_benchmark_run,
                                           register_benchmark_models)
from sitebench.datasets import manifest as mf
from sitebench.datasets.simulator import (BRAIN_VOLUME_COLUMN, REFERENCE_COLUMN, SimulatedTrial, TrialConfig, load_trial_config,
                                          simulate_trial)
from sitebench.errors import SitebenchError
from sitebench.models.base import Training
from sitebench.reports import Report, ReportContent, build_report
from sitebench.reports.findings import findings
from sitebench.reports.coverage import GateRows
from sitebench.reports.qc_summary import qc_summary
from sitebench.stratification.evaluation import AnalysisPlan, Endpoint, Evaluation, evaluate_models, evaluation_table
from sitebench.stratification.gate_effect import gate_effect
from sitebench.sweep import SweepResult, run_sweep
from sitebench.stratification.overlap import overlap_table
from sitebench.trial_gate import GateRun, gated_manifest, run_trial_through_gate


def analysis_plan(spec: BenchmarkSpec) -> AnalysisPlan:
    """The spec's pre-specified analysis, in the form the report locks and a recompute re-reads."""
    report = spec.report
    endpoint = Endpoint(**report.endpoint.model_dump()) if report.endpoint else None
    return AnalysisPlan(strata=list(spec.strata), bootstrap=spec.bootstrap, seed=spec.seed,
                        equivalence_margin=report.equivalence_margin,
                        compare=[list(pair) for pair in report.compare],
                        comparison_margin=report.comparison_margin, endpoint=endpoint,
                        biomarkers=[m.plan_entry() for m in spec.declared_biomarkers])


def evaluate(run: BenchmarkRun) -> Evaluation:
    """Every number of the report for every model version, from the canonical evaluation table.

    The join of predictions to the manifest happens here, not in the runner: benchmarks and
    stratification are both middle-floor rooms and do not import each other.
    """
    keys = [card.key for card in run.models]
    plan = analysis_plan(run.spec)
    unknown = [k for pair in plan.compare for k in pair if k not in keys]
    if unknown:
        raise SitebenchError(f"report.compare names model(s) not in this benchmark: {', '.join(unknown)} "
                             f"(have: {', '.join(keys)})")
    table = evaluation_table(run.predictions, run.manifest.table, run.spec.reference, biomarkers=plan.biomarkers)
    # the same canonical per-scan overlap table is analysed here, locked by the report, and re-read by a recompute
    overlap = overlap_table(run.overlap, run.manifest.table) if not run.overlap.empty else None
    return evaluate_models(table, plan, keys, overlap=overlap)


@dataclass
class PipelineResult:
    run: BenchmarkRun
    evaluation: Evaluation
    findings: list[str]
    store: TrackingStore
    mlflow_run_id: str
    registered: dict[str, str]
    report: Report | None
    gate: GateRun | None = None

    def summary(self) -> str:
        lines = ([self.gate.summary(), ""] if self.gate is not None else [])
        lines += [self.run.summary(), "", "findings:"] + [f"  - {f}" for f in self.findings]
        lines += ["", f"MLflow store:  {self.store.tracking_uri}  (parent run {self.mlflow_run_id})",
                  f"  browse with: mlflow ui --backend-store-uri {self.store.tracking_uri}"]
        if self.report:
            lines.append(f"report:        {self.report.path}  (version {self.report.version})")
            lines.append(f"  check with:  sitebench report verify {self.report.report_dir}")
        return "\n".join(lines)


def run_pipeline(spec: BenchmarkSpec | str | Path, *, workers: int = 2, scheduler: str | None = None,
                 tracking_uri: str | None = None, report: bool = True, progress: bool = True,
                 extra_materials: dict[str, Path] | None = None, truth: dict[str, Any] | None = None,
                 sweeps: list[SweepResult] | None = None,
                 log: Callable[[str], None] = lambda message: None) -> PipelineResult:
    spec_path = None
    if not isinstance(spec, BenchmarkSpec):
        spec_path = Path(spec)
        spec = load_spec(spec_path)
    results_dir = spec.results_path
    store = local_store(results_dir, tracking_uri or spec.mlflow.tracking_uri)
    log(f"scoring {len(spec.models)} model versions")
    run = run_benchmark(spec, workers=workers, scheduler=scheduler, progress=progress,
                        tracking_uri=store.tracking_uri)
    log("fitting per-stratum metrics and mixed models")
    evaluation = evaluate(run)
    notes = findings(run.models, evaluation)
    registered = register_benchmark_models(run, store) if spec.mlflow.register_models else {}
    parent = open_benchmark_run(run, store)
    try:
        built = None
        if report:
            built = _write_report(run, evaluation, notes, registered, parent, spec_path=spec_path,
                                  extra_materials=extra_materials, truth=truth, sweeps=sweeps, workers=workers,
                                  scheduler=scheduler, store=store, progress=progress, log=log)
        log("recording runs in MLflow")
        artifacts = {"report": built.report_dir} if built else {}
        run_id = log_benchmark(run, evaluation.metrics, store, spec_path=spec_path, registered=registered,
                               extra_artifacts=artifacts, classification=evaluation.classification,
                               overlap=evaluation.overlap_by_stratum, run_id=parent["run_id"])
    except BaseException:
        fail_benchmark_run(store, parent["run_id"])
        raise
    return PipelineResult(run=run, evaluation=evaluation, findings=notes, store=store, mlflow_run_id=run_id,
                          registered=registered, report=built)


def _write_report(run: BenchmarkRun, evaluation: Evaluation, notes: list[str], registered: dict[str, str],
                  mlflow_run: dict[str, str], *, spec_path: Path | None, extra_materials: dict[str, Path] | None,
                  truth: dict[str, Any] | None, sweeps: list[SweepResult] | None, workers: int,
                  scheduler: str | None, store: TrackingStore, progress: bool,
                  log: Callable[[str], None]) -> Report:
    """The locked report of this benchmark, naming the MLflow run ``mlflow_run`` that will hold it."""
    effect = None
    if run.spec.report.failed_manifest:
        log("scoring the series the QC gate failed, to show the error with and without them")
        effect = score_gate_failures(run, evaluation, workers=workers, scheduler=scheduler,
                                     tracking_uri=store.tracking_uri, progress=progress)
    log("writing the locked report")
    content = report_content(run, evaluation, notes, registered, spec_path=spec_path,
                             extra_materials=extra_materials, truth=truth)
    content.mlflow_run = mlflow_run
    if effect is not None:
        content.gate_effect, failed_manifest = effect
        content.materials["failed-series manifest"] = failed_manifest
    for sweep in sweeps or []:
        content.sweeps.append((sweep.table, sweep.tolerances))
        content.materials[f"sweep {sweep.parameter} manifest"] = sweep.manifest_path
        content.materials[f"sweep {sweep.parameter} predictions"] = sweep.predictions_path
    return build_report(content, run.spec.results_path.parent / "reports")


def score_gate_failures(run: BenchmarkRun, evaluation: Evaluation, *, workers: int = 2, scheduler: str | None = None,
                        tracking_uri: str | None = None, progress: bool = True) -> tuple[pd.DataFrame, Path]:
    """Score the series the gate failed (``report.failed_manifest``) and compare the error with and without them.

    Only the model versions that score every scan take part (a subsampled model's failed-scan
    scores would compare unlike samples); their results go under ``<results>/gate-failed``.
    """
    spec = run.spec
    path = Path(spec.report.failed_manifest)
    path = path if path.is_absolute() else spec.base_dir / path
    if not path.exists():
        raise SitebenchError("report.failed_manifest: no such manifest", path)
    if len(mf.read_table(path)) == 0:
        return gate_effect(evaluation.table, evaluation.table.iloc[:0]), path
    models = [m for m in spec.models if m.subsample is None]
    failed_spec = spec.model_copy(update={
        "manifest": str(path), "models": models, "results_dir": str(spec.results_path / "gate-failed"),
        "mlflow": spec.mlflow.model_copy(update={"register_models": False})})
    failed = run_benchmark(failed_spec, workers=workers, scheduler=scheduler, progress=progress,
                           tracking_uri=tracking_uri)
    table = evaluation_table(failed.predictions, failed.manifest.table, spec.reference,
                             biomarkers=analysis_plan(spec).biomarkers)
    keys = {card.key for card in failed.models}
    kept = evaluation.table[evaluation.table["model_key"].isin(keys)]
    return gate_effect(kept, table, n_boot=spec.bootstrap, seed=spec.seed), path


def report_content(run: BenchmarkRun, evaluation: Evaluation, notes: list[str], registered: dict[str, str], *,
                   spec_path: Path | None = None, extra_materials: dict[str, Path] | None = None,
                   truth: dict[str, Any] | None = None) -> ReportContent:
    """What the report shows and what its lock hashes: results, lineage, and every file they rest on."""
    spec = run.spec
    materials: dict[str, Path] = {"data manifest": run.manifest.source}  # type: ignore[dict-item]
    if spec_path:
        materials["benchmark spec"] = spec_path
    for resolved, card in zip(run.resolved, run.models):
        materials.update(_model_materials(resolved, card))
    materials.update(extra_materials or {})
    # every image and label file the results rest on, so an auditor can detect a swapped scan
    absolute = run.manifest.with_absolute_paths()
    for column, kind in (("image_path", "image"), ("label_path", "label")):
        if column in absolute:
            for scan_id, file in zip(absolute["scan_id"], absolute[column]):
                if isinstance(file, str) and file:
                    materials[f"{kind} {scan_id}"] = Path(file)
    return ReportContent(
        name=spec.name, title=f"Validation report: {spec.name}", evaluation=evaluation, models=[_lineage(c, registered) for c in run.models],
        predictions=run.predictions, reference=", ".join(spec.reference_columns) or "reference segmentation",
        materials=materials, unit=spec.declared_biomarkers[0].unit or "",
        biomarkers=evaluation.plan.biomarkers, overlap_scores=_locked_overlap(evaluation),
        seeds={"benchmark_seed": spec.seed, "bootstrap": spec.bootstrap,
               "reference": ", ".join(spec.reference_columns) or "reference segmentation",
               "spec_sha256": spec.fingerprint(),
               **{f"subsample {m.name or m.source}": m.subsample.model_dump() for m in spec.models if m.subsample}},
        findings=notes, truth=_truth_summary(truth), intended_use=spec.report.intended_use,
        population=spec.report.population, limitations=list(spec.report.limitations),
        qc=qc_summary(run.manifest.table, read_gate_rows(spec.report.qc_store)))


def read_gate_rows(qc_store: str | None) -> GateRows | None:
    """The QC gate's own records from its store (a folder holding qc.db, or a database URL), for the report."""
    if not qc_store:
        return None
    from sitebench.qc.records import QCRecords, database_url

    if "://" not in qc_store and not (Path(qc_store) / "qc.db").exists():
        raise SitebenchError("report.qc_store: no QC gate store here (expected qc.db)", qc_store)
    url = qc_store if "://" in qc_store else database_url(Path(qc_store))
    records = QCRecords(url)
    try:
        return GateRows.from_records(records, source=qc_store if "://" not in qc_store
                                     else qc_store.split("://", 1)[0] + " database")
    finally:
        records.engine.dispose()


def _locked_overlap(evaluation: Evaluation) -> pd.DataFrame | None:
    """The per-scan overlap table the evaluation analysed (joined, canonical), for the report to lock."""
    overlap = getattr(evaluation, "overlap", None)
    return overlap if isinstance(overlap, pd.DataFrame) and not overlap.empty else None


def _model_materials(resolved: Any, card: Any) -> dict[str, Path]:
    """Every file a model version loads (weights, configs, code), to be hashed into the lock."""
    materials: dict[str, Path] = {}
    location = Path(resolved.location) if resolved.location else None
    if location and (location / "models" / "model.pt").exists():
        materials[f"weights {card.key}"] = location / "models" / "model.pt"  # the name earlier locks used
    for rel, _digest in getattr(resolved, "files", ()) or ():
        path = (location / rel) if location else None
        if path is not None and path.is_file() and path not in materials.values():
            materials[f"model file {card.key} {rel}"] = path
    return materials


def _lineage(card: Any, registered: dict[str, str]) -> dict[str, Any]:
    """Where a model version came from: source, licence, citation, training data, changelog, files, registry."""
    return {"key": card.key, "name": card.name, "version": card.version, "kind": card.kind,
            "weights_sha256": card.weights_sha256, "source": card.source,
            "description": card.extra.get("description", ""), "changelog": card.extra.get("changelog", {}),
            "training": _training(card.training), "registered": registered.get(card.key, "-"),
            "licence": card.licence, "citation": card.citation, "biomarkers": list(card.biomarkers),
            "files": dict(card.files), "files_sha256": card.files_sha256, "training_data": card.training_data,
            "package": card.extra.get("package", ""), "package_version": card.extra.get("package_version", "")}


def _training(training: Training | None) -> dict[str, Any]:
    """The typed training record for the report's lineage table (empty for a model with none)."""
    return training.to_dict() if training is not None else {}


def _truth_summary(truth: dict[str, Any] | None) -> dict[str, Any] | None:
    if not truth:
        return None
    keep = ("reference_vendor", "vendor_gm_wm_ratio", "vendor_effect_on_gm_wm_ratio", "upgrade", "coverage",
            "subject_effects", "site_gm_wm_ratio_sd", "scanner_gm_wm_ratio_sd")
    return {k: truth[k] for k in keep if k in truth}


# --------------------------------------------------------------------------- the demo


#: The demo's trial: 20 sites (the story's sites S03 to S16 all exist) with 5 scans each (3 participants, up to 2 visits),
#: about 5,000 DICOM files through the gate (every story event with scans before and after it).
DEMO_SCANS_PER_SITE = 5
#: The acquisition sweeps the demo's report derives tolerances from, and their simulated subjects per level.
DEMO_SWEEPS = ("coverage_loss", "noise")
DEMO_SWEEP_SUBJECTS = 5

#: The published network the demo validates beside our own: deepbet, through its Python entry point.
DEEPBET_SOURCE = "entrypoint:sitebench.models.published.deepbet_brain:make_model"

DEMO_MODELS = [
    {"source": "classical", "register_as": "gm-tissue-gmm", "alias": "candidate", "biomarkers": ["gm_volume_ml"]},
    {"source": "builtin:gm_unet_v1", "register_as": "gm-unet", "alias": "baseline", "biomarkers": ["gm_volume_ml"]},
    {"source": "builtin:gm_unet_v2", "register_as": "gm-unet", "alias": "candidate", "biomarkers": ["gm_volume_ml"]},
    # about 7 s a scan on one core at its fixed 256³ grid: a pre-specified subsample of one scan per site,
    # scanner and software version keeps every stratum (and both sides of the upgrade and the swap) in view
    {"source": DEEPBET_SOURCE, "biomarkers": ["brain_volume_ml"],
     "subsample": {"per": [mf.SITE, mf.SCANNER_ID, mf.SOFTWARE_VERSION], "n": 1, "seed": 0}},
]

#: The demo's biomarkers, declared as any team would declare theirs.
DEMO_BIOMARKERS = [
    {"name": REFERENCE_COLUMN, "kind": "label_volume", "labels": [1], "unit": "ml",
     "label_names": {1: "grey matter"}, "description": "total grey-matter volume",
     "reference": {"column": REFERENCE_COLUMN, "labels": [2]}},
    {"name": BRAIN_VOLUME_COLUMN, "kind": "label_volume", "labels": [1], "unit": "ml",
     "label_names": {1: "brain"}, "description": "total brain volume (the brain-extraction mask)",
     "reference": {"column": BRAIN_VOLUME_COLUMN, "labels": [1, 2, 3]}, "equivalence_margin": 60.0},
]


#: The demo's pre-specified decisions; margins in ml of grey-matter volume (about 1,100 ml in this trial).
DEMO_REPORT = {
    "intended_use": "Measure total grey-matter volume (ml) from 3D T1-weighted MRI as a secondary endpoint of a "
                    "multi-site trial, comparing patients with controls and following change over time; and "
                    "total brain volume (ml) from a published brain-extraction network, for normalisation.",
    "population": "Adults (about 20-80 years) at 20 simulated sites on three scanner vendors, scanned under one "
                  "locked T1w protocol; one site upgrades its scanner software mid-study and one has reduced "
                  "superior coverage.",
    "equivalence_margin": 50.0,
    "compare": [["gm-unet@1.0.0", "gm-unet@2.0.0"]],
    "comparison_margin": 20.0,
    "endpoint": {"column": "group", "positive": "patient", "higher_is_positive": False},
}


def demo_spec(bootstrap: int = 1000, seed: int = 0, manifest: str = "trial/manifest.csv",
              qc_store: str | None = None, failed_manifest: str | None = None) -> dict[str, Any]:
    report = dict(DEMO_REPORT, **({"qc_store": qc_store} if qc_store else {}),
                  **({"failed_manifest": failed_manifest} if failed_manifest else {}))
    return {"name": "demo", "manifest": manifest, "biomarkers": DEMO_BIOMARKERS,
            "reference_segmentation": mf.LABEL_PATH, "models": DEMO_MODELS, "seed": seed,
            "bootstrap": bootstrap, "results_dir": "results", "mlflow": {"experiment": "sitebench-demo"},
            "report": report}


def prepare_trial(config: TrialConfig, trial_dir: Path,
                  progress: Callable[[int, int], None] | None = None) -> SimulatedTrial | None:
    """Simulate into ``trial_dir`` unless the same trial is already there; a different one is an error."""
    truth_path = trial_dir / "truth.json"
    if (trial_dir / "manifest.csv").exists() and truth_path.exists():
        previous = json.loads(truth_path.read_text()).get("config", {})
        if previous != json.loads(config.model_dump_json()):
            raise SitebenchError("holds a different simulated trial; use another --out or the same settings",
                                 trial_dir)
        return None
    return simulate_trial(config, trial_dir, progress=progress)


def prepare_gate(config: TrialConfig, trial_dir: Path, gate_dir: Path, progress: bool,
                 log: Callable[[str], None]) -> GateRun:
    """Send the trial through the gate, unless this trial's gate run is already complete in ``gate_dir``."""
    finished = gate_dir / "sent.csv"
    if finished.exists():
        return GateRun.load(gate_dir)
    if gate_dir.exists():
        raise SitebenchError("holds an unfinished QC gate run; use another --out", gate_dir)
    return run_trial_through_gate(trial_dir, config, gate_dir, progress=progress, log=log)


def run_demo(out: str | Path, *, sites: int = 20, scans_per_site: int = DEMO_SCANS_PER_SITE, seed: int = 0, workers: int = 2,
             scheduler: str | None = None, bootstrap: int = 1000, progress: bool = True,
             tracking_uri: str | None = None, log: Callable[[str], None] = lambda m: None) -> PipelineResult:
    """Simulate a trial whose sites send DICOM through the real upload-time gate, benchmark our three model
    versions and a published network on the series the gate passed, fit scanner effects, log, and lock a report."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = load_trial_config(n_sites=sites, scans_per_site=scans_per_site, seed=seed, workers=max(1, workers),
                               dicom=True)
    log(f"simulating {sites} sites x {scans_per_site} scans into {out / 'trial'} (NIfTI and DICOM)")
    bar = progress_bar(progress, sites * scans_per_site, "simulating scans")
    prepare_trial(config, out / "trial", progress=bar)
    log("sending every site's series to the QC gate (sitebench qc serve, C-STORE), and meanwhile sweeping "
        f"{' and '.join(DEMO_SWEEPS)} on simulated subjects for tolerances (sitebench simulate sweep)")
    # the gate's checker keeps one core busy while the sites send; the sweeps use the other one
    manifest, failed = out / "gated" / "manifest.csv", out / "gated" / "failed.csv"
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sweep") as pool:
        sweeping = pool.submit(_demo_sweeps, out / "sweep", seed, bootstrap)
        gate = prepare_gate(config, out / "trial", out / "gate", progress, log)
        log("building the scan manifest from the series the gate passed (sitebench qc manifest)")
        if not manifest.exists():
            gated_manifest(gate, out / "trial", manifest)
        if not failed.exists() and gate.per_site()["fail"].sum() > 0:
            gated_manifest(gate, out / "trial", failed, statuses=("fail",))
        sweeps = sweeping.result()
    spec_path = out / "benchmark.yaml"
    text = yaml.safe_dump(demo_spec(bootstrap, seed, manifest="gated/manifest.csv", qc_store=str(gate.store),
                                    failed_manifest="gated/failed.csv" if failed.exists() else None),
                          sort_keys=False)
    if not spec_path.exists() or spec_path.read_text() != text:
        spec_path.write_text(text)
    truth = json.loads((out / "trial" / "truth.json").read_text())
    result = run_pipeline(spec_path, workers=workers, scheduler=scheduler, tracking_uri=tracking_uri,
                          progress=progress, truth=truth, log=log, sweeps=sweeps,
                          extra_materials={"simulation truth": out / "trial" / "truth.json"})
    result.gate = gate
    return result


def _demo_sweeps(out: Path, seed: int, bootstrap: int) -> list[SweepResult]:
    """The demo's acquisition sweeps, one worker (they run beside the gate)."""
    return [run_sweep(parameter, out, n_subjects=DEMO_SWEEP_SUBJECTS, seed=seed,
                      margin=float(DEMO_REPORT["equivalence_margin"]), n_boot=max(200, bootstrap), workers=1)
            for parameter in DEMO_SWEEPS]


def progress_bar(enabled: bool, total: int, description: str) -> Callable[[int, int], None] | None:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=description, unit="scan")

    def update(done: int, _total: int) -> None:
        bar.update(done - bar.n)
        if done >= _total:
            bar.close()

    return update
