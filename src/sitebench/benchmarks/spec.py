"""The benchmark spec: a YAML file validated into typed objects (unknown keys are errors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from sitebench.config import StrictModel, load_yaml, parse_config
from sitebench.datasets.manifest import DEFAULT_STRATA
from sitebench.provenance import sha256_json

DEFAULT_TRANSFORMS: list[dict[str, dict[str, Any]]] = [
    {"LoadImaged": {"keys": ["image"], "image_only": True}},
    {"EnsureChannelFirstd": {"keys": ["image"]}},
    {"EnsureTyped": {"keys": ["image"], "dtype": "float32", "track_meta": True}},
]


class ModelSpec(StrictModel):
    """One model version to benchmark."""

    source: str = Field(description="'classical', 'builtin:NAME', a bundle dir, or models:/NAME@ALIAS")
    name: str | None = None
    sha256: str | None = Field(None, description="pin: refuse weights with another hash")
    register_as: str | None = Field(None, description="registered model name in MLflow")
    alias: str | None = Field(None, description="alias to set on the registered version")


class MlflowSpec(StrictModel):
    tracking_uri: str | None = Field(None, description="default: SQLite store under the output folder")
    experiment: str = "sitebench"
    register_models: bool = True


class EndpointSpec(StrictModel):
    """A binary endpoint the biomarker should separate (AUC, paired DeLong between versions)."""

    column: str = Field(description="manifest column, e.g. group")
    positive: str = Field(description="the value that counts as positive, e.g. patient")
    higher_is_positive: bool = Field(True, description="false when a lower biomarker means the positive class")


class ReportSpec(StrictModel):
    """What the validation report says beyond the numbers, and its pre-specified decisions."""

    intended_use: str = Field(
        "Quantify the biomarker from the trial's T1-weighted MRI for use as a trial endpoint, across the "
        "trial's sites, scanner vendors and scanner software versions.",
        description="intended use of the model output in this trial")
    population: str = Field("Adults enrolled in the trial, scanned under the locked acquisition protocol.",
                            description="the target population and setting")
    equivalence_margin: float | None = Field(
        None, gt=0, description="pre-specified margin for per-site equivalence of the mean error, reference units")
    compare: list[tuple[str, str]] = Field(
        default_factory=list, description="pairs of model keys (name@version) compared side by side")
    comparison_margin: float | None = Field(
        None, gt=0, description="margin for the paired TOST of absolute error between two versions")
    endpoint: EndpointSpec | None = None
    qc_store: str | None = Field(None, description="database URL (or folder) of the upload-time QC gate")
    limitations: list[str] = Field(default_factory=list, description="study-specific limitations to add")


class BenchmarkSpec(StrictModel):
    name: str
    manifest: str
    models: list[ModelSpec] = Field(min_length=1)
    reference: str = Field(description="manifest column with the reference value")
    output: str = Field("gm_volume_ml", description="the model output compared with the reference")
    reference_segmentation: str | None = Field(None, description="manifest column with label-map paths")
    segmentation_label: int = 2
    strata: list[str] = Field(default_factory=lambda: list(DEFAULT_STRATA))
    transforms: list[dict[str, dict[str, Any]]] = Field(default_factory=lambda: list(DEFAULT_TRANSFORMS))
    seed: int = 0
    bootstrap: int = Field(1000, ge=0)
    results_dir: str = "results"
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)

    # where the YAML file was; relative paths start there
    base_dir: Path = Field(default=Path("."), exclude=True)

    @field_validator("transforms")
    @classmethod
    def _one_transform_per_item(cls, value: list[dict[str, dict[str, Any]]]) -> list[dict[str, dict[str, Any]]]:
        for item in value:
            if len(item) != 1:
                raise ValueError("each transform is a mapping of one MONAI transform name to its arguments")
            (name,) = item
            from monai import transforms as monai_transforms

            if not hasattr(monai_transforms, name):
                raise ValueError(f"'{name}' is not a MONAI transform")
        return value

    def path(self, relative: str) -> Path:
        candidate = Path(relative)
        return candidate if candidate.is_absolute() else (self.base_dir / candidate)

    @property
    def manifest_path(self) -> Path:
        return self.path(self.manifest)

    @property
    def results_path(self) -> Path:
        return self.path(self.results_dir)

    def fingerprint(self) -> str:
        return sha256_json(self.model_dump(mode="json"))


def load_spec(path: str | Path) -> BenchmarkSpec:
    path = Path(path)
    spec = parse_config(load_yaml(path), BenchmarkSpec, path)
    spec.base_dir = path.resolve().parent
    return spec
