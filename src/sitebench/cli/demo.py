"""``sitebench demo``: the whole path on the built-in simulated trial (``simulate`` is in ``cli.simulate``)."""

from __future__ import annotations

import argparse

from sitebench.cli._common import add_tracking_uri, say


def add_execution(parser: argparse.ArgumentParser) -> None:
    """Where the work runs (workers, Dask scheduler), where it is tracked, and whether bars show."""
    parser.add_argument("--workers", type=int, default=2, help="local worker processes (default 2; 1 = inline)")
    parser.add_argument("--scheduler", metavar="ADDRESS", help="Dask scheduler address, e.g. tcp://host:8786")
    add_tracking_uri(parser, default_help="MLflow tracking URI")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_demo(args: argparse.Namespace) -> int:
    from sitebench.pipeline import DEMO_SCANS_PER_SITE, run_demo

    result = run_demo(args.out, sites=args.sites, scans_per_site=args.scans_per_site or DEMO_SCANS_PER_SITE,
                      seed=args.seed,
                      workers=args.workers, scheduler=args.scheduler, bootstrap=args.bootstrap,
                      progress=not args.no_progress, tracking_uri=args.tracking_uri, log=say)
    print(result.summary())
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run the whole path on a built-in simulated trial",
                          description="Simulate a multi-site trial, run three model versions of ours and a "
                                      "published pretrained network, record per-stratum results in MLflow, fit the scanner-effect model "
                                      "and write a locked, versioned report.")
    demo.add_argument("--out", default="sitebench-demo", help="output folder (default: ./sitebench-demo)")
    demo.add_argument("--sites", type=int, default=20, help="number of sites (default 20)")
    demo.add_argument("--scans-per-site", type=int, default=None,
                      help="scans per site (default 5: pipeline.DEMO_SCANS_PER_SITE)")
    demo.add_argument("--seed", type=int, default=0, help="simulation and bootstrap seed (default 0)")
    demo.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (default 1000)")
    add_execution(demo)
    demo.set_defaults(func=cmd_demo)
