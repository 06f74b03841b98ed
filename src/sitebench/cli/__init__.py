"""The ``sitebench`` command: parses arguments, calls one library function, prints the result.

One module per command group (``demo``, ``simulate``, ``benchmark``, ``report``, ``manifest``, ``qc``,
``stats``, ``audit``, ``models``), each with an ``add_parser(sub)``; what they share is in
``_common``. Heavy libraries (pandas, torch, monai, mlflow) are imported inside the command
functions so that ``--help`` answers at once. A ``SitebenchError`` becomes one line on stderr
and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

from sitebench import __version__
from sitebench.cli import audit, benchmark, demo, manifest, models, qc, report, simulate, stats
from sitebench.cli._common import EXIT_USER_ERROR, EXIT_VERIFY_FAILED, quiet_libraries
from sitebench.errors import SitebenchError

__all__ = ["EXIT_USER_ERROR", "EXIT_VERIFY_FAILED", "build_parser", "main"]

#: Command groups in the order ``--help`` lists them.
GROUPS = (demo, simulate, benchmark, report, manifest, qc, stats, audit, models)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sitebench",
        description="Check an imaging biomarker across the sites, scanner vendors and software versions "
                    "of a multi-site trial: simulate, benchmark model versions, fit scanner effects, "
                    "and write locked validation reports.",
        epilog="Start with: sitebench demo --out sitebench-demo")
    parser.add_argument("--version", action="version", version=f"sitebench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in GROUPS:
        group.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except SitebenchError as exc:
        print(f"sitebench: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # e.g. piped into `head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("sitebench: interrupted; finished work is kept and a rerun resumes", file=sys.stderr)
        return 130


def _entry() -> Any:  # pragma: no cover
    sys.exit(main())
