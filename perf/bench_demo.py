"""Total wall time of the demo at its default size, per stage, against the 10-minute goal; and the QC gate's intake
against a bare receiver of the same files.

    .venv/bin/python perf/bench_demo.py [--sites 20 --scans-per-site 5 --workers 2]
    .venv/bin/python perf/bench_demo.py --gate-only [--sites 6 --scans-per-site 4]

Full mode runs the demo (``run_demo``) and prints each stage's wall time from its log marks,
then sends the same series again, with the same concurrency, to a bare receiver and prints the
gate's intake time against it.

``--gate-only`` simulates a DICOM trial, runs it through the gate
(``sitebench.trial_gate.run_trial_through_gate``: ``sitebench qc serve`` in its own process,
one storescu association per series, one sender thread per site) and prints series per minute
and files per second through the gate. Both modes then send the same files, with the same
concurrency, to a bare pynetdicom Storage SCP in this process that only writes each file's raw
bytes and fsyncs it and its folder (the floor for a receiver that acknowledges durably), and
print the ratio gate intake time / bare receiver time. The ratio is what to compare across
machines and commits; the absolute figures depend on the machine and what else runs on it.
The gate's intake time includes the re-scans' wait for the verdict on the series they replace
(a re-scan is sent only once its original failed); the bare receiver sends them straight away.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

GOAL_SECONDS = 600.0


def bare_receiver_seconds(trial_dir: Path, sent_scan_ids: set[str] | None, folder: Path) -> tuple[float, int]:
    """Send the trial's series (those in ``sent_scan_ids``, default all) to a bare Storage SCP; (seconds, files).

    The SCP writes each C-STORE's raw bytes (``event.encoded_dataset()``, no decode) to a new
    file, fsyncs it and its folder, and only then answers success: what any receiver that
    acknowledges durably must at least do. Each site sends its series in order, one storescu
    association per series (:func:`sitebench.trial_gate.send_series`), sites at the same time.
    """
    import pandas as pd
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    from sitebench.datasets.simulator import DICOM_INDEX
    from sitebench.durable import fsync_dir, write_new_file
    from sitebench.trial_gate import GATE_AE, _free_port, ae_title, send_series

    series = pd.read_csv(trial_dir / DICOM_INDEX, dtype=str, keep_default_na=False)
    if sent_scan_ids is not None:
        series = series[series["scan_id"].isin(sent_scan_ids)]
    folder.mkdir(parents=True, exist_ok=True)
    received = [0]
    lock = threading.Lock()

    def on_store(event) -> int:
        data = event.encoded_dataset(include_meta=True)
        write_new_file(folder / uuid.uuid4().hex, data)
        fsync_dir(folder)
        with lock:
            received[0] += 1
        return 0x0000

    import logging

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    ae = AE(ae_title=GATE_AE)
    ae.supported_contexts = AllStoragePresentationContexts
    ae.maximum_pdu_size = 0
    ae.maximum_associations = 64
    port = _free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    errors: list[BaseException] = []

    def site_sender(rows) -> None:
        try:
            for _, row in rows.iterrows():
                send_series(trial_dir / row["dicom_dir"], port, ae_title(row["site"]))
        except BaseException as exc:  # noqa: BLE001 - reported after every site has finished
            errors.append(exc)

    try:
        started = time.perf_counter()
        threads = [threading.Thread(target=site_sender, args=(rows,)) for _, rows in series.groupby("site")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
    finally:
        server.shutdown()
    if errors:
        raise errors[0]
    return seconds, received[0]


def compare_with_bare(gate, trial_dir: Path, scratch: Path) -> None:
    """Print the gate's intake time against the bare receiver's for the same files (same run, same machine)."""
    sent = set(gate.sent.loc[gate.sent["sent"], "scan_id"])
    bare, files = bare_receiver_seconds(trial_dir, sent, scratch / "bare_receiver")
    intake = gate.seconds["intake"]
    print(f"bare receiver (raw bytes, fsync file and folder): {files} files in {bare:.1f} s = "
          f"{files / max(bare, 1e-9):.1f} files/s")
    print(f"gate intake / bare receiver = {intake:.1f} s / {bare:.1f} s = {intake / max(bare, 1e-9):.2f}")


def gate_only(args: argparse.Namespace, scratch: Path) -> None:
    from sitebench.datasets.simulator import TrialConfig, simulate_trial
    from sitebench.trial_gate import run_trial_through_gate

    config = TrialConfig(n_sites=args.sites, scans_per_site=args.scans_per_site, seed=args.seed,
                         workers=args.workers, dicom=True)
    trial_dir = scratch / "trial"
    started = time.perf_counter()
    simulate_trial(config, trial_dir)
    print(f"simulated {args.sites} sites x {args.scans_per_site} scans (DICOM) in {time.perf_counter() - started:.1f} s")
    gate = run_trial_through_gate(trial_dir, config, scratch / "gate")
    n_series = int(gate.sent["sent"].sum())
    s = gate.seconds
    print(f"gate: {n_series} series, {gate.files} files; start {s['start']:.1f} s, intake {s['intake']:.1f} s, "
          f"all verdicts {s['verdicts']:.1f} s after the first send")
    print(f"  {n_series / s['intake'] * 60:.1f} series/min and {gate.files / s['intake']:.1f} files/s through "
          f"the gate's intake; {n_series / s['verdicts'] * 60:.1f} series/min to the last verdict")
    print(gate.per_site().to_string(index=False))
    compare_with_bare(gate, trial_dir, scratch)


def full_demo(args: argparse.Namespace, scratch: Path) -> None:
    from sitebench.pipeline import run_demo

    marks: list[tuple[str, float]] = []

    def log(message: str) -> None:
        marks.append((message, time.perf_counter()))

    out = args.out or scratch / "demo"
    start = time.perf_counter()
    result = run_demo(out, sites=args.sites, scans_per_site=args.scans_per_site, workers=args.workers,
                      progress=False, log=log)
    total = time.perf_counter() - start
    marks.append(("done", time.perf_counter()))
    n = args.sites * args.scans_per_site
    print(f"demo: {args.sites} sites x {args.scans_per_site} scans = {n} scans, "
          f"{len(result.run.models)} model versions, {args.workers} workers, {os.cpu_count()} cores")
    for (message, at), (_, nxt) in zip(marks, marks[1:]):
        print(f"  {nxt - at:7.1f} s  {message.splitlines()[0]}")
    print(f"total wall time {total:.1f} s = {total / GOAL_SECONDS:.2f} x the 600 s goal "
          f"({n * len(result.run.models) / max(result.run.seconds, 1e-9):.2f} predictions/s in the runner)")
    gate = result.gate
    if gate is None or not gate.seconds.get("intake"):
        print("(the demo ran no QC gate: no intake to compare)")
        return
    n_series = int(gate.sent["sent"].sum())
    print(f"gate: {n_series} series, {gate.files} files, intake {gate.seconds['intake']:.1f} s "
          f"= {60 * n_series / gate.seconds['intake']:.1f} series/min, {gate.files / gate.seconds['intake']:.1f} files/s"
          + (f"; last verdict {gate.seconds['verdicts']:.1f} s after the first send"
             if gate.seconds.get("verdicts") else ""))
    compare_with_bare(gate, Path(out) / "trial", scratch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--scans-per-site", type=int, default=None,
                        help="default: the demo's (5), or 4 with --gate-only")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="the simulated trial's seed (--gate-only)")
    parser.add_argument("--gate-only", action="store_true",
                        help="only simulate a DICOM trial and send it through the QC gate, against a bare receiver")
    parser.add_argument("--out", type=Path, help="keep the output here (default: a temp folder)")
    args = parser.parse_args()
    if args.scans_per_site is None:
        from sitebench.pipeline import DEMO_SCANS_PER_SITE

        args.scans_per_site = 4 if args.gate_only else DEMO_SCANS_PER_SITE

    with tempfile.TemporaryDirectory() as tmp:
        scratch = args.out if args.gate_only and args.out else Path(tmp)
        if args.gate_only:
            gate_only(args, scratch)
        else:
            full_demo(args, scratch)


if __name__ == "__main__":
    main()
