"""What every command shares: exit codes, the one-line error, ``--json`` and ``--tracking-uri``.

``--json`` means one thing everywhere: exactly one JSON document on stdout (an object,
or a list for commands about several items), so ``json.loads(stdout)`` always works.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from sitebench.errors import SitebenchError

if TYPE_CHECKING:
    from sitebench.results import Summarized

EXIT_USER_ERROR = 2
EXIT_VERIFY_FAILED = 1

# Warnings that third-party libraries print on every call and that say nothing about the
# user's data; everything else (ours included) is still shown.
QUIET_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r".*NvImgCodecPydicomReader", UserWarning),  # monai: its optional GPU DICOM reader is absent
    (r"The specified dataset source can be interpreted in multiple ways", UserWarning),  # mlflow log_input
)
QUIET_LOGGERS = ("mlflow", "alembic", "distributed", "monai", "monai.data.nvimgcodec_pydicom_plugin")


def quiet_libraries(loggers: bool = True) -> None:
    """Silence named library chatter (telemetry, known warnings, INFO loggers), nothing else.

    ``loggers=False`` for a command that imports no library (``qc inspect``): importing logging
    alone costs it 14 ms and 1 MiB, a tenth of reading a small series."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if not loggers:
        return
    import logging  # not at the top: --help should not pay for it

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def usable_cpus(at_most: int) -> int:
    """CPUs this process may run on (its affinity mask, which containers set), at most ``at_most``."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    return max(1, min(count, at_most))


def say(message: str) -> None:
    """Progress for the person at the terminal: stderr, so stdout stays the result."""
    print(f"sitebench: {message}", file=sys.stderr, flush=True)


def add_json(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    """The one ``--json`` flag: one JSON document on stdout instead of the text."""
    parser.add_argument("--json", action="store_true", help=f"print {what} as one JSON document on stdout")


def add_tracking_uri(parser: argparse.ArgumentParser, required: bool = False,
                     default_help: str = "MLflow tracking and registry URI") -> None:
    """The one ``--tracking-uri`` option; falls back to ``$MLFLOW_TRACKING_URI`` (then required no more)."""
    from_env = os.environ.get("MLFLOW_TRACKING_URI") or None
    parser.add_argument("--tracking-uri", default=from_env, required=required and from_env is None,
                        help=f"{default_help} (default: $MLFLOW_TRACKING_URI"
                             + (")" if required else ", else SQLite under the output folder)"))


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def print_result(result: Summarized, as_json: bool) -> None:
    """A result's ``summary()``, or its ``to_dict()`` as one JSON document."""
    if as_json:
        print_json(result.to_dict())
    else:
        print(result.summary())


@contextmanager
def errors_name(path: str | Path) -> Iterator[None]:
    """A user error raised while working on ``path`` names that file (one line, as always)."""
    try:
        yield
    except SitebenchError as exc:
        if exc.path is not None:
            raise
        raise SitebenchError(str(exc), path) from None
