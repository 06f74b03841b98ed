"""Satterthwaite degrees of freedom of fit_lmm against R's lmerTest, OLS and simulation truth.

lmerTest (Kuznetsova, Brockhoff & Christensen 2017, J Stat Softw 82(13)) runs at test time
through ``tests/r/lmertest_reference.R``; without it these tests FAIL unless
``SITEBENCH_SKIP_R=1``. Demanded: df, t and p within 1e-3 relative of lmerTest on a nested
design (real ABIDE data: site > acquisition sample, vendor varying only between sites; and a
seeded site > scanner simulation) and a crossed design (subject x site), REML and ML.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from conftest import require_rscript
from test_lmm import r_term, simulate_crossed

from sitebench.errors import SitebenchError
from sitebench.stratification.lmm import fit_lmm

R_SCRIPT = Path(__file__).resolve().parent / "r" / "lmertest_reference.R"
ABIDE = Path("/work/shared/data/abide")
DF_RTOL = 1e-3


@pytest.fixture(scope="module")
def rscript() -> str:
    return require_rscript("lmerTest")


def run_lmertest(rscript: str, csv: Path, formula: str, reml: bool, contrast: str | None = None) -> dict:
    """``{key: {name: value}}`` from lmertest_reference.R."""
    args = [rscript, str(R_SCRIPT), str(csv), formula, "TRUE" if reml else "FALSE"]
    proc = subprocess.run(args + ([contrast] if contrast else []), capture_output=True, text=True)
    assert proc.returncode == 0, f"lmerTest reference run failed:\n{proc.stderr[-3000:]}"
    out: dict = {}
    for line in proc.stdout.splitlines():
        key, name, value = line.split("\t")
        out.setdefault(key, {})[name] = value if key == "converged" else float(value)
    return out


def abide_nested() -> pd.DataFrame:
    """ABIDE MRIQC CJV: site > acquisition sample (UCLA_1/UCLA_2, ...), vendor a property of the site."""
    iqm = pd.read_csv(ABIDE / "abide.tsv", sep="\t", usecols=["subject_id", "site", "cjv"])
    pheno = pd.read_csv(ABIDE / "Phenotypic_V1_0b_preprocessed1.csv", usecols=["SUB_ID", "SITE_ID", "AGE_AT_SCAN",
                                                                                "SEX"])
    params = pd.read_csv(ABIDE / "abide_scan_parameters.tsv", sep="\t", index_col=0)
    vendor = {site.replace("CALTEC", "CALTECH"): v.replace("Phillips", "Philips")
              for site, v in params.loc["Vendor"].dropna().items()}
    table = iqm.merge(pheno, left_on="subject_id", right_on="SUB_ID")
    table["vendor"] = table["SITE_ID"].map(vendor)
    table = table.dropna(subset=["vendor", "cjv", "AGE_AT_SCAN"])
    return pd.DataFrame({"site": table["site"], "scanner": table["SITE_ID"], "vendor": table["vendor"],
                         "age": table["AGE_AT_SCAN"].round(4), "sex": np.where(table["SEX"] == 1, "M", "F"),
                         "y": (100 * table["cjv"]).round(8)}).reset_index(drop=True)


def simulate_between_site_vendor(seed: int, n_sites: int = 10, per_scanner: int = 12,
                                 vendor_effect: float = 1.0) -> pd.DataFrame:
    """Sites with 1-2 scanners; vendor (2 levels) constant within each site; site SD 1.5, scanner 0.7."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_sites):
        vendor = "A" if s % 2 == 0 else "B"
        u_site = rng.normal(0, 1.5)
        for k in range(1 + s % 3 // 2 + (s < 3)):
            u_scanner = rng.normal(0, 0.7)
            for _ in range(per_scanner):
                age = rng.uniform(50, 80)
                y = 10 + vendor_effect * (vendor == "B") + 0.05 * age + u_site + u_scanner + rng.normal(0, 1.0)
                rows.append({"site": f"S{s:02d}", "scanner": f"K{k}", "vendor": vendor, "age": round(age, 4),
                             "y": round(y, 8)})
    return pd.DataFrame(rows)


def to_csv(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    table.to_csv(path, index=False)
    return pd.read_csv(path)  # exactly what R reads


def assert_matches_lmertest(fit, ref: dict) -> dict[str, float]:
    assert ref["converged"]["lme4"] == "TRUE"
    assert fit.converged and fit.ddf == "satterthwaite"
    worst = {"df": 0.0, "p": 0.0}
    assert {r_term(t) for t in fit.fixed_effects["term"]} == set(ref["df"])
    for _, row in fit.fixed_effects.iterrows():
        name = r_term(row["term"])
        assert row["df"] == pytest.approx(ref["df"][name], rel=DF_RTOL), (name, row["df"], ref["df"][name])
        assert row["statistic"] == pytest.approx(ref["t"][name], rel=DF_RTOL), name
        if ref["p"][name] > 1e-10:
            assert row["p"] == pytest.approx(ref["p"][name], rel=DF_RTOL), name
            worst["p"] = max(worst["p"], abs(row["p"] / ref["p"][name] - 1))
        else:  # far tail: p moves ~t^2 times faster than t, so compare log p
            assert math.log(row["p"]) == pytest.approx(math.log(ref["p"][name]), rel=DF_RTOL), name
        worst["df"] = max(worst["df"], abs(row["df"] / ref["df"][name] - 1))
    return worst


# ----------------------------------------------------------------------------- against lmerTest


@pytest.mark.r_reference
@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_abide_nested_site_sample_matches_lmertest(rscript, tmp_path, reml):
    table = to_csv(abide_nested(), tmp_path / "abide.csv")
    assert table.groupby("site")["vendor"].nunique().max() == 1  # vendor varies only between sites
    assert table.groupby("site")["scanner"].nunique().max() == 2
    ref = run_lmertest(rscript, tmp_path / "abide.csv", "y ~ age + sex + vendor + (1 | site) + (1 | site:scanner)",
                       reml)
    fit = fit_lmm(table, "y ~ age + C(sex) + C(vendor)", "site", vc=["scanner"], reml=reml)
    worst = assert_matches_lmertest(fit, ref)
    print(f"ABIDE nested ({'REML' if reml else 'ML'}): worst rel. diff df {worst['df']:.2e}, p {worst['p']:.2e}")


@pytest.mark.r_reference
@pytest.mark.parametrize("engine", ["nested", "sparse"])
def test_simulated_site_scanner_matches_lmertest_with_contrast(rscript, tmp_path, engine):
    table = to_csv(simulate_between_site_vendor(seed=7, n_sites=12), tmp_path / "nested.csv")
    ref = run_lmertest(rscript, tmp_path / "nested.csv", "y ~ age + vendor + (1 | site) + (1 | site:scanner)", True,
                       contrast="1,0,1")
    fit = fit_lmm(table, "y ~ age + C(vendor)", "site", vc=["scanner"], engine=engine)
    assert fit.engine == engine
    assert_matches_lmertest(fit, ref)
    vendor = fit.fixed_effects.set_index("term").loc["C(vendor)[T.B]"]
    assert vendor["df"] < 12  # a between-site effect: about the number of sites, not of scans
    # mean of vendor B at age 0: lmerTest's contest1D (term order Intercept, C(vendor)[T.B], age)
    row = fit.contrast({"Intercept": 1.0, "C(vendor)[T.B]": 1.0})
    assert row["estimate"] == pytest.approx(ref["contrast_estimate"]["L"], rel=1e-6)
    assert row["se"] == pytest.approx(ref["contrast_se"]["L"], rel=DF_RTOL)
    assert row["df"] == pytest.approx(ref["contrast_df"]["L"], rel=DF_RTOL)
    assert row["p"] == pytest.approx(ref["contrast_p"]["L"], rel=DF_RTOL)


@pytest.mark.r_reference
@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_crossed_subject_by_site_matches_lmertest(rscript, tmp_path, reml):
    table = to_csv(simulate_crossed(seed=5), tmp_path / "crossed.csv")
    ref = run_lmertest(rscript, tmp_path / "crossed.csv", "y ~ age + vendor + (1 | site) + (1 | subject)", reml)
    fit = fit_lmm(table, "y ~ age + C(vendor)", "site", crossed=["subject"], reml=reml)
    worst = assert_matches_lmertest(fit, ref)
    print(f"crossed ({'REML' if reml else 'ML'}): worst rel. diff df {worst['df']:.2e}, p {worst['p']:.2e}")


# ----------------------------------------------------------------------------- without R


def test_all_variances_zero_gives_ols_residual_df():
    """At the boundary (no site variance) the model is OLS: Satterthwaite's df is n - p exactly."""
    rng = np.random.default_rng(3)
    table = pd.DataFrame({"site": np.repeat([f"S{i}" for i in range(10)], 15), "age": rng.uniform(50, 80, 150)})
    noise = pd.Series(rng.normal(0, 1, 150))
    table["y"] = 2 + 0.1 * table["age"] + noise - noise.groupby(table["site"]).transform("mean")
    fit = fit_lmm(table, "y ~ age", "site")
    ols = smf.ols("y ~ age", table).fit()
    assert fit.variance_components["site"] == 0.0
    np.testing.assert_allclose(fit.df.to_numpy(), [ols.df_resid] * 2, rtol=1e-6)
    np.testing.assert_allclose(fit.fixed_effects["p"], ols.pvalues, rtol=1e-5)
    ci = ols.conf_int()
    np.testing.assert_allclose(fit.fixed_effects["ci_low"], ci[0], rtol=1e-6)


def test_wald_option_and_summary_say_which():
    table = simulate_between_site_vendor(seed=1)
    satt = fit_lmm(table, "y ~ age + C(vendor)", "site", vc=["scanner"])
    wald = fit_lmm(table, "y ~ age + C(vendor)", "site", vc=["scanner"], ddf="wald")
    assert np.isinf(wald.df).all() and np.isfinite(satt.df).all()
    np.testing.assert_allclose(satt.fe_params, wald.fe_params)
    assert "Satterthwaite" in satt.summary() and "Wald z" in wald.summary()
    row = wald.fixed_effects.set_index("term").loc["age"]
    assert row["ci_high"] - row["estimate"] == pytest.approx(1.959964 * row["se"], rel=1e-5)
    assert satt.to_dict()["fixed_effects"]["age"]["df"] > 0
    assert wald.to_dict()["fixed_effects"]["age"]["df"] is None  # infinite
    # alpha sets the interval; the old keyword still works
    wide = fit_lmm(table, "y ~ age + C(vendor)", "site", vc=["scanner"], alpha=0.01)
    old = fit_lmm(table, "y ~ age + C(vendor)", "site", vc=["scanner"], confidence=0.99)
    np.testing.assert_allclose(wide.fixed_effects["ci_low"], old.fixed_effects["ci_low"])
    assert (wide.fixed_effects["ci_low"] < satt.fixed_effects["ci_low"]).all()
    with pytest.raises(SitebenchError, match="ddf must be one of"):
        fit_lmm(table, "y ~ age", "site", ddf="kenward-roger")


def coverage(reps: int, seed: int = 2024, n_sites: int = 10) -> tuple[float, float]:
    """Share of 95% CIs of a between-site vendor effect (truth 1.0) covering it: Satterthwaite, Wald z."""
    hits_t = hits_z = 0
    for rep in range(reps):
        table = simulate_between_site_vendor(seed=seed + rep, n_sites=n_sites, per_scanner=6)
        fit = fit_lmm(table, "y ~ age + C(vendor)", "site", vc=["scanner"])
        t_row = fit.contrast({"C(vendor)[T.B]": 1.0})
        z_row = fit.contrast({"C(vendor)[T.B]": 1.0}, ddf="wald")
        hits_t += t_row["ci_low"] <= 1.0 <= t_row["ci_high"]
        hits_z += z_row["ci_low"] <= 1.0 <= z_row["ci_high"]
    return hits_t / reps, hits_z / reps


def test_satterthwaite_coverage_closer_to_95_than_wald_with_10_sites():
    """10 sites, vendor varying only between them: Wald z undercovers, Satterthwaite t does not (much)."""
    cov_t, cov_z = coverage(reps=200)
    print(f"coverage of the 95% CI of the vendor effect, 200 trials of 10 sites: "
          f"Satterthwaite {cov_t:.3f}, Wald z {cov_z:.3f}")
    assert abs(cov_t - 0.95) < abs(cov_z - 0.95)
    assert cov_t >= 0.92 and cov_z < cov_t
