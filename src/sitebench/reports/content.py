"""What a validation report shows: one plain data object, filled by the pipeline, read by the sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sitebench.reports.qc_summary import QCSummary
from sitebench.stratification.evaluation import Evaluation


#: The runner's prediction columns a report locks (timings and model names are left out:
#: they are in the MLflow run, and a rerun must give identical bytes).
LOCKED_PREDICTION_COLUMNS: tuple[str, ...] = ("scan_id", "model_key", "weights_sha256", "image_sha256",
                                              "prediction", "dice")


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
