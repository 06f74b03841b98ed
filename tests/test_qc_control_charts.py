"""Control charts for IQMs and biomarkers, checked against references computed here, not our own output.

References: closed forms (EWMA limits, Montgomery section 9.2; MR-bar / d2, section 6.4), the normal
distribution (scipy) for Shewhart rates, hand-built Westgard (1981) sequences, simulations whose
truth is known (a seeded step shift on one scanner; the project's trial simulator with a software
upgrade at a known date).
"""

from __future__ import annotations

import io
import json
import math
import statistics

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from sitebench.errors import SitebenchError
from sitebench.qc.control_charts import (D2_N2, MISSING, RULES, WESTGARD_RULES, ControlChart,
                                         ControlChartResult, plot_control_chart)


def unit_chart(**options) -> ControlChart:
    """A chart fitted to center 0, sigma 1 exactly: +/-a alternating, a = d2/2, so MR-bar = d2."""
    a = D2_N2 / 2
    chart = ControlChart(**options).fit([a, -a] * 5)
    assert chart.center_ == 0.0 and chart.sigma_ == 1.0
    return chart


# --------------------------------------------------------------------------- sigma and limits

def test_mr_bar_sigma_matches_a_hand_computation():
    x = [10, 12, 11, 15, 14, 13, 16, 12]
    # moving ranges 2, 1, 4, 1, 1, 3, 4 -> MR-bar = 16 / 7; mean = 103 / 8
    chart = ControlChart().fit(x)
    assert chart.center_ == pytest.approx(103 / 8, rel=1e-12)
    assert chart.mr_bar_ == pytest.approx(16 / 7, rel=1e-12)
    assert chart.sigma_ == pytest.approx(16 / 7 / 1.128, rel=1e-12)
    assert chart.n_baseline_ == 8
    result = chart.chart(x)
    assert result.ucl == pytest.approx(103 / 8 + 3 * 16 / 7 / 1.128)
    assert result.lcl == pytest.approx(103 / 8 - 3 * 16 / 7 / 1.128)
    assert ControlChart(sigma="std").fit(x).sigma_ == pytest.approx(statistics.stdev(x), rel=1e-12)


@pytest.mark.parametrize("lam, width", [(0.2, 2.86), (0.1, 2.7), (0.05, 2.615)])
def test_ewma_statistic_and_limits_match_the_closed_form(lam, width):
    rng = np.random.default_rng(3)
    base = rng.normal(50.0, 2.0, 40)
    chart = ControlChart(ewma_lambda=lam, ewma_l=width).fit(base)
    mu, s = float(np.mean(base)), chart.sigma_
    x = rng.normal(50.0, 2.0, 400)
    frame = chart.chart(x).to_frame()
    # t = 1: 1 - (1 - lam)^2 = lam (2 - lam), so the half-width is L sigma lam
    assert frame["ewma_ucl"].iloc[0] == pytest.approx(mu + width * s * lam, rel=1e-12)
    assert frame["ewma_lcl"].iloc[0] == pytest.approx(mu - width * s * lam, rel=1e-12)
    # asymptotically L sigma sqrt(lam / (2 - lam))
    asymptote = width * s * math.sqrt(lam / (2 - lam))
    assert frame["ewma_ucl"].iloc[-1] == pytest.approx(mu + asymptote, rel=1e-9)
    assert frame["ewma_lcl"].iloc[-1] == pytest.approx(mu - asymptote, rel=1e-9)
    z, expected = mu, []
    for value in x:  # the recursion by hand, z_0 = center
        z = lam * value + (1 - lam) * z
        expected.append(z)
    np.testing.assert_allclose(frame["ewma"], expected, rtol=1e-12)


@pytest.mark.parametrize("shift", [0.0, 1.5])
def test_shewhart_1_3s_rate_matches_the_normal_distribution(shift):
    """In control the 1_3s rate is 2 Phi(-3) = 0.0027; after a 1.5 sigma shift Phi(-1.5) + Phi(-4.5)."""
    rng = np.random.default_rng(11)
    n_base, n = 200_000, 200_000
    chart = ControlChart(rules=("1_3s",)).fit(rng.normal(0.0, 1.0, n_base))
    rate = chart.chart(rng.normal(shift, 1.0, n)).out_of_control.mean()
    p = norm.sf(3 - shift) + norm.cdf(-3 - shift)
    # binomial SE, plus what the baseline's estimated center and sigma (each SE <= 1/sqrt(n_base)) add
    d_sigma = 3 * (norm.pdf(3 - shift) + norm.pdf(3 + shift))
    d_center = norm.pdf(3 - shift) - norm.pdf(3 + shift)
    se = math.sqrt(p * (1 - p) / n + (d_sigma ** 2 + d_center ** 2) / n_base)
    assert abs(rate - p) < 4 * se, (rate, p, se)
    if shift == 0.0:
        assert p == pytest.approx(0.0027, abs=1e-5)


# --------------------------------------------------------------------------- simulation with known truth

def test_step_shift_on_one_scanner_is_caught_and_the_others_stay_in_control():
    """Four scanners, daily phantom SNR; scanner B steps up by 1.5 sigma at a known day.

    Seed 0 is fixed so the no-alarm check on A, C, D is deterministic. It holds for this draw only:
    with every rule on, three in-control scanners x 40 points stay silent in about a quarter of
    random draws (the multirule's false-alarm rate adds up); the rates themselves are checked
    against theory in the 1_3s and replicate tests.
    """
    rng = np.random.default_rng(0)
    truth = {"A": (32.0, 1.2), "B": (28.0, 0.9), "C": (36.0, 1.5), "D": (30.0, 1.0)}
    n_base, n_monitor, change = 100, 40, 20
    signals = {}
    for scanner, (mu, sd) in truth.items():
        baseline = rng.normal(mu, sd, n_base)
        monitored = rng.normal(mu, sd, n_monitor)
        if scanner == "B":
            monitored[change:] += 1.5 * sd
        chart = ControlChart(metric=f"snr {scanner}").fit(baseline)
        days = pd.date_range("2026-04-15", periods=n_monitor, freq="D")
        signals[scanner] = (chart.chart(monitored, days),
                            ControlChart(rules=("ewma",)).fit(baseline).chart(monitored, days))
    result, ewma_only = signals["B"]
    assert result.first_signal_index is not None and result.first_signal_index >= change
    assert change <= ewma_only.first_signal_index < change + 15
    assert result.first_signal == pd.Timestamp("2026-04-15") + pd.Timedelta(days=result.first_signal_index)
    for scanner in "ACD":
        assert signals[scanner][0].first_signal is None, signals[scanner][0].summary()
        assert signals[scanner][1].first_signal is None


def test_ewma_detects_a_1_5_sigma_shift_within_15_points_in_nearly_every_replicate():
    """Over 400 seeded replicates: Lucas & Saccucci's ARL for a 1.5 sigma shift is about 5 (lambda 0.2)."""
    rng = np.random.default_rng(7)
    change, delays, early = 20, [], 0
    for _ in range(400):
        chart = ControlChart(rules=("ewma",)).fit(rng.normal(0.0, 1.0, 100))
        x = rng.normal(0.0, 1.0, change + 40)
        x[change:] += 1.5
        first = chart.chart(x).first_signal_index
        if first is not None and first < change:
            early += 1
            continue
        delays.append(np.inf if first is None else first - change + 1)
    delays = np.asarray(delays)
    assert early / 400 < 0.15  # in-control ARL about 370: a false alarm in 20 points is uncommon
    assert (delays <= 15).mean() > 0.97
    assert 3 <= np.median(delays) <= 8


def _simulator_iqms():
    """Two sites from the project's simulator; S01's scanner software is upgraded (noise x 1.6) mid-study."""
    import nibabel as nib

    from sitebench.datasets.simulator import TrialConfig, simulate_trial
    from sitebench.qc.image_quality import image_quality

    return TrialConfig, simulate_trial, image_quality, nib


@pytest.fixture(scope="module")
def upgrade_trial(tmp_path_factory):
    TrialConfig, simulate_trial, image_quality, nib = _simulator_iqms()
    config = TrialConfig(seed=0, n_sites=2, scans_per_site=40, sessions_per_subject=1, voxel_mm=6.0, workers=1,
                         two_scanner_every=0, thick_slice_every=0, coverage=None, protocol_drift=None,
                         unmatched=None, scanner_swap=None, upgrade={"site": "S01", "at_fraction": 0.6})
    trial = simulate_trial(config, tmp_path_factory.mktemp("upgrade_trial"))
    rows = []
    for _, scan in trial.manifest.iterrows():
        image = nib.load(trial.out_dir / scan["image_path"])
        labels = np.asarray(nib.load(trial.out_dir / scan["label_path"]).dataobj)
        iqm = image_quality(np.asarray(image.dataobj), image.header.get_zooms()[:3], labels)
        rows.append({"scan_id": scan["scan_id"], "site": scan["site"], "date": scan["acquisition_date"],
                     "software": scan["software_version"], "snrd_total": iqm.metrics["snrd_total"]})
    table = pd.DataFrame(rows).sort_values(["date", "scan_id"]).reset_index(drop=True)
    return trial.truth, table


def test_simulated_software_upgrade_is_flagged_after_its_known_date_and_only_there(upgrade_trial):
    truth, table = upgrade_trial
    upgrade_day = pd.Timestamp(truth["upgrade"]["date"])
    upgraded = {s["scan_id"] for s in truth["scans"] if s["upgraded"]}
    assert truth["upgrade"]["site"] == "S01" and truth["upgrade"]["noise_factor"] == 1.6
    n_base = 20
    for site, scans in table.groupby("site", sort=True):
        baseline, monitored = scans.iloc[:n_base], scans.iloc[n_base:]
        result = ControlChart(metric="snrd_total").fit(baseline["snrd_total"]).chart(
            monitored["snrd_total"], monitored["date"])
        if site == "S01":
            assert not set(baseline["scan_id"]) & upgraded  # the baseline is qualified: all before the upgrade
            assert (monitored["scan_id"].isin(upgraded) == (pd.to_datetime(monitored["date"]) >= upgrade_day)).all()
            first_upgraded = int(np.flatnonzero(monitored["scan_id"].isin(upgraded))[0])
            assert first_upgraded > 0  # some monitored scans come before the upgrade: no alarm on those
            assert result.first_signal >= upgrade_day
            assert first_upgraded <= result.first_signal_index <= first_upgraded + 2
            assert result.out_of_control[first_upgraded:].mean() > 0.8  # noise x 1.6: Dietrich SNR / 1.6
        else:
            assert not set(scans["scan_id"]) & upgraded
            assert result.first_signal is None, result.summary()


# --------------------------------------------------------------------------- Westgard rules, by hand

WESTGARD_CASES = {
    "1_3s": ([0.5, -0.5, 3.2, -0.5, 0.5], 2, [0.5, -0.5, 2.9, -0.5, 0.5]),
    "2_2s": ([0.5, -0.5, 2.5, 2.5, -0.5], 3, [0.5, 2.5, 0.5, 2.5, 0.5]),
    "R_4s": ([0.5, 2.1, -2.1, 0.5], 2, [0.5, 1.9, -1.9, 0.5]),
    "4_1s": ([-0.5, 1.5, 1.5, 1.5, 1.5, -0.5], 4, [-0.5, 1.5, 1.5, 1.5, 0.5, 1.5, 1.5, -0.5]),
    "10_x": ([-0.5] + [0.5] * 10 + [-0.5], 10, [-0.5] + [0.5] * 9 + [-0.5]),
}


@pytest.mark.parametrize("rule", WESTGARD_RULES)
def test_each_westgard_rule_has_a_sequence_that_triggers_exactly_it(rule):
    hit, where, miss = WESTGARD_CASES[rule]
    chart = unit_chart(rules=WESTGARD_RULES)
    result = chart.chart(hit)
    fired = {f for flags in result.flags for f in flags}
    assert fired == {rule}, result.flags
    assert result.first_signal_index == where and result.flags[where] == [rule]
    assert chart.chart(miss).first_signal is None
    # the rule alone, selected by name, gives the same signal; leaving it out silences it
    assert unit_chart(rules=(rule,)).chart(hit).first_signal_index == where
    assert unit_chart(rules=tuple(r for r in WESTGARD_RULES if r != rule)).chart(hit).first_signal is None


def test_rules_need_the_same_side_and_see_missing_values_as_gaps():
    chart = unit_chart(rules=WESTGARD_RULES)
    assert chart.chart([0.5, 2.5, -2.5, 0.5]).flags[2] == ["R_4s"]  # opposite sides: not 2_2s
    assert chart.chart([0.5, 2.5, float("nan"), 2.5]).flags == [[], [], [MISSING], ["2_2s"]]
    assert chart.chart([-1.5, 1.5, -1.5, 1.5, 0.0]).first_signal is None  # 4_1s needs one side


# --------------------------------------------------------------------------- missing values, results

def test_missing_values_are_flagged_and_skipped_never_fatal():
    chart = unit_chart()
    x = [0.1, np.nan, -0.2, np.inf, 0.3]
    result = chart.chart(x)
    frame = result.to_frame()
    assert list(frame.columns[:3]) == ["time", "value", "ewma"]
    assert {"ucl", "lcl", "ewma_ucl", "ewma_lcl", "flags", "out_of_control"} <= set(frame.columns)
    assert frame["flags"].tolist() == [[], [MISSING], [], [MISSING], []]
    assert not frame["out_of_control"].any() and result.first_signal is None
    assert frame["ewma"].isna().tolist() == [False, True, False, True, False]
    lam = 0.2  # the EWMA steps over the gaps: t counts observed points only
    assert frame["ewma"].iloc[2] == pytest.approx(lam * -0.2 + (1 - lam) * lam * 0.1)
    assert frame["ewma_ucl"].iloc[2] == pytest.approx(2.86 * math.sqrt(lam / (2 - lam) * (1 - (1 - lam) ** 4)))
    all_missing = chart.chart([np.nan, np.nan])
    assert all_missing.first_signal is None and "2 missing" in all_missing.summary()


def test_result_reports_in_words_table_and_json():
    chart = ControlChart(metric="cnr").fit(np.random.default_rng(0).normal(3.0, 0.1, 30))
    dates = ["2026-03-01", "2026-03-08", "2026-03-15", "2026-03-22"]
    result = chart.chart([3.0, 3.05, 2.2, 3.0], dates)
    assert isinstance(result, ControlChartResult)
    assert result.first_signal == pd.Timestamp("2026-03-15") and result.first_signal_index == 2
    text = result.summary()
    assert "cnr" in text and "first signal at 2026-03-15 (point 2)" in text and "1_3s" in text
    data = json.loads(json.dumps(result.to_dict()))
    assert data["first_signal"] == "2026-03-15T00:00:00" and data["n_out_of_control"] >= 1
    assert data["points"][2]["flags"][0] == "1_3s" and data["rules"] == list(RULES)
    assert data["center"] == pytest.approx(chart.center_) and data["sigma"] == pytest.approx(chart.sigma_)
    assert "No point is out of control." in chart.chart([3.0, 3.01]).summary()
    assert "baseline is short" in ControlChart().fit(np.arange(10.0)).chart([4.0]).summary()


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("baseline", [[1.0, 2.0, 3.0], [1.0, 2.0, np.nan, 3.0, 4.0, 5.0, 6.0, 7.0]])
def test_too_short_a_baseline_is_a_one_line_user_error(baseline):
    with pytest.raises(SitebenchError) as error:
        ControlChart().fit(baseline)
    message = str(error.value)
    assert "\n" not in message and "at least 8" in message and "usable values" in message


def test_other_bad_input_is_a_user_error():
    with pytest.raises(SitebenchError, match="does not vary"):
        ControlChart().fit([5.0] * 10)
    with pytest.raises(SitebenchError, match="unknown control-chart rule"):
        ControlChart(rules=("1_2s",)).fit(np.arange(10.0))
    with pytest.raises(SitebenchError, match="not fitted"):
        ControlChart().chart([1.0])
    chart = ControlChart().fit(np.arange(10.0))
    with pytest.raises(SitebenchError, match="2 times for 3 values"):
        chart.chart([1.0, 2.0, 3.0], ["2026-01-01", "2026-01-02"])
    with pytest.raises(SitebenchError, match="not in order"):
        chart.chart([1.0, 2.0], ["2026-01-02", "2026-01-01"])
    for options in ({"sigma": "range"}, {"ewma_lambda": 0.0}, {"ewma_l": -1.0}):
        with pytest.raises(SitebenchError):
            ControlChart(**options).fit(np.arange(10.0))


# --------------------------------------------------------------------------- plot

def _pixels(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float)


def test_plot_returns_a_figure_draws_into_a_given_ax_and_is_not_blank():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rng = np.random.default_rng(5)
    chart = ControlChart(metric="snr_wm").fit(rng.normal(20.0, 1.0, 30))
    values = np.r_[rng.normal(20.0, 1.0, 15), rng.normal(23.0, 1.0, 10)]
    values[4] = np.nan
    days = pd.date_range("2026-01-05", periods=25, freq="7D")
    result = chart.chart(values, days)
    assert result.out_of_control.any()

    fig = plot_control_chart(result, title="S07 snr_wm", markers=[(days[15], "software upgrade")])
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_title() == "S07 snr_wm"
    assert any(t.get_text() == "software upgrade" for t in ax.texts)
    assert _pixels(fig).var() > 100  # a blank canvas has variance 0
    png = io.BytesIO()
    fig.savefig(png, format="png")
    assert png.getvalue()[:8] == b"\x89PNG\r\n\x1a\n" and len(png.getvalue()) > 5000

    own = Figure(figsize=(6, 6))
    FigureCanvasAgg(own)
    top, bottom = own.subplots(2, 1)
    assert plot_control_chart(result, ax=bottom) is own
    assert bottom.lines and not top.lines
    assert _pixels(own).var() > 100
    numeric = plot_control_chart(chart.chart(values), markers=[(15, "scanner change")])
    assert _pixels(numeric).var() > 100
