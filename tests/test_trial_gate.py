"""The simulated trial's story, told by the real upload-time gate, checked against what the simulator injected.

One trial (six sites, the default story folded into them) is simulated as DICOM and sent, site by
site in acquisition order, over C-STORE to a real ``sitebench qc serve`` (``run_trial_through_gate``);
the gate's verdicts, deviations and drift events are then read from its QC database. Every
expectation comes from ``truth.json`` (its ``events`` block and per-scan truth) and from the
simulator's ``dicom_series.csv``, never from an earlier run's output. Scans are joined to the gate's
verdicts through the series pseudonym, the HMAC of the SeriesInstanceUID with the trial's pseudonym
key, which the sponsor (who holds the key and the UIDs) can compute, and nobody else can confirm.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from sitebench.datasets import manifest as mf
from sitebench.datasets.simulator import DICOM_INDEX, TrialConfig, simulate_trial
from sitebench.qc.gate import Pseudonyms, uid_key
from sitebench.trial_gate import GateRun, gated_manifest, run_trial_through_gate

pytestmark = pytest.mark.dicom_net  # starts `sitebench qc serve` and sends every series over C-STORE

PASSING = ("pass", "warn")


@dataclass
class Story:
    """One gate run of the story trial, and everything the tests read from it."""

    trial_dir: Path
    truth: dict[str, Any]
    series: pd.DataFrame  # dicom_series.csv in acquisition order, with the series pseudonym
    gate: GateRun
    verdicts: dict[str, dict[str, Any]]  # series_key -> latest verdict
    deviations: dict[str, list[dict[str, Any]]]  # series_key -> its latest verdict's (non-pass) deviations
    drift: list[dict[str, Any]]
    manifest: pd.DataFrame  # the gated manifest

    @property
    def events(self) -> dict[str, Any]:
        return self.truth["events"]

    def row(self, scan_id: str) -> pd.Series:
        rows = self.series[self.series["scan_id"] == scan_id]
        assert len(rows) == 1, f"{scan_id} is {len(rows)} rows of {DICOM_INDEX}, not one"
        return rows.iloc[0]

    def key(self, scan_id: str) -> str:
        return str(self.row(scan_id)["series_key"])

    def at_site(self, site: str, kind: str | None = None) -> pd.DataFrame:
        rows = self.series[self.series["site"] == site]
        return rows if kind is None else rows[rows["kind"] == kind]

    def verdict(self, scan_id: str) -> dict[str, Any]:
        key = self.key(scan_id)
        assert key in self.verdicts, f"{self.describe(scan_id)} has no verdict from the gate"
        return self.verdicts[key]

    def deviating(self, scan_id: str, parameter: str) -> list[dict[str, Any]]:
        """The not-passing checks of this parameter in the scan's latest verdict."""
        return [d for d in self.deviations.get(self.key(scan_id), []) if d["parameter"] == parameter]

    def describe(self, scan_id: str) -> str:
        r = self.row(scan_id)
        return f"{scan_id} ({r['kind']} at {r['site']}, acquired {r['acquired']}, series {r['series_key']})"


@pytest.fixture(scope="module")
def story(tmp_path_factory) -> Story:
    """The default story in six sites, simulated as DICOM and sent through the gate once (minutes on a slow machine)."""
    root = tmp_path_factory.mktemp("trial_gate")
    config = TrialConfig(n_sites=6, scans_per_site=4, seed=7, dicom=True, workers=2)
    trial = simulate_trial(config, root / "trial")
    gate = run_trial_through_gate(trial.out_dir, config, root / "gate")
    manifest_path = gated_manifest(gate, trial.out_dir, root / "gated" / "manifest.csv")
    series = pd.read_csv(trial.out_dir / DICOM_INDEX, dtype=str, keep_default_na=False)
    series = series.sort_values(["acquired", "scan_id"]).reset_index(drop=True)  # acquisition order
    keyed = Pseudonyms(bytes.fromhex((root / "gate" / "pseudonym.key").read_text()))
    series["series_key"] = [keyed(uid) for uid in series["series_uid"]]
    assert not set(series["series_key"]) & {uid_key(uid) for uid in series["series_uid"]}  # not the plain hash
    records = gate.records()
    try:
        latest = records.latest_verdicts()
        verdicts = {v["series_key"]: v for v in latest}
        deviations = {v["series_key"]: records.deviations_of(v["id"]) for v in latest}
        drift = records.drift_events()
    finally:
        records.engine.dispose()
    truth = json.loads((trial.out_dir / "truth.json").read_text())
    return Story(trial_dir=trial.out_dir, truth=truth, series=series, gate=gate, verdicts=verdicts,
                 deviations=deviations, drift=drift,
                 manifest=pd.read_csv(manifest_path, dtype={mf.SCAN_ID: str}, keep_default_na=False))


def _event(story: Story, name: str) -> dict[str, Any]:
    """The truth of one scripted event, which this trial must actually play (else a test would pass vacuously)."""
    event = story.events.get(name)
    assert event, f"truth.json has no {name!r} event: the story trial does not play it"
    assert not story.at_site(event["site"]).empty, f"{name} site {event['site']} sent no series"
    return event


def _before(story: Story, site: str, scan_id: str) -> pd.DataFrame:
    """The site's series acquired before ``scan_id`` (acquisition order of dicom_series.csv)."""
    rows = story.at_site(site)
    position = rows.index[rows["scan_id"] == scan_id]
    assert len(position) == 1, f"{scan_id} is not a series of {site}"
    return rows.loc[rows.index < position[0]]


def test_every_series_reached_the_gate_under_its_pseudonym(story):
    sent = story.gate.sent.set_index("scan_id")
    for row in story.series.itertuples():
        assert row.scan_id in sent.index, f"{row.scan_id} ({row.site}) is missing from the gate run's sent.csv"
        assert sent.loc[row.scan_id, "series_key"] == row.series_key, (
            f"{row.scan_id}: the gate run keys it {sent.loc[row.scan_id, 'series_key']}, "
            f"the keyed pseudonym of its SeriesInstanceUID is {row.series_key}")
        if sent.loc[row.scan_id, "sent"]:
            assert row.series_key in story.verdicts, f"{story.describe(row.scan_id)} was sent but has no verdict"
    # held back is only ever a re-scan whose original did not fail
    for scan_id, why in sent.loc[~sent["sent"], "held_back"].items():
        original = sent.loc[scan_id, "rescan_of"]
        assert original, f"{scan_id} was not sent, and is no re-scan ({why!r})"
        assert story.verdict(original)["status"] != "fail", (
            f"re-scan {scan_id} was held back ({why!r}) although its original {story.describe(original)} failed")


def test_software_upgrade_drifts_on_its_first_upgraded_series(story):
    event = _event(story, "software_upgrade")
    site, first = event["site"], event["first_scan"]
    assert first, f"truth.json names no first upgraded scan at {site}"
    upgraded = {s["scan_id"] for s in story.truth["scans"] if s["upgraded"]}
    site_scans = story.at_site(site, "scan")
    in_order = [s for s in site_scans["scan_id"] if s in upgraded]
    assert in_order and in_order[0] == first, (
        f"truth's first upgraded scan {first} is not the first upgraded series of {site} by acquisition: {in_order}")
    earlier = _before(story, site, first)
    assert not earlier.empty, f"{site} sent nothing before its upgrade ({first}): no baseline to drift from"

    software = [e for e in story.drift if e["kind"] == "software"]
    keyed = {e["series_key"] for e in software if e["site"] == site}
    assert story.key(first) in keyed, (
        f"no 'software' drift event on {story.describe(first)}, the first series after the upgrade to "
        f"{event['to']}; software events at {site} are on series {sorted(keyed)}")
    on_first = [e for e in software if e["series_key"] == story.key(first) and e["parameter"] == "SoftwareVersions"]
    assert on_first and event["to"] in str(on_first[0]["observed"]), (
        f"{story.describe(first)}: its SoftwareVersions drift event does not show {event['to']}: {on_first}")
    for scan_id in earlier["scan_id"]:
        assert story.key(scan_id) not in keyed, (
            f"'software' drift event on {story.describe(scan_id)}, acquired before the upgrade's first series {first}")
    by_key = dict(zip(story.series["series_key"], story.series["scan_id"]))
    for e in software:
        scan_id = by_key.get(e["series_key"], e["series_key"])
        assert scan_id in upgraded, (
            f"'software' drift event ({e['parameter']}: {e['baseline']!r} -> {e['observed']!r}) at {e['site']} on "
            f"{scan_id}, which truth.json says was not upgraded")


def test_short_coverage_series_fail_at_upload_and_their_rescans_pass(story):
    event = _event(story, "coverage_loss")
    short, rescans = set(event["scans"]), event["rescans"]
    assert short and rescans, f"truth.json's coverage loss at {event['site']} has no short scans or no re-scans"
    for scan_id in sorted(short):
        verdict = story.verdict(scan_id)
        assert verdict["status"] == "fail", (
            f"{story.describe(scan_id)} lost {event['missing_superior_mm']} mm of coverage but the gate said "
            f"{verdict['status']}")
        coverage = story.deviating(scan_id, "SliceCoverageMM")
        assert any(d["rule"] == "coverage" and d["status"] == "fail" for d in coverage), (
            f"{story.describe(scan_id)} failed without a failing SliceCoverageMM check: "
            f"{story.deviations.get(story.key(scan_id))}")
    for rescan, original in sorted(rescans.items()):
        assert original in short, f"re-scan {rescan} replaces {original}, which truth.json does not list as short"
        assert story.gate.sent.set_index("scan_id").loc[rescan, "sent"], (
            f"re-scan {rescan} of failed {original} was never sent to the gate")
        verdict = story.verdict(rescan)
        assert verdict["status"] in PASSING, (
            f"re-scan {story.describe(rescan)} of {original} got {verdict['status']}: "
            f"{story.deviations.get(story.key(rescan))}")
        assert not story.deviating(rescan, "SliceCoverageMM"), (
            f"re-scan {story.describe(rescan)} still has a coverage deviation")
    # and no full-coverage series anywhere is held to have lost coverage
    for scan_id in story.series.loc[story.series["kind"] == "scan", "scan_id"]:
        if scan_id not in short and story.key(scan_id) in story.verdicts:
            assert not story.deviating(scan_id, "SliceCoverageMM"), (
                f"{story.describe(scan_id)} has full coverage in truth.json but a SliceCoverageMM deviation: "
                f"{story.deviating(scan_id, 'SliceCoverageMM')}")


def test_tr_drift_deviates_from_the_series_it_starts_on_and_not_before(story):
    event = _event(story, "protocol_drift")
    site, first, drifted = event["site"], event["first_scan"], set(event["scans"])
    assert event["parameter"] == "RepetitionTime", f"the story drifts {event['parameter']}, not TR"
    assert first and first in drifted, f"truth.json's drift first scan {first} is not one of its drifted {drifted}"
    site_scans = story.at_site(site, "scan")["scan_id"].tolist()
    assert drifted <= set(site_scans), f"drifted scans {sorted(drifted - set(site_scans))} are not {site}'s"
    start = site_scans.index(first)
    assert start > 0, f"the drift starts on {site}'s first series {first}: nothing before it to compare"
    for scan_id in site_scans[:start]:
        assert scan_id not in drifted, f"{scan_id} is drifted in truth.json but acquired before the start {first}"
        assert not story.deviating(scan_id, "RepetitionTime"), (
            f"{story.describe(scan_id)}, acquired before the drift starts ({first}), has a RepetitionTime deviation: "
            f"{story.deviating(scan_id, 'RepetitionTime')}")
    for scan_id in site_scans[start:]:
        assert scan_id in drifted, f"{scan_id} is acquired after the drift start {first} but not drifted in truth"
        tr = story.deviating(scan_id, "RepetitionTime")
        assert tr and all(d["status"] != "pass" for d in tr), (
            f"{story.describe(scan_id)} is drifted (TR x {event['factor']}) but its verdict "
            f"({story.verdict(scan_id)['status']}) has no RepetitionTime deviation: "
            f"{story.deviations.get(story.key(scan_id))}")
    # exactly the drifted series: no other site's series deviates in TR
    for scan_id in story.series.loc[story.series["kind"] == "scan", "scan_id"]:
        if scan_id not in drifted and story.key(scan_id) in story.verdicts:
            assert not story.deviating(scan_id, "RepetitionTime"), (
                f"{story.describe(scan_id)} is not drifted but has a RepetitionTime deviation: "
                f"{story.deviating(scan_id, 'RepetitionTime')}")


def test_the_flair_sent_to_the_t1w_gate_is_unmatched(story):
    event = _event(story, "unmatched_series")
    rows = story.series[story.series["kind"] == "unmatched"]
    assert event["count"] >= 1 and len(rows) == event["count"], (
        f"truth.json says {event['count']} unmatched series, {DICOM_INDEX} lists {rows['scan_id'].tolist()}")
    for row in rows.itertuples():
        assert row.site == event["site"], f"unmatched series {row.scan_id} is at {row.site}, not {event['site']}"
        verdict = story.verdict(row.scan_id)
        assert verdict["status"] == "unmatched" and verdict["protocol"] is None, (
            f"{story.describe(row.scan_id)} ({event['series_description']}) was judged {verdict['status']} "
            f"against protocol {verdict['protocol']!r}; no locked protocol matches it")
        assert not story.deviations.get(row.series_key), (
            f"{story.describe(row.scan_id)} is unmatched but has deviations {story.deviations[row.series_key]}")
    unmatched = {v["series_key"] for v in story.verdicts.values() if v["status"] == "unmatched"}
    by_key = dict(zip(story.series["series_key"], story.series["scan_id"]))
    assert unmatched == set(rows["series_key"]), (
        f"unmatched verdicts on {sorted(by_key.get(k, k) for k in unmatched)}, expected only "
        f"{rows['scan_id'].tolist()}")


class StoryNotPlayed(AssertionError):
    """truth.json says the trial does not play an event the way the story tells it (not a gate failure)."""


def test_a_scanner_new_to_its_site_raises_a_scanner_event_on_its_first_series(story):
    """A scanner's first series at a site where another scanner already passed a series is the 'scanner' event
    (an added second scanner, or a replacement); no other series raises one. Scanners from dicom_series.csv."""
    expected: dict[str, str] = {}  # series_key -> why
    for site, rows in story.series[story.series["kind"] == "scan"].groupby("site", sort=True):
        qualified: list[str] = []  # scanners with a passing series so far: the gate's baselines
        announced: set[str] = set()
        for row in rows.itertuples():  # acquisition order, the order each site sends in
            verdict = story.verdicts.get(row.series_key)
            if verdict is None:
                continue  # held back: never reached the gate
            if row.scanner_id not in qualified and qualified and row.scanner_id not in announced:
                expected[row.series_key] = (f"{story.describe(row.scan_id)}: first series of {row.scanner_id} "
                                            f"after {', '.join(qualified)}")
                announced.add(row.scanner_id)
            if verdict["status"] == "pass" and row.scanner_id not in qualified:
                qualified.append(row.scanner_id)
    assert expected, "no site of this trial has a second scanner after a passing series: nothing to check"
    raised = {e["series_key"]: e for e in story.drift if e["kind"] == "scanner"}
    by_key = dict(zip(story.series["series_key"], story.series["scan_id"]))
    for key, why in expected.items():
        assert key in raised, f"no 'scanner' drift event on {why}, after another scanner of its site"
    for key, e in raised.items():
        assert key in expected, (
            f"'scanner' drift event at {e['site']} on {story.describe(by_key[key]) if key in by_key else key}, "
            f"which is not the first series of a scanner new to its site")


def test_scanner_swap_raises_a_scanner_event_on_the_new_scanners_first_series(story):
    event = _event(story, "scanner_swap")
    site, first, new = event["site"], event["first_scan"], event["new_scanner"]
    if not first or event["scans_before"] <= 0:
        raise StoryNotPlayed(f"truth.json's swap at {site} has no scan on the old scanner before the new one "
                             f"({event}): there is no swap for the gate to see")
    on_new = story.at_site(site)
    on_new = on_new[on_new["scanner_id"] == new]
    assert not on_new.empty and on_new.iloc[0]["scan_id"] == first, (
        f"truth's first scan on {new} is {first}; by acquisition order it is {on_new['scan_id'].tolist()[:1]}")
    keyed = {e["series_key"] for e in story.drift if e["kind"] == "scanner" and e["site"] == site}
    assert story.key(first) in keyed, (
        f"no 'scanner' drift event on {story.describe(first)}, the first series from the new scanner {new}; "
        f"scanner events at {site} are on {sorted(keyed)}")
    earlier = _before(story, site, first)
    assert not earlier.empty and (earlier["scanner_id"] != new).all(), f"{site}'s series before {first}: {earlier}"
    for scan_id in earlier["scan_id"]:
        assert story.key(scan_id) not in keyed, (
            f"'scanner' drift event on {story.describe(scan_id)}, from the old scanner before the swap ({first})")
    for scan_id in on_new["scan_id"].iloc[1:]:
        assert story.key(scan_id) not in keyed, (
            f"a second 'scanner' event for {new}, on {story.describe(scan_id)} (it is raised once, on {first})")


def test_gated_manifest_holds_exactly_the_passing_and_warning_series(story):
    gated = story.manifest.set_index(mf.SCAN_ID)
    assert gated.index.is_unique, f"series listed twice in the gated manifest: {gated.index[gated.index.duplicated()]}"
    sponsor = pd.read_csv(story.trial_dir / "manifest.csv", dtype=str, keep_default_na=False).set_index(mf.SCAN_ID)
    sent = story.gate.sent.set_index("scan_id")
    for row in story.series.itertuples():
        if not sent.loc[row.scan_id, "sent"]:
            assert row.series_key not in gated.index, f"{story.describe(row.scan_id)} was never sent but is gated"
            continue
        status = story.verdict(row.scan_id)["status"]
        if status in PASSING:
            assert row.series_key in gated.index, (
                f"{story.describe(row.scan_id)} got {status} but is missing from the gated manifest")
            assert gated.loc[row.series_key, "qc_status"] == status, (
                f"{story.describe(row.scan_id)}: gated manifest says {gated.loc[row.series_key, 'qc_status']}, "
                f"the gate {status}")
            assert gated.loc[row.series_key, mf.SUBJECT_ID] == sponsor.loc[row.scan_id, mf.SUBJECT_ID], (
                f"{story.describe(row.scan_id)}: the gated manifest joined subject "
                f"{gated.loc[row.series_key, mf.SUBJECT_ID]}, the sponsor's table has "
                f"{sponsor.loc[row.scan_id, mf.SUBJECT_ID]}")
        else:
            assert row.series_key not in gated.index, (
                f"{story.describe(row.scan_id)} got {status} but is in the gated manifest")
    strangers = set(gated.index) - set(story.series["series_key"])
    assert not strangers, f"gated manifest rows that are no series the sites sent: {sorted(strangers)}"


def test_the_manifest_marks_upgraded_scans_from_the_gates_software_event(story):
    """``software_upgraded`` in the gated manifest (what the upgrade analysis compares) is 1 exactly on the
    scans truth.json says were acquired after the upgrade: keyed by the gate's drift event, not re-derived."""
    upgraded = {s["scan_id"] for s in story.truth["scans"] if s["upgraded"]}
    gated = story.manifest.set_index(mf.SCAN_ID)
    key_of = dict(zip(story.series["scan_id"], story.series["series_key"]))
    marked = {scan for scan, key in key_of.items() if key in gated.index and gated.loc[key, "software_upgraded"] == 1}
    passed = {scan for scan, key in key_of.items() if key in gated.index}
    assert upgraded & passed, "no upgraded scan passed the gate: nothing to check"
    assert marked == upgraded & passed, (f"software_upgraded marks {sorted(marked)}; truth's upgraded scans in the "
                                         f"manifest are {sorted(upgraded & passed)}")


def test_per_site_counts_add_up_to_the_series_sent(story):
    loaded = GateRun.load(story.gate.root)  # what a later `demo` re-reads from the finished run
    table = loaded.per_site().set_index("site")
    pd.testing.assert_frame_equal(table, story.gate.per_site().set_index("site"),
                                  obj="per_site of GateRun.load(root) vs of the run itself")
    held_back = set(story.gate.sent.loc[~story.gate.sent["sent"], "scan_id"])  # judged in the first test
    sent = story.series[~story.series["scan_id"].isin(held_back)]  # every simulated series the scanners sent
    expected = sent.groupby("site").size()
    assert sorted(table.index) == sorted(story.series["site"].unique()), (
        f"per_site lists sites {sorted(table.index)}, the trial's series come from "
        f"{sorted(story.series['site'].unique())}")
    statuses = ["pass", "warn", "fail", "undetermined", "unmatched"]
    for site, row in table.iterrows():
        assert row["received"] == expected.get(site, 0), (
            f"{site}: per_site says {row['received']} received, the scanner sent {expected.get(site, 0)} series")
        assert row[statuses].sum() == row["received"], (
            f"{site}: verdicts {row[statuses].to_dict()} add up to {row[statuses].sum()}, "
            f"not the {row['received']} series received")
        by_status = pd.Series([v["status"] for v in story.verdicts.values() if v["site"] == site]).value_counts()
        for status in statuses:
            assert row[status] == by_status.get(status, 0), (
                f"{site}: per_site counts {row[status]} {status}, the QC database {by_status.get(status, 0)}")
    assert table["received"].sum() == len(sent), (
        f"per_site received {table['received'].sum()} series in all; the sites sent {len(sent)} "
        f"({len(story.series)} simulated, {len(held_back)} re-scans held back)")
    assert f"QC gate: {len(sent)} series" in loaded.summary(), loaded.summary()
