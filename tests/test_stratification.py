"""Stratified metrics and the scanner mixed model, checked against independent truth.

Mixed-model data are simulated with known vendor, upgrade and age effects and
known site/scanner/residual variances; metrics are checked against plain numpy.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats

from sitebench.datasets import manifest as mf
from sitebench.errors import SitebenchError
from sitebench.stratification import (
    ScannerEffects,
    StratumMetrics,
    UpgradeEffect,
    fit_scanner_effects,
    stratum_metrics,
    upgrade_effect,
)
from sitebench.stratification.lmm import ENGINE_ID
from sitebench.stratification.metrics import FRAME_COLUMNS, _bootstrap_counts

# ----------------------------------------------------------------------------- simulation

TRUE_EFFECTS = {"C(vendor)[T.Philips]": 1.5, "C(vendor)[T.Siemens]": -1.0,
                "software_upgraded": 3.0, "age": -0.05}
SITE_SD, SCANNER_SD, RESIDUAL_SD = 2.0, 1.0, 1.5
VENDOR_EFFECT = {"GE": 0.0, "Philips": 1.5, "Siemens": -1.0}


def simulate(seed: int, n_sites: int = 20, per_scanner: int = 24,
             zero_random: bool = False) -> pd.DataFrame:
    """20 sites, 3 vendors, every other site with 2 scanners, an upgrade half-way at site S01."""
    rng = np.random.default_rng(seed)
    vendors = list(VENDOR_EFFECT)
    rows = []
    for s in range(n_sites):
        site, vendor = f"S{s:02d}", vendors[s % 3]
        u_site = 0.0 if zero_random else rng.normal(0, SITE_SD)
        for k in range(2 if s % 2 == 0 else 1):
            u_scanner = 0.0 if zero_random else rng.normal(0, SCANNER_SD)
            for i in range(per_scanner):
                upgraded = int(s == 1 and i >= per_scanner // 2)
                rows.append({
                    mf.SCAN_ID: f"{site}-{k}-{i}", mf.SUBJECT_ID: f"{site}-{k}-{i}", mf.SITE: site,
                    mf.SCANNER_ID: f"{site}-scanner{k}", mf.VENDOR: vendor,
                    mf.SOFTWARE_VERSION: "v2" if upgraded else "v1",
                    mf.ACQUISITION_DATE: f"2024-01-{i + 1:02d}",
                    mf.SOFTWARE_UPGRADED: upgraded, mf.AGE: rng.uniform(55, 85),
                    mf.SEX: rng.choice(["F", "M"]), mf.GROUP: rng.choice(["AD", "CN"]),
                    "_u": u_site + u_scanner, "_e": rng.normal(0, RESIDUAL_SD),
                })
    table = pd.DataFrame(rows)
    if zero_random:  # site means of the noise exactly equal: site variance estimate is 0
        table["_e"] -= table.groupby(mf.SITE)["_e"].transform("mean")
    table["volume"] = (600 + table[mf.VENDOR].map(VENDOR_EFFECT) + 3.0 * table[mf.SOFTWARE_UPGRADED]
                       - 0.05 * table[mf.AGE] + 0.5 * (table[mf.SEX] == "M") + table["_u"] + table["_e"])
    return table.drop(columns=["_u", "_e"])


@pytest.fixture(scope="module")
def known_fit() -> ScannerEffects:
    return fit_scanner_effects(simulate(seed=6), "volume")


@pytest.fixture(scope="module")
def boundary_table() -> pd.DataFrame:
    return simulate(seed=3, n_sites=12, per_scanner=15, zero_random=True)


# ----------------------------------------------------------------------------- mixed model


def test_known_effects_inside_confidence_intervals(known_fit: ScannerEffects) -> None:
    fe = known_fit.to_frame().set_index("term")
    assert list(known_fit.to_frame().columns) == ["term", "estimate", "se", "df", "ci_low", "ci_high", "p"]
    for term, truth in TRUE_EFFECTS.items():
        assert fe.loc[term, "ci_low"] <= truth <= fe.loc[term, "ci_high"], term
    # Informative, not trivially wide: the upgrade and age effects are detected.
    assert fe.loc["software_upgraded", "ci_low"] > 0
    assert fe.loc["age", "ci_high"] < 0 and fe.loc["age", "se"] < 0.02
    # t CI and p with Satterthwaite's df are consistent with estimate, SE and df.
    row = fe.loc["age"]
    assert row["ci_high"] - row["estimate"] == pytest.approx(stats.t.ppf(0.975, row["df"]) * row["se"], rel=1e-9)
    assert row["p"] == pytest.approx(2 * stats.t.sf(abs(row["estimate"] / row["se"]), row["df"]), rel=1e-9)
    # a between-site effect has about as many df as there are sites; a within-site one, as scans
    assert fe.loc["C(vendor)[T.Philips]", "df"] < 25 < 600 < row["df"]


def test_known_variance_components(known_fit: ScannerEffects) -> None:
    vc = known_fit.variance_components
    assert set(vc) == {"site", "scanner", "residual"}
    assert 1.0 < vc["site"] < 12.0            # truth 4 (20 sites)
    assert 0.1 < vc["scanner"] < 4.0          # truth 1 (10 sites with 2 scanners)
    assert 0.8 * RESIDUAL_SD**2 < vc["residual"] < 1.2 * RESIDUAL_SD**2
    assert sum(known_fit.variance_share.values()) == pytest.approx(1.0)
    assert known_fit.converged and known_fit.optimizer == "L-BFGS-B"
    assert known_fit.attempts[0]["optimizer"] == "L-BFGS-B" and known_fit.attempts[0]["converged"]
    assert known_fit.engine == ENGINE_ID and known_fit.ddf == "satterthwaite"
    assert known_fit.diagnostics["max_scaled_gradient"] < 2e-3
    assert not known_fit.boundary
    assert (known_fit.n_obs, known_fit.n_sites, known_fit.n_scanners) == (720, 20, 30)


def test_boundary_fixed_effects_agree_with_ols(boundary_table: pd.DataFrame) -> None:
    fit = fit_scanner_effects(boundary_table, "volume")
    assert fit.boundary
    assert fit.boundary_check is not None and "site" in fit.boundary_check["components"]
    ols = smf.ols("volume ~ C(vendor) + software_upgraded + age + C(sex) + C(group)",
                  boundary_table).fit()
    fe = fit.to_frame().set_index("term")
    for term in ols.params.index:
        assert abs(fe.loc[term, "estimate"] - ols.params[term]) < 0.01 * ols.bse[term], term
    assert fit.variance_share["site"] < 1e-4


def test_boundary_fit_matches_lme4_boundary_logic(boundary_table: pd.DataFrame) -> None:
    """No statsmodels #10239 workaround is needed: the site variance is exactly 0 and the fixed effects are OLS's."""
    fit = fit_scanner_effects(boundary_table, "volume", optimizers=("powell", "nm"))
    ols = smf.ols("volume ~ C(vendor) + software_upgraded + age + C(sex) + C(group)", boundary_table).fit()
    fe = fit.to_frame().set_index("term")
    assert fit.boundary and fit.variance_components["site"] == 0.0
    assert "site" in fit.boundary_check["exact_zero"]
    for term in ols.params.index:  # the scanner variance is tiny but not 0: OLS to within 1% of an SE
        assert abs(fe.loc[term, "estimate"] - ols.params[term]) < 0.01 * ols.bse[term], term
    assert fit.converged


def test_wald_option_gives_z_intervals(known_fit: ScannerEffects) -> None:
    table = simulate(seed=6)
    wald = fit_scanner_effects(table, "volume", ddf="wald")
    row = wald.to_frame().set_index("term").loc["age"]
    assert row["ci_high"] - row["estimate"] == pytest.approx(1.959964 * row["se"], rel=1e-5)
    assert row["p"] == pytest.approx(2 * stats.norm.sf(abs(row["estimate"] / row["se"])), rel=1e-6)
    np.testing.assert_allclose(wald.to_frame()["estimate"], known_fit.to_frame()["estimate"])
    assert "Wald z" in wald.summary() and "Satterthwaite" in known_fit.summary()


def test_vendor_as_its_own_grouping_is_an_error() -> None:
    table = simulate(seed=2, n_sites=6, per_scanner=8)
    with pytest.raises(SitebenchError, match="variance cannot be estimated") as info:
        fit_scanner_effects(table, "volume", fixed=("C(vendor)",), site=mf.VENDOR, scanner=None)
    assert "\n" not in str(info.value)


def test_constant_and_missing_terms_dropped_with_note() -> None:
    table = simulate(seed=1, n_sites=8, per_scanner=10)
    table[mf.SOFTWARE_UPGRADED] = 0
    table = table.drop(columns=[mf.GROUP])
    table.loc[[0, 5], "volume"] = np.nan
    fit = fit_scanner_effects(table, "volume", optimizers=("L-BFGS-B", "Powell"))
    assert "software_upgraded" in fit.dropped_terms and "C(group)" in fit.dropped_terms
    assert any("software_upgraded" in n and "constant" in n for n in fit.notes)
    assert "software_upgraded" not in set(fit.to_frame()["term"])
    assert fit.n_dropped == 2 and fit.n_obs == len(table) - 2
    assert "C(vendor)" in fit.formula and "software_upgraded" not in fit.formula


def test_single_scanner_per_site_omits_scanner_component() -> None:
    table = simulate(seed=2, n_sites=8, per_scanner=10)
    table = table[table[mf.SCANNER_ID].str.endswith("scanner0")]
    fit = fit_scanner_effects(table, "volume", fixed=("C(vendor)", "age"), optimizers=("L-BFGS-B",))
    assert fit.variance_components["scanner"] is None
    assert fit.variance_share["scanner"] is None
    assert any("more than one scanner" in n for n in fit.notes)
    assert "site:scanner_id" not in fit.formula


def test_software_upgraded_derived_when_missing() -> None:
    table = simulate(seed=4, n_sites=6, per_scanner=10).drop(columns=[mf.SOFTWARE_UPGRADED])
    fit = fit_scanner_effects(table, "volume", fixed=("software_upgraded", "age"),
                              optimizers=("L-BFGS-B",))
    assert "software_upgraded" in set(fit.to_frame()["term"])
    assert any("derived" in n for n in fit.notes)


def test_mixed_errors_are_one_line() -> None:
    table = simulate(seed=4, n_sites=3, per_scanner=5)
    with pytest.raises(SitebenchError, match="not in the table"):
        fit_scanner_effects(table, "nope")
    with pytest.raises(SitebenchError, match="at least 2 sites"):
        fit_scanner_effects(table[table[mf.SITE] == "S00"], "volume")


def test_upgrade_effect_matches_welch_t_test() -> None:
    table = simulate(seed=5, n_sites=4, per_scanner=12)
    result = upgrade_effect(table, "volume")
    assert isinstance(result, UpgradeEffect)
    frame = result.to_frame()
    assert list(frame["site"]) == ["S01"]  # the only site with scans before and after
    site = table[table[mf.SITE] == "S01"]
    before = site.loc[site[mf.SOFTWARE_UPGRADED] == 0, "volume"]
    after = site.loc[site[mf.SOFTWARE_UPGRADED] == 1, "volume"]
    welch = stats.ttest_ind(after, before, equal_var=False)
    ci = welch.confidence_interval(0.95)
    row = frame.iloc[0]
    assert (row["n_before"], row["n_after"]) == (len(before), len(after))
    assert row["difference"] == pytest.approx(after.mean() - before.mean())
    assert row["ci_low"] == pytest.approx(ci.low) and row["ci_high"] == pytest.approx(ci.high)
    assert row["p"] == pytest.approx(welch.pvalue)
    assert "S01" in result.summary()
    json.dumps(result.to_dict(), allow_nan=False)
    assert "p_tost" not in frame and "equivalent" not in frame  # no margin: no equivalence decision
    # with a margin: the two one-sided Welch tests (scipy's one-sided t-tests against ±margin) and the 90% CI
    for margin in (abs(row["difference"]) + 3 * row["se"], abs(row["difference"]) / 2):
        tost = upgrade_effect(table, "volume", margin=margin).to_frame().iloc[0]
        lower = stats.ttest_ind(after + margin, before, equal_var=False, alternative="greater").pvalue
        upper = stats.ttest_ind(after - margin, before, equal_var=False, alternative="less").pvalue
        assert tost["p_tost"] == pytest.approx(max(lower, upper))
        assert bool(tost["equivalent"]) == (max(lower, upper) < 0.05)
        ci90 = welch.confidence_interval(0.90)
        assert (tost["tost_ci_low"], tost["tost_ci_high"]) == (pytest.approx(ci90.low), pytest.approx(ci90.high))
    assert bool(upgrade_effect(table, "volume", margin=abs(row["difference"]) + 3 * row["se"])
                .to_frame().iloc[0]["equivalent"])


def test_scanner_effects_to_dict_is_json(known_fit: ScannerEffects) -> None:
    record = json.loads(json.dumps(known_fit.to_dict(), allow_nan=False))
    for key in ("response", "formula", "fixed_effects", "variance_components", "variance_share",
                "loglik", "reml", "converged", "optimizer", "attempts", "boundary", "n_obs",
                "n_sites", "n_scanners", "notes"):
        assert key in record
    assert set(record["fixed_effects"]["age"]) == {"estimate", "se", "df", "ci_low", "ci_high", "p"}
    assert record["engine"] == ENGINE_ID and record["ddf"] == "satterthwaite"
    assert "max_scaled_gradient" in record["diagnostics"]
    assert "residual" in record["variance_components"]
    assert "site" in known_fit.summary() and "age" in known_fit.summary()


# ----------------------------------------------------------------------------- metrics


def small_table() -> pd.DataFrame:
    rng = np.random.default_rng(11)
    n = 24
    site = np.repeat(["A", "B", "C"], 8)
    vendor = np.where(site == "C", "V2", "V1")
    vendor[:2] = "V3"  # a two-scan vendor: not estimable
    reference = rng.normal(50, 10, n)
    return pd.DataFrame({
        mf.SCAN_ID: [f"s{i}" for i in range(n)], mf.SUBJECT_ID: [f"p{i}" for i in range(n)],
        mf.SITE: site, mf.VENDOR: vendor, mf.SOFTWARE_VERSION: "v1",
        "reference": reference, "prediction": reference + rng.normal(1.0, 3.0, n),
        "dice": rng.uniform(0.7, 0.9, n),
    })


def test_point_metrics_match_numpy() -> None:
    table = small_table()
    result = stratum_metrics(table, prediction="prediction", reference="reference", n_boot=200)
    assert isinstance(result, StratumMetrics)
    frame = result.to_frame()
    assert list(frame.columns) == list(FRAME_COLUMNS)
    for stratum, level, rows in [("overall", "all", table),
                                 ("site", "B", table[table[mf.SITE] == "B"]),
                                 ("vendor", "V1", table[table[mf.VENDOR] == "V1"])]:
        got = frame[(frame["stratum"] == stratum) & (frame["level"] == level)].set_index("metric")
        e = rows["prediction"].to_numpy() - rows["reference"].to_numpy()
        assert got.loc["mae", "estimate"] == pytest.approx(np.mean(np.abs(e)), rel=1e-12)
        assert got.loc["bias", "estimate"] == pytest.approx(np.mean(e), rel=1e-12)
        assert got.loc["rmse", "estimate"] == pytest.approx(np.sqrt(np.mean(e**2)), rel=1e-12)
        r = np.corrcoef(rows["prediction"], rows["reference"])[0, 1]
        assert got.loc["pearson_r", "estimate"] == pytest.approx(r, rel=1e-10)
        assert got.loc["dice", "estimate"] == pytest.approx(rows["dice"].mean(), rel=1e-12)
        assert got.loc["mae", "n_scans"] == len(rows)
        for metric in ("mae", "bias", "rmse", "pearson_r"):
            assert got.loc[metric, "ci_low"] <= got.loc[metric, "estimate"] <= got.loc[metric, "ci_high"]
            assert got.loc[metric, "ci_low"] < got.loc[metric, "ci_high"]


def test_small_stratum_not_estimable() -> None:
    result = stratum_metrics(small_table(), prediction="prediction", reference="reference", n_boot=50)
    rows = [r for r in result.rows if r["stratum"] == "vendor" and r["level"] == "V3"]
    assert len(rows) == 5 and all(r["n_scans"] == 2 for r in rows)
    for r in rows:
        assert r["estimate"] is None and r["ci_low"] is None and r["ci_high"] is None
        assert r["estimable"] is False and "min_scans" in r["note"]
    assert "n/e" in result.summary()


def test_zero_variance_pearson_not_estimable() -> None:
    table = small_table()
    table.loc[table[mf.SITE] == "A", "reference"] = 40.0
    result = stratum_metrics(table, prediction="prediction", reference="reference", n_boot=50)
    row = next(r for r in result.rows if r["level"] == "A" and r["metric"] == "pearson_r")
    assert row["estimate"] is None and not row["estimable"] and "zero variance" in row["note"]
    bias = next(r for r in result.rows if r["level"] == "A" and r["metric"] == "bias")
    assert bias["estimable"]


def test_same_seed_same_intervals() -> None:
    table = small_table()
    a = stratum_metrics(table, prediction="prediction", reference="reference", n_boot=300, seed=7)
    b = stratum_metrics(table, prediction="prediction", reference="reference", n_boot=300, seed=7)
    c = stratum_metrics(table, prediction="prediction", reference="reference", n_boot=300, seed=8)
    pd.testing.assert_frame_equal(a.to_frame(), b.to_frame())
    assert not np.allclose(a.to_frame()["ci_low"].dropna(), c.to_frame()["ci_low"].dropna())
    assert (a.n_boot, a.seed, a.confidence) == (300, 7, 0.95)


def test_bootstrap_resamples_within_site() -> None:
    # Site A is off by exactly +100, site B exactly right. Resampling within site keeps
    # 10 + 10 scans in every replicate, so the overall bias is 50 in every replicate;
    # pooled resampling would give a wide interval.
    table = pd.DataFrame({
        mf.SITE: ["A"] * 10 + ["B"] * 10, mf.SUBJECT_ID: [f"p{i}" for i in range(20)],
        "reference": np.arange(20, dtype=float),
    })
    table["prediction"] = table["reference"] + np.where(table[mf.SITE] == "A", 100.0, 0.0)
    result = stratum_metrics(table, prediction="prediction", reference="reference",
                             strata=(mf.SITE,), dice=None, n_boot=500)
    bias = result.forest_table("bias", "site").set_index("level")
    assert bias.loc["all", "estimate"] == pytest.approx(50.0)
    assert bias.loc["all", "ci_low"] == pytest.approx(50.0) and bias.loc["all", "ci_high"] == pytest.approx(50.0)
    assert list(bias.index) == ["A", "B", "all"]

    # The resampling counts themselves: per-site totals fixed, subjects drawn whole.
    sites = np.array([0] * 6 + [1] * 4)
    clusters = np.array([0, 0, 1, 1, 2, 2, 3, 4, 5, 6])  # site 0: 3 subjects x 2 scans
    counts = _bootstrap_counts(sites, clusters, n_boot=400, seed=0)
    assert (counts[:, sites == 0].sum(axis=1) == 6).all()
    assert (counts[:, sites == 1].sum(axis=1) == 4).all()
    assert (counts[:, 0] == counts[:, 1]).all() and (counts[:, 2] == counts[:, 3]).all()
    assert counts[:, 0].std() > 0


def test_repeat_scans_resample_subjects() -> None:
    table = small_table()
    table[mf.SUBJECT_ID] = [f"p{i // 2}" for i in range(len(table))]
    result = stratum_metrics(table, prediction="prediction", reference="reference", n_boot=50)
    assert result.resampling == "subjects within site"
    overall = next(r for r in result.rows if r["stratum"] == "overall")
    assert overall["n_subjects"] == 12 and overall["n_sites"] == 3


def test_metrics_validation_and_json() -> None:
    table = small_table()
    table.loc[3, "prediction"] = np.nan
    result = stratum_metrics(table, prediction="prediction", reference="reference",
                             strata=(mf.SITE, mf.VENDOR, "not_a_column"), n_boot=100)
    assert result.n_dropped == 1 and result.n_scans == len(table) - 1
    assert any("not_a_column" in n for n in result.notes)
    record = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert record["n_boot"] == 100 and record["rows"][0]["stratum"] == "overall"
    assert set(record["rows"][0]) == set(FRAME_COLUMNS)
    with pytest.raises(SitebenchError, match="not computed"):
        result.forest_table("bias", "scanner_model")
    with pytest.raises(SitebenchError, match="not in the table"):
        stratum_metrics(table, prediction="nope", reference="reference")


def test_bootstrap_speed_is_vectorised() -> None:
    import time

    rng = np.random.default_rng(0)
    n = 200
    table = pd.DataFrame({
        mf.SITE: rng.choice([f"S{i}" for i in range(20)], n),
        mf.SUBJECT_ID: [f"p{i}" for i in range(n)],
        mf.VENDOR: rng.choice(["GE", "Philips", "Siemens"], n),
        mf.SOFTWARE_VERSION: rng.choice(["a", "b", "c", "d", "e", "f"], n),
        "reference": rng.normal(600, 50, n),
    })
    table["prediction"] = table["reference"] + rng.normal(0, 10, n)
    start = time.perf_counter()
    result = stratum_metrics(table, prediction="prediction", reference="reference", n_boot=1000)
    assert time.perf_counter() - start < 10.0
    assert len({(r["stratum"], r["level"]) for r in result.rows}) == 1 + 20 + 3 + 6
