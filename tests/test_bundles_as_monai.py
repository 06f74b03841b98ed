"""Any MONAI bundle gives what MONAI's own bundle workflow gives, scan for scan.

Real model-zoo configs (../shared/data/monai-bundles) with seeded random weights: our
``MonaiBundleModel.predict`` against ``monai.bundle.ConfigWorkflow`` run on the same files,
whose ``SaveImaged`` outputs are read back from disk (segmentations) or whose evaluator
output is captured (classification).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from sitebench.errors import SitebenchError
from sitebench.models.base import voxel_volume_ml
from sitebench.models.bundle import (GM_UNET_NETWORK_DEF, BundleSegmentationModel, MonaiBundleModel,
                                     bundle_files)
from sitebench.models.files import hash_files

ZOO = Path(__file__).resolve().parents[2] / "shared" / "data" / "monai-bundles"
if not ZOO.is_dir():
    ZOO = Path("/work/shared/data/monai-bundles")
BUILTIN = Path(__file__).resolve().parents[1] / "src" / "sitebench" / "models" / "bundles"

pytestmark = pytest.mark.filterwarnings("ignore")


# --------------------------------------------------------------------------- helpers (no code of ours)


def _config(bundle: Path) -> Path:
    return next(p for p in (bundle / "configs" / n for n in ("inference.json", "inference.yaml")) if p.exists())


def _copy_with_random_weights(name: str, tmp_path: Path, layout: str = "plain", seed: int = 0) -> Path:
    """The shared bundle copied, with seeded random-init weights and large_files.yml rewritten to match."""
    import torch
    from monai.bundle import ConfigParser

    bundle = tmp_path / name
    shutil.copytree(ZOO / name, bundle)
    parser = ConfigParser()
    parser.read_config(str(_config(bundle)))
    parser["bundle_root"] = str(bundle)
    torch.manual_seed(seed)
    network = parser.get_parsed_content("network_def")
    with torch.no_grad():  # random-init nets with batch norm give flat outputs; spread them so labels vary
        for module in network.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    state = network.state_dict()
    (bundle / "models").mkdir(exist_ok=True)
    torch.save({"model": state} if layout == "checkpoint" else state, bundle / "models" / "model.pt")
    _rewrite_large_files(bundle)
    return bundle


def _rewrite_large_files(bundle: Path) -> None:
    listing = yaml.safe_load((bundle / "large_files.yml").read_text())
    for entry in listing["large_files"]:
        path = bundle / entry["path"]
        if path.exists():
            entry["hash_type"] = "md5"
            entry["hash_val"] = hashlib.md5(path.read_bytes()).hexdigest()
    (bundle / "large_files.yml").write_text(yaml.safe_dump(listing))


def _volume(path: Path, shape, affine, seed: int) -> Path:
    """A small volume with a bright blob in noise (CT-like values for the spleen window)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    centre = rng.uniform(-0.3, 0.3, size=(len(shape),) + (1,) * len(shape))
    blob = (((grid - centre) ** 2).sum(0) < 0.25).astype(np.float32)
    data = (-100 + 250 * blob + rng.normal(0, 40, size=shape)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64)), str(path))
    return path


def _benchmark_input(path: Path) -> dict:
    """What the benchmark's own transforms hand a model: channel-first MetaTensor, plus the file path."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    data = Compose([LoadImaged(keys="image", image_only=True), EnsureChannelFirstd(keys="image")])(
        {"image": str(path)})
    return {**data, "image_path": str(path)}


def _monai_workflow(bundle: Path, **override):
    import ignite  # noqa: F401  (MONAI's bundle evaluator; in requirements.lock: a missing reference must fail)
    from monai.bundle import ConfigWorkflow

    meta = bundle / "configs" / "metadata.json"
    workflow = ConfigWorkflow(config_file=str(_config(bundle)), meta_file=str(meta), logging_file=False,
                              workflow_type="inference", bundle_root=str(bundle),
                              device="$torch.device('cpu')", **override)
    workflow.initialize()
    return workflow


def _saved_segmentation(out_dir: Path, image: Path) -> tuple[np.ndarray, float]:
    stem = image.name.split(".")[0]
    (saved,) = [p for p in out_dir.rglob("*.nii*") if p.name.startswith(stem)]
    img = nib.load(saved)
    labels = np.rint(np.asarray(img.dataobj)).astype(np.int32)
    return labels.reshape(labels.shape[:3]), float(abs(np.linalg.det(img.affine[:3, :3]))) / 1000.0


def _volumes_ml(labels: np.ndarray, voxel_ml: float) -> dict[int, float]:
    values, counts = np.unique(labels, return_counts=True)
    return {int(v): float(c) * voxel_ml for v, c in zip(values, counts)}


def _assert_same_segmentations(model, images, out_dir):
    for image in images:
        expected, expected_voxel_ml = _saved_segmentation(out_dir, image)
        data = _benchmark_input(image)
        prediction = model.predict(data)
        assert prediction.segmentation.shape == expected.shape == tuple(data["image"].shape[1:])
        assert len(np.unique(expected)) > 1, "random weights gave one label only: the check would be weak"
        np.testing.assert_array_equal(prediction.segmentation, expected)
        ours, theirs = _volumes_ml(prediction.segmentation, voxel_volume_ml(data)), \
            _volumes_ml(expected, expected_voxel_ml)
        assert ours.keys() == theirs.keys()
        for label in ours:
            assert ours[label] == pytest.approx(theirs[label], abs=1e-6)


# --------------------------------------------------------------------------- the three model-zoo bundles


def test_spleen_bundle_matches_monai_sliding_window_invertd_workflow(tmp_path):
    bundle = _copy_with_random_weights("spleen_ct_segmentation", tmp_path)
    data_dir = tmp_path / "scans"
    data_dir.mkdir()
    lps = [[-1.5, 0, 0, 30.0], [0, -1.5, 0, 20.0], [0, 0, 2.0, -40.0], [0, 0, 0, 1]]
    oblique = [[0, 0, 2.5, -10.0], [1.2, 0, 0, 5.0], [0, -1.2, 0, 12.0], [0, 0, 0, 1]]
    images = [_volume(data_dir / "s1.nii.gz", (48, 48, 40), lps, 1),
              _volume(data_dir / "s2.nii.gz", (44, 40, 36), oblique, 2)]
    out_dir = tmp_path / "monai_out"
    workflow = _monai_workflow(bundle, output_dir=str(out_dir), dataset_dir=str(data_dir),
                               datalist=[str(p) for p in images], **{"dataloader#num_workers": 0})
    workflow.run()
    workflow.finalize()

    model = MonaiBundleModel(bundle)
    assert model.loads_image and model.inverts
    _assert_same_segmentations(model, images, out_dir)
    card = model.card
    assert card.kind == "monai-bundle" and card.name == "Spleen CT segmentation" and card.version == "0.5.9"
    assert card.licence == "Apache License Version 2.0"
    assert "Xia, Yingda" in card.citation and "Kerfoot" in card.citation
    assert "Task09_Spleen" in card.training_data
    assert card.output_labels == {0: "background", 1: "spleen"}
    assert set(card.files) == {"configs/inference.json", "configs/metadata.json", "models/model.pt",
                               "large_files.yml"}
    assert card.files == hash_files(bundle, bundle_files(bundle))
    assert card.weights_sha256 == card.files["models/model.pt"]


def test_segmentation_template_matches_monai_workflow_with_checkpoint_layout(tmp_path):
    bundle = _copy_with_random_weights("segmentation_template", tmp_path, layout="checkpoint", seed=3)
    data_dir = tmp_path / "scans"
    data_dir.mkdir()
    affine = [[0.9, 0, 0, -5.0], [0, -1.1, 0, 7.0], [0, 0, 1.7, 3.0], [0, 0, 0, 1]]
    images = [_volume(data_dir / f"t{i}.nii.gz", (32, 40, 24), affine, 10 + i) for i in range(2)]
    out_dir = tmp_path / "monai_out"
    workflow = _monai_workflow(bundle, output_dir=str(out_dir), dataset_dir=str(data_dir))
    workflow.run()
    workflow.finalize()

    model = BundleSegmentationModel(bundle)  # the old name is the same class
    _assert_same_segmentations(model, images, out_dir)
    assert model.card.output_labels == {0: "background", 1: "category 1", 2: "category 2", 3: "category 3"}
    assert model.card.licence == "MIT License"
    assert "configs/inference.yaml" in model.card.files


def test_classification_template_matches_monai_evaluator_output(tmp_path):
    import ignite  # noqa: F401  (MONAI's bundle evaluator; in requirements.lock: a missing reference must fail)
    from ignite.engine import Events

    bundle = _copy_with_random_weights("classification_template", tmp_path, seed=5)
    data_dir = tmp_path / "scans"
    data_dir.mkdir()
    affine = np.diag([0.8, 0.8, 1.0, 1.0])
    images = [_volume(data_dir / f"c{i}.nii.gz", (64, 64), affine, 20 + i) for i in range(3)]
    workflow = _monai_workflow(bundle, test_dict=[{"image": str(p), "label": 0} for p in images])
    evaluator = workflow.parser.get_parsed_content("evaluator")
    theirs_pred: list[np.ndarray] = []
    theirs_logits: list[np.ndarray] = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: theirs_pred.extend(
        np.asarray(o["pred"].detach().cpu()) for o in engine.state.output))
    hook = evaluator.network.register_forward_hook(
        lambda module, args, out: theirs_logits.append(out.detach().cpu().numpy()[0].copy()))
    workflow.run()
    hook.remove()
    assert len(theirs_pred) == len(images)

    model = MonaiBundleModel(bundle)
    ours_logits: list[np.ndarray] = []
    model.network.register_forward_hook(lambda module, args, out: ours_logits.append(
        out.detach().cpu().numpy()[0].copy()))
    for image, pred, logits in zip(images, theirs_pred, theirs_logits):
        prediction = model.predict(_benchmark_input(image))
        assert prediction.segmentation is None
        np.testing.assert_allclose(prediction.arrays["pred"], pred.reshape(-1), atol=1e-6)
        np.testing.assert_allclose(ours_logits[-1], logits, atol=1e-6)
    assert model.card.output_labels == {}
    assert model.card.outputs == ("pred",)


def test_bundle_scripts_are_imported_and_hashed_as_monai_does(tmp_path):
    bundle = _copy_with_random_weights("segmentation_template", tmp_path, seed=4)
    (bundle / "scripts").mkdir()
    (bundle / "scripts" / "__init__.py").write_text("")
    (bundle / "scripts" / "intensity.py").write_text(
        "from monai.transforms import MapTransform\n\n\n"
        "class Squared(MapTransform):\n"
        "    def __call__(self, data):\n"
        "        d = dict(data)\n"
        "        for key in self.key_iterator(d):\n"
        "            d[key] = d[key] ** 2\n"
        "        return d\n")
    config = yaml.safe_load((bundle / "configs" / "inference.yaml").read_text())
    config["transforms"].append({"_target_": "scripts.intensity.Squared", "keys": "@image"})
    (bundle / "configs" / "inference.yaml").write_text(yaml.safe_dump(config))
    data_dir = tmp_path / "scans"
    data_dir.mkdir()
    images = [_volume(data_dir / "x.nii.gz", (24, 24, 16), np.diag([1.2, 1.2, 2.0, 1.0]), 30)]
    out_dir = tmp_path / "monai_out"
    workflow = _monai_workflow(bundle, output_dir=str(out_dir), dataset_dir=str(data_dir))
    workflow.run()

    model = MonaiBundleModel(bundle)
    assert "scripts/intensity.py" in model.card.files and "scripts/__init__.py" in model.card.files
    _assert_same_segmentations(model, images, out_dir)


def test_torchscript_bundle_without_network_def_gives_the_same_segmentation(tmp_path):
    import torch

    bundle = _copy_with_random_weights("segmentation_template", tmp_path, seed=6)
    data_dir = tmp_path / "scans"
    data_dir.mkdir()
    image = _volume(data_dir / "ts.nii.gz", (24, 32, 16), np.diag([1.0, 1.3, 2.0, 1.0]), 40)
    expected = MonaiBundleModel(bundle).predict(_benchmark_input(image)).segmentation
    assert len(np.unique(expected)) > 1

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.yaml"))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    torch.jit.save(torch.jit.script(network.eval()), str(bundle / "models" / "model.ts"))
    (bundle / "models" / "model.pt").unlink()
    config = yaml.safe_load((bundle / "configs" / "inference.yaml").read_text())
    del config["network_def"]
    config["network"] = "$None"
    (bundle / "configs" / "inference.yaml").write_text(yaml.safe_dump(config))

    model = MonaiBundleModel(bundle)
    assert "models/model.ts" in model.card.files and "models/model.pt" not in model.card.files
    assert model.card.weights_sha256 == model.card.files["models/model.ts"]
    np.testing.assert_array_equal(model.predict(_benchmark_input(image)).segmentation, expected)


def test_a_component_that_cannot_be_built_is_a_one_line_error(tmp_path):
    bundle = _copy_with_random_weights("segmentation_template", tmp_path)
    path = bundle / "configs" / "inference.yaml"
    config = yaml.safe_load(path.read_text())
    config["inferer"] = {"_target_": "SlidingWindowInferer", "no_such_argument": 1}
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SitebenchError) as caught:
        MonaiBundleModel(bundle)
    text = str(caught.value)
    assert text.startswith(f"{path}: cannot build 'inferer'") and "no_such_argument" in text and "\n" not in text


# --------------------------------------------------------------------------- refusals, each naming the file


def test_config_without_network_def_is_refused_naming_the_config(tmp_path):
    bundle = _copy_with_random_weights("segmentation_template", tmp_path)
    path = bundle / "configs" / "inference.yaml"
    config = yaml.safe_load(path.read_text())
    del config["network_def"]
    config["network"] = "$None"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SitebenchError) as caught:
        MonaiBundleModel(bundle)
    text = str(caught.value)
    assert str(path) in text and "network_def" in text and "\n" not in text


def test_weights_changed_after_hashing_are_refused_before_loading(tmp_path):
    bundle = _copy_with_random_weights("segmentation_template", tmp_path)
    checked = hash_files(bundle, bundle_files(bundle))
    MonaiBundleModel(bundle, expected_files=checked)  # unchanged: loads
    weights = bundle / "models" / "model.pt"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    # large_files.yml now disagrees too, but the caller's check comes first: before anything is read
    with pytest.raises(SitebenchError, match=r"model\.pt: SHA-256 is .*changed since it was checked"):
        MonaiBundleModel(bundle, expected_files=checked)


def test_large_files_md5_mismatch_is_refused_naming_the_file(tmp_path):
    bundle = _copy_with_random_weights("spleen_ct_segmentation", tmp_path)
    shutil.copy(ZOO / "spleen_ct_segmentation" / "large_files.yml", bundle / "large_files.yml")  # real md5
    with pytest.raises(SitebenchError) as caught:
        MonaiBundleModel(bundle)
    text = str(caught.value)
    assert str(bundle / "models" / "model.pt") in text and "large_files.yml hash differs" in text


def test_missing_and_corrupt_weights_are_one_line_errors(tmp_path):
    bundle = _copy_with_random_weights("segmentation_template", tmp_path)
    (bundle / "large_files.yml").unlink()
    weights = bundle / "models" / "model.pt"
    weights.write_bytes(b"not a torch file")
    with pytest.raises(SitebenchError, match=r"model\.pt: cannot load model weights"):
        MonaiBundleModel(bundle)
    weights.unlink()
    with pytest.raises(SitebenchError, match=r"model\.pt: model weights missing"):
        MonaiBundleModel(bundle)


# --------------------------------------------------------------------------- the built-in bundles, unchanged


@pytest.mark.parametrize("version", ["gm_unet_v1", "gm_unet_v2"])
def test_builtin_bundles_give_the_plain_torch_gm_volume(tmp_path, version):
    import torch
    from monai.data import MetaTensor
    from monai.networks.nets import UNet
    from monai.transforms import DivisiblePad, ScaleIntensityRangePercentiles

    bundle = BUILTIN / version
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    rng = np.random.default_rng(7)
    array = rng.normal(100, 30, size=(1, 45, 50, 38)).astype(np.float32)
    array[0, 10:30, 12:40, 8:30] += 80
    affine = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.2, 0], [0, 0, 0, 1]], dtype=torch.float64)
    data = {"image": MetaTensor(torch.from_numpy(array), affine=affine)}

    network = UNet(**{k: v for k, v in GM_UNET_NETWORK_DEF.items() if k != "_target_"})
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    network.eval()
    scaled = ScaleIntensityRangePercentiles(lower=1, upper=99, b_min=0.0, b_max=1.0, clip=False)(array)
    padded = DivisiblePad(k=4, method="end")(scaled)
    with torch.inference_mode():
        logits = network(torch.as_tensor(np.asarray(padded), dtype=torch.float32)[None])
    labels = logits.argmax(1)[0].numpy()[:45, :50, :38]
    expected_ml = float((labels == meta["sitebench"]["gm_channel"]).sum()) * 1.2 / 1000

    model = MonaiBundleModel(bundle)
    prediction = model.predict(data)
    assert prediction.values["gm_volume_ml"] == pytest.approx(expected_ml, abs=1e-9)
    np.testing.assert_array_equal(prediction.segmentation, labels)
    assert model.card.output_labels == {0: "other", 1: "grey matter"}
    assert model.card.weights_sha256 == meta["sitebench"]["weights_sha256"]
    assert set(model.card.files) == {"configs/inference.json", "configs/metadata.json", "models/model.pt"}
