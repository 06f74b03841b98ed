"""Our own linear mixed model (sitebench.stratification.lmm) against lme4, OLS and simulation truth.

lme4 is run at test time through ``tests/r/lme4_reference.R`` (Rscript + r-cran-lme4);
without it the lme4 tests FAIL unless ``SITEBENCH_SKIP_R=1``. Agreement demanded:
variance components 1e-3 relative, fixed effects 1e-4 relative, logLik 1e-3 absolute,
for REML and ML, on a nested (site/scanner), a crossed (subject x site) data set and
lme4's own ``sleepstudy``.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import require_rscript
import statsmodels.formula.api as smf

from sitebench.errors import SitebenchError
from sitebench.stratification import lmm
from sitebench.stratification.lmm import LmmResult, fit_lmm, lrt

R_SCRIPT = Path(__file__).resolve().parent / "r" / "lme4_reference.R"
VAR_RTOL, FE_RTOL, LOGLIK_ATOL = 1e-3, 1e-4, 1e-3

NESTED_FORMULA = "y ~ age + C(sex) + C(vendor)"
NESTED_R = "y ~ age + sex + vendor + (1 | site) + (1 | site:scanner)"
NESTED_NAMES = {"site": "site", "scanner": "site:scanner", "residual": "Residual"}
CROSSED_FORMULA = "y ~ age + C(vendor)"
CROSSED_R = "y ~ age + vendor + (1 | site) + (1 | subject)"
CROSSED_NAMES = {"site": "site", "subject": "subject", "residual": "Residual"}
SLEEP_NAMES = {"Subject": "Subject", "residual": "Residual"}
FITS = [pytest.param(True, id="REML"), pytest.param(False, id="ML")]


# ----------------------------------------------------------------------------- lme4 runner


@pytest.fixture(scope="module")
def rscript() -> str:
    return require_rscript("lme4")


def run_lme4(rscript: str, csv: Path, formula: str, reml: str = "BOTH", *extras: str) -> dict:
    """``{fit: {key: {name: value}}}`` from the R script's tab-separated lines."""
    proc = subprocess.run([rscript, str(R_SCRIPT), str(csv), formula, reml, *extras],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"lme4 reference run failed:\n{proc.stderr[-3000:]}"
    out: dict = {}
    for line in proc.stdout.splitlines():
        fit, key, name, value = line.split("\t")
        out.setdefault(fit, {}).setdefault(key, {})[name] = value if key == "converged" else float(value)
    assert out, f"no output from lme4:\n{proc.stderr[-3000:]}"
    return out


def r_term(term: str) -> str:
    """patsy column name -> lme4's: Intercept -> (Intercept), C(vendor)[T.GE] -> vendorGE."""
    if term == "Intercept":
        return "(Intercept)"
    match = re.fullmatch(r"C\((\w+)\)\[T\.(.+)\]", term)
    return f"{match.group(1)}{match.group(2)}" if match else term


def assert_matches_lme4(ours: LmmResult, ref: dict, names: dict[str, str]) -> dict[str, float]:
    """Fixed effects (1e-4 rel), SEs (1e-3 rel), variances (1e-3 rel), logLik (1e-3 abs)."""
    assert ref["converged"]["lme4"] == "TRUE"
    assert ours.converged
    worst = {"fixef": 0.0, "se": 0.0, "var": 0.0, "loglik": 0.0}
    assert {r_term(t) for t in ours.fixed_effects["term"]} == set(ref["fixef"])
    for _, row in ours.fixed_effects.iterrows():
        name = r_term(row["term"])
        assert row["estimate"] == pytest.approx(ref["fixef"][name], rel=FE_RTOL, abs=1e-9), name
        assert row["se"] == pytest.approx(ref["se"][name], rel=VAR_RTOL), name
        worst["fixef"] = max(worst["fixef"], abs(row["estimate"] / ref["fixef"][name] - 1))
        worst["se"] = max(worst["se"], abs(row["se"] / ref["se"][name] - 1))
    assert set(ours.variance_components) == set(names)
    for ours_name, r_name in names.items():
        assert ours.variance_components[ours_name] == pytest.approx(ref["var"][r_name], rel=VAR_RTOL), ours_name
        worst["var"] = max(worst["var"], abs(ours.variance_components[ours_name] / ref["var"][r_name] - 1))
    assert ours.loglik == pytest.approx(ref["loglik"]["logLik"], abs=LOGLIK_ATOL)
    worst["loglik"] = abs(ours.loglik - ref["loglik"]["logLik"])
    return worst


# ----------------------------------------------------------------------------- data


def simulate_nested(seed: int = 11, n_sites: int = 12) -> pd.DataFrame:
    """Sites with 2-3 scanners each, vendor per scanner, 8-19 scans per scanner."""
    rng = np.random.default_rng(seed)
    vendors = {"GE": 0.0, "Philips": 1.5, "Siemens": -1.0}
    rows = []
    for s in range(n_sites):
        u_site = rng.normal(0, 2.0)
        for k in range(2 + s % 2):
            u_scanner = rng.normal(0, 1.0)
            vendor = list(vendors)[(s + k) % 3]
            for _ in range(int(rng.integers(8, 20))):
                age, sex = rng.uniform(50, 85), rng.choice(["F", "M"])
                y = (100 + vendors[vendor] - 0.08 * age + 0.7 * (sex == "M") + u_site + u_scanner
                     + rng.normal(0, 1.5))
                rows.append({"site": f"S{s:02d}", "scanner": f"K{k}", "vendor": vendor, "age": round(age, 4),
                             "sex": sex, "y": round(y, 8)})
    return pd.DataFrame(rows)


def simulate_crossed(seed: int = 5, n_subjects: int = 40, n_sites: int = 8) -> pd.DataFrame:
    """Traveling subjects: each scanned at 2-5 of the sites, once or twice per site."""
    rng = np.random.default_rng(seed)
    site_effect = rng.normal(0, 1.2, n_sites)
    vendors = {"GE": 0.0, "Philips": 0.8, "Siemens": -0.5}
    rows = []
    for j in range(n_subjects):
        u_subject, age = rng.normal(0, 3.0), rng.uniform(20, 70)
        for s in rng.choice(n_sites, size=int(rng.integers(2, 6)), replace=False):
            vendor = list(vendors)[s % 3]
            for _ in range(int(rng.integers(1, 3))):
                y = 50 + 0.1 * age + vendors[vendor] + u_subject + site_effect[s] + rng.normal(0, 0.7)
                rows.append({"subject": f"P{j:03d}", "site": f"S{s}", "vendor": vendor, "age": round(age, 4),
                             "y": round(y, 8)})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def nested_csv(tmp_path_factory) -> tuple[pd.DataFrame, Path]:
    table = simulate_nested()
    path = tmp_path_factory.mktemp("lmm") / "nested.csv"
    table.to_csv(path, index=False)
    return pd.read_csv(path), path  # exactly what R reads


@pytest.fixture(scope="module")
def crossed_csv(tmp_path_factory) -> tuple[pd.DataFrame, Path]:
    table = simulate_crossed()
    path = tmp_path_factory.mktemp("lmm") / "crossed.csv"
    table.to_csv(path, index=False)
    return pd.read_csv(path), path


@pytest.fixture(scope="module")
def nested_ref(rscript, nested_csv) -> dict:
    return run_lme4(rscript, nested_csv[1], NESTED_R, "BOTH", "profile", "ranef")


@pytest.fixture(scope="module")
def crossed_ref(rscript, crossed_csv) -> dict:
    return run_lme4(rscript, crossed_csv[1], CROSSED_R, "BOTH")


@pytest.fixture(scope="module")
def sleepstudy(rscript, tmp_path_factory) -> tuple[pd.DataFrame, dict]:
    path = tmp_path_factory.mktemp("lmm") / "sleepstudy.csv"
    proc = subprocess.run([rscript, str(R_SCRIPT), "--export-sleepstudy", str(path)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    ref = run_lme4(rscript, path, "Reaction ~ Days + (1 | Subject)", "BOTH", "profile", "ranef")
    return pd.read_csv(path), ref


# ----------------------------------------------------------------------------- against lme4


@pytest.mark.parametrize("reml", FITS)
def test_sleepstudy_random_intercept_matches_lme4(sleepstudy, reml):
    table, ref = sleepstudy
    fit = fit_lmm(table, "Reaction ~ Days", "Subject", reml=reml)
    tag = "reml" if reml else "ml"
    assert_matches_lme4(fit, ref[tag], SLEEP_NAMES)
    # lme4's published numbers for this model, as a sanity anchor
    assert fit.loglik == pytest.approx(-893.2325 if reml else -897.0393, abs=1e-3)
    # BLUPs (conditional modes), to 1e-3 of the subject SD
    sd = math.sqrt(fit.variance_components["Subject"])
    for level, value in fit.random_effects["Subject"].items():
        assert value == pytest.approx(ref[tag]["ranef"][f"Subject|{level}"], abs=1e-3 * sd)
    # profile CIs on the SD scale: lme4 profiles the ML deviance even for REML fits
    ci = fit.profile_ci().set_index("component")
    assert fit.profile_ci(level=0.95).equals(fit.profile_ci(alpha=0.05))  # the old keyword still works
    for ours, theirs in (("Subject", "sd_(Intercept)|Subject"), ("residual", "sigma")):
        assert ci.loc[ours, "sd_low"] == pytest.approx(ref[tag]["ci_low"][theirs], rel=1e-3)
        assert ci.loc[ours, "sd_high"] == pytest.approx(ref[tag]["ci_high"][theirs], rel=1e-3)


@pytest.mark.parametrize("reml", FITS)
@pytest.mark.parametrize("engine", ["nested", "sparse"])
def test_nested_site_scanner_matches_lme4(nested_csv, nested_ref, reml, engine):
    table, _ = nested_csv
    fit = fit_lmm(table, NESTED_FORMULA, "site", vc=["scanner"], reml=reml, engine=engine)
    assert fit.engine == engine
    tag = "reml" if reml else "ml"
    assert_matches_lme4(fit, nested_ref[tag], NESTED_NAMES)
    sd_site = math.sqrt(fit.variance_components["site"])
    for level, value in fit.random_effects["site"].items():
        assert value == pytest.approx(nested_ref[tag]["ranef"][f"site|{level}"], abs=1e-3 * sd_site)
    sd_scanner = math.sqrt(fit.variance_components["scanner"])
    for level, value in fit.random_effects["scanner"].items():
        assert value == pytest.approx(nested_ref[tag]["ranef"][f"site:scanner|{level}"], abs=1e-3 * sd_scanner)


def test_nested_profile_ci_of_site_sd_matches_lme4(nested_csv, nested_ref):
    fit = fit_lmm(nested_csv[0], NESTED_FORMULA, "site", vc=["scanner"])
    ci = fit.profile_ci(components=["site", "scanner"]).set_index("component")
    for ours, theirs in (("site", "sd_(Intercept)|site"), ("scanner", "sd_(Intercept)|site:scanner")):
        assert ci.loc[ours, "sd_low"] == pytest.approx(nested_ref["reml"]["ci_low"][theirs], rel=1e-3)
        assert ci.loc[ours, "sd_high"] == pytest.approx(nested_ref["reml"]["ci_high"][theirs], rel=1e-3)
    reml_ci = fit.profile_ci(components=["site"], criterion="reml").iloc[0]
    assert reml_ci["sd_low"] < ci.loc["site", "sd"] < reml_ci["sd_high"]


@pytest.mark.parametrize("reml", FITS)
def test_crossed_subject_by_site_matches_lme4(crossed_csv, crossed_ref, reml):
    table, _ = crossed_csv
    fit = fit_lmm(table, CROSSED_FORMULA, "site", crossed=["subject"], reml=reml)
    assert fit.engine == "sparse"
    assert_matches_lme4(fit, crossed_ref["reml" if reml else "ml"], CROSSED_NAMES)


def test_nested_and_crossed_together_matches_lme4(rscript, tmp_path):
    """(1 | site) + (1 | site:scanner) + (1 | subject): traveling subjects at multi-scanner sites."""
    rng = np.random.default_rng(1)
    site_effect, scanner_effect = rng.normal(0, 1.5, 6), rng.normal(0, 0.8, (6, 2))
    rows = []
    for j in range(30):
        u_subject = rng.normal(0, 2)
        for s in rng.choice(6, 3, replace=False):
            for k in range(2):
                rows.append({"subject": f"P{j}", "site": f"S{s}", "scanner": f"K{k}", "age": round(rng.uniform(20, 60), 4),
                             "y": round(u_subject + site_effect[s] + scanner_effect[s, k] + rng.normal(0, 0.5), 8)})
    path = tmp_path / "combined.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    table = pd.read_csv(path)
    ref = run_lme4(rscript, path, "y ~ age + (1 | site) + (1 | site:scanner) + (1 | subject)", "TRUE")
    fit = fit_lmm(table, "y ~ age", "site", vc={"scanner": "scanner"}, crossed=["subject"])
    assert fit.engine == "sparse"
    assert_matches_lme4(fit, ref["reml"], {"site": "site", "scanner": "site:scanner", "subject": "subject",
                                           "residual": "Residual"})


def test_lrt_matches_lme4_ml_logliks(rscript, nested_csv, nested_ref):
    table, path = nested_csv
    reduced_ref = run_lme4(rscript, path, "y ~ age + sex + (1 | site) + (1 | site:scanner)", "FALSE")
    test = lrt(table, NESTED_FORMULA, "y ~ age + C(sex)", "site", vc=["scanner"])
    expected = 2 * (nested_ref["ml"]["loglik"]["logLik"] - reduced_ref["ml"]["loglik"]["logLik"])
    assert test.df == 2
    assert sorted(test.dropped_terms) == ["C(vendor)[T.Philips]", "C(vendor)[T.Siemens]"]
    assert test.chi2 == pytest.approx(expected, abs=2e-3)
    assert not test.full.reml and not test.reduced.reml
    assert json.loads(json.dumps(test.to_dict()))["df"] == 2


# ----------------------------------------------------------------------------- without R


def test_engines_agree_and_to_dict_shape():
    table = simulate_nested(seed=2)
    a = fit_lmm(table, NESTED_FORMULA, "site", vc=["scanner"], engine="nested")
    b = fit_lmm(table, NESTED_FORMULA, "site", vc=["scanner"], engine="sparse")
    assert a.engine == "nested" and b.engine == "sparse"
    assert a.loglik == pytest.approx(b.loglik, abs=1e-7)
    for name in a.variance_components:
        assert a.variance_components[name] == pytest.approx(b.variance_components[name], rel=1e-4)
    np.testing.assert_allclose(a.fe_params, b.fe_params, rtol=1e-6)
    np.testing.assert_allclose(a.random_effects["scanner"], b.random_effects["scanner"], rtol=1e-4, atol=1e-6)

    record = json.loads(json.dumps(a.to_dict()))
    for key in ("fixed_effects", "variance_components", "loglik", "reml", "converged", "optimizer"):
        assert key in record
    assert all(set(v) == {"estimate", "se", "df", "statistic", "ci_low", "ci_high", "p"}
               for v in record["fixed_effects"].values())
    assert record["engine_id"] == lmm.ENGINE_ID and record["ddf"] == "satterthwaite" and record["alpha"] == 0.05
    assert set(record["variance_components"]) == {"site", "scanner", "residual"}
    assert record["reml"] is True and record["converged"] is True and record["optimizer"] == "L-BFGS-B"
    assert sum(a.variance_share.values()) == pytest.approx(1.0)
    assert list(a.to_frame().columns) == ["term", "estimate", "se", "df", "statistic", "ci_low", "ci_high", "p"]
    text = a.summary()
    assert "scanner" in text and "std.dev." in text and "Satterthwaite" in text
    assert a.diagnostics["max_scaled_gradient"] < lmm.GRADIENT_TOL
    assert a.diagnostics["boundary"] == {"site": False, "scanner": False}


def test_sparse_engine_large_schur_path_agrees(monkeypatch):
    """The scipy.sparse LU path (big Schur complement) gives the dense path's answer."""
    table = simulate_crossed(seed=8)
    dense = fit_lmm(table, CROSSED_FORMULA, "site", crossed=["subject"])
    monkeypatch.setattr(lmm, "DENSE_MAX", 0)
    lu = fit_lmm(table, CROSSED_FORMULA, "site", crossed=["subject"])
    assert lu.loglik == pytest.approx(dense.loglik, abs=1e-8)
    np.testing.assert_allclose(lu.fe_params, dense.fe_params, rtol=1e-6)
    for name in dense.variance_components:
        assert lu.variance_components[name] == pytest.approx(dense.variance_components[name], rel=1e-5)


def _zero_site_variance_table(seed: int = 3) -> pd.DataFrame:
    """Noise with identical site means: the between-site variation is below what the residual implies."""
    rng = np.random.default_rng(seed)
    n = 240
    table = pd.DataFrame({"site": np.repeat([f"S{i:02d}" for i in range(12)], 20),
                          "age": rng.uniform(50, 80, n), "sex": rng.choice(["F", "M"], n)})
    noise = pd.Series(rng.normal(0, 1.5, n))
    noise -= noise.groupby(table["site"]).transform("mean")
    table["y"] = 10 - 0.05 * table["age"] + 0.5 * (table["sex"] == "M") + noise
    return table


@pytest.mark.parametrize("reml", FITS)
def test_zero_site_variance_gives_ols(reml):
    table = _zero_site_variance_table()
    fit = fit_lmm(table, "y ~ age + C(sex)", "site", reml=reml)
    ols = smf.ols("y ~ age + C(sex)", table).fit()
    assert fit.variance_components["site"] == 0.0
    assert fit.diagnostics["boundary"]["site"] and fit.boundary
    assert fit.converged
    assert fit.diagnostics["zero_slopes"]["site"] > 0  # the criterion rises away from zero
    np.testing.assert_allclose(fit.fe_params.to_numpy(), ols.params.to_numpy(), rtol=1e-6, atol=1e-6)
    resid_var = ols.ssr / (ols.df_resid if reml else ols.nobs)
    assert fit.variance_components["residual"] == pytest.approx(resid_var, rel=1e-6)
    scale = 1.0 if reml else math.sqrt(ols.df_resid / ols.nobs)
    np.testing.assert_allclose(fit.bse.to_numpy(), ols.bse.to_numpy() * scale, rtol=1e-6)
    assert ci_lower_is_zero(fit)
    assert any("boundary" in note for note in fit.notes)


def ci_lower_is_zero(fit: LmmResult) -> bool:
    row = fit.profile_ci(components=["site"]).iloc[0]
    return row["sd_low"] == 0.0 and row["sd_high"] > 0.0


def test_zero_scanner_variance_gives_site_only_gls():
    rng = np.random.default_rng(4)
    table = pd.DataFrame({"site": np.repeat([f"S{s}" for s in range(10)], 45),
                          "scanner": np.tile(np.repeat(["K0", "K1", "K2"], 15), 10),
                          "age": rng.uniform(50, 80, 450)})
    noise = pd.Series(rng.normal(0, 1, 450))
    noise -= noise.groupby([table["site"], table["scanner"]]).transform("mean")  # no scanner-level noise
    table["y"] = (0.1 * table["age"] + np.repeat(rng.normal(0, 2, 10), 45) + np.repeat(rng.normal(0, 0.3, 10), 45)
                  + noise)
    both = fit_lmm(table, "y ~ age", "site", vc=["scanner"])
    site_only = fit_lmm(table, "y ~ age", "site")
    assert both.variance_components["scanner"] == 0.0 and both.diagnostics["boundary"]["scanner"]
    assert both.variance_components["site"] > 0
    np.testing.assert_allclose(both.fe_params, site_only.fe_params, rtol=1e-6)
    np.testing.assert_allclose(both.bse, site_only.bse, rtol=1e-6)
    assert both.loglik == pytest.approx(site_only.loglik, abs=1e-8)


@pytest.mark.slow
def test_wald_ci_coverage_of_a_fixed_effect():
    """1000 small trials with known effects: the 95% CI of age (within-site, ~110 df) covers the truth 93-97%."""
    rng = np.random.default_rng(20240611)
    n_sites, per_site, beta_age = 8, 15, 0.3
    site = np.repeat([f"S{i}" for i in range(n_sites)], per_site)
    site_index = np.repeat(np.arange(n_sites), per_site)
    covered, reps = 0, 1000
    for _ in range(reps):
        age = rng.normal(0, 1, n_sites * per_site)
        y = 2.0 + beta_age * age + rng.normal(0, 1.0, n_sites)[site_index] + rng.normal(0, 1.0, len(age))
        fit = fit_lmm(pd.DataFrame({"site": site, "age": age, "y": y}), "y ~ age", "site")
        row = fit.fixed_effects.set_index("term").loc["age"]
        covered += row["ci_low"] <= beta_age <= row["ci_high"]
    assert 0.93 <= covered / reps <= 0.97, covered / reps


def test_optimizer_fallback_is_recorded(monkeypatch):
    table = simulate_nested(seed=4)
    reference = fit_lmm(table, NESTED_FORMULA, "site", vc=["scanner"])
    original = lmm._minimize

    def broken_lbfgsb(fun, x0, method, bounds):
        if method == "L-BFGS-B":
            raise FloatingPointError("simulated failure")
        return original(fun, x0, method, bounds)

    monkeypatch.setattr(lmm, "_minimize", broken_lbfgsb)
    fit = fit_lmm(table, NESTED_FORMULA, "site", vc=["scanner"])
    assert fit.optimizer == "Nelder-Mead" and fit.converged
    assert [a["optimizer"] for a in fit.attempts if a["stage"] == "fit"] == ["L-BFGS-B", "Nelder-Mead"]
    assert "simulated failure" in fit.attempts[0]["message"]
    assert fit.loglik == pytest.approx(reference.loglik, abs=1e-6)
    for name, value in reference.variance_components.items():
        assert fit.variance_components[name] == pytest.approx(value, rel=1e-3)
    powell = fit_lmm(table, NESTED_FORMULA, "site", vc=["scanner"], optimizers=["powell"])
    assert powell.optimizer == "Powell" and powell.loglik == pytest.approx(reference.loglik, abs=1e-6)


# ----------------------------------------------------------------------------- bad input


def _small() -> pd.DataFrame:
    return simulate_nested(seed=9, n_sites=4)


@pytest.mark.parametrize("change, kwargs, message", [
    (None, {"formula": "y ~ agee"}, "column 'agee' not in the table"),
    (None, {"groups": "clinic"}, "column 'clinic' not in the table"),
    (None, {"vc": ["coil"]}, "column 'coil' not in the table"),
    (lambda t: t.assign(y=3.0), {}, "response 'y' is constant"),
    (lambda t: t.assign(site="S00"), {}, "has a single level"),
    (lambda t: t.assign(age=t["age"].where(t.index != 5)), {}, "column 'age' has 1 missing value"),
    (lambda t: t.assign(y=t["y"].where(t.index != 7)), {}, "column 'y' has 1 missing value"),
    (lambda t: t.assign(site=t["site"].where(t.index != 2)), {}, "column 'site' has 1 missing value"),
    (None, {"optimizers": ["bfgs"]}, "unknown optimizer"),
    (None, {"formula": "y ~ age + (1 | site)"}, "not '|' terms"),
])
def test_bad_input_is_one_clear_line(change, kwargs, message):
    table = _small() if change is None else change(_small())
    args = {"formula": "y ~ age + C(sex)", "groups": "site", "vc": ["scanner"]}
    args.update(kwargs)
    with pytest.raises(SitebenchError, match=re.escape(message)) as info:
        fit_lmm(table, **args)
    assert "\n" not in str(info.value)


def test_lrt_rejects_non_nested_models():
    table = _small()
    with pytest.raises(SitebenchError, match="not nested"):
        lrt(table, "y ~ age", "y ~ C(sex)", "site")
