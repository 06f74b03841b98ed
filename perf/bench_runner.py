"""Runner overhead: scans/s of `run_benchmark` against a bare loop of the same model over the same scans.

    .venv/bin/python perf/bench_runner.py [--sites 4 --scans-per-site 6 --model builtin:gm_unet_v1]

The bare loop is what a researcher would write: nibabel load, a tensor with the
affine, model.predict. The runner adds MONAI transforms, Dataset/DataLoader, the
executor, the Dice against the label map, hashing checks and the fsync'd append.
Both run in this process with the same torch threads (inline executor); the process
pool is reported too, against the same baseline. Goal: runner overhead under 10%.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

warnings.filterwarnings("ignore")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def bare_loop(model, paths: list[Path]) -> float:
    from monai.data import MetaTensor

    start = time.perf_counter()
    for path in paths:
        image = nib.load(path)
        data = {"image": MetaTensor(np.asarray(image.dataobj, dtype=np.float32)[None], affine=image.affine)}
        model.predict(data)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--scans-per-site", type=int, default=6)
    parser.add_argument("--model", default="builtin:gm_unet_v1")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from sitebench.benchmarks import load_spec, run_benchmark
    from sitebench.datasets.simulator import TrialConfig, simulate_trial
    from sitebench.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        trial = simulate_trial(TrialConfig(n_sites=args.sites, scans_per_site=args.scans_per_site, seed=5,
                                           coverage=None), Path(tmp) / "trial")
        paths = [trial.out_dir / p for p in trial.manifest.image_path]
        model = load_model(args.model)
        bare_loop(model, paths[:2])  # warm caches and torch kernels
        spec_path = Path(tmp) / "spec.yaml"
        rows = []
        for repeat in range(args.repeats):
            bare = bare_loop(model, paths)
            timings = {}
            for workers in (1, 2):
                results = Path(tmp) / f"results-{repeat}-{workers}"
                spec_path.write_text(yaml.safe_dump({
                    "name": "perf", "manifest": str(trial.manifest_path), "reference": "gm_volume_ml",
                    "reference_segmentation": "label_path", "models": [{"source": args.model}],
                    "results_dir": str(results)}))
                start = time.perf_counter()
                run = run_benchmark(load_spec(spec_path), workers=workers, progress=False)
                timings[workers] = time.perf_counter() - start
                assert run.computed == len(paths)
            rows.append((bare, timings[1], timings[2]))
        n = len(paths)
        print(f"{n} scans, model {args.model}, torch threads {__import__('torch').get_num_threads()}, "
              f"{os.cpu_count()} cores")
        print(f"{'repeat':>6} {'bare scans/s':>13} {'runner(inline) scans/s':>23} {'ratio':>6} "
              f"{'runner(2 procs) scans/s':>24} {'ratio':>6}")
        for i, (bare, inline, pool) in enumerate(rows):
            print(f"{i:>6} {n / bare:>13.2f} {n / inline:>23.2f} {bare / inline:>6.3f} {n / pool:>24.2f} "
                  f"{bare / pool:>6.3f}")
        bare, inline, pool = (min(r[k] for r in rows) for k in range(3))
        print(f"best of {args.repeats}: runner(inline)/bare throughput ratio {bare / inline:.3f} "
              f"(overhead {100 * (inline / bare - 1):.1f}%); runner(2 processes)/bare {bare / pool:.3f}")


if __name__ == "__main__":
    main()
