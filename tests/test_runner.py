"""The benchmark runner on real simulated scans: MONAI path, resume, executors, bad input."""

from __future__ import annotations

import gzip
import shutil

import pandas as pd
import pytest
import yaml

from sitebench.benchmarks import load_spec, run_benchmark
from sitebench.datasets import manifest as mf
from sitebench.errors import SitebenchError
from sitebench.provenance import sha256_file


def _write_spec(path, **overrides):
    spec = {"name": "t", "manifest": "manifest.csv", "reference": "gm_volume_ml",
            "reference_segmentation": "label_path", "models": [{"source": "classical"}], "bootstrap": 50}
    spec.update(overrides)
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def trial_copy(small_trial, tmp_path):
    """A private copy of the small trial, so tests may damage it."""
    shutil.copytree(small_trial.out_dir, tmp_path / "trial")
    return tmp_path / "trial"


def test_unknown_spec_key_names_file_and_key(trial_copy):
    path = _write_spec(trial_copy / "spec.yaml", modelz=[])
    with pytest.raises(SitebenchError, match=r"spec\.yaml: unknown key 'modelz'"):
        load_spec(path)


def test_unknown_transform_is_refused(trial_copy):
    path = _write_spec(trial_copy / "spec.yaml", transforms=[{"LoadImaged": {"keys": ["image"]}},
                                                             {"NoSuchTransformd": {}}])
    with pytest.raises(SitebenchError, match="NoSuchTransformd"):
        load_spec(path)


def test_scores_every_scan_and_resumes(trial_copy):
    spec = load_spec(_write_spec(trial_copy / "spec.yaml"))
    first = run_benchmark(spec, workers=1, progress=False)
    assert first.computed == 24 and first.reused == 0
    assert set(first.predictions.scan_id) == set(first.manifest.table[mf.SCAN_ID])
    assert first.predictions.dice.between(0, 1).all()
    second = run_benchmark(spec, workers=1, progress=False)
    assert second.computed == 0 and second.reused == 24
    pd.testing.assert_frame_equal(first.predictions, second.predictions)
    assert len(pd.read_csv(first.predictions_path)) == 24  # nothing appended twice


def test_a_changed_image_is_rescored(trial_copy):
    spec = load_spec(_write_spec(trial_copy / "spec.yaml"))
    run_benchmark(spec, workers=1, progress=False)
    table = mf.read_table(trial_copy / "manifest.csv")
    source = trial_copy / table.image_path[1]
    shutil.copy(trial_copy / table.image_path[0], source)  # a re-upload with different content
    table.loc[1, mf.IMAGE_SHA256] = sha256_file(source)
    mf.write_manifest(table, trial_copy / "manifest.csv")
    again = run_benchmark(spec, workers=1, progress=False)
    assert again.computed == 1 and again.reused == 23


@pytest.mark.slow
def test_process_pool_and_dask_give_the_same_predictions(trial_copy):
    from distributed import LocalCluster

    table = mf.read_table(trial_copy / "manifest.csv")  # two scans a site (every vendor) are enough to compare schedulers
    mf.write_manifest(table.groupby("site", sort=True).head(2), trial_copy / "manifest.csv")
    spec = load_spec(_write_spec(trial_copy / "spec.yaml", models=[{"source": "classical"},
                                                                   {"source": "builtin:gm_unet_v2"}]))
    inline = run_benchmark(spec, workers=1, progress=False).predictions
    (trial_copy / "results" / "predictions.csv").unlink()
    pool = run_benchmark(spec, workers=2, progress=False).predictions
    (trial_copy / "results" / "predictions.csv").unlink()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        dask = run_benchmark(spec, scheduler=cluster.scheduler_address, progress=False).predictions
    columns = ["scan_id", "model_key", "weights_sha256", "prediction", "dice"]
    pd.testing.assert_frame_equal(inline[columns], pool[columns])
    pd.testing.assert_frame_equal(inline[columns], dask[columns])
    assert len(inline) == 2 * 12  # two models x two scans of each of the six sites


def test_corrupt_nifti_stops_with_its_name_and_keeps_finished_work(trial_copy):
    table = mf.read_table(trial_copy / "manifest.csv")
    victim = trial_copy / table.image_path.iloc[-1]
    with gzip.open(victim, "rb") as handle:
        header = handle.read(400)
    with gzip.open(victim, "wb") as handle:  # a valid gzip holding a truncated NIfTI
        handle.write(header)
    table.loc[table.index[-1], mf.IMAGE_SHA256] = sha256_file(victim)  # the upload itself was corrupt
    mf.write_manifest(table, trial_copy / "manifest.csv")
    spec = load_spec(_write_spec(trial_copy / "spec.yaml"))
    with pytest.raises(SitebenchError) as error:
        run_benchmark(spec, workers=1, progress=False)
    assert victim.name in str(error.value) and "not a readable NIfTI" in str(error.value)
    kept = pd.read_csv(trial_copy / "results" / "predictions.csv")
    assert len(kept) >= 16 and victim.name.split("_T1w")[0] not in set(kept.scan_id)
