"""ComBat against the authors' reference outputs (Jfortin1/ComBatHarmonization), every variant.

The reference layout is features x samples; ours is samples x features, so matrices are transposed.
Settings of each variant come from its file name: (non)parametric, (un)adjusted (gender covariate),
batchref (reference batch 1), noeb, meanonly; the suffix says which implementation wrote it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sitebench.errors import SitebenchError
from sitebench.stratification.combat import ComBat, site_variance_share

COMBAT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "combat"
if not COMBAT_DATA.is_dir():
    pytest.skip(f"ComBat reference data not found at {COMBAT_DATA}", allow_module_level=True)

OUTPUT = COMBAT_DATA / "outputData"
TOLERANCE = 1e-6
BATCH = [1] * 5 + [2] * 5
GENDER = pd.DataFrame({"gender": [1, 2] * 5})
VARIANTS = sorted(OUTPUT.glob("testdata_combat_*.csv"))
SCENARIO2 = sorted(OUTPUT.glob("training_test_scenario2_*.csv"))


def _read(path: Path) -> np.ndarray:
    """A reference matrix (features x samples) as samples x features; R's files carry a V1.. header."""
    header = 0 if path.read_text()[:1] == "V" else None
    return pd.read_csv(path, header=header).to_numpy(dtype=np.float64).T


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return _read(COMBAT_DATA / "inputData" / "testdata.csv")


def _settings(name: str) -> dict:
    tokens = name.removesuffix(".csv").split("_")[2:]  # drop "testdata_combat"
    assert tokens[0] in {"parametric", "nonparametric"} and tokens[1] in {"adjusted", "unadjusted"}, name
    assert tokens[-1] in {"python", "r", "matlab"}, name
    known = {"batchref", "noeb", "meanonly", "meanonl"}  # "meanonl": a typo in one R file name
    assert set(tokens[2:-1]) <= known, name
    return {
        "parametric": tokens[0] == "parametric",
        "adjusted": tokens[1] == "adjusted",
        "ref_batch": 1 if "batchref" in tokens else None,
        "empirical_bayes": "noeb" not in tokens,
        "mean_only": bool({"meanonly", "meanonl"} & set(tokens)),
        # The Matlab implementation stops the parametric EB iteration at 1e-3 instead of 1e-4.
        "conv": 1e-3 if tokens[-1] == "matlab" else 1e-4,
    }


def test_reference_files_present():
    assert len(VARIANTS) >= 60 and len(SCENARIO2) == 2


@pytest.mark.parametrize("path", VARIANTS, ids=lambda p: p.stem.removeprefix("testdata_combat_"))
def test_matches_reference(path: Path, data: np.ndarray):
    s = _settings(path.name)
    model = ComBat(parametric=s["parametric"], empirical_bayes=s["empirical_bayes"], mean_only=s["mean_only"],
                   ref_batch=s["ref_batch"], conv=s["conv"], categorical=["gender"] if s["adjusted"] else ())
    if s["adjusted"]:
        out = model.fit_transform(data, batch=BATCH, covariates=GENDER)
    else:
        out = model.fit_transform(data, batch=BATCH)
    expected = _read(path)
    assert out.shape == expected.shape == (10, 200)
    assert np.abs(out - expected).max() <= TOLERANCE
    if s["ref_batch"] is not None:
        np.testing.assert_array_equal(out[:5], data[:5])  # the reference batch is left unchanged


@pytest.mark.parametrize("path", SCENARIO2, ids=lambda p: p.stem)
def test_fit_then_apply_scenario2(path: Path, data: np.ndarray):
    model = ComBat(categorical=["gender"]).fit(data, batch=BATCH, covariates=GENDER)
    rows = [0, 1, 5, 6]  # V1, V2, V6, V7
    out = model.transform(data[rows], batch=[1, 1, 2, 2])
    expected = _read(path)
    assert out.shape == expected.shape == (4, 200)
    assert np.abs(out - expected).max() <= TOLERANCE


# ----------------------------------------------------------------------------- API behaviour
@pytest.mark.parametrize("ref_batch", [None, 1])
@pytest.mark.parametrize("parametric", [True, False])
def test_transform_with_covariates_reproduces_fit_transform(data, ref_batch, parametric):
    model = ComBat(parametric=parametric, ref_batch=ref_batch, categorical=["gender"])
    fitted = model.fit_transform(data, batch=BATCH, covariates=GENDER)
    again = model.transform(data, batch=BATCH, covariates=GENDER)
    np.testing.assert_allclose(again, fitted, atol=1e-10, rtol=0)


def test_dataframe_in_dataframe_out_and_attributes(data):
    frame = pd.DataFrame(data, index=[f"s{i}" for i in range(10)], columns=[f"f{j}" for j in range(200)])
    labels = ["A"] * 5 + ["B"] * 5
    model = ComBat(categorical=["gender"])
    out = model.fit_transform(frame, batch=labels, covariates=GENDER.set_axis(frame.index))
    assert isinstance(out, pd.DataFrame)
    assert out.index.equals(frame.index) and out.columns.equals(frame.columns)
    np.testing.assert_allclose(out.to_numpy(), ComBat(categorical=["gender"]).fit_transform(
                                   data, batch=BATCH, covariates=GENDER),
                               atol=1e-12, rtol=0)
    assert list(model.batches_) == ["A", "B"]
    assert model.gamma_star_.shape == model.delta_star_.shape == (2, 200)
    assert model.grand_mean_.shape == model.var_pooled_.shape == (200,)
    assert model.beta_.shape == (1, 200)


def test_options_in_init_so_clone_and_pipeline_work(data):
    """scikit-learn conventions: clone copies the options, not the fit; a Pipeline fits it with the rest."""
    from sklearn.base import clone
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import Pipeline

    model = ComBat(batch="scanner", categorical=["gender"], parametric=False, ref_batch=1)
    model.fit(data, batch=BATCH, covariates=GENDER)
    copy = clone(model)
    assert copy.get_params() == model.get_params() and copy.get_params()["categorical"] == ["gender"]
    assert not hasattr(copy, "gamma_star_") and hasattr(model, "gamma_star_")

    # one table in: batch and covariate columns are read from it, the other columns harmonized
    table = pd.DataFrame(data[:, :20], columns=[f"f{j}" for j in range(20)])
    table["scanner"], table["gender"] = BATCH, GENDER["gender"].to_numpy()
    direct = ComBat(categorical=["gender"]).fit_transform(data[:, :20], batch=BATCH, covariates=GENDER)
    combat = ComBat(batch="scanner", categorical=["gender"])
    from_table = combat.fit_transform(table)
    assert list(from_table.columns) == [f"f{j}" for j in range(20)]
    assert list(combat.get_feature_names_out()) == list(from_table.columns)
    np.testing.assert_allclose(from_table.to_numpy(), direct, atol=1e-12, rtol=0)

    target = data[:, 20] + np.asarray(BATCH)  # anything to regress on
    pipe = Pipeline([("combat", ComBat(batch="scanner", categorical=["gender"])), ("ols", LinearRegression())])
    pipe.fit(table, target)
    expected = LinearRegression().fit(direct, target).predict(direct)
    np.testing.assert_allclose(pipe.predict(table), expected, atol=1e-8)
    np.testing.assert_allclose(clone(pipe).fit(table, target).predict(table), expected, atol=1e-8)
    with pytest.raises(SitebenchError) as excinfo:
        ComBat(batch="site").fit(table)
    assert "no column(s) site" in _message(excinfo)


def test_site_variance_share_drops_after_harmonization(data):
    before = site_variance_share(data, BATCH)
    after = site_variance_share(ComBat().fit_transform(data, batch=BATCH), BATCH)
    # one-way ANOVA R^2 by hand for one feature
    y = data[:, 0]
    groups = [y[:5], y[5:]]
    between = sum(len(g) * (g.mean() - y.mean()) ** 2 for g in groups)
    assert before[0] == pytest.approx(between / ((y - y.mean()) ** 2).sum())
    assert np.all((before >= 0) & (before <= 1))
    assert np.median(after) < 0.1 * np.median(before)


# ----------------------------------------------------------------------------- errors
def _message(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_unseen_batch_in_transform(data):
    model = ComBat().fit(data, batch=BATCH)
    with pytest.raises(SitebenchError) as excinfo:
        model.transform(data[:2], batch=[1, 3])
    assert "unseen batch 3: ComBat can only harmonize batches it was fitted on" in _message(excinfo)


def test_single_sample_batch(data):
    with pytest.raises(SitebenchError) as excinfo:
        ComBat().fit(data, batch=[1] * 5 + [2] * 4 + ["X"])
    assert "batch 'X' has 1 sample; ComBat needs at least 2 per batch" in _message(excinfo)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features(data, bad):
    x = data.copy()
    x[3, 7] = bad
    with pytest.raises(SitebenchError) as excinfo:
        ComBat().fit(x, batch=BATCH)
    assert "NaN/inf" in _message(excinfo)


def test_zero_variance_feature_is_named(data):
    frame = pd.DataFrame(data, columns=[f"f{j}" for j in range(200)])
    frame["f42"] = 3.0
    with pytest.raises(SitebenchError) as excinfo:
        ComBat().fit(frame, batch=BATCH)
    assert "'f42'" in _message(excinfo) and "zero variance" in _message(excinfo)


def test_ref_batch_not_present(data):
    with pytest.raises(SitebenchError) as excinfo:
        ComBat(ref_batch=7).fit(data, batch=BATCH)
    assert "ref_batch 7" in _message(excinfo)


def test_mismatched_lengths(data):
    with pytest.raises(SitebenchError) as excinfo:
        ComBat().fit(data, batch=BATCH[:-1])
    assert "9 labels" in _message(excinfo)
    with pytest.raises(SitebenchError) as excinfo:
        ComBat(categorical=["gender"]).fit(data, batch=BATCH, covariates=GENDER.iloc[:8])
    assert "8 rows" in _message(excinfo)
    model = ComBat().fit(data, batch=BATCH)
    with pytest.raises(SitebenchError) as excinfo:
        model.transform(data[:, :10], batch=BATCH)
    assert "fitted on 200" in _message(excinfo)


def test_covariate_confounded_with_batch(data):
    with pytest.raises(SitebenchError) as excinfo:
        ComBat(categorical=["site"]).fit(data, batch=BATCH, covariates=pd.DataFrame({"site": BATCH}))
    assert "singular" in _message(excinfo)



def test_efficacy_report_site_share_falls_and_covariates_are_kept():
    from sitebench.stratification.combat import combat_efficacy

    rng = np.random.default_rng(4)
    n_sites, per_site = 8, 40
    site = np.repeat([f"S{i}" for i in range(n_sites)], per_site)
    age = rng.uniform(20, 80, n_sites * per_site)
    sex = rng.choice(["F", "M"], n_sites * per_site)
    shift = dict(zip(np.unique(site), rng.normal(0, 3, n_sites)))
    scale = dict(zip(np.unique(site), rng.uniform(0.7, 1.5, n_sites)))
    features = pd.DataFrame({f"v{j}": 50 - 0.2 * age + 2.0 * (sex == "M") + np.vectorize(shift.get)(site)
                             + np.vectorize(scale.get)(site) * rng.normal(0, 2, len(site)) for j in range(5)})
    covariates = pd.DataFrame({"age": age, "sex": sex})
    harmonized = ComBat(categorical=["sex"], continuous=["age"]).fit_transform(features, batch=site,
                                                                               covariates=covariates)
    report = combat_efficacy(features, harmonized, site, covariates)
    summary = report.to_dict()
    assert summary["median_site_share_before"] > 0.2 and summary["median_site_share_after"] < 0.02
    assert report.all_preserved and "preserved" in report.summary()
    # a "harmonization" that removes the age effect is caught
    flattened = harmonized - np.outer(-0.2 * (age - age.mean()), np.ones(5))
    assert not combat_efficacy(features, flattened, site, covariates).all_preserved
