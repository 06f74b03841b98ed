"""The ``sitebench`` command: parses arguments, calls one library function, prints the result.

One module per command group (``demo``, ``simulate``, ``benchmark``, ``report``, ``manifest``, ``qc``,
``stats``, ``audit``, ``models``), each with an ``add_parser(sub)``; what they share is in
``_common``. Heavy libraries (pandas, torch, monai, mlflow) are imported inside the command
functions so that ``--help`` answers at once. A ``SitebenchError`` becomes one line on stderr
and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Callable, Sequence

from sitebench import __version__
from sitebench.cli._common import EXIT_USER_ERROR, EXIT_VERIFY_FAILED, quiet_libraries
from sitebench.errors import SitebenchError

__all__ = ["EXIT_USER_ERROR", "EXIT_VERIFY_FAILED", "GROUPS", "build_parser", "main"]

#: Command groups (module ``sitebench.cli.<name>`` registers command ``<name>``), in ``--help`` order.
GROUPS = ("demo", "simulate", "benchmark", "report", "manifest", "qc", "stats", "audit", "models")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with ``only`` one group's: a command imports its own module and
    no other (``sitebench qc inspect`` at upload time should not pay for the statistics CLI)."""
    parser = argparse.ArgumentParser(
        prog="sitebench",
        description="Check an imaging biomarker across the sites, scanner vendors and software versions "
                    "of a multi-site trial: simulate, benchmark model versions, fit scanner effects, "
                    "and write locked validation reports.",
        epilog="Start with: sitebench demo --out sitebench-demo")
    parser.add_argument("--version", action="version", version=f"sitebench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in GROUPS:
        if only is None or name == only:
            importlib.import_module(f"sitebench.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    only = words[0] if words and words[0] in GROUPS else None
    args = build_parser(only).parse_args(words)
    quiet_libraries(loggers=getattr(args, "uses_libraries", True))
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
