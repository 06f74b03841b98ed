"""ComBat speed and agreement: sitebench vs neuroCombat on the same simulated data, same run.

    .venv/bin/python perf/bench_combat.py [--samples 5000 --features 1000 --batches 20 --repeats 3]

Parametric EB, no reference batch (neuroCombat 0.2.12's ref_batch path uses ``np.int`` and fails on
NumPy >= 1.24), one categorical (sex) and one continuous (age) covariate. Goals: ours <= 0.5 x
neuroCombat's time, max |difference| <= 1e-6. Install the peer with
``.venv/bin/pip install neuroCombat==0.2.12`` (it has no dependencies beyond numpy/pandas).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time

import numpy as np
import pandas as pd

GOAL_RATIO = 0.5
GOAL_DIFF = 1e-6


def simulate(samples: int, features: int, batches: int, seed: int = 20240607) -> tuple[np.ndarray, pd.DataFrame]:
    """Samples x features with per-batch location/scale effects and sex/age effects."""
    rng = np.random.default_rng(seed)
    batch = np.sort(rng.integers(0, batches, samples))
    batch[:batches * 2] = np.repeat(np.arange(batches), 2)  # every batch has >= 2 samples
    sex = rng.integers(0, 2, samples)
    # neuroCombat casts continuous covariates to float32; float32-exact ages keep the comparison exact.
    age = rng.uniform(20, 80, samples).astype(np.float32).astype(np.float64)
    base = rng.normal(10, 2, features)
    loc = rng.normal(0, 1, (batches, features))
    scale = rng.gamma(4, 0.25, (batches, features))
    x = (base + 0.5 * sex[:, None] + 0.03 * (age[:, None] - 50) + loc[batch]
         + np.sqrt(scale[batch]) * rng.normal(0, 1, (samples, features)))
    covars = pd.DataFrame({"site": [f"site{b:02d}" for b in batch], "sex": sex, "age": age})
    return x, covars


def _timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    """Median seconds over repeats after one untimed warm-up run (imports, allocator, BLAS threads)."""
    fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--features", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from sitebench.stratification.combat import ComBat, site_variance_share

    x, covars = simulate(args.samples, args.features, args.batches)
    print(f"ComBat parametric EB: {args.samples} samples x {args.features} features, {args.batches} batches, "
          f"covariates sex (categorical) + age (continuous); median of {args.repeats} runs after a warm-up")

    def ours() -> np.ndarray:
        return ComBat(categorical=["sex"], continuous=["age"]).fit_transform(x, batch=covars["site"], covariates=covars)

    t_ours, out_ours = _timed(ours, args.repeats)
    print(f"  sitebench   {t_ours:8.3f} s")
    share_before = np.median(site_variance_share(x, covars["site"]))
    share_after = np.median(site_variance_share(out_ours, covars["site"]))
    print(f"  median site variance share: {share_before:.3f} before, {share_after:.4f} after")

    try:
        from neuroCombat import neuroCombat
    except ImportError:
        print("  neuroCombat is not installed (.venv/bin/pip install neuroCombat==0.2.12): timed ours only")
        return

    def theirs() -> np.ndarray:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per step
            result = neuroCombat(dat=x.T.copy(), covars=covars, batch_col="site", categorical_cols=["sex"],
                                 continuous_cols=["age"], eb=True, parametric=True)
        return np.asarray(result["data"]).T

    t_theirs, out_theirs = _timed(theirs, args.repeats)
    ratio = t_ours / t_theirs
    diff = float(np.abs(out_ours - out_theirs).max())
    print(f"  neuroCombat {t_theirs:8.3f} s")
    print(f"  ratio ours/neuroCombat = {ratio:.3f} (goal <= {GOAL_RATIO}): {'OK' if ratio <= GOAL_RATIO else 'MISSED'}")
    print(f"  max |ours - neuroCombat| = {diff:.2e} (goal <= {GOAL_DIFF:g}): {'OK' if diff <= GOAL_DIFF else 'MISSED'}")


if __name__ == "__main__":
    main()
