"""Linear mixed model speed and agreement: sitebench's own REML vs lme4's lmer, same data, same run.

    .venv/bin/python perf/bench_mixed.py [--rows 100000 --sites 20 --scanners-per-site 3 --repeats 3]

``y ~ age + sex + vendor + (1 | site) + (1 | site:scanner)`` by REML. The data are written
to a CSV once; lme4's fit time is measured inside R with ``system.time`` around ``lmer``
only (reading the CSV and loading lme4 excluded), the wall time of the whole ``Rscript``
call is reported too. Ours is the whole ``fit_lmm`` call on the DataFrame (design
matrix, sufficient statistics, optimization, standard errors, BLUPs), median of
``--repeats`` after a warm-up; the report path (``fit_scanner_effects``) and a Wald-only fit are
timed once each. Goals: ours <= 0.5 x lme4's fit time, variance components
within 1e-3 relative of lme4's. Needs ``Rscript`` with lme4 (apt-get install r-cran-lme4).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

GOAL_RATIO = 0.5
GOAL_REL_DIFF = 1e-3
R_SCRIPT = Path(__file__).resolve().parents[1] / "tests" / "r" / "lme4_reference.R"
VENDOR_EFFECT = {"GE": 0.0, "Philips": 1.5, "Siemens": -1.0}


def simulate(rows: int, sites: int, scanners_per_site: int, seed: int = 20240611) -> pd.DataFrame:
    """Nested site > scanner design; vendor is a property of the scanner."""
    rng = np.random.default_rng(seed)
    n_scanners = sites * scanners_per_site
    scanner = np.sort(rng.integers(0, n_scanners, rows))
    scanner[:n_scanners] = np.arange(n_scanners)  # every scanner has scans
    site = scanner // scanners_per_site
    vendors = np.array(list(VENDOR_EFFECT))
    scanner_vendor = vendors[rng.integers(0, len(vendors), n_scanners)]
    age = rng.uniform(55, 90, rows).round(2)
    sex = rng.choice(np.array(["F", "M"]), rows)
    y = (600 + pd.Series(scanner_vendor[scanner]).map(VENDOR_EFFECT).to_numpy() - 1.2 * age + 4.0 * (sex == "M")
         + rng.normal(0, 6.0, sites)[site] + rng.normal(0, 3.0, n_scanners)[scanner]
         + rng.normal(0, 10.0, rows))
    return pd.DataFrame({
        "site": [f"S{s:02d}" for s in site],
        "scanner": [f"K{k % scanners_per_site}" for k in scanner],
        "vendor": scanner_vendor[scanner], "age": age, "sex": sex, "y": y.round(6),
    })


def run_lme4(csv: Path) -> tuple[dict[str, dict[str, float]], float]:
    """lme4's output lines as {key: {name: value}} and the wall seconds of the whole Rscript call."""
    formula = "y ~ age + sex + vendor + (1 | site) + (1 | site:scanner)"
    start = time.perf_counter()
    proc = subprocess.run(["Rscript", str(R_SCRIPT), str(csv), formula, "TRUE"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"Rscript failed: {proc.stderr.strip()[-2000:]}")
    out: dict[str, dict[str, float]] = {}
    for line in proc.stdout.splitlines():
        fit, key, name, value = line.split("\t")
        if key != "converged":
            out.setdefault(key, {})[name] = float(value)
    return out, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--scanners-per-site", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from sitebench.stratification.lmm import fit_lmm

    table = simulate(args.rows, args.sites, args.scanners_per_site)
    print(f"REML y ~ age + sex + vendor + (1|site) + (1|site:scanner): {len(table)} rows, "
          f"{args.sites} sites, {args.sites * args.scanners_per_site} scanners")

    def ours():
        return fit_lmm(table, "y ~ age + C(sex) + C(vendor)", "site", vc=["scanner"], reml=True)

    ours()  # warm-up: imports, allocator
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fit = ours()
        seconds.append(time.perf_counter() - start)
    t_ours = statistics.median(seconds)
    print(f"  sitebench fit_lmm   {t_ours:8.3f} s  (median of {args.repeats}; engine {fit.engine}, "
          f"optimizer {fit.optimizer}, converged {fit.converged}, {fit.diagnostics['evaluations']} evaluations)")

    # What a report pays per model and response: the same fit through fit_scanner_effects, and Satterthwaite's cost.
    from sitebench.stratification.mixed import fit_scanner_effects

    start = time.perf_counter()
    wald = fit_lmm(table, "y ~ age + C(sex) + C(vendor)", "site", vc=["scanner"], ddf="wald")
    t_wald = time.perf_counter() - start
    start = time.perf_counter()
    report = fit_scanner_effects(table, "y", fixed=("C(vendor)", "age", "C(sex)"), site="site", scanner="scanner")
    t_report = time.perf_counter() - start
    print(f"  fit_lmm ddf='wald'  {t_wald:8.3f} s  (Satterthwaite df add {t_ours - t_wald:+.3f} s)")
    print(f"  fit_scanner_effects {t_report:8.3f} s  (report path, {report.engine}, converged {report.converged}; "
          f"vendor df {report.to_frame().set_index('term')['df'].filter(like='vendor').round(1).to_dict()})")

    if shutil.which("Rscript") is None:
        print("  Rscript not found (apt-get install r-base-core r-cran-lme4): timed ours only")
        sys.exit(1)
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "mixed.csv"
        table.to_csv(csv, index=False)
        try:
            ref, wall = run_lme4(csv)
        except RuntimeError as exc:
            print(f"  lme4 run failed: {exc}")
            sys.exit(1)
    t_lme4 = ref["fit_seconds"]["lmer"]
    print(f"  lme4 lmer (in R)    {t_lme4:8.3f} s  (system.time around lmer; whole Rscript call {wall:.3f} s)")
    ratio = t_ours / t_lme4
    theirs = {"site": ref["var"]["site"], "scanner": ref["var"]["site:scanner"], "residual": ref["var"]["Residual"]}
    rel = {k: abs(fit.variance_components[k] / v - 1.0) for k, v in theirs.items()}
    worst = max(rel.values())
    print("  variance components (ours / lme4): " + ", ".join(
        f"{k} {fit.variance_components[k]:.6g} / {v:.6g}" for k, v in theirs.items()))
    print(f"  logLik ours {fit.loglik:.6f}, lme4 {ref['loglik']['logLik']:.6f} "
          f"(diff {fit.loglik - ref['loglik']['logLik']:.2e})")
    print(f"  ratio ours/lme4 fit = {ratio:.3f} (goal <= {GOAL_RATIO}): {'OK' if ratio <= GOAL_RATIO else 'MISSED'}"
          f"; ours/whole Rscript call = {t_ours / wall:.3f}")
    print(f"  max relative difference of variance components = {worst:.2e} (goal <= {GOAL_REL_DIFF:g}): "
          f"{'OK' if worst <= GOAL_REL_DIFF else 'MISSED'}")


if __name__ == "__main__":
    main()
