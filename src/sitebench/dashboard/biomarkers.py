"""Each validated biomarker's value per series, for the site page's biomarker control charts.

A biomarker drifting at one scanner (a software upgrade that shifts segmented volumes, say)
is what the trial's endpoint feels; image-quality metrics may not move at all. The values
come from the predictions the validation reports locked (``tables/predictions.csv`` of each
report under ``qc serve --reports``) and from any benchmark predictions file given with
``--predictions``. A prediction belongs to a gate series when its ``scan_id`` is the
series' key, which it is for every manifest ``sitebench qc manifest`` writes.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from sitebench.errors import SitebenchError

log = logging.getLogger("sitebench.dashboard")

#: how often the files are looked at again (a new report version adds predictions)
RELOAD_SECONDS = 60.0


class BiomarkerValues:
    """``series_key -> {"<biomarker> · <model version>": value}`` from locked and given predictions.

    Later files win for the same scan, model version and biomarker (a report's later version,
    then the ``--predictions`` files in the order given).
    """

    def __init__(self, reports_root: str | Path | None = None, prediction_files: list[str | Path] | None = None) -> None:
        self.reports_root = Path(reports_root) if reports_root else None
        self.prediction_files = [Path(p) for p in prediction_files or []]
        for path in self.prediction_files:  # a wrong --predictions is one line at start, not an empty chart
            if not path.is_file():
                raise SitebenchError("no such predictions file", path)
            read_predictions(path)
        self._checked_at, self._stamp, self._values = 0.0, None, {}

    def _files(self) -> list[Path]:
        from sitebench.reports.coverage import find_reports
        from sitebench.reports.lock import locked_subject, read_lock

        files = []
        if self.reports_root is not None and self.reports_root.is_dir():
            for folder in find_reports(self.reports_root):
                try:
                    entry = locked_subject(read_lock(folder), "table:predictions")
                except SitebenchError:
                    continue  # a broken lock: the reports page says so
                if entry is not None and (folder / entry["name"]).is_file():
                    files.append(folder / entry["name"])
        return files + self.prediction_files

    def values(self) -> dict[str, dict[str, float]]:
        if time.monotonic() - self._checked_at < RELOAD_SECONDS and self._stamp is not None:
            return self._values
        self._checked_at = time.monotonic()
        files = self._files()
        stamp = [(str(f), f.stat().st_mtime_ns) for f in files if f.exists()]
        if stamp != self._stamp:
            self._values, self._stamp = _read(files), stamp
        return self._values

    def for_series(self, series_keys: list[str]) -> dict[str, dict[str, float]]:
        values = self.values()
        return {key: values[key] for key in series_keys if key in values}


def _read(files: list[Path]) -> dict[str, dict[str, float]]:
    """Every file's values; one that cannot be read is logged and left out, never a broken page (a
    ``--predictions`` file was read once at start, so a bad one is a one-line error there)."""
    out: dict[str, dict[str, float]] = {}
    for path in files:
        try:
            rows = read_predictions(path)
        except SitebenchError as exc:
            log.warning("%s", exc)
            continue
        for scan, label, value in rows:
            out.setdefault(scan, {})[label] = value
    return out


def read_predictions(path: Path) -> list[tuple[str, str, float]]:
    """``(scan_id, "<biomarker> · <model version>", value)`` for each numeric prediction of a table."""
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype={"scan_id": str, "model_key": str, "biomarker": str})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise SitebenchError(f"unreadable predictions table ({type(exc).__name__})", path) from None
    if not {"scan_id", "model_key", "prediction"} <= set(table.columns):
        raise SitebenchError("a predictions table needs scan_id, model_key and prediction columns", path)
    names = table["biomarker"] if "biomarker" in table else ["biomarker"] * len(table)
    rows = []
    for scan, model, name, value in zip(table["scan_id"], table["model_key"], names, table["prediction"], strict=True):
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue  # a segmentation's prediction is a file, not a number
        if math.isfinite(value):
            rows.append((str(scan), f"{name} · {model}", value))
    return rows


def measures(verdict: dict[str, Any], biomarkers: dict[str, float] | None) -> dict[str, tuple[str, float]]:
    """What the site page charts for one series: its image-quality metrics and its biomarkers, each
    with its kind."""
    out = {k: ("image quality", float(x)) for k, x in (verdict.get("image_quality") or {}).items()
           if isinstance(x, (int, float)) and not isinstance(x, bool)}
    out.update({k: ("biomarker", v) for k, v in (biomarkers or {}).items()})
    return out
