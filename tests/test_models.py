"""Models: one interface; shipped weights are checked by hash; MLflow registry round trip."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from sitebench.errors import SitebenchError
from sitebench.models.registry import builtin_bundles, load_model, register_model_version, resolve_model
from sitebench.provenance import sha256_file


def _load_scan(path: str):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    return Compose([LoadImaged(keys="image", image_only=True), EnsureChannelFirstd(keys="image")])({"image": path})


def _truth_mask(path, label=2):
    import nibabel as nib

    return np.asarray(nib.load(path).dataobj) == label


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def siemens_scan(small_trial):
    row = small_trial.manifest[(small_trial.manifest.vendor == "SIEMENS")
                               & (small_trial.manifest.slice_thickness_mm == 2.0)].iloc[0]
    return small_trial.out_dir / row.image_path, small_trial.out_dir / row.label_path, row.gm_volume_ml


def test_builtin_versions_ship_with_their_hashes():
    assert builtin_bundles() == ["gm_unet_v1", "gm_unet_v2"]
    for name in builtin_bundles():
        model = load_model(f"builtin:{name}")
        bundle = resolve_model(f"builtin:{name}").location
        assert model.card.weights_sha256 == sha256_file(f"{bundle}/models/model.pt")
        assert (shutil.disk_usage(bundle) and
                sum(p.stat().st_size for p in __import__("pathlib").Path(bundle).rglob("*")) < 5_000_000)
    v1, v2 = (load_model(f"builtin:{n}").card for n in builtin_bundles())
    assert v1.training.augmentation is False and v2.training.augmentation is True
    assert v1.training.vendor == v2.training.vendor == "SIEMENS"


@pytest.mark.parametrize("reference", ["classical", "builtin:gm_unet_v1"])
def test_models_segment_grey_matter_on_a_training_vendor_scan(siemens_scan, reference):
    image, label, true_volume = siemens_scan
    prediction = load_model(reference).predict(_load_scan(str(image)))
    assert prediction.segmentation.shape == _truth_mask(label).shape
    assert _dice(prediction.segmentation, _truth_mask(label)) > 0.75
    assert prediction.values["gm_volume_ml"] == pytest.approx(true_volume, rel=0.2)


def test_changed_weights_are_refused(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(resolve_model("builtin:gm_unet_v1").location, bundle)
    load_model(str(bundle))  # a plain MONAI bundle directory loads
    weights = bundle / "models" / "model.pt"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SitebenchError, match=r"model\.pt: SHA-256 of model weights"):
        load_model(str(bundle))


def test_unknown_model_reference_is_a_clear_error(tmp_path):
    with pytest.raises(SitebenchError, match="not a model reference"):
        resolve_model(str(tmp_path))
    with pytest.raises(SitebenchError, match="unknown built-in model"):
        resolve_model("builtin:nope")


def test_registering_into_a_local_store_keeps_its_artifacts_beside_the_database(tmp_path, monkeypatch):
    work = tmp_path / "working-folder"
    work.mkdir()
    monkeypatch.chdir(work)  # MLflow's default would be ./mlruns here
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    v1 = load_model("builtin:gm_unet_v1")
    assert register_model_version(v1, resolve_model("builtin:gm_unet_v1").location, "gm-unet", None, uri) == "1"
    assert not list(work.iterdir())
    assert next((store / "mlartifacts" / "sitebench-registry").rglob("model.pt")).is_file()


def test_mlflow_registry_round_trip_and_tamper_detection(tmp_path, siemens_scan):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("sitebench-registry", artifact_location=(tmp_path / "artifacts").as_uri())
    v1 = load_model("builtin:gm_unet_v1")
    version = register_model_version(v1, resolve_model("builtin:gm_unet_v1").location, "gm-unet", "candidate", uri)
    again = register_model_version(v1, resolve_model("builtin:gm_unet_v1").location, "gm-unet", "candidate", uri)
    assert version == again == "1"  # same weights: no duplicate version
    resolved = resolve_model("models:/gm-unet@candidate", tracking_uri=uri)
    assert resolved.expected_sha256 == v1.card.weights_sha256
    loaded = load_model(resolved)
    scan = _load_scan(str(siemens_scan[0]))
    assert loaded.predict(scan).values == v1.predict(scan).values
    # a registered version's artifacts can be overwritten in place: the recorded hash catches it
    stored = next((tmp_path / "artifacts").rglob("model.pt"))
    stored.write_bytes(stored.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(SitebenchError, match="SHA-256 of model weights"):
        load_model(resolve_model("models:/gm-unet/1", tracking_uri=uri))
