"""Total wall time of the demo at its default size, per stage, against the 10-minute goal.

    .venv/bin/python perf/bench_demo.py [--sites 20 --scans-per-site 10 --workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

GOAL_SECONDS = 600.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--scans-per-site", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, help="keep the output here (default: a temp folder)")
    args = parser.parse_args()

    from sitebench.pipeline import run_demo

    marks: list[tuple[str, float]] = []

    def log(message: str) -> None:
        marks.append((message, time.perf_counter()))

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "demo"
        start = time.perf_counter()
        result = run_demo(out, sites=args.sites, scans_per_site=args.scans_per_site, workers=args.workers,
                          progress=False, log=log)
        total = time.perf_counter() - start
        marks.append(("done", time.perf_counter()))
        n = args.sites * args.scans_per_site
        print(f"demo: {args.sites} sites x {args.scans_per_site} scans = {n} scans, "
              f"{len(result.run.models)} model versions, {args.workers} workers, {os.cpu_count()} cores")
        previous = start
        for (message, at), (_, nxt) in zip(marks, marks[1:]):
            print(f"  {nxt - at:7.1f} s  {message}")
            previous = nxt
        print(f"total wall time {total:.1f} s = {total / GOAL_SECONDS:.2f} x the 600 s goal "
              f"({n * len(result.run.models) / max(result.run.seconds, 1e-9):.2f} predictions/s in the runner)")


if __name__ == "__main__":
    main()
