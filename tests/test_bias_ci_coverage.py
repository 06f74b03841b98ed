"""Interval coverage by simulation with known truth: the 95% CIs a report prints for bias must cover
the true bias in 93-97% of replicates (at least 200)."""

from __future__ import annotations

import numpy as np
import pytest
import pandas as pd

from sitebench.stratification import metrology, stratum_metrics

REPLICATES = 400
TRUE_BIAS = 1.5
STRATUM_REPLICATES = 600  # binomial SE 0.9%: the 93-97% window is more than 2 SE either side


def _covered(low: float, high: float) -> bool:
    return low <= TRUE_BIAS <= high


def test_metrology_bias_t_interval_covers_the_truth():
    rng = np.random.default_rng(2026)
    hits = 0
    for _ in range(REPLICATES):
        truth = rng.uniform(40, 80, 25)
        measured = truth + TRUE_BIAS + rng.normal(0, 3, 25)
        table = pd.DataFrame({"subject": range(25), "value": measured, "truth": truth})
        result = metrology(table, "subject", "value", reference="truth").to_dict()
        hits += _covered(result["bias_ci_low"], result["bias_ci_high"])
    print(f"metrology bias CI coverage {hits / REPLICATES:.3f} over {REPLICATES}")
    assert 0.93 <= hits / REPLICATES <= 0.97, hits / REPLICATES


@pytest.mark.slow
def test_stratum_bias_bootstrap_within_site_covers_the_truth():
    """Sites add their own offsets. The within-site bootstrap keeps the trial's sites fixed, so its
    estimand is the bias at these sites: the true bias plus the mean of these sites' offsets."""
    rng = np.random.default_rng(7)
    hits = 0
    for _ in range(STRATUM_REPLICATES):
        sites = np.repeat([f"S{i:02d}" for i in range(30)], 8)
        offsets = dict(zip(np.unique(sites), rng.normal(0, 0.5, 30)))
        reference = rng.uniform(500, 700, len(sites))
        prediction = reference + TRUE_BIAS + np.vectorize(offsets.get)(sites) + rng.normal(0, 2, len(sites))
        table = pd.DataFrame({"site": sites, "vendor": "V", "software_version": "1", "prediction": prediction,
                              "reference": reference})
        # only the overall row is judged; it resamples within site whatever the strata (no per-site rows: 4x faster)
        frame = stratum_metrics(table, prediction="prediction", reference="reference", strata=(),
                                dice=None, n_boot=300, seed=int(rng.integers(1 << 30))).to_frame()
        overall = frame[(frame["metric"] == "bias") & (frame["stratum"] == "overall")].iloc[0]
        truth_here = TRUE_BIAS + float(np.mean(list(offsets.values())))
        hits += overall["ci_low"] <= truth_here <= overall["ci_high"]
    print(f"stratum bias CI coverage {hits / STRATUM_REPLICATES:.3f} over {STRATUM_REPLICATES}")
    assert 0.93 <= hits / STRATUM_REPLICATES <= 0.97, hits / STRATUM_REPLICATES
