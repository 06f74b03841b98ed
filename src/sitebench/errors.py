"""The one exception type meant for users.

Anything raised as a ``SitebenchError`` is printed by the command line as a
single line (file, what is wrong) with a non-zero exit code and no traceback.
Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class SitebenchError(Exception):
    """A problem with the user's input, worded for the user."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        text = f"{self.path}: {message}" if self.path else message
        super().__init__(" ".join(text.split()))  # always one line

    def __reduce__(self):  # survive pickling across process / Dask workers
        return (_rebuild, (str(self),))


def _rebuild(text: str) -> SitebenchError:
    return SitebenchError(text)
