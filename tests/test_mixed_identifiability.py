"""Random factors the fixed effects explain, and lme4's convergence check.

A random intercept whose levels differ only in ways the fixed effects already
describe has no estimable variance (lme4 returns an arbitrary value with a singular
Hessian); fit_lmm must refuse it in one line. When the fixed effects absorb only some
between-level contrasts (vendor constant within site), the fit goes ahead with a note
that says how many contrasts the variance rests on.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from sitebench.errors import SitebenchError
from sitebench.stratification import fit_scanner_effects
from sitebench.stratification import lmm
from sitebench.stratification.lmm import fit_lmm


def vendor_table(seed: int = 0, n_sites: int = 9, per_site: int = 10) -> pd.DataFrame:
    """Three vendors, three sites each; vendor constant within site."""
    rng = np.random.default_rng(seed)
    vendors = np.array(["GE", "Philips", "Siemens"])
    site = np.repeat(np.arange(n_sites), per_site)
    vendor = vendors[site % 3]
    y = (5 + pd.Series(vendor).map({"GE": 0, "Philips": 1, "Siemens": -1}).to_numpy()
         + rng.normal(0, 1, n_sites)[site] + rng.normal(0, 1, len(site)))
    return pd.DataFrame({"site": [f"S{s}" for s in site], "vendor": vendor, "age": rng.uniform(50, 80, len(site)),
                         "y": y})


def test_fixed_effect_that_is_the_grouping_factor_is_an_error():
    table = vendor_table()
    with pytest.raises(SitebenchError) as info:
        fit_lmm(table, "y ~ C(vendor)", "vendor")
    message = str(info.value)
    assert "\n" not in message
    assert re.search(r"'vendor' variance cannot be estimated: C\(vendor\)\[T\.Philips\], C\(vendor\)\[T\.Siemens\]",
                     message), message


def test_site_indicators_as_fixed_effects_leave_no_site_variance():
    table = vendor_table()
    with pytest.raises(SitebenchError, match="'site' variance cannot be estimated"):
        fit_lmm(table, "y ~ age + C(site)", "site")


def test_vendor_constant_within_site_is_a_note_not_an_error():
    table = vendor_table()
    fit = fit_lmm(table, "y ~ age + C(vendor)", "site")
    note = [n for n in fit.notes if n.startswith("'site' variance rests on")]
    assert note == ["'site' variance rests on 6 between-level contrast(s): 2 of the 8 are explained by "
                    "C(vendor)[T.Philips], C(vendor)[T.Siemens] (constant within each 'site')"]
    assert fit.variance_components["site"] > 0 and fit.converged
    # with a vendor per site pair, only 2 contrasts are left: flagged as barely identifiable
    few = vendor_table(n_sites=4).assign(vendor=lambda t: np.where(t["site"].isin(["S0", "S1"]), "GE", "Philips"))
    fit_few = fit_lmm(few, "y ~ C(vendor)", "site")
    assert any("rests on 2 between-level contrast(s)" in n and "barely identifiable" in n for n in fit_few.notes)


def test_scanner_effects_names_the_confounded_factor():
    table = vendor_table().assign(scan_id=lambda t: [f"x{i}" for i in range(len(t))])
    with pytest.raises(SitebenchError, match="'vendor' variance cannot be estimated"):
        fit_scanner_effects(table, "y", fixed=("C(vendor)",), site="vendor", scanner=None)


# ----------------------------------------------------------------------------- lme4's convergence check


def test_convergence_uses_lme4_scaled_gradient_and_keeps_raw_numbers():
    table = vendor_table(seed=3, n_sites=12, per_site=30)
    fit = fit_lmm(table, "y ~ age + C(vendor)", "site")
    d = fit.diagnostics
    assert fit.converged
    assert d["max_scaled_gradient"] < lmm.GRADIENT_TOL and d["gradient_tol"] == 2e-3
    assert len(d["scaled_gradient"]) == len(d["theta_gradient"]) == 1
    assert d["hessian_eigenvalues"][0] > 0 and d["singular"] is False
    assert d["last_step_rel_change"] is not None and d["last_step_rel_change"] < 1e-6
    assert "lme4 scaled gradient" in fit.summary()


def test_singular_fit_is_reported_like_lme4():
    rng = np.random.default_rng(5)
    table = pd.DataFrame({"site": np.repeat([f"S{i}" for i in range(8)], 20), "age": rng.uniform(50, 80, 160)})
    noise = pd.Series(rng.normal(0, 1, 160))
    table["y"] = noise - noise.groupby(table["site"]).transform("mean")
    fit = fit_lmm(table, "y ~ age", "site")
    assert fit.converged and fit.diagnostics["singular"]
    assert any("boundary (singular) fit" in n for n in fit.notes)
