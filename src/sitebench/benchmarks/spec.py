"""The benchmark spec: a YAML file validated into typed objects (unknown keys are errors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from sitebench.config import StrictModel, load_yaml, parse_config
from sitebench.datasets.manifest import DEFAULT_STRATA, SCANNER_ID, SITE, SOFTWARE_VERSION
from sitebench.models.biomarkers import BiomarkerSpec, ReferenceSpec, check_declarations
from sitebench.provenance import sha256_json

DEFAULT_TRANSFORMS: list[dict[str, dict[str, Any]]] = [
    {"LoadImaged": {"keys": ["image"], "image_only": True}},
    {"EnsureChannelFirstd": {"keys": ["image"]}},
    {"EnsureTyped": {"keys": ["image"], "dtype": "float32", "track_meta": True}},
]


class SubsampleSpec(StrictModel):
    """A pre-specified, seeded subsample of scans for a model too slow to run on every scan.

    ``n`` scans are drawn at random (with ``seed``) from each combination of the ``per``
    columns, so every site, scanner and software version is still represented; the draw
    depends only on the manifest and the seed, so a rerun and an auditor draw the same scans.
    """

    per: list[str] = Field(default_factory=lambda: [SITE, SCANNER_ID, SOFTWARE_VERSION])
    n: int = Field(2, ge=1, description="scans drawn from each group")
    seed: int = 0


class ModelSpec(StrictModel):
    """One model version to benchmark."""

    source: str = Field(description="'classical', 'builtin:NAME', a MONAI bundle dir, a TorchScript file, "
                                    "entrypoint:package.module:factory, models:/NAME@ALIAS, models:/NAME/N "
                                    "or runs:/RUN_ID/PATH")
    name: str | None = None
    subsample: SubsampleSpec | None = Field(None, description="score a seeded stratified subsample only")
    biomarkers: list[str] | None = Field(None, description="the declared biomarkers this model gives "
                                                           "(default: all of them)")
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
    failed_manifest: str | None = Field(
        None, description="manifest of the series the QC gate failed (sitebench qc manifest --include-failed), "
                          "scored by the models that score every scan to show the error with and without them")
    limitations: list[str] = Field(default_factory=list, description="study-specific limitations to add")


class BenchmarkSpec(StrictModel):
    name: str
    manifest: str
    models: list[ModelSpec] = Field(min_length=1)
    biomarkers: list[BiomarkerSpec] = Field(default_factory=list, description="the biomarkers to validate")
    reference: str | None = Field(None, description="without biomarkers: manifest column with the reference value")
    output: str = Field("gm_volume_ml", description="without biomarkers: the model output compared with it")
    unit: str = Field("ml", description="without biomarkers: the unit of that output")
    reference_segmentation: str | None = Field(None, description="manifest column with reference label-map paths")
    segmentation_label: int = Field(2, description="without biomarkers: the reference label of the segmentation")
    strata: list[str] = Field(default_factory=lambda: list(DEFAULT_STRATA))
    transforms: list[dict[str, dict[str, Any]]] = Field(default_factory=lambda: list(DEFAULT_TRANSFORMS))
    seed: int = 0
    bootstrap: int = Field(1000, ge=0)
    results_dir: str = "results"
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)

    # where the YAML file was; relative paths start there
    base_dir: Path = Field(default=Path("."), exclude=True)
    source_path: Path | None = Field(default=None, exclude=True)  # the YAML file, for error messages

    @model_validator(mode="after")
    def _biomarkers_declared(self) -> "BenchmarkSpec":
        if not self.biomarkers and not self.reference:
            raise ValueError("declare 'biomarkers', or name the manifest column with the reference value in "
                             "'reference'")
        check_declarations(self.biomarkers)
        declared = {m.name: m for m in self.declared_biomarkers}
        for i, model in enumerate(self.models):
            for name in model.biomarkers or []:
                if name not in declared:
                    raise ValueError(f"models[{i}].biomarkers: '{name}' is not a declared biomarker "
                                     f"(declared: {', '.join(declared)})")
                marker = declared[name]
                for part in (marker.numerator, marker.denominator):
                    if part and part not in model.biomarkers:
                        raise ValueError(f"models[{i}].biomarkers: '{name}' is derived from '{part}', which this "
                                         "model does not give")
        return self

    def model_biomarkers(self, model: ModelSpec) -> list[BiomarkerSpec]:
        """The declared biomarkers one model gives, in declaration order."""
        wanted = set(model.biomarkers) if model.biomarkers is not None else None
        return [m for m in self.declared_biomarkers if wanted is None or m.name in wanted]

    @property
    def declared_biomarkers(self) -> list[BiomarkerSpec]:
        """The biomarkers to validate; a spec without a ``biomarkers`` list declares one from
        ``output``/``reference`` (the form every spec had before biomarkers were declared)."""
        if self.biomarkers:
            return list(self.biomarkers)
        labels = [self.segmentation_label] if self.reference_segmentation else None
        return [BiomarkerSpec(name=self.output, kind="regression", output=self.output, unit=self.unit,
                              reference=ReferenceSpec(column=self.reference, labels=labels))]

    @property
    def reference_columns(self) -> list[str]:
        """Manifest columns the biomarkers take their reference from."""
        return [m.reference.column for m in self.declared_biomarkers if m.reference and m.reference.column]

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
    spec.source_path = path
    return spec
