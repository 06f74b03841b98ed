"""The site page's control charts flag drift on the right series: simulated image-quality metrics
with a known step shift on one scanner (the truth), through the dashboard's chart builder."""

from __future__ import annotations

import random

from sitebench.dashboard.app import CHART_BASELINE, _control_charts


def _verdicts(shift_at: int, n: int = 45, seed: int = 3) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        for scanner in ("scanner-a", "scanner-b"):
            snr = rng.gauss(20.0, 1.0) + (2.0 if scanner == "scanner-a" and i >= shift_at else 0.0)
            rows.append({"id": len(rows) + 1, "series_key": f"{scanner[-1]}{i:019d}", "scanner": scanner,
                         "software_version": "DV26" if i < shift_at else "DV28" if scanner == "scanner-a" else "DV26",
                         "image_quality": {"snr": snr}, "status": "pass"})
    return rows


def test_the_chart_flags_the_drifting_scanner_after_its_change_and_rarely_the_steady_one():
    """40 simulated trials, a 2-sigma step in SNR on scanner A at series 30 (the truth), none on B.
    Limits estimated from 20 baseline series make some false alarms unavoidable (Jones, Champ &
    Rigdon 2001), so the rates are checked: A is caught within 10 series of its change in at least
    90 % of trials, after a median of at most 4 (an EWMA with lambda 0.2 and known limits needs about
    3.5 for a 2-sigma shift, Lucas & Saccucci 1990), and flagged before it in at most 10 %; B stays
    silent in at least 60 %."""
    import statistics

    shift_at, caught, early, quiet, delays = 30, 0, 0, 0, []
    for seed in range(40):
        charts = {c["scanner"]: c for c in _control_charts(_verdicts(shift_at, seed=seed)) if c["metric"] == "snr"}
        assert charts["scanner-a"]["baseline"] == CHART_BASELINE
        flagged_a = sorted(int(key[1:]) for key, _ in charts["scanner-a"]["flagged"])
        after = [i - shift_at for i in flagged_a if i >= shift_at]
        delays += after[:1]
        caught += bool(after) and after[0] <= 10
        early += any(i < shift_at for i in flagged_a)
        quiet += not charts["scanner-b"]["flagged"]
    assert caught >= 36 and statistics.median(delays) <= 4 and early <= 4 and quiet >= 24, \
        (caught, delays, early, quiet)
    chart = next(c for c in _control_charts(_verdicts(shift_at)) if c["scanner"] == "scanner-a")
    assert "<svg" in chart["svg"] and "software DV28" in chart["svg"]


def test_a_scanner_with_too_few_series_gets_no_chart():
    assert _control_charts(_verdicts(shift_at=100, n=6)) == []


def test_the_montage_is_a_png_of_slices_spread_through_the_volume():
    """Decoded with matplotlib (an independent PNG reader): 12 tiles of the 196-slice GE T1, each
    the slice's own pixels windowed at the 1st-99th percentiles."""
    import io

    import numpy as np
    from matplotlib.image import imread
    from test_qc_stow import T1

    from sitebench.dashboard.app import montage_png
    from sitebench.qc.dicom_files import series_volume

    volume, _ = series_volume(sorted(T1.iterdir()))
    picture = imread(io.BytesIO(montage_png(volume)), format="png")
    step = int(np.ceil(max(volume.shape[:2]) / 160))
    h, w = volume[::step, ::step, 0].shape
    assert picture.shape == (3 * h, 4 * w)
    tiles = [picture[r * h:(r + 1) * h, c * w:(c + 1) * w] for r in range(3) for c in range(4)]
    assert sum(t.std() > 0.02 for t in tiles) >= 8  # most slices hold anatomy (the outer ones of a sagittal head are air)
    picks = np.linspace(0, volume.shape[2] - 1, 12).round().astype(int)
    nearest = int(np.argmin(abs(picks - volume.shape[2] // 2)))
    low, high = np.percentile(volume, [1, 99])
    middle = np.clip((volume[::step, ::step, picks[nearest]] - low) / (high - low), 0, 1)
    assert np.corrcoef(tiles[nearest].ravel(), middle.ravel())[0, 1] > 0.8


def test_a_biomarker_step_is_flagged_on_the_right_series_and_series_without_a_prediction_are_skipped():
    """Simulated truth: a biomarker (hippocampal volume, ml) steps by 6 sigma on scanner A from series
    30 on, and 1 series in 3 has no prediction. Every shifted series is flagged, none before, none on B;
    the baseline is 20 series that have a prediction."""
    rng = random.Random(11)
    verdicts = _verdicts(shift_at=100)  # steady image quality: only the biomarker moves
    biomarkers, truth = {}, set()
    for i, row in enumerate(v for v in verdicts if v["scanner"] == "scanner-a"):
        if i % 3 == 2:
            continue
        shifted = i >= 30
        biomarkers[row["series_key"]] = {"hippocampus_ml · seg@1.0": rng.gauss(3.5, 0.05) + (0.3 if shifted else 0)}
        truth |= {row["series_key"]} if shifted else set()
    for row in (v for v in verdicts if v["scanner"] == "scanner-b"):
        biomarkers[row["series_key"]] = {"hippocampus_ml · seg@1.0": rng.gauss(3.5, 0.05)}
    charts = {(c["scanner"], c["metric"]): c for c in _control_charts(verdicts, biomarkers)}
    a, b = charts["scanner-a", "hippocampus_ml · seg@1.0"], charts["scanner-b", "hippocampus_ml · seg@1.0"]
    assert a["kind"] == "biomarker" and charts["scanner-a", "snr"]["kind"] == "image quality"
    assert a["baseline"] == CHART_BASELINE and {key for key, _ in a["flagged"]} == truth
    assert not b["flagged"]


def test_the_timeline_marks_a_scanners_upgrade_and_a_new_scanner_not_two_scanners_on_two_versions():
    from sitebench.dashboard.app import _timeline_svg

    rows = []
    for i in range(12):  # two scanners on their own versions, alternating: no change at all
        scanner, version = ("scanner-a", "VE11") if i % 2 == 0 else ("scanner-b", "XA30")
        if scanner == "scanner-a" and i >= 8:
            version = "VE12"  # the truth: one upgrade, on A at series 8
        rows.append({"id": i + 1, "series_key": f"{i:020d}", "status": "pass", "scanner": scanner, "model": "Prisma",
                     "software_version": version, "checked_utc": f"2026-06-{i + 1:02d}T09:00:00+00:00"})
    rows.append({**rows[-1], "id": 13, "series_key": "c" * 20, "scanner": "scanner-c",
                 "checked_utc": "2026-06-20T09:00:00+00:00"})
    svg = _timeline_svg(rows, [])
    assert svg.count('class="software-change"') == 1 and "scanner-a: software VE11 to VE12" in svg
    assert svg.count('class="scanner-change"') == 2  # scanner-b's first series, then scanner-c's
    assert "new scanner scanner-c" in svg
