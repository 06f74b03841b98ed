"""`sitebench stats` on CSV tables, as a statistician runs it; numbers against the ComBat authors' outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

COMBAT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "combat"
needs_combat = pytest.mark.skipif(not COMBAT.exists(), reason="needs ../shared/data/combat")


@pytest.fixture
def scans(tmp_path) -> Path:
    """The reference input as a scan table: one row per sample, batch and gender columns."""
    data = pd.read_csv(COMBAT / "inputData" / "testdata.csv")
    table = pd.DataFrame(data.to_numpy().T, columns=[f"f{i}" for i in range(data.shape[0])])
    table.insert(0, "site", ["A"] * 5 + ["B"] * 5)
    table.insert(1, "gender", ["1", "2"] * 5)
    path = tmp_path / "scans.csv"
    table.to_csv(path, index=False)
    return path


@needs_combat
@pytest.mark.parametrize("flags, reference", [
    ([], "testdata_combat_parametric_adjusted_python.csv"),
    (["--nonparametric", "--ref-batch", "A"], "testdata_combat_nonparametric_adjusted_batchref_python.csv"),
])
def test_combat_cli_matches_reference(scans, tmp_path, flags, reference):
    features = [f"f{i}" for i in range(200)]
    out = tmp_path / "harmonized.csv"
    result = run_cli("stats", "combat", scans, "--batch", "site", "--features", *features,
                     "--categorical", "gender", *flags, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "ComBat efficacy: median share of variance explained by site" in result.stdout
    ours = pd.read_csv(out)[features].to_numpy().T
    expected = pd.read_csv(COMBAT / "outputData" / reference, header=None).to_numpy()
    assert np.abs(ours - expected).max() < 1e-6


@needs_combat
def test_combat_cli_bad_input_is_one_line(scans, tmp_path):
    missing = run_cli("stats", "combat", scans, "--batch", "scanner", "--features", "f0", "--out", tmp_path / "o.csv")
    assert missing.returncode == 2 and "scanner" in missing.stderr and "Traceback" not in missing.stderr
    one = pd.read_csv(scans)
    one.loc[0, "site"] = "C"  # a batch with a single scan
    lonely = tmp_path / "lonely.csv"
    one.to_csv(lonely, index=False)
    single = run_cli("stats", "combat", lonely, "--batch", "site", "--features", "f0", "f1", "--out", tmp_path / "o.csv")
    assert single.returncode == 2 and "1 sample" in single.stderr and str(lonely) in single.stderr
    assert len(single.stderr.strip().splitlines()) == 1


def test_equivalence_cli_json(tmp_path):
    rng = np.random.default_rng(5)
    sites = [f"S0{i}" for i in range(1, 7)]
    table = pd.DataFrame({"site": np.repeat(sites, 60), "abs_error": rng.normal(2.0, 0.5, 360)})
    table.loc[table.site == "S03", "abs_error"] += 3.0  # one site clearly worse (the others are 3/5 off "the rest")
    path = tmp_path / "errors.csv"
    table.to_csv(path, index=False)
    result = run_cli("stats", "equivalence", path, "--value", "abs_error", "--margin", "1.0", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["all_within_margin"] is False
    assert [s["site"] for s in report["sites"] if not s["equivalent"]] == ["S03"]
    bad = run_cli("stats", "equivalence", path, "--value", "dice", "--margin", "1.0")
    assert bad.returncode == 2 and "no column 'dice'" in bad.stderr and "Traceback" not in bad.stderr


def test_delong_cli_paired(tmp_path):
    rng = np.random.default_rng(11)
    truth = np.repeat([0, 1], 80)
    table = pd.DataFrame({"disease": truth, "v1": truth * 1.0 + rng.normal(0, 1, 160),
                          "v2": truth * 0.3 + rng.normal(0, 1, 160)})
    path = tmp_path / "scores.csv"
    table.to_csv(path, index=False)
    result = run_cli("stats", "delong", path, "--truth", "disease", "--score", "v1", "--score2", "v2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["auc"] > report["auc2"] and report["p"] < 0.05
    assert report["ci_low"] < report["auc"] < report["ci_high"]


def test_paired_cli_matches_statsmodels_ttost_paired(tmp_path):
    from statsmodels.stats.weightstats import ttost_paired

    rng = np.random.default_rng(8)
    scans = [f"scan{i:03d}" for i in range(90)]
    sites = np.repeat(["S01", "S02", "S03"], 30)
    a = rng.gamma(4.0, 5.0, 90)
    b = a + rng.normal(-1.0, 3.0, 90)
    table = pd.DataFrame({"scan_id": scans * 2, "site": list(sites) * 2, "model_key": ["v1"] * 90 + ["v2"] * 90,
                          "abs_error": np.concatenate([a, b])}).sample(frac=1.0, random_state=1)  # pairing is by scan
    path = tmp_path / "errors.csv"
    table.to_csv(path, index=False)
    result = run_cli("stats", "paired", path, "--a", "v1", "--b", "v2", "--value", "abs_error", "--margin", "4",
                     "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["level"]: r for r in json.loads(result.stdout)["rows"]}
    for level, mask in (("S02", sites == "S02"), ("overall", np.ones(90, bool))):
        p_tost, _, _ = ttost_paired(b[mask], a[mask], -4.0, 4.0)
        assert rows[level]["p_tost"] == pytest.approx(p_tost, rel=1e-9)
        assert rows[level]["difference"] == pytest.approx(float(np.mean(b[mask] - a[mask])), rel=1e-12)
    bad = run_cli("stats", "paired", path, "--a", "v1", "--b", "v3", "--value", "abs_error")
    assert bad.returncode == 2 and "'v3'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_icc_cli_on_shrout_fleiss(tmp_path):
    ratings = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]
    rows = [{"target": t, "judge": j, "rating": r} for t, row in enumerate(ratings) for j, r in enumerate(row)]
    path = tmp_path / "sf.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    result = run_cli("stats", "icc", path, "--targets", "target", "--raters", "judge", "--ratings", "rating", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert isinstance(document, list)  # the documented shape: a list of forms
    assert set(document[0]) >= {"form", "icc", "ci_low", "ci_high", "F", "df1", "df2", "p"}
    forms = {f["form"]: f["icc"] for f in document}
    published = {"ICC(1,1)": .17, "ICC(A,1)": .29, "ICC(C,1)": .71, "ICC(1,k)": .44, "ICC(A,k)": .62, "ICC(C,k)": .91}
    assert forms == pytest.approx(published, abs=0.006)


def test_bland_altman_cli_on_the_1986_pefr_data(tmp_path):
    wright = [494, 395, 516, 434, 476, 557, 413, 442, 650, 433, 417, 656, 267, 478, 178, 423, 427]
    mini = [512, 430, 520, 428, 500, 600, 364, 380, 658, 445, 432, 626, 260, 477, 259, 350, 451]
    path = tmp_path / "pefr.csv"
    pd.DataFrame({"wright": wright, "mini": mini}).to_csv(path, index=False)
    result = run_cli("stats", "bland-altman", path, "--a", "wright", "--b", "mini", "--limit-z", "2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (round(report["bias"], 1), round(report["sd"], 1)) == (-2.1, 38.8)
    assert report["lower"] == pytest.approx(-79.7, abs=0.1) and report["upper"] == pytest.approx(75.5, abs=0.1)
    assert report["n"] == 17 and report["lower_ci_low"] < report["lower"] < report["lower_ci_high"]


def test_mixed_cli_json_keys(tmp_path):
    rng = np.random.default_rng(3)
    sites = np.repeat([f"S{i}" for i in range(8)], 40)
    offsets = dict(zip(sorted(set(sites)), rng.normal(0, 2, 8)))
    table = pd.DataFrame({"site": sites, "age": rng.uniform(20, 80, 320)})
    table["y"] = 100 - 0.5 * table.age + table.site.map(offsets) + rng.normal(0, 3, 320)
    path = tmp_path / "mixed.csv"
    table.to_csv(path, index=False)
    result = run_cli("stats", "mixed", path, "--formula", "y ~ age", "--groups", "site", "--json")
    assert result.returncode == 0, result.stderr
    fit = json.loads(result.stdout)
    assert set(fit["fixed_effects"]["age"]) >= {"estimate", "se", "ci_low", "ci_high", "p"}
    assert set(fit["variance_components"]) == {"site", "residual"}
    assert fit["reml"] is True and fit["converged"] is True and fit["optimizer"]
    age = fit["fixed_effects"]["age"]
    assert age["ci_low"] < -0.5 < age["ci_high"]
    one_site = run_cli("stats", "mixed", path, "--formula", "y ~ age", "--groups", "nope")
    assert one_site.returncode == 2 and "nope" in one_site.stderr and "Traceback" not in one_site.stderr


def test_mixed_cli_between_site_effect_uses_satterthwaite_df_and_refuses_a_non_identifiable_model(tmp_path):
    """A vendor effect that varies only between 10 sites: t on ~8 df (wider than Wald z); vendor as
    both the fixed effect and the grouping factor is one line, exit 2."""
    rng = np.random.default_rng(11)
    sites = np.repeat([f"S{i:02d}" for i in range(10)], 12)
    vendor = np.where(np.arange(120) // 12 % 3 == 0, "GE", "SIEMENS")
    y = rng.normal(size=120) + np.repeat(rng.normal(size=10), 12) + 0.5 * (vendor == "GE")
    path = tmp_path / "vendor.csv"
    pd.DataFrame({"y": y, "site": sites, "vendor": vendor}).to_csv(path, index=False)
    term = "C(vendor)[T.SIEMENS]"
    fits = {}
    for ddf in ("satterthwaite", "wald"):
        result = run_cli("stats", "mixed", path, "--formula", "y ~ C(vendor)", "--groups", "site",
                         "--ddf", ddf, "--json")
        assert result.returncode == 0, result.stderr
        fits[ddf] = json.loads(result.stdout)["fixed_effects"][term]
    satt, wald = fits["satterthwaite"], fits["wald"]
    assert 6 < satt["df"] < 10 and wald["df"] is None
    assert satt["estimate"] == pytest.approx(wald["estimate"]) and satt["se"] == pytest.approx(wald["se"])
    assert (satt["ci_high"] - satt["ci_low"]) > 1.1 * (wald["ci_high"] - wald["ci_low"])
    bad = run_cli("stats", "mixed", path, "--formula", "y ~ C(vendor)", "--groups", "vendor")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "'vendor' variance cannot be estimated" in bad.stderr
