"""An upgrade puts a site up for re-validation until a signed report covers it.

Real inputs throughout: the real GE 3D T1 (dcm_qa_deident) through the real gate against a
real locked protocol, outcomes recorded in a real SQLite QC database; reports locked with the
real lock writer and signed with real Ed25519 keys; the command line through ``sitebench.cli``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from sitebench.cli import main
from sitebench.datasets import manifest as mf
from sitebench.qc.gate import Gate
from sitebench.qc.protocol import load_protocol
from sitebench.qc.records import QCRecords, database_url
from sitebench.reports.coverage import (UNCOVERED_TAG, GateRows, find_reports, report_coverage, revalidation_pending,
                                        revalidation_status, sites_not_covered)
from sitebench.reports.lock import write_lock
from sitebench.reports.signing import generate_key, sign_report
from conftest import SHARED_DATA, run_cli

T1 = SHARED_DATA / "dicom" / "dcm_qa_deident" / "In"
pytestmark = pytest.mark.skipif(not T1.exists(), reason="needs ../shared/data/dicom")

BASELINE_SW = "24\\LX\\MR Software release:HD16.0_V02_1131.a"  # what the real series carries
UPGRADED_SW = "25\\LX\\MR Software release:RX29.1"


def copy_series(out: Path, **attrs) -> Path:
    """A real copy of the T1 as a new series (new SeriesInstanceUID), with some attributes changed."""
    out.mkdir(parents=True)
    uid = pydicom.uid.generate_uid()
    for f in sorted(T1.iterdir()):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = uid
        for key, value in attrs.items():
            setattr(ds, key, value)
        ds.save_as(out / f.name)
    return out


@pytest.fixture(scope="module")
def gate(t1_protocols, tmp_path_factory):
    """A gate store: S07 qualified, then upgraded; S16 qualified, then a second scanner for the same protocol."""
    root = tmp_path_factory.mktemp("revalidation")
    store = root / "qc-store"
    store.mkdir()
    records = QCRecords(database_url(store))
    (protocol_path,) = sorted(t1_protocols.glob("*.yaml"))
    checker = Gate([load_protocol(protocol_path)], image_quality=False)
    series = {
        "S07 baseline": ("S07", T1),
        "S07 upgraded": ("S07", copy_series(root / "upgraded", SoftwareVersions=UPGRADED_SW)),
        "S16 baseline": ("S16", copy_series(root / "s16")),
        "S16 new scanner": ("S16", copy_series(root / "s16b", DeviceSerialNumber="77001122")),
    }
    outcomes = {}
    for name, (site, folder) in series.items():
        (outcome,) = checker.check_files(sorted(folder.iterdir()), site=site)
        assert outcome.status == "pass", outcome.summary()
        records.record_outcome(outcome)
        outcomes[name] = outcome
    return {"store": store, "records": records, "outcomes": outcomes, "root": root}


def rows(gate) -> GateRows:
    records = gate["records"]
    return GateRows(records.drift_events(), records.latest_verdicts())


def write_manifest(path: Path, verdicts: list[dict]) -> Path:
    """The data manifest a report locks, with the columns `sitebench qc manifest` writes from these verdicts."""
    table = pd.DataFrame([{mf.SCAN_ID: v["series_key"], mf.SUBJECT_ID: v["study_key"], mf.SITE: v["site"],
                           mf.SCANNER_ID: v["scanner"], mf.VENDOR: v["manufacturer"], mf.SCANNER_MODEL: v["model"],
                           mf.SOFTWARE_VERSION: v["software_version"], mf.FIELD_STRENGTH: v["field_strength"]}
                          for v in verdicts])
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return path


def locked_report(reports: Path, version: int, verdicts: list[dict]) -> Path:
    """A real locked report ``<reports>/gm-unet/vNNN`` resting on a data manifest of these scans and gm-unet v1."""
    from sitebench.models.registry import BUILTIN_DIR

    folder = reports / "gm-unet" / f"v{version:03d}"
    (folder / "tables").mkdir(parents=True)
    (folder / "report.html").write_text("<html><h1>gm-unet validation</h1></html>")
    (folder / "tables" / "metrics.csv").write_text("site,mae\nS07,27.8\nS16,25.1\n")
    manifest = write_manifest(reports.parent / "trial" / f"manifest-v{version:03d}.csv", verdicts)
    write_lock(folder, {"report.html": folder / "report.html", "metrics": folder / "tables" / "metrics.csv"},
               {"data manifest": manifest, "weights gm-unet": BUILTIN_DIR / "gm_unet_v1" / "models" / "model.pt"},
               {"name": "gm-unet", "version": version}, {"seed": 0})
    return folder


@pytest.fixture
def keys(tmp_path):
    return generate_key(tmp_path / "keys" / "qa")


def verdicts_of(gate, *names):
    keys = {gate["outcomes"][n].series_key for n in names}
    return [v for v in gate["records"].latest_verdicts() if v["series_key"] in keys]


def test_a_software_drift_event_and_a_new_scanner_put_their_sites_up_for_revalidation(gate):
    gate_rows = rows(gate)
    upgraded, new_scanner = gate["outcomes"]["S07 upgraded"], gate["outcomes"]["S16 new scanner"]
    assert any(e["kind"] == "software" and e["site"] == "S07" for e in gate_rows.drift_events)
    (event,) = [e for e in gate_rows.drift_events if e["site"] == "S16"]  # the new scanner's own event
    assert event["kind"] == "scanner" and event["series_key"] == new_scanner.series_key

    s07, s16 = revalidation_pending(gate_rows.drift_events, gate_rows.latest_verdicts, [])
    (change,) = s07.changes
    assert (s07.site, change.kind, change.before, change.after) == ("S07", "software", BASELINE_SW, UPGRADED_SW)
    assert change.since_series == upgraded.series_key and change.since_utc == upgraded.checked_utc
    assert change.scanner_id == upgraded.scanner and change.scanner_id.startswith("scanner-")
    assert s07.line() == (f"S07: software {BASELINE_SW} -> {UPGRADED_SW} since series {upgraded.series_key} "
                          f"({upgraded.checked_utc[:10]}); no signed report covers {UPGRADED_SW} at S07 "
                          "(no reports given)")
    (change,) = s16.changes
    assert change.kind == "scanner" and change.after == new_scanner.scanner
    assert change.before == gate["outcomes"]["S16 baseline"].scanner != new_scanner.scanner
    assert change.since_series == new_scanner.series_key and change.software_version == BASELINE_SW
    assert s16.to_dict()["pending"] and s16.to_frame().loc[0, "kind"] == "scanner"

    # a store recorded before the monitor raised 'scanner' events: the latest verdicts still show the new scanner
    older = [e for e in gate_rows.drift_events if e["kind"] != "scanner"]
    (_, from_verdicts) = revalidation_pending(older, gate_rows.latest_verdicts, [])
    assert from_verdicts.changes[0].describe() == s16.changes[0].describe()


def test_a_signed_report_whose_manifest_has_the_new_version_clears_it(gate, tmp_path, keys):
    key, pub = keys
    gate_rows = rows(gate)
    everything = locked_report(tmp_path / "reports", 1, gate_rows.latest_verdicts)
    sign_report(everything, key, "A. Approver", "approval")
    coverage = report_coverage(everything, [pub])
    assert coverage.signed and coverage.approvals == 1 and not coverage.problems, coverage.problems
    assert coverage.label == "report gm-unet v001" and coverage.sites == ["S07", "S16"]
    assert coverage.software_versions("S07") == sorted([BASELINE_SW, UPGRADED_SW])
    assert coverage.model_versions == ["gm-unet"] and len(coverage.to_frame()) == 4  # S16 has two scanners
    assert coverage.covers("S07", UPGRADED_SW) and coverage.to_dict()["signed"]
    assert revalidation_pending(gate_rows.drift_events, gate_rows.latest_verdicts, [coverage]) == []

    # a signed report of the scans before the upgrade only does not clear the upgrade (nor the new scanner)
    before = locked_report(tmp_path / "reports", 2, verdicts_of(gate, "S07 baseline", "S16 baseline"))
    sign_report(before, key, "A. Approver", "approval")
    old = report_coverage(before, [pub])
    assert old.signed and not old.covers("S07", UPGRADED_SW)
    s07, s16 = revalidation_pending(gate_rows.drift_events, gate_rows.latest_verdicts, [old])
    assert s07.reasons == [f"no signed report covers {UPGRADED_SW} at S07"]
    assert s16.changes[0].kind == "scanner"
    assert find_reports(tmp_path / "reports") == [everything, before]


def test_unsigned_review_only_unkeyed_and_tampered_reports_do_not_clear_it(gate, tmp_path, keys):
    key, pub = keys
    gate_rows = rows(gate)

    def pending(report):
        return revalidation_pending(gate_rows.drift_events, gate_rows.latest_verdicts, [report])

    unsigned = report_coverage(locked_report(tmp_path / "reports", 1, gate_rows.latest_verdicts), [pub])
    assert not unsigned.signed and unsigned.includes("S07", UPGRADED_SW)
    s07 = pending(unsigned)[0]
    assert s07.site == "S07" and "report gm-unet v001 includes it but does not verify" in s07.reasons[0]
    assert "carries no sign-off" in s07.reasons[0]

    reviewed = locked_report(tmp_path / "reports", 2, gate_rows.latest_verdicts)
    sign_report(reviewed, key, "R. Reviewer", "review")
    review_only = report_coverage(reviewed, [pub])
    assert review_only.verified and not review_only.signed
    assert "no approval sign-off (only review)" in pending(review_only)[0].reasons[0]

    approved = locked_report(tmp_path / "reports", 3, gate_rows.latest_verdicts)
    sign_report(approved, key, "A. Approver", "approval")
    unkeyed = report_coverage(approved)  # no public key: sign-offs are not checked, so nothing counts
    assert not unkeyed.signed and "sign-offs not checked (no public key given)" in pending(unkeyed)[0].reasons[0]
    stranger = generate_key(tmp_path / "keys" / "stranger")[1]
    assert not report_coverage(approved, [stranger]).signed

    # signed over the scans before the upgrade, then the manifest is edited to claim the upgraded scans
    before = locked_report(tmp_path / "reports", 4, verdicts_of(gate, "S07 baseline", "S16 baseline"))
    sign_report(before, key, "A. Approver", "approval")
    manifest = tmp_path / "trial" / "manifest-v004.csv"
    write_manifest(manifest, gate_rows.latest_verdicts)
    tampered = report_coverage(before, [pub])
    assert not tampered.signed and tampered.manifest is None and not tampered.scans
    assert any("data manifest" in p and "changed" in p for p in tampered.problems), tampered.problems
    assert [p.site for p in pending(tampered)] == ["S07", "S16"]


def test_qc_status_shows_revalidation_pending_text_and_json(gate, tmp_path, keys, capsys):
    key, pub = keys
    store = gate["store"]
    upgraded = gate["outcomes"]["S07 upgraded"]

    assert main(["qc", "status", "--store", str(store)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("re-validation")
    assert [line.split()[0] for line in out if line.endswith("pending")] == ["S07", "S16"]
    (line,) = [line for line in out if line.startswith("re-validation pending: S07:")]
    assert f"since series {upgraded.series_key}" in line and "(no reports given)" in line

    # a signed report of everything except the second scanner at S16
    reports = tmp_path / "reports"
    sign_report(locked_report(reports, 1, verdicts_of(gate, "S07 baseline", "S07 upgraded", "S16 baseline")),
                key, "A. Approver", "approval")
    args = ["qc", "status", "--store", str(store), "--reports", str(reports), "--public-key", str(pub)]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    row = {line.split()[0]: line for line in out[1:3]}
    assert not row["S07"].endswith("pending") and row["S16"].endswith("pending")
    (line,) = [line for line in out if line.startswith("re-validation pending:")]
    assert line.startswith("re-validation pending: S16: new scanner ") and "no signed report covers scanner" in line

    assert main(args + ["--json"]) == 0
    table = {r["site"]: r for r in json.loads(capsys.readouterr().out)}
    assert table["S07"]["revalidation"] == {"status": "", "pending": False, "reports_given": True, "line": "",
                                            "changes": []}
    s16 = table["S16"]["revalidation"]
    assert s16["status"] == "pending" and s16["changes"][0]["kind"] == "scanner"
    assert s16["changes"][0]["since_series"] == gate["outcomes"]["S16 new scanner"].series_key

    # without the key the same report does not count: both sites pending, and the line says why
    assert main(args[:-2]) == 0
    out = capsys.readouterr().out
    assert "re-validation pending: S07:" in out and "sign-offs not checked (no public key given)" in out

    empty = tmp_path / "nothing"
    empty.mkdir()
    assert main(["qc", "status", "--store", str(store), "--reports", str(empty)]) == 2
    assert "no reports here" in capsys.readouterr().err


@pytest.mark.slow
def test_promote_names_uncovered_sites_and_require_coverage_refuses(gate, tmp_path, keys, capsys, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # mlflow's default artifact root is the working folder
    key, pub = keys
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["models", "register", "builtin:gm_unet_v1", "--name", "gm-unet", "--tracking-uri", uri]) == 0
    before = locked_report(tmp_path / "reports", 1, verdicts_of(gate, "S07 baseline", "S16 baseline"))
    sign_report(before, key, "A. Approver", "approval")
    promote = ["models", "promote", "gm-unet", "1", "--alias", "validated", "--report", str(before),
               "--public-key", str(pub), "--tracking-uri", uri, "--qc-store", str(gate["store"])]
    upgraded, new_scanner = gate["outcomes"]["S07 upgraded"], gate["outcomes"]["S16 new scanner"]
    expected = (f"report gm-unet v001 does not cover: S07 ({UPGRADED_SW}, since {upgraded.checked_utc[:10]}), "
                f"S16 (new scanner, since {new_scanner.checked_utc[:10]})")

    refused = run_cli(*promote, "--require-coverage", cwd=tmp_path, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert expected in line and "not promoted (--require-coverage)" in line
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert "validated" not in client.get_model_version("gm-unet", "1").aliases
    assert UNCOVERED_TAG not in client.get_model_version("gm-unet", "1").tags

    capsys.readouterr()
    assert main(promote) == 0  # a warning: promotion itself succeeds
    out = capsys.readouterr().out
    assert "gm-unet/1 is now @validated" in out and f"warning: {expected}" in out
    version = client.get_model_version("gm-unet", "1")
    assert "validated" in version.aliases
    assert version.tags[UNCOVERED_TAG] == expected.split("does not cover: ")[1]

    # the promotion result names them too; a report covering every site passes --require-coverage
    from sitebench.promotion import promote_model_version

    gate_rows = rows(gate)
    everything = locked_report(tmp_path / "reports", 2, gate_rows.latest_verdicts)
    sign_report(everything, key, "A. Approver", "approval")
    info = promote_model_version("gm-unet", "1", "validated", uri, report=everything, public_keys=[pub],
                                 gate_rows=gate_rows, require_coverage=True)
    assert info["uncovered"] == "" and info["uncovered_sites"] == []
    assert client.get_model_version("gm-unet", "1").tags[UNCOVERED_TAG] == ""
    sites = sites_not_covered(gate_rows.drift_events, gate_rows.latest_verdicts, report_coverage(before, [pub]))
    assert [(p.site, p.kinds) for p in sites] == [("S07", ["software"]), ("S16", ["scanner"])]


def test_require_coverage_needs_the_gate(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["models", "promote", "gm-unet", "1", "--alias", "candidate", "--tracking-uri", uri,
                 "--require-coverage"]) == 2
    assert "--require-coverage needs --qc-store" in capsys.readouterr().err
    status = revalidation_status(GateRows([], []))
    assert status.pending == [] and "0 site(s)" in status.summary()


def test_a_model_change_of_the_same_scanner_is_pending_until_that_model_is_covered(t1_protocols, tmp_path, keys):
    key, pub = keys
    (tmp_path / "store").mkdir()
    records = QCRecords(database_url(tmp_path / "store"))
    (protocol_path,) = sorted(t1_protocols.glob("*.yaml"))
    checker = Gate([load_protocol(protocol_path)], image_quality=False)
    outcomes = []
    upgraded_model = copy_series(tmp_path / "s21b", ManufacturerModelName="Signa Premier")
    for folder in (copy_series(tmp_path / "s21"), upgraded_model):
        (outcome,) = checker.check_files(sorted(folder.iterdir()), site="S21")
        records.record_outcome(outcome)
        outcomes.append(outcome)
    events, verdicts = records.drift_events(), records.latest_verdicts()
    (s21,) = revalidation_pending(events, verdicts, [])
    (change,) = s21.changes
    assert (change.kind, change.before, change.after) == ("model", "Signa HDxt", "Signa Premier")
    assert change.scanner_id == outcomes[0].scanner == outcomes[1].scanner  # same serial: same scanner
    assert change.since_series == outcomes[1].series_key

    old_model = tmp_path / "reports"
    sign_report(locked_report(old_model, 1, verdicts[:1]), key, "A. Approver", "approval")
    assert revalidation_pending(events, verdicts, [report_coverage(old_model / "gm-unet" / "v001", [pub])])
    sign_report(locked_report(old_model, 2, verdicts), key, "A. Approver", "approval")
    assert revalidation_pending(events, verdicts, [report_coverage(old_model / "gm-unet" / "v002", [pub])]) == []
