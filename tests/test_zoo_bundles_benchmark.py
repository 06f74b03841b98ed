"""The three shared MONAI model-zoo bundle configs through `sitebench benchmark run`, as a user runs them.

Each bundle gets seeded random weights made here (the published weights cannot be reached), scores
real simulated scans through the command line, and its label volumes (or class outputs) in
``predictions.csv`` must equal, to 1e-6, what MONAI's own bundle workflow
(``monai.bundle.ConfigWorkflow``, same weights, same files) gives.
"""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import run_cli
from tests.test_bundles_as_monai import _copy_with_random_weights, _monai_workflow, _saved_segmentation, _volumes_ml

pytestmark = pytest.mark.slow


def _run(tmp_path, manifest, biomarkers, bundle, subsample=None):
    model = {"source": str(bundle)}
    if subsample:
        model["subsample"] = subsample
    spec = {"name": "zoo", "manifest": str(manifest), "biomarkers": biomarkers, "models": [model],
            "bootstrap": 20, "results_dir": str(tmp_path / "results"), "mlflow": {"register_models": False}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    done = run_cli("benchmark", "run", path, "--workers", "1", "--no-progress", "--no-report", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return pd.read_csv(tmp_path / "results" / "predictions.csv", dtype={"scan_id": str})


def _derived_manifest(trial, tmp_path, make_array):
    """The trial's manifest with each image replaced by ``make_array(volume)`` (a crop, a slice)."""
    folder = tmp_path / "derived"
    folder.mkdir()
    table = trial.manifest.copy()
    paths, hashes = [], []
    for row in table.itertuples():
        image = nib.load(trial.out_dir / row.image_path)
        path = folder / f"{row.scan_id}.nii.gz"
        nib.save(nib.Nifti1Image(make_array(np.asarray(image.dataobj, dtype=np.float32)), image.affine), str(path))
        paths.append(str(path))
        hashes.append(hashlib.sha256(path.read_bytes()).hexdigest())
    table["image_path"], table["image_sha256"] = paths, hashes
    table = table.drop(columns=["label_path", "label_sha256"])
    manifest = tmp_path / "manifest.csv"
    table.to_csv(manifest, index=False)
    return manifest, dict(zip(table["scan_id"], paths))


def _images(trial, predictions):
    table = trial.manifest.set_index("scan_id")
    return {scan: trial.out_dir / table.loc[scan, "image_path"] for scan in predictions["scan_id"].unique()}


@pytest.mark.parametrize("name, labels, subsample", [
    ("spleen_ct_segmentation", [1], {"per": ["vendor"], "n": 1}),  # a 96³ sliding window: three scans
    ("segmentation_template", [1, 2, 3], {"per": ["site"], "n": 1}),
])
def test_segmentation_bundle_volumes_equal_monai_workflow(small_trial, tmp_path, name, labels, subsample):
    bundle = _copy_with_random_weights(name, tmp_path, layout="checkpoint" if name == "segmentation_template"
                                       else "plain", seed=11)
    biomarkers = [{"name": f"label{k}_ml", "kind": "label_volume", "labels": [k],
                   "reference": {"column": "gm_volume_ml"}} for k in labels]
    if name == "segmentation_template":  # a plain U-Net with three stride-2 levels: sides divisible by 8 (48 slices: the thick-slice site has 53)
        manifest, paths = _derived_manifest(small_trial, tmp_path, lambda v: v[:72, :96, :48])
    else:
        manifest, paths = small_trial.manifest_path, None
    predictions = _run(tmp_path, manifest, biomarkers, bundle, subsample)
    images = _images(small_trial, predictions) if paths is None else \
        {scan: paths[scan] for scan in predictions["scan_id"].unique()}
    from pathlib import Path
    images = {scan: Path(p) for scan, p in images.items()}
    out_dir = tmp_path / "monai_out"
    data = {"datalist" if name == "spleen_ct_segmentation" else "data_list": [str(p) for p in images.values()]}
    workflow = _monai_workflow(bundle, output_dir=str(out_dir), dataset_dir=str(tmp_path),
                               **({"dataloader#num_workers": 0} if name == "spleen_ct_segmentation" else {}), **data)
    workflow.run()
    workflow.finalize()
    checked = 0
    for scan, image in images.items():
        expected, voxel_ml = _saved_segmentation(out_dir, image)
        volumes = _volumes_ml(expected, voxel_ml)
        for k in labels:
            row = predictions[(predictions["scan_id"] == scan) & (predictions["biomarker"] == f"label{k}_ml")]
            assert float(row["prediction"].iloc[0]) == pytest.approx(volumes.get(k, 0.0), abs=1e-6)
            checked += 1
    assert checked == len(images) * len(labels) and any(v > 0 for v in predictions["prediction"])


def test_classification_bundle_outputs_equal_monai_evaluator(small_trial, tmp_path):
    """The 2-D DenseNet121 template on the mid-axial slice of every simulated scan."""
    from ignite.engine import Events

    bundle = _copy_with_random_weights("classification_template", tmp_path, seed=13)
    manifest, by_scan = _derived_manifest(small_trial, tmp_path, lambda v: v[:, :, v.shape[2] // 2])
    biomarkers = [{"name": "p_class1", "kind": "class_probability", "output": "pred", "index": 1,
                   "reference": {"column": "group", "positive": "patient"}}]
    predictions = _run(tmp_path, manifest, biomarkers, bundle, {"per": ["site"], "n": 2})
    by_scan = {scan: by_scan[scan] for scan in predictions["scan_id"]}
    paths = list(by_scan.values())
    workflow = _monai_workflow(bundle, test_dict=[{"image": p, "label": 0} for p in paths])
    evaluator = workflow.parser.get_parsed_content("evaluator")
    theirs: list[np.ndarray] = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: theirs.extend(
        np.asarray(o["pred"].detach().cpu()).reshape(-1) for o in engine.state.output))
    workflow.run()
    assert len(theirs) == len(paths)
    ours = predictions.set_index("scan_id")["prediction"]
    for scan, pred in zip(by_scan, theirs):
        assert float(ours[scan]) == pytest.approx(float(pred[1]), abs=1e-6)
