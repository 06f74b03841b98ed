"""The YAML files in configs/ are what the docs point users at: they must load, and say what the code does."""

from __future__ import annotations

from pathlib import Path

from sitebench.benchmarks import load_spec
from sitebench.datasets.simulator import TrialConfig, load_trial_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_trial_demo_yaml_is_the_built_in_default():
    assert load_trial_config(CONFIGS / "trial_demo.yaml") == TrialConfig()


def test_benchmark_demo_yaml_loads():
    spec = load_spec(CONFIGS / "benchmark_demo.yaml")
    assert [m.source for m in spec.models] == ["classical", "builtin:gm_unet_v1", "builtin:gm_unet_v2"]
    assert spec.manifest_path == (CONFIGS / "../sitebench-demo/trial/manifest.csv")
