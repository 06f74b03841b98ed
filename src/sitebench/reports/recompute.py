"""Re-derive a locked report's results from its inputs and confirm they match (``verify --recompute``).

Two steps, each compared byte for byte with what the lock holds:

1. the per-scan evaluation table, rebuilt from the report's locked predictions and the
   data manifest it names (so the numbers rest on those scans and reference values);
2. every result table, recomputed from that evaluation table with the locked analysis
   plan (strata, bootstrap replicates and seed, margins, comparisons).

The hashes alone show nothing changed since locking; the recompute shows the locked
numbers are what this code makes of the locked inputs.

When the mixed-model tables differ and the locked plan names another mixed-model engine
than this code's, the difference is reported as that engine change (``engine_changes``),
not as a bare mismatch; every other table must still reproduce. A data manifest that is
not available here (a report copied away from its materials) skips step 1 and says so
(``not_done``).
"""

from __future__ import annotations

import inspect
import io
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sitebench.datasets.manifest import read_manifest
from sitebench.errors import SitebenchError
from sitebench.provenance import sha256_bytes
from sitebench.reports.integrity import find_material
from sitebench.reports.lock import locked_files, locked_subject, read_lock
from sitebench.stratification.evaluation import (LEGACY_MIXED_MODEL_ENGINE, AnalysisPlan, evaluate_models,
                                                 evaluation_csv, evaluation_table, read_evaluation_csv)

DATA_MANIFEST = "data manifest"
#: The result files a mixed-model fit writes.
MIXED_MODEL_TABLES = ("fixed_effects", "variance_components", "mixed_models")
#: The lock role of the per-scan, per-label overlap scores (a report with segmentation biomarkers).
OVERLAP_ROLE = "table:overlap_scores"
#: Columns of the per-scan, per-label overlap scores read as text (locked as ``overlap_scores.csv``).
OVERLAP_TEXT_COLUMNS: tuple[str, ...] = ("scan_id", "model_key", "biomarker", "label", "label_name")


@dataclass
class Recomputation:
    checked: list[str] = field(default_factory=list)  # re-derived and identical
    problems: list[str] = field(default_factory=list)
    engine_changes: list[str] = field(default_factory=list)  # mixed-model tables differing with the engine
    not_done: list[str] = field(default_factory=list)  # steps skipped: an input is not available here


def mixed_model_engines(plan: dict) -> tuple[str, str]:
    """(engine the locked plan was fitted with, engine this code fits with); read defensively."""
    locked = str(plan.get("mixed_model_engine") or LEGACY_MIXED_MODEL_ENGINE)
    current = AnalysisPlan().mixed_model_engine
    return locked, current


def _first_difference(locked: bytes, recomputed: bytes) -> str:
    old, new = locked.decode().splitlines(), recomputed.decode().splitlines()
    for row, (a, b) in enumerate(zip(old, new)):
        if a != b:
            return f"line {row + 1}: locked '{a[:80]}', recomputed '{b[:80]}'"
    return f"{len(old)} locked lines, {len(new)} recomputed"


def _accepts(function: object, name: str) -> bool:
    """Whether ``function`` takes the keyword ``name`` (the analyses gain arguments; older ones lack them)."""
    try:
        return name in inspect.signature(function).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def read_overlap_scores(report_dir: Path, statement: dict) -> pd.DataFrame | None:
    """The locked per-scan, per-label overlap scores (role ``table:overlap_scores``), codes as text; None if none."""
    entry = locked_subject(statement, OVERLAP_ROLE)
    if entry is None:
        return None
    return pd.read_csv(report_dir / entry["name"], dtype={c: str for c in OVERLAP_TEXT_COLUMNS},
                       keep_default_na=False, na_values=[""], float_precision="round_trip")


def recompute_report(report_dir: Path, materials_dir: Path | None = None) -> Recomputation:
    """Rebuild the evaluation table and every result table; list what does not match.

    ``materials_dir`` is where to look for the data manifest when it is not where the lock recorded it.
    """
    statement = read_lock(report_dir)
    analysis = statement.get("predicate", {}).get("analysis") or {}
    if "plan" not in analysis:
        raise SitebenchError("this report's lock has no analysis plan; it predates --recompute", report_dir)
    result = Recomputation()
    biomarkers = analysis["plan"].get("biomarkers") or []
    evaluation_entry, predictions_entry = (locked_subject(statement, role)
                                           for role in ("table:evaluation", "table:predictions"))
    if evaluation_entry is None or predictions_entry is None:
        raise SitebenchError("the lock lists no evaluation or predictions table", report_dir)
    locked_evaluation = (report_dir / evaluation_entry["name"]).read_bytes()

    manifest_uri, manifest_digest = next(((uri, digest) for role, uri, digest in locked_files(statement)
                                          if role == DATA_MANIFEST), (None, ""))
    manifest_path = find_material(report_dir, manifest_uri, manifest_digest, materials_dir) if manifest_uri else None
    if manifest_uri is None:
        result.problems.append("recompute: the lock names no data manifest, so the evaluation table cannot be rebuilt")
    elif manifest_path is None:
        result.not_done.append(f"the data manifest ({manifest_uri}) is not available here with its locked hash, "
                               "so the evaluation table was not rebuilt from the predictions (give --materials DIR)")
    else:
        manifest = read_manifest(manifest_path, check_files=False, check_hashes=False)
        predictions = pd.read_csv(report_dir / predictions_entry["name"],
                                  dtype={"scan_id": str, "model_key": str, "biomarker": str, "weights_sha256": str,
                                         "image_sha256": str})
        extra = {"biomarkers": biomarkers} if biomarkers and _accepts(evaluation_table, "biomarkers") else {}
        rebuilt = evaluation_csv(evaluation_table(predictions, manifest.table, analysis["reference"],
                                                  **extra)).encode()
        result.checked.append("evaluation")
        if rebuilt != locked_evaluation:
            result.problems.append("recompute: the evaluation table rebuilt from the predictions and the data "
                                   f"manifest differs ({_first_difference(locked_evaluation, rebuilt)})")

    table = read_evaluation_csv(io.StringIO(locked_evaluation.decode()))
    overlap = read_overlap_scores(report_dir, statement)
    extra = {"overlap": overlap} if overlap is not None and _accepts(evaluate_models, "overlap") else {}
    evaluation = evaluate_models(table, AnalysisPlan.from_dict(analysis["plan"]), analysis.get("model_keys"),
                                 **extra)
    locked_engine, current_engine = mixed_model_engines(analysis["plan"])
    differing_mixed = []
    for file_name, data in evaluation.result_files().items():
        name = Path(file_name).stem
        entry = locked_subject(statement, f"table:{name}")
        if entry is None:
            result.problems.append(f"recompute: {name} is not in the lock")
            continue
        if sha256_bytes(data) == entry["digest"]["sha256"]:
            result.checked.append(name)
            continue
        if name in MIXED_MODEL_TABLES and locked_engine != current_engine:
            differing_mixed.append(name)
            continue
        locked = (report_dir / entry["name"]).read_bytes()
        result.problems.append(f"recompute: {name} differs from the locked table "
                               f"({_first_difference(locked, data)})")
    if differing_mixed:
        result.engine_changes.append(f"mixed-model tables differ ({', '.join(differing_mixed)}): locked with "
                                     f"{locked_engine}, recomputed with {current_engine}")
    return result
