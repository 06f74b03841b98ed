"""A watched folder: ``<folder>/<SITE>/...`` files are taken in once their size stops changing.

A file is handed to intake only after two polls saw the same size and mtime (the
copier has finished), and deleted from the folder only after intake has stored and
recorded it, so a crash in between means a harmless resend, never a loss. A file over
the size limit is moved to ``<folder>/.refused/`` and audited.

Symbolic links are never followed (neither linked folders nor linked files): a link
could hand the gate any file the service can read, outside the inbox. A link is moved
to ``<folder>/.refused/`` and audited.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from sitebench.qc.intake import IntakeService

__all__ = ["FolderWatcher"]


def _read_no_follow(path: Path) -> bytes:
    """The file's bytes, refusing (OSError) if it was swapped for a link since it was listed."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as handle:
        return handle.read()

log = logging.getLogger("sitebench.qc.intake")


class FolderWatcher:
    def __init__(self, service: "IntakeService", folder: Path, interval: float = 0.5) -> None:
        self.service = service
        self.folder = Path(folder)
        self.interval = interval
        self._seen: dict[Path, tuple[int, int]] = {}
        for site in service.config.sites:
            (self.folder / site).mkdir(parents=True, exist_ok=True)

    def poll(self) -> int:
        """Take in every settled file; returns how many were taken."""
        settled: dict[str, list[Path]] = {}
        current: dict[Path, tuple[int, int]] = {}
        for path in sorted(self._files()):
            if path.is_symlink():
                self._refuse_link(path)
                continue
            try:
                stat = path.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            current[path] = (stat.st_size, stat.st_mtime_ns)
            if self._seen.get(path) == current[path]:
                site = path.relative_to(self.folder).parts[0]
                settled.setdefault(site, []).append(path)
        self._seen = current
        taken = 0
        for site, paths in settled.items():
            if site not in self.service.config.sites or len(paths[0].relative_to(self.folder).parts) < 2:
                continue  # only <folder>/<configured site>/... is intake; anything else is left alone
            transfer = self.service.begin_transfer(site, "folder", f"folder:{site}")
            try:
                for path in paths:
                    size = path.stat().st_size
                    if size > self.service.max_file_bytes:
                        self.service.refuse(transfer, size, f"file of {size} bytes exceeds the "
                                                             f"{self.service.max_file_bytes}-byte limit")
                        refused = self.folder / ".refused" / path.relative_to(self.folder)
                        refused.parent.mkdir(parents=True, exist_ok=True)
                        path.replace(refused)  # kept for a person to look at, never taken in
                    else:
                        self.service.receive(_read_no_follow(path), transfer)
                        path.unlink()
                    self._seen.pop(path, None)
                    taken += 1
            finally:
                self.service.end_transfer(transfer, "folder batch taken")
        return taken

    def _files(self) -> list[Path]:
        """Regular files and links under the folder, never descending into a linked folder or a dot folder."""
        out = []
        for root, dirs, files in os.walk(self.folder, followlinks=False):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            here = Path(root)
            for name in files + [d for d in dirs if (here / d).is_symlink()]:
                if not name.startswith("."):
                    out.append(here / name)
            dirs[:] = [d for d in dirs if not (here / d).is_symlink()]
        return out

    def _refuse_link(self, path: Path) -> None:
        parts = path.relative_to(self.folder).parts
        site = parts[0] if len(parts) > 1 and parts[0] in self.service.config.sites else None
        refused = self.folder / ".refused" / path.relative_to(self.folder)
        refused.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, refused)  # moves the link itself, never what it points to
        self.service.audit.append(who=self.service.config.who, what="file refused", subject="watched folder",
                                  why="a symbolic link in the watched folder: links are never followed",
                                  details={"site": site, "moved_to": str(refused.relative_to(self.folder))})

    def start(self, stop: threading.Event) -> threading.Thread:
        def loop() -> None:
            while not stop.wait(self.interval):
                try:
                    self.poll()
                except Exception:  # noqa: BLE001 - keep watching
                    log.exception("watched-folder poll failed; will retry")

        thread = threading.Thread(target=loop, name="qc-folder", daemon=True)
        thread.start()
        return thread
