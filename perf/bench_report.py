"""Time to build, lock and render the demo trial's validation report, against the 30 s goal (2 cores).

    .venv/bin/python perf/bench_report.py [--out sitebench-demo] [--sites 20 --scans-per-site 10] [--repeats 3]

With ``--out`` pointing at a finished demo, its predictions are reused (nothing is re-scored);
otherwise the demo trial is simulated and scored first (a few minutes, not timed). Then, per repeat:

* statistics: every result table (per-stratum bootstrap, mixed models, calibration, ComBat,
  equivalence, paired comparison) from the evaluation table;
* report: tables, figures, HTML, PDF (WeasyPrint) and the in-toto lock over every input file;
* recompute: ``report verify --recompute``, what an auditor runs.

Peers in the same run: the lock's hashing against coreutils ``sha256sum`` over the same files,
and the PDF rendering on its own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

GOAL_SECONDS = 30.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="a demo output folder to reuse (default: simulate into a temp one)")
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--scans-per-site", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import yaml

    from sitebench.benchmarks.runner import run_benchmark
    from sitebench.benchmarks.spec import load_spec
    from sitebench.datasets.simulator import load_trial_config
    from sitebench.pipeline import demo_spec, evaluate, prepare_trial, report_content
    from sitebench.reports.findings import findings
    from sitebench.provenance import sha256_file
    from sitebench.reports import build_report, verify_report
    from sitebench.reports.pdf import render_pdf

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "demo"
        out.mkdir(parents=True, exist_ok=True)
        config = load_trial_config(n_sites=args.sites, scans_per_site=args.scans_per_site, seed=0, workers=2)
        prepare_trial(config, out / "trial")
        spec_path = out / "benchmark.yaml"
        text = yaml.safe_dump(demo_spec(), sort_keys=False)
        if not spec_path.exists() or spec_path.read_text() != text:
            spec_path.write_text(text)
        spec = load_spec(spec_path)
        run = run_benchmark(spec, workers=2, progress=False)
        print(f"demo: {len(run.manifest)} scans x {len(run.models)} model versions ({run.computed} scored, "
              f"{run.reused} reused), {spec.bootstrap} bootstrap replicates, {os.cpu_count()} cores")

        stats_s, report_s, pdf_s, recompute_s = [], [], [], []
        reports_root = Path(tmp) / "reports"
        built = None
        for _ in range(args.repeats):
            start = time.perf_counter()
            evaluation = evaluate(run)
            stats_s.append(time.perf_counter() - start)
            content = report_content(run, evaluation, findings(run.models, evaluation), {}, spec_path=spec_path,
                                     truth=None)
            start = time.perf_counter()
            built = build_report(content, reports_root)
            report_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            render_pdf(built.path, Path(tmp) / "again.pdf")
            pdf_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            check = verify_report(built.report_dir, recompute=True)
            recompute_s.append(time.perf_counter() - start)
            assert check.ok, check.problems
        files = [Path(p) for p in content.materials.values()]
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        start = time.perf_counter()
        for f in files:
            sha256_file(f)
        ours = time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run(["sha256sum", *map(str, files)], check=True, capture_output=True)
        coreutils = time.perf_counter() - start

        med = statistics.median
        total = med(stats_s) + med(report_s)
        pages = subprocess.run(["pdfinfo", str(built.report_dir / "report.pdf")], capture_output=True,
                               text=True).stdout
        n_pages = next((line.split()[-1] for line in pages.splitlines() if line.startswith("Pages")), "?")
        print(f"medians of {args.repeats} repeats:")
        print(f"  {med(stats_s):7.2f} s  statistics (every result table)")
        print(f"  {med(report_s):7.2f} s  report: tables, figures, HTML, PDF ({n_pages} pages), lock over "
              f"{len(files)} input files ({size_mb:.0f} MB)")
        print(f"  {med(pdf_s):7.2f} s    of which the PDF rendering alone (WeasyPrint)")
        print(f"  {med(recompute_s):7.2f} s  report verify --recompute (every hash, every table re-derived)")
        print(f"build + lock + render: {med(report_s):.2f} s = {med(report_s) / GOAL_SECONDS:.2f} x the "
              f"{GOAL_SECONDS:.0f} s goal; with the statistics {total:.2f} s = {total / GOAL_SECONDS:.2f} x")
        print(f"hashing the inputs: sitebench {ours:.3f} s vs sha256sum {coreutils:.3f} s = "
              f"{ours / max(coreutils, 1e-9):.2f} x coreutils")


if __name__ == "__main__":
    main()
