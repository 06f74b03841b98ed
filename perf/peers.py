"""Timing helpers for peer tools (dcm2niix, mrQA), so benchmarks can put sitebench next to them.

    .venv/bin/python perf/peers.py   # times both on the default series, prints JSON

Install the peers with the command at the top of perf/requirements-peers.txt. Each helper
runs its tool as a user would (the console script from this venv, in a subprocess), so the
timings include interpreter/process start-up, as a user's would.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

SERIES_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "dcm_qa_deident" / "In"  # 196-slice T1, one file per slice
N_SUBJECTS = 3  # mrQA infers the reference protocol only from >= 3 subjects per sequence
_DISTS = {"dcm2niix": "dcm2niix", "mrqa": "mrQA"}


def peers_available() -> dict[str, str | None]:
    """Version of each peer tool, or None when it is not installed (never raises)."""
    out: dict[str, str | None] = {}
    for tool, dist in _DISTS.items():
        try:
            out[tool] = metadata.version(dist)
        except Exception:
            out[tool] = None
    return out


def _exe(name: str) -> str:
    """The venv's console script first (pip puts it next to sys.executable), then PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found next to {sys.executable} or on PATH; see perf/requirements-peers.txt")
    return found


def _run(cmd: list[str]) -> float:
    """Seconds one subprocess takes; a failure becomes a one-line RuntimeError."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"{Path(cmd[0]).name} exited {proc.returncode}: {last[0]}")
    return seconds


def time_dcm2niix(series_dir: Path = SERIES_DIR, repeats: int = 3) -> dict:
    """Wall time of dcm2niix converting the series to uncompressed NIfTI + BIDS sidecar, per repeat."""
    exe = _exe("dcm2niix")
    seconds: list[float] = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="peers_dcm2niix_") as tmp:
            seconds.append(_run([exe, "-z", "n", "-b", "y", "-f", "out", "-o", tmp, str(series_dir)]))
            if not list(Path(tmp).glob("out*.nii")):
                raise RuntimeError(f"dcm2niix wrote no NIfTI for {series_dir}")
    return {"tool": "dcm2niix", "version": peers_available()["dcm2niix"], "seconds": seconds,
            "median_s": statistics.median(seconds)}


def _make_subjects(series_dir: Path, dest: Path, n: int = N_SUBJECTS) -> int:
    """Copy the series n times as distinct subjects/studies/series (mrQA needs >= 3 subjects); returns files written."""
    import pydicom
    from pydicom.uid import generate_uid

    files = sorted(p for p in series_dir.iterdir() if p.is_file())
    written = 0
    for i in range(1, n + 1):
        sub = f"SUB{i:02d}"
        out = dest / sub
        out.mkdir(parents=True)
        study_uid, series_uid = generate_uid(), generate_uid()
        for path in files:
            ds = pydicom.dcmread(path)
            ds.PatientID = ds.PatientName = sub
            # MRdataset.dicom_utils.is_phantom drops PatientSex 'O' as a phantom; this series has ''
            # (left as is), but a real subject must not read as 'O'.
            if str(ds.get("PatientSex", "")).upper() == "O":
                ds.PatientSex = "M"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(out / path.name, enforce_file_format=True)
            written += 1
    return written


def time_mrqa(series_dir: Path = SERIES_DIR, repeats: int = 3) -> dict:
    """Wall time of mrQA's CLI audit (import + protocol compliance + HTML report) over 3 subjects of the series."""
    exe = _exe("mrqa")
    seconds: list[float] = []
    with tempfile.TemporaryDirectory(prefix="peers_mrqa_") as tmp:
        data = Path(tmp) / "data"
        n_files = _make_subjects(series_dir, data)  # outside the timed part
        for r in range(repeats):
            # A fresh output dir each repeat: MRdataset reads a process log from the output dir
            # and would then read only 3 files per folder, making later repeats unfairly fast.
            out = Path(tmp) / f"out{r}"
            seconds.append(_run([exe, "--data-source", str(data), "--format", "dicom",
                                 "--name", "peers", "--output-dir", str(out)]))
            # mrQA logs errors and still exits 0, so the report is the proof of success.
            if not list(out.rglob("*.html")):
                raise RuntimeError(f"mrqa wrote no HTML report for {series_dir} (it exits 0 on errors)")
    median = statistics.median(seconds)
    return {"tool": "mrqa", "version": peers_available()["mrqa"], "n_subjects": N_SUBJECTS, "n_files": n_files,
            "seconds": seconds, "median_s": median, "per_series_s": median / N_SUBJECTS}


if __name__ == "__main__":
    print(json.dumps({"available": peers_available(), "dcm2niix": time_dcm2niix(SERIES_DIR),
                      "mrqa": time_mrqa(SERIES_DIR)}, indent=2))
