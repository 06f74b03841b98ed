"""Agreement and metrology statistics checked against published values and independent routes.

* ICC: Shrout & Fleiss (1979) Table 2 data and their published ICCs, the values psych::ICC
  prints for the same data, CIs re-derived by inverting the F test, and CI coverage by simulation.
* Bland-Altman: the PEFR data of Bland & Altman (1986, Lancet); exact CIs by coverage simulation.
* Lin's CCC: its definition computed directly; Fisher-z CI by coverage simulation.
* Metrology: simulations with known bias, wSD, wCV and variance components (fixed seeds);
  mean squares cross-checked with statsmodels' ANOVA table.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import optimize, stats
from statsmodels.stats.anova import anova_lm

from sitebench.errors import SitebenchError
from sitebench.stratification.agreement import (
    ICC_FORMS,
    RC_FACTOR,
    bland_altman,
    icc,
    lins_ccc,
    metrology,
)

# ----------------------------------------------------------------------------- data

#: Shrout & Fleiss (1979) Table 2: 6 targets rated by 4 judges.
SF_RATINGS = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6],
                       [10, 5, 6, 9], [6, 2, 4, 7]], dtype=float)

#: Bland & Altman (1986) PEFR (l/min), first measurement with each meter, 17 subjects.
WRIGHT = [494, 395, 516, 434, 476, 557, 413, 442, 650, 433, 417, 656, 267, 478, 178, 423, 427]
MINI = [512, 430, 520, 428, 500, 600, 364, 380, 658, 445, 432, 626, 260, 477, 259, 350, 451]


def long_ratings(matrix: np.ndarray) -> pd.DataFrame:
    n, k = matrix.shape
    return pd.DataFrame({"target": np.repeat([f"T{i + 1}" for i in range(n)], k),
                         "judge": np.tile([f"J{j + 1}" for j in range(k)], n),
                         "rating": matrix.ravel()})


@pytest.fixture(scope="module")
def sf_result():
    return icc(long_ratings(SF_RATINGS), "target", "judge", "rating")


@pytest.fixture(scope="module")
def pefr() -> pd.DataFrame:
    return pd.DataFrame({"wright": WRIGHT, "mini": MINI})


# ----------------------------------------------------------------------------- ICC

# Shrout & Fleiss (1979), Table 4, published to 2 decimals.
SF_PUBLISHED = {"ICC(1,1)": 0.17, "ICC(2,1)": 0.29, "ICC(3,1)": 0.71,
                "ICC(1,4)": 0.44, "ICC(2,4)": 0.62, "ICC(3,4)": 0.91}
SF_TO_MW = {"ICC(1,1)": "ICC(1,1)", "ICC(2,1)": "ICC(A,1)", "ICC(3,1)": "ICC(C,1)",
            "ICC(1,4)": "ICC(1,k)", "ICC(2,4)": "ICC(A,k)", "ICC(3,4)": "ICC(C,k)"}

# psych::ICC(sf) printout (psych documentation example, alpha = .05, two-sided quantiles):
# form: (ICC, F, df1, df2, p, lower, upper), each to the digits printed.
PSYCH = {
    "ICC(1,1)": (0.17, 1.8, 5, 18, 0.16477, -0.133, 0.72),
    "ICC(A,1)": (0.29, 11.0, 5, 15, 0.00013, 0.019, 0.76),
    "ICC(C,1)": (0.71, 11.0, 5, 15, 0.00013, 0.342, 0.95),
    "ICC(1,k)": (0.44, 1.8, 5, 18, 0.16477, -0.884, 0.91),
    "ICC(A,k)": (0.62, 11.0, 5, 15, 0.00013, 0.071, 0.93),
    "ICC(C,k)": (0.91, 11.0, 5, 15, 0.00013, 0.676, 0.99),
}


def _tol(printed: float) -> float:
    """Half a unit in the last printed digit (plus float slack)."""
    text = f"{printed}"
    decimals = len(text.split(".")[1]) if "." in text else 0
    return 0.5 * 10.0 ** (-decimals) + 1e-9


def test_icc_shrout_fleiss_published_values(sf_result):
    for sf_name, published in SF_PUBLISHED.items():
        assert sf_result[SF_TO_MW[sf_name]].icc == pytest.approx(published, abs=0.005), sf_name
        # The Shrout-Fleiss name looks up the same form.
        assert sf_result[sf_name.replace(",4)", ",k)")].form == SF_TO_MW[sf_name]


def test_icc_matches_psych_printout(sf_result):
    for name, (value, f, df1, df2, p, low, high) in PSYCH.items():
        form = sf_result[name]
        assert form.icc == pytest.approx(value, abs=_tol(value)), name
        assert form.F == pytest.approx(f, abs=_tol(f)), name
        assert (form.df1, form.df2) == (df1, df2), name
        assert form.p == pytest.approx(p, abs=_tol(p)), name
        assert form.ci_low == pytest.approx(low, abs=_tol(low)), name
        assert form.ci_high == pytest.approx(high, abs=_tol(high)), name
    # The more precise F values quoted for this example.
    assert sf_result["ICC(1,1)"].F == pytest.approx(1.79, abs=0.005)
    assert sf_result["ICC(A,1)"].F == pytest.approx(11.03, abs=0.005)
    assert sf_result["ICC(C,1)"].F == pytest.approx(11.03, abs=0.005)


def test_icc_anova_mean_squares_match_statsmodels(sf_result):
    table = long_ratings(SF_RATINGS)
    aov = anova_lm(smf.ols("rating ~ C(target) + C(judge)", data=table).fit())
    assert sf_result.ms_targets == pytest.approx(aov.loc["C(target)", "mean_sq"], rel=1e-10)
    assert sf_result.ms_raters == pytest.approx(aov.loc["C(judge)", "mean_sq"], rel=1e-10)
    assert sf_result.ms_error == pytest.approx(aov.loc["Residual", "mean_sq"], rel=1e-10)
    one_way = anova_lm(smf.ols("rating ~ C(target)", data=table).fit())
    assert sf_result.ms_within == pytest.approx(one_way.loc["Residual", "mean_sq"], rel=1e-10)


def _invert_f_test(f_obs: float, df1: float, df2: float, k: int, tail: float) -> float:
    """rho0 where P(F(df1, df2) > f_obs / theta(rho0)) = tail, theta = (1+(k-1) rho0)/(1-rho0)."""
    def g(rho: float) -> float:
        theta = (1 + (k - 1) * rho) / (1 - rho)
        return stats.f.sf(f_obs / theta, df1, df2) - tail
    return optimize.brentq(g, -1 / (k - 1) + 1e-12, 1 - 1e-12, xtol=1e-13)


def test_icc_exact_cis_by_inverting_the_f_test(sf_result):
    """CI bounds are where the F test of H0: rho = rho0 has one-sided p = alpha/2."""
    n, k = SF_RATINGS.shape
    for single, average, df2 in (("ICC(1,1)", "ICC(1,k)", n * (k - 1)),
                                 ("ICC(C,1)", "ICC(C,k)", (n - 1) * (k - 1))):
        form = sf_result[single]
        low = _invert_f_test(form.F, n - 1, df2, k, 0.025)   # p(upper tail) = alpha/2
        high = _invert_f_test(form.F, n - 1, df2, k, 0.975)  # p(lower tail) = alpha/2
        assert form.ci_low == pytest.approx(low, abs=1e-9)
        assert form.ci_high == pytest.approx(high, abs=1e-9)
        # The average-measures bounds are the Spearman-Brown step-up of the single bounds.
        sb = lambda r: k * r / (1 + (k - 1) * r)  # noqa: E731
        assert sf_result[average].ci_low == pytest.approx(sb(low), abs=1e-9)
        assert sf_result[average].ci_high == pytest.approx(sb(high), abs=1e-9)


def test_icc_absolute_agreement_ci_closed_form(sf_result):
    """ICC(A,.) bounds from McGraw & Wong's Table 7 evaluated here, written out independently."""
    n, k = SF_RATINGS.shape
    msr, msc, mse = sf_result.ms_targets, sf_result.ms_raters, sf_result.ms_error
    rho = sf_result["ICC(A,1)"].icc
    assert rho == pytest.approx((msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n))
    # Satterthwaite df in psych's form (vn / vd), a different algebraic arrangement.
    fj = msc / mse
    vn = (k - 1) * (n - 1) * (k * rho * fj + n * (1 + (k - 1) * rho) - k * rho) ** 2
    vd = (n - 1) * k**2 * rho**2 * fj**2 + (n * (1 + (k - 1) * rho) - k * rho) ** 2
    v = vn / vd
    assert sf_result["ICC(A,1)"].ci_df2 == pytest.approx(v, rel=1e-10)
    f_up, f_lo = stats.f.ppf(0.975, n - 1, v), stats.f.ppf(0.975, v, n - 1)
    low = n * (msr - f_up * mse) / (f_up * (k * msc + (k * n - k - n) * mse) + n * msr)
    high = n * (f_lo * msr - mse) / (k * msc + (k * n - k - n) * mse + n * f_lo * msr)
    assert sf_result["ICC(A,1)"].ci_low == pytest.approx(low, abs=1e-12)
    assert sf_result["ICC(A,1)"].ci_high == pytest.approx(high, abs=1e-12)
    # psych's route for ICC(A,k): Spearman-Brown of the ICC(A,1) bounds.
    assert sf_result["ICC(A,k)"].ci_low == pytest.approx(k * low / (1 + (k - 1) * low), abs=1e-12)
    assert sf_result["ICC(A,k)"].ci_high == pytest.approx(k * high / (1 + (k - 1) * high), abs=1e-12)


def _coverage(rng: np.random.Generator, n: int, k: int, sd_target: float, sd_rater: float,
              sd_error: float, n_sim: int) -> dict[str, float]:
    truth = {
        "ICC(1,1)": sd_target**2 / (sd_target**2 + sd_error**2),
        "ICC(C,1)": sd_target**2 / (sd_target**2 + sd_error**2),
        "ICC(A,1)": sd_target**2 / (sd_target**2 + sd_rater**2 + sd_error**2),
    }
    for single, average in (("ICC(1,1)", "ICC(1,k)"), ("ICC(C,1)", "ICC(C,k)"),
                            ("ICC(A,1)", "ICC(A,k)")):
        truth[average] = k * truth[single] / (1 + (k - 1) * truth[single])
    hits = dict.fromkeys(truth, 0)
    for _ in range(n_sim):
        x = (rng.normal(0, sd_target, (n, 1)) + rng.normal(0, sd_rater, (1, k))
             + rng.normal(0, sd_error, (n, k)))
        result = icc(long_ratings(x), "target", "judge", "rating")
        for name, rho in truth.items():
            form = result[name]
            hits[name] += form.ci_low <= rho <= form.ci_high
    return {name: h / n_sim for name, h in hits.items()}


def test_icc_ci_coverage_by_simulation():
    rng = np.random.default_rng(20240601)
    one_way = _coverage(rng, n=15, k=3, sd_target=1.0, sd_rater=0.0, sd_error=1.0, n_sim=600)
    for name in ("ICC(1,1)", "ICC(1,k)", "ICC(C,1)", "ICC(C,k)"):  # exact under this model
        assert 0.925 <= one_way[name] <= 0.975, (name, one_way[name])
    two_way = _coverage(rng, n=15, k=3, sd_target=1.0, sd_rater=0.7, sd_error=0.7, n_sim=600)
    for name in ("ICC(C,1)", "ICC(C,k)"):  # exact under additive rater effects too
        assert 0.925 <= two_way[name] <= 0.975, (name, two_way[name])
    for name in ("ICC(A,1)", "ICC(A,k)"):  # Satterthwaite approximation
        assert 0.92 <= two_way[name] <= 0.98, (name, two_way[name])


def test_icc_outputs(sf_result):
    payload = sf_result.to_dict()
    assert list(payload) == ["forms"]
    assert [f["form"] for f in payload["forms"]] == list(ICC_FORMS)
    for row in payload["forms"]:
        assert set(row) == {"form", "icc", "ci_low", "ci_high", "F", "df1", "df2", "p"}
        assert all(isinstance(row[key], float) for key in row if key != "form")
    assert json.loads(json.dumps(payload)) == payload
    frame = sf_result.to_frame()
    assert len(frame) == 6 and list(frame["form"]) == list(ICC_FORMS)
    assert frame.loc[frame["form"] == "ICC(A,1)", "shrout_fleiss"].item() == "ICC(2,1)"
    text = sf_result.summary()
    assert all(name in text for name in ICC_FORMS) and "Satterthwaite" in text
    with pytest.raises(KeyError):
        sf_result["ICC(4,1)"]


def test_icc_row_order_and_label_types_do_not_matter(sf_result):
    table = long_ratings(SF_RATINGS).sample(frac=1.0, random_state=3)
    table["judge"] = table["judge"].str[1:].astype(int)
    shuffled = icc(table, "target", "judge", "rating")
    for a, b in zip(shuffled.forms, sf_result.forms):
        assert a.icc == pytest.approx(b.icc) and a.ci_low == pytest.approx(b.ci_low)


def test_icc_degenerate_residual_gives_none_not_numbers():
    # Ratings exactly additive in target and judge: MSE = 0, F infinite.
    x = np.add.outer([1.0, 4.0, 2.0, 8.0], [0.0, 1.0, 3.0])
    result = icc(long_ratings(x), "target", "judge", "rating")
    assert result["ICC(C,1)"].icc == pytest.approx(1.0)
    for name in ("ICC(C,1)", "ICC(C,k)", "ICC(A,1)", "ICC(A,k)"):
        assert result[name].F is None and result[name].p is None, name
        assert result[name].ci_low is None and result[name].ci_high is None, name
    assert result["ICC(1,1)"].F is not None  # the one-way test still exists
    assert any("no residual variation" in note for note in result.notes)
    assert "n/e" in result.summary()
    json.dumps(result.to_dict())


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.drop(index=5), "incomplete design"),
    (lambda t: pd.concat([t, t.iloc[[0]]]), "repeat a target/judge pair"),
    (lambda t: t.assign(rating=t["rating"].where(t.index != 3)), "NaN"),
    (lambda t: t.assign(rating=1.0), "constant"),
    (lambda t: t[t["target"] == "T1"], "at least 2 target"),
    (lambda t: t[t["judge"] == "J1"], "at least 2 judge"),
    (lambda t: t.rename(columns={"judge": "rater"}), "'judge' not in the table"),
    (lambda t: t.assign(rating="x"), "must be numeric"),
    (lambda t: t.assign(judge=t["judge"].where(t.index != 2)), "missing label"),
])
def test_icc_bad_input(mutate, message):
    table = mutate(long_ratings(SF_RATINGS))
    with pytest.raises(SitebenchError, match=message) as info:
        icc(table, "target", "judge", "rating")
    assert "\n" not in str(info.value)


def test_icc_bad_alpha():
    with pytest.raises(SitebenchError, match="alpha"):
        icc(long_ratings(SF_RATINGS), "target", "judge", "rating", alpha=1.5)


# ----------------------------------------------------------------------------- Bland-Altman


def test_bland_altman_pefr_published(pefr):
    # Bland & Altman (1986): mean difference -2.1, SD 38.8, limits -79.7 to 75.5 (mean -/+ 2 SD).
    result = bland_altman(pefr, "wright", "mini", limit_z=2.0)
    assert result.n == 17
    assert result.bias == pytest.approx(-2.1, abs=0.05)
    assert result.sd == pytest.approx(38.8, abs=0.05)
    assert result.lower == pytest.approx(-79.7, abs=0.1)
    assert result.upper == pytest.approx(75.5, abs=0.1)


def test_bland_altman_default_limits_and_cis(pefr):
    d = np.array(WRIGHT, float) - np.array(MINI, float)
    n, mean, sd = len(d), d.mean(), d.std(ddof=1)
    result = bland_altman(pefr, "wright", "mini")
    assert result.bias == pytest.approx(mean) and result.sd == pytest.approx(sd)
    assert result.lower == pytest.approx(mean - 1.96 * sd)
    assert result.upper == pytest.approx(mean + 1.96 * sd)
    t = stats.t.ppf(0.975, n - 1)
    assert (result.bias_ci_low, result.bias_ci_high) == pytest.approx(
        (mean - t * sd / math.sqrt(n), mean + t * sd / math.sqrt(n)))
    assert result.bias_ci_low == pytest.approx(-22.0, abs=0.1)  # -2.1 -/+ 2.12 x 9.4
    assert result.bias_ci_high == pytest.approx(17.8, abs=0.1)
    # Approximate method: limit -/+ t(n-1) sqrt(3 s^2 / n).
    approx = bland_altman(pefr, "wright", "mini", method="approximate", limit_z=2.0)
    half = t * math.sqrt(3 * sd**2 / n)
    assert (approx.lower_ci_low, approx.lower_ci_high) == pytest.approx(
        (mean - 2 * sd - half, mean - 2 * sd + half))
    assert (approx.upper_ci_low, approx.upper_ci_high) == pytest.approx(
        (mean + 2 * sd - half, mean + 2 * sd + half))
    # Exact intervals are not symmetric about the limit and widen outward.
    exact = bland_altman(pefr, "wright", "mini")
    assert exact.upper - exact.upper_ci_low < exact.upper_ci_high - exact.upper
    assert exact.lower_ci_high - exact.lower < exact.lower - exact.lower_ci_low


def test_bland_altman_exact_and_approximate_agree_for_large_n():
    rng = np.random.default_rng(5)
    table = pd.DataFrame({"a": rng.normal(10, 2, 3000), "b": rng.normal(10, 2, 3000)})
    exact = bland_altman(table, "a", "b")
    approx = bland_altman(table, "a", "b", method="approximate")
    width = exact.upper_ci_high - exact.upper_ci_low
    assert approx.upper_ci_high - approx.upper_ci_low == pytest.approx(width, rel=0.03)


def test_bland_altman_exact_ci_coverage():
    rng = np.random.default_rng(11)
    mu, sigma, n, n_sim = 1.0, 2.0, 12, 1000
    upper_true, lower_true = mu + 1.96 * sigma, mu - 1.96 * sigma
    hit_upper = hit_lower = hit_bias = 0
    for _ in range(n_sim):
        table = pd.DataFrame({"a": rng.normal(mu, sigma, n), "b": np.zeros(n)})
        r = bland_altman(table, "a", "b")
        hit_upper += r.upper_ci_low <= upper_true <= r.upper_ci_high
        hit_lower += r.lower_ci_low <= lower_true <= r.lower_ci_high
        hit_bias += r.bias_ci_low <= mu <= r.bias_ci_high
    for hits in (hit_upper, hit_lower, hit_bias):
        assert 0.93 <= hits / n_sim <= 0.97, hits / n_sim


def test_bland_altman_outputs(pefr):
    result = bland_altman(pefr, "wright", "mini")
    payload = result.to_dict()
    assert list(payload) == ["bias", "bias_ci_low", "bias_ci_high", "sd", "lower", "lower_ci_low",
                             "lower_ci_high", "upper", "upper_ci_low", "upper_ci_high", "n"]
    assert payload["n"] == 17 and isinstance(payload["bias"], float)
    assert json.loads(json.dumps(payload)) == payload
    frame = result.to_frame()
    assert list(frame["quantity"]) == ["bias", "lower_limit", "upper_limit", "sd"]
    assert "non-central t" in result.summary()


@pytest.mark.parametrize("table, kwargs, message", [
    (pd.DataFrame({"wright": [1.0, 2, 3], "mini": [0.0, 1, 2]}), {}, "constant"),
    (pd.DataFrame({"wright": [1.0, 2], "mini": [0.0, 1.5]}), {}, "at least 3"),
    (pd.DataFrame({"wright": [1.0, np.nan, 3, 4], "mini": [0.0, 1, 2, 5]}), {}, "NaN"),
    (pd.DataFrame({"wright": [1.0, 2, 3, 4]}), {}, "'mini' not in the table"),
    (pd.DataFrame({"wright": [1.0, 2, 3, 4], "mini": [0.0, 1, 2, 5]}), {"method": "x"}, "method"),
    (pd.DataFrame({"wright": [1.0, 2, 3, 4], "mini": [0.0, 1, 2, 5]}), {"limit_z": -1}, "limit_z"),
])
def test_bland_altman_bad_input(table, kwargs, message):
    with pytest.raises(SitebenchError, match=message):
        bland_altman(table, "wright", "mini", **kwargs)


# ----------------------------------------------------------------------------- Lin's CCC


def test_ccc_matches_definition(pefr):
    x, y = np.array(WRIGHT, float), np.array(MINI, float)
    cov = np.cov(x, y, bias=True)
    expected = 2 * cov[0, 1] / (cov[0, 0] + cov[1, 1] + (x.mean() - y.mean()) ** 2)
    # Equivalent form: 1 - E(x - y)^2 / (s_x^2 + s_y^2 + (mean_x - mean_y)^2).
    alt = 1 - np.mean((x - y) ** 2) / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)
    result = lins_ccc(pefr, "wright", "mini")
    assert result.ccc == pytest.approx(expected, rel=1e-12)
    assert result.ccc == pytest.approx(alt, rel=1e-12)
    assert result.pearson_r == pytest.approx(stats.pearsonr(x, y)[0], rel=1e-12)
    assert result.accuracy == pytest.approx(expected / result.pearson_r)
    assert result.ci_low < result.ccc < result.ci_high


def test_ccc_reacts_to_location_and_scale_shifts():
    rng = np.random.default_rng(2)
    x = rng.normal(50, 10, 60)
    same = lins_ccc(pd.DataFrame({"a": x, "b": x + rng.normal(0, 1e-9, 60)}), "a", "b")
    shifted = lins_ccc(pd.DataFrame({"a": x, "b": x + 5.0}), "a", "b")
    scaled = lins_ccc(pd.DataFrame({"a": x, "b": 1.5 * x - 25.0}), "a", "b")
    assert same.ccc == pytest.approx(1.0, abs=1e-9)
    assert shifted.pearson_r == pytest.approx(1.0) and shifted.ccc < 0.9
    assert scaled.pearson_r == pytest.approx(1.0) and scaled.ccc < 0.95
    # Population value for the shift: 2 s^2 / (2 s^2 + 25) with s^2 the divisor-n variance.
    assert shifted.ccc == pytest.approx(2 * x.var() / (2 * x.var() + 25.0))
    perfect = lins_ccc(pd.DataFrame({"a": x, "b": x}), "a", "b")
    assert perfect.ccc == 1.0 and perfect.ci_low is None and perfect.notes
    assert json.loads(json.dumps(perfect.to_dict()))["ci_low"] is None


def test_ccc_fisher_z_ci_coverage():
    rng = np.random.default_rng(7)
    n, n_sim = 40, 800
    sx, sy, rho, mx, my = 1.0, 1.2, 0.9, 0.0, 0.3
    cov = [[sx**2, rho * sx * sy], [rho * sx * sy, sy**2]]
    truth = 2 * rho * sx * sy / (sx**2 + sy**2 + (mx - my) ** 2)
    hits = 0
    for _ in range(n_sim):
        xy = rng.multivariate_normal([mx, my], cov, n)
        r = lins_ccc(pd.DataFrame({"a": xy[:, 0], "b": xy[:, 1]}), "a", "b")
        hits += r.ci_low <= truth <= r.ci_high
    assert 0.92 <= hits / n_sim <= 0.975, hits / n_sim


def test_ccc_bad_input():
    with pytest.raises(SitebenchError, match="constant"):
        lins_ccc(pd.DataFrame({"a": [1.0, 2, 3, 4], "b": [2.0] * 4}), "a", "b")
    with pytest.raises(SitebenchError, match="at least 4"):
        lins_ccc(pd.DataFrame({"a": [1.0, 2, 3], "b": [2.0, 1, 3]}), "a", "b")


# ----------------------------------------------------------------------------- metrology


def simulate_phantom(rng: np.random.Generator, n_subjects: int, n_reps: int, *, bias: float,
                     wsd: float, curvature: float = 0.0) -> pd.DataFrame:
    """measured = truth + bias + curvature (truth - 70)^2 + N(0, wsd), n_reps per subject."""
    truth = rng.uniform(20, 120, n_subjects)
    subject = np.repeat(np.arange(n_subjects), n_reps)
    x = truth[subject]
    y = x + bias + curvature * (x - 70.0) ** 2 + rng.normal(0, wsd, len(x))
    return pd.DataFrame({"subject": [f"P{s:03d}" for s in subject],
                         "replicate": np.tile(np.arange(n_reps), n_subjects),
                         "truth": x, "measured": y})


def test_metrology_recovers_bias_wsd_rc():
    rng = np.random.default_rng(42)
    table = simulate_phantom(rng, 150, 3, bias=0.5, wsd=2.0)
    result = metrology(table, "subject", "measured", reference="truth", replicate="replicate")
    assert result.n_subjects == 150 and result.n_measurements == 450 and result.n_sites is None
    assert result.bias == pytest.approx(0.5, abs=0.3)
    assert result.bias_ci_low <= 0.5 <= result.bias_ci_high
    assert result.wsd == pytest.approx(2.0, rel=0.08)
    assert result.wsd_ci_low <= 2.0 <= result.wsd_ci_high
    assert result.wsd_df == 300
    assert result.rc == pytest.approx(RC_FACTOR * result.wsd)
    assert RC_FACTOR == pytest.approx(2.77, abs=0.005)
    assert result.rc == pytest.approx(2.77 * 2.0, rel=0.08)
    # Linear relation with slope 1 and intercept 0.5.
    assert result.slope_ci_low <= 1.0 <= result.slope_ci_high
    assert result.intercept_ci_low <= 0.5 <= result.intercept_ci_high
    # Pooled within-subject variance computed directly.
    direct = table.groupby("subject")["measured"].var(ddof=1).mean()
    assert result.wsd == pytest.approx(math.sqrt(direct), rel=1e-12)
    # % bias = mean of 100 (subject mean - truth) / truth.
    means = table.groupby("subject")[["measured", "truth"]].mean()
    pct = 100 * (means["measured"] - means["truth"]) / means["truth"]
    assert result.percent_bias == pytest.approx(pct.mean(), rel=1e-10)


def test_metrology_wsd_chi_square_ci_coverage():
    rng = np.random.default_rng(2015)
    true_wsd, n_sim, hits = 1.5, 1000, 0
    for _ in range(n_sim):
        table = simulate_phantom(rng, 10, 2, bias=0.0, wsd=true_wsd)
        result = metrology(table, "subject", "measured")
        hits += result.wsd_ci_low <= true_wsd <= result.wsd_ci_high
    assert 0.93 <= hits / n_sim <= 0.97, hits / n_sim


def test_metrology_linearity_quadratic_test():
    rng = np.random.default_rng(3)
    linear = metrology(simulate_phantom(rng, 40, 2, bias=1.0, wsd=2.0), "subject", "measured",
                       reference="truth")
    curved = metrology(simulate_phantom(rng, 40, 2, bias=1.0, wsd=2.0, curvature=0.01),
                       "subject", "measured", reference="truth")
    assert linear.quadratic_p > 0.05
    assert curved.quadratic_p < 1e-3
    assert linear.r_squared > 0.99
    # The quadratic p-value equals statsmodels' on the subject means.
    table = simulate_phantom(np.random.default_rng(8), 30, 2, bias=0.0, wsd=2.0, curvature=0.002)
    means = table.groupby("subject")[["measured", "truth"]].mean()
    fit = smf.ols("measured ~ truth + I(truth ** 2)", data=means).fit()
    ours = metrology(table, "subject", "measured", reference="truth")
    assert ours.quadratic_p == pytest.approx(fit.pvalues["I(truth ** 2)"], rel=1e-6)
    line = smf.ols("measured ~ truth", data=means).fit()
    low, high = line.conf_int().loc["truth"]
    assert (ours.slope, ours.slope_ci_low, ours.slope_ci_high) == pytest.approx(
        (line.params["truth"], low, high), rel=1e-9)


def test_metrology_wcv_on_log_scale():
    rng = np.random.default_rng(9)
    s_log = 0.05
    truth = rng.uniform(10, 100, 200)
    subject = np.repeat(np.arange(200), 2)
    table = pd.DataFrame({"subject": subject,
                          "measured": truth[subject] * np.exp(rng.normal(0, s_log, 400))})
    result = metrology(table, "subject", "measured")
    true_wcv = math.sqrt(math.exp(s_log**2) - 1)
    assert result.wcv == pytest.approx(true_wcv, rel=0.1)
    assert result.wcv_ci_low <= true_wcv <= result.wcv_ci_high
    # Negative values: wCV not estimable, with a note, wSD still reported.
    shifted = table.assign(measured=table["measured"] - 50)
    res = metrology(shifted, "subject", "measured")
    assert res.wcv is None and res.wsd is not None
    assert any("wCV not estimable" in n for n in res.notes)


def simulate_sites(rng: np.random.Generator, n_subjects: int, n_sites: int, n_reps: int,
                   sd_site: float, sd_int: float, sd_within: float) -> pd.DataFrame:
    subj = rng.normal(0, 5.0, n_subjects)
    site = rng.normal(0, sd_site, n_sites)
    inter = rng.normal(0, sd_int, (n_subjects, n_sites))
    rows = [(f"P{i}", f"S{j}", r, 50 + subj[i] + site[j] + inter[i, j] + rng.normal(0, sd_within))
            for i in range(n_subjects) for j in range(n_sites) for r in range(n_reps)]
    return pd.DataFrame(rows, columns=["subject", "site", "replicate", "measured"])


def test_metrology_reproducibility_matches_anova_table():
    rng = np.random.default_rng(21)
    table = simulate_sites(rng, 10, 6, 2, sd_site=1.5, sd_int=0.8, sd_within=1.0)
    result = metrology(table, "subject", "measured", replicate="replicate", site="site")
    aov = anova_lm(smf.ols("measured ~ C(subject) * C(site)", data=table).fit())
    ms_site = aov.loc["C(site)", "mean_sq"]
    ms_int = aov.loc["C(subject):C(site)", "mean_sq"]
    ms_err = aov.loc["Residual", "mean_sq"]
    n, r = 10, 2
    assert result.sigma2_within == pytest.approx(ms_err, rel=1e-9)
    assert result.sigma2_interaction == pytest.approx(max((ms_int - ms_err) / r, 0), rel=1e-9)
    assert result.sigma2_site == pytest.approx(max((ms_site - ms_int) / (n * r), 0), rel=1e-9)
    total = (ms_site - ms_int) / (n * r) + (ms_int - ms_err) / r + ms_err
    assert result.reproducibility_sd == pytest.approx(math.sqrt(total), rel=1e-9)
    assert result.rdc == pytest.approx(RC_FACTOR * math.sqrt(total), rel=1e-9)
    assert result.wsd == pytest.approx(math.sqrt(ms_err), rel=1e-9)  # repeatability within site
    assert "method-of-moments" in result.reproducibility_method

    # Without replicates: two-way additive ANOVA, interaction folded into the within term.
    single = table[table["replicate"] == 0]
    res1 = metrology(single, "subject", "measured", site="site")
    aov1 = anova_lm(smf.ols("measured ~ C(subject) + C(site)", data=single).fit())
    assert res1.sigma2_within == pytest.approx(aov1.loc["Residual", "mean_sq"], rel=1e-9)
    assert res1.sigma2_site == pytest.approx(
        max((aov1.loc["C(site)", "mean_sq"] - aov1.loc["Residual", "mean_sq"]) / n, 0), rel=1e-9)
    assert res1.wsd is None and any("measured once" in note for note in res1.notes)


def test_metrology_reml_equals_anova_on_a_balanced_design():
    """With every ANOVA component positive, REML's variance components are the ANOVA ones."""
    rng = np.random.default_rng(21)
    table = simulate_sites(rng, 10, 6, 2, sd_site=1.5, sd_int=0.8, sd_within=1.0)
    anova = metrology(table, "subject", "measured", replicate="replicate", site="site")
    reml = metrology(table, "subject", "measured", replicate="replicate", site="site", reproducibility="reml")
    assert min(anova.sigma2_site, anova.sigma2_interaction) > 0
    for key in ("sigma2_site", "sigma2_interaction", "sigma2_within", "reproducibility_sd", "rdc"):
        assert getattr(reml, key) == pytest.approx(getattr(anova, key), rel=1e-5), key
    assert "REML" in reml.reproducibility_method and "method-of-moments" in anova.reproducibility_method
    # the CIs differ in method (Satterthwaite on mean squares vs on the REML information) but agree roughly
    assert reml.rdc_ci_low == pytest.approx(anova.rdc_ci_low, rel=0.15)
    assert reml.rdc_ci_high == pytest.approx(anova.rdc_ci_high, rel=0.15)


def unbalanced_traveling(seed: int = 8, n_subjects: int = 16, n_sites: int = 5) -> pd.DataFrame:
    """Repeats at the home site (3 scans), one scan at each of the other sites: the usual traveling design."""
    rng = np.random.default_rng(seed)
    site = rng.normal(0, 1.5, n_sites)
    rows = []
    for i in range(n_subjects):
        u, home = rng.normal(0, 3), i % n_sites
        inter = rng.normal(0, 1.0, n_sites)
        for j in range(n_sites):
            for r in range(3 if j == home else 1):
                rows.append((f"P{i:02d}", f"S{j}", r, round(50 + u + site[j] + inter[j] + rng.normal(0, 1.0), 8)))
    return pd.DataFrame(rows, columns=["subject", "site", "replicate", "measured"])


@pytest.mark.r_reference
def test_metrology_reml_on_unbalanced_design_matches_lme4(tmp_path):
    from conftest import require_rscript
    from test_lmm import run_lme4

    rscript = require_rscript("lme4")
    table = unbalanced_traveling()
    path = tmp_path / "traveling.csv"
    table.to_csv(path, index=False)
    table = pd.read_csv(path)
    ref = run_lme4(rscript, path, "measured ~ 1 + (1 | subject) + (1 | site) + (1 | subject:site)", "TRUE")["reml"]
    result = metrology(table, "subject", "measured", replicate="replicate", site="site")
    assert "REML" in result.reproducibility_method and "unbalanced" in result.reproducibility_method
    assert result.sigma2_site == pytest.approx(ref["var"]["site"], rel=1e-3)
    assert result.sigma2_interaction > 0.1
    assert result.sigma2_interaction == pytest.approx(ref["var"]["subject:site"], rel=1e-3)
    assert result.sigma2_within == pytest.approx(ref["var"]["Residual"], rel=1e-3)
    total = ref["var"]["site"] + ref["var"]["subject:site"] + ref["var"]["Residual"]
    assert result.rdc == pytest.approx(RC_FACTOR * math.sqrt(total), rel=1e-3)
    assert result.rdc_ci_low < result.rdc < result.rdc_ci_high
    print(f"unbalanced traveling design: RDC {result.rdc:.4f} (lme4 components: {RC_FACTOR * math.sqrt(total):.4f})")


def test_metrology_reproducibility_recovers_truth():
    rng = np.random.default_rng(1234)
    sd_site, sd_int, sd_within = 1.5, 0.5, 1.0
    table = simulate_sites(rng, 10, 40, 2, sd_site, sd_int, sd_within)
    result = metrology(table, "subject", "measured", site="site")
    true_sd = math.sqrt(sd_site**2 + sd_int**2 + sd_within**2)
    assert result.reproducibility_sd == pytest.approx(true_sd, rel=0.2)
    assert result.rdc_ci_low <= RC_FACTOR * true_sd <= result.rdc_ci_high
    assert result.wsd == pytest.approx(sd_within, rel=0.1)


def test_metrology_not_estimable_pieces_are_none_with_notes():
    rng = np.random.default_rng(4)
    table = simulate_phantom(rng, 20, 1, bias=0.0, wsd=1.0)
    only_truth = metrology(table, "subject", "measured", reference="truth")
    assert only_truth.bias is not None and only_truth.wsd is None and only_truth.rc is None
    assert any("repeatability not estimable" in n for n in only_truth.notes)
    replicated = simulate_phantom(rng, 20, 2, bias=0.0, wsd=1.0)
    no_truth = metrology(replicated, "subject", "measured")
    assert no_truth.bias is None and no_truth.slope is None and no_truth.quadratic_p is None
    assert any("no reference" in n for n in no_truth.notes)
    # Two true values only: bias yes, linearity no.
    two_levels = replicated.assign(truth=np.where(replicated["subject"] < "P010", 10.0, 20.0))
    res = metrology(two_levels, "subject", "measured", reference="truth")
    assert res.bias is not None and res.slope is None
    assert any("linearity not estimable" in n for n in res.notes)
    # Unbalanced and nested site designs: reproducibility None with a reason.
    sites = simulate_sites(rng, 6, 3, 2, 1.0, 0.3, 1.0)
    unbalanced = metrology(sites.iloc[1:], "subject", "measured", site="site", reproducibility="anova")
    assert unbalanced.rdc is None and any("balanced" in n for n in unbalanced.notes)
    holes = sites[~((sites["subject"] == "P0") & (sites["site"] == "S1"))]
    assert any("empty" in n for n in metrology(holes, "subject", "measured", site="site",
                                               reproducibility="anova").notes)
    assert metrology(holes, "subject", "measured", site="site").rdc is not None  # REML copes
    nested = sites.assign(subject=sites["subject"] + "-" + sites["site"])
    res = metrology(nested, "subject", "measured", site="site")
    assert res.rdc is None and any("one site only" in n for n in res.notes)
    payload = res.to_dict()
    assert json.loads(json.dumps(payload)) == payload and payload["rdc"] is None


def test_metrology_outputs():
    rng = np.random.default_rng(6)
    table = simulate_phantom(rng, 30, 2, bias=0.3, wsd=1.0)
    result = metrology(table, "subject", "measured", reference="truth", replicate="replicate")
    payload = result.to_dict()
    assert json.loads(json.dumps(payload)) == payload
    assert isinstance(payload["wsd"], float) and payload["wsd_df"] == 30
    assert payload["rdc"] is None and isinstance(payload["notes"], list)
    frame = result.to_frame()
    assert {"bias", "wsd", "rc", "wcv", "rdc", "quadratic_p"} <= set(frame["quantity"])
    assert frame.set_index("quantity").loc["rdc", "estimable"] == False  # noqa: E712
    text = result.summary()
    assert "within-subject SD" in text and "chi-square" in text and "note:" in text


@pytest.mark.parametrize("mutate, kwargs, message", [
    (lambda t: t.drop(columns="truth"), {"reference": "truth"}, "'truth' not in the table"),
    (lambda t: t.assign(measured=t["measured"].where(t.index != 4)), {}, "NaN"),
    (lambda t: t.assign(measured=3.0), {}, "constant"),
    (lambda t: t[t["subject"] == "P000"], {}, "at least 2 subjects"),
    (lambda t: t[t["replicate"] == 0], {}, "nothing to estimate"),
    (lambda t: t.assign(truth=t["truth"] + t["replicate"]), {"reference": "truth"},
     "differs within subject"),
    (lambda t: t.assign(replicate=0), {"replicate": "replicate"}, "repeat a subject/replicate"),
    (lambda t: t, {"alpha": 0}, "alpha"),
    (lambda t: t.assign(subject=t["subject"].where(t.index != 1)), {}, "missing label"),
])
def test_metrology_bad_input(mutate, kwargs, message):
    table = mutate(simulate_phantom(np.random.default_rng(0), 8, 2, bias=0.0, wsd=1.0))
    with pytest.raises(SitebenchError, match=message) as info:
        metrology(table, "subject", "measured", **kwargs)
    assert "\n" not in str(info.value)
