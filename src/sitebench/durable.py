"""Writes that survive a crash: what a receiver acknowledges or an audit trail appends must be on disk.

A file's own ``fsync`` does not make its directory entry durable; after ``os.replace`` or
an append that created the file, the folder must be synced too (POSIX ``fsync(2)``).
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a new or renamed file) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def write_new_file(path: str | Path, data: bytes, mode: int = 0o600) -> None:
    """Create ``path`` (never overwriting) with ``mode`` from the start, write every byte, and fsync it.

    The caller syncs the folder (:func:`fsync_dir`) once the name is final.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
