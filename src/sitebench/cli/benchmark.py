"""``sitebench benchmark run``: every model version of a spec over a manifest."""

from __future__ import annotations

import argparse

from sitebench.cli._common import say
from sitebench.cli.demo import add_execution


def cmd_benchmark_run(args: argparse.Namespace) -> int:
    from sitebench.pipeline import run_pipeline

    result = run_pipeline(args.spec, workers=args.workers, scheduler=args.scheduler,
                          tracking_uri=args.tracking_uri, report=not args.no_report,
                          progress=not args.no_progress, log=say)
    print(result.summary())
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("benchmark", help="run model versions over a manifest").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    run = bench.add_parser("run", help="run a benchmark spec (YAML)",
                           description="Score every scan with every model version of SPEC, resume what is "
                                       "already scored, compute per-stratum metrics and mixed models, log to "
                                       "MLflow and write a locked report.")
    run.add_argument("spec", help="benchmark spec YAML")
    run.add_argument("--no-report", action="store_true", help="skip the report")
    add_execution(run)
    run.set_defaults(func=cmd_benchmark_run)
