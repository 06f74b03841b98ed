"""Paired model comparison: paired t / TOST against statsmodels' ttost_paired, scipy's ttest_rel and
R's t.test(paired = TRUE); CI coverage with a known mean difference; paired DeLong against delong()
on pre-paired arrays and invariance to row order; bad input and non-estimable levels."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pandas as pd
import pytest
from conftest import require_rscript
from scipy import stats
from statsmodels.stats.weightstats import ttost_paired

from sitebench.errors import SitebenchError
from sitebench.stratification.classification import delong
from sitebench.stratification.paired import OVERALL, paired_auc, paired_comparison

SHIFTS = {"S1": 0.0, "S2": 0.15, "S3": -0.1}


def long_table(shifts: dict[str, float] = SHIFTS, n: int = 30, seed: int = 11) -> pd.DataFrame:
    """One row per (scan, model): a per-scan error shared by both models plus a site-specific shift for v2."""
    rng = np.random.default_rng(seed)
    rows = []
    for site, shift in shifts.items():
        for i in range(n):
            base = rng.gamma(4.0, 0.5)  # between-scan variation, cancels in the pairing
            scan = f"{site}-{i:03d}"
            rows.append({"scan_id": scan, "site": site, "model": "v1", "abs_error": base + rng.normal(0, 0.3)})
            rows.append({"scan_id": scan, "site": site, "model": "v2",
                         "abs_error": base + shift + rng.normal(0, 0.3)})
    return pd.DataFrame(rows)


def arrays(table: pd.DataFrame, site: str | None) -> tuple[np.ndarray, np.ndarray]:
    sub = table if site is None else table[table.site == site]
    wide = sub.pivot(index="scan_id", columns="model", values="abs_error")
    return wide["v1"].to_numpy(), wide["v2"].to_numpy()


def by_level(result) -> dict:
    return {r["level"]: r for r in result.rows}


# ----------------------------------------------------------------------------- paired t / TOST references
def test_paired_t_and_tost_match_scipy_and_statsmodels():
    table = long_table()
    margin, alpha = 0.2, 0.05
    result = paired_comparison(table, model="model", a="v1", b="v2", value="abs_error", margin=margin, alpha=alpha)
    rows = by_level(result)
    assert list(rows) == ["S1", "S2", "S3", OVERALL]
    for level in ["S1", "S2", "S3", None]:
        xa, xb = arrays(table, level)
        row = rows[level or OVERALL]
        d = xb - xa
        assert row["n_pairs"] == len(d) == (90 if level is None else 30)
        assert row["difference"] == pytest.approx(d.mean(), rel=1e-12)
        assert row["sd_difference"] == pytest.approx(np.std(d, ddof=1), rel=1e-12)
        assert row["p"] == pytest.approx(stats.ttest_rel(xb, xa).pvalue, rel=1e-9)
        low, high = stats.t.interval(1 - alpha, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high), rel=1e-9)
        p, lower, upper = ttost_paired(xb, xa, -margin, margin)
        assert row["p_tost"] == pytest.approx(p, rel=1e-9)
        assert row["p_lower"] == pytest.approx(lower[1], rel=1e-9)
        assert row["p_upper"] == pytest.approx(upper[1], rel=1e-9)
        low2, high2 = stats.t.interval(1 - 2 * alpha, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
        assert (row["tost_ci_low"], row["tost_ci_high"]) == pytest.approx((low2, high2), rel=1e-9)
        assert row["equivalent"] == (p < alpha) == (-margin < low2 and high2 < margin)
        assert row["p_wilcoxon"] == pytest.approx(stats.wilcoxon(xb, xa, zero_method="wilcox").pvalue, rel=1e-9)
    # S2 is shifted by 0.15 with margin 0.2: not shown equivalent with 30 scans -> no IUT claim
    assert rows["S2"]["p_tost"] > alpha and not result.all_within_margin
    assert result.p_intersection_union == max(rows[s]["p_tost"] for s in SHIFTS)
    # Holm step-down by hand over the three sites (overall is not part of the family)
    ps = [rows[s]["p_tost"] for s in SHIFTS]
    order = np.argsort(ps)
    adjusted = np.maximum.accumulate([min(1.0, (3 - k) * ps[i]) for k, i in enumerate(order)])
    for k, i in enumerate(order):
        assert rows[list(SHIFTS)[i]]["p_holm"] == pytest.approx(adjusted[k], rel=1e-12)
    assert rows[OVERALL]["p_holm"] is None
    frame = result.to_frame()
    assert list(frame["level"]) == ["S1", "S2", "S3", OVERALL] and "p_intersection_union" in result.to_dict()
    json.dumps(result.to_dict())
    assert "S2" in result.summary() and "NO" in result.summary()


def test_independent_reference_values_pinned():
    """A tiny hand-checkable case: d = (1, 1, 2), mean 4/3, SD 1/sqrt(3), t = 4, df = 2."""
    table = pd.DataFrame({"scan_id": [1, 2, 3] * 2, "model": ["a"] * 3 + ["b"] * 3,
                          "v": [1.0, 1.0, 2.0, 2.0, 2.0, 4.0], "site": "X"})
    row = by_level(paired_comparison(table, model="model", a="a", b="b", value="v", margin=2.0))[OVERALL]
    assert row["difference"] == pytest.approx(4 / 3) and row["sd_difference"] == pytest.approx(3 ** -0.5)
    assert row["p"] == pytest.approx(0.05719095841793653, rel=1e-9)  # 2 * pt(-4, 2) in R
    assert row["ci_low"] == pytest.approx(4 / 3 - 4.302652729911275 / 3, rel=1e-9)  # qt(.975, 2) * sd / sqrt(3)


@pytest.mark.r_reference
def test_paired_t_matches_r_t_test(tmp_path):
    rscript = require_rscript("stats")
    table = long_table(n=12, seed=5)
    result = paired_comparison(table, model="model", a="v1", b="v2", value="abs_error", alpha=0.1)
    frames = []
    for level in ["S1", "S2", "S3", None]:
        xa, xb = arrays(table, level)
        frames.append(pd.DataFrame({"level": level or OVERALL, "a": xa, "b": xb}))
    path = tmp_path / "paired.csv"
    pd.concat(frames).to_csv(path, index=False, float_format="%.17g")
    code = (f"d <- read.csv('{path}'); for (l in unique(d$level)) {{ s <- d[d$level == l, ]; "
            "t <- t.test(s$b, s$a, paired = TRUE, conf.level = 0.9); "
            "cat(l, sprintf('%.17g', c(t$conf.int, t$p.value)), '\\n') }")
    done = subprocess.run([rscript, "--vanilla", "-e", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = by_level(result)
    lines = [line.split() for line in done.stdout.strip().splitlines()]
    assert [line[0] for line in lines] == ["S1", "S2", "S3", OVERALL]
    for level, low, high, p in lines:
        assert rows[level]["ci_low"] == pytest.approx(float(low), rel=1e-9)
        assert rows[level]["ci_high"] == pytest.approx(float(high), rel=1e-9)
        assert rows[level]["p"] == pytest.approx(float(p), rel=1e-9)


def test_ci_coverage_with_known_difference():
    rng = np.random.default_rng(2024)
    true_diff, alpha, n, hits = 0.3, 0.05, 15, 0
    for _ in range(400):
        base = rng.normal(5, 2, n)
        table = pd.DataFrame({"scan_id": np.tile(np.arange(n), 2), "model": ["old"] * n + ["new"] * n,
                              "err": np.concatenate([base + rng.normal(0, 1, n),
                                                     base + true_diff + rng.normal(0, 1, n)])})
        row = paired_comparison(table, model="model", a="old", b="new", value="err", by=None, alpha=alpha).rows[0]
        hits += row["ci_low"] <= true_diff <= row["ci_high"]
    assert 0.93 <= hits / 400 <= 0.97


def test_equivalent_sites_give_the_intersection_union_claim():
    table = long_table({"S1": 0.0, "S2": 0.02, "S3": -0.02}, n=80)
    result = paired_comparison(table, model="model", a="v1", b="v2", value="abs_error", margin=0.25)
    assert all(r["equivalent"] for r in result.rows) and result.all_within_margin
    assert result.p_intersection_union == max(r["p_tost"] for r in result.level_rows) < 0.05
    assert "YES" in result.summary()


# ----------------------------------------------------------------------------- pairing, notes, not estimable
def test_unpaired_scans_are_dropped_and_order_does_not_matter():
    table = long_table(n=10)
    extra = pd.DataFrame([{"scan_id": "lonely", "site": "S1", "model": "v2", "abs_error": 99.0}])
    shuffled = pd.concat([table, extra]).sample(frac=1.0, random_state=3)
    result = paired_comparison(shuffled, model="model", a="v1", b="v2", value="abs_error")
    reference = paired_comparison(table, model="model", a="v1", b="v2", value="abs_error")
    assert by_level(result)[OVERALL]["n_pairs"] == 30
    pd.testing.assert_frame_equal(result.to_frame(), reference.to_frame(), rtol=1e-10)
    assert any("1 unpaired scan(s) dropped (0 only with 'v1', 1 only with 'v2')" in n for n in result.notes)


def test_one_pair_site_is_not_estimable_and_breaks_the_claim():
    table = long_table({"S1": 0.0, "S2": 0.0}, n=80)
    one = pd.DataFrame([{"scan_id": "S9-0", "site": "S9", "model": m, "abs_error": v}
                        for m, v in (("v1", 1.0), ("v2", 1.05))])
    result = paired_comparison(pd.concat([table, one]), model="model", a="v1", b="v2", value="abs_error",
                               margin=0.25)
    rows = by_level(result)
    assert rows["S1"]["equivalent"] and rows["S2"]["equivalent"]
    s9 = rows["S9"]
    assert s9["n_pairs"] == 1 and not s9["estimable"] and s9["p_tost"] is None and s9["ci_low"] is None
    assert s9["difference"] == pytest.approx(0.05) and s9["p_wilcoxon"] is None
    assert any(n.startswith("S9: not estimable (1 pair(s)") for n in result.notes)
    assert result.all_within_margin is False and result.p_intersection_union is None
    json.dumps(result.to_dict())
    assert "n/e" in result.summary()


def test_zero_sd_of_differences_is_not_estimable():
    table = pd.DataFrame({"scan_id": [1, 2, 3] * 2, "model": ["a"] * 3 + ["b"] * 3,
                          "v": [1.0, 2.0, 3.0, 1.5, 2.5, 3.5], "site": "X"})
    row = by_level(paired_comparison(table, model="model", a="a", b="b", value="v", margin=1.0))["X"]
    assert row["sd_difference"] == 0 and row["p"] is None and row["p_tost"] is None and not row["estimable"]


@pytest.mark.parametrize("change, kwargs, message", [
    (None, {"value": "missing_col"}, "no column 'missing_col'"),
    (None, {"b": "v3"}, "model 'v3' not found in column 'model'"),
    ("dup", {}, "duplicated (scan_id, model)"),
    ("site", {}, "column 'site' differs between the two models' rows"),
    ("nan", {}, "column 'abs_error' has missing"),
    (None, {"margin": -1.0}, "margin must be a positive number"),
    (None, {"b": "v1"}, "both 'v1'"),
])
def test_bad_input_names_the_problem(change, kwargs, message):
    table = long_table(n=5)
    if change == "dup":
        table = pd.concat([table, table.iloc[[0]]])
    elif change == "site":
        table.loc[1, "site"] = "S3"
    elif change == "nan":
        table.loc[2, "abs_error"] = np.nan
    args = {"model": "model", "a": "v1", "b": "v2", "value": "abs_error", **kwargs}
    with pytest.raises(SitebenchError, match=None) as info:
        paired_comparison(table, **args)
    assert message in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- paired DeLong
def auc_table(seed: int = 4, n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for site in ("A", "B"):
        for i in range(n):
            y = int(rng.random() < 0.4)
            latent = rng.normal(1.0 * y, 1.0)
            scan = f"{site}{i}"
            rows.append({"scan_id": scan, "site": site, "y": y, "model": "old", "p": latent + rng.normal(0, 1.0)})
            rows.append({"scan_id": scan, "site": site, "y": y, "model": "new", "p": latent + rng.normal(0, 0.5)})
    return pd.DataFrame(rows)


def test_paired_auc_equals_delong_on_prepaired_arrays_and_ignores_row_order():
    table = auc_table()
    result = paired_auc(table, model="model", a="old", b="new", truth="y", score="p", by="site")
    rows = by_level(result)
    for level in ("A", "B", OVERALL):
        sub = table if level == OVERALL else table[table.site == level]
        wide = sub.pivot(index="scan_id", columns="model", values="p")
        y = sub.drop_duplicates("scan_id").set_index("scan_id").loc[wide.index, "y"].to_numpy()
        ref = delong(y, wide["new"].to_numpy(), wide["old"].to_numpy())
        row = rows[level]
        assert row["status"] == "ok" and row["n"] == len(y)
        assert row["auc_b"] == pytest.approx(ref.auc, abs=1e-12)
        assert row["auc_a"] == pytest.approx(ref.auc2, abs=1e-12)
        assert row["difference"] == pytest.approx(ref.auc - ref.auc2, abs=1e-12)
        assert (row["ci_low"], row["ci_high"], row["z"], row["p"]) == pytest.approx(
            (ref.difference_ci_low, ref.difference_ci_high, ref.z, ref.p), rel=1e-9)
    assert rows[OVERALL]["auc_b"] > rows[OVERALL]["auc_a"]  # the new model is less noisy
    shuffled = table.sample(frac=1.0, random_state=8).reset_index(drop=True)
    again = paired_auc(shuffled, model="model", a="old", b="new", truth="y", score="p", by="site")
    for r1, r2 in zip(result.rows, again.rows):
        assert r1["level"] == r2["level"]
        assert [r1[k] for k in ("auc_a", "auc_b", "z")] == pytest.approx([r2[k] for k in ("auc_a", "auc_b", "z")],
                                                                         rel=1e-12)
    # breaking the pairing (scores of "new" assigned to other scans) must change the answer
    broken = table.copy()
    new = broken.model == "new"
    broken.loc[new, "p"] = broken.loc[new, "p"].sample(frac=1.0, random_state=1).to_numpy()
    other = paired_auc(broken, model="model", a="old", b="new", truth="y", score="p")
    assert other.rows[0]["auc_b"] != pytest.approx(rows[OVERALL]["auc_b"], abs=1e-3)
    json.dumps(result.to_dict())
    assert list(result.to_frame().columns)[:7] == ["level", "n", "n_positive", "n_negative", "auc_a", "auc_b",
                                                   "difference"]


def test_paired_auc_level_with_one_class_is_not_estimable():
    table = auc_table()
    table = pd.concat([table, pd.DataFrame([{"scan_id": f"C{i}", "site": "C", "y": 1, "model": m, "p": i + 0.0}
                                            for i in range(4) for m in ("old", "new")])])
    result = paired_auc(table, model="model", a="old", b="new", truth="y", score="p", by="site")
    c = by_level(result)["C"]
    assert c["status"] == "not estimable" and c["auc_a"] is None and "0 negative" in c["reason"]
    assert any(n.startswith("C: not estimable") for n in result.notes)
    assert by_level(result)[OVERALL]["status"] == "ok"
    assert "not estimable" in result.summary()


def test_paired_auc_truth_must_agree_between_models():
    table = auc_table(n=10)
    table.loc[0, "y"] = 1 - table.loc[0, "y"]
    with pytest.raises(SitebenchError, match="column 'y' differs between the two models' rows"):
        paired_auc(table, model="model", a="old", b="new", truth="y", score="p")
