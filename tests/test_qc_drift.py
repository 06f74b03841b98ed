"""Drift against a qualified baseline and robust-z site history (sitebench.qc.drift)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sitebench.errors import SitebenchError
from sitebench.qc.drift import DriftMonitor, SiteHistory, robust_z, scanner_key

REF = Path("/work/shared/data/dicom/dcm_qa_stc/Ref")
SITE = "site-A"
WHEN = "2024-01-01T00:00:00+00:00"


def sidecar(name: str) -> dict:
    path = REF / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    return json.loads(path.read_text())


@pytest.fixture
def prisma() -> dict:  # Siemens Prisma_fit, syngo MR E11, HeadNeck_20, serial 67060
    return sidecar("Siemens_Rest_fMRI_AP_7.json")


@pytest.fixture
def vida() -> dict:  # Siemens MAGNETOM Vida, syngo MR XA10
    return sidecar("Siemens_REST1_w_SMS_PF7-8_6.json")


def qualified(params: dict) -> tuple[DriftMonitor, str]:
    mon = DriftMonitor()
    assert mon.observe(SITE, params, "pass", "1.2.3.base", when=WHEN) == []
    return mon, scanner_key(params)


def test_baseline_is_first_passing_series(prisma):
    mon = DriftMonitor()
    failing = dict(prisma, RepetitionTime=9.9)
    assert mon.observe(SITE, failing, "fail", "1.fail") == []
    scanner = scanner_key(prisma)
    assert scanner == "Siemens|67060"
    assert mon.baseline(SITE, scanner) is None
    assert mon.observe(SITE, prisma, "warn", "1.warn") == []
    assert mon.baseline(SITE, scanner) is None
    assert mon.observe(SITE, prisma, "pass", "1.pass") == []
    base = mon.baseline(SITE, scanner)
    assert base["RepetitionTime"] == prisma["RepetitionTime"]
    assert "AcquisitionTime" not in base and "SeriesNumber" not in base
    # a later passing series does not replace the baseline
    mon.observe(SITE, dict(prisma, RepetitionTime=0.9), "pass", "1.later")
    assert mon.baseline(SITE, scanner)["RepetitionTime"] == prisma["RepetitionTime"]
    assert mon.baseline_series_uid(SITE, scanner) == "1.pass"


def test_identical_series_and_identity_keys_raise_nothing(prisma):
    mon, _ = qualified(prisma)
    again = dict(prisma, AcquisitionTime="11:11:11.0", SeriesNumber=99, SAR=0.5,
                 SeriesInstanceUID="9.9", n_files=12, _missing=["X"])
    assert mon.observe(SITE, again, "pass", "1.2.3.again") == []
    # float within 1e-6 relative is "same"
    tiny = dict(prisma, RepetitionTime=prisma["RepetitionTime"] * (1 + 1e-8))
    assert mon.observe(SITE, tiny, "pass", "1.2.3.tiny") == []


def test_software_change_raised_once(prisma):
    mon, scanner = qualified(prisma)
    upgraded = dict(prisma, SoftwareVersions="syngo MR E11C")
    events = mon.observe(SITE, upgraded, "pass", "1.up1", when="2024-02-01T00:00:00+00:00")
    assert len(events) == 1
    ev = events[0]
    assert (ev.kind, ev.parameter, ev.change) == ("software", "SoftwareVersions", "changed")
    assert (ev.baseline, ev.observed) == ("syngo MR E11", "syngo MR E11C")
    assert (ev.site, ev.scanner, ev.series_uid) == (SITE, scanner, "1.up1")
    assert ev.first_seen == "2024-02-01T00:00:00+00:00"
    assert json.loads(json.dumps(ev.to_dict()))["kind"] == "software"
    assert mon.observe(SITE, upgraded, "pass", "1.up2") == []


def test_xa_style_rename_with_software_change_is_software(prisma):
    mon, _ = qualified(prisma)
    xa = dict(prisma, SoftwareVersions="syngo MR XA30")
    xa["PulseSequenceName"] = xa.pop("SequenceName")
    events = {e.parameter: e for e in mon.observe(SITE, xa, "pass", "1.xa")}
    assert set(events) == {"SoftwareVersions", "SequenceName", "PulseSequenceName"}
    assert all(e.kind == "software" for e in events.values())
    assert events["SequenceName"].change == "disappeared"
    assert events["SequenceName"].observed is None
    assert events["PulseSequenceName"].change == "appeared"
    assert events["PulseSequenceName"].baseline is None
    # without a software change, a rename is a parameter drift
    mon2, _ = qualified(prisma)
    renamed = dict(prisma)
    renamed["PulseSequenceName"] = renamed.pop("SequenceName")
    assert {e.kind for e in mon2.observe(SITE, renamed, "pass", "1.r")} == {"parameter"}


def test_real_vendor_upgrade_vida_vs_prisma_sidecars(prisma, vida):
    # Same physical scanner id forced: the model / software / coil all differ
    mon, _ = qualified(prisma)
    upgraded = dict(vida, DeviceSerialNumber=prisma["DeviceSerialNumber"])
    events = mon.observe(SITE, upgraded, "pass", "1.vida")
    kinds = {e.parameter: e.kind for e in events}
    assert kinds["SoftwareVersions"] == "software"
    assert kinds["ManufacturersModelName"] == "model"
    assert kinds["ReceiveCoilName"] == "coil"
    assert kinds["CoilString"] == "coil"  # appears only in the XA sidecar
    assert kinds["PulseSequenceName"] == "software"
    assert kinds["RepetitionTime"] == "software"  # differs along with the upgrade
    assert set(kinds.values()) == {"software", "model", "coil"}


def test_tr_change_within_tolerance_is_parameter_event(prisma):
    mon, _ = qualified(prisma)
    tr = prisma["RepetitionTime"] * 1.001
    events = mon.observe(SITE, dict(prisma, RepetitionTime=tr), "pass", "1.tr")
    assert [(e.parameter, e.kind) for e in events] == [("RepetitionTime", "parameter")]
    assert events[0].observed == pytest.approx(tr)
    # a different new value is a new event; the same one is not
    assert mon.observe(SITE, dict(prisma, RepetitionTime=tr), "pass", "1.tr2") == []
    assert len(mon.observe(SITE, dict(prisma, RepetitionTime=tr * 1.001), "pass", "1.tr3")) == 1


def test_coil_and_model_changes(prisma):
    mon, _ = qualified(prisma)
    coil = mon.observe(SITE, dict(prisma, ReceiveCoilName="Head_32"), "pass", "1.coil")
    assert [(e.parameter, e.kind) for e in coil] == [("ReceiveCoilName", "coil")]
    model = mon.observe(SITE, dict(prisma, ManufacturersModelName="Prisma"), "pass", "1.model")
    assert [(e.parameter, e.kind) for e in model] == [("ManufacturersModelName", "model")]


def test_list_parameters_compared_elementwise(prisma):
    mon, _ = qualified(prisma)
    iop = list(prisma["ImageOrientationPatientDICOM"])
    iop[0] += 0.01
    events = mon.observe(SITE, dict(prisma, ImageOrientationPatientDICOM=iop), "pass", "1.iop")
    assert [e.parameter for e in events] == ["ImageOrientationPatientDICOM"]


def test_scanners_and_sites_are_separate(prisma):
    mon, _ = qualified(prisma)
    trio = sidecar("Siemens_ax_asc_35sl_6.json")  # another serial: own baseline, and one "scanner" event
    (event,) = mon.observe(SITE, trio, "fail", "1.trio")
    assert (event.kind, event.parameter, event.change, event.series_uid) == ("scanner", "scanner", "appeared", "1.trio")
    assert event.observed == scanner_key(trio) and event.baseline == scanner_key(prisma)
    assert mon.baseline(SITE, scanner_key(trio)) is None
    assert mon.observe(SITE, trio, "pass", "1.trio2") == []  # raised once; this one qualifies it
    assert mon.baseline(SITE, scanner_key(trio)) is not None
    assert mon.observe("site-B", dict(prisma, SoftwareVersions="x"), "warn", "1.b") == []


def test_state_round_trip(prisma):
    mon, scanner = qualified(prisma)
    upgraded = dict(prisma, SoftwareVersions="syngo MR E11C")
    assert len(mon.observe(SITE, upgraded, "pass", "1.up1")) == 1
    reloaded = DriftMonitor(json.loads(json.dumps(mon.state)))
    assert reloaded.baseline(SITE, scanner) == mon.baseline(SITE, scanner)
    assert reloaded.observe(SITE, upgraded, "pass", "1.up2") == []  # already raised
    coil = dict(prisma, ReceiveCoilName="Head_32")
    a = [e.to_dict() for e in mon.observe(SITE, coil, "pass", "1.c", when=WHEN)]
    b = [e.to_dict() for e in reloaded.observe(SITE, coil, "pass", "1.c", when=WHEN)]
    assert a == b and len(a) == 1


def test_bad_input_rejected(prisma):
    with pytest.raises(SitebenchError):
        DriftMonitor().observe(SITE, prisma, "ok", "1")
    with pytest.raises(SitebenchError):
        DriftMonitor({"nope": 1})


def test_robust_z_matches_numpy():
    hist = [10.0, 12.0, 11.5, 9.0, 30.0, 10.5, 11.0]
    med = np.median(hist)
    mad = np.median(np.abs(np.asarray(hist) - med))
    assert robust_z(hist, 20.0) == pytest.approx((20.0 - med) / (1.4826 * mad))
    assert robust_z(hist[:4], 20.0) is None  # fewer than 5
    assert robust_z([5.0] * 6, 7.0) is None  # MAD == 0
    assert robust_z([1.0, 2.0, 3.0, 4.0, float("nan")], 3.0) is None  # NaN dropped -> 4


def test_site_history_flags_outlier_and_keeps_sites_separate():
    sh = SiteHistory()
    rng = np.random.default_rng(0)
    for snr in rng.normal(100.0, 2.0, 12):
        sh.flag("A", {"snr": float(snr), "cnr": 5.0 + float(snr) / 100})
    for snr in rng.normal(50.0, 2.0, 12):
        sh.flag("B", {"snr": float(snr)})
    assert sh.flag("A", {"snr": 101.0}) == []
    hits = sh.flag("A", {"snr": 60.0, "cnr": 6.0})
    assert [h["metric"] for h in hits] == ["snr"]
    assert hits[0]["z"] < -3.5 and hits[0]["n_history"] == 13
    assert len(sh.history("A", "snr")) == 14  # flagged value still recorded
    assert sh.flag("B", {"snr": 50.5}) == []  # typical for B, would be an outlier at A
    assert [h["metric"] for h in sh.flag("B", {"snr": 100.0})] == ["snr"]
    # fewer than 5 values: nothing flagged
    assert SiteHistory().flag("C", {"snr": 1e6}) == []
    reloaded = SiteHistory(json.loads(json.dumps(sh.state)))
    assert reloaded.history("A", "snr") == sh.history("A", "snr")
    assert [h["metric"] for h in reloaded.flag("A", {"snr": 10.0})] == ["snr"]


def test_a_baseline_from_an_older_parser_adopts_the_keys_it_could_not_read(prisma):
    """A sitebench upgrade that learns to read SliceTiming must not report it as having appeared;
    a key the old parser did read and the baseline lacked still appears; adopted keys are compared."""
    from sitebench.qc.dicom_params import KEYS_ADDED_IN

    new_keys = set(KEYS_ADDED_IN[2])
    assert "SliceTiming" in prisma and "SliceTiming" in new_keys
    old_read = {k: v for k, v in prisma.items() if k not in new_keys and k != "InversionTime"}
    mon = DriftMonitor()
    assert mon.observe(SITE, old_read, "pass", "1.2.3.base", when=WHEN) == []
    state = mon.state  # as an earlier sitebench wrote it: no parser_version
    for entry in state["baselines"][SITE].values():
        entry.pop("parser_version")
    mon = DriftMonitor(state)
    events = mon.observe(SITE, {**prisma, "InversionTime": 0.9}, "pass", "1.2.3.next", when=WHEN)
    assert [(e.parameter, e.change) for e in events] == [("InversionTime", "appeared")]
    (entry,) = mon.state["baselines"][SITE].values()
    adopted = set(entry["adopted"])
    assert "SliceTiming" in adopted and adopted <= new_keys and entry["parser_version"] >= 2
    shifted = {**prisma, "InversionTime": 0.9, "SliceTiming": [t + 0.01 for t in prisma["SliceTiming"]]}
    events = mon.observe(SITE, shifted, "pass", "1.2.3.later", when=WHEN)
    assert [(e.parameter, e.change) for e in events] == [("SliceTiming", "changed")]


def test_a_baseline_of_the_current_parser_adopts_nothing(prisma):
    without = {k: v for k, v in prisma.items() if k != "SliceTiming"}
    mon, _ = qualified(without)
    events = mon.observe(SITE, prisma, "pass", "1.2.3.next", when=WHEN)
    assert [(e.parameter, e.change) for e in events] == [("SliceTiming", "appeared")]
