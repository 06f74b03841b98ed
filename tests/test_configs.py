"""The YAML files in configs/ are what the docs point users at: they must load, and say what the code does."""

from __future__ import annotations

from pathlib import Path

from sitebench.benchmarks import load_spec
from sitebench.datasets.simulator import TrialConfig, load_trial_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_trial_demo_yaml_is_the_built_in_default():
    assert load_trial_config(CONFIGS / "trial_demo.yaml") == TrialConfig()


def test_benchmark_demo_yaml_loads():
    from sitebench.pipeline import demo_spec

    spec = load_spec(CONFIGS / "benchmark_demo.yaml")
    demo = demo_spec()
    # the file declares what the demo runs: the same models, biomarkers and subsample
    assert [m.source for m in spec.models] == [m["source"] for m in demo["models"]]
    assert [m.model_dump(exclude_none=True) for m in spec.biomarkers] == \
        [type(m)(**d).model_dump(exclude_none=True) for m, d in zip(spec.biomarkers, demo["biomarkers"])]
    assert [m.subsample for m in spec.models][-1].model_dump() == demo["models"][-1]["subsample"]
    assert spec.manifest_path == (CONFIGS / "../sitebench-demo/trial/manifest.csv")


def test_qc_intake_yaml_loads_with_its_locked_protocols():
    from sitebench.qc.intake import load_intake_config, load_locked_protocols

    config = load_intake_config(CONFIGS / "qc_intake.yaml")
    assert config.sites["S01"].ae_titles == ["S01_MR1"] and config.quiet_seconds == 5
    (protocol,) = load_locked_protocols(config.protocols)  # refuses a protocol edited after locking
    assert protocol.locked and protocol.name == "ge-t1w-3d" and protocol.image_quality
