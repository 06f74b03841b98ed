"""Scan manifest, importers and the trial simulator (ground floor: imports nothing else of ours)."""

from sitebench.datasets.manifest import (
    MANIFEST_COLUMNS,
    REQUIRED_COLUMNS,
    Manifest,
    read_manifest,
)

__all__ = ["MANIFEST_COLUMNS", "REQUIRED_COLUMNS", "Manifest", "read_manifest"]
