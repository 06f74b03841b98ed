"""What a validation report shows: one plain data object, filled by the pipeline, read by the sections."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from sitebench.reports.qc_summary import QCSummary
from sitebench.reports.recompute import OVERLAP_TEXT_COLUMNS
from sitebench.stratification.evaluation import Evaluation

__all__ = ["LOCKED_PREDICTION_COLUMNS", "OVERLAP_TEXT_COLUMNS", "ReportContent"]

#: The kinds of result a report can hold, as the checklist names them.
CONTINUOUS, CLASSIFICATION, SEGMENTATION = "continuous", "classification", "segmentation"
#: Result frames of an :class:`Evaluation` that carry a ``biomarker`` column when there are several.
BIOMARKER_FRAMES = ("table", "metrics", "upgrade", "calibration", "harmonization", "equivalence", "comparison",
                    "discrimination")


#: The runner's prediction columns a report locks, those present in this order (timings and model names are
#: left out: they are in the MLflow run, and a rerun must give identical bytes). A legacy predictions table has
#: no ``biomarker`` or ``reference`` column, so its locked bytes are what they always were.
LOCKED_PREDICTION_COLUMNS: tuple[str, ...] = ("scan_id", "model_key", "biomarker", "weights_sha256", "image_sha256",
                                              "prediction", "reference", "dice")


@dataclass
class ReportContent:
    """Everything a validation report shows; built by the pipeline from results objects."""

    name: str
    title: str
    evaluation: Evaluation  # every result table, and the pre-specified plan they were derived with
    models: list[dict[str, Any]]  # model cards with lineage
    predictions: pd.DataFrame  # the runner's predictions the evaluation table was built from
    reference: str  # manifest column holding the reference value
    materials: dict[str, Path]  # what the results rest on, hashed into the lock
    seeds: dict[str, Any]
    unit: str = "ml"
    findings: list[str] = field(default_factory=list)
    truth: dict[str, Any] | None = None
    intended_use: str = ""
    population: str = ""
    limitations: list[str] = field(default_factory=list)
    qc: QCSummary | None = None
    #: The declared biomarkers (``BiomarkerSpec.plan_entry()`` dicts); empty: one legacy biomarker named by
    #: ``reference``, in ``unit``.
    biomarkers: list[dict[str, Any]] = field(default_factory=list)
    #: Per scan, model and label: Dice, HD95, volumes (locked as its own table, ``table:overlap_scores``).
    overlap_scores: pd.DataFrame | None = None
    #: The error with and without the series the QC gate failed (``stratification.gate_effect``), when scored.
    gate_effect: pd.DataFrame | None = None
    #: Acquisition sweeps (``sitebench simulate sweep``): per parameter, its table and its suggested rules.
    sweeps: list[tuple[pd.DataFrame, pd.DataFrame]] = field(default_factory=list)
    #: The MLflow run that holds this benchmark (``tracking_uri``, ``experiment_id``, ``run_id``): locked in the
    #: report's header so a reader goes from the signed report to its runs, and the run holds the report.
    mlflow_run: dict[str, str] | None = None

    def biomarker_entries(self) -> list[dict[str, Any]]:
        """The declared biomarkers: from the content, else from the locked plan (empty for a legacy report)."""
        return list(self.biomarkers or getattr(self.evaluation.plan, "biomarkers", None) or [])


def frame(evaluation: Evaluation, *names: str) -> pd.DataFrame:
    """The first of ``names`` the evaluation has as a non-empty frame (an empty frame when none: older code)."""
    for name in names:
        value = getattr(evaluation, name, None)
        if isinstance(value, pd.DataFrame) and len(value.columns):
            return value
    return pd.DataFrame()


def only(table: pd.DataFrame, biomarker: str) -> pd.DataFrame:
    """The rows of one biomarker (a frame without a ``biomarker`` column is returned whole)."""
    if isinstance(table, pd.DataFrame) and "biomarker" in table.columns:
        return table[table["biomarker"].astype(str) == str(biomarker)].reset_index(drop=True)
    return table


def biomarker_label(marker: dict[str, Any]) -> str:
    """``name (unit)``: how a biomarker is named in headings and on the first page."""
    unit = marker.get("unit") or ""
    return f"{marker['name']} ({unit})" if unit else str(marker["name"])


def evaluation_for(evaluation: Evaluation, marker: dict[str, Any],
                   biomarkers: list[dict[str, Any]] | None = None) -> Evaluation:
    """One continuous biomarker's share of every result, as a single-biomarker :class:`Evaluation`.

    Its plan is the one the statistics used for it: the biomarker's own equivalence margin when it declares
    one; the plan's margins and endpoint belong to the first continuous biomarker (of ``biomarkers``,
    default the plan's), so another one has no comparison margin or endpoint and only its own margin.
    """
    name = str(marker["name"])
    mixed = evaluation.mixed
    if any("biomarker" in m for m in mixed):
        mixed = [m for m in mixed if str(m.get("biomarker")) == name]
    entries = list(biomarkers or getattr(evaluation.plan, "biomarkers", None) or [marker])
    continuous = [str(m.get("name")) for m in entries if (m.get("analysis") or CONTINUOUS) == CONTINUOUS]
    first = not continuous or continuous[0] == name
    plan = evaluation.plan
    margin = marker.get("equivalence_margin")
    changes: dict[str, Any] = {"equivalence_margin": float(margin) if margin is not None
                               else (plan.equivalence_margin if first else None)}
    if not first:
        changes.update(comparison_margin=None, endpoint=None)
    if any(f == "biomarkers" for f in getattr(plan, "__dataclass_fields__", {})):
        changes["biomarkers"] = []
    plan = replace(plan, **changes)
    names = [str(m.get("name")) for m in entries]
    notes = [n for n in evaluation.notes if name in n or not any(str(other) in n for other in names)]
    frames = {attr: only(getattr(evaluation, attr), name) for attr in BIOMARKER_FRAMES}
    return replace(evaluation, plan=plan, mixed=mixed, notes=notes, **frames)
