"""The whole path, wired once: benchmark -> per-stratum metrics -> mixed models -> MLflow -> report.

This is the only module (besides the command line) that touches every room; each
room stays usable on its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import yaml

from sitebench.benchmarks.runner import BenchmarkRun, run_benchmark
from sitebench.benchmarks.spec import BenchmarkSpec, load_spec
from sitebench.benchmarks.tracking import TrackingStore, local_store, log_benchmark, register_benchmark_models
from sitebench.datasets import manifest as mf
from sitebench.datasets.simulator import (REFERENCE_COLUMN, SimulatedTrial, TrialConfig, load_trial_config,
                                          simulate_trial)
from sitebench.errors import SitebenchError
from sitebench.reports import Report, ReportContent, build_report
from sitebench.reports.qc_summary import qc_summary
from sitebench.stratification.evaluation import REFERENCE_KEY, AnalysisPlan, Endpoint, Evaluation, evaluate_models


def analysis_plan(spec: BenchmarkSpec) -> AnalysisPlan:
    """The spec's pre-specified analysis, in the form the report locks and a recompute re-reads."""
    report = spec.report
    endpoint = Endpoint(**report.endpoint.model_dump()) if report.endpoint else None
    return AnalysisPlan(strata=list(spec.strata), bootstrap=spec.bootstrap, seed=spec.seed,
                        equivalence_margin=report.equivalence_margin,
                        compare=[list(pair) for pair in report.compare],
                        comparison_margin=report.comparison_margin, endpoint=endpoint)


def evaluate(run: BenchmarkRun) -> Evaluation:
    """Every number of the report for every model version, from the canonical evaluation table."""
    keys = [card.key for card in run.models]
    plan = analysis_plan(run.spec)
    unknown = [k for pair in plan.compare for k in pair if k not in keys]
    if unknown:
        raise SitebenchError(f"report.compare names model(s) not in this benchmark: {', '.join(unknown)} "
                             f"(have: {', '.join(keys)})")
    return evaluate_models(run.evaluation_table(), plan, keys)


def _metric(metrics: pd.DataFrame, model: str, stratum: str, level: str, metric: str) -> pd.Series | None:
    rows = metrics[(metrics["model_key"] == model) & (metrics["stratum"] == stratum) &
                   (metrics["level"].astype(str) == str(level)) & (metrics["metric"] == metric)]
    if rows.empty or not bool(rows["estimable"].iloc[0]):
        return None
    return rows.iloc[0]


def _fmt(row: pd.Series | None) -> str:
    if row is None:
        return "not estimable"
    if pd.isna(row["ci_low"]):
        return f"{row['estimate']:.3g}"
    return f"{row['estimate']:.3g} [{row['ci_low']:.3g}, {row['ci_high']:.3g}]"


def findings(run: BenchmarkRun, evaluation: Evaluation) -> list[str]:
    """Plain sentences read off this run's own numbers (nothing here is written in advance)."""
    metrics = evaluation.metrics
    vendors = sorted(evaluation.table[mf.VENDOR].unique())
    notes = []
    for card in run.models:
        per_vendor = ", ".join(f"{v} {_fmt(_metric(metrics, card.key, 'vendor', v, 'mae'))}" for v in vendors)
        trained = card.extra.get("training", {}).get("vendor")
        lead = f"{card.key}" + (f" (trained on {trained} only"
                                f"{', with cross-vendor augmentation' if card.extra['training'].get('augmentation') else ''})"
                                if trained else "")
        notes.append(f"{lead}: MAE by vendor (ml, 95% CI): {per_vendor}.")
    trained_models = [c for c in run.models if c.extra.get("training", {}).get("vendor")]
    if len(trained_models) >= 2:
        base = next((c for c in trained_models if not c.extra["training"].get("augmentation")), None)
        aug = next((c for c in trained_models if c.extra["training"].get("augmentation")), None)
        if base and aug:
            home = base.extra["training"]["vendor"]
            for v in vendors:
                if v == home:
                    continue
                a, b = _metric(metrics, base.key, "vendor", v, "mae"), _metric(metrics, aug.key, "vendor", v, "mae")
                if a is None or b is None:
                    continue
                verdict = "lower" if b["estimate"] < a["estimate"] else "higher"
                separated = b["ci_high"] < a["ci_low"] or b["ci_low"] > a["ci_high"]
                notes.append(f"At {v} (unseen in training), the augmented {aug.key} has {verdict} MAE than "
                             f"{base.key}: {b['estimate']:.3g} vs {a['estimate']:.3g} ml"
                             f"{' (CIs do not overlap)' if separated else ' (CIs overlap)'}.")
    for row in evaluation.upgrade.itertuples(index=False):
        row_d = row._asdict()
        if row_d.get("difference") is None or pd.isna(row_d.get("difference")):
            continue
        ci = (f"95% CI {row_d['ci_low']:.3g} to {row_d['ci_high']:.3g}" if not pd.isna(row_d.get("ci_low"))
              else "CI not estimable with so few scans")
        notes.append(f"{row_d['model_key']} at site {row_d['site']}: error changed by {row_d['difference']:.3g} ml "
                     f"after the software change ({row_d['n_before']} scans before, {row_d['n_after']} after; {ci}).")
    notes += _covariate_findings(evaluation.mixed)
    worst = metrics[(metrics["stratum"] == "site") & (metrics["metric"] == "bias") & metrics["estimable"]]
    if not worst.empty:
        row = worst.loc[worst["estimate"].astype(float).abs().idxmax()]
        notes.append(f"Largest site bias: {row['model_key']} at site {row['level']}, {_fmt(row)} ml.")
    return notes


def _covariate_findings(mixed: list[dict[str, Any]]) -> list[str]:
    """Does each model reproduce the reference's covariate effects (age, group)? Read off the mixed fits."""
    reference = next((m for m in mixed if m["model_key"] == REFERENCE_KEY), None)
    if reference is None:
        return []
    notes = []
    for term, effect in reference["fixed_effects"].items():
        if not (term == mf.AGE or term.startswith(f"C({mf.GROUP})")):
            continue
        parts = [f"reference {effect['estimate']:.3g} [{effect['ci_low']:.3g}, {effect['ci_high']:.3g}]"]
        for fit in mixed:
            if fit["response"] == "prediction" and term in fit["fixed_effects"]:
                e = fit["fixed_effects"][term]
                inside = e["ci_low"] <= effect["estimate"] <= e["ci_high"]
                parts.append(f"{fit['model_key']} {e['estimate']:.3g} [{e['ci_low']:.3g}, {e['ci_high']:.3g}]"
                             f"{'' if inside else ' (misses the reference value)'}")
        notes.append(f"Effect of {term} on the biomarker (ml, mixed model, 95% CI): " + "; ".join(parts) + ".")
    return notes


@dataclass
class PipelineResult:
    run: BenchmarkRun
    evaluation: Evaluation
    findings: list[str]
    store: TrackingStore
    mlflow_run_id: str
    registered: dict[str, str]
    report: Report | None

    def summary(self) -> str:
        lines = [self.run.summary(), "", "findings:"] + [f"  - {f}" for f in self.findings]
        lines += ["", f"MLflow store:  {self.store.tracking_uri}  (parent run {self.mlflow_run_id})",
                  f"  browse with: mlflow ui --backend-store-uri {self.store.tracking_uri}"]
        if self.report:
            lines.append(f"report:        {self.report.path}  (version {self.report.version})")
            lines.append(f"  check with:  sitebench report verify {self.report.report_dir}")
        return "\n".join(lines)


def run_pipeline(spec: BenchmarkSpec | str | Path, *, workers: int = 2, scheduler: str | None = None,
                 tracking_uri: str | None = None, report: bool = True, progress: bool = True,
                 extra_materials: dict[str, Path] | None = None, truth: dict[str, Any] | None = None,
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
    notes = findings(run, evaluation)
    registered = register_benchmark_models(run, store) if spec.mlflow.register_models else {}
    built = None
    if report:
        log("writing the locked report")
        content = report_content(run, evaluation, notes, registered, spec_path=spec_path,
                                 extra_materials=extra_materials, truth=truth)
        built = build_report(content, results_dir.parent / "reports")
    log("recording runs in MLflow")
    artifacts = {}
    if built:
        artifacts["report"] = built.report_dir
    run_id = log_benchmark(run, evaluation.metrics, store, spec_path=spec_path, registered=registered,
                           extra_artifacts=artifacts)
    return PipelineResult(run=run, evaluation=evaluation, findings=notes, store=store, mlflow_run_id=run_id,
                          registered=registered, report=built)


def report_content(run: BenchmarkRun, evaluation: Evaluation, notes: list[str], registered: dict[str, str], *,
                   spec_path: Path | None = None, extra_materials: dict[str, Path] | None = None,
                   truth: dict[str, Any] | None = None) -> ReportContent:
    """What the report shows and what its lock hashes: results, lineage, and every file they rest on."""
    spec = run.spec
    materials: dict[str, Path] = {"data manifest": run.manifest.source}  # type: ignore[dict-item]
    if spec_path:
        materials["benchmark spec"] = spec_path
    for resolved, card in zip(run.resolved, run.models):
        if resolved.location and (Path(resolved.location) / "models" / "model.pt").exists():
            materials[f"weights {card.key}"] = Path(resolved.location) / "models" / "model.pt"
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
        predictions=run.predictions, reference=spec.reference, materials=materials,
        seeds={"benchmark_seed": spec.seed, "bootstrap": spec.bootstrap, "reference": spec.reference,
               "spec_sha256": spec.fingerprint()},
        findings=notes, truth=_truth_summary(truth), intended_use=spec.report.intended_use,
        population=spec.report.population, limitations=list(spec.report.limitations),
        qc=qc_summary(run.manifest.table, spec.report.qc_store))


def _lineage(card: Any, registered: dict[str, str]) -> dict[str, Any]:
    """Where a model version came from: source, training data, changelog, weights, registry entry."""
    return {"key": card.key, "name": card.name, "version": card.version, "kind": card.kind,
            "weights_sha256": card.weights_sha256, "source": card.source,
            "description": card.extra.get("description", ""), "changelog": card.extra.get("changelog", {}),
            "training": card.extra.get("training", {}), "registered": registered.get(card.key, "-")}


def _truth_summary(truth: dict[str, Any] | None) -> dict[str, Any] | None:
    if not truth:
        return None
    keep = ("reference_vendor", "vendor_gm_wm_ratio", "vendor_effect_on_gm_wm_ratio", "upgrade", "coverage",
            "subject_effects", "site_gm_wm_ratio_sd", "scanner_gm_wm_ratio_sd")
    return {k: truth[k] for k in keep if k in truth}


# --------------------------------------------------------------------------- the demo


DEMO_MODELS = [
    {"source": "classical", "register_as": "gm-tissue-gmm", "alias": "candidate"},
    {"source": "builtin:gm_unet_v1", "register_as": "gm-unet", "alias": "baseline"},
    {"source": "builtin:gm_unet_v2", "register_as": "gm-unet", "alias": "candidate"},
]


#: The demo's pre-specified decisions; margins in ml of grey-matter volume (about 1,100 ml in this trial).
DEMO_REPORT = {
    "intended_use": "Measure total grey-matter volume (ml) from 3D T1-weighted MRI as a secondary endpoint of a "
                    "multi-site trial, comparing patients with controls and following change over time.",
    "population": "Adults (about 20-80 years) at 20 simulated sites on three scanner vendors, scanned under one "
                  "locked T1w protocol; one site upgrades its scanner software mid-study and one has reduced "
                  "superior coverage.",
    "equivalence_margin": 50.0,
    "compare": [["gm-unet@1.0.0", "gm-unet@2.0.0"]],
    "comparison_margin": 20.0,
    "endpoint": {"column": "group", "positive": "patient", "higher_is_positive": False},
}


def demo_spec(bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    return {"name": "demo", "manifest": "trial/manifest.csv", "reference": REFERENCE_COLUMN,
            "reference_segmentation": mf.LABEL_PATH, "models": DEMO_MODELS, "seed": seed,
            "bootstrap": bootstrap, "results_dir": "results", "mlflow": {"experiment": "sitebench-demo"},
            "report": DEMO_REPORT}


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


def run_demo(out: str | Path, *, sites: int = 20, scans_per_site: int = 10, seed: int = 0, workers: int = 2,
             scheduler: str | None = None, bootstrap: int = 1000, progress: bool = True,
             tracking_uri: str | None = None, log: Callable[[str], None] = lambda m: None) -> PipelineResult:
    """Simulate a trial, benchmark three model versions, fit scanner effects, log, and lock a report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = load_trial_config(n_sites=sites, scans_per_site=scans_per_site, seed=seed, workers=max(1, workers))
    log(f"simulating {sites} sites x {scans_per_site} scans into {out / 'trial'}")
    bar = progress_bar(progress, sites * scans_per_site, "simulating scans")
    prepare_trial(config, out / "trial", progress=bar)
    spec_path = out / "benchmark.yaml"
    text = yaml.safe_dump(demo_spec(bootstrap, seed), sort_keys=False)
    if not spec_path.exists() or spec_path.read_text() != text:
        spec_path.write_text(text)
    truth = json.loads((out / "trial" / "truth.json").read_text())
    return run_pipeline(spec_path, workers=workers, scheduler=scheduler, tracking_uri=tracking_uri,
                        progress=progress, truth=truth, log=log,
                        extra_materials={"simulation truth": out / "trial" / "truth.json"})


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
