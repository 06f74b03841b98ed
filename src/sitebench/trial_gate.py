"""A simulated trial through the real upload-time gate: sites send DICOM, the gate judges, the manifest follows.

This is how the demo joins the two halves of sitebench. The trial's locked protocol is
written from the simulator's sequence profiles, ``sitebench qc serve`` is started as its own
process with C-STORE on a free local port, and each site's scanner sends its series, in
acquisition order, interleaved across sites, over DICOM networking (dcmtk's ``storescu``
where installed, else a pynetdicom SCU). A re-scan is sent only once the gate has failed the
series it replaces, the way a technologist reacts to the gate. When every series has its
verdict, ``qc manifest`` builds the scan manifest from the passing and warning series, and
the sponsor's clinical table (the simulator's) is joined on the series pseudonym.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import yaml

from sitebench.datasets import manifest as mf
from sitebench.datasets.simulator import (
    BRAIN_VOLUME_COLUMN,
    DICOM_INDEX,
    REFERENCE_COLUMN,
    TrialConfig,
    load_template,
)
from sitebench.durable import write_new_file
from sitebench.errors import SitebenchError

#: The gate's AE title, and the protocol every simulated site is locked to.
GATE_AE = "SITEBENCH"
PROTOCOL_NAME = "trial-t1w-3d"
#: Columns of the sponsor's table (the simulator's manifest) joined onto the gate's manifest.
SPONSOR_COLUMNS = (mf.SUBJECT_ID, mf.SESSION, mf.ACQUISITION_DATE, mf.AGE, mf.SEX, mf.GROUP, REFERENCE_COLUMN,
                   BRAIN_VOLUME_COLUMN, "slice_thickness_mm")


def _vendor_label(dicom_manufacturer: str) -> str:
    """The vendor name the gate reports for a DICOM Manufacturer (the gate's own normalisation)."""
    from sitebench.qc.dicom_params import _vendor

    return _vendor(dicom_manufacturer) or dicom_manufacturer


def trial_protocol(config: TrialConfig, coverage_fraction: float = 0.95) -> dict[str, Any]:
    """The trial's locked T1w protocol: common rules, and each vendor's sequence as an override.

    Tolerances are the draft defaults of :func:`sitebench.qc.protocol.draft_protocol` (TR and TI
    within 2 %, TE within 1 ms, flip angle within 1 degree, pixel spacing within 0.05 mm).
    Slice thickness may be up to the trial's thick-slice setting (those sites are allowed it);
    coverage must reach ``coverage_fraction`` of the template head's superior-inferior extent.
    """
    template = load_template(config.voxel_mm)
    extent = template.p_gm.shape[2] * config.voxel_mm
    overrides = []
    for vendor in config.vendors:
        seq = vendor.sequence
        if seq is None:
            raise SitebenchError(f"vendor {vendor.name} has no sequence profile: no protocol can be written for it")
        rules: dict[str, Any] = {
            "RepetitionTime": {"kind": "rel", "value": seq.repetition_time_ms / 1000, "tol": 0.02},
            "EchoTime": {"kind": "abs", "value": seq.echo_time_ms / 1000, "tol": 0.001},
            "FlipAngle": {"kind": "abs", "value": seq.flip_angle_deg, "tol": 1.0},
        }
        if seq.inversion_time_ms is not None:
            rules["InversionTime"] = {"kind": "rel", "value": seq.inversion_time_ms / 1000, "tol": 0.02}
        overrides.append({"when": {"Manufacturer": _vendor_label(vendor.dicom_manufacturer or vendor.name)},
                          "parameters": rules})
    vendors = sorted({_vendor_label(v.dicom_manufacturer or v.name) for v in config.vendors})
    strengths = sorted({m.field_strength for v in config.vendors for m in v.models})
    return {
        "name": PROTOCOL_NAME, "version": 1,
        "description": f"3D T1w for volumetry, {len(vendors)} vendors ({', '.join(vendors)}): "
                       f"the locked protocol of the simulated trial '{config.name}'",
        "match": {"SeriesDescription": "T1w_.*", "MRAcquisitionType": "3D"},
        "parameters": {
            "Manufacturer": {"kind": "one_of", "values": vendors},
            "MRAcquisitionType": {"kind": "exact", "value": "3D"},
            "MagneticFieldStrength": {"kind": "one_of", "values": strengths},
            "PixelSpacing": {"kind": "abs", "value": [config.voxel_mm, config.voxel_mm], "tol": 0.05},
            "SliceThickness": {"kind": "range", "min": config.voxel_mm - 0.05,
                               "max": max(config.voxel_mm, config.thick_slice_mm) + 0.05},
            "SoftwareVersions": {"kind": "record"},
            "ManufacturersModelName": {"kind": "record"},
        },
        "coverage": {"min_mm": round(coverage_fraction * extent, 1), "severity": "fail"},
        "slice_gap": {"max_gap_mm": 0.05, "severity": "fail"},
        "overrides": overrides,
        "image_quality": {"snr_total": {"kind": "range", "severity": "warn", "min": 1.5},
                          "efc": {"kind": "range", "severity": "warn", "max": 0.8}},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ae_title(site: str) -> str:
    return f"{site}_MR"


@dataclass
class GateRun:
    """What the gate received and decided for one simulated trial."""

    root: Path
    store: Path
    config_path: Path
    sent: pd.DataFrame  # one row per series the sites' scanners sent (or held back)
    seconds: dict[str, float] = field(default_factory=dict)
    files: int = 0

    @classmethod
    def load(cls, root: Path) -> "GateRun":
        """A finished gate run, as ``run_trial_through_gate`` left it in ``root``."""
        sent = pd.read_csv(root / "sent.csv", dtype=str, keep_default_na=False)
        sent["sent"] = sent["sent"] == "True"
        about = json.loads((root / "run.json").read_text())
        return cls(root=root, store=root / "store", config_path=root / "qc_intake.yaml", sent=sent,
                   seconds=about["seconds"], files=about["files"])

    @property
    def database(self) -> str:
        from sitebench.qc.records import database_url

        return database_url(self.store)

    def records(self):  # noqa: ANN201 - QCRecords, imported lazily
        from sitebench.qc.records import QCRecords

        return QCRecords(self.database)

    def per_site(self) -> pd.DataFrame:
        """Per site: series sent, and the gate's latest verdicts counted by status."""
        records = self.records()
        try:
            verdicts = pd.DataFrame(records.latest_verdicts())
        finally:
            records.engine.dispose()
        sent = self.sent[self.sent["sent"]].groupby("site").size().rename("received")
        counts = (verdicts.groupby(["site", "status"]).size().unstack(fill_value=0) if not verdicts.empty
                  else pd.DataFrame())
        table = pd.DataFrame(sent).join(counts, how="left").fillna(0).astype(int)
        for status in ("pass", "warn", "fail", "undetermined", "unmatched"):
            if status not in table:
                table[status] = 0
        return table.reset_index()[["site", "received", "pass", "warn", "fail", "undetermined", "unmatched"]]

    def summary(self) -> str:
        table = self.per_site()
        lines = [f"QC gate: {int(table.received.sum())} series ({self.files} files) received over C-STORE in "
                 f"{self.seconds.get('intake', 0):.0f} s; verdicts per site (received / passed / warned / failed / "
                 "undetermined / unmatched):"]
        lines += [f"  {r.site}: {r.received} / {r['pass']} / {r.warn} / {r.fail} / {r.undetermined} / {r.unmatched}"
                  for _, r in table.iterrows()]
        return "\n".join(lines)


def _storescu() -> str | None:
    """dcmtk's storescu (not pynetdicom's same-named script in the venv: see PITFALLS)."""
    return "/usr/bin/storescu" if os.access("/usr/bin/storescu", os.X_OK) else None


def send_series(folder: Path, port: int, calling_ae: str, called_ae: str = GATE_AE, host: str = "127.0.0.1") -> int:
    """Send every file of one series folder in one association; returns the files sent."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    tool = _storescu()
    if tool:
        done = subprocess.run([tool, "-aet", calling_ae, "-aec", called_ae, "-nh", host, str(port),
                               *map(str, files)], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise SitebenchError(f"storescu could not send the series: {done.stderr.strip().splitlines()[-1:]}",
                                 folder)
        return len(files)
    from pydicom import dcmread
    from pynetdicom import AE, StoragePresentationContexts

    ae = AE(ae_title=calling_ae)
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise SitebenchError("the gate refused the association", folder)
    try:
        for path in files:
            status = assoc.send_c_store(dcmread(path))
            if not status or status.Status != 0:
                raise SitebenchError(f"C-STORE of {path.name} failed", folder)
    finally:
        assoc.release()
    return len(files)


def _series_key(series_uid: str, key: bytes) -> str:
    """The gate's keyed pseudonym of a series (the trial's pseudonym key is the simulator's too)."""
    from sitebench.qc.gate import Pseudonyms

    return Pseudonyms(key)(series_uid)


def _start_gate(config_path: Path, port: int, log_path: Path) -> subprocess.Popen:
    """``sitebench qc serve`` in its own process (the gate a site would reach), until it says it listens."""
    log_file = open(log_path, "ab")
    process = subprocess.Popen([sys.executable, "-m", "sitebench.cli", "qc", "serve", "--config", str(config_path),
                                "--dicom-port", str(port)], stdout=subprocess.PIPE, stderr=log_file,
                               env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert process.stdout is not None
    deadline = time.time() + 120
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                raise SitebenchError(f"the QC gate did not start (exit {process.returncode}); see its log", log_path)
            continue
        if b'"listening"' in line:
            threading.Thread(target=_drain, args=(process.stdout, log_path.with_suffix(".out")), daemon=True).start()
            return process
    process.kill()
    raise SitebenchError("the QC gate did not start listening within 120 s", log_path)


def _drain(stream: Any, path: Path) -> None:
    with open(path, "ab") as out:
        for line in stream:
            out.write(line)


def run_trial_through_gate(trial_dir: Path, config: TrialConfig, out: Path, *, quiet_seconds: float = 2.0,
                           timeout_s: float = 1800.0, progress: bool = False,
                           log: Callable[[str], None] = lambda m: None) -> GateRun:
    """Lock the trial's protocol, start the gate, send every site's series, and wait for every verdict."""
    from sitebench.qc.protocol import lock_protocol

    index_path = trial_dir / DICOM_INDEX
    if not index_path.exists():
        raise SitebenchError("the simulated trial has no DICOM series (simulate it with dicom: true)", trial_dir)
    series = pd.read_csv(index_path, dtype=str, keep_default_na=False)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "store").exists():
        raise SitebenchError("a gate store is already here; use a new --out", out / "store")
    draft = out / f"{PROTOCOL_NAME}.yaml"
    draft.write_text(yaml.safe_dump(trial_protocol(config), sort_keys=False))
    lock_protocol(draft, who="sitebench demo", why="the simulated trial's locked acquisition protocol",
                  lock_dir=out / "protocols")
    port = _free_port()
    sites = sorted(series["site"].unique())
    intake = {"store": "store", "protocols": "protocols", "audit_key_file": "audit.key",
              "pseudonym_key_file": "pseudonym.key",
              "sites": {site: {"ae_titles": [ae_title(site)]} for site in sites},
              "dicom": {"host": "127.0.0.1", "port": port, "ae_title": GATE_AE, "max_associations": 64},
              "http": None, "folder": None, "quiet_seconds": quiet_seconds, "incomplete_wait_seconds": 30,
              "image_quality": True}
    config_path = out / "qc_intake.yaml"
    config_path.write_text(yaml.safe_dump(intake, sort_keys=False))
    from sitebench.audit.trail import create_audit_key

    create_audit_key(out / "audit.key")  # the trial's audit key, outside the store
    pseudonym_key = secrets.token_bytes(32)  # and its pseudonym key
    write_new_file(out / "pseudonym.key", pseudonym_key.hex().encode() + b"\n", mode=0o600)
    started = time.perf_counter()
    gate = _start_gate(config_path, port, out / "gate.log")
    seconds = {"start": time.perf_counter() - started}
    series = series.assign(series_key=[_series_key(uid, pseudonym_key) for uid in series["series_uid"]], sent=False,
                           held_back="")
    try:
        sent_at = time.perf_counter()
        _send_all(series, trial_dir, port, out, progress)
        seconds["intake"] = time.perf_counter() - sent_at
        run = GateRun(root=out, store=out / "store", config_path=config_path, sent=series,
                      files=int(pd.to_numeric(series.loc[series["sent"], "n_files"]).sum()))
        _wait_for_verdicts(run, timeout_s, progress)
        seconds["verdicts"] = time.perf_counter() - sent_at
    finally:
        gate.terminate()
        try:
            gate.wait(timeout=60)
        except subprocess.TimeoutExpired:
            gate.kill()
    run.seconds = seconds
    (out / "run.json").write_text(json.dumps({"seconds": seconds, "files": run.files, "port": port,
                                              "sender": _storescu() or "pynetdicom"}, indent=2))
    # written last: its presence says the run finished
    series.to_csv(out / "sent.csv", index=False, columns=["scan_id", "kind", "site", "series_key", "n_files",
                                                          "rescan_of", "sent", "held_back"])
    log(run.summary())
    return run


def _send_all(series: pd.DataFrame, trial_dir: Path, port: int, out: Path, progress: bool) -> None:
    """Each site's scanner sends its series in acquisition order; sites send at the same time.

    A re-scan waits for the gate's verdict on the series it replaces and is sent only if that
    failed (a passed series is not re-acquired).
    """
    from sitebench.qc.records import QCRecords, database_url

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(series), desc="sending series to the QC gate", unit="series")
    lock = threading.Lock()
    errors: list[BaseException] = []
    key_of = dict(zip(series["scan_id"], series["series_key"]))

    def verdict_of(key: str, deadline: float) -> str | None:
        records = QCRecords(database_url(out / "store"))
        try:
            while time.time() < deadline:
                rows = [r for r in records.latest_verdicts() if r["series_key"] == key]
                if rows:
                    return str(rows[0]["status"])
                time.sleep(0.5)
        finally:
            records.engine.dispose()
        return None

    def site_sender(rows: pd.DataFrame) -> None:
        try:
            for index, row in rows.iterrows():
                if row["rescan_of"]:
                    status = verdict_of(key_of[row["rescan_of"]], time.time() + 600)
                    if status != "fail":
                        series.loc[index, "held_back"] = f"original {status or 'not judged'}: not re-scanned"
                        continue
                send_series(trial_dir / row["dicom_dir"], port, ae_title(row["site"]))
                with lock:
                    series.loc[index, "sent"] = True
                    if bar:
                        bar.update(1)
        except BaseException as exc:  # noqa: BLE001 - reported after every site has finished
            errors.append(exc)

    threads = [threading.Thread(target=site_sender, args=(rows,), name=f"scanner-{site}")
               for site, rows in series.groupby("site", sort=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if bar:
        bar.close()
    if errors:
        raise errors[0]


def _wait_for_verdicts(run: GateRun, timeout_s: float, progress: bool) -> None:
    """Until every sent series has a verdict (the gate checks a series once it has been quiet)."""
    expected = set(run.sent.loc[run.sent["sent"], "series_key"])
    deadline = time.time() + timeout_s
    records = run.records()
    try:
        while True:
            judged = {r["series_key"] for r in records.latest_verdicts()} & expected
            if judged == expected:
                return
            if time.time() > deadline:
                raise SitebenchError(f"the QC gate judged {len(judged)} of {len(expected)} series within "
                                     f"{timeout_s:.0f} s; see its log", run.root / "gate.log")
            time.sleep(0.5)
    finally:
        records.engine.dispose()


def gated_manifest(run: GateRun, trial_dir: Path, out: Path, statuses: tuple[str, ...] = ("pass", "warn")) -> Path:
    """``qc manifest`` from the passing and warning series (or other ``statuses``: the failed ones, to show
    what the gate changed), with the sponsor's clinical table joined.

    The gate knows series and studies only by pseudonym; the sponsor's table (here the
    simulator's manifest, keyed by its own scan IDs) is joined through the series pseudonym
    the sponsor can compute from the UIDs it holds. Reference label maps are the simulator's,
    reoriented onto the gate's image grid where the two differ.
    """
    from sitebench.qc.to_manifest import verdicts_to_manifest

    records = run.records()
    try:
        gated = verdicts_to_manifest(records, run.store, out, statuses).table
    finally:
        records.engine.dispose()
    sponsor = mf.read_manifest(trial_dir / "manifest.csv", check_hashes=False).with_absolute_paths()
    key_of = dict(zip(run.sent["scan_id"], run.sent["series_key"]))
    sponsor = sponsor.assign(**{mf.SCAN_ID: sponsor[mf.SCAN_ID].map(key_of)}).dropna(subset=[mf.SCAN_ID])
    keep = [c for c in SPONSOR_COLUMNS if c in sponsor] + [mf.LABEL_PATH]
    table = gated.drop(columns=[c for c in keep if c in gated and c != mf.SCAN_ID]).merge(
        sponsor[[mf.SCAN_ID, *keep]], on=mf.SCAN_ID, how="left", validate="one_to_one")
    table[mf.LABEL_PATH] = [_label_on_grid(Path(label), out.parent / image, out.parent / "labels")
                            for label, image in zip(table[mf.LABEL_PATH], table[mf.IMAGE_PATH])]
    table[mf.LABEL_SHA256] = [_sha(out.parent / p) for p in table[mf.LABEL_PATH]]
    mf.write_manifest(table, out)
    return out


def _sha(path: Path) -> str:
    from sitebench.provenance import sha256_file

    return sha256_file(path)


def _label_on_grid(label_path: Path, image_path: Path, folder: Path) -> str:
    """The label map on the image's voxel grid (same axes order and directions), relative to the manifest."""
    import nibabel as nib
    import numpy as np
    from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

    image, label = nib.load(image_path), nib.load(label_path)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{image_path.name.split('.')[0]}_dseg.nii.gz"
    if not target.exists():
        transform = ornt_transform(io_orientation(label.affine), io_orientation(image.affine))
        data = apply_orientation(np.asarray(label.dataobj), transform)
        moved = nib.Nifti1Image(data.astype(np.uint8), label.affine @ nib.orientations.inv_ornt_aff(transform, label.shape))
        if moved.shape != image.shape or not np.allclose(moved.affine, image.affine, atol=1e-3):
            raise SitebenchError(f"the reference label map does not lie on the gate's image grid "
                                 f"({moved.shape} vs {image.shape})", label_path)
        nib.save(moved, target)
    return target.relative_to(folder.parent).as_posix()
