"""Benchmark runner: spec -> MONAI transforms -> model versions -> predictions (middle floor)."""

from sitebench.benchmarks.runner import BenchmarkRun, make_executor, run_benchmark
from sitebench.benchmarks.spec import BenchmarkSpec, ModelSpec, load_spec

__all__ = ["BenchmarkRun", "BenchmarkSpec", "ModelSpec", "load_spec", "make_executor", "run_benchmark"]
