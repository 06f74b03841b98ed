"""Site equivalence: TOST against statsmodels' independent ttost_ind, Holm against multipletests,
and the intersection-union decision on simulated sites with known shifts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import ttost_ind

from sitebench.errors import SitebenchError
from sitebench.stratification.equivalence import holm, site_equivalence


def trial(shifts: dict[str, float], n: int = 40, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame([{"site": s, "error": rng.normal(shift, 1.0)} for s, shift in shifts.items()
                         for _ in range(n)])


def test_tost_matches_statsmodels_welch():
    table = trial({"A": 0.0, "B": 0.2, "C": -0.1, "D": 0.4})
    result = site_equivalence(table, "error", "site", margin=0.6)
    for row in result.rows:
        a = table.loc[table.site == row["site"], "error"].to_numpy()
        b = table.loc[table.site != row["site"], "error"].to_numpy()
        p, lower, upper = ttost_ind(a, b, -0.6, 0.6, usevar="unequal")
        assert row["p_tost"] == pytest.approx(p, rel=1e-9)
        assert row["p_lower"] == pytest.approx(lower[1], rel=1e-9)
        assert row["p_upper"] == pytest.approx(upper[1], rel=1e-9)
    assert [r["p_holm"] for r in result.rows] == pytest.approx(
        list(multipletests([r["p_tost"] for r in result.rows], method="holm")[1]), rel=1e-12)


def test_every_site_within_margin_by_intersection_union():
    close = site_equivalence(trial({s: 0.0 for s in "ABCDE"}, n=200), "error", "site", margin=0.5)
    assert close.all_within_margin and close.p_intersection_union == max(r["p_tost"] for r in close.rows)
    # E is 1.5 off; the others differ from "the rest" (E included) by only 1.5/4, inside 0.8
    shifted = site_equivalence(trial({"A": 0, "B": 0, "C": 0, "D": 0, "E": 1.5}, n=200), "error", "site", margin=0.8)
    assert not shifted.all_within_margin
    assert [r["site"] for r in shifted.rows if not r["equivalent"]] == ["E"]
    assert "every site within ±0.8: NO" in shifted.summary()


def test_holm_small_example():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_bad_input_is_one_line():
    table = trial({"A": 0.0, "B": 0.0})
    with pytest.raises(SitebenchError, match="no column 'score'"):
        site_equivalence(table, "score", "site", margin=1)
    with pytest.raises(SitebenchError, match="single level"):
        site_equivalence(table.assign(site="A"), "error", "site", margin=1)
    with pytest.raises(SitebenchError, match="constant"):
        site_equivalence(table.assign(error=1.0), "error", "site", margin=1)
    with pytest.raises(SitebenchError, match="missing"):
        site_equivalence(table.assign(error=np.where(np.arange(len(table)) == 3, np.nan, table.error)),
                         "error", "site", margin=1)
    with pytest.raises(SitebenchError, match="margin"):
        site_equivalence(table, "error", "site", margin=0)
    lonely = pd.concat([table, pd.DataFrame([{"site": "C", "error": 0.1}])])
    result = site_equivalence(lonely, "error", "site", margin=1)
    assert not result.all_within_margin and "site C: 1 scan(s), not estimable" in result.notes[0]
