"""Classification metrics: DeLong AUC / paired test against R pROC, Clopper-Pearson, calibration, strata.

The pROC comparisons run ``Rscript tests/r/proc_reference.R`` at test time. Without R and pROC
these tests FAIL (install them: ``apt-get install r-cran-proc``); set ``SITEBENCH_SKIP_R=1`` to
skip them instead.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import require_rscript
from scipy import stats

from sitebench.errors import SitebenchError
from sitebench.stratification.classification import (
    NOT_ESTIMABLE,
    calibration,
    classification_by_stratum,
    delong,
    sensitivity_specificity,
)

R_SCRIPT = Path(__file__).resolve().parent / "r" / "proc_reference.R"
AUC_TOL = 1e-6
STAT_TOL = 1e-4  # CI bounds, z, p


# ----------------------------------------------------------------------------- R pROC plumbing
def _rscript() -> str:
    return require_rscript("pROC")


def _run_r(*args: str) -> str:
    rscript = _rscript()
    done = subprocess.run([rscript, "--vanilla", str(R_SCRIPT), *args], capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        hint = ""
        if "pROC" in done.stderr and "no package" in done.stderr:
            hint = " -- R package pROC is missing: install r-cran-proc (or set SITEBENCH_SKIP_R=1)"
        pytest.fail(f"Rscript {R_SCRIPT.name} {' '.join(args)} failed{hint}:\n{done.stderr}", pytrace=False)
    return done.stdout


def _proc(tmp_path: Path, truth, score1, score2=None, conf_level: float = 0.95) -> dict:
    frame = pd.DataFrame({"truth": np.asarray(truth, dtype=int), "score1": np.asarray(score1, dtype=float)})
    if score2 is not None:
        frame["score2"] = np.asarray(score2, dtype=float)
    path = tmp_path / "proc_input.csv"
    # repr-exact floats so R reads exactly the values Python used
    frame.to_csv(path, index=False, float_format="%.17g")
    out = _run_r("reference", str(path), repr(conf_level))
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def asah(tmp_path_factory) -> pd.DataFrame:
    """pROC's aSAH data (exported by R itself): truth 1 = outcome Poor, s100b, ndka."""
    path = tmp_path_factory.mktemp("asah") / "asah.csv"
    _run_r("export-asah", str(path))
    frame = pd.read_csv(path)
    assert len(frame) == 113 and int(frame["truth"].sum()) == 41
    return frame


def _simulated_ties(seed: int = 11, n: int = 240) -> pd.DataFrame:
    """Two correlated scores, rounded so that many values tie (within and across classes)."""
    rng = np.random.default_rng(seed)
    y = rng.binomial(1, 0.35, n)
    latent = rng.normal(size=n)
    s1 = np.round(0.9 * y + latent + 0.5 * rng.normal(size=n), 0)  # ~8 distinct values
    s2 = np.round(0.5 * y + 0.7 * latent + 0.7 * rng.normal(size=n), 1)
    return pd.DataFrame({"truth": y, "s1": s1, "s2": s2})


def _assert_matches(ours, ref: dict, diffs: dict) -> None:
    def close(name: str, a, b, tol: float) -> None:
        diff = abs(float(a) - float(b))
        diffs[name] = max(diffs.get(name, 0.0), diff)
        assert diff <= tol, f"{name}: ours {a!r} vs pROC {b!r} (|diff| {diff:.3g} > {tol})"

    assert ours.n_positive == ref["n_cases"] and ours.n_negative == ref["n_controls"]
    close("auc", ours.auc, ref["auc1"], AUC_TOL)
    close("ci", ours.ci_low, ref["ci1"][0], STAT_TOL)
    close("ci", ours.ci_high, ref["ci1"][1], STAT_TOL)
    if "auc2" in ref:
        close("auc", ours.auc2, ref["auc2"], AUC_TOL)
        close("ci", ours.auc2_ci_low, ref["ci2"][0], STAT_TOL)
        close("ci", ours.auc2_ci_high, ref["ci2"][1], STAT_TOL)
        close("difference", ours.difference, ref["difference"], AUC_TOL)
        close("difference_ci", ours.difference_ci_low, ref["difference_ci"][0], STAT_TOL)
        close("difference_ci", ours.difference_ci_high, ref["difference_ci"][1], STAT_TOL)
        close("z", ours.z, ref["z"], STAT_TOL)
        close("p", ours.p, ref["p"], STAT_TOL)


# ----------------------------------------------------------------------------- DeLong vs pROC
@pytest.mark.r_reference
def test_delong_matches_proc_on_asah(asah, tmp_path):
    ours = delong(asah["truth"], asah["s100b"], asah["ndka"])
    ref = _proc(tmp_path, asah["truth"], asah["s100b"], asah["ndka"])
    diffs: dict = {}
    _assert_matches(ours, ref, diffs)
    # the published pROC example values (aSAH, s100b vs ndka)
    assert ours.auc == pytest.approx(0.7314, abs=5e-5)
    assert ours.auc2 == pytest.approx(0.6120, abs=5e-5)
    assert ours.p == pytest.approx(0.1643, abs=5e-5)


@pytest.mark.r_reference
def test_delong_single_score_matches_proc_on_asah(asah, tmp_path):
    ours = delong(asah["truth"], asah["ndka"], alpha=0.01)
    ref = _proc(tmp_path, asah["truth"], asah["ndka"], conf_level=0.99)
    _assert_matches(ours, ref, {})
    assert set(ours.to_dict()) == {"auc", "ci_low", "ci_high", "n_positive", "n_negative"}


@pytest.mark.r_reference
@pytest.mark.parametrize("seed", [11, 12])
def test_delong_matches_proc_on_simulated_ties(seed, tmp_path):
    data = _simulated_ties(seed)
    assert data["s1"].nunique() < 15  # heavy ties
    ours = delong(data["truth"], data["s1"], data["s2"])
    ref = _proc(tmp_path, data["truth"], data["s1"], data["s2"])
    _assert_matches(ours, ref, {})


@pytest.mark.r_reference
def test_delong_matches_proc_with_clipped_ci_and_alpha(tmp_path):
    """Nearly separable small sample: the upper bound is clipped at 1 as in pROC; 90% intervals."""
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(12, int), np.zeros(15, int)]
    s1 = np.r_[rng.normal(3, 1, 12), rng.normal(0, 1, 15)].round(1)
    s2 = np.r_[rng.normal(1, 1, 12), rng.normal(0, 1, 15)].round(1)
    ours = delong(y, s1, s2, alpha=0.10)
    ref = _proc(tmp_path, y, s1, s2, conf_level=0.90)
    _assert_matches(ours, ref, {})
    assert ours.ci_high == 1.0


@pytest.mark.r_reference
def test_delong_identical_scores_z_zero_as_proc(tmp_path):
    data = _simulated_ties(5, 60)
    ours = delong(data["truth"], data["s1"], data["s1"])
    ref = _proc(tmp_path, data["truth"], data["s1"], data["s1"])
    assert ours.difference == 0 and ours.z == 0 and ours.p == 1
    assert ref["z"] == 0 and ref["p"] == 1


# ----------------------------------------------------------------------------- DeLong, independent of R
def _brute_force(y, s1, s2=None):
    """O(m n) DeLong from the Mann-Whitney kernel (DeLong et al. 1988, eqs. directly)."""
    scores = [np.asarray(s1, float)] + ([np.asarray(s2, float)] if s2 is not None else [])
    y = np.asarray(y)
    v10, v01, aucs = [], [], []
    for s in scores:
        x, z = s[y == 1], s[y == 0]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    s10 = np.atleast_2d(np.cov(np.vstack(v10)))
    s01 = np.atleast_2d(np.cov(np.vstack(v01)))
    cov = s10 / len(v10[0]) + s01 / len(v01[0])
    return np.array(aucs), cov


def test_fast_midrank_equals_brute_force_kernel():
    data = _simulated_ties(21, 150)
    ours = delong(data["truth"], data["s1"], data["s2"])
    aucs, cov = _brute_force(data["truth"], data["s1"], data["s2"])
    assert ours.auc == pytest.approx(aucs[0], abs=1e-12)
    assert ours.auc2 == pytest.approx(aucs[1], abs=1e-12)
    assert ours.se == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-10)
    assert ours.difference_se == pytest.approx(math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]), rel=1e-10)
    # AUC equals the Mann-Whitney U / (m n)
    pos, neg = data["s1"][data["truth"] == 1], data["s1"][data["truth"] == 0]
    u = stats.mannwhitneyu(pos, neg).statistic
    assert ours.auc == pytest.approx(u / (len(pos) * len(neg)), abs=1e-12)


def test_direction_larger_score_is_positive():
    y = [0, 0, 0, 1, 1, 1]
    assert delong(y, [1, 2, 3, 4, 5, 6]).auc == 1.0
    assert delong(y, [6, 5, 4, 3, 2, 1]).auc == 0.0  # never flipped automatically
    assert delong([False, True, False, True], [0.1, 0.9, 0.2, 0.8]).auc == 1.0


def test_delong_outputs_and_not_estimable_variance():
    data = _simulated_ties(8, 80)
    result = delong(data["truth"], data["s1"], data["s2"])
    d = result.to_dict()
    assert set(d) == {"auc", "ci_low", "ci_high", "n_positive", "n_negative", "auc2", "auc2_ci_low",
                      "auc2_ci_high", "difference", "difference_ci_low", "difference_ci_high", "z", "p"}
    json.dumps(d, allow_nan=False)
    frame = result.to_frame()
    assert list(frame["term"]) == ["auc", "auc2", "difference"]
    assert frame.loc[2, "p"] == pytest.approx(result.p)
    assert "paired DeLong test" in result.summary()

    one_positive = delong([1, 0, 0, 0], [0.9, 0.1, 0.5, 0.3], [0.2, 0.1, 0.5, 0.3])
    d = one_positive.to_dict()
    assert d["auc"] == 1.0 and d["ci_low"] is None and d["ci_high"] is None
    assert d["z"] is None and d["p"] is None and d["difference"] == pytest.approx(2 / 3)
    json.dumps(d, allow_nan=False)
    assert "n/e" in one_positive.summary()


# ----------------------------------------------------------------------------- sensitivity / specificity
def _beta_ci(k: int, n: int, alpha: float) -> tuple[float, float]:
    low = 0.0 if k == 0 else stats.beta.ppf(alpha / 2, k, n - k + 1)
    high = 1.0 if k == n else stats.beta.ppf(1 - alpha / 2, k + 1, n - k)
    return low, high


@pytest.mark.parametrize("tp,fn,tn,fp,alpha", [
    (26, 15, 58, 14, 0.05), (0, 7, 9, 0, 0.05), (7, 0, 0, 9, 0.05), (1, 1, 50, 3, 0.10), (99, 1, 3, 97, 0.01),
])
def test_clopper_pearson_against_beta_quantiles(tp, fn, tn, fp, alpha):
    truth = [1] * (tp + fn) + [0] * (tn + fp)
    predicted = [1] * tp + [0] * fn + [0] * tn + [1] * fp
    result = sensitivity_specificity(truth, predicted, alpha=alpha)
    assert (result.tp, result.fn, result.tn, result.fp) == (tp, fn, tn, fp)
    assert result.sensitivity == pytest.approx(tp / (tp + fn))
    assert result.specificity == pytest.approx(tn / (tn + fp))
    for got, (k, n) in (((result.sensitivity_ci_low, result.sensitivity_ci_high), (tp, tp + fn)),
                        ((result.specificity_ci_low, result.specificity_ci_high), (tn, tn + fp))):
        want = _beta_ci(k, n, alpha)
        assert got[0] == pytest.approx(want[0], abs=1e-10)
        assert got[1] == pytest.approx(want[1], abs=1e-10)
    d = result.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["n_positive"] == tp + fn and d["n_negative"] == tn + fp
    assert list(result.to_frame()["measure"]) == ["sensitivity", "specificity"]
    assert "Clopper-Pearson" in result.summary()


# ----------------------------------------------------------------------------- calibration
def _simulate_calibration(intercept: float, slope: float, n: int, seed: int):
    rng = np.random.default_rng(seed)
    lp = rng.normal(-0.5, 1.3, n)
    p = 1 / (1 + np.exp(-lp))
    y = rng.binomial(1, 1 / (1 + np.exp(-(intercept + slope * lp))))
    return y, p


@pytest.mark.parametrize("true_intercept,seed", [(0.0, 1), (0.6, 2), (-0.4, 3)])
def test_calibration_in_the_large_recovered(true_intercept, seed):
    y, p = _simulate_calibration(true_intercept, 1.0, 8000, seed)
    result = calibration(y, p)
    assert result.intercept_ci_low <= true_intercept <= result.intercept_ci_high
    assert result.slope_ci_low <= 1.0 <= result.slope_ci_high
    assert abs(result.intercept - true_intercept) < 0.1


@pytest.mark.parametrize("true_slope,seed", [(0.6, 4), (1.0, 5), (1.5, 6)])
def test_calibration_slope_recovered(true_slope, seed):
    y, p = _simulate_calibration(-0.2, true_slope, 8000, seed)
    result = calibration(y, p, alpha=0.05)
    assert result.slope_ci_low <= true_slope <= result.slope_ci_high
    assert abs(result.slope - true_slope) < 0.1
    # same slope from an independent unpenalized logistic fit
    from sklearn.linear_model import LogisticRegression

    lp = np.log(p / (1 - p))
    fit = LogisticRegression(C=1e12, tol=1e-10, max_iter=1000).fit(lp[:, None], y)  # ~unpenalized
    assert result.slope == pytest.approx(fit.coef_[0, 0], abs=1e-5)
    d = result.to_dict()
    json.dumps(d, allow_nan=False)
    assert {"intercept", "intercept_ci_low", "intercept_ci_high", "slope", "slope_ci_low", "slope_ci_high"} <= set(d)
    assert list(result.to_frame()["term"]) == ["calibration_intercept", "calibration_slope"]
    assert "calibration slope" in result.summary()


@pytest.mark.parametrize("bad", [0.0, 1.0])
def test_calibration_refuses_probability_at_0_or_1(bad):
    y, p = _simulate_calibration(0, 1, 50, 7)
    p[3] = bad
    with pytest.raises(SitebenchError, match="exactly 0 or 1") as err:
        calibration(y, p)
    assert "\n" not in str(err.value)


def test_calibration_refuses_probability_outside_unit_interval():
    with pytest.raises(SitebenchError, match="strictly between 0 and 1"):
        calibration([0, 1, 0, 1], [0.2, 1.4, 0.3, 0.6])


# ----------------------------------------------------------------------------- per stratum
def _strata_table(seed: int = 9) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    parts = []
    for site, n_pos, n_neg in (("S01", 40, 60), ("S02", 30, 35), ("S03", 3, 40), ("S04", 0, 25)):
        y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
        lp = -0.5 + 1.2 * y + rng.normal(size=len(y))
        parts.append(pd.DataFrame({"site": site, "vendor": np.where(rng.random(len(y)) < 0.5, "GE", "Siemens"),
                                   "label": y, "risk": 1 / (1 + np.exp(-lp))}))
    return pd.concat(parts, ignore_index=True)


def test_classification_by_stratum_not_estimable_levels():
    table = _strata_table()
    result = classification_by_stratum(table, "label", "risk", ["site", "vendor"], min_per_class=5, threshold=0.5)
    assert result.metrics == ("auc", "sensitivity", "specificity", "calibration_intercept", "calibration_slope")
    frame = result.to_frame()
    assert set(frame["stratum"]) == {"overall", "site", "vendor"}

    s03 = frame[(frame["stratum"] == "site") & (frame["level"] == "S03")]
    s04 = frame[(frame["stratum"] == "site") & (frame["level"] == "S04")]
    for rows, words in ((s03, "too few"), (s04, "one class")):
        assert len(rows) == len(result.metrics)
        assert (rows["status"] == NOT_ESTIMABLE).all()
        assert rows["estimate"].isna().all() and rows["ci_low"].isna().all() and rows["ci_high"].isna().all()
        assert rows["reason"].str.contains(words).all()
    assert "need at least 5" in s03["reason"].iloc[0]

    # estimable levels agree with the single-call functions on the subset
    s01 = table[table["site"] == "S01"]
    auc_row = frame[(frame["level"] == "S01") & (frame["metric"] == "auc")].iloc[0]
    ref = delong(s01["label"], s01["risk"])
    assert auc_row["status"] == "ok" and pd.isna(auc_row["reason"])
    assert auc_row["estimate"] == pytest.approx(ref.auc) and auc_row["ci_low"] == pytest.approx(ref.ci_low)
    sens_row = frame[(frame["level"] == "S01") & (frame["metric"] == "sensitivity")].iloc[0]
    ss = sensitivity_specificity(s01["label"], s01["risk"] >= 0.5)
    assert sens_row["estimate"] == pytest.approx(ss.sensitivity)
    cal_row = frame[(frame["level"] == "S01") & (frame["metric"] == "calibration_slope")].iloc[0]
    assert cal_row["estimate"] == pytest.approx(calibration(s01["label"], s01["risk"]).slope)
    overall = frame[(frame["stratum"] == "overall") & (frame["metric"] == "auc")].iloc[0]
    assert overall["estimate"] == pytest.approx(delong(table["label"], table["risk"]).auc)

    d = result.to_dict()
    text = json.dumps(d, allow_nan=False)
    s04_dict = [r for r in d["rows"] if r["level"] == "S04"]
    assert all(r["estimate"] is None and r["status"] == NOT_ESTIMABLE for r in s04_dict)
    assert "NaN" not in text
    summary = result.summary()
    assert "n/e" in summary and "site=S04 all metrics: one class only" in summary


def test_classification_by_stratum_options():
    table = _strata_table(4)
    table["score"] = np.log(table["risk"] / (1 - table["risk"]))  # not a probability
    table.loc[2, "site"] = None
    result = classification_by_stratum(table, "label", "score", "site")
    assert result.metrics == ("auc",)
    assert any("calibration not reported" in n for n in result.notes)
    assert any("left out" in n for n in result.notes)
    table["pred"] = (table["risk"] > 0.4).astype(bool)
    result = classification_by_stratum(table, "label", "risk", "site", predicted="pred", calibrate=False,
                                       min_per_class=2)
    assert result.metrics == ("auc", "sensitivity", "specificity")
    frame = result.to_frame()
    assert (frame.loc[frame["level"] == "S03", "status"] == "ok").all()  # 3 positives >= 2
    with pytest.raises(SitebenchError, match="strictly between 0 and 1"):
        classification_by_stratum(table, "label", "score", "site", calibrate=True)
    with pytest.raises(SitebenchError, match="not in the table"):
        classification_by_stratum(table, "label", "risk", "scanner")
    with pytest.raises(SitebenchError, match="min_per_class"):
        classification_by_stratum(table, "label", "risk", "site", min_per_class=0)


# ----------------------------------------------------------------------------- bad input
Y = [0, 1, 0, 1, 1, 0]
S = [0.1, 0.8, 0.3, 0.7, 0.6, 0.4]


@pytest.mark.parametrize("call,match", [
    (lambda: delong([0, 1, 2, 1, 0, 1], S), "binary"),
    (lambda: delong(["a", "b", "a", "b", "a", "b"], S), "binary"),
    (lambda: delong([0, 1, np.nan, 1, 0, 1], S), "missing"),
    (lambda: delong(Y, [0.1, np.nan, 0.3, 0.7, 0.6, 0.4]), "missing"),
    (lambda: delong(Y, S[:-1]), "6 values but score has 5"),
    (lambda: delong(Y, S, S[:-1]), "score2 has 5"),
    (lambda: delong([1] * 6, S), "one class"),
    (lambda: delong(Y, ["x"] * 6), "numeric"),
    (lambda: delong(Y, S, alpha=1.5), "alpha"),
    (lambda: sensitivity_specificity(Y, [0, 1, 0, 3, 1, 0]), "predicted must be binary"),
    (lambda: sensitivity_specificity([0] * 6, [0, 1, 0, 1, 1, 0]), "one class"),
    (lambda: sensitivity_specificity(Y, [0, 1]), "length|values but"),
    (lambda: calibration([0, 1, 0, None, 1, 0], S), "missing"),
    (lambda: calibration([0] * 6, S), "one class"),
    (lambda: calibration(Y, S[:4]), "values but"),
    (lambda: classification_by_stratum(pd.DataFrame({"y": [1] * 6, "s": S, "g": "a"}), "y", "s", "g"), "one class"),
    (lambda: classification_by_stratum(pd.DataFrame({"y": [0, 1, 0, 1, 1, 5], "s": S, "g": "a"}), "y", "s", "g"),
     "binary"),
    (lambda: classification_by_stratum(pd.DataFrame({"y": Y, "s": [np.nan] + S[1:], "g": "a"}), "y", "s", "g"),
     "missing"),
])
def test_bad_input_one_line_error(call, match):
    with pytest.raises(SitebenchError, match=match) as err:
        call()
    assert "\n" not in str(err.value)
