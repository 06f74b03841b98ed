"""Model sources besides MONAI bundles: TorchScript, MLflow models (pyfunc and pytorch), Python entry points.

One small seeded network of each kind (a 3-class segmenter on the input grid, a 2-number regressor)
is saved every way a team may hand it over; on the same real simulated scans, every source gives
the same prediction as calling the network directly. A real SQLite MLflow store under a temp folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sitebench.errors import SitebenchError
from sitebench.models.registry import load_model, register_model_version, resolve_model

NETS = '''
import torch


class SegNet(torch.nn.Module):
    """Three output channels on the input grid."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv3d(4, 3, 1)

    def forward(self, x):
        # learned-looking part plus an intensity prior, so dark, middle and bright voxels get labels 0, 1, 2
        prior = torch.cat([1.0 - 3.0 * x, torch.zeros_like(x), 3.0 * x - 2.0], dim=1)
        return self.conv2(torch.relu(self.conv1(x))) + 4.0 * prior


class RegNet(torch.nn.Module):
    """Global-pool regressor: two numbers per scan."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 4, 3, padding=1, stride=2)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3, 4)))


def build(kind, weights=None):
    torch.manual_seed(1234)
    net = SegNet() if kind == "seg" else RegNet()
    if weights is not None:
        net.load_state_dict(torch.load(weights, weights_only=True))
    return net.eval()
'''

PYFUNC = '''
import mlflow.pyfunc
import torch

from .nets import build


class Wrapper(mlflow.pyfunc.PythonModel):
    def __init__(self, kind):
        self.kind = kind

    def load_context(self, context):
        self.net = build(self.kind, context.artifacts["weights"])

    def predict(self, context, model_input, params=None):
        with torch.inference_mode():
            return self.net(torch.as_tensor(model_input)).numpy()
'''

ENTRY = '''
from pathlib import Path

import torch
from monai.transforms import ScaleIntensity

from sitebench.models.base import prediction_from_output

from .nets import build

__version__ = "0.3"
KIND = "{kind}"


class Model:
    name = "sbnet-{kind}"
    version = "1.0"
    licence = "MIT"
    citation = "Test et al. 2026"
    biomarkers = ["{kind}_marker"]

    def __init__(self):
        self.net = build(KIND, Path(__file__).with_name("weights.pt"))

    def predict(self, data):
        image = torch.as_tensor(ScaleIntensity()(data["image"]))
        with torch.inference_mode():
            out = self.net(image[None])
        return prediction_from_output(torch.softmax(out, 1)[0] if KIND == "seg" else out[0])


def factory():
    return Model()
'''


def card_yaml(kind: str, name: str) -> str:
    post = "postprocessing:\n  - Activationsd: {keys: pred, softmax: true}\n" if kind == "seg" else ""
    labels = "output_labels: {0: background, 1: grey, 2: white}\n" if kind == "seg" else ""
    return (f"name: {name}\nversion: '1.0'\nlicence: MIT\ncitation: Test et al. 2026\nbiomarkers: [{kind}_marker]\n"
            f"training_data: seeded random weights, no training\n{labels}"
            f"preprocessing:\n  - ScaleIntensityd: {{keys: image}}\n{post}")


@pytest.fixture(scope="module")
def scans(small_trial):
    """Three real simulated scans through the benchmark's default transforms, with their paths."""
    from monai import transforms as T

    from sitebench.benchmarks.spec import DEFAULT_TRANSFORMS

    load = T.Compose([getattr(T, name)(**args) for item in DEFAULT_TRANSFORMS for name, args in item.items()])
    rows = small_trial.manifest.iloc[[0, 5, 10]]
    out = []
    for rel in rows.image_path:
        path = str(small_trial.out_dir / rel)
        out.append({**load({"image": path}), "image_path": path})
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Both networks saved as TorchScript, MLflow pyfunc and pytorch models, and entry-point packages."""
    import os

    import mlflow
    import mlflow.pyfunc
    import mlflow.pytorch
    import torch

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    root = tmp_path_factory.mktemp("sources")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # an earlier test in this process may have pointed the registry elsewhere
    experiment = mlflow.create_experiment("sources", artifact_location=(root / "artifacts").as_uri())
    client = mlflow.MlflowClient(uri, uri)
    made = {"uri": uri, "root": root}
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root / "pkgs"))
        for kind in ("seg", "reg"):
            package = root / "pkgs" / f"sbnet_{kind}"
            package.mkdir(parents=True)
            (package / "nets.py").write_text(NETS)
            (package / "pyfunc_model.py").write_text(PYFUNC)
            (package / "__init__.py").write_text(ENTRY.format(kind=kind))
            nets = __import__(f"sbnet_{kind}.nets", fromlist=["build"])
            net = nets.build(kind)
            torch.save(net.state_dict(), package / "weights.pt")
            ts = root / f"ts_{kind}"
            ts.mkdir()
            torch.jit.script(net).save(str(ts / "net.ts"))
            (ts / "net.ts.yaml").write_text(card_yaml(kind, f"{kind}-ts"))
            config = root / f"cfg_{kind}" / "sitebench.yaml"
            config.parent.mkdir()
            config.write_text(card_yaml(kind, f"{kind}-mlflow"))
            wrapper = __import__(f"sbnet_{kind}.pyfunc_model", fromlist=["Wrapper"]).Wrapper
            with mlflow.start_run(experiment_id=experiment) as run:
                mlflow.pyfunc.log_model(name="model", python_model=wrapper(kind), pip_requirements=[],
                                        artifacts={"weights": str(package / "weights.pt"), "sitebench": str(config)},
                                        registered_model_name=f"{kind}-pyfunc")
            pyfunc_run = run.info.run_id
            with mlflow.start_run(experiment_id=experiment) as run:
                mlflow.pytorch.log_model(net, name="model", serialization_format="pickle", pip_requirements=[],
                                         extra_files=[str(config)], registered_model_name=f"{kind}-torch")
            torch_run = run.info.run_id
            client.set_registered_model_alias(f"{kind}-pyfunc", "candidate", "1")
            client.set_registered_model_alias(f"{kind}-torch", "candidate", "1")
            scripted = load_model(str(ts / "net.ts"))
            register_model_version(scripted, resolve_model(str(ts / "net.ts")).location, f"{kind}-ts",
                                   "candidate", uri)
            made[kind] = {"net": net, "package": package, "ts": ts / "net.ts", "refs": {
                str(ts / "net.ts"): "torchscript",
                f"models:/{kind}-ts@candidate": "torchscript",
                f"models:/{kind}-pyfunc@candidate": "mlflow-pyfunc",
                f"models:/{kind}-pyfunc/1": "mlflow-pyfunc",
                f"runs:/{pyfunc_run}/model": "mlflow-pyfunc",
                f"models:/{kind}-torch@candidate": "mlflow-pytorch",
                f"models:/{kind}-torch/1": "mlflow-pytorch",
                f"runs:/{torch_run}/model": "mlflow-pytorch",
                f"entrypoint:sbnet_{kind}:factory": "entrypoint",
                f"sbnet_{kind}:factory": "entrypoint",
            }}
        made["patch"] = patch
        yield made


def _direct(kind, net, data):
    """The network called by hand: the card's preprocessing, then the raw module, then its postprocessing."""
    import torch
    from monai.transforms import ScaleIntensity

    from sitebench.models.base import prediction_from_output

    image = torch.as_tensor(ScaleIntensity()(data["image"]))
    with torch.inference_mode():
        out = net(image[None])
    return prediction_from_output(torch.softmax(out, 1)[0] if kind == "seg" else out[0])


@pytest.mark.parametrize("kind", ["seg", "reg"])
def test_four_sources_one_network_agree(sources, scans, kind):
    built = sources[kind]
    expected = [_direct(kind, built["net"], data) for data in scans]
    if kind == "seg":
        assert expected[0].segmentation.shape == tuple(scans[0]["image"].shape[1:])
        assert set(np.unique(np.concatenate([e.segmentation.ravel() for e in expected]))) == {0, 1, 2}
    else:
        assert expected[0].arrays["pred"].shape == (2,)
    for reference, source_kind in built["refs"].items():
        resolved = resolve_model(reference, tracking_uri=sources["uri"])
        assert resolved.kind == source_kind, reference
        model = load_model(resolved)
        assert model.card.kind == source_kind
        assert model.card.files == dict(resolved.files) and model.card.files, reference
        for data, want in zip(scans, expected):
            got = model.predict(data)
            if kind == "seg":
                assert got.segmentation is not None and np.array_equal(got.segmentation, want.segmentation), \
                    reference
            else:
                np.testing.assert_allclose(got.arrays["pred"], want.arrays["pred"], atol=1e-6, rtol=0,
                                           err_msg=reference)
        if source_kind == "torchscript":
            assert set(model.card.files) == {"net.ts", "net.ts.yaml"}
            assert model.card.weights_sha256 == model.card.files["net.ts"]
            assert model.card.licence == "MIT" and model.card.biomarkers == (f"{kind}_marker",)
            if kind == "seg":
                assert model.card.output_labels == {0: "background", 1: "grey", 2: "white"}
        if source_kind.startswith("mlflow"):
            assert "MLmodel" in model.card.files and "registered_model_meta" not in model.card.files
            assert model.card.training_data.startswith("seeded")
        if source_kind == "entrypoint":
            assert model.card.extra == {"package": f"sbnet_{kind}", "package_version": "0.3"}
            assert {"sbnet_%s/__init__.py" % kind, f"sbnet_{kind}/nets.py", f"sbnet_{kind}/weights.pt"} \
                <= set(model.card.files)
            assert model.card.name == f"sbnet-{kind}" and model.card.citation == "Test et al. 2026"


def test_a_worker_refuses_a_file_changed_after_resolving(sources, tmp_path):
    # TorchScript: its YAML card changes
    ts = tmp_path / "ts"
    shutil.copytree(sources["seg"]["ts"].parent, ts)
    resolved = resolve_model(str(ts / "net.ts"))
    (ts / "net.ts.yaml").write_text((ts / "net.ts.yaml").read_text().replace("MIT", "GPL-3.0"))
    with pytest.raises(SitebenchError, match=r"net\.ts\.yaml: SHA-256 is .* the file changed"):
        load_model(resolved)
    # an entry point: its weights change
    shutil.copytree(sources["reg"]["package"], tmp_path / "pkgs" / "sbnet_tamper")
    sources["patch"].syspath_prepend(str(tmp_path / "pkgs"))
    resolved = resolve_model("entrypoint:sbnet_tamper:factory")
    assert load_model(resolved).card.extra["package"] == "sbnet_tamper"
    weights = tmp_path / "pkgs" / "sbnet_tamper" / "weights.pt"
    weights.write_bytes(weights.read_bytes() + b"tampered")
    with pytest.raises(SitebenchError, match=r"sbnet_tamper/weights\.pt: SHA-256 is"):
        load_model(resolved)
    # an MLflow model: a file of the downloaded folder changes
    reference = next(r for r in sources["seg"]["refs"] if r.startswith("runs:/"))
    resolved = resolve_model(reference, tracking_uri=sources["uri"])
    mlmodel = Path(resolved.location) / "MLmodel"
    mlmodel.write_text(mlmodel.read_text() + "\n# edited\n")
    with pytest.raises(SitebenchError, match=r"MLmodel: SHA-256 is"):
        load_model(resolved)


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_bad_sources_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(SitebenchError) as err:
        resolve_model("entrypoint:no_such_package_here.model:factory")
    assert "entry point 'entrypoint:no_such_package_here.model:factory' does not import (ModuleNotFoundError" \
        in _one_line(err)
    with pytest.raises(SitebenchError) as err:
        resolve_model("no_such_package_here:factory")
    assert "does not import" in _one_line(err)

    (tmp_path / "sb_broken.py").write_text("import torch\nfactory = 3\n\ndef empty():\n    return object()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SitebenchError) as err:
        resolve_model("entrypoint:sb_broken:nothing")
    assert "has no 'nothing'" in _one_line(err)
    with pytest.raises(SitebenchError) as err:
        resolve_model("entrypoint:sb_broken:factory")
    assert "'factory' is not callable" in _one_line(err)
    with pytest.raises(SitebenchError) as err:
        load_model(resolve_model("entrypoint:sb_broken:empty"))
    assert "no predict(data) method" in _one_line(err)

    garbage = tmp_path / "x.ts"
    garbage.write_bytes(b"\x00\x01 this is not a TorchScript archive \xff" * 20)
    (tmp_path / "x.ts.yaml").write_text(card_yaml("reg", "x"))
    with pytest.raises(SitebenchError) as err:
        load_model(resolve_model(str(garbage)))
    text = _one_line(err)
    assert text.startswith(f"{garbage}: not a TorchScript file (") and text.endswith(")")

    (tmp_path / "y.pt").write_bytes(b"anything")
    with pytest.raises(SitebenchError) as err:
        resolve_model(str(tmp_path / "y.pt"))
    assert "no model card beside the TorchScript file" in _one_line(err)

    (tmp_path / "z.ts").write_bytes(b"anything")
    (tmp_path / "z.yaml").write_text(card_yaml("reg", "z") + "license: MIT\n")  # misspelt 'licence'
    with pytest.raises(SitebenchError) as err:
        resolve_model(str(tmp_path / "z.ts"))
    assert _one_line(err) == f"{tmp_path / 'z.yaml'}: unknown key 'license'"


def test_unknown_mlflow_references_name_themselves(sources):
    uri = sources["uri"]
    for reference in ("models:/seg-pyfunc@nope", "models:/nothing/1", "runs:/0123456789abcdef/model"):
        with pytest.raises(SitebenchError) as err:
            resolve_model(reference, tracking_uri=uri)
        assert _one_line(err).startswith(f"{reference}: cannot resolve registered model (")
