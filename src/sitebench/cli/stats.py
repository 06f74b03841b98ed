"""``sitebench stats ...``: scanner-effect statistics on any table (CSV, TSV or Parquet)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sitebench.cli._common import add_json, errors_name, print_json, print_result
from sitebench.errors import SitebenchError

if TYPE_CHECKING:
    from sitebench.results import Result


def cmd_stats_combat(args: argparse.Namespace) -> int:
    from sitebench.stratification.combat import ComBat, harmonize_table

    table = _stats_table(args.table)
    model = ComBat(batch=args.batch, features=args.features, categorical=args.categorical,
                   continuous=args.continuous, parametric=not args.nonparametric, empirical_bayes=not args.no_eb,
                   mean_only=args.mean_only, ref_batch=args.ref_batch)
    with errors_name(args.table):
        out, efficacy = harmonize_table(table, model)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(args.out, index=False)
    print(f"{args.out}: {len(out)} rows, {len(args.features)} features harmonized across "
          f"{len(model.batches_)} batches")
    print(efficacy.summary())
    if args.efficacy_json:
        Path(args.efficacy_json).write_text(json.dumps(efficacy.to_dict(), indent=2))
    return 0


def _stats_table(path: str):
    from sitebench.datasets.manifest import read_table

    return read_table(Path(path))


def cmd_stats_equivalence(args: argparse.Namespace) -> int:
    from sitebench.stratification.equivalence import site_equivalence

    return _run_table_analysis(args, lambda t: site_equivalence(t, args.value, args.site, args.margin, args.alpha))


def cmd_stats_paired(args: argparse.Namespace) -> int:
    from sitebench.stratification.paired import paired_comparison

    return _run_table_analysis(args, lambda t: paired_comparison(
        t, model=args.model, a=args.a, b=args.b, value=args.value, scan=args.scan, by=args.by or None,
        margin=args.margin, alpha=args.alpha))


def _columns(table, *names: str | None):
    """The named columns (None stays None); a missing one is an error listing what the table has."""
    missing = [n for n in names if n is not None and n not in table.columns]
    if missing:
        raise SitebenchError(f"no column(s) {', '.join(missing)} (have: {', '.join(map(str, table.columns))})")
    return [None if n is None else table[n] for n in names]


def cmd_stats_delong(args: argparse.Namespace) -> int:
    from sitebench.stratification.classification import delong

    return _run_table_analysis(args, lambda t: delong(*_columns(t, args.truth, args.score, args.score2),
                                                      alpha=args.alpha))


def cmd_stats_icc(args: argparse.Namespace) -> int:
    from sitebench.stratification.agreement import icc

    # --json is a list of forms (the shape issue 4 specified and the README documents)
    return _run_table_analysis(args, lambda t: icc(t, args.targets, args.raters, args.ratings, alpha=args.alpha),
                               as_json=lambda result: [form.to_dict() for form in result.forms])


def cmd_stats_bland_altman(args: argparse.Namespace) -> int:
    from sitebench.stratification.agreement import bland_altman

    return _run_table_analysis(args, lambda t: bland_altman(t, args.a, args.b, alpha=args.alpha,
                                                           limit_z=args.limit_z))


def cmd_stats_metrology(args: argparse.Namespace) -> int:
    from sitebench.stratification.agreement import metrology

    return _run_table_analysis(args, lambda t: metrology(t, args.subject, args.value, reference=args.reference,
                                                         replicate=args.replicate, site=args.site,
                                                         alpha=args.alpha))


def cmd_stats_mixed(args: argparse.Namespace) -> int:
    from sitebench.stratification.lmm import fit_lmm

    return _run_table_analysis(args, lambda t: fit_lmm(t, args.formula, args.groups, vc=args.vc or (),
                                                       crossed=args.crossed or (), reml=not args.ml,
                                                       ddf=args.ddf, alpha=args.alpha))


def _run_table_analysis(args: argparse.Namespace, analysis: Callable[[Any], Result],
                        as_json: Callable[[Result], Any] | None = None) -> int:
    """Read the table, run one analysis, print its summary or one JSON document; errors name the table."""
    table = _stats_table(args.table)
    with errors_name(args.table):
        result = analysis(table)
    if args.json and as_json is not None:
        print_json(as_json(result))
    else:
        print_result(result, args.json)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    stats = sub.add_parser("stats", help="scanner-effect statistics on any CSV").add_subparsers(
        dest="analysis", metavar="ANALYSIS", required=True)
    combat = stats.add_parser("combat", help="ComBat harmonization (all variants; matches the authors' outputs)",
                              description="One row per scan in, the same rows out with harmonized features.")
    combat.add_argument("table", help="CSV/TSV/Parquet, one row per scan")
    combat.add_argument("--batch", required=True, help="batch column (site or scanner)")
    combat.add_argument("--features", nargs="+", required=True, help="feature columns to harmonize")
    combat.add_argument("--categorical", nargs="*", default=[], help="categorical covariates to preserve")
    combat.add_argument("--continuous", nargs="*", default=[], help="continuous covariates to preserve")
    combat.add_argument("--nonparametric", action="store_true", help="non-parametric empirical Bayes prior")
    combat.add_argument("--no-eb", action="store_true", help="no empirical Bayes shrinkage")
    combat.add_argument("--mean-only", action="store_true", help="adjust location only")
    combat.add_argument("--ref-batch", help="reference batch, left unchanged")
    combat.add_argument("--out", required=True, help="harmonized CSV")
    combat.add_argument("--efficacy-json", help="also write the efficacy report (site share before/after, "
                                                "covariate effects kept) as JSON")
    combat.set_defaults(func=cmd_stats_combat)
    equivalence = stats.add_parser("equivalence", help="per-site TOST vs the rest; is every site within a margin?",
                                   description="Welch TOST of each site's mean against the other sites', Holm-"
                                               "adjusted; 'every site within the margin' by intersection-union.")
    equivalence.add_argument("table", help="CSV/TSV/Parquet, one row per scan")
    equivalence.add_argument("--value", required=True, help="per-scan performance column (e.g. absolute error)")
    equivalence.add_argument("--site", default="site", help="site column")
    equivalence.add_argument("--margin", type=float, required=True, help="equivalence margin, in --value's units")
    equivalence.add_argument("--alpha", type=float, default=0.05)
    add_json(equivalence)
    equivalence.set_defaults(func=cmd_stats_equivalence)
    paired = stats.add_parser("paired", help="two model versions on the same scans: per-site paired differences",
                              description="Pairs rows by scan; per level of --by and overall: mean difference "
                                          "(b - a) with paired-t CI, Wilcoxon p, and with --margin the paired "
                                          "TOST, Holm-adjusted across levels.")
    paired.add_argument("table", help="CSV/TSV/Parquet, one row per scan and model version")
    paired.add_argument("--model", default="model_key", help="column naming the model version")
    paired.add_argument("--a", required=True, help="first model version (e.g. gm-unet@1.0.0)")
    paired.add_argument("--b", required=True, help="second model version")
    paired.add_argument("--value", required=True, help="per-scan value to compare (e.g. absolute error)")
    paired.add_argument("--scan", default="scan_id", help="scan column the rows are paired on")
    paired.add_argument("--by", default="site", help="stratum column ('' for overall only)")
    paired.add_argument("--margin", type=float, help="equivalence margin for the paired TOST, --value's units")
    paired.add_argument("--alpha", type=float, default=0.05)
    add_json(paired)
    paired.set_defaults(func=cmd_stats_paired)
    delong_cmd = stats.add_parser("delong", help="AUC with DeLong CI; paired DeLong test of two scores",
                                  description="AUC (larger score = positive class) with the DeLong CI, as R's "
                                              "pROC; with --score2, the paired DeLong test of the difference.")
    delong_cmd.add_argument("table")
    delong_cmd.add_argument("--truth", required=True, help="binary outcome column (0/1)")
    delong_cmd.add_argument("--score", required=True)
    delong_cmd.add_argument("--score2", help="second model's score, for the paired test")
    delong_cmd.add_argument("--alpha", type=float, default=0.05)
    add_json(delong_cmd)
    delong_cmd.set_defaults(func=cmd_stats_delong)
    mixed = stats.add_parser("mixed", help="linear mixed model: fixed effects, variance components, BLUPs",
                             description="Random intercepts for --groups (site), nested --vc (scanner within "
                                         "site) and --crossed factors (traveling subjects); REML by default. "
                                         "Variance components checked against R's lme4; fixed-effect t tests "
                                         "with Satterthwaite degrees of freedom checked against lmerTest.")
    mixed.add_argument("table")
    mixed.add_argument("--formula", required=True, help='fixed effects, e.g. "y ~ age + C(vendor)"')
    mixed.add_argument("--groups", required=True, help="top-level grouping column (site)")
    mixed.add_argument("--vc", nargs="*", help="columns nested in --groups (scanner)")
    mixed.add_argument("--crossed", nargs="*", help="columns crossed with --groups (subject)")
    mixed.add_argument("--ml", action="store_true", help="maximum likelihood instead of REML (for LRTs)")
    mixed.add_argument("--ddf", choices=("satterthwaite", "wald"), default="satterthwaite",
                       help="degrees of freedom of the fixed-effect tests: Satterthwaite t (lmerTest's default), "
                            "or Wald z (anti-conservative with few sites)")
    mixed.add_argument("--alpha", type=float, default=0.05, help="1 - confidence level of the CIs (default 0.05)")
    add_json(mixed)
    mixed.set_defaults(func=cmd_stats_mixed)
    icc_cmd = stats.add_parser("icc", help="ICC(1,1), ICC(A,1), ICC(C,1) and their k forms, with F-based CIs",
                               description="Intraclass correlations (McGraw & Wong names; Shrout & Fleiss forms) "
                                           "from a long table: one row per (target, rater) rating.")
    icc_cmd.add_argument("table")
    icc_cmd.add_argument("--targets", required=True, help="subject / target column")
    icc_cmd.add_argument("--raters", required=True, help="rater, scanner or session column")
    icc_cmd.add_argument("--ratings", required=True, help="measurement column")
    icc_cmd.add_argument("--alpha", type=float, default=0.05)
    add_json(icc_cmd, "a list with one object per ICC form")
    icc_cmd.set_defaults(func=cmd_stats_icc)
    ba = stats.add_parser("bland-altman", help="bias and limits of agreement, each with a CI",
                          description="Bias (mean of a - b), SD and limits bias ± z·SD with CIs (exact, "
                                      "non-central t).")
    ba.add_argument("table")
    ba.add_argument("--a", required=True)
    ba.add_argument("--b", required=True)
    ba.add_argument("--limit-z", type=float, default=1.96, help="limits at bias ± this many SDs (1986 paper: 2)")
    ba.add_argument("--alpha", type=float, default=0.05)
    add_json(ba)
    ba.set_defaults(func=cmd_stats_bland_altman)
    metro = stats.add_parser("metrology", help="QIBA metrology: bias, linearity, wSD, RC, wCV, reproducibility",
                             description="Technical performance of a quantitative imaging biomarker (Raunig et "
                                         "al. 2015): give --reference for bias and linearity, repeat scans for "
                                         "repeatability, --site for reproducibility.")
    metro.add_argument("table")
    metro.add_argument("--subject", required=True)
    metro.add_argument("--value", required=True)
    metro.add_argument("--reference", help="true value column")
    metro.add_argument("--replicate", help="replicate (repeat scan) column")
    metro.add_argument("--site", help="site column, for reproducibility")
    metro.add_argument("--alpha", type=float, default=0.05)
    add_json(metro)
    metro.set_defaults(func=cmd_stats_metrology)
