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


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter with the terminal's width found once, as ``shutil.get_terminal_size``
    finds it (``$COLUMNS``, then the terminal, then 80): argparse makes a formatter for every option
    it adds, and each asked the terminal again (importing shutil, 4 ms, for the first)."""

    _columns: int | None = None

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        if width is None:
            if _HelpFormatter._columns is None:
                _HelpFormatter._columns = _terminal_columns()
            width = _HelpFormatter._columns - 2
        super().__init__(prog, indent_increment, max_help_position, width)


def _terminal_columns() -> int:
    import os

    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class _Parser(argparse.ArgumentParser):
    """Every parser of the command line (subparsers are made of the parent's class) with that formatter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser(only: str | None = None, action: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with ``only`` one group's: a command imports its own module and
    no other (``sitebench qc inspect`` at upload time should not pay for the statistics CLI). A
    group with many actions (``ACTIONS``, as qc) builds only ``action``'s parser when it names one."""
    parser = _Parser(
        prog="sitebench",
        description="Check an imaging biomarker across the sites, scanner vendors and software versions "
                    "of a multi-site trial: simulate, benchmark model versions, fit scanner effects, "
                    "and write locked validation reports.",
        epilog="Start with: sitebench demo --out sitebench-demo")
    parser.add_argument("--version", action="version", version=f"sitebench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in GROUPS:
        if only is None or name == only:
            module = importlib.import_module(f"sitebench.cli.{name}")
            if action is not None and hasattr(module, "ACTIONS"):
                module.add_parser(sub, action)
            else:
                module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    only = words[0] if words and words[0] in GROUPS else None
    args = build_parser(only, words[1] if only and len(words) > 1 else None).parse_args(words)
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
